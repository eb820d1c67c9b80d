"""Whole-network Kronecker-factored (KFAC, EK-FAC) and diagonal (true Fisher, empirical Fisher) curvatures of the
LSTM LM: embedding, every LSTM layer (``weight_ih``, ``weight_hh``, both biases) and the decoder, on the scale of the
Hessian of L = (1/n) sum_i l_i, l_i the mean token NLL of sentence i (nats/token; :mod:`ifutils.curvature.base`).

Flat vectors use :class:`~ifutils.network.NetworkGrads`' layout: every tensor in ``named_parameters`` order,
flattened row-major, P coordinates in all.

**Factors.** A tensor W (r x c) with per-token gradient delta_t a_t^T (:mod:`ifutils.network`), time steps treated
as independent (Martens, Ba, Johnson 2018, sec. 3.1, "independent time steps"), gets the block G (x) A (row-major
vec: F[(i, j), (i', j')] ~ G[i, i'] A[j, j']; Martens & Grosse 2015, eq. 1-2, write A (x) G for column-major) with

    A = sum_t w_t a_t a_t^T,    G = sum_t w_t E_y[delta_t delta_t^T],    w_t = 1 / (n T_i),

delta_t the gradient of the sentence SUM of token NLLs (T_i times the mean-loss delta of ``NetworkGrads.signals``).
Then sum_t w_t = 1, and for sentences of one token G (x) A is the exact GGN (true Fisher) or empirical-Fisher block
(1/n) sum_i T_i g_i g_i^T of a linear layer. Biases are blocks of their own with a_t = 1 (A = [sum_t w_t] = [1]).
One G is shared by all tensors fed by the same delta:

* decoder (V x H): A = ``A.decoder`` (H, H) over h_t; G = ``G.decoder`` (V, V). With ``labels="model"`` G is the
  closed form sum_t w_t (diag(p_t) - p_t p_t^T), accumulated per chunk as diag(sum_t w_t p_t) - P^T diag(w) P
  (P the chunk's (tokens, V) probabilities): O(tokens V^2) flops, one V x V float64 matrix (800 MB at V = 10,000).
  It is inverted through one ``torch.linalg.eigh`` (O(V^3), ~1e12 flops at V = 10,000, minutes on CPU), whose
  eigenvectors Q_G are held as another V x V float64 matrix (800 MB); solves then cost O(V^2 H) per vector.
  With ``labels="data"`` G = sum_t w_t delta_t delta_t^T with the real labels (same memory and cost).
* LSTM layer k: ``A.lstm{k}.ih`` (in, in) over x_t, ``A.lstm{k}.hh`` (H, H) over h_{t-1}, ``G.lstm{k}`` (4H, 4H)
  over the gate pre-activation gradients, back-propagated from labels drawn from the model (``mc_samples`` draws,
  ``labels="model"``, true Fisher) or from the data labels (``labels="data"``, empirical Fisher).
* embedding (V x E stored; its gradient is onehot(w_t) d_x_t^T, the transpose of a linear layer's): the input factor
  over the V rows is DIAGONAL, ``A.embedding`` (V,) = sum_t w_t onehot(w_t) (token counts weighted by w_t), and
  ``G.embedding`` (E, E) is over d l / d x_t. Its block is diag(A) (x) G.

**KFAC** solves (C + lambda I)^-1 block by block in the factors' eigenbases Q_row (x) Q_col (the identity basis for a
diagonal factor) with eigenvalues outer(e_row, e_col). **EK-FAC** (George, Laurent, Bouthillier, Ballas, Vincent 2018,
eq. 8-10) keeps the bases and re-fits the eigenvalues to the per-sentence gradients (second pass):
Lambda*[k, l] = (1/n) sum_i (1/T_i) E_y[(Q_row^T S_i Q_col)[k, l]^2] = (1/n) sum_i T_i E_y[(Q_row^T g_i Q_col)^2],
S_i = T_i g_i the gradient of sentence i's summed NLL, the same scale as the EF (1/n) sum_i T_i g_i g_i^T
(:func:`ifutils.curvature.fisher.empirical_fisher`). For the decoder with ``labels="model"`` the expectation is exact,
the cross-token terms vanishing (E[delta_t] = 0, labels independent given the real prefixes):
Lambda*[k, l] = sum_t w_t (q_k^T (diag p_t - p_t p_t^T) q_k) (q'_l^T h_t)^2, O(tokens V^2) flops.

**Diagonal Fishers** (:func:`diagonal_fisher`): diag of (1/n) sum_i T_i g_i g_i^T with sampled labels (mean over
``mc_samples`` draws, true Fisher) or data labels (EF), from per-sample gradients streamed chunk by chunk.

**Damping** is per parameter tensor: a float for all, a {name: float} dict (:meth:`KroneckerNetworkCurvature.damping`),
or relative, alpha x the block's mean eigenvalue (:meth:`KroneckerNetworkCurvature.relative_damping`; kronfluence's
default alpha = 0.1 per module).

Label draw d of chunk j is seeded by ``derive_seed(seed, d, j)`` (:func:`sampled_targets`), the same in both passes and
whether or not earlier chunks came from the cache.

**Several processes** (``distributed``, :mod:`ifutils.distributed`): every factor, EK-FAC eigenvalue and diagonal is
a sum over chunks on the scale of the whole fit (weights 1/(n T_i) with the global n), so rank r sums the chunks
``shard(chunks, r, world)`` with the same seeds j, and the all-reduced sums are the single process's up to the order
of the additions. The EK-FAC pass uses the bases of the all-reduced factors, the same bits on every rank.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field

import torch

from .. import distributed as dist_utils
from .._checks import check_damping
from ..cache import ChunkCache, derive_seed
from ..data import bucket_batches, make_batch
from ..model import LSTMLM
from ..network import NetworkGrads
from ..progress import progress
from ..subset import sample_labels
from .base import Curvature, Damping, DiagonalCurvature, _describe

LABELS = ("model", "data")
_BUDGET = 1 << 24  # elements of one dense per-sentence gradient sub-batch (decoder, embedding), 128 MB in float64


def factor_keys(name: str) -> tuple[str, str]:
    """(row factor key, column factor key) of a parameter tensor (module docstring); a bias is (rows, 1).

    Raises:
        ValueError: a parameter the LSTM LM does not have.
    """
    if name == "embedding.weight":
        return "A.embedding", "G.embedding"
    if name.startswith("decoder."):
        return "G.decoder", "A.decoder" if name == "decoder.weight" else "A.bias"
    if name.startswith("lstm."):
        kind, k = name.removeprefix("lstm.").rsplit("_l", 1)
        cols = {"weight_ih": f"A.lstm{k}.ih", "weight_hh": f"A.lstm{k}.hh", "bias_ih": "A.bias", "bias_hh": "A.bias"}
        if kind in cols:
            return f"G.lstm{k}", cols[kind]
    raise ValueError(f"no Kronecker factors for parameter {name!r}")


def sampled_targets(logits: torch.Tensor, seed: int, draw: int, chunk: int) -> torch.Tensor:
    """(B, L) int64 labels drawn from softmax(logits) (B, L, V), seeded by ``derive_seed(seed, draw, chunk)``."""
    return sample_labels(logits, torch.Generator().manual_seed(derive_seed(seed, draw, chunk)))


@dataclass
class NetworkFactors:
    """Fitted factors of the whole network (module docstring for the formulas).

    Attributes:
        names: parameter names in ``named_parameters`` order; shapes: {name: shape}.
        factors: {key: float64 tensor}: 2-D (d, d) factors, and 1-D (d,) diagonal ones (``A.embedding``, ``A.bias``).
        labels: ``"model"`` or ``"data"``; mc_samples: label draws; n: sentences fitted; tokens: their tokens.
        eigenvalues: {name: (rows, cols) float64} EK-FAC eigenvalues (a bias has cols = 1), or None (KFAC only).
    """

    names: list[str]
    shapes: dict[str, tuple]
    factors: dict[str, torch.Tensor]
    labels: str
    mc_samples: int
    n: int
    tokens: int
    eigenvalues: dict[str, torch.Tensor] | None = None
    _bases: dict | None = field(default=None, repr=False)

    def eigenbases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """{key: (eigenvalues (d,), eigenvectors (d, d) or None for a diagonal factor)}, float64, computed once
        (``torch.linalg.eigh``; the V x V decoder factor costs O(V^3))."""
        if self._bases is None:
            self._bases = {}
            for key, f in self.factors.items():
                if f.dim() == 1:
                    self._bases[key] = (f, None)
                else:
                    evals, evecs = torch.linalg.eigh(f)
                    self._bases[key] = (evals, evecs.contiguous())
        return self._bases

    @property
    def nbytes(self) -> int:
        """Bytes of the factors and EK-FAC eigenvalues held."""
        held = list(self.factors.values()) + list((self.eigenvalues or {}).values())
        return sum(t.numel() * t.element_size() for t in held)


def _rows_cols(shape: tuple) -> tuple[int, int]:
    return (shape[0], shape[1]) if len(shape) == 2 else (shape[0], 1)


class KroneckerNetworkCurvature(Curvature):
    """Block-diagonal curvature over the parameter tensors, block W = Q diag(Lambda_W) Q^T with Q = Q_row (x) Q_col.

    Args:
        factors: the fit (for the bases); eigenvalues: {name: (rows, cols) float64 >= 0}; name: key.
    Attributes:
        names, shapes, offsets: the flat layout (``offsets[name]`` = first coordinate); p: P; psd: True.
    """

    psd = True

    def __init__(self, factors: NetworkFactors, eigenvalues: dict[str, torch.Tensor], name: str):
        self.name, self.names, self.shapes = name, list(factors.names), dict(factors.shapes)
        bases = factors.eigenbases()
        self.bases = {n: (bases[r][1], bases[c][1]) for n in self.names for r, c in [factor_keys(n)]}
        self.eigenvalues = {n: eigenvalues[n].double() for n in self.names}
        self.offsets, start = {}, 0
        for n in self.names:
            self.offsets[n] = start
            start += math.prod(self.shapes[n])
        self.p = start

    @property
    def nbytes(self) -> int:
        held = {id(t): t for pair in self.bases.values() for t in pair if t is not None}
        return sum(t.numel() * t.element_size() for t in list(held.values()) + list(self.eigenvalues.values()))

    def eigvalsh(self) -> torch.Tensor:
        """(P,) float64, ascending: the union of the blocks' eigenvalues."""
        return torch.cat([e.flatten() for e in self.eigenvalues.values()]).sort().values

    def mean_eigenvalue(self) -> float:
        return float(sum(e.sum() for e in self.eigenvalues.values()) / self.p)

    def layer_means(self) -> dict[str, float]:
        """{name: mean eigenvalue of the tensor's block} (trace / size)."""
        return {n: float(e.mean()) for n, e in self.eigenvalues.items()}

    def damping(self, values: float | dict[str, float]) -> torch.Tensor:
        """(P,) float64 per-coordinate damping from one absolute value per tensor ({name: float}, every name) or a
        float for all.

        Raises:
            ValueError: missing or unknown names, or a negative value.
        """
        if not isinstance(values, dict):
            values = {n: check_damping(values) for n in self.names}
        missing, unknown = set(self.names) - set(values), set(values) - set(self.names)
        if missing or unknown:
            raise ValueError(f"damping needs one value per tensor: missing {sorted(missing)}, unknown {sorted(unknown)}")
        device = next(iter(self.eigenvalues.values())).device
        out = torch.empty(self.p, dtype=torch.float64, device=device)
        for n in self.names:
            out[self.offsets[n] : self.offsets[n] + math.prod(self.shapes[n])] = check_damping(values[n], f"damping[{n!r}]")
        return out

    def relative_damping(self, alpha: float) -> torch.Tensor:
        """(P,) float64: alpha x the block's mean eigenvalue on each tensor's coordinates (per-layer damping,
        kronfluence's default alpha = 0.1).

        Raises:
            ValueError: ``alpha < 0``, or a block with mean eigenvalue <= 0 (e.g. a tensor no fitted token reaches);
                pass absolute values through :meth:`damping` instead.
        """
        if not alpha >= 0:
            raise ValueError(f"relative damping alpha must be >= 0, got {alpha}")
        means = self.layer_means()
        bad = [n for n, m in means.items() if not m > 0]
        if bad:
            raise ValueError(f"{self.name}: blocks {bad} have mean eigenvalue <= 0; use absolute damping "
                             f"(curvature.damping({{name: value}}))")
        return self.damping({n: alpha * m for n, m in means.items()})

    def _block_damping(self, damping: Damping) -> dict[str, float]:
        if not torch.is_tensor(damping):
            return {n: damping for n in self.names}
        out = {}
        for n in self.names:
            d = damping[self.offsets[n] : self.offsets[n] + math.prod(self.shapes[n])]
            if not torch.all(d == d[0]):
                raise ValueError(f"{self.name}: a damping tensor must be constant within each parameter tensor (it "
                                 f"varies within {n!r}); build it with curvature.damping or relative_damping")
            out[n] = float(d[0])
        return out

    def solve(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        """(C + diag(damping))^-1 v, v (P,) or (P, m); damping a float or a (P,) tensor constant per tensor.

        Raises:
            TypeError, ValueError: as :meth:`Curvature.solve`; also a damping tensor not constant per tensor.
        """
        device = next(iter(self.eigenvalues.values())).device
        v, damping = self._check(v, damping, device)
        per_block = self._block_damping(damping)
        cols = v.reshape(self.p, -1)
        out = torch.empty_like(cols)
        for n in self.names:
            r, c = _rows_cols(self.shapes[n])
            sl = slice(self.offsets[n], self.offsets[n] + r * c)
            shifted = self.eigenvalues[n] + per_block[n]
            if not shifted.min() > shifted.abs().max() * shifted.numel() * torch.finfo(torch.float64).eps:
                raise ValueError(f"{self.name} + {_describe(damping)} I is singular on {n!r} (smallest eigenvalue + "
                                 f"damping {shifted.min().item():.3g}); use a positive damping")
            x = self._rotate(cols[sl].reshape(r, c, -1), n, forward=True) / shifted[..., None]
            out[sl] = self._rotate(x, n, forward=False).reshape(r * c, -1)
        return out.reshape(v.shape)

    def to_eigenbasis(self, v: torch.Tensor) -> torch.Tensor:
        """(P,) or (P, m) -> the same in the eigenbasis, block W: vec(Q_row^T V_W Q_col), float64.

        With :meth:`eigenvalue_vector` e, (C + lambda I)^{-1} = Q diag(1 / (e + lambda)) Q^T, so for vectors a, b
        a^T (C + lambda I)^{-1} b = sum_k (Q^T a)_k (Q^T b)_k / (e_k + lambda) for every lambda from one rotation.

        Raises:
            ValueError: v not (P,) or (P, m).
        """
        if v.dim() not in (1, 2) or v.shape[0] != self.p:
            raise ValueError(f"v must be ({self.p},) or ({self.p}, m), got {tuple(v.shape)}")
        device = next(iter(self.eigenvalues.values())).device
        cols = v.to(device=device, dtype=torch.float64).reshape(self.p, -1)
        out = torch.empty_like(cols)
        for n in self.names:
            r, c = _rows_cols(self.shapes[n])
            sl = slice(self.offsets[n], self.offsets[n] + r * c)
            out[sl] = self._rotate(cols[sl].reshape(r, c, -1), n, forward=True).reshape(r * c, -1)
        return out.reshape(v.shape)

    def eigenvalue_vector(self) -> torch.Tensor:
        """(P,) float64 eigenvalues in the layout of :meth:`to_eigenbasis`."""
        return torch.cat([self.eigenvalues[n].reshape(-1) for n in self.names])

    def _rotate(self, x: torch.Tensor, name: str, forward: bool) -> torch.Tensor:
        """Q_row^T x Q_col (forward) or Q_row x Q_col^T, for x (r, c, m)."""
        q_row, q_col = self.bases[name]
        if q_row is not None:
            x = torch.einsum("rk,rcm->kcm" if forward else "kr,rcm->kcm", q_row, x)
        if q_col is not None:
            x = torch.einsum("rcm,cl->rlm" if forward else "rcm,lc->rlm", x, q_col)
        return x

    def dense_block(self, name: str) -> torch.Tensor:
        """(r c, r c) float64 block of tensor ``name`` (for tests and small models only)."""
        r, c = _rows_cols(self.shapes[name])
        q_row, q_col = self.bases[name]
        q_row = torch.eye(r, dtype=torch.float64) if q_row is None else q_row
        q_col = torch.eye(c, dtype=torch.float64) if q_col is None else q_col
        q = torch.kron(q_row, q_col)
        return (q * self.eigenvalues[name].flatten()) @ q.T


def kfac_network_curvature(factors: NetworkFactors, name: str | None = None) -> KroneckerNetworkCurvature:
    """KFAC of the whole network: block W = F_row (x) F_col, eigenvalues outer(e_row, e_col).

    ``name`` defaults to ``"kfac"`` (model labels) or ``"kfac_ef"`` (data labels).
    """
    bases = factors.eigenbases()
    eig = {}
    for n in factors.names:
        r, c = factor_keys(n)
        eig[n] = torch.outer(bases[r][0], bases[c][0]).clamp_min(0.0)  # PSD factors: negative values are rounding
    return KroneckerNetworkCurvature(factors, eig, name or ("kfac" if factors.labels == "model" else "kfac_ef"))


def ekfac_network_curvature(factors: NetworkFactors, name: str | None = None) -> KroneckerNetworkCurvature:
    """EK-FAC of the whole network: the KFAC bases with the re-fitted eigenvalues (module docstring).

    ``name`` defaults to ``"ekfac"`` (model labels) or ``"ekfac_ef"`` (data labels).

    Raises:
        ValueError: the eigenvalues were not fitted (``fit_network_kfac(..., ekfac=True)``).
    """
    if factors.eigenvalues is None:
        raise ValueError("EK-FAC eigenvalues are missing; fit with fit_network_kfac(..., ekfac=True)")
    # means of squares, or the decoder's closed form whose null direction (1) rounds to +-1e-20: clip rounding at 0
    eig = {n: e.clamp_min(0.0) for n, e in factors.eigenvalues.items()}
    return KroneckerNetworkCurvature(factors, eig, name or ("ekfac" if factors.labels == "model" else "ekfac_ef"))


# ----------------------------------------------------------------------------------------------------- fitting


def _check_args(model, sentences, labels, mc_samples, n_fit, chunk_size) -> None:
    if not isinstance(model, LSTMLM):
        raise TypeError(f"model must be an ifutils.model.LSTMLM, got {type(model).__name__}")
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS} ('model': true Fisher, 'data': empirical Fisher), "
                         f"got {labels!r}")
    if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
        raise ValueError(f"mc_samples must be an int >= 1, got {mc_samples!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if not isinstance(sentences, (list, tuple)) or not sentences:
        raise ValueError("sentences must be a non-empty list of 1-D int64 tensors ending in <eos>")
    if n_fit is not None and (not isinstance(n_fit, int) or isinstance(n_fit, bool) or not 1 <= n_fit <= len(sentences)):
        raise ValueError(f"n_fit must be None (all) or an int in [1, {len(sentences)}], got {n_fit!r}")


def _fit_sentences(sentences: list[torch.Tensor], n_fit: int | None, seed: int) -> list[torch.Tensor]:
    """All sentences, or ``n_fit`` of them drawn without replacement (seeded), in their original order."""
    if n_fit is None or n_fit == len(sentences):
        return list(sentences)
    chosen = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))[:n_fit].sort().values
    return [sentences[i] for i in chosen.tolist()]


