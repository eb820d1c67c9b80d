"""Self-influence of every training sentence under whole-network curvatures, and the gradient-norm scores.

The self-influence of sentence i under curvature C at damping lambda is the quadratic form

    s_i = g_i^T (C + lambda I)^{-1} g_i  >= 0 for C positive semi-definite            (Koh & Liang 2017, sec. 5.4)

(the loss change of sentence i when it is up-weighted, with the sign flipped), g_i the gradient of its mean token
NLL (nats/token) over all P parameters. A sentence the rest of the data does not explain (mislabelled, corrupted)
has a large s_i (Koh & Liang 2017, fig. 6; Schioppa et al. 2022, sec. 5.3). Outlier Gradient Analysis (Chhabra et
al. 2024, arXiv 2405.03869, sec. 4) drops the curvature: the L2 (s_i for C = 0, lambda = 1) and L1 norms of g_i.

Kronecker-factored curvatures (:class:`~ifutils.curvature.network_kfac.KroneckerNetworkCurvature`) are evaluated
without forming g_i: tensor W's block is Q diag(e) Q^T with Q = Q_row (x) Q_col, and g_i's rotated block is

    Q_row^T G_i Q_col = sum_t (Q_row^T delta_t)(Q_col^T a_t)^T = (D_i Q_row)^T (A_i Q_col),

D_i (T, rows) and A_i (T, cols) the sentence's per-token pre-activation gradients and layer inputs
(:meth:`ifutils.network.NetworkGrads.signals`), so s_i = sum over blocks of sum_kl R_kl^2 / (e_kl + lambda). For the
decoder (V = 10,000 rows) that costs T V^2 per sentence instead of the V^2 H of rotating the dense gradient. KFAC and
EK-FAC fitted together share their bases, so one rotation serves both and every damping. The embedding's row
basis is the identity (its input factor is diagonal): its rotated gradient is row w_t += (d l / d x_t) Q_col.
Diagonal curvatures (and the identity) use the flat per-sample gradients: s_i = sum_p g_ip^2 / (d_p + lambda).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .curvature.base import Curvature, DenseCurvature, DiagonalCurvature
from .curvature.network_kfac import KroneckerNetworkCurvature
from .data import bucket_batches, make_batch
from .network import NetworkGrads
from .progress import progress

__all__ = ["GRADIENT_NORMS", "self_influence"]

GRADIENT_NORMS = ("grad_l2", "grad_l1")
"""Keys of the Hessian-free scores of Outlier Gradient Analysis: ||g_i||_2^2 and ||g_i||_1."""


def _pairs(net: NetworkGrads, s: dict, name: str):
    """(D (B, L, rows), A (B, L, cols) or None for a bias) of a linear tensor's per-token outer products."""
    if name == "decoder.weight":
        return s["d_logits"], s["h_last"]
    if name == "decoder.bias":
        return s["d_logits"], None
    kind, k = name.removeprefix("lstm.").rsplit("_l", 1)
    delta = s[f"d_gates{k}"]
    if kind == "weight_ih":
        return delta, s[f"x{k}"]
    if kind == "weight_hh":
        h = s[f"h{k}"]
        return delta, torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
    return delta, None


def _rotated(net: NetworkGrads, s: dict, name: str, bases, dtype) -> torch.Tensor:
    """(B, rows, cols) rotated per-sample gradient Q_row^T G_i Q_col of tensor ``name`` (module docstring)."""
    q_row, q_col = bases
    if name == "embedding.weight":
        d = s["d_embedding"].to(dtype)
        if q_col is not None:
            d = d @ q_col
        b, v = d.shape[0], net.shapes[name][0]
        rows = d.new_zeros(b * v, d.shape[-1])
        keys = (torch.arange(b, device=d.device)[:, None] * v + s["tokens"]).flatten()
        return rows.index_add_(0, keys, d.reshape(-1, d.shape[-1])).view(b, v, -1)
    delta, a = _pairs(net, s, name)
    delta = delta.to(dtype)
    if q_row is not None:
        delta = delta @ q_row
    if a is None:
        return delta.sum(1)[..., None]
    a = a.to(dtype)
    if q_col is not None:
        a = a @ q_col
    return torch.bmm(delta.transpose(1, 2), a)


