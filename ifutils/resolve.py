"""Exact re-solves of the damped subset objective: the retraining that ground-truths influence on a subset.

With all other parameters frozen, the subset objective with sample weights w is
    J_w(theta) = (1/n) sum_i w_i l_i(theta) + (lambda/2) ||theta - theta_hat||^2,
theta_hat the trained values. Its stationary point theta*_w is computed by Newton steps to a gradient-norm
tolerance, so that leave-one-out (w_i = 0), leave-k-out, up-weighting (w_i = 1 + eps) and the random subsets
of the linear datamodeling score are measured, not approximated. By the implicit function theorem
(Koh & Liang 2017, sec. 2.1; Cook & Weisberg 1982),
    d L_test(theta*_w) / d w_i |_{w=1} = -(1/n) g_test^T (H + lambda I)^{-1} g_i = I_i / n,
with H the Hessian of (1/n) sum_i l_i at theta*_1 and I_i the influence of :func:`ifutils.influence.influence`;
removing sample i (w_i: 1 -> 0) thus changes the test loss by about -I_i / n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .curvature import hessian_and_ggn
from .data import make_batch
from .progress import progress
from .subset import SubsetLoss


class SubsetObjective:
    """J_w(theta) = (1/n) sum_i w_i l_i(theta) + (damping/2) ||theta - theta_hat||^2 on a :class:`SubsetLoss`.

    l_i is sentence i's mean token NLL (nats per token); theta_hat is ``loss.theta0``.

    Args:
        loss: subset loss; float64 so that tight gradient tolerances are reachable.
        sentences: the n training sentences of the objective.
        damping: lambda > 0 of the proximal term.
        chunk_size: sentences per batch of the value-and-gradient pass.
    Raises:
        ValueError: damping <= 0, or no sentences.
    """

    def __init__(self, loss: SubsetLoss, sentences: list[torch.Tensor], damping: float, chunk_size: int = 64):
        if not damping > 0:
            raise ValueError(f"damping must be > 0 for a well-posed re-solve, got {damping}")
        if not sentences:
            raise ValueError("the objective needs at least one training sentence")
        self.loss, self.sentences, self.damping, self.chunk_size = loss, sentences, damping, chunk_size
        self.n, self.theta_hat = len(sentences), loss.theta0

    def ones(self) -> torch.Tensor:
        """(n,) all-one weights in the loss's dtype."""
        return torch.ones(self.n, dtype=self.theta_hat.dtype, device=self.theta_hat.device)

    def value_and_grad(self, theta: torch.Tensor, weights: torch.Tensor) -> tuple[float, torch.Tensor]:
        """J_w(theta) (nats per token) and its (p,) gradient, by one reverse pass over all sentences."""
        theta = theta.detach().requires_grad_(True)
        total = 0.0
        for idx, inputs, targets, mask in self.loss.batches(self.sentences, self.chunk_size):
            total = total + (weights[idx] * self.loss.loss(theta, inputs, targets, mask)).sum()
        value = total / self.n + 0.5 * self.damping * (theta - self.theta_hat).square().sum()
        (grad,) = torch.autograd.grad(value, theta)
        return float(value.detach()), grad

    def hessian(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(p, p) float64 Hessian of J_w at theta: the exact subset Hessian (structured pass, over the sentences of
        nonzero weight only) + damping I."""
        keep = weights.nonzero().flatten().tolist()
        h = hessian_and_ggn(self.loss, [self.sentences[i] for i in keep], theta=theta.detach(),
                            weights=weights[keep])[0].matrix * (len(keep) / self.n)
        return h + self.damping * torch.eye(len(h), dtype=h.dtype, device=h.device)


@dataclass
class Solution:
    """A re-solve's result: ``theta`` (p,), Newton ``iterations``, final ``grad_norm`` ||grad J||_2,
    ``hessian_evaluations`` (exact Hessians formed) and ``newton_matrix``, the last damped matrix used: formed at an
    earlier iterate (or passed in), not the Hessian at ``theta``; influence at theta must use H(theta) itself."""

    theta: torch.Tensor
    iterations: int
    grad_norm: float
    hessian_evaluations: int
    newton_matrix: torch.Tensor


def newton_solve(
    objective,
    weights: torch.Tensor | None = None,
    theta_init: torch.Tensor | None = None,
    newton_matrix: torch.Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int = 100,
    refresh_ratio: float = 0.3,
) -> Solution:
    """Stationary point of J_w by Newton steps with the exact Hessian and a backtracking line search.

    The step is -M^{-1} grad J_w(theta) with M = Hessian of J_w. M is formed at the start (or taken from
    ``newton_matrix``, e.g. the Hessian at theta*_1 for leave-one-out re-solves started there) and formed
    again at the current point whenever an iteration reduces ||grad J|| by less than ``refresh_ratio``: exact
    Newton where it is needed, a chord (simplified Newton) iteration where M still contracts fast. M only sets
    the speed: the point returned is stationary to ``tol`` whatever M was. Within 100 tol of the goal slow
    contraction comes from rounding in the gradient, not from M, so M is kept there. A step is halved (up to 30 times)
    until it lowers J or ||grad J||.

    Args:
        objective: a :class:`SubsetObjective`, or any object with ``n``, ``ones()``, ``value_and_grad(theta,
            weights)`` and ``hessian(theta, weights)`` (tests use closed-form quadratics).
        weights: (n,) sample weights, default ones; 0 removes a sample.
        theta_init: start, default theta_hat (warm starts from theta*_1 make leave-one-out cheap).
        newton_matrix: (p, p) damped Hessian at ``theta_init`` to start with (e.g. :meth:`SampleHessians.matrix`),
            default formed there.
        tol: stop when ||grad J_w||_2 <= tol (nats per token per unit of theta).
        max_iter: most Newton steps.
        refresh_ratio: form M again when ||grad_new|| > refresh_ratio * ||grad_old||.
    Returns:
        :class:`Solution`.
    Raises:
        ValueError: M is not positive definite (J_w is not locally convex there: raise the damping), or weights
            of the wrong shape.
        RuntimeError: ``max_iter`` steps, or a failed line search, without reaching ``tol`` (the message gives
            the last norm).
    """
    weights = objective.ones() if weights is None else weights
    if weights.shape != (objective.n,):
        raise ValueError(f"weights must have shape ({objective.n},), one per sentence, got {tuple(weights.shape)}")
    theta = (objective.theta_hat if theta_init is None else theta_init).detach().clone()
    value, grad = objective.value_and_grad(theta, weights)
    norm, evaluations, fresh = float(grad.norm()), 0, newton_matrix is not None  # a given matrix is exact at the start
    for iteration in range(max_iter + 1):
        if norm <= tol:
            return Solution(theta, iteration, norm, evaluations, newton_matrix)
        if iteration == max_iter:
            break
        if newton_matrix is None:
            newton_matrix, evaluations, fresh = objective.hessian(theta, weights), evaluations + 1, True
        step = -_positive_definite_solve(newton_matrix, grad.double()).to(theta)
        for _ in range(31):
            new_value, new_grad = objective.value_and_grad(theta + step, weights)
            if new_value < value or float(new_grad.norm()) < norm:
                break
            step = step / 2
        else:
            raise RuntimeError(f"line search failed at ||grad J|| = {norm:.3g} (tolerance {tol:g}); the objective "
                               "may be too flat or too noisy for this tolerance: raise tol")
        theta, value, grad = theta + step, new_value, new_grad
        new_norm = float(grad.norm())
        if new_norm > refresh_ratio * norm and not fresh and new_norm > 100 * tol:
            newton_matrix = None  # slow contraction far from tol (near it, rounding slows it): form H here
        fresh, norm = False, new_norm
    raise RuntimeError(f"Newton did not reach ||grad J|| <= {tol:g} in {max_iter} steps (last {norm:.3g})")


def _positive_definite_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if info:
        smallest = float(torch.linalg.eigvalsh(matrix)[0])
        raise ValueError(f"the damped Hessian of the re-solved objective is not positive definite (smallest "
                         f"eigenvalue {smallest:.3g}): J is not locally convex here; raise the damping")
    return torch.cholesky_solve(rhs[:, None], factor)[:, 0]


class SampleHessians:
    """Per-sample Hessians H_i = d^2 l_i / d theta^2 at theta*_S, so that the damped Hessian of J_w there,
    M_w = (1/n) sum_i w_i H_i + lambda I, is exact for any weights at the cost of a sum: every re-solve (leave-one-out,
    leave-k-out, LDS subset, up-weighting) starts with the exact Newton matrix of its own objective.

    Args:
        stack: (n, p, p) float64 per-sample Hessians (mean token NLL of each sample, nats).
        damping: lambda of the objective.
    """

    def __init__(self, stack: torch.Tensor, damping: float):
        self.stack, self.damping = stack, damping

    @classmethod
    def compute(cls, loss: SubsetLoss, sentences: list[torch.Tensor], theta: torch.Tensor, damping: float,
                cache=None, chunk: int = 20) -> "SampleHessians":
        """One structured Hessian pass (:func:`~ifutils.curvature.hessian_and_ggn`) per sentence at ``theta``;
        groups of ``chunk`` sentences are stored in ``cache`` as they finish, so a killed run resumes."""
        parts = []
        for start in progress(range(0, len(sentences), chunk), desc="per-sentence Hessians", unit="group"):
            part = cache.get(f"sample_hessians{start}") if cache else None
            if part is None:
                part = torch.stack([hessian_and_ggn(loss, [s], theta=theta)[0].matrix.cpu()
                                    for s in sentences[start : start + chunk]])
                if cache:
                    cache.put(f"sample_hessians{start}", part)
            parts.append(part.to(theta.device))
        return cls(torch.cat(parts), damping)

    def matrix(self, weights: torch.Tensor) -> torch.Tensor:
        """(p, p) M_w = (1/n) sum_i w_i H_i + damping I."""
        m = torch.einsum("i,ipq->pq", weights.to(self.stack), self.stack) / len(self.stack)
        return m + self.damping * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)


def sentence_losses(loss: SubsetLoss, sentences: list[torch.Tensor], theta: torch.Tensor) -> torch.Tensor:
    """(n_test,) float64 loss of each test sentence (mean token NLL, nats) at theta."""
    inputs, targets, mask = (t.to(loss.device) for t in make_batch(sentences, loss.eos_id))
    with torch.no_grad():
        return loss.loss(theta, inputs, targets, mask).double()


def removal_effects(
    objective, theta_star: torch.Tensor, hessians: SampleHessians, groups: list[list[int]],
    measure: Callable[[torch.Tensor], torch.Tensor], tol: float, desc: str | None = "re-solves",
    cache=None, name: str = "removal",
) -> tuple[torch.Tensor, list[dict]]:
    """Actual change of each measured quantity when each group of samples is removed (weights 0) and J re-solved.

    Args:
        objective: as for :func:`newton_solve`; theta_star its stationary point at w = 1, hessians the per-sample
            Hessians there (every re-solve starts from theta_star with its own objective's exact Hessian).
        groups: sample indices removed together (one index: leave-one-out).
        measure: theta -> (m,) quantities, e.g. the test losses (:func:`sentence_losses`).
        tol: gradient-norm tolerance of each re-solve.
        cache: optional :class:`~ifutils.cache.ChunkCache`; each finished group is stored as ``name{g}`` so a
            killed run resumes.
    Returns:
        ((n_groups, m) float64 tensor measure(theta*_{-G}) - measure(theta_star), one dict of
        :class:`Solution` statistics per group). A group whose re-solve fails (the path from theta*_S leaves the
        region where J_w is convex, or Newton stalls) gets a NaN row and ``{"error": message}``.
    """
    base = measure(theta_star)
    effects, info = [], []
    for g, group in enumerate(progress(groups, desc=desc, unit="re-solve", disable=desc is None)):
        done = cache.get(f"{name}{g}") if cache else None
        if done is None:
            weights = objective.ones()
            weights[list(group)] = 0.0
            try:
                sol = newton_solve(objective, weights, theta_star, hessians.matrix(weights), tol)
                done = {"effect": (measure(sol.theta) - base).cpu(),
                        "info": {"iterations": sol.iterations, "grad_norm": sol.grad_norm,
                                 "hessian_evaluations": sol.hessian_evaluations}}
            except (ValueError, RuntimeError) as err:  # no convex re-solve reachable from theta*_S: reported, not used
                done = {"effect": torch.full_like(base, float("nan")).cpu(), "info": {"error": str(err)}}
            if cache:
                cache.put(f"{name}{g}", done)
        effects.append(done["effect"])
        info.append(done["info"])
    return torch.stack(effects).double(), info


def upweighting_derivative(
    objective, theta_star: torch.Tensor, hessians: SampleHessians, sample: int,
    measure: Callable[[torch.Tensor], torch.Tensor], epsilons: tuple[float, ...], tol: float,
) -> dict[float, torch.Tensor]:
    """Central finite differences of measure(theta*_w) in w_i around w = 1: for each eps,
    (measure(theta*_{w_i = 1 + eps}) - measure(theta*_{w_i = 1 - eps})) / (2 eps), each point re-solved to ``tol``.
    The exact derivative is I_i / n (module docstring); the central difference's error is O(eps^2).

    Returns:
        {eps: (m,) float64 tensor}.
    """
    out = {}
    for eps in epsilons:
        values = []
        for sign in (1, -1):
            weights = objective.ones()
            weights[sample] = 1 + sign * eps
            values.append(measure(newton_solve(objective, weights, theta_star, hessians.matrix(weights), tol).theta))
        out[eps] = (values[0] - values[1]).double() / (2 * eps)
    return out


def random_groups(n: int, count: int, size: int, seed: int) -> list[list[int]]:
    """``count`` seeded groups of ``size`` distinct indices of range(n) (each group drawn independently).

    Raises:
        ValueError: size not in [1, n] or count < 1.
    """
    if not 1 <= size <= n or count < 1:
        raise ValueError(f"need 1 <= size <= n and count >= 1, got size={size}, n={n}, count={count}")
    generator = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(n, generator=generator)[:size].tolist()) for _ in range(count)]


def predicted_removal_effects(scores: torch.Tensor, groups: list[list[int]], n: int) -> torch.Tensor:
    """First-order prediction of removing each group: -(1/n) sum_{i in G} I_i, per test column.

    Args:
        scores: (n_train, n_test) influence I (positive = harmful); the first n rows are the objective's samples.
    Returns:
        (n_groups, n_test) float64 predicted change of each test loss (nats per token).
    """
    return torch.stack([-scores[list(g)].double().sum(0) / n for g in groups])