def _prepare(model: LSTMLM, device) -> LSTMLM:
    here = model.decoder.weight.device
    return model if device is None or torch.device(device) == here else copy.deepcopy(model).to(device)


def _chunk(net: NetworkGrads, sentences, idx, n: int):
    """(inputs, targets, mask, token weights w (B, L) = 1/(n T_i) at real tokens, T (B,)) on the model's device."""
    device = net.model.decoder.weight.device
    inputs, targets, mask = [t.to(device) for t in make_batch([sentences[i] for i in idx], net.eos_id)]
    lengths = mask.sum(-1).double()
    return inputs, targets, mask, mask.double() / (n * lengths[:, None]), lengths


def _draws(net: NetworkGrads, inputs, targets, mask, labels: str, mc_samples: int, seed: int, j: int):
    """Yield (draw index, signals) for the chunk: the data labels once, or ``mc_samples`` sampled label sets.
    The decoder's probabilities (B, L, V) are added as ``probs`` (model labels)."""
    if labels == "data":
        yield 0, net.signals(inputs, targets, mask)
        return
    with torch.no_grad():
        logits = net.model(inputs)
    probs = torch.softmax(logits.double(), -1)
    for d in range(mc_samples):
        s = net.signals(inputs, sampled_targets(logits, seed, d, j), mask)
        s["probs"] = probs
        yield d, s


