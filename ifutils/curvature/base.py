"""Curvature matrices on a parameter subset, all at the same scale as the Hessian of the
training objective L(theta) = (1/n) sum_i l_i(theta), l_i the mean token NLL of sentence i.

Notation: sentence i has T_i predicted tokens, logits z_t = W_d h_t + b_d, p_t = softmax(z_t),
r_t = p_t - onehot(y_t), Lambda_t = diag(p_t) - p_t p_t^T, and J_t = d h_t / d theta.

* Hessian:  H = (1/n) sum_i d^2 l_i / d theta^2.
* Gauss-Newton (GGN) = true Fisher in closed form:
  G = (1/n) sum_i (1/T_i) sum_t (dz_t/dtheta)^T Lambda_t (dz_t/dtheta)
  (Martens 2020, "New insights and perspectives on the natural gradient method", sec. 9.2:
  for softmax cross-entropy the GGN equals the Fisher of the model's predictive distribution).
* True Fisher, Monte Carlo: labels y~ drawn from p_t at every position (the inputs stay the real prefixes, so this
  is the Fisher of the per-token predictive distributions given the data, not of whole sampled sequences; that is
  what makes its expectation exactly G), k draws, s_i = T_i g_i(y~)
  the gradient of the sentence NLL: F_k = (1/(n k)) sum_i sum_draws s_i s_i^T / T_i, with E[F_k] = G
  (the cross-token terms vanish in expectation because E[r_t] = 0).
* Empirical Fisher (EF): the same form with the real labels, F_emp = (1/n) sum_i T_i g_i g_i^T, i.e. one
  outer product of per-example gradients per sentence (Kunstner, Balles, Hennig 2019, eq. 3), with the
  1/T_i weight that puts it on the scale of H and G.
* Identity: C = I, giving the gradient dot product.

Every curvature offers ``solve(v, damping) = (C + damping I)^{-1} v`` and its eigenvalues.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod

import torch

from .._checks import check_damping, check_tensor

Damping = float | torch.Tensor
"""A damping lambda: a float >= 0 added to every diagonal entry, or a (p,) tensor >= 0 added entry by entry
(per-layer damping of block-structured curvatures, see :meth:`Curvature.relative_damping`)."""


class Curvature(ABC):
    """A symmetric p x p curvature C with damped solves; the influence code needs nothing else.

    Attributes:
        name: label used in tables and figures.
        p: size.
        psd: True when C is positive semi-definite by construction (GGN, true Fisher, EF, KFAC, EK-FAC, their
            diagonal and block-diagonal parts, the identity), so that negative computed eigenvalues are rounding
            error and reporting may clip them at zero (:func:`ifutils.experiments.comparison.spectrum_summary`);
            False (the default, e.g. the Hessian) when negative eigenvalues are real and never clipped.
    """

    name: str
    """Its key, e.g. ``"ggn"`` (:mod:`ifutils.curvature.labels`); tables and figures show ``label(name)``."""
    p: int
    psd: bool = False

    @abstractmethod
    def eigvalsh(self) -> torch.Tensor:
        """(p,) float64 eigenvalues in ascending order (negative ones included, never clipped)."""

    @abstractmethod
    def solve(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        """(C + diag(damping))^{-1} v for v of shape (p,) or (p, m); float64 result.

        Raises:
            TypeError: ``v`` is not a torch tensor, or ``damping`` is not a number or tensor (a string, None).
            ValueError: negative damping, ``v`` of the wrong size, or C + damping singular.
        """

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of the representation held (a dense matrix, a diagonal, factors, ...)."""

    def mean_eigenvalue(self) -> float:
        """trace(C) / p, the scale used for relative damping (Karakida et al. 2019 call it m_lambda)."""
        return float(self.eigvalsh().mean())

    def relative_damping(self, alpha: float) -> Damping:
        """alpha * trace(C) / p, the scale-free damping (kronfluence's heuristic when no damping is given uses
        alpha = 0.1 per module).

        Block-structured curvatures override this with one value per block (per-layer damping).

        Raises:
            ValueError: ``alpha < 0``, or the mean eigenvalue is not positive, so no relative scale exists.
        """
        if not alpha >= 0:
            raise ValueError(f"relative damping alpha must be >= 0, got {alpha}")
        scale = self.mean_eigenvalue()
        if not scale > 0:
            raise ValueError(f"{self.name} has mean eigenvalue {scale:g} <= 0; use absolute damping")
        return alpha * scale

    def _check(self, v: torch.Tensor, damping: Damping, device=None) -> tuple[torch.Tensor, Damping]:
        """Validate ``v`` and ``damping``; return them in float64 on ``device`` (where the curvature lives)."""
        v = check_tensor(v, "v", "(p,) or (p, m) tensor").double().to(device or v.device)
        damping = check_damping(damping)
        if torch.is_tensor(damping):
            if damping.shape != (self.p,) or not (damping >= 0).all():
                raise ValueError(f"{self.name}: a damping tensor must have shape (p,) = ({self.p},) and entries >= 0, "
                                 f"got shape {tuple(damping.shape)}, minimum {damping.min().item():g}; "
                                 f"pass a float for one damping on every coordinate")
            damping = damping.double().to(v.device)
        if v.shape[0] != self.p:
            raise ValueError(f"{self.name}: vector has {v.shape[0]} rows, curvature is {self.p} x {self.p}")
        return v, damping


