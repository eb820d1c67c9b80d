"""Agreement between influence scores: rank and linear correlations, top-k overlap, sign agreement."""

from __future__ import annotations

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
