"""Agreement between influence scores: rank and linear correlations, top-k overlap, sign agreement."""

from __future__ import annotations

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
