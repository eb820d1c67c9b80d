"""Agreement between influence scores: rank and linear correlations, top-k overlap, sign agreement."""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
from scipy import stats


def agreement(
    reference: torch.Tensor, scores: torch.Tensor, top_k: int = 20, top_fraction: float = 0.1
) -> dict[str, float]:
    """How well ``scores`` reproduce ``reference`` (e.g. exact-Hessian influence).

    Correlations are computed per test sample over the training samples (one column each) and
    averaged over test samples, the usual protocol for influence estimators (e.g. Bae et al. 2022).

    Args:
        reference, scores: (n_train, n_test) influence matrices.
        top_k: size of the most-helpful (most negative) and most-harmful (most positive) sets.
        top_fraction: the same overlap for the top ``top_fraction`` of n_train (at least one sample).
    Returns:
        dict with ``pearson``, ``spearman``, ``kendall`` (means over test columns), ``top_k_helpful``
        and ``top_k_harmful`` (mean fraction of the reference's top-k found in the scores' top-k),
        ``top_frac_helpful`` and ``top_frac_harmful`` (the same for the top fraction), and
        ``sign_agreement`` (fraction of all (i, j) pairs whose signs match).
    Raises:
        ValueError: shapes differ, ``top_k`` exceeds n_train, or ``top_fraction`` is not in (0, 1].
    """
    if reference.shape != scores.shape:
        raise ValueError(f"score shapes differ: {tuple(reference.shape)} vs {tuple(scores.shape)}")
    if not 1 <= top_k <= reference.shape[0]:
        raise ValueError(f"top_k={top_k} must be in [1, n_train={reference.shape[0]}]")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction={top_fraction} must be in (0, 1]")
    frac_k = max(1, round(top_fraction * reference.shape[0]))
    ref, est = reference.double().cpu().numpy(), scores.double().cpu().numpy()
    cols = range(ref.shape[1])
    out = {
        "pearson": np.mean([stats.pearsonr(ref[:, j], est[:, j])[0] for j in cols]),
        "spearman": np.mean([stats.spearmanr(ref[:, j], est[:, j])[0] for j in cols]),
        "kendall": np.mean([stats.kendalltau(ref[:, j], est[:, j])[0] for j in cols]),
        "top_k_helpful": _top_k_overlap(ref, est, top_k, largest=False),
        "top_k_harmful": _top_k_overlap(ref, est, top_k, largest=True),
        "top_frac_helpful": _top_k_overlap(ref, est, frac_k, largest=False),
        "top_frac_harmful": _top_k_overlap(ref, est, frac_k, largest=True),
        "sign_agreement": float(np.mean(np.sign(ref) == np.sign(est))),
    }
    return {k: float(v) for k, v in out.items()}


def _top_k_overlap(ref: np.ndarray, est: np.ndarray, k: int, largest: bool) -> float:
    sign = -1 if largest else 1
    top = lambda a: np.argsort(sign * a, axis=0, kind="stable")[:k]  # noqa: E731
    r, e = top(ref), top(est)
    return float(np.mean([len(set(r[:, j]) & set(e[:, j])) / k for j in range(ref.shape[1])]))


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


