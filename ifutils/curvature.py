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
from torch.func import grad, jacfwd, vmap

from .cache import derive_seed
from .grads import DECODER, SubsetLoss, per_sample_grads

Damping = float | torch.Tensor
"""A damping lambda: a float >= 0 added to every diagonal entry, or a (p,) tensor >= 0 added entry by entry
(per-layer damping of block-structured curvatures, see :meth:`Curvature.relative_damping`)."""


class Curvature(ABC):
    """A symmetric p x p curvature C with damped solves; the influence code needs nothing else."""

    name: str
    p: int

    @abstractmethod
    def eigvalsh(self) -> torch.Tensor:
        """(p,) float64 eigenvalues in ascending order (negative ones included, never clipped)."""

    @abstractmethod
    def solve(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        """(C + diag(damping))^{-1} v for v of shape (p,) or (p, m); float64 result.

        Raises:
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
        v = v.double().to(device or v.device)
        if torch.is_tensor(damping):
            if damping.shape != (self.p,) or not (damping >= 0).all():
                raise ValueError(f"{self.name}: a damping tensor must have shape (p,) = ({self.p},) and entries >= 0, "
                                 f"got shape {tuple(damping.shape)}, minimum {damping.min().item():g}; "
                                 f"pass a float for one damping on every coordinate")
            damping = damping.double().to(v.device)
        elif not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
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
        name: label used in tables and figures.
    Raises:
        FloatingPointError: the matrix holds NaN or Inf.
    """

    def __init__(self, matrix: torch.Tensor, name: str):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"{name}: the matrix must be square (p, p), got shape {tuple(matrix.shape)}")
        _check_finite(name, matrix, "(p, p)")
        m = matrix.double()
        self.matrix = (m + m.T) / 2
        self.name = name
        self.p = m.shape[0]
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
        """The diagonal approximation diag(C)."""
        return DiagonalCurvature(self.matrix.diagonal(), name or f"{self.name} (diag)")

    def block_diagonal(self, blocks: list[torch.Tensor], name: str | None = None) -> "BlockCurvature":
        """The block-diagonal approximation: C[b, b] kept for each block b, every other entry zero.

        Args:
            blocks: index tensors partitioning range(p), e.g. one per parameter tensor
                (:meth:`ifutils.grads.SubsetLoss.blocks`).
        """
        keep = torch.zeros(self.p, self.p, dtype=torch.bool, device=self.matrix.device)
        for b in blocks:
            keep[b[:, None], b] = True
        return BlockCurvature(torch.where(keep, self.matrix, 0.0), blocks, name or f"{self.name} (block-diag)")


class BlockCurvature(DenseCurvature):
    """A dense matrix that is block-diagonal over ``blocks`` (one block per layer or parameter tensor),
    damped per block in relative mode: block b gets alpha * scale_b, one damping per layer as in EK-FAC
    (George et al. 2018) and kronfluence, whose heuristic (when no damping is given) is 0.1 times the mean
    eigenvalue of the module's approximation.

    Args:
        matrix: (p, p) float tensor, zero outside the blocks.
        blocks: index tensors partitioning range(p).
        name: label.
        scales: one positive float per block, default the block's mean diagonal entry trace(C_bb) / p_b.
    Raises:
        ValueError: the blocks do not partition range(p), or the number of scales differs.
    """

    def __init__(self, matrix: torch.Tensor, blocks: list[torch.Tensor], name: str, scales: list[float] | None = None):
        super().__init__(matrix, name)
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
    """C = diag(d). Args: d: (p,) float tensor; name: label."""

    def __init__(self, d: torch.Tensor, name: str):
        if d.dim() != 1:
            raise ValueError(f"{name}: the diagonal must be a (p,) tensor, got shape {tuple(d.shape)}")
        _check_finite(name, d, "(p,) diagonal")
        self.d = d.double()
        self.name = name
        self.p = d.shape[0]

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
        super().__init__(torch.ones(p, dtype=torch.float64, device=device), name)


def scale_damping(hess: Curvature, ggn: Curvature, alpha: float = 1.0) -> float:
    """A damping on the curvature's own scale that keeps H + lambda I positive definite:
    lambda = max(alpha * tr(GGN) / p, 2 |lambda_min(H)|) (0 for the second term when H is PSD).

    The first term is relative damping on the GGN's mean eigenvalue (always >= 0, unlike H's); the second keeps the
    exact-Hessian influence a minimum-based one, as the re-solves of :mod:`ifutils.groundtruth` need. Used where
    models or subsets with very different curvature scales are compared (widths, subsets, checkpoints).
    """
    return max(alpha * ggn.mean_eigenvalue(), -2.0 * float(hess.eigvalsh()[0]))


