"""Inverse-Hessian-vector products without forming the matrix.

Every solver here approximates x = (C + damping I)^{-1} b for a symmetric p x p curvature C that is
known only through products ``mv(v) = C v``:

* :func:`hvp_operator`: the exact Hessian-vector product of the training objective (the operator itself);
* :func:`conjugate_gradient`: Krylov solve, exact in at most p steps in exact arithmetic;
* :func:`lissa`: the truncated Neumann series of Agarwal et al. 2017 / Koh & Liang 2017;
* :func:`arnoldi` and :func:`arnoldi_solve`: a rank-k eigen-approximation (Schioppa et al. 2022);
* :func:`datainf`: closed-form per-sample inverses averaged (Kwon et al. 2024), for the empirical Fisher.

:class:`OperatorCurvature`, :class:`ArnoldiCurvature` and :class:`DataInfCurvature` wrap them as
:class:`~ifutils.curvature.Curvature` objects, so :func:`ifutils.influence.influence` takes them unchanged.

Conventions: ``mv`` accepts a (p,) or (p, m) float64 tensor and returns C v of the same shape; ``b`` is
(p,) or (p, m) and its m columns are solved together. Solvers return ``(x, info)``: x float64 of b's shape,
info a dict of diagnostics. An iteration that misses its tolerance warns with :class:`SolverWarning`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable

import torch
from torch.func import grad, jvp, vmap

from ..cache import derive_seed
from ..progress import progress
from ..subset import SubsetLoss
from .base import Curvature, Damping, _check_invertible, _describe
from .estimators import hutchinson, rademacher
from .fisher import LowRankCurvature

MatVec = Callable[[torch.Tensor], torch.Tensor]
"""v -> C v for v of shape (p,) or (p, m), float64 in and out."""

HUTCHINSON_PROBES = 32
"""Rademacher probes of :func:`~ifutils.curvature.estimators.hutchinson` by default: relative standard error
sqrt(2 (||C||_F^2 - sum_a C_aa^2) / k) / tr(C), a few percent for a diagonally dominant C."""


class SolverWarning(RuntimeWarning):
    """An iterative solver or eigen-solver stopped short of its tolerance; its result is inaccurate."""


def _columns(b: torch.Tensor) -> torch.Tensor:
    """b as a (p, m) float64 matrix of right-hand sides.

    Raises:
        ValueError: b is not 1-D or 2-D. FloatingPointError: b holds NaN or Inf.
    """
    if b.dim() not in (1, 2):
        raise ValueError(f"right-hand side must be (p,) or (p, m), got shape {tuple(b.shape)}")
    if not torch.isfinite(b).all():
        raise FloatingPointError("right-hand side holds NaN/Inf; check the gradients it came from")
    b = b.double()
    return b[:, None] if b.dim() == 1 else b


def _damped(mv: MatVec, damping: Damping, p: int) -> MatVec:
    """v -> (C + D) v for (p, m) v, D = damping I, or D = diag(damping) for a (p,) tensor.

    Raises:
        ValueError: a negative damping, or a damping tensor that is not (p,).
    """
    if torch.is_tensor(damping) and damping.dim() > 0:
        if damping.shape != (p,) or not (damping >= 0).all():
            raise ValueError(f"a per-coordinate damping must be a ({p},) tensor >= 0, got shape "
                             f"{tuple(damping.shape)} with minimum {damping.min().item():g}")
        diag = damping.double()[:, None]
        return lambda v: mv(v).double() + diag.to(v.device) * v
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    damping = float(damping)
    return lambda v: mv(v).double() + damping * v


def _scalar_damping(damping: Damping, method: str) -> float:
    """damping as a float; ValueError for a per-coordinate damping, which ``method`` cannot use."""
    if torch.is_tensor(damping) and damping.numel() != 1:
        raise ValueError(f"{method} needs a scalar damping (its closed form assumes C + damping I), got a tensor "
                         f"of shape {tuple(damping.shape)}; use the conjugate gradient or LiSSA for a diagonal damping")
    damping = float(damping)
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    return damping


def hvp_operator(
    loss: SubsetLoss,
    sentences: list[torch.Tensor],
    chunk_size: int = 8,
    theta: torch.Tensor | None = None,
    desc: str | None = None,
) -> MatVec:
    """Exact Hessian-vector products of the training objective, the naive way.

    H v = d/de grad L(theta + e v) at e = 0 with L(theta) = (1/n) sum_i l_i(theta), l_i the mean token NLL
    of sentence i (nats/token): forward-mode over reverse-mode, ``jvp(grad(L))`` (Pearlmutter 1994, "Fast
    exact multiplication by the Hessian", the R-operator), vmapped over the columns of a (p, m) input and summed
    over length-bucketed chunks. Every column re-runs the V-way softmax: m columns cost about m gradient
    passes, against the structured :func:`ifutils.curvature.hessian_and_ggn` that forms H directly.

    Args:
        loss: subset loss; its dtype sets the compute precision.
        sentences: the n sentences of L.
        chunk_size: sentences per vectorised chunk; memory grows with chunk_size * m.
        theta: (p,) point of evaluation, default ``loss.theta0``.
        desc: progress-bar label of each product (None: no bar).
    Returns:
        mv: (p,) or (p, m) tensor -> H v of the same shape, float64, on ``loss``'s device.
    Raises:
        ValueError: here, for an empty or over-long sentence (see :meth:`SubsetLoss.batches`); from ``mv``,
            for an input that is not (p,) or (p, m).
    """
    theta = (loss.theta0 if theta is None else theta).detach()
    chunks = list(loss.batches(sentences, chunk_size))  # batched (and validated) once, reused by every product
    n, p = len(sentences), len(theta)

    def column(inputs, targets, mask, v):
        def chunk_loss(th):
            return loss.loss(th, inputs, targets, mask).sum()

        return jvp(grad(chunk_loss), (theta,), (v,))[1]

    columns = vmap(column, in_dims=(None, None, None, 1), out_dims=1)

    def mv(v: torch.Tensor) -> torch.Tensor:
        if v.dim() not in (1, 2) or v.shape[0] != p:
            raise ValueError(f"Hessian-vector product needs a ({p},) or ({p}, m) input, got shape {tuple(v.shape)}")
        block = (v[:, None] if v.dim() == 1 else v).to(theta)
        out = torch.zeros(block.shape, dtype=torch.float64, device=theta.device)
        for _, inputs, targets, mask in progress(chunks, desc=desc, unit="chunk", leave=False, disable=desc is None):
            out += columns(inputs, targets, mask, block).double()
        return (out / n).reshape(v.shape)

    return mv


def conjugate_gradient(
    mv: MatVec, b: torch.Tensor, damping: Damping, tol: float = 1e-10, max_iter: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Solve (C + damping I) x = b by the conjugate gradient method, all columns of b at once.

    From x_0 = 0, r_0 = d_0 = b (Hestenes & Stiefel 1952, eqs. 3:1a-f; Nocedal & Wright 2006, Alg. 5.2):
      alpha_k = r_k^T r_k / d_k^T A d_k,   x_{k+1} = x_k + alpha_k d_k,   r_{k+1} = r_k - alpha_k A d_k,
      beta_k = r_{k+1}^T r_{k+1} / r_k^T r_k,   d_{k+1} = r_{k+1} + beta_k d_k,
    with A = C + damping I and per-column scalars; a column stops once ||r_k|| <= tol ||b||, and later
    products only involve the columns still running. Martens 2010 ("Deep learning via Hessian-free
    optimization", sec. 4) uses CG for Newton steps on curvature-vector products, as here.

    CG assumes A positive definite. When d_k^T A d_k <= 0 is met it warns and carries on (unlike
    truncated Newton, which stops there): the target stays the exact solve that
    :class:`~ifutils.curvature.DenseCurvature` gives for an indefinite damped Hessian, which CG (a Lanczos
    method) still reaches for a non-singular A in exact arithmetic, but without any guarantee; the residual
    check reports the outcome. A column with d_k^T A d_k = 0 exactly cannot continue and stops.

    Args:
        mv: C as a matvec (module docstring).
        b: (p,) or (p, m) right-hand sides.
        damping: float >= 0, or a (p,) tensor >= 0 used as a diagonal (mv(x) + damping * x).
        tol: relative residual ||b - A x|| / ||b|| at which a column stops.
        max_iter: products with A per column, default 10 p (rounding can need more than the p steps of exact
            arithmetic).
    Returns:
        x of b's shape (float64), and info: ``iterations`` (int), ``relative_residual`` (per-column list, from the
        recursively updated residual), ``converged`` (per-column list of bool), ``nonpositive_curvature``
        (columns where d^T A d <= 0 was met).
    Raises:
        ValueError: negative damping, a damping tensor not (p,), ``max_iter < 1``, b not 1-D or 2-D.
    Warns:
        SolverWarning: a column misses ``tol`` within ``max_iter``, or non-positive curvature was met.
    """
    rhs = _columns(b)
    p, m = rhs.shape
    apply = _damped(mv, damping, p)
    max_iter = 10 * p if max_iter is None else max_iter
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    x, r, d = torch.zeros_like(rhs), rhs.clone(), rhs.clone()
    bnorm2 = (rhs * rhs).sum(0)
    rs, target = bnorm2.clone(), tol**2 * bnorm2
    active = rs > target  # a zero column is solved by x = 0
    nonpositive = torch.zeros(m, dtype=torch.bool, device=rhs.device)
    iterations = 0
    while active.any() and iterations < max_iter:
        cols = active.nonzero().flatten()
        dc = d[:, cols]
        ad = apply(dc)
        dad = (dc * ad).sum(0)
        nonpositive[cols] |= dad <= 0
        alpha = torch.where(dad == 0, 0.0, rs[cols] / dad)
        x[:, cols] += alpha * dc
        r[:, cols] -= alpha * ad
        rs_new = (r[:, cols] ** 2).sum(0)
        d[:, cols] = r[:, cols] + (rs_new / rs[cols]) * dc
        rs[cols] = rs_new
        active[cols] = (rs_new > target[cols]) & (dad != 0)
        iterations += 1
    relative = torch.where(bnorm2 > 0, (rs / bnorm2).sqrt(), 0.0)
    converged = relative <= tol
    info = {"iterations": iterations, "relative_residual": relative.tolist(), "converged": converged.tolist(),
            "nonpositive_curvature": nonpositive.nonzero().flatten().tolist()}
    if nonpositive.any():
        warnings.warn(
            f"conjugate gradient met d^T (C + {_describe(damping)} I) d <= 0 in columns "
            f"{info['nonpositive_curvature'][:10]}: the damped operator is not positive definite, so CG has no "
            f"convergence guarantee; raise the damping above the most negative eigenvalue's magnitude or use a "
            f"positive semi-definite curvature (GGN, Fisher)",
            SolverWarning, stacklevel=2,
        )
    if not converged.all():
        warnings.warn(
            f"conjugate gradient did not reach relative residual {tol:g} in {iterations} iterations "
            f"(worst {relative.max().item():.3g}, {int((~converged).sum())} of {m} columns); raise max_iter, raise the "
            f"damping (better conditioning) or loosen tol", SolverWarning, stacklevel=2,
        )
    return x.reshape(b.shape), info


def lissa(
    mv: MatVec,
    b: torch.Tensor,
    damping: Damping,
    scale: float,
    depth: int,
    repeats: int = 1,
    tol: float = 1e-6,
    sample_mv: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, dict]:
    """LiSSA: (C + damping I)^{-1} b by a truncated Neumann series.

    With A = C + damping I (Agarwal, Bullins & Hazan 2017, "Second-order stochastic optimization for machine
    learning in linear time", the LiSSA estimator; in the form of Koh & Liang 2017, sec. 3):
      x_0 = b,   x_{j+1} = b + (I - A / scale) x_j,   result x_depth / scale,
    so x_j / scale = sum_{k<=j} (I - A/scale)^k b / scale -> A^{-1} b. The series converges iff every eigenvalue
    of A lies in (0, 2 scale); scale >= lambda_max(A) is the safe choice, and the error then shrinks by a factor
    (1 - lambda_min(A) / scale) per step. Koh & Liang replace A at every step by a mini-batch estimate (here
    ``sample_mv``) and average ``repeats`` independent runs.

    Args:
        mv: C as a matvec; used at every step unless ``sample_mv`` is given.
        b: (p,) or (p, m) right-hand sides.
        damping: float >= 0, or a (p,) tensor >= 0 used as a diagonal.
        scale: float > 0, the step divisor (the "scale" of Koh & Liang).
        depth: int >= 1, recursion steps.
        repeats: independent runs averaged. With the deterministic ``mv`` they are identical, so one is run.
        tol: the last update ||x_depth - x_{depth-1}|| relative to ||x_depth|| above which a column counts as not
            converged. A stochastic ``sample_mv`` keeps updates at its noise level: set tol above it.
        sample_mv: optional (v, generator) -> C_j v, an unbiased stochastic estimate of C v (e.g. on a random
            mini-batch), drawn afresh at each step; repeat r uses a generator seeded by ``derive_seed(seed, r)``.
        seed: seed of the repeats' generators.
    Returns:
        x of b's shape (float64), and info: ``depth`` (steps run; fewer when stopped for divergence), ``repeats``
        (runs averaged), ``relative_update`` (per-column last relative update, worst over runs),
        ``update_growth`` (per column, last update norm / first update norm, worst over runs), ``diverged``.
    Raises:
        ValueError: scale <= 0, depth or repeats < 1, a negative damping.
    Warns:
        SolverWarning: the update norm grew (divergence: scale too small, or A not positive definite), or the
        last update is above ``tol`` (not converged within ``depth``).
    """
    rhs = _columns(b)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    if depth < 1 or repeats < 1:
        raise ValueError(f"depth and repeats must be >= 1, got depth={depth}, repeats={repeats}")
    runs = repeats if sample_mv is not None else 1
    total, steps, relative, growth = torch.zeros_like(rhs), depth, [], []
    for run in range(runs):
        step = mv if sample_mv is None else _seeded(sample_mv, derive_seed(seed, run))
        x, run_steps, run_relative, run_growth = _neumann(_damped(step, damping, rhs.shape[0]), rhs, scale, depth)
        total += x
        steps = min(steps, run_steps)
        relative.append(run_relative)
        growth.append(run_growth)
    relative, growth = torch.stack(relative).amax(0), torch.stack(growth).amax(0)
    diverged = bool((growth > 1).any())
    info = {"depth": steps, "repeats": runs, "relative_update": relative.tolist(), "update_growth": growth.tolist(),
            "diverged": diverged}
    if diverged:
        warnings.warn(
            f"LiSSA diverged: the update norm grew by a factor {growth.max().item():.3g} over {steps} steps; scale="
            f"{scale:g} must exceed half the largest eigenvalue of C + damping I (take scale >= lambda_max, e.g. from "
            f"arnoldi), and C + damping I must be positive definite", SolverWarning, stacklevel=2,
        )
    elif (relative > tol).any():
        warnings.warn(
            f"LiSSA did not converge in depth={depth}: last update {relative.max().item():.3g} of the iterate > "
            f"tol={tol:g}; raise depth (steps needed grow like scale / lambda_min(C + damping I)) or lower scale "
            f"towards lambda_max", SolverWarning, stacklevel=2,
        )
    return (total / (runs * scale)).reshape(b.shape), info


def _seeded(sample_mv: Callable[[torch.Tensor, torch.Generator], torch.Tensor], seed: int) -> MatVec:
    """v -> sample_mv(v, generator) with one generator, seeded by ``seed``, drawn from at every call."""
    generator = torch.Generator().manual_seed(seed)
    return lambda v: sample_mv(v, generator)


def _neumann(apply: MatVec, rhs: torch.Tensor, scale: float, depth: int, blowup: float = 1e8):
    """One LiSSA run: (x_depth, steps, last relative update (m,), last / first update norm (m,)).

    The update x_{j+1} - x_j = b - A x_j / scale is the scaled residual. It stops early once an update is
    ``blowup`` times the first (or not finite): a divergent run, stopped before it overflows.
    """
    x, first = rhs.clone(), None
    for step in range(1, depth + 1):
        update = rhs - apply(x) / scale
        x = x + update
        norm = update.norm(dim=0)
        first = norm if first is None else first
        growth = torch.where(first > 0, norm / first, 0.0)
        if not (torch.isfinite(growth).all() and growth.max() < blowup):
            growth = torch.where(torch.isfinite(growth), growth, math.inf)
            break
    relative = torch.where(norm > 0, norm / x.norm(dim=0), 0.0)
    return x, step, relative, growth


def arnoldi(
    mv: MatVec, p: int, rank: int, num_iter: int | None = None, seed: int = 0, tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The ``rank`` eigenpairs of C of largest |eigenvalue|, by the Arnoldi iteration.

    Schioppa, Zablotskaia, Vilar & Sokolov 2022 ("Scaling up influence functions", Alg. 1): from a seeded
    random unit q_1, for j = 1..n: w = C q_j, h_{ij} = q_i^T w and w -= h_{ij} q_i for i <= j (here classical
    Gram-Schmidt applied twice, full re-orthogonalisation), h_{j+1,j} = ||w||, q_{j+1} = w / h_{j+1,j}. Then
    H_n = Q_n^T C Q_n (n x n) is eigen-decomposed, H_n = Y diag(e) Y^T, and the Ritz pairs (e_k, Q_n y_k) of the
    ``rank`` largest |e_k| are kept. C symmetric makes H_n symmetric tridiagonal up to rounding, so it is
    symmetrised and solved by ``eigh`` (real pairs). When the Krylov space closes (h_{j+1,j} ~ 0, e.g. C of rank
    < n) the iteration continues from a fresh random vector orthogonal to Q (h_{j+1,j} = 0), so later pairs come
    from the rest of the space.

    Each kept pair is checked with one more product: its Ritz residual ||C q - e q|| relative to the largest
    |e|; above ``tol`` it has not converged (eigenvalues near the top of a clustered spectrum need n >> rank).

    Args:
        mv: C as a matvec, called on (p,) vectors, and once on (p, rank) for the check.
        p: dimension of C. rank: pairs kept, 1 <= rank <= num_iter.
        num_iter: n, Krylov dimension, rank <= n <= p; default min(p, 2 rank).
        seed: seed of the start vector (drawn on the CPU, so the same on any device).
        tol: largest accepted relative Ritz residual.
    Returns:
        evals (rank,) float64 in decreasing |e|, evecs (p, rank) float64 orthonormal columns, and info:
        ``iterations``, ``restarts`` (Krylov spaces closed), ``ritz_residual`` (per pair, relative), ``tol``.
    Raises:
        ValueError: rank or num_iter out of range (the message gives the valid range).
    Warns:
        SolverWarning: a kept pair's relative Ritz residual exceeds ``tol``.
    """
    num_iter = min(p, 2 * rank) if num_iter is None else num_iter
    if not 1 <= rank <= num_iter <= p:
        raise ValueError(f"need 1 <= rank <= num_iter <= p, got rank={rank}, num_iter={num_iter}, p={p}; "
                         f"rank pairs need at least rank Arnoldi iterations")
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(p, generator=generator, dtype=torch.float64)
    start /= start.norm()
    w = mv(start).double()
    Q = torch.zeros(p, num_iter, dtype=torch.float64, device=w.device)  # vectors live where mv puts its results
    H = torch.zeros(num_iter, num_iter, dtype=torch.float64, device=w.device)
    Q[:, 0] = start.to(w.device)
    restarts = 0
    for j in range(num_iter):
        w = w if j == 0 else mv(Q[:, j]).double()
        w = _orthogonalise(w, Q[:, : j + 1], H[: j + 1, j])
        if j + 1 == num_iter:
            break
        h = w.norm()
        if h <= 1e-12 * H.abs().max():  # the Krylov space is invariant: restart in its complement
            restarts += 1
            w = _orthogonalise(torch.randn(p, generator=generator, dtype=torch.float64).to(w.device), Q[:, : j + 1])
        else:
            H[j + 1, j] = h
        Q[:, j + 1] = w / w.norm()
    evals, vecs = torch.linalg.eigh((H + H.T) / 2)
    keep = evals.abs().argsort(descending=True)[:rank]
    evals, evecs = evals[keep], Q @ vecs[:, keep]
    spectral_scale = evals.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    residual = (mv(evecs).double() - evecs * evals).norm(dim=0) / spectral_scale
    info = {"iterations": num_iter, "restarts": restarts, "ritz_residual": residual.tolist(), "tol": tol}
    if (residual > tol).any():
        warnings.warn(
            f"Arnoldi: {int((residual > tol).sum())} of the {rank} kept Ritz pairs are unresolved (||C q - e q|| up to "
            f"{residual.max().item():.3g} x the largest |eigenvalue|, tol {tol:g}) after num_iter={num_iter}; raise "
            f"num_iter or lower rank", SolverWarning, stacklevel=2,
        )
    return evals, evecs, info


def _orthogonalise(w: torch.Tensor, Q: torch.Tensor, coefficients: torch.Tensor | None = None) -> torch.Tensor:
    """w minus its projection on the orthonormal columns of Q, by classical Gram-Schmidt twice ("twice is
    enough": Giraud, Langou, Rozloznik 2005); the projection coefficients are added to ``coefficients``."""
    for _ in range(2):
        c = Q.T @ w
        w = w - Q @ c
        if coefficients is not None:
            coefficients += c
    return w


def arnoldi_solve(
    evals: torch.Tensor, evecs: torch.Tensor, b: torch.Tensor, damping: float, complement: bool = True,
) -> tuple[torch.Tensor, dict]:
    """(C + damping I)^{-1} b for C approximated by its Ritz pairs, C ~ Q diag(e) Q^T.

      x = Q diag(1 / (e + damping)) Q^T b  +  [complement] (1 / damping) (I - Q Q^T) b.

    The second term is the exact inverse on the orthogonal complement of Q, where the approximation takes C
    to be zero; with it x is exact when C has rank ``rank``. Schioppa et al. 2022 keep only the first term
    (gradients projected onto the Ritz vectors, Alg. 1's output): ``complement=False`` reproduces it.

    Args:
        evals: (k,) Ritz values; evecs: (p, k) orthonormal Ritz vectors (from :func:`arnoldi`).
        b: (p,) or (p, m) right-hand sides.
        damping: float >= 0; > 0 when ``complement``.
    Returns:
        x of b's shape (float64), and info: ``outside_fraction`` (per column, ||(I - Q Q^T) b|| / ||b||, the part
        of b the rank-k model treats as zero curvature).
    Raises:
        ValueError: a tensor damping, damping < 0, damping == 0 with ``complement``, a shape mismatch, or
            e + damping = 0 (singular).
    """
    damping = _scalar_damping(damping, "arnoldi_solve")
    rhs = _columns(b)
    if evecs.dim() != 2 or evecs.shape[0] != rhs.shape[0] or evals.shape != (evecs.shape[1],):
        raise ValueError(f"evals {tuple(evals.shape)}, evecs {tuple(evecs.shape)} and b {tuple(b.shape)} disagree; "
                         f"expected (k,), (p, k) and (p,) or (p, m)")
    if complement and damping == 0:
        raise ValueError("complement=True divides by the damping (C is zero outside the Ritz vectors); "
                         "use damping > 0 or complement=False")
    shifted = evals.double() + damping
    _check_invertible("Arnoldi approximation", shifted, damping)
    Q = evecs.double()
    coef = Q.T @ rhs
    outside = rhs - Q @ coef
    x = Q @ (coef / shifted[:, None]) + (outside / damping if complement else 0)
    fraction = torch.where(rhs.norm(dim=0) > 0, outside.norm(dim=0) / rhs.norm(dim=0), 0.0)
    return x.reshape(b.shape), {"outside_fraction": fraction.tolist()}


def datainf(
    grads: torch.Tensor, b: torch.Tensor, damping: float, weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """DataInf: (F + damping I)^{-1} b with inverse and mean swapped, F = (1/n) sum_i w_i g_i g_i^T.

    Kwon, Wu, Wu & Zou 2024 ("DataInf", ICLR, eq. 5):
      (F + damping I)^{-1} b  ~  (1/n) sum_i (u_i u_i^T + damping I)^{-1} b
                              =  (1/damping) (b - (1/n) sum_i u_i (u_i^T b) / (damping + ||u_i||^2)),
    u_i = sqrt(w_i) g_i, each term by Sherman-Morrison. For the empirical Fisher of this project, w_i = T_i
    (:func:`ifutils.curvature.empirical_fisher`). Exact for n = 1; the two sides agree to first order in
    ||u_i||^2 / damping and part as that ratio grows.

    Args:
        grads: (n, p) per-sample gradients g_i (nats/token per parameter unit).
        b: (p,) or (p, m) right-hand sides.
        damping: float > 0.
        weights: (n,) w_i >= 0, default all ones.
    Returns:
        x of b's shape (float64), and info: ``n``, ``max_norm_ratio`` (max_i ||u_i||^2 / damping).
    Raises:
        ValueError: a tensor or non-positive damping, negative weights, or shapes that disagree.
    """
    damping = _scalar_damping(damping, "DataInf")
    if damping <= 0:
        raise ValueError("DataInf needs damping > 0: each per-sample term u u^T + damping I is singular otherwise")
    rhs, u = _columns(b), _weighted(grads, weights)
    if u.shape[1] != rhs.shape[0]:
        raise ValueError(f"gradients have p={u.shape[1]} but b has {rhs.shape[0]} rows")
    sq = (u * u).sum(1)
    coef = (u @ rhs) / (damping + sq)[:, None]  # (n, m): u_i^T b / (damping + ||u_i||^2)
    x = (rhs - u.T @ coef / len(u)) / damping
    return x.reshape(b.shape), {"n": len(u), "max_norm_ratio": float(sq.max() / damping)}


def _weighted(grads: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(n, p) float64 u_i = sqrt(w_i) g_i. Raises ValueError for bad shapes or negative weights."""
    if grads.dim() != 2:
        raise ValueError(f"grads must be (n, p), got shape {tuple(grads.shape)}")
    g = grads.double()
    if weights is None:
        return g
    if weights.shape != (len(g),) or not (weights >= 0).all():
        raise ValueError(f"weights must be ({len(g)},) and >= 0, got shape {tuple(weights.shape)}")
    return g * weights.double().sqrt()[:, None]


class OperatorCurvature(Curvature):
    """A curvature known only through products C v; ``solve`` runs CG or LiSSA.

    Args:
        mv: C as a matvec (e.g. :func:`hvp_operator`).
        p: dimension. name: its key (:mod:`ifutils.curvature.labels`).
        method: ``"cg"`` (:func:`conjugate_gradient`) or ``"lissa"`` (:func:`lissa`; needs ``scale`` and ``depth``).
        trace: tr(C) if known; otherwise :meth:`mean_eigenvalue` estimates it by :func:`~ifutils.curvature.estimators.hutchinson`
            with ``probes`` probes seeded by ``probe_seed`` (once, then cached).
        **solver_options: keyword arguments of the solver (tol, max_iter, scale, depth, ...). An option given
            as a callable is evaluated at each solve's damping, e.g. LiSSA's ``scale``, which must exceed the
            largest eigenvalue of C + damping I: ``scale=lambda d: 1.1 * (top + d)``.
    Attributes:
        last_info: the ``info`` dict of the last solve.
    Raises:
        ValueError: unknown method. TypeError: options the solver does not take, or required ones missing.
    """

    def __init__(self, mv: MatVec, p: int, name: str, method: str = "cg", trace: float | None = None,
                 probes: int = HUTCHINSON_PROBES, probe_seed: int = 0, **solver_options):
        solvers = {"cg": conjugate_gradient, "lissa": lissa}
        if method not in solvers:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(solvers)}")
        try:
            inspect.signature(solvers[method]).bind(mv, None, 0.0, **solver_options)
        except TypeError as err:
            raise TypeError(f"{name}: options {sorted(solver_options)} do not fit method {method!r}: {err}") from err
        self.mv, self.p, self.name, self.method = mv, p, name, method
        self._solver, self._options = solvers[method], solver_options
        self._trace, self._probes, self._probe_seed = trace, probes, probe_seed
        self.last_info: dict = {}

    @property
    def nbytes(self) -> int:
        """0: no matrix is held (the operator's own data, e.g. the sentences, is not counted)."""
        return 0

    def eigvalsh(self) -> torch.Tensor:
        raise NotImplementedError(
            f"{self.name} is a matrix-free operator; form the matrix first, e.g. "
            f"DenseCurvature(mv(torch.eye(p)), name), or use ArnoldiCurvature for its top eigenvalues"
        )

    def mean_eigenvalue(self) -> float:
        """tr(C) / p: from ``trace`` if given, else a Hutchinson estimate (class docstring)."""
        if self._trace is None:
            self._trace = hutchinson(self.mv, rademacher(self._probes, self.p, self._probe_seed), block=8)["trace"]
        return self._trace / self.p

    def solve(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        """(C + diag(damping))^{-1} v by the solver; a (p,) damping tensor is used as a diagonal.

        Warns:
            SolverWarning: the solver missed its tolerance (:func:`conjugate_gradient`, :func:`lissa`).
        """
        v, damping = self._check(v, damping)
        options = {k: opt(damping) if callable(opt) else opt for k, opt in self._options.items()}
        x, self.last_info = self._solver(self.mv, v, damping, **options)
        return x


class ArnoldiCurvature(Curvature):
    """C replaced by its top-|eigenvalue| Ritz pairs, computed once at construction by :func:`arnoldi`.

    Args:
        mv: C as a matvec. p: dimension. rank: Ritz pairs kept.
        complement: passed to :func:`arnoldi_solve` (True: exact for C of rank ``rank``; False: Schioppa et al.).
        name: key, default ``"arnoldi_r<rank>"`` (``"arnoldi_r<rank>_complement"`` with ``complement``). num_iter, seed, tol: passed to :func:`arnoldi` (``num_iter``
            defaults to min(p, 2 rank) iterations; raise it when pairs are reported unresolved).
        trace: tr(C) if known, so that relative damping uses the operator's own scale trace(C) / p instead of
            the sum of the kept Ritz values / p (which depends on the rank).
    Attributes:
        evals (rank,), evecs (p, rank), info: the result of :func:`arnoldi`.
    """

    def __init__(self, mv: MatVec, p: int, rank: int, complement: bool = True, name: str | None = None,
                 num_iter: int | None = None, seed: int = 0, tol: float = 1e-6, trace: float | None = None):
        self.evals, self.evecs, self.info = arnoldi(mv, p, rank, num_iter, seed, tol)
        self.p, self.complement, self._trace = p, complement, trace
        self.name = name or f"arnoldi_r{rank}" + ("_complement" if complement else "")

    def mean_eigenvalue(self) -> float:
        """trace / p when ``trace`` was given, else the mean of :meth:`eigvalsh` (Ritz values and zeros)."""
        return self._trace / self.p if self._trace is not None else super().mean_eigenvalue()

    @property
    def nbytes(self) -> int:
        return (self.evals.numel() + self.evecs.numel()) * self.evecs.element_size()

    def eigvalsh(self) -> torch.Tensor:
        """The Ritz values and p - rank zeros (the approximation's spectrum), ascending."""
        return torch.cat([self.evals, self.evals.new_zeros(self.p - len(self.evals))]).sort().values

    def solve(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        """:func:`arnoldi_solve`. Raises ValueError for a per-coordinate (tensor) damping."""
        v, damping = self._check(v, damping, self.evecs.device)
        return arnoldi_solve(self.evals, self.evecs, v, damping, self.complement)[0]


class DataInfCurvature(LowRankCurvature):
    """The sentence-level empirical Fisher F = (1/n) sum_i w_i g_i g_i^T held as the factor of
    :class:`~ifutils.curvature.LowRankCurvature` (its spectrum, trace and size), but solved by :func:`datainf`
    instead of Woodbury: approximate for n > 1, exact for n = 1.

    Args:
        grads: (n, p) per-sample gradients. weights: (n,) w_i, or None for ones; the project's EF uses the
            token counts T_i. name: key (:mod:`ifutils.curvature.labels`).
    """

    def __init__(self, grads: torch.Tensor, weights: torch.Tensor | None, name: str = "ef_datainf"):
        u = _weighted(grads, weights)
        super().__init__(u.T / math.sqrt(len(u)), name)  # F = U U^T with U = [u_i / sqrt(n)]

    def solve(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        """:func:`datainf`. Raises ValueError for damping <= 0 or a per-coordinate (tensor) damping."""
        v, damping = self._check(v, damping, self.factor.device)
        u = self.factor.T * math.sqrt(self.factor.shape[1])
        return datainf(u, v, damping)[0]
