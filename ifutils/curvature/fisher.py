"""Gradient moments: the empirical Fisher (sentence and token level, dense and low-rank) and the Monte Carlo
true Fisher, on the scale of the Hessian of L(theta) = (1/n) sum_i l_i(theta) (see :mod:`ifutils.curvature.base`
for the notation and formulas)."""

from __future__ import annotations

import os

import torch

from .._checks import check_finite_rows, check_tensor
from ..cache import derive_seed
from ..grads import per_sample_grads
from ..subset import SubsetLoss
from .base import (
    Curvature,
    Damping,
    DenseCurvature,
    _check_finite,
    _describe,
    check_dense_fits,
)


def empirical_fisher(grads: torch.Tensor, lengths: torch.Tensor, name: str = "ef") -> DenseCurvature:
    """Sentence-level empirical Fisher F_emp = (1/n) sum_i T_i g_i g_i^T (module docstring).

    This is Kunstner, Balles, Hennig 2019, eq. 3, with our examples (sentences): g_i T_i is the gradient of
    sentence i's NLL, and the 1/T_i of the mean-token-loss objective puts it on the scale of H and G.

    Args:
        grads: (n, p) per-sample gradients of the mean token NLL (nats/token).
        lengths: (n,) tensor, the number of predicted tokens T_i of each sample (``len(sentence)``, ``<eos>`` included).
    Raises:
        TypeError: ``grads`` is not a torch tensor (a NumPy array: use ``torch.from_numpy``).
        ValueError: ``lengths`` is not a tensor of shape (n,).
        FloatingPointError: a gradient row holds NaN/Inf (the message names the rows of ``grads``, i.e. the samples).
    """
    _check_lengths(grads, lengths)
    check_dense_fits(grads.shape[1], 2, grads.device)
    g = grads.double()
    return DenseCurvature((g * lengths.double().to(g.device)[:, None]).T @ g / len(g), name, psd=True)


def _check_gradient_rows(grads, name: str = "grads") -> None:
    """(n, p) finite gradients, checked before any outer product so that a NaN names its gradient row
    (sample), not the rows of the p x p matrix it would spread over."""
    check_tensor(grads, name)
    if grads.dim() != 2:
        raise ValueError(f"{name} must be (n, p), got shape {tuple(grads.shape)}; use g[None] for one sample")
    check_finite_rows(grads, name, "gradient rows (samples)",
                      "; recompute those samples' gradients (per_sample_grads) or drop them")


def _check_lengths(grads: torch.Tensor, lengths) -> None:
    _check_gradient_rows(grads)
    if not torch.is_tensor(lengths) or lengths.shape != (len(grads),):
        shape = tuple(lengths.shape) if torch.is_tensor(lengths) else type(lengths).__name__
        raise ValueError(f"lengths must be a ({len(grads)},) tensor of token counts, one per gradient row, got {shape}; "
                         f"use torch.tensor([len(s) for s in sentences])")


def token_empirical_fisher(token_grads: torch.Tensor, lengths: torch.Tensor, name: str = "ef_token") -> DenseCurvature:
    """Token-level empirical Fisher F_tok = (1/n) sum_i (1/T_i) sum_t g_it g_it^T.

    Every token is an example: g_it is the gradient of -log p(y_t | y_<t) (nats), as in per-token
    KFAC/EK-FAC implementations for language models (e.g. kronfluence) and curvlinops' ``EFLinearOperator``
    on flattened token outputs. Like the sentence-level EF it equals the GGN in expectation over labels drawn
    from the model; with the real labels the two differ by the cross-token terms g_it g_is^T (t != s).

    Args:
        token_grads: (sum_i T_i, p) per-token gradients, sentences in order (:func:`ifutils.grads.per_token_grads`).
        lengths: (n,) tokens T_i per sentence.
    Raises:
        TypeError: ``token_grads`` is not a torch tensor.
        ValueError: the row count is not sum(lengths).
        FloatingPointError: a token gradient holds NaN/Inf (the message names its rows of ``token_grads``).
    """
    _check_gradient_rows(token_grads, "token_grads")
    if token_grads.shape[0] != int(lengths.sum()):
        raise ValueError(f"{token_grads.shape[0]} token gradients for {int(lengths.sum())} tokens in lengths")
    check_dense_fits(token_grads.shape[1], 2, token_grads.device)
    g = token_grads.double()
    w = torch.repeat_interleave(1.0 / (len(lengths) * lengths.double()), lengths.long()).to(g.device)
    return DenseCurvature((g * w[:, None]).T @ g, name, psd=True)


class LowRankCurvature(Curvature):
    """C = U U^T with U of shape (p, r), r < p: the exact empirical Fisher when n_H < p, with
    U = [sqrt(T_i / n) g_i]_i (the sentence-level EF of :func:`empirical_fisher`).

    Solves use the Woodbury identity, never a p x p matrix (Woodbury 1950; Golub & Van Loan, sec. 2.1.4):
      (U U^T + lambda I)^{-1} v = (1/lambda) (v - U (lambda I_r + U^T U)^{-1} U^T v),   lambda > 0,
    at O(p r^2) cost with an r x r Cholesky factor.

    Args:
        factor: (p, r) float tensor U.
        name: key.
    Attributes:
        psd: True (U U^T is a Gram matrix).
    """

    psd = True

    def __init__(self, factor: torch.Tensor, name: str):
        if factor.dim() != 2:
            raise ValueError(f"{name}: the factor U must be (p, r), got shape {tuple(factor.shape)}")
        _check_finite(name, factor, "(p, r) factor U")
        self.factor = factor.double()
        self.name = name
        self.p = factor.shape[0]

    @classmethod
    def empirical_fisher(cls, grads: torch.Tensor, lengths: torch.Tensor, name: str = "ef_woodbury") -> "LowRankCurvature":
        """The sentence-level EF from (n, p) per-sample gradients and (n,) token counts, as a factor.

        Raises:
            ValueError: ``lengths`` is not a tensor of shape (n,).
            FloatingPointError: a gradient row holds NaN/Inf (named as for :func:`empirical_fisher`).
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
        DenseCurvature named ``"mc_fisher_k<num_samples>"`` (its key, :mod:`ifutils.curvature.labels`).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    lengths = torch.tensor([len(s) for s in sentences], device=loss.theta0.device, dtype=torch.float64)
    total = torch.zeros(len(loss.theta0), len(loss.theta0), dtype=torch.float64, device=loss.theta0.device)
    for draw in range(num_samples):
        g = per_sample_grads(loss, sentences, chunk_size, derive_seed(seed, draw),
                             desc=f"true Fisher draw {draw + 1}/{num_samples}", cache_dir=cache_dir)
        total += empirical_fisher(g, lengths).matrix
    return DenseCurvature(total / num_samples, f"mc_fisher_k{num_samples}", psd=True)


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