def empirical_fisher(grads: torch.Tensor, lengths: torch.Tensor, name: str = "EF") -> DenseCurvature:
    """Sentence-level empirical Fisher F_emp = (1/n) sum_i T_i g_i g_i^T (module docstring).

    This is Kunstner, Balles, Hennig 2019, eq. 3, with our examples (sentences): g_i T_i is the gradient of
    sentence i's NLL, and the 1/T_i of the mean-token-loss objective puts it on the scale of H and G.

    Args:
        grads: (n, p) per-sample gradients of the mean token NLL (nats/token).
        lengths: (n,) tensor, the number of predicted tokens T_i of each sample (``len(sentence)``, ``<eos>`` included).
    Raises:
        ValueError: ``lengths`` is not a tensor of shape (n,).
    """
    _check_lengths(grads, lengths)
    check_dense_fits(grads.shape[1], 2, grads.device)
    g = grads.double()
    return DenseCurvature((g * lengths.double().to(g.device)[:, None]).T @ g / len(g), name)


def _check_lengths(grads: torch.Tensor, lengths) -> None:
    if not torch.is_tensor(lengths) or lengths.shape != (len(grads),):
        shape = tuple(lengths.shape) if torch.is_tensor(lengths) else type(lengths).__name__
        raise ValueError(f"lengths must be a ({len(grads)},) tensor of token counts, one per gradient row, got {shape}; "
                         f"use torch.tensor([len(s) for s in sentences])")


def token_empirical_fisher(token_grads: torch.Tensor, lengths: torch.Tensor, name: str = "EF (token)") -> DenseCurvature:
    """Token-level empirical Fisher F_tok = (1/n) sum_i (1/T_i) sum_t g_it g_it^T.

    Every token is an example: g_it is the gradient of -log p(y_t | y_<t) (nats), as in per-token
    KFAC/EK-FAC implementations for language models (e.g. kronfluence) and curvlinops' ``EFLinearOperator``
    on flattened token outputs. Like the sentence-level EF it equals the GGN in expectation over labels drawn
    from the model; with the real labels the two differ by the cross-token terms g_it g_is^T (t != s).

    Args:
        token_grads: (sum_i T_i, p) per-token gradients, sentences in order (:func:`ifutils.grads.per_token_grads`).
        lengths: (n,) tokens T_i per sentence.
    Raises:
        ValueError: the row count is not sum(lengths).
    """
    if token_grads.shape[0] != int(lengths.sum()):
        raise ValueError(f"{token_grads.shape[0]} token gradients for {int(lengths.sum())} tokens in lengths")
    check_dense_fits(token_grads.shape[1], 2, token_grads.device)
    g = token_grads.double()
    w = torch.repeat_interleave(1.0 / (len(lengths) * lengths.double()), lengths.long()).to(g.device)
    return DenseCurvature((g * w[:, None]).T @ g, name)


