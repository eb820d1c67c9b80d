"""The Fisher-vs-Hessian comparison as named stages, each called by one cell of ``fisher_if.ipynb``."""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from scipy import stats

from ..config import param, require_positive, validate_fields
from ..curvature import (
    Curvature,
    DenseCurvature,
    DiagonalCurvature,
    IdentityCurvature,
    LowRankCurvature,
    empirical_fisher,
    hessian_and_ggn,
    mc_true_fisher,
)
from ..curvature.labels import label
from ..data import Corpus
from ..influence import (
    gradient_similarity,
    influence,
    outlier_scores,
    self_influence,
)
from ..metrics import agreement
from ..progress import stage as log_stage
from ..subset import SubsetLoss

REFERENCE = "hessian"
"""Key of the reference curvature, the exact Hessian (keys and labels: :mod:`ifutils.curvature.labels`)."""
GGN = "ggn"
"""Key of the Gauss-Newton matrix (= true Fisher in closed form)."""


def mc_fisher_key(mc_samples: int) -> str:
    """Key of the Monte Carlo true Fisher from ``mc_samples`` label draws, e.g. ``"mc_fisher_k4"``.

    Raises:
        ValueError: ``mc_samples`` is not a positive int.
    """
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int (InfluenceConfig.mc_samples), got {mc_samples!r}")
    return f"mc_fisher_k{mc_samples}"


def dense_spectra_keys(mc_samples: int) -> tuple[str, ...]:
    """Keys of the curvatures whose spectra the notebook shows: the Hessian, the GGN, the Monte Carlo true Fisher
    from ``mc_samples`` draws, the sentence- and token-level EF, KFAC and EK-FAC (a key the run did not build, e.g.
    KFAC on an uncovered subset, is skipped by the caller)."""
    return (REFERENCE, GGN, mc_fisher_key(mc_samples), "ef", "ef_token", "kfac", "ekfac")


def scatter_keys(mc_samples: int) -> tuple[str, ...]:
    """Keys of the curvatures in the notebook's score scatter against exact-Hessian influence: the GGN, the Monte
    Carlo true Fisher from ``mc_samples`` draws, the sentence- and token-level EF, the GGN's diagonal, KFAC, EK-FAC
    and the identity (the damping-free gradient cosine, ``"cosine"``, is added by the caller)."""
    return (GGN, mc_fisher_key(mc_samples), "ef", "ef_token", "ggn_diag", "kfac", "ekfac", "identity")


