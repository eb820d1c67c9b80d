"""The ground-truth study on a parameter subset: every curvature's influence against exact re-solves
(leave-one-out, leave-k-out, LDS, up-weighting finite differences) of the damped subset objective
(:mod:`ifutils.resolve`)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import param, require_positive, validate_fields
from ..grads import per_sample_grads
from ..influence import influence
from ..io import update_results
from ..metrics import bootstrap_ci, column_correlation
from ..progress import progress
from ..resolve import (
    SampleHessians,
    SubsetObjective,
    newton_solve,
    predicted_removal_effects,
    random_groups,
    removal_effects,
    sentence_losses,
    upweighting_derivative,
)
from ..subset import SubsetLoss
from . import plots
from .comparison import (
    GGN,
    REFERENCE,
    StageTimer,
    build_curvatures,
    hessian_free_scores,
)


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

    n: int = param(200, "sentences of the re-solved objective (the first n of the training sample)")
    damping: float = param(1e-3, "lambda of the proximal term = damping of the exact influence it validates")
    n_loo: int = param(100, "leave-one-out removals")
    n_groups: int = param(50, "leave-k-out groups of group_size")
    group_size: int = param(10, "k of the leave-k-out groups")
    lds_subsets: int = param(100, "M random subsets keeping lds_fraction of the n sentences (LDS)")
    lds_fraction: float = param(0.5, "beta, fraction of the n sentences each LDS subset keeps")
    fd_samples: int = param(3, "samples of the up-weighting finite-difference check")
    epsilons: tuple[float, ...] = param((0.1, 0.01), "eps of the up-weightings w_i = 1 +- eps")
    tol: float = param(1e-11, "||grad J|| tolerance of the reference, leave-one-out and leave-k-out solves")
    fd_tol: float = param(1e-13, "tolerance of the finite-difference solves")
    lds_tol: float = param(1e-9, "tolerance of the LDS re-solves")
    noise_repeats: int = param(5, "re-solves of the unchanged objective from perturbed starts (noise floor)")
    bootstrap: int = param(1000, "resamples of every 95 % percentile-bootstrap interval")
    seed: int = param(0, "seeds every random choice")

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
    for name, c in progress(curvatures.items(), desc="agreement with retraining", unit="curvature", leave=False):
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
    ``experiments/ground_truth.py``: theta*_S, every curvature at theta*_S (:func:`ifutils.experiments.comparison.build_curvatures`, float64,
    from the objective's n sentences), per-sample Hessians, the re-solves, the finite-difference check, the noise floor
    and the agreement of every curvature with the re-solves.

    Args:
        model, param_subset, eos_id: the trained model and the subset theta_S.
        samples: :func:`ifutils.experiments.comparison.choose_samples` output; the objective takes the first ``gt.n`` of ``train``.
        config: the comparison's :class:`~ifutils.experiments.comparison.InfluenceConfig` (MC draws, Arnoldi rank, dampings swept).
        cache_dir: every stage is cached there and resumes after a kill.
        theta_init: start of the reference solve (default theta_hat); a previous theta*_S makes it return at once.
    Returns:
        (results for the JSON file, plot data: ``predicted`` {curvature: (n_loo, n_test) predicted leave-one-out
        changes} and ``loo`` (n_loo, n_test) actual ones).
    """
    timer = StageTimer()
    loss = SubsetLoss(model, param_subset, eos_id, torch.float64)
    objective = SubsetObjective(loss, samples["train"][: gt.n], gt.damping)
    # everything stored there is computed by ifutils.resolve, driven by these two functions (not by the plots)
    cache = loss.cache(cache_dir, {"stage": "ground truth", **gt.to_dict()}, objective.sentences, samples["test"],
                       code=("ifutils.resolve", solve_reference, retrain_all))
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
    shown = [REFERENCE, GGN, "ef", "identity"]
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


def save_ground_truth(results: dict, plot_data: dict, label: str, figures_dir, tag: str, results_file,
                      checkpoint=None) -> None:
    """Write :func:`ground_truth_study`'s results into ``results_file`` (section ``ground_truth``) and its figures:
    ``<tag>_retraining_scatter.png`` (predicted vs actual leave-one-out changes) and
    ``<tag>_retraining_vs_damping.png`` (leave-one-out Spearman against each curvature's damping, with CIs).

    ``checkpoint`` (the model's file) is recorded with its sha256; the section is refused (ValueError, before any
    figure is drawn) when ``results_file`` holds sections of another checkpoint (:func:`ifutils.io.update_results`)."""
    update_results(results_file, "ground_truth", results, checkpoint=checkpoint, config=results["config"], run_name=tag)
    damping = results["config"]["damping"]
    plots.retraining_scatter(plot_data["predicted"], plot_data["loo"],
                             f"{label}: leave-one-out re-solves, lambda={damping:g}",
                             Path(figures_dir) / f"{tag}_retraining_scatter.png")
    plots.sweep_with_ci(results["damping_sweep"], "damping", "loo_spearman",
                        f"{label}: leave-one-out Spearman (ground truth at lambda={damping:g}; 95% bootstrap CI)",
                        Path(figures_dir) / f"{tag}_retraining_vs_damping.png", xlabel="damping of the curvature")
