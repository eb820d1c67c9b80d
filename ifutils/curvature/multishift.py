"""Conjugate gradient for every damping at once: one Krylov sequence solves (C + lambda_s I) x_s = b for all s.

The Krylov space K_k(C + lambda I, b) does not depend on lambda, so the CG residuals of the shifted systems are
multiples of the residuals of one base system (Jegerlehner 1996, "Krylov space solvers for shifted linear
systems", hep-lat/9612014, eqs. 2.9-2.14; Frommer 2003 for the same idea in BiCGStab). With the base system
A_0 = C + lambda_0 I (lambda_0 the smallest damping), CG's scalars alpha_k, beta_k, and delta_s = lambda_s - lambda_0:

    zeta^s_{k+1} = zeta^s_k zeta^s_{k-1} alpha_{k-1} /
                   (alpha_k beta_{k-1} (zeta^s_{k-1} - zeta^s_k) + zeta^s_{k-1} alpha_{k-1} (1 + delta_s alpha_k)),
    alpha^s_k = alpha_k zeta^s_{k+1} / zeta^s_k,        x^s_{k+1} = x^s_k + alpha^s_k p^s_k,
    beta^s_k = (zeta^s_{k+1} / zeta^s_k)^2 beta_k,      p^s_{k+1} = zeta^s_{k+1} r_{k+1} + beta^s_k p^s_k,

with zeta^s_{-1} = zeta^s_0 = 1, alpha_{-1} = 1, beta_{-1} = 0; the shifted residual is r^s_k = zeta^s_k r_k, so each
damping's convergence is known without a product. The cost is one product with C per iteration whatever the number
of dampings (plus two vectors per damping); a damping whose residual falls below ``tol`` stops updating. The base
(smallest) damping is the worst conditioned and converges last: the iteration count is that of plain CG at
lambda_0, or ``max_iter``.

C + lambda_0 I must be positive definite (CG's assumption; for the Hessian, lambda_0 above -lambda_min(H)).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence

import torch

from .inverse import MatVec, SolverWarning, _columns

__all__ = ["multishift_cg"]


def multishift_cg(mv: MatVec, b: torch.Tensor, dampings: Sequence[float], tol: float = 1e-4,
                  max_iter: int = 100, check_residual: bool = True) -> tuple[dict[float, torch.Tensor], dict]:
    """Solve (C + lambda I) x = b for every lambda of ``dampings`` from one CG run (module docstring).

    Args:
        mv: C as a matvec, (p,) float64 -> (p,) (:mod:`ifutils.curvature.inverse` convention).
        b: (p,) right-hand side, or (p, m): its columns are solved one after the other.
        dampings: one or more distinct floats > 0 (or >= 0 when C is positive definite).
        tol: a damping stops when its relative residual ||b - (C + lambda I) x|| / ||b|| (from the recursion)
            is below tol.
        max_iter: products with C per column at most, >= 1.
        check_residual: recompute each damping's true relative residual (one product per damping and column).
    Returns:
        ({lambda: x of b's shape, float64}, info) with info per damping (``repr(lambda)``): ``iterations``
        (products until it stopped, per column), ``relative_residual`` (recursive, per column), ``true_residual``
        (per column, or None), ``converged`` (per column); and ``products`` (total products with C, checks
        included), ``seconds``, ``nonpositive_curvature`` (columns where p^T (C + lambda_0 I) p <= 0 was met).
    Raises:
        ValueError: no or repeated dampings, a negative one, tol <= 0, max_iter < 1, b not (p,) or (p, m).
    Warns:
        SolverWarning: a damping missed tol within max_iter, or the base system is not positive definite.
    """
    shifts = [float(d) for d in dampings]
    if not shifts or len(set(shifts)) != len(shifts) or any(not d >= 0 for d in shifts):
        raise ValueError(f"dampings must be one or more distinct floats >= 0, got {list(dampings)}")
    if not tol > 0 or not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"need tol > 0 and an int max_iter >= 1, got tol={tol}, max_iter={max_iter!r}")
    rhs = _columns(b)
    start = time.perf_counter()
    order = sorted(shifts)
    out = {d: torch.zeros_like(rhs) for d in shifts}
    info = {repr(d): {"iterations": [], "relative_residual": [], "true_residual": [], "converged": []} for d in shifts}
    products, nonpositive = 0, []
    for j in range(rhs.shape[1]):
        xs, used, bad = _one_column(mv, rhs[:, j], order, tol, max_iter)
        products += used
        if bad:
            nonpositive.append(j)
        for d in shifts:
            x, iterations, residual = xs[d]
            out[d][:, j] = x
            rec = info[repr(d)]
            rec["iterations"].append(iterations)
            rec["relative_residual"].append(residual)
            rec["converged"].append(residual <= tol)
            if check_residual:
                bj = rhs[:, j]
                true = (mv(x).double() + d * x - bj).norm() / bj.norm().clamp_min(torch.finfo(torch.float64).tiny)
                rec["true_residual"].append(float(true))
                products += 1
            else:
                rec["true_residual"].append(None)
    info.update({"products": products, "seconds": time.perf_counter() - start, "nonpositive_curvature": nonpositive,
                 "base_damping": order[0], "tol": tol, "max_iter": max_iter})
    missed = [d for d in shifts if not all(info[repr(d)]["converged"])]
    if nonpositive:
        warnings.warn(f"multi-shift CG met p^T (C + {order[0]:g} I) p <= 0 in columns {nonpositive[:10]}: the base "
                      f"system is not positive definite; raise the smallest damping above -lambda_min(C)",
                      SolverWarning, stacklevel=2)
    if missed:
        warnings.warn(f"multi-shift CG: dampings {missed} did not reach relative residual {tol:g} within "
                      f"max_iter={max_iter} products; raise max_iter or drop the smallest dampings",
                      SolverWarning, stacklevel=2)
    return {d: x.reshape(b.shape) for d, x in out.items()}, info


def _one_column(mv: MatVec, b: torch.Tensor, shifts: list[float], tol: float, max_iter: int):
    """The recursion of the module docstring for one column; shifts sorted ascending, shifts[0] the base."""
    s0 = shifts[0]
    bnorm = float(b.norm())
    if bnorm == 0:
        return {d: (torch.zeros_like(b), 0, 0.0) for d in shifts}, 0, False
    r, p = b.clone(), b.clone()
    rr = float(r @ r)
    xs = {d: torch.zeros_like(b) for d in shifts}
    ps = {d: b.clone() for d in shifts}
    zeta = {d: 1.0 for d in shifts}
    zeta_prev = {d: 1.0 for d in shifts}
    done = {d: None for d in shifts}  # (iterations, residual) once stopped
    a_prev, beta_prev, used, bad = 1.0, 0.0, 0, False
    while used < max_iter and any(v is None for v in done.values()):
        ap = mv(p).double() + s0 * p
        used += 1
        pap = float(p @ ap)
        if pap <= 0:
            bad = True
            break
        a = rr / pap
        r = r - a * ap
        rr_new = float(r @ r)
        beta = rr_new / rr
        for d in shifts:
            if done[d] is not None:
                continue
            delta = d - s0
            denom = a * beta_prev * (zeta_prev[d] - zeta[d]) + zeta_prev[d] * a_prev * (1 + delta * a)
            z_new = zeta[d] * zeta_prev[d] * a_prev / denom
            a_s = a * z_new / zeta[d]
            xs[d] += a_s * ps[d]
            ps[d] = z_new * r + (z_new / zeta[d]) ** 2 * beta * ps[d]
            zeta_prev[d], zeta[d] = zeta[d], z_new
            residual = abs(z_new) * math.sqrt(rr_new) / bnorm
            if residual <= tol:
                done[d] = (used, residual)
        p = r + beta * p
        rr, a_prev, beta_prev = rr_new, a, beta
    for d in shifts:
        if done[d] is None:
            done[d] = (used, abs(zeta[d]) * math.sqrt(rr) / bnorm)
    return {d: (xs[d], *done[d]) for d in shifts}, used, bad
