"""The Newton removal step: exact retraining of a convex quadratic (ridge regression, closed-form optimum)."""

import pytest
import torch

from ifutils.curvature.base import DenseCurvature, IdentityCurvature
from ifutils.influence import newton_removal


def _ridge(x, y, keep, reg, n):
    """argmin (1/n) sum_{i in keep} (x_i^T w - y_i)^2 / 2 + reg / 2 ||w||^2, the normal equations."""
    xk, yk = x[keep], y[keep]
    return torch.linalg.solve(xk.T @ xk / n + reg * torch.eye(x.shape[1], dtype=x.dtype), xk.T @ yk / n)


def test_one_newton_step_with_the_remaining_hessian_equals_exact_retraining():
    g = torch.Generator().manual_seed(0)
    n, p, reg = 60, 5, 0.1
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x @ torch.randn(p, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    w = _ridge(x, y, torch.arange(n), reg, n)
    removed = torch.tensor([3, 17, 40, 41])
    keep = torch.tensor([i for i in range(n) if i not in set(removed.tolist())])
    grads = x * (x @ w - y)[:, None]  # per-sample gradients of (x^T w - y)^2 / 2
    remaining = x[keep].T @ x[keep] / n  # Hessian of the data part of L without S; the ridge term is the damping
    step = newton_removal(w, grads[removed].sum(0), n, DenseCurvature(remaining, "hessian", psd=True), reg)
    exact = _ridge(x, y, keep, reg, n)
    assert (step - exact).abs().max() < 1e-6 and (step - exact).norm() / exact.norm() < 1e-10
    # with the full-data Hessian it is only the first-order (influence) approximation: close, not exact
    full = newton_removal(w, grads[removed].sum(0), n, DenseCurvature(x.T @ x / n, "hessian", psd=True), reg)
    assert 1e-8 < (full - exact).norm() / (exact - w).norm() < 0.5
    with pytest.raises(ValueError, match="same"):
        newton_removal(w, grads[removed].sum(0)[:-1], n, IdentityCurvature(p), reg)
