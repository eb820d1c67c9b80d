"""Robustness of the Fisher-vs-Hessian verdict: the same comparison repeated while one setting changes.

Each setting (a model seed, a training checkpoint, a parameter subset, a hidden width, the number of sentences a
curvature is estimated from, the number of Monte Carlo label draws) gives one row per curvature: its influence's
Pearson and Spearman correlation with exact-Hessian influence (means over test sentences, the protocol of
:func:`ifutils.metrics.agreement`), each with a bootstrap 95 % interval over test sentences, at one absolute damping
shared by the curvature and the reference H + lambda I. Rows whose reference is indefinite are flagged.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..curvature import Curvature, mc_true_fisher, scale_damping
from ..grads import per_sample_grads
from ..influence import influence
from ..metrics import bootstrap_ci, column_correlation
from ..subset import SubsetLoss, default_subset
from .comparison import (
    GGN,
    REFERENCE,
    InfluenceConfig,
    StageTimer,
    build_curvatures,
    spectrum_summary,
)

SHOWN = (REFERENCE, GGN, "ef", "ef_token", "hessian_diag", "ggn_diag", "kfac", "ekfac", "identity")
"""Keys of the curvatures kept in the sweeps (the Monte Carlo Fisher, ``mc_fisher_k<k>``, is added under its own
key)."""


def agreement_with_ci(reference: torch.Tensor, scores: torch.Tensor, seed: int = 0, resamples: int = 1000) -> dict:
    """Pearson and Spearman correlation of ``scores`` with ``reference`` ((n_train, n_test) influence matrices),
    per test column then averaged, with percentile-bootstrap 95 % intervals over test columns. Columns without a
    correlation (a test sentence whose gradient on the subset is zero, e.g. embedding rows it never uses) are left
    out; ``columns`` counts those kept."""
    ref, est = reference.double().cpu().numpy(), scores.double().cpu().numpy()
    out = {}
    for kind in ("pearson", "spearman"):
        per_column = np.array([column_correlation(ref[:, [j]], est[:, [j]], kind) for j in range(ref.shape[1])])
        per_column = per_column[np.isfinite(per_column)]
        out[kind] = float(per_column.mean()) if len(per_column) else float("nan")
        out[f"{kind}_ci"] = (bootstrap_ci(lambda idx, v=per_column: float(v[idx].mean()), len(per_column), seed,
                                          resamples) if len(per_column) > 1 else (float("nan"), float("nan")))
        out["columns"] = len(per_column)
    return out


def curvature_rows(
    curvatures: dict[str, Curvature], train_grads: torch.Tensor, test_grads: torch.Tensor, damping: float,
    setting: dict, seed: int = 0, reference: Curvature | None = None, reference_damping: float | None = None,
) -> list[dict]:
    """One row per curvature: ``setting``'s fields, ``curvature``, ``damping``, ``reference_indefinite`` and
    :func:`agreement_with_ci` against H + reference_damping I (``reference``, default ``curvatures[REFERENCE]``;
    ``reference_damping`` defaults to ``damping``: at large damping both tend to the gradient dot product, so
    agreement then tends to 1 whatever the curvature; a fixed reference avoids that)."""
    hess = reference or curvatures[REFERENCE]
    reference_damping = damping if reference_damping is None else reference_damping
    exact = influence(train_grads, test_grads, hess, reference_damping)
    indefinite = bool(float(hess.eigvalsh()[0]) + reference_damping <= 0)
    return [{**setting, "curvature": name, "damping": damping, "reference_indefinite": indefinite,
             **agreement_with_ci(exact, influence(train_grads, test_grads, c, damping), seed)}
            for name, c in curvatures.items()]


def _keep(curvatures: dict[str, Curvature]) -> dict[str, Curvature]:
    return {n: c for n, c in curvatures.items() if n in SHOWN or n.startswith("mc_fisher_k")}


def setting_rows(
    model, eos_id: int, samples: dict, config: InfluenceConfig, setting: dict, cache_dir=None,
) -> tuple[list[dict], dict]:
    """The comparison for one model and subset (``config.subset``): rows of :func:`curvature_rows` at the damping
    :func:`~ifutils.curvature.scale_damping` (models and subsets differ in curvature scale by orders of magnitude, so
    one absolute lambda would be negligible for some and leave H + lambda I indefinite for others), and the
    eigenvalue statistics (:func:`~ifutils.experiments.comparison.spectrum_summary`) of H and the
    GGN, with the damping that maximises each curvature's Spearman correlation over ``config.absolute_dampings``
    (reference fixed at that damping) for relating it to those statistics (Karakida et al. 2019)."""
    subset = default_subset(model, config.subset, config.num_coords, config.seed)
    loss = SubsetLoss(model, subset, eos_id, getattr(torch, config.dtype))
    train = per_sample_grads(loss, samples["train"], config.chunk_size, cache_dir=cache_dir, desc=None)
    test = per_sample_grads(loss, samples["test"], config.chunk_size, cache_dir=cache_dir, desc=None)
    curvatures = _keep(build_curvatures(loss, samples["hessian"], train[: config.n_hessian], config, StageTimer(),
                                        cache_dir, solvers=False))
    damping = scale_damping(curvatures[REFERENCE], curvatures[GGN])
    rows = curvature_rows(curvatures, train, test, damping, setting, config.seed)
    exact = influence(train, test, curvatures[REFERENCE], damping)
    best = {}
    for name, c in curvatures.items():
        spearman = {d: column_correlation(exact, influence(train, test, c, d), "spearman")
                    for d in config.absolute_dampings}
        best[name] = max(spearman, key=spearman.get)
    stats = {name: spectrum_summary(curvatures[name]) for name in (REFERENCE, GGN)}
    return rows, {"spectra": stats, "best_damping": best, "damping": damping}


def estimation_rows(
    loss: SubsetLoss, samples: dict, config: InfluenceConfig, counts: tuple[int, ...], mc_draws: tuple[int, ...],
    cache_dir=None,
) -> dict[str, list[dict]]:
    """How many sentences and Monte Carlo label draws a curvature needs, and how the damping matters.

    The reference is H from all n_H sentences (``samples["hessian"]``).
    Returns:
        ``"sentences"``: every curvature estimated from the first m sentences, m in ``counts``, at the default
        damping; ``"mc_draws"``: the Monte Carlo true Fisher from k draws per position, k in ``mc_draws``;
        ``"damping"``: every curvature damped by each of ``config.absolute_dampings`` against the fixed reference
        H + default_damping I; ``"damping_alike"``: the reference damped alike.
    """
    train = per_sample_grads(loss, samples["train"], config.chunk_size, cache_dir=cache_dir, desc=None)
    test = per_sample_grads(loss, samples["test"], config.chunk_size, cache_dir=cache_dir, desc=None)
    full = _keep(build_curvatures(loss, samples["hessian"], train[: config.n_hessian], config, StageTimer(), cache_dir,
                                  solvers=False))
    reference, damping = full[REFERENCE], config.default_damping
    out = {"sentences": [], "mc_draws": [], "damping": [], "damping_alike": []}
    for m in counts:
        part = full if m == config.n_hessian else _keep(build_curvatures(
            loss, samples["hessian"][:m], train[:m], dataclasses.replace(config, n_hessian=m), StageTimer(), cache_dir,
            solvers=False))
        out["sentences"] += curvature_rows(part, train, test, damping, {"sentences": m}, config.seed, reference)
    for k in mc_draws:
        mc = mc_true_fisher(loss, samples["hessian"], k, config.seed, config.chunk_size, cache_dir)
        out["mc_draws"] += curvature_rows({mc.name: mc}, train, test, damping, {"mc_draws": k}, config.seed, reference)
    for d in config.absolute_dampings:
        out["damping"] += curvature_rows(full, train, test, d, {"lambda": d}, config.seed, reference_damping=damping)
        out["damping_alike"] += curvature_rows(full, train, test, d, {"lambda": d}, config.seed)
    return out
