"""The Fisher-vs-Hessian comparison as named stages, each called by one cell of ``fisher_if.ipynb``."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from .config import require_positive, validate_fields
from .curvature import (
    Curvature,
    IdentityCurvature,
    empirical_fisher,
    hessian_and_ggn,
    mc_true_fisher,
)
from .data import Corpus
from .evaluate import agreement
from .grads import SubsetLoss
from .influence import influence, relative_damping

REFERENCE = "Hessian"


@dataclass
class InfluenceConfig:
    """Settings of one comparison; saved into the results file.

    Attributes:
        subset: ``"recurrent"`` (last ``weight_hh``) or ``"decoder"`` (``decoder.weight``).
        num_coords: p, coordinates drawn (seeded) from the subset's tensors.
        n_hessian: n_H training sentences every curvature is estimated from.
        n_train: training sentences scored (the n_H sentences are the first n_H of them).
        n_test: test sentences whose loss is explained.
        mc_samples: k, label draws per position for the Monte Carlo true Fisher.
        absolute_dampings: lambda values shared by all curvatures.
        relative_alphas: alpha values; each curvature C gets lambda = alpha * trace(C) / p.
        scatter_damping: absolute damping of the scores drawn in the scatter figure (1e-4 is the scale of the
            default subset's largest Hessian eigenvalues, where the curvatures differ most).
        top_k: size of the helpful/harmful sets compared.
        seed: seeds sample choice, coordinate choice and label draws.
        dtype: ``"float32"`` or ``"float64"`` for gradients and curvature products.
        chunk_size: sentences per vectorised chunk.
    """

    subset: str = "recurrent"
    num_coords: int = 512
    n_hessian: int = 500
    n_train: int = 2000
    n_test: int = 20
    mc_samples: int = 4
    absolute_dampings: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    relative_alphas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    scatter_damping: float = 1e-4
    top_k: int = 20
    seed: int = 0
    dtype: str = "float32"
    chunk_size: int = 32

    def __post_init__(self):
        validate_fields(self)
        require_positive(self, "num_coords", "n_hessian", "n_train", "n_test", "mc_samples", "top_k", "chunk_size")
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
    """Wall time of named stages, in seconds: ``with timer("grads"): ...``; ``timer.seconds``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
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
    timer: StageTimer, cache_dir: str | None = None,
) -> dict[str, Curvature]:
    """Every curvature of the comparison, all from the same n_H sentences.

    Args:
        train_grads_h: (n_H, p) per-sample gradients of those sentences (reused by the EF).
        cache_dir: where the long stages save their chunks, so that a killed run resumes.
    Returns:
        name -> Curvature: Hessian, GGN (true Fisher, closed form), true Fisher (MC) and its
        diagonal, EF and its diagonal, identity.
    """
    with timer("curvature: Hessian + GGN"):
        hess, ggn = hessian_and_ggn(loss, sentences, cache_dir=cache_dir)
    with timer("curvature: EF"):
        lengths = torch.tensor([len(s) for s in sentences], device=train_grads_h.device)
        ef = empirical_fisher(train_grads_h, lengths)
    with timer("curvature: true Fisher (MC)"):
        mc = mc_true_fisher(loss, sentences, config.mc_samples, config.seed, config.chunk_size, cache_dir)
    curvatures = [hess, ggn, mc, mc.diagonal(), ef, ef.diagonal(), IdentityCurvature(hess.p)]
    return {c.name: c for c in curvatures}


def spectrum_summary(curvature: Curvature) -> dict[str, float]:
    """Eigenvalue statistics (Karakida et al. 2019): mean, second moment, extremes, negatives."""
    ev = curvature.eigvalsh()
    neg = ev[ev < 0]
    return {
        "mean": float(ev.mean()), "second_moment": float((ev**2).mean()), "max": float(ev.max()),
        "min": float(ev.min()), "num_negative": int(len(neg)),
        "negative_mass": float(neg.abs().sum() / ev.abs().sum()),
    }


def damping_sweep(
    train_grads: torch.Tensor, test_grads: torch.Tensor, curvatures: dict[str, Curvature], config: InfluenceConfig
) -> list[dict]:
    """Agreement of every curvature with the exact Hessian over both damping modes.

    Absolute mode: every curvature, the Hessian included, is damped by the same lambda.
    Relative mode: each curvature C is damped by alpha * trace(C) / p and compared with the Hessian
    damped by alpha * trace(H) / p. Each row holds ``curvature``, ``mode``, ``value`` (lambda or
    alpha), ``damping`` (the lambda used), ``reference_indefinite`` (True when H + lambda_H I has a
    negative eigenvalue, so the "exact" reference itself is not a minimum-based influence) and the
    :func:`~ifutils.evaluate.agreement` metrics.
    """
    rows = []
    hess = curvatures[REFERENCE]
    settings = [("absolute", v, lambda c, v=v: v) for v in config.absolute_dampings]
    settings += [("relative", a, lambda c, a=a: relative_damping(c, a)) for a in config.relative_alphas]
    smallest = float(hess.eigvalsh()[0])
    for mode, value, damping_of in settings:
        reference = influence(train_grads, test_grads, hess, damping_of(hess))
        indefinite = smallest + damping_of(hess) <= 0
        for name, curvature in curvatures.items():
            damping = damping_of(curvature)
            scores = influence(train_grads, test_grads, curvature, damping)
            rows.append({"curvature": name, "mode": mode, "value": value, "damping": damping,
                         "reference_indefinite": indefinite, **agreement(reference, scores, config.top_k)})
    return rows


def format_table(rows: list[dict], metrics: tuple[str, ...] = ("pearson", "spearman", "kendall", "top_k_harmful",
                                                              "top_k_helpful", "sign_agreement")) -> str:
    """Plain-text table of sweep rows, one line per (curvature, mode, value)."""
    head = f"{'curvature':34s} {'mode':8s} {'value':>8s} {'damping':>9s} " + " ".join(f"{m[:9]:>9s}" for m in metrics)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['curvature']:34s} {r['mode']:8s} {r['value']:8.0e} {r['damping']:9.2e} "
                     + " ".join(f"{r[m]:9.3f}" for m in metrics))
    return "\n".join(lines)
