"""Parameter subsets and the subset loss, the function every derivative of ``ifutils`` is taken of.

Influence is computed on a subset S of the parameters with all others frozen at the trained
values: theta_S is a flat (p,) vector of chosen coordinates, scattered back into the full tensors
for every evaluation, so every derivative below is exact with respect to those coordinates.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from ._checks import (
    check_finite_parameters,
    check_names,
    check_token_id,
    check_token_ids,
)
from .cache import ChunkCache
from .data import bucket_batches, make_batch
from .model import LSTMLM, sentence_loss, token_nll
from .progress import progress

DECODER = ("decoder.weight", "decoder.bias")


@dataclass
class ParamSubset:
    """Coordinates of named parameter tensors; theta_S concatenates them in ``names`` order.

    Attributes:
        names: parameter names, e.g. ``["lstm.weight_hh_l0"]``.
        indices: for each name, a sorted (k,) int64 tensor of flat indices into that tensor.
    """

    names: list[str]
    indices: dict[str, torch.Tensor]

    @property
    def size(self) -> int:
        """p, the number of coordinates."""
        return sum(len(self.indices[n]) for n in self.names)

    def to_dict(self) -> dict:
        """JSON-able summary: names, p and coordinates per tensor (stored in results)."""
        return {"names": self.names, "p": self.size, "per_tensor": {n: len(self.indices[n]) for n in self.names}}


def select_subset(model: torch.nn.Module, names: list[str], num_coords: int | None = None, seed: int = 0) -> ParamSubset:
    """Pick whole tensors, or ``num_coords`` coordinates drawn uniformly without replacement
    (seeded) from the union of the named tensors.

    Raises:
        TypeError: ``names`` is a string (pass ``["decoder.weight"]``, a list) or holds non-strings.
        KeyError: a name is not a parameter of ``model`` (the message lists the valid names).
        ValueError: no names, ``num_coords < 1``, or more coordinates asked than the tensors hold.
    """
    names = check_names(names)
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise KeyError(f"no parameter named {unknown}; valid names: {', '.join(params)}")
    if not names:
        raise ValueError("the parameter subset is empty; name at least one tensor")
    sizes = [params[n].numel() for n in names]
    total = sum(sizes)
    if num_coords is None:
        chosen = torch.arange(total)
    elif not 1 <= num_coords <= total:
        raise ValueError(f"num_coords={num_coords} must be in [1, {total}] for tensors {names}")
    else:
        chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num_coords].sort().values
    offsets = torch.tensor([0] + sizes).cumsum(0)
    indices = {
        n: chosen[(chosen >= offsets[j]) & (chosen < offsets[j + 1])] - offsets[j] for j, n in enumerate(names)
    }
    return ParamSubset(list(names), indices)


def default_subset(model: LSTMLM, kind: str = "recurrent", num_coords: int = 512, seed: int = 0) -> ParamSubset:
    """The subsets used by the notebooks.

    ``"recurrent"``: ``num_coords`` random coordinates of the last layer's ``weight_hh``, where
    the Hessian differs from the Gauss-Newton matrix. ``"decoder"``: random coordinates of
    ``decoder.weight``; the loss is then a softmax regression on fixed features, convex, and its
    Hessian equals the true Fisher (Martens 2020, sec. 9.2), a sanity check. ``"lstm+decoder"``: an equal
    share (up to one) of ``num_coords`` from each of the last layer's ``weight_ih`` and ``weight_hh`` and
    ``decoder.weight``, so that block-diagonal and per-layer (KFAC) approximations differ from the full matrix.
    ``"input"``: random coordinates of the last layer's input-to-hidden ``weight_ih``. ``"embedding"``: random
    coordinates of the embedding rows of the ceil(num_coords / min(16, E)) most frequent words (vocabulary ids are
    sorted by training count), so that most sentences touch them.

    Raises:
        ValueError: unknown ``kind`` (the message lists the valid ones), or too few/many coordinates.
    """
    last = model.config.num_layers - 1
    if kind == "embedding":  # rows 0..R-1 are the R most frequent words (Vocabulary.from_counts), flat [0, R E)
        width = model.config.emb_dim
        rows = min(model.config.vocab_size, max(1, -(-num_coords // min(16, width))))
        if not 1 <= num_coords <= rows * width:
            raise ValueError(f"num_coords={num_coords} must be in [1, {rows * width}] for the embedding subset")
        chosen = torch.randperm(rows * width, generator=torch.Generator().manual_seed(seed))[:num_coords].sort().values
        return ParamSubset(["embedding.weight"], {"embedding.weight": chosen})
    names = {"recurrent": [f"lstm.weight_hh_l{last}"], "input": [f"lstm.weight_ih_l{last}"], "decoder": ["decoder.weight"],
             "lstm+decoder": [f"lstm.weight_ih_l{last}", f"lstm.weight_hh_l{last}", "decoder.weight"]}
    if kind not in names:
        raise ValueError(f"unknown subset kind {kind!r}; choose one of {', '.join(names)}, embedding")
    if len(names[kind]) == 1:
        return select_subset(model, names[kind], num_coords, seed)
    if num_coords < len(names[kind]):
        raise ValueError(f"num_coords={num_coords} must be at least {len(names[kind])} for subset {kind!r}")
    shares = [num_coords // len(names[kind]) + (j < num_coords % len(names[kind])) for j in range(len(names[kind]))]
    parts = [select_subset(model, [n], k, seed + j) for j, (n, k) in enumerate(zip(names[kind], shares))]
    return ParamSubset(names[kind], {n: part.indices[n] for n, part in zip(names[kind], parts)})


class SubsetLoss:
    """The per-sample loss as a function of theta_S, all other parameters frozen.

    The subset enters the network as sparse changes theta_S - theta0 added through ``index_add``
    (:func:`ifutils.model.add_delta`), so derivatives never form a full-size weight gradient.

    Args:
        model: trained :class:`LSTMLM`; a frozen copy in ``dtype`` is evaluated in eval mode (no
            dropout) with the unrolled LSTM.
        subset: the coordinates theta_S.
        eos_id: id used to start sentences and pad batches, an int in [0, vocab_size): ``vocab.stoi["<eos>"]``.
        dtype: float dtype of every computation (float64 for tests and exact checks).
        max_len: longest sample accepted, in tokens. The unrolled LSTM and the Hessian pass hold
            O(T * H * p) numbers per sample, so a runaway line (a file without line breaks) is refused
            rather than exhausting memory. PTB's longest sentence has 83 tokens, text8 windows 35.
    Attributes:
        theta0: (p,) the trained values of the subset coordinates.
        indices: name -> flat indices into that tensor, on the model's device.
    Raises:
        TypeError: ``eos_id`` is not an int (e.g. the word ``"<eos>"``: pass ``vocab.stoi["<eos>"]``).
        ValueError: ``eos_id`` outside [0, vocab_size).
        FloatingPointError: the model has NaN/Inf weights (named), which would make every gradient non-finite.
    """

    def __init__(
        self, model: LSTMLM, subset: ParamSubset, eos_id: int, dtype: torch.dtype = torch.float32, max_len: int = 400
    ):
        self.max_len = max_len
        vocab_size = model.config.vocab_size
        eos_id = check_token_id(eos_id, vocab_size, "eos_id")
        check_finite_parameters(dict(model.named_parameters()), "the model given to SubsetLoss")
        self.model = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        self.subset = subset
        self.eos_id = eos_id
        self.base = dict(self.model.named_parameters())
        self.device = next(self.model.parameters()).device
        self.indices = {n: i.to(self.device) for n, i in subset.indices.items()}
        self.theta0 = torch.cat([self.base[n].flatten()[self.indices[n]] for n in subset.names])
        split = [len(self.indices[n]) for n in subset.names]
        self._offsets = dict(zip(subset.names, torch.tensor([0] + split).cumsum(0).tolist()))

    def at(self, theta: torch.Tensor, dtype: torch.dtype | None = None) -> "SubsetLoss":
        """The same loss with its frozen model's subset coordinates set to ``theta`` (so ``theta0 = theta``), in
        ``dtype`` (default this loss's): every curvature and gradient built from it is evaluated at ``theta``,
        e.g. at the re-solved point theta*_S of :mod:`ifutils.resolve`."""
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for name in self.subset.names:
                dict(model.named_parameters())[name].copy_(self.dense(name, theta))
        return SubsetLoss(model, self.subset, self.eos_id, dtype or self.theta0.dtype, self.max_len)

    def _part(self, theta: torch.Tensor, name: str) -> torch.Tensor:
        start = self._offsets[name]
        return theta[start : start + len(self.indices[name])]

    def blocks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> (k,) positions of its coordinates in theta_S (for block-diagonal curvatures);
        tensors with no coordinate in the subset are left out."""
        return {n: torch.arange(len(self.indices[n])) + self._offsets[n] for n in self.subset.names if len(self.indices[n])}

    def deltas(self, theta: torch.Tensor) -> dict[str, tuple]:
        """Sparse changes (rows, cols, theta - theta0) per subset tensor; see :data:`ifutils.model.SparseDelta`."""
        out = {}
        for n in self.subset.names:
            idx, base = self.indices[n], self.base[n]
            rows, cols = (idx, None) if base.dim() == 1 else (idx // base.shape[1], idx % base.shape[1])
            out[n] = (rows, cols, self._part(theta, n) - self._part(self.theta0, n))
        return out

    def dense(self, name: str, theta: torch.Tensor) -> torch.Tensor:
        """The full parameter tensor ``name`` with its subset coordinates set to ``theta`` (no autodiff)."""
        base = self.base[name]
        if name not in self.indices:
            return base
        return base.flatten().index_put((self.indices[name],), self._part(theta, name).detach()).view_as(base)

    def cache(self, cache_dir: str | os.PathLike | None, description: dict, *parts, code=None) -> ChunkCache | None:
        """A :class:`~ifutils.cache.ChunkCache` keyed by ``description``, ``parts``, the subset, the frozen
        weights and ``code`` (the module computing the stage, e.g. ``"ifutils.grads"``, with the package modules it
        imports; see :func:`ifutils.cache.code_version`), or None when ``cache_dir`` is None."""
        if cache_dir is None:
            return None
        return ChunkCache(cache_dir, {**description, "subset": self.subset.to_dict(), "eos_id": self.eos_id}, self.base,
                          self.subset.indices, *parts, code=code)

    def logits(
        self, theta: torch.Tensor, inputs: torch.Tensor, return_hidden: bool = False, gate_shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(..., L, V) logits, or (..., L, H) last-layer states, for (..., L) ``inputs``; ``gate_shift`` as in
        :meth:`ifutils.model.LSTMLM.forward`."""
        return self.model(inputs, unrolled=True, return_hidden=return_hidden, deltas=self.deltas(theta),
                          gate_shift=gate_shift)

    def loss(self, theta: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample loss l(theta) (mean token NLL, nats) for (..., L) inputs; returns (...,)."""
        return sentence_loss(self.logits(theta, inputs), targets, mask)

    def token_losses(self, theta: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(..., L) NLL of every target token (nats), padding included (mask it out)."""
        return token_nll(self.logits(theta, inputs), targets)

    def batches(self, sentences: list[torch.Tensor], chunk_size: int, desc: str | None = None):
        """Yield (indices, inputs, targets, mask) for length-bucketed chunks of ``sentences``, on device.

        Raises:
            ValueError: no samples, or a sample is empty or longer than ``max_len`` (the message names it).
            TypeError: a sample is not an integer tensor; IndexError: a word id is negative or >= vocab_size
                (the message names the sample and the id).
        """
        if not len(sentences):
            raise ValueError("no samples were given; pass at least one sentence")
        check_token_ids(sentences, self.model.config.vocab_size)
        lengths = [len(s) for s in sentences]
        bad = [i for i, n in enumerate(lengths) if not 1 <= n <= self.max_len]
        if bad:
            raise ValueError(
                f"sample {bad[0]} has {lengths[bad[0]]} tokens ({len(bad)} samples outside 1..max_len={self.max_len}); "
                f"drop empty samples, split long ones, or raise SubsetLoss(max_len=...)"
            )
        chunks = bucket_batches(lengths, chunk_size)
        for idx in progress(chunks, desc=desc, unit="chunk", leave=False, disable=desc is None):
            batch = make_batch([sentences[i] for i in idx], self.eos_id)
            yield (idx, *(t.to(self.device) for t in batch))


def sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution, one per position: (..., L) int64."""
    probs = torch.softmax(logits.double(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat.cpu(), 1, generator=generator).to(logits.device)
    return draws.view(probs.shape[:-1])