def _layers(net: NetworkGrads) -> int:
    return net.model.lstm.num_layers


def _factor_chunk(net, s, d, labels, draws, w, lengths, add) -> None:
    """Add one draw's contribution of a chunk to the factor sums (module docstring)."""
    n_weight = w * lengths[:, None] ** 2  # w_t T_i^2: the sentence-sum delta is T_i x the signals' delta
    if d == 0:  # the A factors do not depend on the labels
        add("A.embedding", torch.zeros(net.shapes["embedding.weight"][0], dtype=torch.float64, device=w.device)
            .index_add_(0, s["tokens"].flatten(), w.flatten()))
        add("A.bias", w.sum().reshape(1))
        for k in range(_layers(net)):
            x, h = s[f"x{k}"].double(), s[f"h{k}"].double()
            previous = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
            add(f"A.lstm{k}.ih", torch.einsum("btc,btd,bt->cd", x, x, w))
            add(f"A.lstm{k}.hh", torch.einsum("btc,btd,bt->cd", previous, previous, w))
        h = s["h_last"].double()
        add("A.decoder", torch.einsum("btc,btd,bt->cd", h, h, w))
        if labels == "model":
            keep = w > 0
            p, wt = s["probs"][keep], w[keep]
            add("G.decoder", torch.diag(wt @ p) - (p * wt[:, None]).T @ p)
    def gram(delta):
        return torch.einsum("btr,bts,bt->rs", delta.double(), delta.double(), n_weight) / draws

    add("G.embedding", gram(s["d_embedding"]))
    for k in range(_layers(net)):
        add(f"G.lstm{k}", gram(s[f"d_gates{k}"]))
    if labels == "data":
        add("G.decoder", gram(s["d_logits"]))


