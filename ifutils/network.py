"""Per-sample gradients of the whole network (every parameter tensor of :class:`~ifutils.model.LSTMLM`, or any
list of whole tensors), from the per-layer structure instead of one backward pass per sentence.

Every parameter of the LSTM LM enters through a linear map s_t = W a_t (+ b), so the gradient of sentence i's
loss l_i (mean token NLL, nats/token) with respect to W is a sum over its tokens of outer products
(the identity KFAC rests on; Martens & Grosse 2015, sec. 2):

    d l_i / d W = sum_t delta_{i,t} a_{i,t}^T,      d l_i / d b = sum_t delta_{i,t},      delta_{i,t} = d l_i / d s_{i,t}.

* decoder (W_d (V, H), b_d): a_t = h_t, the last LSTM layer's state; delta_t = (p_t - onehot(y_t)) / T_i at real
  tokens (closed form of the softmax cross-entropy gradient), 0 at padding;
* LSTM layer k (W_ih (4H, in), W_hh (4H, H), b_ih, b_hh): s_t the 4H gate pre-activations; a_t = x_t (the layer's
  input) for W_ih and h_{t-1} (0 at t = 0) for W_hh; both biases get sum_t delta_t;
* embedding (V, E): its output x_t = E[w_t] is the product of E^T with the one-hot input, so row r of the gradient
  is sum_{t: w_t = r} d l_i / d x_t: the one-hot input factor is diagonal.

One batched forward pass through the unrolled LSTM (:func:`~ifutils.model.unrolled_lstm`'s equations) and one
backward pass of sum_i l_i give every delta of every sentence at once: l_i depends only on sentence i (the state
starts at zero, padding is at the end and masked), so d(sum_j l_j)/d s_{i,t} = d l_i / d s_{i,t}. The outer products
are then batched matrix products. Dropout is off (the model must be in eval mode).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .data import bucket_batches, make_batch
from .model import LSTMLM


def parameter_names(model: LSTMLM) -> list[str]:
    """Names of every parameter tensor of ``model``, in ``named_parameters`` order (the flat layout's order)."""
    return [name for name, _ in model.named_parameters()]


class NetworkGrads:
    """Per-sample gradients of whole parameter tensors of an :class:`LSTMLM` (module docstring for the formulas).

    Args:
        model: the trained model; must be in eval mode (dropout off). Its parameters are read, never changed.
        eos_id: id of ``<eos>``, the start and padding token (``vocab.stoi["<eos>"]``).
        names: parameter names to differentiate, default all (:func:`parameter_names`). Whole tensors only.
    Attributes:
        names: the chosen names, in ``named_parameters`` order; ``shapes``: their shapes; ``p``: total size P.
    Raises:
        ValueError: the model is in training mode, ``names`` is a string or holds an unknown name.
        TypeError: ``eos_id`` is not an int.
    """

    def __init__(self, model: LSTMLM, eos_id: int, names: list[str] | None = None):
        if model.training:
            raise ValueError("the model is in training mode; call model.eval() so that dropout is off")
        if not isinstance(eos_id, int) or isinstance(eos_id, bool):
            raise TypeError(f"eos_id must be an int id, e.g. vocab.stoi['<eos>'], got {eos_id!r}")
        every = parameter_names(model)
        if isinstance(names, str):
            raise ValueError(f"names must be a list of parameter names, e.g. [{names!r}], not a string")
        chosen = every if names is None else list(names)
        unknown = [n for n in chosen if n not in every]
        if unknown or not chosen:
            raise ValueError(f"unknown or no parameter names {unknown}; valid names: {', '.join(every)}")
        self.model, self.eos_id = model, eos_id
        self.names = [n for n in every if n in set(chosen)]
        params = dict(model.named_parameters())
        self.shapes = {n: tuple(params[n].shape) for n in self.names}
        self.p = sum(params[n].numel() for n in self.names)

    def signals(self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Layer inputs a_t and pre-activation gradients delta_t of every layer, for a padded batch.

        Args:
            inputs, targets: (B, L) int64; mask: (B, L) bool (:func:`~ifutils.data.make_batch`), on the model's device.
        Returns:
            dict with ``tokens`` (B, L) the input ids, ``d_embedding`` (B, L, E) = d l_i / d x_t of the embedding
            output, and per LSTM layer k: ``x{k}`` (B, L, in) its inputs, ``h{k}`` (B, L, H) its states,
            ``d_gates{k}`` (B, L, 4H); and ``h_last`` (B, L, H), ``d_logits`` (B, L, V). Float, the model's dtype.
        """
        model = self.model
        lstm = model.lstm
        with torch.enable_grad():
            x = model.embedding.weight.detach()[inputs].requires_grad_(True)
            out, shifts, record = x, [], {"tokens": inputs}
            for k in range(lstm.num_layers):
                w_ih, w_hh = getattr(lstm, f"weight_ih_l{k}").detach(), getattr(lstm, f"weight_hh_l{k}").detach()
                bias = (getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}")).detach()
                shift = out.new_zeros(out.shape[:-1] + (w_ih.shape[0],)).requires_grad_(True)
                pre = out @ w_ih.T + bias + shift
                h = pre.new_zeros(pre.shape[:-2] + (lstm.hidden_size,))
                c, states = h, []
                for t in range(pre.shape[-2]):
                    i, f, g, o = (pre[..., t, :] + h @ w_hh.T).chunk(4, dim=-1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    states.append(h)
                record[f"x{k}"] = out.detach()
                out = torch.stack(states, dim=-2)
                record[f"h{k}"] = out.detach()
                shifts.append(shift)
            h_last = out
            logits = h_last.detach() @ model.decoder.weight.detach().T + model.decoder.bias.detach()
            weight = (mask.to(logits.dtype) / mask.sum(-1, keepdim=True))[..., None]  # 1 / T_i at real tokens
            d_logits = torch.softmax(logits, -1).scatter_add_(-1, targets[..., None], -logits.new_ones(targets.shape + (1,)))
            d_logits = d_logits * weight
            # backward through the LSTM from dL/dh_t = d_logits W_d (the decoder is linear in h)
            grads = torch.autograd.grad(h_last, [x, *shifts], grad_outputs=d_logits @ model.decoder.weight.detach())
        record.update({"d_embedding": grads[0], "h_last": h_last.detach(), "d_logits": d_logits})
        record.update({f"d_gates{k}": g for k, g in enumerate(grads[1:])})
        return record

    def batch_grads(self, sentences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sample gradients of the chosen tensors for a list of sentences, in one batched pass.

        Args:
            sentences: B 1-D int64 tensors of word ids ending in ``<eos>``.
        Returns:
            {name: (B, *shape)} float tensors on the model's device: d l_i / d theta, l_i in nats/token.
        """
        device = self.model.decoder.weight.device
        batch = [t.to(device) for t in make_batch(sentences, self.eos_id)]
        s = self.signals(*batch)
        out: dict[str, torch.Tensor] = {}
        for name in self.names:
            out[name] = self._grad(name, s)
        return out

    def _grad(self, name: str, s: dict[str, torch.Tensor]) -> torch.Tensor:
        if name == "decoder.weight":
            return torch.einsum("btv,bth->bvh", s["d_logits"], s["h_last"])
        if name == "decoder.bias":
            return s["d_logits"].sum(1)
        if name == "embedding.weight":
            d = s["d_embedding"]
            b, (v, e) = d.shape[0], self.shapes[name]
            rows = d.new_zeros(b * v, e)  # row i V + w of the flat (B V, E) = row w of sentence i's gradient
            keys = (torch.arange(b, device=d.device)[:, None] * v + s["tokens"]).flatten()
            return rows.index_add_(0, keys, d.reshape(-1, e)).view(b, v, e)
        kind, k = name.removeprefix("lstm.").rsplit("_l", 1)
        delta = s[f"d_gates{k}"]
        if kind == "weight_ih":
            return torch.einsum("btg,bti->bgi", delta, s[f"x{k}"])
        if kind == "weight_hh":
            h = s[f"h{k}"]
            previous = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)  # h_{t-1}, 0 at t = 0
            return torch.einsum("btg,bti->bgi", delta, previous)
        if kind in ("bias_ih", "bias_hh"):
            return delta.sum(1)
        raise ValueError(f"no per-sample gradient rule for parameter {name!r}")

    def flat(self, sentences: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P) per-sample gradients, the chosen tensors flattened and concatenated in ``names`` order.

        Args:
            out: optional (>= B, P) buffer to write into (reusing one buffer across chunks avoids allocating and
                first-touching B P floats per chunk, which dominates at P in the millions); the result is its first
                B rows.
        """
        device = self.model.decoder.weight.device
        batch = [t.to(device) for t in make_batch(sentences, self.eos_id)]
        s = self.signals(*batch)
        b = len(sentences)
        ref = s["d_logits"]
        if out is None:
            out = torch.empty((b, self.p), dtype=ref.dtype, device=ref.device)
        elif out.shape[0] < b or out.shape[1] != self.p or out.dtype != ref.dtype or out.device != ref.device:
            raise ValueError(f"out must be a (>= {b}, {self.p}) {ref.dtype} tensor on {ref.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        start = 0
        for n in self.names:
            size = 1
            for d in self.shapes[n]:
                size *= d
            self._grad_into(n, s, out[:b, start : start + size].view((b,) + self.shapes[n]))
            start += size
        return out[:b]

    def _grad_into(self, name: str, s: dict[str, torch.Tensor], view: torch.Tensor) -> None:
        """Write the per-sample gradient of ``name`` into ``view`` (B, *shape), a strided view of the flat buffer.

        Products go straight into the view (``torch.bmm(..., out=)``, per-sentence ``index_add_`` for the
        embedding) instead of into a new (B, *shape) tensor then copied: at P in the millions the fresh
        allocation's page faults and the copy cost more than the products (benchmarks/network_grads.py)."""
        if name == "decoder.weight":
            torch.bmm(s["d_logits"].transpose(1, 2), s["h_last"], out=view)
        elif name == "embedding.weight":
            view.zero_()
            d, tokens = s["d_embedding"], s["tokens"]
            for i in range(len(tokens)):  # rows w_t of sentence i get d l_i / d x_t, summed over repeats
                view[i].index_add_(0, tokens[i], d[i])
        elif name.startswith("lstm.weight_"):
            kind, k = name.removeprefix("lstm.").rsplit("_l", 1)
            a = s[f"x{k}"] if kind == "weight_ih" else None
            if a is None:
                h = s[f"h{k}"]
                a = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)  # h_{t-1}, 0 at t = 0
            torch.bmm(s[f"d_gates{k}"].transpose(1, 2), a, out=view)
        else:
            view.copy_(self._grad(name, s))

    def dot(self, sentences: list[torch.Tensor], queries: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores g_i^T q_j of every sentence against every query, layer by layer, without a (B, P) tensor.

        sum over tensors of <d l_i / d W, Q_j[W]>; the embedding's share is sum_t <d l_i / d x_t, Q_j[emb][w_t]>
        (one gathered row per token, never the dense (B, V, E) gradient).

        Args:
            sentences: B sentences.
            queries: {name: (Q, *shape)} for every name in ``names``, on the model's device and dtype.
        Returns:
            (B, Q) float tensor.
        Raises:
            ValueError: a name missing from ``queries`` or a shape that does not match.
        """
        missing = [n for n in self.names if n not in queries]
        bad = [n for n in self.names if n in queries and tuple(queries[n].shape[1:]) != self.shapes[n]]
        if missing or bad:
            raise ValueError(f"queries need every tensor of names with shape (Q, *shape): missing {missing}, "
                             f"wrong shape {bad}")
        device = self.model.decoder.weight.device
        s = self.signals(*[t.to(device) for t in make_batch(sentences, self.eos_id)])
        total = 0
        for n in self.names:
            q = queries[n]
            if n == "embedding.weight":
                total = total + torch.einsum("bte,btqe->bq", s["d_embedding"], q.transpose(0, 1)[s["tokens"]])
            else:
                g = self._grad(n, s)
                total = total + g.reshape(len(g), -1) @ q.reshape(len(q), -1).T
        return total

    def chunks(self, sentences: list[torch.Tensor], chunk_size: int = 32) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Stream (indices, (b, P) flat gradients) over length-bucketed chunks of ``sentences``; every index once.

        The gradients of the whole set are never held: each chunk is yielded and dropped (b P floats at a time).

        Raises:
            ValueError: chunk_size < 1.
        """
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        for idx in bucket_batches([len(s) for s in sentences], chunk_size):
            yield idx, self.flat([sentences[i] for i in idx])
