"""What a linear datamodel needs from the training gradients: sums over subsets, unit-norm sums, projected features.

The linear datamodeling score (Park et al. 2023, TRAK, eq. 4) compares, over training subsets S_m, the summed
influence of a subset's sentences with the query loss of models retrained on it. With I_iq = -g_i^T q_q (q_q the
preconditioned query, ``(C + lambda I)^{-1} g_test`` for a curvature C) the prediction is linear in the gradients:

    f_q(S_m) = sum_{i in S_m} I_iq = -(sum_{i in S_m} g_i)^T q_q = -G_m^T q_q,

so one pass over the training sentences that accumulates G = W g ((M, P): W the (M, n) subset masks) serves every
curvature and every damping: each costs its preconditioning and an (M, P) x (P, Q) product, not a pass of its own.
The same pass accumulates what the Hessian-free baselines need:

* ``unit_sums`` = sum_{i in S_m} g_i / ||g_i||: the gradient-cosine attribution -cos(g_i, g_q) (up to the query's
  norm, which a per-query rank correlation ignores), as in Pruthi et al. 2020's cosine variant of TracIn;
* ``sq_norms`` ||g_i||^2: the identity self-influence (the L2 gradient-norm score of Outlier Gradient Analysis);
* ``features`` phi_i = P g_i of a :class:`KroneckerProjection`: the random-projection features of TRAK (Park et
  al. 2023, sec. 3.2), here with a per-tensor Kronecker-factored projection so that no dense (k, P) matrix exists.

Units: g is the gradient of a sentence's mean token NLL (nats/token) over all P parameters, in
:class:`~ifutils.network.NetworkGrads`' flat layout.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from .cache import derive_seed
from .data import bucket_batches
from .network import NetworkGrads
from .progress import progress

__all__ = ["GradientSums", "KroneckerProjection", "fingerprint_weights", "gradient_sums", "subset_predictions"]


class KroneckerProjection:
    """A seeded random projection of whole-network gradients, phi = P g, Kronecker-factored per tensor.

    For a tensor W of shape (r, c) (trailing dimensions flattened into c; a vector has c = 1), the projection of its
    gradient G is the (k_r, k_c) matrix A G B^T, with A (k_r, r) and B (k_c, c) independent Gaussian matrices of
    variance 1/k_r and 1/k_c, k_r = min(k_out, r), k_c = min(k_in, c) (B = [1] for a vector). Equivalently phi_W =
    (A kron B) vec(G), and E[(A kron B)^T (A kron B)] = I, so inner products are preserved in expectation (a
    Johnson-Lindenstrauss map; the factored form is that of LoGra, Choe et al. 2024, sec. 3). phi concatenates the
    tensors in the ``net.names`` order.

    Args:
        shapes: {name: shape} of the tensors, in the flat layout's order (``NetworkGrads.shapes``).
        k_out, k_in: projected sizes of each tensor's rows and columns, >= 1.
        seed: seeds every factor (the factor of tensor t from ``derive_seed(seed, t)``, drawn on the CPU).
        dtype, device: of the factors and of the projected features.
    Attributes:
        dim: K, the total projected size. factors: {name: (A, B)}.
    Raises:
        ValueError: no tensors, or k_out / k_in < 1.
    """

    def __init__(self, shapes: dict[str, tuple], k_out: int = 32, k_in: int = 32, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if not shapes:
            raise ValueError("shapes is empty: pass NetworkGrads(model, eos).shapes")
        if not (isinstance(k_out, int) and isinstance(k_in, int) and k_out >= 1 and k_in >= 1):
            raise ValueError(f"k_out and k_in must be ints >= 1, got {k_out!r}, {k_in!r}")
        self.shapes, self.k_out, self.k_in, self.seed = dict(shapes), k_out, k_in, seed
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for t, (name, shape) in enumerate(self.shapes.items()):
            rows, cols = _rows_cols(shape)
            g = torch.Generator().manual_seed(derive_seed(seed, t))
            kr, kc = min(k_out, rows), min(k_in, cols)
            a = torch.randn(kr, rows, generator=g, dtype=torch.float64) / math.sqrt(kr)
            b = (torch.randn(kc, cols, generator=g, dtype=torch.float64) / math.sqrt(kc) if cols > 1
                 else torch.ones(1, 1, dtype=torch.float64))
            self.factors[name] = (a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device))
        self.dim = sum(a.shape[0] * b.shape[0] for a, b in self.factors.values())
        self.p = sum(math.prod(s) for s in self.shapes.values())

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, P) flat gradients -> (B, K) features (the factors' dtype and device).

        Raises:
            ValueError: flat is not (B, P).
        """
        if flat.dim() != 2 or flat.shape[1] != self.p:
            raise ValueError(f"need (B, {self.p}) flat gradients, got {tuple(flat.shape)}")
        out, start = [], 0
        for name, shape in self.shapes.items():
            a, b = self.factors[name]
            rows, cols = _rows_cols(shape)
            g = flat[:, start : start + rows * cols].to(a).reshape(-1, rows, cols)
            out.append((a @ (g @ b.T)).reshape(len(flat), -1))
            start += rows * cols
        return torch.cat(out, 1)

    def matrix(self) -> torch.Tensor:
        """The dense (K, P) projection (block diagonal of the A kron B), for tests on small models only."""
        return torch.block_diag(*[torch.kron(a, b) for a, b in self.factors.values()])