class LowRankCurvature(Curvature):
    """C = U U^T with U of shape (p, r), r < p: the exact empirical Fisher when n_H < p, with
    U = [sqrt(T_i / n) g_i]_i (the sentence-level EF of :func:`empirical_fisher`).

    Solves use the Woodbury identity, never a p x p matrix (Woodbury 1950; Golub & Van Loan, sec. 2.1.4):
      (U U^T + lambda I)^{-1} v = (1/lambda) (v - U (lambda I_r + U^T U)^{-1} U^T v),   lambda > 0,
    at O(p r^2) cost with an r x r Cholesky factor.

    Args:
        factor: (p, r) float tensor U.
        name: label.
    """

    def __init__(self, factor: torch.Tensor, name: str):
        if factor.dim() != 2:
            raise ValueError(f"{name}: the factor U must be (p, r), got shape {tuple(factor.shape)}")
        _check_finite(name, factor, "(p, r) factor U")
        self.factor = factor.double()
        self.name = name
        self.p = factor.shape[0]

    @classmethod
    def empirical_fisher(cls, grads: torch.Tensor, lengths: torch.Tensor, name: str = "EF (Woodbury)") -> "LowRankCurvature":
        """The sentence-level EF from (n, p) per-sample gradients and (n,) token counts, as a factor.

        Raises:
            ValueError: ``lengths`` is not a tensor of shape (n,).
        """
        _check_lengths(grads, lengths)
        scale = (lengths.double() / len(grads)).sqrt().to(grads.device)
        return cls((grads.double() * scale[:, None]).T, name)

    @property
    def nbytes(self) -> int:
        return self.factor.numel() * self.factor.element_size()

    def eigvalsh(self) -> torch.Tensor:
        """Eigenvalues of U^T U (r x r, the same nonzero spectrum), padded with p - r zeros."""
        gram = torch.linalg.eigvalsh(self.factor.T @ self.factor)
        zeros = gram.new_zeros(max(self.p - len(gram), 0))
        return torch.cat([zeros, gram]).sort().values[-self.p :]

    def mean_eigenvalue(self) -> float:
        return float((self.factor**2).sum() / self.p)

    def solve(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        """Raises: ValueError: damping not a positive float (Woodbury needs lambda > 0)."""
        v, damping = self._check(v, damping, self.factor.device)
        if torch.is_tensor(damping) or not damping > 0:
            raise ValueError(f"{self.name}: the Woodbury solve needs a positive scalar damping, got {_describe(damping)}")
        u = self.factor
        small = damping * torch.eye(u.shape[1], dtype=torch.float64, device=u.device) + u.T @ u
        inner = torch.cholesky_solve(u.T @ (v if v.dim() == 2 else v[:, None]), torch.linalg.cholesky(small))
        return (v - (u @ inner).reshape(v.shape)) / damping


def mc_true_fisher(
    loss: SubsetLoss, sentences: list[torch.Tensor], num_samples: int, seed: int = 0, chunk_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
) -> DenseCurvature:
    """True Fisher by Monte Carlo: ``num_samples`` label draws from the model per position.

    F_k = (1/(n k)) sum_i sum_{draws} T_i g_i(y~) g_i(y~)^T, an unbiased estimate of the GGN
    (module docstring). Draw d uses the seed (``seed``, d) (see :func:`per_sample_grads`), so F_k is
    reproducible bit for bit on the same device, also when resumed from ``cache_dir``.

    Returns:
        DenseCurvature named ``"true Fisher (MC, k=...)"``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    lengths = torch.tensor([len(s) for s in sentences], device=loss.theta0.device, dtype=torch.float64)
    total = torch.zeros(len(loss.theta0), len(loss.theta0), dtype=torch.float64, device=loss.theta0.device)
    for draw in range(num_samples):
        g = per_sample_grads(loss, sentences, chunk_size, derive_seed(seed, draw),
                             desc=f"true Fisher draw {draw + 1}/{num_samples}", cache_dir=cache_dir)
        total += empirical_fisher(g, lengths).matrix
    return DenseCurvature(total / num_samples, f"true Fisher (MC, k={num_samples})")


def mc_fisher_errors(
    loss: SubsetLoss, sentences: list[torch.Tensor], reference: DenseCurvature, ks: tuple[int, ...], seed: int = 0,
    chunk_size: int = 32, cache_dir: str | os.PathLike | None = None,
) -> dict[int, float]:
    """Relative Frobenius error ||F_k - G||_F / ||G||_F of the Monte Carlo true Fisher against the closed form G,
    for each k in ``ks``, with nested draws (F_k uses draws 0..k-1, the draws of :func:`mc_true_fisher`, so
    cached draws are shared). The expected squared error falls as 1/k (the draws are i.i.d.).

    Returns:
        {k: error} in the order of ``ks``.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive draw counts, got {ks}")
    lengths = torch.tensor([len(s) for s in sentences], device=loss.theta0.device, dtype=torch.float64)
    total, errors = 0, {}
    for draw in range(max(ks)):
        g = per_sample_grads(loss, sentences, chunk_size, derive_seed(seed, draw),
                             desc=f"true Fisher draw {draw + 1}/{max(ks)}", cache_dir=cache_dir)
        total = total + empirical_fisher(g, lengths).matrix
        if draw + 1 in ks:
            errors[draw + 1] = float((total / (draw + 1) - reference.matrix).norm() / reference.matrix.norm())
    return {k: errors[k] for k in ks}


def _decoder_coords(loss: SubsetLoss) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions in theta of LSTM-side and decoder coordinates, and for the decoder ones the
    output row v_a and input feature k_a (-1 for the bias, whose feature is the constant 1)."""
    positions, rows, feats, hidden = [], [], [], loss.base["decoder.weight"].shape[1]
    for name in loss.subset.names:
        idx = loss.indices[name]
        pos = torch.arange(len(idx), device=idx.device) + loss._offsets[name]
        if name in DECODER:
            positions.append(pos)
            rows.append(idx // hidden if name == "decoder.weight" else idx)
            feats.append(idx % hidden if name == "decoder.weight" else torch.full_like(idx, -1))
    p = len(loss.theta0)
    is_dec = torch.zeros(p, dtype=torch.bool, device=loss.theta0.device)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long, device=is_dec.device)  # noqa: E731
    dec_pos = cat(positions)
    is_dec[dec_pos] = True
    return (~is_dec).nonzero().flatten(), dec_pos, cat(rows), cat(feats)


def hessian_and_ggn(
    loss: SubsetLoss,
    sentences: list[torch.Tensor],
    chunk_size: int = 8,
    token_chunk: int = 16,
    theta: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    cache_dir: str | os.PathLike | None = None,
    token_ef: bool = False,
) -> tuple[DenseCurvature, ...]:
    """Exact Hessian H and Gauss-Newton G (= closed-form true Fisher) of the mean training loss
    (1/n) sum_i w_i l_i(theta), with sample weights w_i (default 1), and optionally the token-level EF.

    Uses the structure of the loss instead of p Hessian-vector products through the V-way softmax.
    Split theta into LSTM-side coordinates (l) and decoder coordinates (d). Per token,
      G_ll = J^T (W_d^T Lambda W_d) J,   G_ld = J^T W_d^T Lambda E_d diag(f),   G_dd = diag(f) E_d^T Lambda E_d diag(f),
      R_ll = d^2/dtheta_l^2 [ (W_d^T r)^T h(theta_l) ]  (second derivatives of h only),
      R_ld[:, a] = r[v_a] J[k_a, :],   R_dd = 0,
    where E_d selects the output rows v_a of the decoder coordinates and f_a = h[k_a] (1 for a bias).
    H = G + R, each weighted by 1/(n T_i). J and R_ll come from one forward-over-reverse pass
    (``jacfwd(grad)``) through the unrolled LSTM only; the softmax enters through W_d^T Lambda W_d.
    The same pass gives every token's gradient, J^T W_d^T r on the LSTM side and r[v_a] f_a on the decoder
    side, hence the token-level EF (:func:`token_empirical_fisher`) at the cost of one outer product per token.

    Args:
        loss: subset loss; its dtype sets the compute precision (results are float64).
        sentences: the n_H sentences.
        chunk_size: sentences per vectorised chunk; token_chunk: tokens per (H, V) x (V, H) product.
        theta: (p,) point of evaluation, default ``loss.theta0``.
        weights: (n,) sample weights w_i, default all ones (retraining uses 0 to remove a sample).
        cache_dir: if given, the running sums are saved after every chunk (:class:`~ifutils.cache.ChunkCache`)
            and a rerun after a kill continues from the last saved chunk, with bit-identical results.
        token_ef: also return the token-level empirical Fisher (with weights w_i / (n T_i)).
    Returns:
        (DenseCurvature "Hessian", DenseCurvature "GGN (true Fisher, closed form)"[, DenseCurvature "EF (token)"]).
    Raises:
        ValueError: no sentences, a sentence too long (``SubsetLoss.max_len``), or ``weights`` not of shape (n,).
        MemoryError: the dense p x p matrices would not fit (:func:`check_dense_fits`).
        FloatingPointError: a result holds NaN/Inf.
    Cost: one forward-over-reverse pass with p_l tangents per sentence; about 200 s for p = 512 and 500 PTB
    sentences on 2 CPU cores in float32 (``benchmarks/exact_hessian.py``).
    """
    lpos, dpos, rows, feats = _decoder_coords(loss)
    theta = loss.theta0 if theta is None else theta
    p, n = len(theta), len(sentences)
    check_dense_fits(p, 4, theta.device)
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"weights must have shape (n,) = ({n},), one per sentence, got {tuple(weights.shape)}")
    weights = torch.ones(n, dtype=theta.dtype, device=theta.device) if weights is None else weights.to(theta)
    W, bias = loss.dense("decoder.weight", theta), loss.dense("decoder.bias", theta)
    hess = torch.zeros(p, p, dtype=torch.float64, device=W.device)
    ggn, ef = torch.zeros_like(hess), torch.zeros_like(hess) if token_ef else None
    theta_l0 = theta[lpos]

    def hidden(theta_l, inputs):
        return loss.logits(theta.index_put((lpos,), theta_l), inputs, return_hidden=True)

    def grad_psi_and_h(theta_l, inputs, u):  # psi = sum_t u_t . h_t(theta_l), u held fixed
        return grad(lambda th: ((u * (h := hidden(th, inputs))).sum(), h), has_aux=True)(theta_l)

    second = vmap(jacfwd(grad_psi_and_h), in_dims=(None, 0, 0))
    cache = loss.cache(
        cache_dir, {"stage": "Hessian and GGN", "chunk_size": chunk_size, "token_chunk": token_chunk, "token_ef": token_ef},
        theta, weights, sentences,
    )
    progress = (cache.get("progress") if cache else None) or {"chunks": 0}
    if progress["chunks"]:
        hess, ggn = progress["hess"].to(hess), progress["ggn"].to(ggn)
        ef = progress["ef"].to(hess) if token_ef else None
    for j, (idx, inputs, targets, mask) in enumerate(loss.batches(sentences, chunk_size, "exact Hessian and GGN")):
        if j < progress["chunks"]:
            continue
        # w_i / T_i at real tokens, 0 at padding
        w = mask.to(W.dtype) * (weights[idx][:, None] / mask.sum(-1, keepdim=True))
        with torch.no_grad():
            h = hidden(theta_l0, inputs)
            probs = torch.softmax(h @ W.T + bias, dim=-1)
            r = probs - torch.nn.functional.one_hot(targets, probs.shape[-1]).to(probs.dtype)
        jac = None
        if len(lpos):
            r_ll, jac = second(theta_l0, inputs, w[..., None] * (r @ W))
            hess[lpos[:, None], lpos] += r_ll.sum(0).double()
            jac = jac[mask]
        g_parts, r_ld = _token_blocks(W, h[mask], probs[mask], r[mask], w[mask], rows, feats, jac, token_chunk)
        for (a, b), block in zip(((lpos, lpos), (lpos, dpos), (dpos, dpos)), g_parts):
            ggn[a[:, None], b] += block
            hess[a[:, None], b] += block
        hess[lpos[:, None], dpos] += r_ld
        if token_ef:
            g = torch.zeros(int(mask.sum()), p, dtype=torch.float64, device=W.device)
            g[:, lpos] = torch.einsum("nhp,nh->np", jac, r[mask] @ W).double() if jac is not None else 0.0
            g[:, dpos] = (r[mask][:, rows] * _features(h[mask], feats)).double()
            ef += (g * w[mask].double()[:, None]).T @ g
        if cache:
            cache.put("progress", {"chunks": j + 1, "hess": hess.cpu(), "ggn": ggn.cpu(),
                                   **({"ef": ef.cpu()} if token_ef else {})})
    for m in (hess, ggn):
        m[dpos[:, None], lpos] = m[lpos[:, None], dpos].T
    out = (DenseCurvature(hess / n, "Hessian"), DenseCurvature(ggn / n, "GGN (true Fisher, closed form)"))
    return out + (DenseCurvature(ef / n, "EF (token)"),) if token_ef else out


def _features(h: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """(N, p_d) input feature f_a = h[k_a] of each decoder coordinate, 1 for a bias (k_a = -1)."""
    return torch.where(feats >= 0, h[:, feats.clamp(min=0)], 1.0)


def _token_blocks(W, h, probs, r, w, rows, feats, jac=None, token_chunk: int = 16):
    """GGN blocks (ll, ld, dd) and R_ld summed over N real tokens, in float64.

    Shapes: h (N, H), probs and r (N, V), w (N,), rows and feats (p_d,), jac (N, H, p_l) or None.
    """
    p_l = 0 if jac is None else jac.shape[-1]
    f = _features(h, feats)
    pv = probs[:, rows]
    q = pv * f
    same_row = rows[:, None] == rows[None, :]
    g_dd = same_row * ((w[:, None] * pv * f).T @ f) - (w[:, None] * q).T @ q
    g_ll = h.new_zeros(p_l, p_l)
    g_ld = h.new_zeros(p_l, len(rows))
    r_ld = h.new_zeros(p_l, len(rows))
    for s in range(0, len(h) if jac is not None else 0, token_chunk):
        sl = slice(s, s + token_chunk)
        jw = jac[sl] * w[sl, None, None]
        m = probs[sl] @ W  # (n, H) = W_d^T p_t
        a = (W.T[None] * probs[sl, None, :]) @ W  # (n, H, H) = W_d^T diag(p_t) W_d
        jm = torch.einsum("nhp,nh->np", jac[sl], m)
        g_ll += jw.flatten(0, 1).T @ (a @ jac[sl]).flatten(0, 1) - (jm * w[sl, None]).T @ jm
        x = (W[rows].T[None] - m[:, :, None]) * q[sl, None, :]  # (n, H, p_d) = W_d^T Lambda E_d diag(f)
        g_ld += torch.einsum("nhp,nha->pa", jw, x)
        coef = w[sl, None] * r[sl][:, rows] * (feats >= 0)  # (n, p_d)
        r_ld += torch.einsum("na,nap->pa", coef, jac[sl][:, feats.clamp(min=0), :])
    return (g_ll.double(), g_ld.double(), g_dd.double()), r_ld.double()