def self_influence(net: NetworkGrads, sentences: list[torch.Tensor], curvatures: dict[str, Curvature],
                   dampings: dict[str, Sequence[float]], chunk_size: int = 32,
                   restricted: dict[str, tuple[torch.Tensor, DenseCurvature]] | None = None,
                   norms: bool = True, dtype: torch.dtype = torch.float32, desc: str = "self-influence",
                   projection=None) -> dict[str, np.ndarray]:
    """Self-influence g_i^T (C + lambda I)^{-1} g_i of every sentence, for each curvature and damping, in one pass.

    Args:
        net: :class:`~ifutils.network.NetworkGrads` over every parameter tensor of the model.
        sentences: the n sentences (1-D int64 ending in ``<eos>``).
        curvatures: {key: curvature over net's P coordinates}: :class:`KroneckerNetworkCurvature` (KFAC, EK-FAC;
            those built from one fit share a rotation) or :class:`~ifutils.curvature.base.DiagonalCurvature`
            (diagonal Fishers, the identity).
        dampings: {key: absolute dampings >= 0} for every key of ``curvatures`` and of ``restricted``.
        chunk_size: sentences per batched pass, >= 1.
        restricted: {key: (idx (p,) flat coordinates, DenseCurvature (p, p))}: the quadratic form of g_i[idx]
            (e.g. the exact Hessian of the 512-coordinate subset).
        norms: also return ``grad_l2`` (||g_i||^2) and ``grad_l1`` (||g_i||_1) as one column each.
        dtype: of the rotations (float32; float64 for tests).
        projection: optional :class:`~ifutils.datamodels.KroneckerProjection` over ``net.shapes``: also return
            ``features`` (n, K), the projected gradients (for a detector on gradients, e.g. an isolation forest).
    Returns:
        {key: (n, len(dampings[key])) float64}, rows in sentence order, nats/token per unit weight.
    Raises:
        ValueError: a key without dampings, a negative damping, a curvature of another type or size, a singular
            damped block, chunk_size < 1.
        TypeError: a curvature of an unsupported type.
    """
    restricted = restricted or {}
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    for key in [*curvatures, *restricted]:
        ds = dampings.get(key)
        if not ds or any(not float(d) >= 0 for d in ds):
            raise ValueError(f"dampings[{key!r}] must be one or more floats >= 0, got {ds!r}")
    for key, c in curvatures.items():
        if not isinstance(c, (KroneckerNetworkCurvature, DiagonalCurvature)):
            raise TypeError(f"curvature {key!r} is a {type(c).__name__}; self_influence takes KroneckerNetworkCurvature "
                            f"and DiagonalCurvature (pass a dense one through restricted=)")
        if c.p != net.p:
            raise ValueError(f"curvature {key!r} has P = {c.p}, the network {net.p}")
    device = net.model.decoder.weight.device
    kron = {k: c for k, c in curvatures.items() if isinstance(c, KroneckerNetworkCurvature)}
    groups: dict[int, list[str]] = {}
    for k, c in kron.items():  # curvatures of one fit share the basis tensors
        groups.setdefault(id(next(iter(c.bases.values()))[0]), []).append(k)
    cast = {}
    for keys in groups.values():
        c = kron[keys[0]]
        cast[keys[0]] = {n: tuple(None if q is None else q.to(device=device, dtype=dtype) for q in c.bases[n])
                         for n in c.names}
    weights = {}
    for k, c in kron.items():
        weights[k] = {n: torch.stack([1 / (c.eigenvalues[n].to(device) + float(d)) for d in dampings[k]]).to(dtype)
                      for n in c.names}
        for n, w in weights[k].items():
            if not torch.isfinite(w).all():
                raise ValueError(f"{k} + lambda I is singular on {n!r} for a damping of {list(dampings[k])}")
    diag = {k: torch.stack([1 / (c.d.to(device) + float(d)) for d in dampings[k]]) for k, c in curvatures.items()
            if isinstance(c, DiagonalCurvature)}
    n = len(sentences)
    out = {k: np.zeros((n, len(dampings[k]))) for k in [*curvatures, *restricted]}
    if norms:
        out.update({k: np.zeros((n, 1)) for k in GRADIENT_NORMS})
    if projection is not None:
        out["features"] = np.zeros((n, projection.dim), dtype=np.float32)
    flat_needed = bool(diag or restricted or norms or projection is not None)
    for idx in progress(bucket_batches([len(s) for s in sentences], chunk_size), desc=desc, unit="chunk"):
        batch = [t.to(device) for t in make_batch([sentences[i] for i in idx], net.eos_id)]
        s = net.signals(*batch)
        for keys in groups.values():
            bases = cast[keys[0]]
            totals = {k: torch.zeros(len(idx), len(dampings[k]), dtype=torch.float64, device=device) for k in keys}
            for name in kron[keys[0]].names:
                r2 = _rotated(net, s, name, bases[name], dtype) ** 2  # (B, rows, cols)
                for k in keys:
                    w = weights[k][name].reshape(len(dampings[k]), -1)  # (D, rows cols)
                    totals[k] += (r2.reshape(len(idx), -1) @ w.T).double()
                del r2
            for k in keys:
                out[k][idx] = totals[k].cpu().numpy()
        if flat_needed:
            g = net.flat([sentences[i] for i in idx]).double()
            sq = g * g
            for k, w in diag.items():
                out[k][idx] = (sq @ w.T.double()).cpu().numpy()
            for k, (coords, dense) in restricted.items():
                gs = g[:, coords.to(device)].T  # (p, B)
                out[k][idx] = np.stack([(gs * dense.solve(gs, float(d))).sum(0).cpu().numpy() for d in dampings[k]], 1)
            if norms:
                out["grad_l2"][idx, 0] = sq.sum(1).cpu().numpy()
                out["grad_l1"][idx, 0] = g.abs().sum(1).cpu().numpy()
            if projection is not None:
                out["features"][idx] = projection(g).float().cpu().numpy()
            del g, sq
    return out


def flat_offsets(net: NetworkGrads) -> dict[str, int]:
    """{name: first flat coordinate} of :class:`~ifutils.network.NetworkGrads`' layout."""
    out, start = {}, 0
    for name, shape in net.shapes.items():
        out[name] = start
        start += math.prod(shape)
    return out
