"""Ground truth by retraining the parameter subset: exact re-solves of the damped subset objective.

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

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from . import plots
from .config import require_positive, validate_fields
from .curvature import hessian_and_ggn
from .data import make_batch
from .grads import SubsetLoss, per_sample_grads
from .influence import influence
from .io import update_results
from .study import GGN, REFERENCE, StageTimer, build_curvatures, hessian_free_scores


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
        for start in tqdm(range(0, len(sentences), chunk), desc="per-sentence Hessians"):
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
    for g, group in enumerate(tqdm(groups, desc=desc, disable=desc is None)):
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


def column_correlation(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, kind: str) -> float:
    """Mean over columns j of the Pearson or Spearman correlation of a[:, j] and b[:, j] (rows: removals or
    subsets). Spearman is Pearson on ranks (ties get their average rank, ``scipy.stats.rankdata``). Vectorised
    over columns, so that bootstrap resamples are cheap. A constant column (a test sentence no subset coordinate
    touches, e.g. for embedding rows) has no correlation and is left out of the mean."""
    if kind not in ("pearson", "spearman"):
        raise ValueError(f"kind must be 'pearson' or 'spearman', got {kind!r}")
    a, b = (np.asarray(x.double().cpu() if torch.is_tensor(x) else x, dtype=np.float64) for x in (a, b))
    if kind == "spearman":
        a, b = stats.rankdata(a, axis=0), stats.rankdata(b, axis=0)
    a, b = a - a.mean(0), b - b.mean(0)
    norms = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    defined = norms > 0
    return float(np.mean((a * b).sum(0)[defined] / norms[defined])) if defined.any() else float("nan")


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, seed: int = 0, resamples: int = 1000,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic(rows)`` over n resampled rows (e.g. removals),
    with ``scipy.stats.bootstrap``. ``statistic`` receives an int array of row indices (with repeats)."""
    result = stats.bootstrap((np.arange(n),), lambda idx: statistic(idx.astype(int)), vectorized=False,
                             n_resamples=resamples, confidence_level=level, method="percentile",
                             random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass
class GroundTruthConfig:
    """Settings of the retraining ground truth; saved into the results file.

    Attributes:
        n: training sentences of the subset objective (the first n of the comparison's training sample).
        damping: lambda of the objective's proximal term, hence also of the exact influence it validates.
        n_loo: samples removed one at a time (seeded choice among the n).
        n_groups, group_size: random leave-k-out groups (k = group_size).
        lds_subsets, lds_fraction: M random subsets keeping a fraction beta of the n samples (Park et al. 2023).
        fd_samples, epsilons: samples up-weighted by w_i = 1 +- eps for the finite-difference check.
        tol: ||grad J|| tolerance of the leave-one-out, leave-k-out and reference solves.
        fd_tol: the tighter tolerance of the finite-difference solves (the difference is divided by 2 eps).
        lds_tol: tolerance of the LDS re-solves; looser, as removing half the data moves theta far more than one
            sentence does (the noise floor is measured at this tolerance too).
        noise_repeats: re-solves of the unchanged objective from perturbed starts (the noise floor).
        bootstrap: resamples of every confidence interval (95 %, percentile).
        seed: seeds every random choice.
    """

    n: int = 200
    damping: float = 1e-4
    n_loo: int = 100
    n_groups: int = 50
    group_size: int = 10
    lds_subsets: int = 100
    lds_fraction: float = 0.5
    fd_samples: int = 3
    epsilons: tuple[float, ...] = (0.1, 0.01)
    tol: float = 1e-11
    fd_tol: float = 1e-13
    lds_tol: float = 1e-9
    noise_repeats: int = 5
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self):
        validate_fields(self)
        require_positive(self, "n", "n_loo", "n_groups", "group_size", "lds_subsets", "fd_samples", "noise_repeats",
                         "bootstrap")
        if self.n_loo > self.n or self.group_size > self.n or self.fd_samples > self.n:
            raise ValueError(f"n_loo, group_size and fd_samples must not exceed n={self.n}")
        if not 0 < self.lds_fraction < 1:
            raise ValueError(f"lds_fraction={self.lds_fraction} must be in (0, 1)")
        if not self.damping > 0 or min(self.epsilons, default=0) <= 0 or min(self.tol, self.fd_tol, self.lds_tol) <= 0:
            raise ValueError("damping, epsilons and tolerances must be > 0")

    def to_dict(self) -> dict:
        """The fields as a dict (stored in results)."""
        return asdict(self)