def _describe(damping: Damping) -> str:
    return f"{damping:g}" if not torch.is_tensor(damping) else f"diag({damping.min():.3g}..{damping.max():.3g})"


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes that can still be allocated: free GPU memory on CUDA, MemAvailable of /proc/meminfo
    (else total physical memory) on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_dense_fits(p: int, count: int = 4, device: torch.device | str = "cpu") -> None:
    """Refuse to build dense p x p float64 matrices that would not fit, before allocating them.

    Args:
        count: how many p x p matrices the stage holds at once (e.g. H, GGN and their eigenvectors).
    Raises:
        MemoryError: with the estimate and the limit, and what to lower.
    """
    need, have = count * p * p * 8, available_memory(device)
    if need > have:
        raise MemoryError(
            f"dense curvature on p={p:,} coordinates needs about {need / 2**30:.1f} GiB ({count} float64 "
            f"{p:,} x {p:,} matrices) but {have / 2**30:.1f} GiB is available on {device}; lower num_coords"
        )


def _check_finite(name: str, t: torch.Tensor, shape: str) -> None:
    """Raise FloatingPointError naming the entries when ``t`` holds NaN/Inf (shape: its documented shape)."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).reshape(len(t), -1).any(dim=1).nonzero().flatten().tolist()
        raise FloatingPointError(f"{name} ({shape}) has NaN/Inf entries in rows {bad[:20]}")


def _check_invertible(name: str, shifted: torch.Tensor, damping: Damping) -> None:
    smallest = shifted.abs().min()
    if smallest <= shifted.abs().max() * shifted.numel() * torch.finfo(torch.float64).eps:
        raise ValueError(
            f"{name} + {_describe(damping)} I is singular (|eigenvalue + damping| down to {smallest.item():.3g}); "
            f"use a positive damping larger than the most negative eigenvalue's magnitude"
        )


class DenseCurvature(Curvature):
    """A dense symmetric matrix, held in float64.

    ``solve`` factorises C + damping I by Cholesky. When that fails (C + damping I is not positive
    definite, as for an indefinite Hessian with small damping) it warns, giving the smallest eigenvalue,
    and solves by the float64 eigendecomposition C = Q diag(e) Q^T: Q diag(1 / (e + damping)) Q^T v.

    Args:
        matrix: (p, p) float tensor; symmetrised as (C + C^T) / 2.
        name: its key (:mod:`ifutils.curvature.labels`); tables and figures show its label.
        psd: the matrix is positive semi-definite by construction (a Gram matrix, a GGN); see :class:`Curvature`.
    Raises:
        FloatingPointError: the matrix holds NaN or Inf.
    """

    def __init__(self, matrix: torch.Tensor, name: str, psd: bool = False):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"{name}: the matrix must be square (p, p), got shape {tuple(matrix.shape)}")
        _check_finite(name, matrix, "(p, p)")
        m = matrix.double()
        self.matrix = (m + m.T) / 2
        self.name = name
        self.p = m.shape[0]
        self.psd = bool(psd)
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None

    def _eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._eig is None:
            self._eig = torch.linalg.eigh(self.matrix)
        return self._eig

    def eigvalsh(self) -> torch.Tensor:
        return self._eigh()[0]

    def mean_eigenvalue(self) -> float:
        """trace(C) / p from the diagonal, without an eigendecomposition."""
        return float(self.matrix.diagonal().mean())

    @property
    def nbytes(self) -> int:
        return self.matrix.numel() * self.matrix.element_size()

    def solve(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        v, damping = self._check(v, damping, self.matrix.device)
        shift = torch.diag(damping) if torch.is_tensor(damping) else damping * torch.eye(self.p, dtype=torch.float64, device=v.device)
        factor, info = torch.linalg.cholesky_ex(self.matrix + shift)
        if info == 0:
            # Cholesky can succeed on a numerically singular matrix; its pivots then reveal it.
            _check_invertible(self.name, factor.diagonal() ** 2, damping)
            return torch.cholesky_solve(v if v.dim() == 2 else v[:, None], factor).reshape(v.shape)
        # A per-coordinate damping does not commute with C, so it needs its own decomposition.
        evals, evecs = torch.linalg.eigh(self.matrix + shift) if torch.is_tensor(damping) else self._eigh()
        warnings.warn(
            f"{self.name} + {_describe(damping)} I is not positive definite (smallest eigenvalue of {self.name} "
            f"{self.eigvalsh()[0].item():.3g}); solving by eigendecomposition", stacklevel=2,
        )
        shifted = evals if torch.is_tensor(damping) else evals + damping
        _check_invertible(self.name, shifted, damping)
        coef = evecs.T @ v
        return evecs @ (coef / (shifted if v.dim() == 1 else shifted[:, None]))

    def diagonal(self, name: str | None = None) -> "DiagonalCurvature":
        """The diagonal approximation diag(C), named ``"<name>_diag"`` unless ``name`` is given."""
        return DiagonalCurvature(self.matrix.diagonal(), name or f"{self.name}_diag", psd=self.psd)

    def block_diagonal(self, blocks: list[torch.Tensor], name: str | None = None) -> "BlockCurvature":
        """The block-diagonal approximation: C[b, b] kept for each block b, every other entry zero; named
        ``"<name>_blockdiag"`` unless ``name`` is given.

        Args:
            blocks: index tensors partitioning range(p), e.g. one per parameter tensor
                (:meth:`ifutils.grads.SubsetLoss.blocks`).
        """
        keep = torch.zeros(self.p, self.p, dtype=torch.bool, device=self.matrix.device)
        for b in blocks:
            keep[b[:, None], b] = True
        return BlockCurvature(torch.where(keep, self.matrix, 0.0), blocks, name or f"{self.name}_blockdiag",
                              psd=self.psd)


class BlockCurvature(DenseCurvature):
    """A dense matrix that is block-diagonal over ``blocks`` (one block per layer or parameter tensor),
    damped per block in relative mode: block b gets alpha * scale_b, one damping per layer as in EK-FAC
    (George et al. 2018) and kronfluence, whose heuristic (when no damping is given) is 0.1 times the mean
    eigenvalue of the module's approximation.

    Args:
        matrix: (p, p) float tensor, zero outside the blocks.
        blocks: index tensors partitioning range(p).
        name: key.
        scales: one positive float per block, default the block's mean diagonal entry trace(C_bb) / p_b.
        psd: as for :class:`DenseCurvature` (the principal blocks of a PSD matrix are PSD).
    Raises:
        ValueError: the blocks do not partition range(p), or the number of scales differs.
    """

    def __init__(self, matrix: torch.Tensor, blocks: list[torch.Tensor], name: str, scales: list[float] | None = None,
                 psd: bool = False):
        super().__init__(matrix, name, psd)
        covered = torch.cat(list(blocks)).sort().values if blocks else torch.zeros(0, dtype=torch.long)
        if not torch.equal(covered.cpu(), torch.arange(self.p)):
            raise ValueError(f"{name}: blocks must partition range({self.p}) exactly once")
        if scales is not None and len(scales) != len(blocks):
            raise ValueError(f"{name}: {len(scales)} scales for {len(blocks)} blocks")
        self.blocks = list(blocks)
        self.scales = scales or [float(self.matrix.diagonal()[b].mean()) for b in self.blocks]

    def relative_damping(self, alpha: float) -> torch.Tensor:
        """(p,) float64: alpha * scale_b on the coordinates of block b (per-layer damping).

        Raises:
            ValueError: ``alpha < 0`` or a block's scale is not positive.
        """
        if not alpha >= 0:
            raise ValueError(f"relative damping alpha must be >= 0, got {alpha}")
        out = torch.empty(self.p, dtype=torch.float64, device=self.matrix.device)
        for b, scale in zip(self.blocks, self.scales):
            if not scale > 0:
                raise ValueError(f"{self.name}: a block has mean eigenvalue {scale:g} <= 0; use absolute damping")
            out[b] = alpha * scale
        return out


class DiagonalCurvature(Curvature):
    """C = diag(d). Args: d: (p,) float tensor; name: key; psd: d >= 0 by construction (the diagonal of a PSD
    matrix), see :class:`Curvature`."""

    def __init__(self, d: torch.Tensor, name: str, psd: bool = False):
        if d.dim() != 1:
            raise ValueError(f"{name}: the diagonal must be a (p,) tensor, got shape {tuple(d.shape)}")
        _check_finite(name, d, "(p,) diagonal")
        self.d = d.double()
        self.name = name
        self.p = d.shape[0]
        self.psd = bool(psd)

    def eigvalsh(self) -> torch.Tensor:
        return self.d.sort().values

    @property
    def nbytes(self) -> int:
        return self.d.numel() * self.d.element_size()

    def solve(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        v, damping = self._check(v, damping, self.d.device)
        shifted = self.d + damping
        _check_invertible(self.name, shifted, damping)
        if (shifted < 0).any():
            warnings.warn(f"{self.name} + {_describe(damping)} I is not positive definite ({int((shifted < 0).sum())} "
                          f"negative entries, down to {shifted.min().item():.3g})", stacklevel=2)
        return v / (shifted if v.dim() == 1 else shifted[:, None])


class IdentityCurvature(DiagonalCurvature):
    """C = I: influence reduces to the (scaled) gradient dot product -g_test^T g_i / (1 + damping)."""

    def __init__(self, p: int, name: str = "identity", device: torch.device | str = "cpu"):
        super().__init__(torch.ones(p, dtype=torch.float64, device=device), name, psd=True)


def scale_damping(hess: Curvature, ggn: Curvature, alpha: float = 1.0) -> float:
    """A damping on the curvature's own scale that keeps H + lambda I positive definite:
    lambda = max(alpha * tr(GGN) / p, 2 |lambda_min(H)|) (0 for the second term when H is PSD).

    The first term is relative damping on the GGN's mean eigenvalue (always >= 0, unlike H's); the second keeps the
    exact-Hessian influence a minimum-based one, as the re-solves of :mod:`ifutils.resolve` need. Used where
    models or subsets with very different curvature scales are compared (widths, subsets, checkpoints).
    """
    return max(alpha * ggn.mean_eigenvalue(), -2.0 * float(hess.eigvalsh()[0]))
