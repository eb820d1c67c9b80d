"""Spectrum statistics of the whole network's curvature (Karakida, Akaho, Amari 2019): m, s and lambda_max of the
true Fisher, the Hessian and the sentence-level EF, by the matrix-free estimators of
:mod:`ifutils.curvature.estimators`."""

from __future__ import annotations

import time

import torch

from ..curvature.estimators import (
    CURVATURES,
    CurvatureProducts,
    hutchinson,
    lambda_max,
    rademacher,
)
from ..model import LSTMLM
from ..progress import progress


def spectrum_stats(
    model: LSTMLM,
    sentences: list[torch.Tensor],
    eos_id: int,
    curvatures: tuple[str, ...] = CURVATURES,
    names: list[str] | None = None,
    probes: int = 8,
    tol: float = 1e-3,
    max_matvecs: int = 60,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, dict]:
    """m = tr(C)/P, s = tr(C^2)/P (Hutchinson) and lambda_max (Lanczos) for each curvature C of L.

    Args:
        model, sentences, eos_id, names, batch_size: as in :class:`CurvatureProducts`.
        curvatures: a subset of ``("F", "H", "EF")``: true Fisher (= GGN), Hessian, sentence-level EF.
        probes: Rademacher probes K >= 1 (the same ones, seeded by ``seed``, for every curvature).
        tol, max_matvecs: Lanczos settings (:func:`lambda_max`).
    Returns:
        {name: {"P", "n", "probes", "mean", "mean_se", "second_moment", "second_moment_se", "lambda_max",
        "lanczos_converged", "lanczos_matvecs", "seconds"}}; units: nats/token per parameter^2 for m and
        lambda_max, their square for s. "EF" also has "exact": m, s and lambda_max from the n x n Gram matrix
        G G^T / n, which has the EF's nonzero eigenvalues (its rank is at most n), a check on the estimators.
    Raises:
        ValueError: bad sentences or names (:class:`CurvatureProducts`), probes < 1, or an unknown curvature.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    unknown = [c for c in curvatures if c not in CURVATURES]
    if unknown or not curvatures:
        raise ValueError(f"unknown or no curvatures {unknown}; choose from {', '.join(CURVATURES)}")
    ops = CurvatureProducts(model, sentences, eos_id, names, batch_size)
    ref = next(iter(ops.params.values()))
    vs = rademacher(probes, ops.p, seed, ref.dtype, ref.device)
    results = {}
    bar = progress(total=len(curvatures) * (probes + max_matvecs), desc="curvature-vector products", unit="Cv")
    for name in curvatures:
        start = time.perf_counter()
        bar.set_postfix(curvature=name)

        product = ops.matvec(name)

        def counted(v, product=product):
            bar.update()
            return product(v)

        stats = {"P": ops.p, "n": len(sentences), "probes": probes, **hutchinson(counted, vs),
                 **lambda_max(counted, ops.p, ref.dtype, ref.device, tol, max_matvecs, seed)}
        if name == "EF":
            g = ops.sentence_grads()
            gram = torch.linalg.eigvalsh((g @ g.T).double() / len(g))
            stats["exact"] = {"mean": float(gram.sum()) / ops.p, "second_moment": float(gram.square().sum()) / ops.p,
                              "lambda_max": float(gram[-1])}
        stats["seconds"] = time.perf_counter() - start
        results[name] = stats
    bar.close()
    return results


def preferred_estimates(entry: dict) -> dict:
    """``entry`` (a :func:`spectrum_stats` result with ``width``/``state``/``curvature``) with its exact m, s and
    lambda_max in place of the probe estimates where it has them (the EF, from its n x n Gram matrix), their standard
    errors then 0; other entries are returned unchanged. Tables and figures use this, so they show the exact values."""
    exact = entry.get("exact")
    if not exact:
        return entry
    return {**entry, **exact, **{f"{k}_se": 0.0 for k in exact if f"{k}_se" in entry}}