def linear_datamodeling_score(scores, masks, losses, seed: int = 0, resamples: int = 1000) -> dict:
    """Linear datamodeling score (Park et al. 2023, TRAK, eq. 4) of influence scores against retrained models.

    For subset m (``masks[m]``, the training sentences kept) the prediction is the summed influence of its sentences,
    f_q(S_m) = sum_{i in S_m} I_iq (I_iq = d loss_q / d epsilon_i, positive = harmful: a subset holding harmful
    sentences predicts a higher loss); the measurement is the query loss of the models retrained on S_m, averaged
    over seeds. LDS_q = Spearman over m of the two; the LDS is its mean over queries, with a percentile-bootstrap
    95 % interval over queries (scipy.stats.bootstrap).

    The noise ceiling (with S >= 2 seeds): for each seed s, the Spearman over m between seed s's losses and the mean of
    the other seeds' losses, averaged over s and queries: how well one training run predicts the others (for S = 2,
    the seed-to-seed agreement r). A method's LDS is measured against the mean of all S seeds, which is less noisy,
    so it can exceed that number. ``ceiling_mean_target`` is the ceiling for that target: with the loss of seed s
    = E[loss | S_m] + independent seed noise, an exact predictor of E[loss | S_m] correlates with the S-seed mean at
    sqrt(R_S), R_S = S r / (1 + (S - 1) r) (the Spearman-Brown reliability of a mean of S runs, Spearman 1910 /
    Brown 1910, with Spearman's 1904 correction for attenuation), r the mean Spearman over pairs of seeds; per
    query with r clipped at 0, then averaged over queries (Pearson algebra applied to Spearman: approximate).

    Intervals: ``ci`` resamples queries with the subsets fixed (scipy.stats.bootstrap); ``ci_two_way`` resamples
    subsets and queries together (a crossed percentile bootstrap; the Spearman of each query is the Pearson
    correlation of the ranks over all subsets, recomputed on the resampled rows), which also counts the finite
    number of subsets and is the wider, more honest interval.

    Args:
        scores: (n_train, Q) influence of each training sentence on each query (nats/token per unit weight).
        masks: (M, n_train) bool, masks[m, i] = sentence i is in subset m.
        losses: (M, S, Q) query losses (nats/token) of the model trained on subset m with seed s; NaN for a model not
            trained yet (that subset is left out when any of its seeds is missing).
    Returns:
        dict: ``lds`` (mean over queries), ``ci`` [low, high] (queries resampled), ``ci_two_way`` (subsets and
        queries resampled), ``per_query`` (Q,), ``ceiling`` (None for S = 1), ``ceiling_ci``,
        ``ceiling_ci_two_way`` (seed 0 against the others' mean), ``ceiling_mean_target`` and
        ``ceiling_mean_target_ci`` (None for S = 1),
        ``subsets`` (M used), ``seeds``.
    Raises:
        ValueError: inconsistent shapes, or fewer than 3 complete subsets.
    """
    scores, masks, losses = (np.asarray(x.double().cpu() if torch.is_tensor(x) else x, dtype=np.float64)
                             for x in (scores, masks, losses))
    if scores.ndim != 2 or masks.ndim != 2 or losses.ndim != 3:
        raise ValueError(f"need scores (n, Q), masks (M, n), losses (M, S, Q); got {scores.shape}, {masks.shape}, "
                         f"{losses.shape}")
    if masks.shape[1] != scores.shape[0] or losses.shape[0] != masks.shape[0] or losses.shape[2] != scores.shape[1]:
        raise ValueError(f"shapes disagree: scores {scores.shape}, masks {masks.shape}, losses {losses.shape}")
    return datamodel_score(masks @ scores, losses, seed, resamples)


def datamodel_score(predicted, losses, seed: int = 0, resamples: int = 1000, ceiling: bool = True) -> dict:
    """The linear datamodeling score of predictions already summed over each subset (Park et al. 2023, eq. 4).

    :func:`linear_datamodeling_score` with ``predicted = masks @ scores``; for predictions formed without the
    (n, Q) scores, e.g. -G_m^T q from subset gradient sums (:mod:`ifutils.datamodels`).

    Args:
        predicted: (M, Q) predicted query loss change of subset m (any monotone scale per query).
        losses: (M, S, Q) measured query losses (nats/token); NaN for a model not trained yet (the subset is left
            out when any of its seeds is missing).
        ceiling: False skips the ceiling entries (left None; they depend on ``losses`` only, so a caller scoring
            many predictions against the same losses computes them once).
    Returns:
        the dict of :func:`linear_datamodeling_score`.
    Raises:
        ValueError: inconsistent shapes, non-finite predictions, or fewer than 3 complete subsets.
    """
    predicted, losses = (np.asarray(x.double().cpu() if torch.is_tensor(x) else x, dtype=np.float64)
                         for x in (predicted, losses))
    if predicted.ndim != 2 or losses.ndim != 3 or predicted.shape != (losses.shape[0], losses.shape[2]):
        raise ValueError(f"shapes disagree: predicted {predicted.shape} must be (M, Q) of losses (M, S, Q) "
                         f"{losses.shape}")
    if not np.isfinite(predicted).all():
        raise ValueError("predicted holds NaN or Inf (a diverged solver?)")
    done = ~np.isnan(losses).any(axis=(1, 2))
    if done.sum() < 3:
        raise ValueError(f"only {int(done.sum())} subsets have every seed's losses; the LDS needs at least 3")
    predicted, losses = predicted[done], losses[done]
    actual = losses.mean(1)
    per_query = _spearman_columns
    values = per_query(predicted, actual)
    nan2 = [float("nan"), float("nan")]
    ci = bootstrap_ci(lambda idx: float(values[idx].mean()), len(values), seed, resamples) if len(values) > 1 \
        else nan2
    out = {"lds": float(values.mean()), "ci": list(ci),
           "ci_two_way": two_way_bootstrap_ci(predicted, actual, seed, resamples),
           "per_query": values.tolist(), "subsets": int(done.sum()), "seeds": int(losses.shape[1]),
           "ceiling": None, "ceiling_ci": None, "ceiling_ci_two_way": None, "ceiling_mean_target": None,
           "ceiling_mean_target_ci": None}
    s = losses.shape[1]
    if s >= 2 and ceiling:
        ceil = np.mean([per_query(losses[:, k], np.delete(losses, k, axis=1).mean(1)) for k in range(s)], axis=0)
        out["ceiling"] = float(ceil.mean())
        out["ceiling_ci"] = list(bootstrap_ci(lambda idx: float(ceil[idx].mean()), len(ceil), seed, resamples)) \
            if len(ceil) > 1 else nan2
        out["ceiling_ci_two_way"] = two_way_bootstrap_ci(losses[:, 0], np.delete(losses, 0, axis=1).mean(1), seed,
                                                         resamples)
        pairs = [per_query(losses[:, a], losses[:, b]) for a in range(s) for b in range(a + 1, s)]
        r = np.clip(np.mean(pairs, axis=0), 0.0, None)
        target = np.sqrt(s * r / (1 + (s - 1) * r))
        out["ceiling_mean_target"] = float(target.mean())
        out["ceiling_mean_target_ci"] = list(bootstrap_ci(lambda idx: float(target[idx].mean()), len(target), seed,
                                                          resamples)) if len(target) > 1 else nan2
    return out