def _rows_cols(shape) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (shape[0], 1)


@dataclass
class GradientSums:
    """The output of :func:`gradient_sums` (module docstring for the meaning of each field).

    Attributes:
        sums: (M, P) float64, G = W g. unit_sums: (M, P) float64, W (g / ||g||). sq_norms: (n,) float64 ||g_i||^2.
        features: (n, K) float32 projected gradients, or None. n: training sentences. tokens: their token count.
    """

    sums: torch.Tensor
    unit_sums: torch.Tensor
    sq_norms: torch.Tensor
    features: torch.Tensor | None
    n: int
    tokens: int


def gradient_sums(net: NetworkGrads, sentences: list[torch.Tensor], weights, chunk_size: int = 32,
                  projection: KroneckerProjection | None = None, desc: str = "gradient sums") -> GradientSums:
    """One pass over ``sentences``: G = W g, W (g / ||g||), ||g_i||^2 and the projected features P g_i.

    Args:
        net: the model's :class:`~ifutils.network.NetworkGrads` (every tensor scored).
        sentences: the n training sentences (1-D int64, ending in ``<eos>``).
        weights: (M, n) array or tensor, e.g. subset masks (bool or float); row m gives G_m = sum_i W_mi g_i.
        chunk_size: sentences per batched gradient pass, >= 1.
        projection: optional :class:`KroneckerProjection` over ``net.shapes``.
    Returns:
        :class:`GradientSums`, the sums accumulated in float64.
    Memory: the two (M, P) float64 sums (2 x 8 M P bytes: 4.3 GB for M = 100, P = 2.7M) and one chunk.
    Raises:
        ValueError: weights not (M, n) with n = len(sentences), non-finite weights, a zero gradient (its unit
            vector is undefined), a projection over other tensors.
    """
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64) if not torch.is_tensor(weights) else weights)
    w = w.double()
    if w.dim() != 2 or w.shape[1] != len(sentences):
        raise ValueError(f"weights must be (M, n={len(sentences)}), got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights hold NaN or Inf")
    if projection is not None and projection.shapes != net.shapes:
        raise ValueError("the projection was built for other tensors; build it from net.shapes")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    device = net.model.decoder.weight.device
    sums = torch.zeros(len(w), net.p, dtype=torch.float64, device=device)
    unit = torch.zeros_like(sums)
    sq = torch.zeros(len(sentences), dtype=torch.float64)
    features = torch.zeros(len(sentences), projection.dim) if projection is not None else None
    w = w.to(device)
    buffer = None
    for idx in progress(bucket_batches([len(s) for s in sentences], chunk_size), desc=desc, unit="chunk"):
        if buffer is None or buffer.shape[0] < len(idx):
            buffer = torch.empty(max(chunk_size, len(idx)), net.p, device=device,
                                 dtype=net.model.decoder.weight.dtype)
        g = net.flat([sentences[i] for i in idx], out=buffer)
        g64 = g.double()
        norms = g64.norm(dim=1)
        if (norms == 0).any():
            raise ValueError(f"sentences {[idx[k] for k in (norms == 0).nonzero().flatten().tolist()]} have a zero "
                             f"gradient; the gradient cosine is undefined for them")
        cols = torch.as_tensor(idx, device=device)
        sums.addmm_(w[:, cols], g64)
        unit.addmm_(w[:, cols] / norms[None], g64)
        del g64
        sq[idx] = (norms**2).cpu()
        if features is not None:
            features[idx] = projection(g).float().cpu()
    return GradientSums(sums, unit, sq, features, len(sentences), int(sum(len(s) for s in sentences)))


def subset_predictions(sums: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """(M, Q) float64 predicted summed influence f_q(S_m) = -G_m^T q_q (module docstring).

    Args:
        sums: (M, P) subset gradient sums (:attr:`GradientSums.sums`). queries: (Q, P) preconditioned queries.
    Raises:
        ValueError: P differs.
    """
    if sums.shape[1] != queries.shape[-1]:
        raise ValueError(f"sums {tuple(sums.shape)} and queries {tuple(queries.shape)} disagree on P")
    return -(sums @ queries.to(sums).T).cpu().numpy()


def fingerprint_weights(weights) -> str:
    """A short fingerprint (12 hex digits) of a weight matrix such as the subset masks, for cache keys."""
    array = np.ascontiguousarray(np.asarray(weights, dtype=np.float64))
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()[:12]