@dataclass
class Retraining:
    """What the re-solves measured (all float64, nats per token of each test sentence).

    Attributes:
        theta_star: (p,) stationary point of J at w = 1.
        loo_samples: (n_loo,) removed indices; loo: (n_loo, n_test) actual change of each test loss.
        groups, group_effects: leave-k-out groups and (n_groups, n_test) changes.
        lds_removed, lds_effects: the complement of each LDS subset and (M, n_test) changes.
        noise: {tolerance: (noise_repeats, n_test) test-loss changes after re-solving the unchanged objective from
            perturbed starts}, at ``tol`` and ``lds_tol``.
        solves: per kind, the mean and max Newton iterations and exact Hessians formed.
    """

    theta_star: torch.Tensor
    loo_samples: list[int]
    loo: torch.Tensor
    groups: list[list[int]]
    group_effects: torch.Tensor
    lds_removed: list[list[int]]
    lds_effects: torch.Tensor
    noise: dict[float, torch.Tensor]
    solves: dict


def solve_reference(objective: SubsetObjective, config: GroundTruthConfig, cache=None,
                    theta_init: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """theta*_S: the stationary point of J at w = 1, from ``theta_init`` (default theta_hat) to ``config.tol``,
    cached; the info records iterations, exact Hessians formed, ||grad J||, ||theta*_S - theta_hat|| and seconds."""
    done = cache.get("reference") if cache else None
    if done is None:
        start = time.perf_counter()
        sol = newton_solve(objective, theta_init=theta_init, tol=config.tol)
        done = {"theta": sol.theta.cpu(), "info": {
            "iterations": sol.iterations, "grad_norm": sol.grad_norm, "hessian_evaluations": sol.hessian_evaluations,
            "distance_from_trained": float((sol.theta - objective.theta_hat).norm()),
            "warm_start": theta_init is not None, "seconds": time.perf_counter() - start}}
        if cache:
            cache.put("reference", done)
    return done["theta"].to(objective.theta_hat), done["info"]


def retrain_all(
    objective: SubsetObjective, theta_star: torch.Tensor, hessians: SampleHessians, test: list[torch.Tensor],
    config: GroundTruthConfig, train_grads: torch.Tensor, cache=None,
) -> Retraining:
    """Every re-solve of the study, from theta*_S with the per-sample Hessians there, each group cached.

    Leave-one-out of ``n_loo`` seeded samples, ``n_groups`` random leave-k-out groups, the LDS subsets and the
    noise floor: the unchanged objective re-solved from theta*_S + a random perturbation as large as the median
    leave-one-out displacement predicted by the Newton step, so its test-loss change is pure solver error.
    ``train_grads``: (n, p) per-sample gradients at theta*_S (they set that displacement).
    """
    n = objective.n
    measure = lambda theta: sentence_losses(objective.loss, test, theta)  # noqa: E731
    loo_samples = random_groups(n, 1, config.n_loo, config.seed)[0]
    groups = random_groups(n, config.n_groups, config.group_size, config.seed + 1)
    kept = random_groups(n, config.lds_subsets, round(config.lds_fraction * n), config.seed + 2)
    lds_removed = [sorted(set(range(n)) - set(k)) for k in kept]
    run = lambda groups, name, tol: removal_effects(  # noqa: E731
        objective, theta_star, hessians, groups, measure, tol, f"re-solves: {name}", cache, name)
    loo, loo_info = run([[i] for i in loo_samples], "leave-one-out", config.tol)
    group_effects, group_info = run(groups, "leave-k-out", config.tol)
    lds_effects, lds_info = run(lds_removed, "LDS", config.lds_tol)
    matrix = hessians.matrix(objective.ones())
    # perturbation as large as a removal's median Newton step (1/n) M^{-1} g_i
    scale = float((torch.linalg.solve(matrix, train_grads.double().T).norm(dim=0) / n).median())
    noise = {tol: _noise_floor(objective, theta_star, matrix, measure, scale, config, tol)
             for tol in dict.fromkeys((config.tol, config.lds_tol))}
    solves = {name: _solve_summary(info)
              for name, info in (("leave-one-out", loo_info), ("leave-k-out", group_info), ("LDS", lds_info))}
    return Retraining(theta_star, loo_samples, loo, groups, group_effects, lds_removed, lds_effects, noise, solves)


def _solve_summary(info: list[dict]) -> dict:
    ok = [i for i in info if "error" not in i]
    failed = [i["error"] for i in info if "error" in i]
    return {"solved": len(ok), "failed": len(failed), "failures": failed[:5],
            "iterations_mean": float(np.mean([i["iterations"] for i in ok])) if ok else None,
            "iterations_max": max((i["iterations"] for i in ok), default=None),
            "hessians_max": max((i["hessian_evaluations"] for i in ok), default=None),
            "grad_norm_max": max((i["grad_norm"] for i in ok), default=None)}


def _noise_floor(objective, theta_star, newton_matrix, measure, scale, config, tol) -> torch.Tensor:
    base = measure(theta_star)
    generator = torch.Generator().manual_seed(config.seed + 3)
    out = []
    for _ in range(config.noise_repeats):
        direction = torch.randn(len(theta_star), generator=generator, dtype=torch.float64).to(theta_star)
        start = theta_star + scale * direction / direction.norm()
        try:
            out.append(measure(newton_solve(objective, None, start, newton_matrix, tol).theta) - base)
        except (ValueError, RuntimeError):  # the start left the convex region: no floor from this repeat
            out.append(torch.full_like(base, float("nan")))
    return torch.stack(out).double()


def finite_difference_check(
    objective: SubsetObjective, theta_star: torch.Tensor, hessians: SampleHessians, test: list[torch.Tensor],
    exact_scores: torch.Tensor, samples: list[int], config: GroundTruthConfig,
) -> list[dict]:
    """The up-weighting derivative measured by re-solves against the exact-Hessian influence I_i / n.

    Args:
        exact_scores: (n, n_test) influence with C = H(theta*_S) and the objective's damping, at theta*_S.
        samples: the up-weighted sample indices.
    Returns:
        per sample and eps: ``relative_error`` = ||FD - I_i/n||_2 / ||I_i/n||_2 over the test sentences, and
        ``max_abs_error`` (nats per token per unit weight).
    """
    measure = lambda theta: sentence_losses(objective.loss, test, theta)  # noqa: E731
    rows = []
    for i in samples:
        exact = exact_scores[i].double().cpu() / objective.n
        derivatives = upweighting_derivative(objective, theta_star, hessians, i, measure, config.epsilons,
                                             config.fd_tol)
        for eps, fd in derivatives.items():
            fd = fd.cpu()
            rows.append({"sample": i, "eps": eps, "relative_error": float((fd - exact).norm() / exact.norm()),
                         "max_abs_error": float((fd - exact).abs().max()), "exact_norm": float(exact.norm())})
    return rows


def agreement_with_retraining(scores: torch.Tensor, retraining: Retraining, n: int, config: GroundTruthConfig) -> dict:
    """Pearson and Spearman correlation (mean over test sentences) between the first-order prediction from
    ``scores`` and the measured change, for leave-one-out and leave-k-out, and the LDS (Park et al. 2023, TRAK,
    eq. 5: Spearman correlation over the random subsets between predicted and measured test loss, averaged over
    test samples; predicting from the removed complement only shifts the prediction by a per-test constant), each
    with a bootstrap 95 % interval over removals (groups, subsets).

    Args:
        scores: (n_train, n_test) influence at theta*_S (rows: the objective's samples first).
    Returns:
        {"leave-one-out": {"pearson", "pearson_ci", "spearman", "spearman_ci"}, "leave-k-out": {...},
        "LDS": {"spearman", "spearman_ci"}}.
    """
    cases = (("leave-one-out", [[i] for i in retraining.loo_samples], retraining.loo, ("pearson", "spearman")),
             ("leave-k-out", retraining.groups, retraining.group_effects, ("pearson", "spearman")),
             ("LDS", retraining.lds_removed, retraining.lds_effects, ("spearman",)))
    out = {}
    for name, groups, actual, metrics in cases:
        solved = torch.isfinite(actual).all(1).cpu().numpy()  # failed re-solves are left out (counted in "solves")
        predicted = predicted_removal_effects(scores, groups, n).cpu().numpy()[solved]
        actual = actual.cpu().numpy()[solved]
        out[name] = {}
        for metric in metrics:
            statistic = lambda idx, m=metric: column_correlation(predicted[idx], actual[idx], m)  # noqa: E731
            out[name][metric] = statistic(np.arange(len(actual)))
            out[name][f"{metric}_ci"] = bootstrap_ci(statistic, len(actual), config.seed, config.bootstrap)
    return out


def noise_floor(retraining: Retraining) -> dict:
    """The re-solves' own error against the effects they measure: per tolerance, ``max_abs`` |test-loss change| of
    the unchanged objective re-solved from perturbed starts; the median |leave-one-out change|, its ratio to the
    floor at the leave-one-out tolerance, the fraction of leave-one-out changes below that floor, and the LDS
    effects' median |change| against the floor at their tolerance."""
    tols = list(retraining.noise)
    floors = {tol: float(noise.abs().nan_to_num(nan=0.0).max()) for tol, noise in retraining.noise.items()}
    loo = retraining.loo[torch.isfinite(retraining.loo).all(1)].abs()
    return {"max_abs": floors[tols[0]], "max_abs_by_tolerance": {str(t): f for t, f in floors.items()},
            "median_abs_loo": float(loo.median()), "ratio": floors[tols[0]] / float(loo.median()),
            "fraction_loo_below_floor": float((loo <= floors[tols[0]]).double().mean()),
            "median_abs_lds": float(retraining.lds_effects.abs().nanmedian()), "lds_floor": floors[tols[-1]]}


def compare_with_retraining(
    curvatures: dict, fixed_scores: dict[str, torch.Tensor], train_grads: torch.Tensor, test_grads: torch.Tensor,
    retraining: Retraining, config: GroundTruthConfig, dampings: tuple[float, ...],
) -> tuple[dict[str, dict], list[dict]]:
    """Every curvature's influence at theta*_S against the re-solves.

    Args:
        curvatures: name -> :class:`~ifutils.curvature.Curvature` built at theta*_S from the objective's n samples.
        fixed_scores: damping-free (n, n_test) scores (e.g. the gradient cosine).
        train_grads, test_grads: (n, p) and (n_test, p) per-sample gradients at theta*_S.
        dampings: the curvature's damping values of the sweep (the ground truth stays at ``config.damping``).
    Returns:
        (table, rows): table[name] = :func:`agreement_with_retraining` at ``config.damping`` (or ``{"error": ...}``
        when the curvature cannot be solved there); rows: one per curvature and damping with ``curvature``,
        ``damping``, ``loo_pearson``, ``loo_spearman``, ``lds`` and their ``*_ci``, for the robustness figure.
    """
    def scores(c, damping):
        try:
            return influence(train_grads, test_grads, c, damping), None
        except ValueError as err:  # e.g. an indefinite damped Hessian
            return None, str(err)

    n = train_grads.shape[0]
    table, rows = {}, []
    for name, c in tqdm(curvatures.items(), desc="agreement with retraining", leave=False):
        for damping in dict.fromkeys((config.damping, *dampings)):
            s, error = scores(c, damping)
            result = agreement_with_retraining(s, retraining, n, config) if s is not None else None
            if damping == config.damping:
                table[name] = result or {"error": error}
            if result is not None and damping in dampings:
                loo, lds = result["leave-one-out"], result["LDS"]
                rows.append({"curvature": name, "damping": damping, "loo_pearson": loo["pearson"],
                             "loo_pearson_ci": loo["pearson_ci"], "loo_spearman": loo["spearman"],
                             "loo_spearman_ci": loo["spearman_ci"], "lds": lds["spearman"], "lds_ci": lds["spearman_ci"]})
    for name, s in fixed_scores.items():  # damping-free: one entry, no sweep
        table[name] = agreement_with_retraining(s, retraining, n, config)
    return table, rows


def ground_truth_study(
    model, param_subset, eos_id: int, samples: dict, config, gt: GroundTruthConfig, cache_dir=None,
    theta_init: torch.Tensor | None = None,
) -> tuple[dict, dict]:
    """The whole retraining ground truth for one model and subset, as run by ``fisher_if.ipynb`` and
    ``scripts/ground_truth.py``: theta*_S, every curvature at theta*_S (:func:`ifutils.study.build_curvatures`, float64,
    from the objective's n sentences), per-sample Hessians, the re-solves, the finite-difference check, the noise floor
    and the agreement of every curvature with the re-solves.

    Args:
        model, param_subset, eos_id: the trained model and the subset theta_S.
        samples: :func:`ifutils.study.choose_samples` output; the objective takes the first ``gt.n`` of ``train``.
        config: the comparison's :class:`~ifutils.study.InfluenceConfig` (MC draws, Arnoldi rank, dampings swept).
        cache_dir: every stage is cached there and resumes after a kill.
        theta_init: start of the reference solve (default theta_hat); a previous theta*_S makes it return at once.
    Returns:
        (results for the JSON file, plot data: ``predicted`` {curvature: (n_loo, n_test) predicted leave-one-out
        changes} and ``loo`` (n_loo, n_test) actual ones).
    """
    timer = StageTimer()
    loss = SubsetLoss(model, param_subset, eos_id, torch.float64)
    objective = SubsetObjective(loss, samples["train"][: gt.n], gt.damping)
    cache = loss.cache(cache_dir, {"stage": "ground truth", **gt.to_dict()}, objective.sentences, samples["test"])
    with timer("solve theta*"):
        theta_star, reference = solve_reference(objective, gt, cache, theta_init)
    at_star = loss.at(theta_star)
    with timer("gradients at theta*"):
        train = per_sample_grads(at_star, objective.sentences, config.chunk_size, cache_dir=cache_dir)
        test = per_sample_grads(at_star, samples["test"], config.chunk_size, cache_dir=cache_dir)
    star_config = dataclasses.replace(config, n_hessian=gt.n, n_train=gt.n, dtype="float64", top_k=min(config.top_k, gt.n))
    curvatures = build_curvatures(at_star, objective.sentences, train, star_config, timer, cache_dir)
    with timer("per-sentence Hessians"):
        hessians = SampleHessians.compute(at_star, objective.sentences, theta_star, gt.damping, cache)
    hess = curvatures[REFERENCE].matrix
    with timer("re-solves"):
        retraining = retrain_all(objective, theta_star, hessians, samples["test"], gt, train, cache)
    exact = influence(train, test, curvatures[REFERENCE], gt.damping)
    with timer("finite differences"):
        fd = finite_difference_check(objective, theta_star, hessians, samples["test"], exact,
                                     retraining.loo_samples[: gt.fd_samples], gt)
    with timer("agreement"):
        table, rows = compare_with_retraining(curvatures, hessian_free_scores(train, test), train, test, retraining, gt,
                                              config.absolute_dampings)
    eigenvalues = torch.linalg.eigvalsh(hess)
    loo_groups = [[i] for i in retraining.loo_samples]
    shown = [REFERENCE, GGN, "EF", "identity (gradient dot product)"]
    results = {
        "config": gt.to_dict(), "reference_solve": reference, "solves": retraining.solves,
        "hessian_at_theta_star": {"min_eigenvalue": float(eigenvalues[0]), "max_eigenvalue": float(eigenvalues[-1]),
                                  "sample_hessians_mean_error": float((hessians.matrix(objective.ones()) - gt.damping
                                                                       * torch.eye(len(hess), dtype=hess.dtype) - hess).abs().max())},
        "noise_floor": noise_floor(retraining), "finite_differences": fd, "agreement": table, "damping_sweep": rows,
        "loo_samples": retraining.loo_samples, "seconds": timer.seconds,
    }
    predicted = {name: predicted_removal_effects(influence(train, test, curvatures[name], gt.damping), loo_groups, gt.n)
                 for name in shown}
    return results, {"predicted": predicted, "loo": retraining.loo}


def save_ground_truth(results: dict, plot_data: dict, label: str, figures_dir, tag: str, results_file) -> None:
    """Write :func:`ground_truth_study`'s results into ``results_file`` (section ``ground_truth``) and its figures:
    ``<tag>_retraining_scatter.png`` (predicted vs actual leave-one-out changes) and
    ``<tag>_retraining_vs_damping.png`` (leave-one-out Spearman against each curvature's damping, with CIs)."""
    damping = results["config"]["damping"]
    plots.retraining_scatter(plot_data["predicted"], plot_data["loo"],
                             f"{label}: leave-one-out re-solves, lambda={damping:g}",
                             Path(figures_dir) / f"{tag}_retraining_scatter.png")
    plots.sweep_with_ci(results["damping_sweep"], "damping", "loo_spearman",
                        f"{label}: leave-one-out Spearman (ground truth at lambda={damping:g}; 95% bootstrap CI)",
                        Path(figures_dir) / f"{tag}_retraining_vs_damping.png", xlabel="damping of the curvature")
    update_results(results_file, "ground_truth", results)