def _spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman over rows of each column pair: (M, Q), (M, Q) -> (Q,) (NaN for a constant column)."""
    a, b = stats.rankdata(a, axis=0), stats.rankdata(b, axis=0)
    a, b = a - a.mean(0), b - b.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def _crossed_rhos(predicted: list, actual: np.ndarray, seed: int, resamples: int) -> np.ndarray:
    """(resamples, len(predicted), Q): per-query Spearman of each prediction with ``actual`` on the same crossed
    resamples of subsets (rows) and queries (columns); ranks taken once over all subsets (see
    :func:`two_way_bootstrap_ci`)."""
    ranked = [stats.rankdata(a, axis=0) for a in predicted]
    rb = stats.rankdata(actual, axis=0)
    m, q = rb.shape
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, len(ranked), q))
    for k in range(resamples):
        rows, cols = rng.integers(m, size=m), rng.integers(q, size=q)
        y = rb[np.ix_(rows, cols)]
        y = y - y.mean(0)
        for j, ra in enumerate(ranked):
            x = ra[np.ix_(rows, cols)]
            x = x - x.mean(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[k, j] = (x * y).sum(0) / np.sqrt((x * x).sum(0) * (y * y).sum(0))
    return out


def _percentiles(draws: np.ndarray, level: float) -> list:
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(draws, [tail, 100 - tail])
    return [float(low), float(high)]


def paired_lds_difference(predicted_a, predicted_b, losses, seed: int = 0, resamples: int = 1000,
                          level: float = 0.95) -> dict:
    """LDS(a) - LDS(b) of two methods on the same subsets and queries, with paired intervals: both methods are
    scored on each resample, so the noise they share (which subsets, which queries) cancels in the difference
    (two separate intervals overlap where the paired one may not).

    The LDS is that of :func:`datamodel_score` (Park et al. 2023, eq. 4): the mean over queries of the Spearman over
    subsets between a method's predicted loss change and the seed-mean measured loss.

    Args:
        predicted_a, predicted_b: (M, Q) predictions of the two methods (any monotone scale per query).
        losses: (M, S, Q) measured query losses (nats/token), NaN for a model not trained yet (its subset is left
            out).
        seed: of the resampling (``numpy.random.default_rng``). resamples: B >= 1. level: in (0, 1).
    Returns:
        {"difference": mean over queries of rho_a - rho_b, "ci": percentile interval resampling queries
        (``scipy.stats.bootstrap`` of the per-query differences), "ci_two_way": resampling subsets and queries
        together (the crossed bootstrap of :func:`two_way_bootstrap_ci`, the same draws for both methods),
        "per_query": (Q,) differences, "subsets": M used}.
    Raises:
        ValueError: shapes that disagree, non-finite predictions, fewer than 3 complete subsets, resamples not an
            int >= 1 or level not in (0, 1).
    """
    a, b, losses = (np.asarray(x.double().cpu() if torch.is_tensor(x) else x, dtype=np.float64)
                    for x in (predicted_a, predicted_b, losses))
    if a.shape != b.shape or a.ndim != 2 or losses.ndim != 3 or a.shape != (losses.shape[0], losses.shape[2]):
        raise ValueError(f"need predicted_a, predicted_b (M, Q) and losses (M, S, Q); got {a.shape}, {b.shape}, "
                         f"{losses.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("a prediction holds NaN or Inf (a diverged solver?)")
    if not (isinstance(resamples, int) and resamples >= 1) or not 0 < level < 1:
        raise ValueError(f"need an int resamples >= 1 and 0 < level < 1, got {resamples!r} and {level!r}")
    done = ~np.isnan(losses).any(axis=(1, 2))
    if done.sum() < 3:
        raise ValueError(f"only {int(done.sum())} subsets have every seed's losses; the LDS needs at least 3")
    a, b, actual = a[done], b[done], losses[done].mean(1)
    diff = _spearman_columns(a, actual) - _spearman_columns(b, actual)
    diff = diff[np.isfinite(diff)]
    ci = list(bootstrap_ci(lambda idx: float(diff[idx].mean()), len(diff), seed, resamples, level)) \
        if len(diff) > 1 else [float("nan"), float("nan")]
    rhos = _crossed_rhos([a, b], actual, seed, resamples)
    d = rhos[:, 0] - rhos[:, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample whose columns are all constant
        draws = np.nanmean(d, axis=1)
    return {"difference": float(diff.mean()), "ci": ci, "ci_two_way": _percentiles(draws, level),
            "per_query": diff.tolist(), "subsets": int(done.sum())}


def two_way_bootstrap_ci(predicted, actual, seed: int = 0, resamples: int = 1000, level: float = 0.95) -> list:
    """Percentile interval of the mean over queries of the per-query Spearman over subsets, resampling subsets (rows)
    and queries (columns) together (a crossed bootstrap: both are finite samples).

    The ranks are taken once over all subsets; each resample's per-query Spearman is the Pearson correlation of the
    resampled rows' ranks (the bootstrap of Spearman's rho as the Pearson correlation of the rank-transformed data).

    Args:
        predicted, actual: (M, Q) float arrays (the prediction and the measured loss of subset m for query q).
        seed: of ``numpy.random.default_rng``. resamples: B >= 1. level: in (0, 1).
    Returns:
        [low, high]; NaN when M < 3.
    Raises:
        ValueError: shapes differ or are not 2-D; resamples not an int >= 1; level not in (0, 1).
    """
    a, b = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"predicted {a.shape} and actual {b.shape} must be the same (M, Q) shape")
    if not (isinstance(resamples, int) and resamples >= 1) or not 0 < level < 1:
        raise ValueError(f"need an int resamples >= 1 and 0 < level < 1, got {resamples!r} and {level!r}")
    m, q = a.shape
    if m < 3:
        return [float("nan"), float("nan")]
    rho = _crossed_rhos([a], b, seed, resamples)[:, 0]
    finite = np.isfinite(rho).any(axis=1)
    draws = np.full(resamples, np.nan)
    draws[finite] = np.nanmean(rho[finite], axis=1)
    return _percentiles(draws, level)


def detection_metrics(scores, is_corrupted, inspected=(0.05, 0.1, 0.2)) -> dict:
    """How well a ranking finds the corrupted samples: AUROC and average precision (scikit-learn's
    ``roc_auc_score`` and ``average_precision_score``, higher score = more suspect) and the recall after inspecting
    the top fraction f of the ranking (the share of the corrupted samples among the ceil(f n) highest scores; the
    "fraction of data inspected" curves of Koh & Liang 2017, fig. 6, and kronfluence).

    Args:
        scores: (n,) float, higher = flagged first. is_corrupted: (n,) bool, at least one of each class.
        inspected: fractions in (0, 1].
    Returns:
        {"auroc", "average_precision", "recall_at": {str(f): recall}, "n", "corrupted"}.
    Raises:
        ValueError: shapes differ, one class only, non-finite scores, or a fraction outside (0, 1].
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(is_corrupted, dtype=bool)
    if scores.shape != truth.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and is_corrupted {truth.shape} must be the same (n,) shape")
    if truth.all() or not truth.any():
        raise ValueError("is_corrupted needs both corrupted and clean samples")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or Inf")
    if any(not 0 < f <= 1 for f in inspected):
        raise ValueError(f"inspected fractions must be in (0, 1], got {inspected}")
    order = np.argsort(-scores, kind="stable")
    recall = {repr(float(f)): float(truth[order[: int(np.ceil(f * len(scores)))]].sum() / truth.sum())
              for f in inspected}
    return {"auroc": float(roc_auc_score(truth, scores)), "average_precision": float(average_precision_score(truth, scores)),
            "recall_at": recall, "n": int(len(scores)), "corrupted": int(truth.sum())}
