"""Word-level LSTM language model: embedding -> LSTM -> linear decoder (Zaremba et al. 2014).

The hidden state starts at zero for every sentence, so a sample's loss depends on that sample
alone, which per-sample influence needs. Two numerically equal LSTM paths share the same weights:
``nn.LSTM`` (fast fused kernel, used for training) and :func:`unrolled_lstm` (plain tensor ops,
supports ``torch.func.vmap`` and forward-mode AD, used for every influence computation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .config import param, validate_fields


@dataclass
class ModelConfig:
    """Architecture of :class:`LSTMLM`.

    Attributes:
        vocab_size: number of word types V (10,000 for PTB).
        emb_dim: embedding width E.
        hidden: LSTM width H.
        num_layers: stacked LSTM layers.
        dropout: dropout on embeddings and LSTM outputs during training (off in eval mode).
    """

    vocab_size: int
    emb_dim: int = param(256, "embedding width E")
    hidden: int = param(256, "LSTM width H")
    num_layers: int = param(1, "stacked LSTM layers")
    dropout: float = param(0.25, "dropout on embeddings and LSTM outputs during training (off in eval mode)")

    def __post_init__(self):
        validate_fields(self)

    def to_dict(self) -> dict:
        """The fields as a dict (stored in checkpoints)."""
        return asdict(self)


SparseDelta = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor]
"""(rows, cols, values): an additive change of a few coordinates of a weight, W[rows, cols] += values
(cols is None for a bias or other 1-D tensor). Adding it through ``index_add`` keeps derivatives with
respect to ``values`` cheap: no full-size weight gradient is ever formed."""


def add_delta(out: torch.Tensor, x: torch.Tensor | None, delta: SparseDelta | None) -> torch.Tensor:
    """``out + x @ D^T`` for the sparse change D of a linear layer's weight, or ``out + D`` for a bias
    (``x`` ignored). out: (..., F); x: (..., in); returns (..., F)."""
    if delta is None:
        return out
    rows, cols, values = delta
    src = values.expand(out.shape[:-1] + values.shape) if cols is None else values * x[..., cols]
    return out.index_add(-1, rows, src)


def unrolled_lstm(
    lstm: nn.LSTM,
    x: torch.Tensor,
    deltas: dict[str, SparseDelta] | None = None,
    gate_shift: torch.Tensor | None = None,
    layers: range | None = None,
) -> torch.Tensor:
    """Run ``lstm``'s weights step by step from a zero state (PyTorch's LSTM equations).

    i, f, g, o = split(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh); c_t = s(f) c_{t-1} + s(i) tanh(g);
    h_t = s(o) tanh(c_t), with s the logistic sigmoid (``torch.nn.LSTM`` documentation).

    Args:
        lstm: a unidirectional, ``batch_first`` ``nn.LSTM`` without projections.
        x: (..., L, E) float inputs; any leading batch dims (or none, under ``vmap``).
        deltas: optional sparse changes keyed ``weight_ih_l0``, ``bias_hh_l0``, ... (see :data:`SparseDelta`).
        gate_shift: optional (..., L, 4H) tensor added to the gate pre-activations of the last layer run.
            Held at zero, its gradient is dloss/ds_t, the pre-activation gradient that KFAC needs.
        layers: which layers to run, default all; ``range(k)`` gives the input of layer k.
    Returns:
        (..., L, H) hidden states of the last layer run, equal to ``lstm(x)[0]`` up to rounding.
    """
    deltas = deltas or {}
    layers = range(lstm.num_layers) if layers is None else layers
    out = x
    for layer in layers:
        name = lambda kind: f"{kind}_l{layer}"  # noqa: E731
        w_ih, w_hh = getattr(lstm, name("weight_ih")), getattr(lstm, name("weight_hh"))
        pre = out @ w_ih.T + getattr(lstm, name("bias_ih")) + getattr(lstm, name("bias_hh"))
        pre = add_delta(pre, out, deltas.get(name("weight_ih")))  # input part of all gates, all steps
        pre = add_delta(add_delta(pre, None, deltas.get(name("bias_ih"))), None, deltas.get(name("bias_hh")))
        if gate_shift is not None and layer == layers[-1]:
            pre = pre + gate_shift
        h = pre.new_zeros(pre.shape[:-2] + (lstm.hidden_size,))
        c = h
        states = []
        for t in range(pre.shape[-2]):
            gates = add_delta(pre[..., t, :] + h @ w_hh.T, h, deltas.get(name("weight_hh")))
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            states.append(h)
        out = torch.stack(states, dim=-2)
    return out


class LSTMLM(nn.Module):
    """Embedding -> ``num_layers`` LSTM -> dropout -> linear decoder to V logits.

    Parameter names (used to pick influence subsets): ``embedding.weight`` (V, E),
    ``lstm.weight_ih_l{k}`` (4H, E or H), ``lstm.weight_hh_l{k}`` (4H, H), ``lstm.bias_ih_l{k}``,
    ``lstm.bias_hh_l{k}`` (4H,), ``decoder.weight`` (V, H), ``decoder.bias`` (V,).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.emb_dim)
        self.lstm = nn.LSTM(config.emb_dim, config.hidden, config.num_layers, batch_first=True)
        self.drop = nn.Dropout(config.dropout)
        self.decoder = nn.Linear(config.hidden, config.vocab_size)

    def forward(
        self,
        inputs: torch.Tensor,
        *,
        unrolled: bool = False,
        return_hidden: bool = False,
        deltas: dict[str, SparseDelta] | None = None,
        gate_shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for next-word prediction.

        Args:
            inputs: (B, L) or, with ``unrolled=True``, (..., L) int64 word ids.
            unrolled: use :func:`unrolled_lstm` (vmap- and jvp-friendly) instead of ``nn.LSTM``.
            return_hidden: return the last LSTM layer's states instead of logits.
            deltas: sparse changes of parameters, keyed by parameter name (``embedding.weight``,
                ``lstm.weight_hh_l0``, ``decoder.weight``, ...); implies ``unrolled``.
            gate_shift: (..., L, 4H) added to the last LSTM layer's gate pre-activations; implies ``unrolled``.
        Returns:
            (..., L, V) float logits, or (..., L, H) hidden states with ``return_hidden``.
        """
        deltas = deltas or {}
        if unrolled or deltas or gate_shift is not None:
            h = self.states(inputs, deltas, gate_shift)[1]
        else:
            h = self.lstm(self.drop(self.embedding(inputs)))[0]
        h = self.drop(h)
        if return_hidden:
            return h
        logits = add_delta(self.decoder(h), h, deltas.get("decoder.weight"))
        return add_delta(logits, None, deltas.get("decoder.bias"))

    def states(
        self, inputs: torch.Tensor, deltas: dict[str, SparseDelta] | None = None, gate_shift: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and hidden states of the last LSTM layer, through :func:`unrolled_lstm`.

        Args:
            inputs: (..., L) int64 word ids.
            deltas: sparse parameter changes as in :meth:`forward`.
            gate_shift: (..., L, 4H) added to the last layer's gate pre-activations (see :func:`unrolled_lstm`).
        Returns:
            (a, h): a (..., L, E or H) the last layer's inputs x_t, h (..., L, H) its states h_t.
        """
        deltas = deltas or {}
        x = self.embedding(inputs)
        if "embedding.weight" in deltas:  # row r_a, column c_a changes where inputs == r_a
            rows, cols, values = deltas["embedding.weight"]
            x = x.index_add(-1, cols, values * (inputs[..., None] == rows).to(values.dtype))
        x = self.drop(x)
        lstm_deltas = {k.removeprefix("lstm."): v for k, v in deltas.items() if k.startswith("lstm.")}
        last = self.config.num_layers - 1
        if last:
            x = unrolled_lstm(self.lstm, x, lstm_deltas, layers=range(last))
        return x, unrolled_lstm(self.lstm, x, lstm_deltas, gate_shift, layers=range(last, last + 1))


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., L) negative log-likelihood in nats of each target under softmax(logits)."""
    return -torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sentence_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample loss: mean token NLL over the real tokens of each sentence.

    l_i = (1 / T_i) sum_{t: mask[i, t]} -log p(y_it | y_i,<t), in nats per token.

    Args:
        logits: (..., L, V); targets: (..., L) int64; mask: (..., L) bool, True at real tokens.
    Returns:
        (...,) float. Padded positions never enter: they are zeroed before the sum, so their
        logits and targets can hold anything finite.
    """
    nll = torch.where(mask, token_nll(logits, targets), 0.0)
    return nll.sum(-1) / mask.sum(-1)