def _sub_batches(b: int, size: int):
    step = max(1, _BUDGET // max(size, 1))
    return [slice(i, min(i + step, b)) for i in range(0, b, step)]


def _slice(s: dict, sl: slice) -> dict:
    return {k: v[sl] for k, v in s.items()}


def _embedding_rows(s: dict, basis: torch.Tensor | None):
    """Per-sentence embedding gradient rows, sparse: (sentence (U,), row (U,), values (U, E)) with values the sum of
    d l_i / d x_t over sentence i's tokens t with input w_t = row (rotated by ``basis`` (E, E) when given)."""
    tokens, d = s["tokens"], s["d_embedding"].double()
    if basis is not None:
        d = d @ basis
    vocab = int(tokens.max()) + 1
    keys = torch.arange(len(tokens), device=tokens.device)[:, None] * vocab + tokens
    unique, inverse = keys.flatten().unique(return_inverse=True)
    values = d.new_zeros(len(unique), d.shape[-1]).index_add_(0, inverse, d.reshape(-1, d.shape[-1]))
    return unique // vocab, unique % vocab, values


def _ekfac_chunk(net, s, d, labels, draws, w, lengths, bases, n: int, add) -> None:
    """Add one draw's contribution of a chunk to the EK-FAC eigenvalue sums (1/n) sum_i T_i (Q_r^T g_i Q_c)^2."""
    weight = lengths / n  # T_i / n on the squared mean-loss gradient g_i
    for name in net.names:
        r_key, c_key = factor_keys(name)
        q_row, q_col = bases[r_key][1], bases[c_key][1]
        rows, cols = _rows_cols(net.shapes[name])
        if name == "embedding.weight":
            b, row, values = _embedding_rows(s, q_col)
            add(name, torch.zeros(rows, cols, dtype=torch.float64, device=w.device)
                .index_add_(0, row, values**2 * weight[b, None] / draws))
            continue
        if name.startswith("decoder.") and labels == "model":
            if d == 0:  # exact expectation over the labels
                keep = w > 0
                p, wt = s["probs"][keep], w[keep]
                dg = p @ q_row**2 - (p @ q_row) ** 2  # q_k^T (diag p - p p^T) q_k, (tokens, V)
                if name == "decoder.bias":
                    add(name, (wt @ dg)[:, None])
                else:
                    hq = s["h_last"][keep].double() @ q_col
                    add(name, torch.einsum("tv,th,t->vh", dg, hq**2, wt))
            continue
        for sl in _sub_batches(len(lengths), rows * cols):
            g = net._grad(name, _slice(s, sl)).double().reshape(-1, rows, cols)  # the per-sample rule of NetworkGrads
            if q_row is not None:
                g = torch.einsum("rk,brc->bkc", q_row, g)
            if q_col is not None:
                g = g @ q_col
            add(name, torch.einsum("brc,b->rc", g**2, weight[sl]) / draws)


def _diag_chunk(net, s, draws, lengths, n: int, add) -> None:
    """Add one draw's contribution of a chunk to (1/n) sum_i T_i g_i^2, per tensor."""
    weight = lengths / n
    for name in net.names:
        shape = net.shapes[name]
        if name == "embedding.weight":
            b, row, values = _embedding_rows(s, None)
            add(name, torch.zeros(shape, dtype=torch.float64, device=lengths.device)
                .index_add_(0, row, values**2 * weight[b, None] / draws))
            continue
        for sl in _sub_batches(len(lengths), math.prod(shape)):
            g = net._grad(name, _slice(s, sl)).double()
            add(name, torch.einsum("b...,b->...", g**2, weight[sl]) / draws)


_world = dist_utils.process_world  # (rank, world) the fit shards over


def _all_have(found: bool, world: int) -> bool:
    """True when every rank found the stage in its cache (a rank that sees no file makes all recompute)."""
    if world == 1:
        return found
    return bool(dist_utils.all_reduce_sum([torch.tensor([float(found)])])[0].item() == world)


def _stream(net, fit, stage: str, cache, chunk_size: int, save_every: float, step,
            world: tuple[int, int] = (0, 1)) -> dict[str, torch.Tensor]:
    """Run ``step(j, idx, add)`` over the length-bucketed chunks of ``fit``; partial sums are stored under
    ``<stage>.partial`` at most every ``save_every`` seconds so that a killed run resumes at the next chunk.

    With ``world = (rank, size)``, size > 1, this rank runs the chunks ``shard(chunks, rank, size)`` (strided),
    keeps its partial sums under ``<stage>.partial.rank<r>of<size>`` (resumed by a run with the same number of
    ranks), and the ranks' sums are added (:func:`ifutils.distributed.all_reduce_sum`); rank 0 alone stores the
    final sums under ``<stage>``, which any later run reads whatever its number of ranks."""
    rank, size = world
    done = cache.get(stage) if cache is not None else None
    if cache is not None and _all_have(done is not None, size):
        return done
    batches = bucket_batches([len(t) for t in fit], chunk_size)
    mine = dist_utils.shard(range(len(batches)), rank, size)
    partial_key = f"{stage}.partial" if size == 1 else f"{stage}.partial.rank{rank}of{size}"
    device = net.model.decoder.weight.device
    sums: dict[str, torch.Tensor] = {}
    start = 0  # position in ``mine`` (= the chunk index in a single process)
    if cache is not None and (partial := cache.get(partial_key)) is not None:
        start = int(partial.pop("next_chunk"))
        sums = {k: v.to(device) for k, v in partial.items()}

    def add(key, value):
        sums[key] = sums[key] + value if key in sums else value

    last_save = time.monotonic()
    desc = f"network {stage}" + (f" (rank {rank} of {size})" if size > 1 else "")
    with progress(total=len(mine), initial=start, desc=desc, unit="chunk", disable=rank != 0) as bar:
        for pos in range(start, len(mine)):
            with torch.no_grad():
                step(mine[pos], batches[mine[pos]], add)
            bar.update(1)
            if cache is not None and pos + 1 < len(mine) and time.monotonic() - last_save >= save_every:
                cache.put(partial_key, {**{k: v.cpu() for k, v in sums.items()}, "next_chunk": pos + 1})
                last_save = time.monotonic()
    if size > 1:
        sums = dist_utils.all_reduce_sum(sums)
    sums = {k: v.cpu() for k, v in sums.items()}
    if cache is not None and rank == 0:
        cache.put(stage, sums)
    return sums


def _cache(cache_dir, description: dict, model: LSTMLM, fit) -> ChunkCache | None:
    if cache_dir is None:
        return None
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return ChunkCache(cache_dir, description, state, fit, code=__name__)


def fit_network_kfac(
    model: LSTMLM,
    sentences: list[torch.Tensor],
    eos_id: int,
    labels: str = "model",
    mc_samples: int = 1,
    n_fit: int | None = None,
    chunk_size: int = 16,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    ekfac: bool = True,
    save_every: float = 60.0,
    distributed: bool | None = None,
    cache_bases: bool = False,
) -> NetworkFactors:
    """Fit the whole-network KFAC factors (one pass) and, with ``ekfac``, the EK-FAC eigenvalues (a second pass).

    Args:
        model: the trained :class:`~ifutils.model.LSTMLM` in eval mode (read, never changed; copied to ``device``).
        sentences: training sentences (1-D int64, ending in ``<eos>``).
        eos_id: id of ``<eos>``.
        labels: ``"model"`` (true Fisher: decoder closed form, ``mc_samples`` label draws for the other layers) or
            ``"data"`` (empirical Fisher).
        mc_samples: label draws per position (``labels="model"``).
        n_fit: fit on this many sentences, drawn without replacement with ``seed`` (default: all).
        chunk_size: sentences per length-bucketed chunk.
        seed: seeds the ``n_fit`` draw and the labels (:func:`sampled_targets`).
        cache_dir: if given, each pass's sums are stored (partial sums every ``save_every`` seconds, the final sums
            at the end) under a :class:`~ifutils.cache.ChunkCache` key covering the configuration, the weights, the
            fitted sentences and this module's code; a rerun after a kill resumes at the next chunk with the same sums.
        device: where to compute (default the model's); results are on CPU.
        ekfac: also fit the EK-FAC eigenvalues.
        save_every: seconds between partial saves (0: after every chunk).
        cache_bases: with ``cache_dir`` and ``ekfac=False``, also compute and cache the factors' eigenbases (with
            ``ekfac`` they are always cached: a rerun reads them instead of repeating the V x V ``eigh``).
        distributed: shard the chunks over the ranks of a :mod:`torch.distributed` process group
            (:mod:`ifutils.distributed`, launched by torchrun): each rank sums its strided slice of the chunks, the
            sums are all-reduced, so every rank returns the same factors, equal to a single process's up to the
            summation order's rounding. None (default): shard when a group is initialised; False: every rank
            computes all chunks alone (call it then on any subset of ranks); True: require a group. Every rank of
            the group must call with the same arguments. With ``cache_dir`` each rank keeps its own partial sums
            (``<pass>.partial.rank<r>of<world>``, resumed by a run with as many ranks) and rank 0 stores the
            final sums, which a rerun with any number of ranks (or one process) reads; the directory must be
            shared by the ranks (one node) for them to find it, else they recompute.
    Returns:
        :class:`NetworkFactors` (float64, CPU).
    Raises:
        TypeError: ``model`` is no LSTMLM, ``eos_id`` no int. ValueError: bad ``labels``, ``mc_samples``, ``n_fit``,
        ``chunk_size``, empty ``sentences``, a model in training mode, or ``distributed=True`` without a group.
    """
    _check_args(model, sentences, labels, mc_samples, n_fit, chunk_size)
    model = _prepare(model, device)
    net = NetworkGrads(model, eos_id)
    fit = _fit_sentences(sentences, n_fit, seed)
    n, draws = len(fit), mc_samples if labels == "model" else 1
    world = _world(distributed)
    cache = _cache(cache_dir, {"stage": "network KFAC", "labels": labels, "mc_samples": draws, "seed": seed,
                               "chunk_size": chunk_size}, model, fit)

    def factor_step(j, idx, add):
        inputs, targets, mask, w, lengths = _chunk(net, fit, idx, n)
        for d, s in _draws(net, inputs, targets, mask, labels, draws, seed, j):
            _factor_chunk(net, s, d, labels, draws, w, lengths, add)

    sums = _stream(net, fit, "factors", cache, chunk_size, save_every, factor_step, world)
    factors = NetworkFactors(net.names, net.shapes, sums, labels, draws, n, sum(len(t) for t in fit))
    if cache is not None:  # the eigendecompositions (O(V^3) for the decoder's V x V factor) are cached too
        stored = cache.get("eigenbases")
        if stored is not None:
            factors._bases = {k: (v["values"], v.get("vectors")) for k, v in stored.items()}
        elif (ekfac or cache_bases) and world[0] == 0:  # one rank writes, as for the sums
            cache.put("eigenbases", {k: {"values": e} if q is None else {"values": e, "vectors": q}
                                     for k, (e, q) in factors.eigenbases().items()})
    if ekfac:
        device_bases = {k: tuple(None if t is None else t.to(model.decoder.weight.device) for t in v)
                        for k, v in factors.eigenbases().items()}

        def ekfac_step(j, idx, add):
            inputs, targets, mask, w, lengths = _chunk(net, fit, idx, n)
            for d, s in _draws(net, inputs, targets, mask, labels, draws, seed, j):
                _ekfac_chunk(net, s, d, labels, draws, w, lengths, device_bases, n, add)

        factors.eigenvalues = _stream(net, fit, "eigenvalues", cache, chunk_size, save_every, ekfac_step,
                                      world)
    return factors


def diagonal_fisher(
    model: LSTMLM,
    sentences: list[torch.Tensor],
    eos_id: int,
    labels: str = "model",
    mc_samples: int = 1,
    n_fit: int | None = None,
    chunk_size: int = 16,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    save_every: float = 60.0,
    distributed: bool | None = None,
) -> DiagonalCurvature:
    """Diagonal Fisher of all parameters, diag of (1/n) sum_i T_i g_i g_i^T (the scale of
    :func:`ifutils.curvature.fisher.empirical_fisher`): true Fisher with labels drawn from the model (mean over
    ``mc_samples`` draws, ``labels="model"``) or empirical Fisher (``labels="data"``). Per-sample gradients are
    streamed chunk by chunk (:class:`~ifutils.network.NetworkGrads`), squared and summed, never stored.

    Args: as :func:`fit_network_kfac` (``distributed`` included: the per-rank sums of squares are all-reduced).
    Returns:
        :class:`~ifutils.curvature.base.DiagonalCurvature` (P,) float64 on CPU in the flat layout, named
        ``"mc_fisher_k<k>_diag"`` or ``"ef_diag"``.
    Raises:
        as :func:`fit_network_kfac`.
    """
    _check_args(model, sentences, labels, mc_samples, n_fit, chunk_size)
    model = _prepare(model, device)
    net = NetworkGrads(model, eos_id)
    fit = _fit_sentences(sentences, n_fit, seed)
    n, draws = len(fit), mc_samples if labels == "model" else 1
    world = _world(distributed)
    cache = _cache(cache_dir, {"stage": "network diagonal Fisher", "labels": labels, "mc_samples": draws,
                               "seed": seed, "chunk_size": chunk_size}, model, fit)

    def step(j, idx, add):
        inputs, targets, mask, _, lengths = _chunk(net, fit, idx, n)
        for _, s in _draws(net, inputs, targets, mask, labels, draws, seed, j):
            _diag_chunk(net, s, draws, lengths, n, add)

    sums = _stream(net, fit, "diagonal", cache, chunk_size, save_every, step, world)
    d = torch.cat([sums[name].flatten() for name in net.names])
    return DiagonalCurvature(d, f"mc_fisher_k{draws}_diag" if labels == "model" else "ef_diag", psd=True)


__all__ = [
    "LABELS", "KroneckerNetworkCurvature", "NetworkFactors", "diagonal_fisher", "ekfac_network_curvature",
    "factor_keys", "fit_network_kfac", "kfac_network_curvature", "sampled_targets",
]
