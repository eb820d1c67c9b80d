"""Ground truth by retraining the parameter subset: exact re-solves of the damped objective."""

from __future__ import annotations

import torch

from .curvature import hessian_and_ggn
from .grads import SubsetLoss, per_sample_grads


def objective_gradient(
    loss: SubsetLoss, sentences: list[torch.Tensor], weights: torch.Tensor, theta: torch.Tensor,
    theta_ref: torch.Tensor, damping: float,
) -> torch.Tensor:
    """(p,) gradient of J(theta) = (1/n) sum_i w_i l_i(theta) + (damping/2) ||theta - theta_ref||^2."""
    grads = per_sample_grads(loss, sentences, theta=theta, desc=None)
    return weights.to(grads) @ grads / len(sentences) + damping * (theta - theta_ref)


def newton_solve(
    loss: SubsetLoss,
    sentences: list[torch.Tensor],
    damping: float,
    weights: torch.Tensor | None = None,
    theta_init: torch.Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int = 50,
) -> tuple[torch.Tensor, dict]:
    """Minimise J(theta) = (1/n) sum_i w_i l_i(theta) + (damping/2) ||theta - theta0||^2 over the subset
    by Newton steps with the exact subset Hessian, all other parameters frozen.

    theta0 is ``loss.theta0`` (the trained values); J is strictly convex near theta0 when the
    subset loss is convex (decoder-only subset) or the damping dominates its negative curvature.

    Args:
        loss: subset loss, ideally in float64 so that ``tol`` is reachable.
        sentences: the n training sentences.
        damping: lambda > 0 of the proximal term.
        weights: (n,) sample weights, default ones; 0 removes a sample (leave-one-out).
        theta_init: starting point, default theta0 (warm starts speed up leave-one-out).
        tol: stop when ||grad J||_2 <= tol.
    Returns:
        (theta*, info) with ``info = {"iterations", "grad_norm"}``.
    Raises:
        RuntimeError: ``max_iter`` steps without reaching ``tol`` (the message gives the last norm).
    """
    if not damping > 0:
        raise ValueError(f"damping must be > 0 for a well-posed re-solve, got {damping}")
    n = len(sentences)
    weights = torch.ones(n, dtype=loss.theta0.dtype, device=loss.theta0.device) if weights is None else weights
    theta = (loss.theta0 if theta_init is None else theta_init).clone()
    eye = torch.eye(len(theta), dtype=torch.float64, device=theta.device)
    for iteration in range(max_iter + 1):
        g = objective_gradient(loss, sentences, weights, theta, loss.theta0, damping)
        norm = float(g.norm())
        if norm <= tol:
            return theta, {"iterations": iteration, "grad_norm": norm}
        if iteration == max_iter:
            break
        hess, _ = hessian_and_ggn(loss, sentences, theta=theta, weights=weights)
        step = torch.linalg.solve(hess.matrix + damping * eye, g.double())
        theta = theta - step.to(theta)
    raise RuntimeError(f"Newton did not reach ||grad|| <= {tol:g} in {max_iter} steps (last {norm:.3g})")