@dataclass
class InfluenceConfig:
    """Settings of one comparison; saved into the results file.

    Attributes:
        subset: ``"recurrent"`` (last ``weight_hh``), ``"decoder"`` (``decoder.weight``) or ``"lstm+decoder"``
            (see :func:`~ifutils.subset.default_subset`).
        num_coords: p, coordinates drawn (seeded) from the subset's tensors.
        n_hessian: n_H training sentences every curvature is estimated from.
        n_train: training sentences scored (the n_H sentences are the first n_H of them).
        n_test: test sentences whose loss is explained.
        mc_samples: k, label draws per position for the Monte Carlo true Fisher.
        absolute_dampings: lambda values shared by all curvatures.
        relative_alphas: alpha values; each curvature C gets lambda = alpha * trace(C) / p.
        default_damping: the absolute damping of the "default" column of the comparison table, of the scatter
            figure and of the Hessian-free detection scores (1e-4 is the scale of the default subset's largest
            Hessian eigenvalues, where the curvatures differ most, and keeps H + lambda I positive definite there).
        top_k: size of the helpful/harmful sets compared.
        top_fraction: the top-fraction overlap reported in the comparison table (0.1 = top 10%).
        mc_error_ks: draw counts k at which the Monte Carlo true Fisher's error against the closed form is shown.
        arnoldi_rank: r, Ritz pairs kept by the Arnoldi iHVP (Schioppa et al. 2022).
        lissa_depth: LiSSA recursion depth; its scale is 1.1 x the largest Ritz value from Arnoldi.
        seed: seeds sample choice, coordinate choice and label draws.
        dtype: ``"float32"`` or ``"float64"`` for gradients and curvature products.
        chunk_size: sentences per vectorised chunk.
    """

    subset: str = param("recurrent", "parameter subset: recurrent (last weight_hh), decoder or lstm+decoder")
    num_coords: int = param(512, "p, coordinates drawn (seeded) from the subset's tensors")
    n_hessian: int = param(300, "n_H, training sentences every curvature is estimated from")
    n_train: int = param(2000, "training sentences scored (the n_H are the first n_H of them)")
    n_test: int = param(20, "test sentences whose loss is explained")
    mc_samples: int = param(4, "k, label draws for the Monte Carlo true Fisher (and the KFAC gate factors)")
    absolute_dampings: tuple[float, ...] = param((1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1), "lambda values shared by all curvatures")
    relative_alphas: tuple[float, ...] = param((1e-3, 1e-2, 1e-1, 1.0, 10.0), "alpha values: lambda = alpha tr(C)/p per curvature")
    default_damping: float = param(1e-4, "absolute lambda of the table's default column, the scatter and detection")
    top_k: int = param(20, "size of the most-helpful / most-harmful sets compared")
    top_fraction: float = param(0.1, "top-fraction overlap reported in the comparison table")
    mc_error_ks: tuple[int, ...] = param((1, 2, 4, 8, 16), "k at which the MC true Fisher's error is shown")
    arnoldi_rank: int = param(64, "Ritz pairs kept by the Arnoldi iHVP")
    lissa_depth: int = param(2000, "LiSSA recursion depth")
    seed: int = param(0, "seeds sample choice, coordinate choice and label draws")
    dtype: str = param("float32", "float32 or float64 for gradients and curvature products")
    chunk_size: int = param(32, "sentences per vectorised chunk")

    def __post_init__(self):
        validate_fields(self)
        require_positive(self, "num_coords", "n_hessian", "n_train", "n_test", "mc_samples", "top_k", "chunk_size",
                         "arnoldi_rank", "lissa_depth")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction={self.top_fraction} must be in (0, 1]")
        if min(self.mc_error_ks, default=1) < 1:
            raise ValueError(f"mc_error_ks must be positive draw counts, got {self.mc_error_ks}")
        if self.top_k > self.n_train:
            raise ValueError(f"top_k={self.top_k} must not exceed n_train={self.n_train}; lower top_k")
        if min(self.absolute_dampings, default=0) < 0 or min(self.relative_alphas, default=0) < 0:
            raise ValueError("absolute_dampings and relative_alphas must be >= 0")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"InfluenceConfig.dtype must be 'float32' or 'float64', got {self.dtype!r}")

    def to_dict(self) -> dict:
        """The fields as a dict (stored in results)."""
        return asdict(self)


class StageTimer:
    """Wall time of named stages, in seconds: ``with timer("grads"): ...``; ``timer.seconds``. Each stage's
    start and end are logged (:func:`ifutils.progress.stage`)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        with log_stage(stage):
            yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def choose_samples(corpus: Corpus, config: InfluenceConfig) -> dict[str, list[torch.Tensor]]:
    """Seeded choice of sentences: ``train`` (n_train), ``hessian`` (its first n_H), ``test`` (n_test).

    Raises:
        ValueError: a requested count exceeds its split, is < 1, or n_H > n_train.
    """
    sizes = {"train": len(corpus.splits["train"]), "test": len(corpus.splits["test"])}
    for name, n, split in (("n_train", config.n_train, "train"), ("n_test", config.n_test, "test"),
                           ("n_hessian", config.n_hessian, "train")):
        if not 1 <= n <= sizes[split]:
            raise ValueError(f"{name}={n} must be between 1 and the {split} split's {sizes[split]} sentences")
    if config.n_hessian > config.n_train:
        raise ValueError(f"n_hessian={config.n_hessian} must not exceed n_train={config.n_train}")
    generator = torch.Generator().manual_seed(config.seed)
    train_idx = torch.randperm(sizes["train"], generator=generator)[: config.n_train].tolist()
    test_idx = torch.randperm(sizes["test"], generator=generator)[: config.n_test].tolist()
    train = [corpus.splits["train"][i] for i in train_idx]
    return {"train": train, "hessian": train[: config.n_hessian], "test": [corpus.splits["test"][i] for i in test_idx]}


def build_curvatures(
    loss: SubsetLoss, sentences: list[torch.Tensor], train_grads_h: torch.Tensor, config: InfluenceConfig,
    timer: StageTimer, cache_dir: str | None = None, solvers: bool = True,
) -> dict[str, Curvature]:
    """Every curvature of the comparison, all from the same n_H sentences, each timed under ``"curvature: <stage>"``
    (stage names are text, e.g. ``"curvature: KFAC + EK-FAC"``).

    * exact: Hessian (the reference), GGN (= true Fisher, closed form) and the token-level EF, from one
      structured pass;
    * Monte Carlo true Fisher (k = ``mc_samples``); empirical Fisher at sentence level (EF);
    * diagonal of H, GGN and EF; block-diagonal (one block per parameter tensor) when the subset has several;
    * KFAC and EK-FAC with true-Fisher labels, when every subset tensor is a decoder or last-LSTM-layer one;
    * EF by the Woodbury identity when n_H < p (exact, never a p x p inverse);
    * iHVP solvers without a formed inverse: CG, LiSSA and Arnoldi on the Hessian (applied as a matrix-vector
      product of the exact H, so that only the solver's error is measured; ``ifutils.curvature.inverse.hvp_operator``
      gives the same products by autodiff), and DataInf on the EF (over the whole subset, not per layer as in
      Kwon et al.). LiSSA's scale is 1.1 (|lambda|_max + damping) with |lambda|_max the largest Arnoldi Ritz
      value, depth ``lissa_depth``. Arnoldi keeps the ``arnoldi_rank`` largest-magnitude Ritz pairs, once as
      Schioppa et al. (2022) (projection onto them) and once with 1/damping on their complement;
    * identity (the gradient dot product).

    Args:
        train_grads_h: (n_H, p) per-sample gradients of those sentences (reused by the EF).
        cache_dir: where the long stages save their chunks, so that a killed run resumes.
        solvers: False leaves out the Woodbury EF, the iHVP solvers and DataInf (the robustness sweeps, which
            compare the curvature matrices themselves).
    Returns:
        key -> Curvature (keys: :mod:`ifutils.curvature.labels`), the Hessian first.
    """
    from ..curvature.kfac import (
        ekfac_curvature,
        fit_kfac,
        kfac_curvature,
        uncovered_tensors,
    )

    out: dict[str, Curvature] = {}

    def add(stage, build):
        with timer(f"curvature: {stage}"):
            built = build()
        for c in built if isinstance(built, tuple) else (built,):
            out[c.name] = c
            c.build_stage = stage

    lengths = torch.tensor([len(s) for s in sentences], device=train_grads_h.device)
    add("Hessian + GGN + EF (token)", lambda: hessian_and_ggn(loss, sentences, cache_dir=cache_dir, token_ef=True))
    hess, ggn = out[REFERENCE], out[GGN]
    add("true Fisher (MC)", lambda: mc_true_fisher(loss, sentences, config.mc_samples, config.seed, config.chunk_size, cache_dir))
    add("EF", lambda: empirical_fisher(train_grads_h, lengths))
    ef = out["ef"]
    blocks = list(loss.blocks().values())
    for c in (hess, ggn, ef):  # extracted from the dense matrix: their cost is the parent's
        add(f"diagonal of {label(c.name)}", c.diagonal)
        if len(blocks) > 1:
            add(f"block-diagonal of {label(c.name)}", lambda c=c: c.block_diagonal(blocks))
    def kronecker():
        layers = fit_kfac(loss, sentences, "model", config.mc_samples, config.seed, config.chunk_size, cache_dir=cache_dir)
        return kfac_curvature(layers, hess.p), ekfac_curvature(layers, hess.p)

    uncovered = uncovered_tensors(loss)
    if uncovered:
        print(f"KFAC and EK-FAC skipped: they do not cover {uncovered}")
    else:
        add("KFAC + EK-FAC", kronecker)
    if solvers:
        _add_solvers(add, out, hess, train_grads_h, lengths, config)
    add("identity", lambda: IdentityCurvature(hess.p, "identity", hess.matrix.device))
    return out


def _add_solvers(add, out, hess, train_grads_h, lengths, config) -> None:
    """The Woodbury EF, CG, LiSSA, Arnoldi and DataInf of :func:`build_curvatures`."""
    from ..curvature.inverse import (
        ArnoldiCurvature,
        DataInfCurvature,
        OperatorCurvature,
    )

    if len(train_grads_h) < hess.p:
        add("EF (Woodbury)", lambda: LowRankCurvature.empirical_fisher(train_grads_h, lengths))
    matvec, trace = (lambda v: hess.matrix @ v.to(hess.matrix.device)), float(hess.matrix.trace())
    rank = min(config.arnoldi_rank, hess.p)
    for complement in (False, True):  # named arnoldi_r<rank>[_complement]
        add("Hessian (Arnoldi)", lambda c=complement: ArnoldiCurvature(
            matvec, hess.p, rank, c, seed=config.seed, trace=trace))
    top = float(out[f"arnoldi_r{rank}"].evals.abs().max())
    scale = lambda damping: 1.1 * (top + float(torch.as_tensor(damping).max()))  # noqa: E731  above lambda_max(H + damping)
    add("Hessian (CG)", lambda: OperatorCurvature(matvec, hess.p, "hessian_cg", method="cg", trace=trace))
    add("Hessian (LiSSA)", lambda: OperatorCurvature(matvec, hess.p, "hessian_lissa", method="lissa", trace=trace,
                                                     scale=scale, depth=config.lissa_depth))
    add("EF (DataInf)", lambda: DataInfCurvature(train_grads_h, lengths))


def matrix_errors(curvatures: dict[str, Curvature], references: tuple[str, ...] = (REFERENCE, GGN)) -> dict[str, dict]:
    """Relative Frobenius distance ||C - R||_F / ||R||_F of every curvature held as a matrix (dense, block,
    KFAC/EK-FAC restricted to the subset, diagonal) to each full reference matrix R (cross-block entries
    included, so a block-diagonal approximation is charged for the blocks it drops), before any damping or
    solve. Operators without a matrix are left out.

    Returns:
        {curvature key: {reference key: float}}.
    """
    def dense(c):
        if isinstance(c, DenseCurvature):
            return c.matrix
        if isinstance(c, DiagonalCurvature):
            return torch.diag(c.d)
        return None

    out = {}
    for name, c in curvatures.items():
        m = None if isinstance(c, IdentityCurvature) else dense(c)  # I is not an estimate of H's scale
        if m is not None:
            out[name] = {r: float((m.cpu() - dense(curvatures[r]).cpu()).norm() / dense(curvatures[r]).norm())
                     for r in references}
    return out


def hessian_free_scores(train_grads: torch.Tensor, test_grads: torch.Tensor) -> dict[str, torch.Tensor]:
    """Damping-free pairwise scores compared like curvatures: the gradient cosine (the identity curvature
    already gives the dot product, TracIn). key (``"cosine"``) -> (n_train, n_test)."""
    return {"cosine": gradient_similarity(train_grads, test_grads, "cosine")}


def detection_agreement(
    train_grads: torch.Tensor, test_grads: torch.Tensor, hess: Curvature, damping: float, seed: int = 0
) -> dict[str, dict[str, float]]:
    """How well Outlier Gradient Analysis ranks training samples the way exact-Hessian influence does.

    Each outlier score (:func:`~ifutils.influence.outlier_scores`) is compared by Spearman correlation with
    (a) the exact-Hessian influence on the mean test loss, mean_j I[i, j] (positive = harmful), and (b) the
    exact-Hessian self-influence g_i^T (H + damping I)^{-1} g_i, at ``damping``.

    Returns:
        {score name: {"spearman_test_influence", "spearman_self_influence"}}.
    """
    mean_test = influence(train_grads, test_grads, hess, damping).mean(1).cpu().numpy()
    self_inf = self_influence(train_grads, hess, damping).cpu().numpy()
    out = {}
    for name, score in outlier_scores(train_grads, seed).items():
        score = score.cpu().numpy()
        out[name] = {"spearman_test_influence": float(stats.spearmanr(score, mean_test)[0]),
                     "spearman_self_influence": float(stats.spearmanr(score, self_inf)[0])}
    return out


def reported_eigenvalues(curvature: Curvature) -> tuple[torch.Tensor, int, float]:
    """The eigenvalues as reported in tables and figures: clipped at zero for a curvature that is positive
    semi-definite by construction (``curvature.psd``: GGN, true Fisher, EF, KFAC, EK-FAC, their diagonal and block
    parts), where a negative computed eigenvalue is rounding error of the eigensolver (of order eps * ||C||);
    never clipped otherwise (the Hessian's negative eigenvalues are real).

    Returns:
        (eigenvalues (p,) float64 ascending, the number clipped, the clipped mass sum |lambda_i < 0| / sum |lambda_i|
        of the unclipped spectrum, 0.0 when nothing was clipped).
    """
    ev = curvature.eigvalsh().double()
    if not getattr(curvature, "psd", False):
        return ev, 0, 0.0
    neg = ev < 0
    total = float(ev.abs().sum())
    mass = float(ev[neg].abs().sum()) / total if total > 0 else 0.0
    return ev.clamp(min=0.0), int(neg.sum()), mass


def spectrum_summary(curvature: Curvature) -> dict[str, float]:
    """Eigenvalue statistics (Karakida et al. 2019): mean, second moment, extremes, negatives, of the reported
    spectrum (:func:`reported_eigenvalues`: a PSD curvature's rounding-level negatives clipped at zero).

    Returns:
        dict with ``mean``, ``second_moment``, ``max``, ``min``, ``num_negative`` and ``negative_mass``
        (sum |negative| / sum |all|) after clipping; ``psd`` (clipped or not), ``num_clipped`` and
        ``clipped_negative_mass`` (the same ratio for the eigenvalues set to zero; 0 for the Hessian).
    """
    ev, clipped, clipped_mass = reported_eigenvalues(curvature)
    neg = ev[ev < 0]
    total = float(ev.abs().sum())
    return {
        "mean": float(ev.mean()), "second_moment": float((ev**2).mean()), "max": float(ev.max()),
        "min": float(ev.min()), "num_negative": len(neg),
        "negative_mass": float(neg.abs().sum()) / total if total > 0 else 0.0,
        "psd": bool(getattr(curvature, "psd", False)), "num_clipped": clipped, "clipped_negative_mass": clipped_mass,
    }


METRICS = ("pearson", "spearman", "kendall", "top_k_helpful", "top_k_harmful", "top_frac_helpful",
           "top_frac_harmful", "sign_agreement")


def _mean_damping(damping) -> float:
    return float(damping.mean()) if torch.is_tensor(damping) else float(damping)


def damping_sweep(
    train_grads: torch.Tensor, test_grads: torch.Tensor, curvatures: dict[str, Curvature], config: InfluenceConfig,
    fixed_scores: dict[str, torch.Tensor] | None = None, reference_damping: float | None = None,
) -> list[dict]:
    """Agreement of every curvature with the exact Hessian over both damping modes.

    With ``reference_damping`` the reference is H + reference_damping I in every row and only the curvature's
    damping moves: the sweep that finds each approximation's best damping for a fixed exact answer (used by
    :func:`comparison_table`). Without it the reference is damped like the curvature (below): the sweep of the
    correlation-vs-damping figure, where at large damping every method and the reference tend to the gradient
    dot product.

    Absolute mode: every curvature, the Hessian included, is damped by the same lambda.
    Relative mode: each curvature C is damped by alpha * trace(C) / p (per layer for block-structured ones,
    see :meth:`~ifutils.curvature.Curvature.relative_damping`) and compared with the Hessian damped by
    alpha * trace(H) / p. Each row holds ``curvature``, ``mode``, ``value`` (lambda or alpha), ``damping``
    (the lambda used, its mean over coordinates when per layer; NaN with the error in ``warnings`` when the
    curvature has no damping in this mode), ``reference_indefinite`` (True when
    H + lambda_H I has a negative eigenvalue, so the "exact" reference itself is not a minimum-based
    influence), ``warnings`` (what a solver reported, e.g. non-convergence) and the
    :func:`~ifutils.metrics.agreement` metrics. ``fixed_scores`` (damping-free, e.g. the gradient cosine)
    get one row per absolute damping of the reference, ``mode="none"``.
    """
    rows = []
    hess = curvatures[REFERENCE]
    settings = [("absolute", v, lambda c, v=v: v) for v in config.absolute_dampings]
    settings += [("relative", a, lambda c, a=a: c.relative_damping(a)) for a in config.relative_alphas]
    smallest = float(hess.eigvalsh()[0])
    fixed = None if reference_damping is None else influence(train_grads, test_grads, hess, reference_damping)
    for mode, value, damping_of in settings:
        reference_lambda = damping_of(hess) if reference_damping is None else reference_damping
        reference = influence(train_grads, test_grads, hess, reference_lambda) if fixed is None else fixed
        indefinite = smallest + reference_lambda <= 0
        scored = [(name, mode, c) for name, c in curvatures.items()]
        if mode == "absolute":
            scored += [(name, "none", s) for name, s in (fixed_scores or {}).items()]
        for name, row_mode, c in scored:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    damping = float("nan") if row_mode == "none" else damping_of(c)
                    scores = c if row_mode == "none" else influence(train_grads, test_grads, c, damping)
                    failure = []
                except ValueError as err:  # e.g. no relative scale for a block with negative mean curvature
                    scores, failure = None, [str(err)]
            metrics = (agreement(reference, scores, config.top_k, config.top_fraction) if scores is not None
                       else dict.fromkeys(METRICS, float("nan")))
            rows.append({"curvature": name, "mode": row_mode, "value": value,
                         "damping": _mean_damping(damping) if scores is not None else float("nan"),
                         "reference_indefinite": bool(indefinite),
                         "warnings": failure + sorted({str(w.message).split(";")[0] for w in caught}), **metrics})
    return rows


def comparison_table(
    rows: list[dict], curvatures: dict[str, Curvature], timer: StageTimer, default_damping: float
) -> list[dict]:
    """One entry per curvature (or damping-free score): Pearson, Spearman and top-fraction overlap with
    exact-Hessian influence (H + default_damping I), with the curvature damped by ``default_damping`` too (the
    primary column) and at its best damping (highest Spearman over both modes), plus build seconds
    (``shared_with``: curvatures built by the same pass; a diagonal or block-diagonal is extracted from its dense
    parent, so its build cost is the parent's plus the extraction time shown) and bytes held.

    Args:
        rows: :func:`damping_sweep` with ``reference_damping=default_damping``: the exact answer stays fixed
            while the curvature's damping moves. The best damping is thus tuned against the exact answer, an
            upper bound no practitioner could pick without it.
    """
    table = []
    for name in dict.fromkeys(r["curvature"] for r in rows):
        mine = [r for r in rows if r["curvature"] == name]
        best = max(mine, key=lambda r: r["spearman"] if r["spearman"] == r["spearman"] else -math.inf)
        default = next((r for r in mine if r["mode"] in ("absolute", "none") and r["value"] == default_damping), None)
        c = curvatures.get(name)
        stage = getattr(c, "build_stage", None)
        metrics = lambda r: {m: r[m] for m in ("pearson", "spearman", "top_frac_harmful", "top_frac_helpful")}  # noqa: E731
        table.append({
            "curvature": name, "best": {"mode": best["mode"], "value": best["value"], "damping": best["damping"],
                                        **metrics(best)},
            "default": metrics(default) if default else None,
            "build_seconds": timer.seconds.get(f"curvature: {stage}") if stage else None,
            "shared_with": [n for n, o in curvatures.items() if getattr(o, "build_stage", None) == stage and n != name],
            "bytes": c.nbytes if c is not None else None,
        })
    return table


def format_comparison(table: list[dict]) -> str:
    """Plain-text comparison table (``comparison_table``'s entries), each curvature shown by its label."""
    head = (f"{'curvature':36s} {'best damping':>16s} {'Pear':>6s} {'Spear':>6s} {'top10%':>6s} | "
            f"{'Pear':>6s} {'Spear':>6s} {'top10%':>6s} | {'build s':>8s} {'memory':>9s}")
    lines = [f"{'':36s} {'--- at best damping ---':>38s} | {'-- at default --':>20s} |", head, "-" * len(head)]
    for e in table:
        b, d = e["best"], e["default"] or {}
        where = f"{b['mode'][:3]} {b['value']:.0e}" if b["mode"] != "none" else "none"
        frac = lambda m: (m["top_frac_harmful"] + m["top_frac_helpful"]) / 2 if m else float("nan")  # noqa: E731
        secs = "" if e["build_seconds"] is None else f"{e['build_seconds']:.1f}" + ("*" if e["shared_with"] else "")
        mem = "" if e["bytes"] is None else f"{e['bytes'] / 2**20:.2f} MiB"
        lines.append(f"{label(e['curvature']):36s} {where:>16s} {b['pearson']:6.3f} {b['spearman']:6.3f} {frac(b):6.3f} | "
                     f"{d.get('pearson', float('nan')):6.3f} {d.get('spearman', float('nan')):6.3f} {frac(d):6.3f} | "
                     f"{secs:>8s} {mem:>9s}")
    lines.append("reference: H + default lambda I throughout; top10% = mean of the harmful and helpful top-10% "
                 "overlaps; best damping = the curvature's damping tuned against the exact answer (an upper bound); * = time of a pass shared with others; (block-)diagonals: extraction time "
                 "only, add the dense parent's")
    return "\n".join(lines)


def save_comparison(results_file, *, dataset: str, corpus, checkpoint, run_name: str, config: InfluenceConfig,
                    param_subset, spectra: dict, rows: list, table: list, tuned: list, mc_errors: dict,
                    distances: dict, detection: dict, timer: StageTimer, device):
    """Write the ``influence`` section of ``results_file`` in one call: the configuration, every stage's output
    as returned by the functions above, stage times, the device and the environment; the checkpoint's path
    (relative to the repository when inside it) and sha256 go into its provenance record.

    Raises:
        ValueError: the file already holds sections of another checkpoint (see :func:`ifutils.io.update_results`).
    """
    from ..io import environment, stored_path, update_results

    data = {
        "dataset": dataset, "data_label": corpus.name, "run_name": run_name, "checkpoint": stored_path(checkpoint),
        "config": config.to_dict(), "subset": param_subset.to_dict(), "p": param_subset.size,
        "n_hessian": config.n_hessian, "n_train": config.n_train, "n_test": config.n_test,
        "dampings": {"absolute": list(config.absolute_dampings), "relative_alphas": list(config.relative_alphas)},
        "spectra": spectra, "agreement": rows, "comparison": table, "agreement_fixed_reference": tuned,
        "mc_fisher_error": mc_errors, "matrix_errors": distances, "detection": detection, "seconds": timer.seconds,
        "device": str(device), "environment": environment(),
    }
    return update_results(results_file, "influence", data, checkpoint=checkpoint, config=config.to_dict(),
                          run_name=run_name)
