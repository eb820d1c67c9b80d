"""Ground truth by retraining the whole model: remove the sentences an influence method ranks most harmful.

Influence of training sentence i on the validation objective (Koh & Liang 2017, eq. 2), on the recurrent
parameter subset (:func:`ifutils.subset.default_subset`) of a small model trained on the first n sentences:

    I_i = -g_val^T (C + lambda I)^{-1} g_i,

g_i the gradient of sentence i's mean token NLL (nats/token) and g_val that of the validation sample's NLL per
token, sum_j T_j g_j / sum_j T_j, i.e. of its log perplexity. Positive I_i = harmful: removing a set R changes
the validation loss by about -(1/n) sum_{i in R} I_i (first order, additive over R), so removing the top k% by
score should lower validation perplexity more than removing k% at random.

The check (Basu, Pope, Feizi 2021, "Influence functions in deep learning are fragile", sec. 5): for each method
and seed, retrain from scratch without the top k%, with that seed, and compare the validation perplexity with the
full-data model of the same seed. The full-data perplexity's seed-to-seed spread is the noise floor a method's
change must clear before it says anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..cache import fingerprint
from ..config import param, require_positive, validate_fields
from ..curvature import (
    IdentityCurvature,
    empirical_fisher,
    hessian_and_ggn,
    scale_damping,
)
from ..data import Corpus
from ..grads import per_sample_grads
from ..influence import influence
from ..io import atomic_write, environment
from ..model import LSTMLM, ModelConfig
from ..progress import progress
from ..subset import SubsetLoss, default_subset
from ..train import TrainConfig, perplexity, train_language_model

METHODS = ("hessian", "ggn", "ef", "identity", "random")
"""Curvature keys (:mod:`ifutils.curvature.labels`) of the influence methods, and ``"random"`` removal."""


@dataclass
class RetrainConfig:
    """Settings of the retraining check (defaults: about 11 minutes on 2 uncontended CPU cores).

    Attributes:
        n_train: the full data set is the first n_train training sentences.
        emb_dim, hidden, dropout: the one-layer model (vocabulary from the corpus).
        epochs, batch_size, lr: optimisation, as :class:`ifutils.train.TrainConfig`.
        seeds: each seed trains one full-data model and one model per method (at least two, for a spread).
        percent: k, the percentage of the n_train sentences removed, in (0, 100).
        methods: subset of :data:`METHODS`.
        num_coords: p, coordinates of ``weight_hh`` the influence is computed on.
        n_hessian: n_H, the first n_H training sentences every curvature is estimated from.
        n_valid: validation sentences (seeded sample) whose loss the scores target.
        damping_alpha: lambda = alpha * trace(G) / p, the GGN's mean eigenvalue, raised to twice the magnitude of
            the Hessian's most negative eigenvalue when it is smaller (so H + lambda I is positive definite); one
            lambda for every curvature.
        score_seed: seeds the coordinates, the validation sample and the random method.
    """

    n_train: int = param(5000, "the full data set is the first n_train training sentences")
    emb_dim: int = param(64, "embedding width of the one-layer model")
    hidden: int = param(64, "LSTM width of the one-layer model")
    dropout: float = param(0.25, "dropout during training")
    epochs: int = param(3, "training epochs of every model")
    batch_size: int = param(32, "sentences per batch")
    lr: float = param(2e-3, "Adam learning rate")
    seeds: tuple[int, ...] = param((0, 1, 2), "each seed trains one full-data model and one per method (>= 2)")
    percent: float = param(10.0, "k, percentage of the n_train sentences removed, in (0, 100)")
    methods: tuple[str, ...] = param(METHODS, f"influence methods, a subset of {', '.join(METHODS)}")
    num_coords: int = param(256, "p, coordinates of weight_hh the influence is computed on")
    n_hessian: int = param(500, "n_H, the first n_H training sentences every curvature is estimated from")
    n_valid: int = param(1000, "validation sentences (seeded sample) whose loss the scores target")
    damping_alpha: float = param(1.0, "lambda = alpha tr(G)/p, raised above twice the most negative H eigenvalue")
    score_seed: int = param(0, "seeds the coordinates, the validation sample and the random method")

    def __post_init__(self):
        validate_fields(self)
        require_positive(self, "n_train", "emb_dim", "hidden", "epochs", "batch_size", "num_coords", "n_hessian",
                         "n_valid")
        if not 0 < self.percent < 100:
            raise ValueError(f"percent must be in (0, 100), got {self.percent}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown or no methods {list(unknown)}; choose from {', '.join(METHODS)}")
        if len(set(self.seeds)) < 2:
            raise ValueError(f"seeds must hold at least two distinct seeds for a spread, got {self.seeds}")
        if self.n_hessian > self.n_train:
            raise ValueError(f"n_hessian={self.n_hessian} must not exceed n_train={self.n_train}")


def without(corpus: Corpus, n_train: int, removed) -> Corpus:
    """A copy of ``corpus`` whose train split is ``train[:n_train]`` minus the sentences at ``removed``.

    The name records n_train and a hash of the removed set; the trainer stores it in every checkpoint and
    :func:`ifutils.io.check_corpus` refuses to resume a checkpoint under another name, so a resumed run cannot
    mix two removal sets.

    Args:
        corpus: the data; valid and test splits are shared, not copied.
        n_train: size of the full training set.
        removed: indices into ``train[:n_train]`` (any iterable of ints; empty for the full data).
    Raises:
        ValueError: n_train larger than the split, or an index repeated or outside [0, n_train).
    """
    train = corpus.splits["train"]
    if not 1 <= n_train <= len(train):
        raise ValueError(f"n_train={n_train} must be in [1, {len(train)}] (the train split's size)")
    removed = sorted(int(i) for i in removed)
    if len(set(removed)) != len(removed) or (removed and not 0 <= removed[0] <= removed[-1] < n_train):
        raise ValueError(f"removed indices must be distinct and in [0, {n_train}); got {len(removed)} indices "
                         f"from {removed[:1]} to {removed[-1:]}")
    drop = set(removed)
    name = f"{corpus.name} train[:{n_train}]"
    if removed:
        name += f" without {len(removed)} sentences ({fingerprint(removed)[:12]})"
    kept = [s for i, s in enumerate(train[:n_train]) if i not in drop]
    return Corpus(name, corpus.vocab, {**corpus.splits, "train": kept}, corpus.window)


def top_percent(scores: torch.Tensor, percent: float) -> torch.Tensor:
    """Indices of the round(n * percent / 100) largest of the (n,) ``scores``, largest first.

    Raises:
        ValueError: ``percent`` outside (0, 100), or so small that no sentence would be removed.
    """
    if not 0 < percent < 100:
        raise ValueError(f"percent must be in (0, 100), got {percent}")
    count = round(len(scores) * percent / 100)
    if count == 0:
        raise ValueError(f"{percent}% of {len(scores)} sentences rounds to none; raise percent or n_train")
    return torch.topk(scores, count).indices


def validation_sample(corpus: Corpus, config: RetrainConfig) -> list[torch.Tensor]:
    """The n_valid validation sentences the scores target, drawn without replacement (seeded by score_seed).

    Raises:
        ValueError: n_train or n_valid larger than its split.
    """
    valid = corpus.splits["valid"]
    if config.n_train > len(corpus.splits["train"]) or config.n_valid > len(valid):
        raise ValueError(f"n_train={config.n_train} / n_valid={config.n_valid} exceed the splits "
                         f"({len(corpus.splits['train'])} / {len(valid)})")
    generator = torch.Generator().manual_seed(config.score_seed)
    return [valid[i] for i in torch.randperm(len(valid), generator=generator)[: config.n_valid].tolist()]


def harmfulness(
    model: LSTMLM, corpus: Corpus, config: RetrainConfig, cache_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Influence of each of the first n_train training sentences on the validation sample's loss (module docstring).

    Curvatures, all from the first n_H training sentences: the exact Hessian H and the GGN G (= closed-form true
    Fisher, :func:`ifutils.curvature.hessian_and_ggn`), the sentence-level empirical Fisher
    (:func:`ifutils.curvature.empirical_fisher`) and the identity (gradient dot product); ``"random"`` draws
    i.i.d. uniform scores (seeded), so its top k% is a uniformly random k%. With ``cache_dir`` the gradient and
    Hessian passes save their chunks there (:class:`~ifutils.cache.ChunkCache`) and a killed run resumes them.

    Returns:
        ({method: (n_train,) float64 scores, positive = harmful}, lambda) for ``config.methods``.
    """
    train, sample = corpus.splits["train"][: config.n_train], validation_sample(corpus, config)
    loss = SubsetLoss(model, default_subset(model, "recurrent", config.num_coords, config.score_seed),
                      corpus.vocab.stoi["<eos>"])
    g_train = per_sample_grads(loss, train, desc="train gradients", cache_dir=cache_dir)
    g_sample = per_sample_grads(loss, sample, desc="validation gradients", cache_dir=cache_dir).double()
    tokens = torch.tensor([len(s) for s in sample], dtype=torch.float64)
    g_val = (tokens @ g_sample / tokens.sum())[None]  # (1, p): gradient of the sample's NLL per token
    hessian_part = train[: config.n_hessian]
    hess, ggn = hessian_and_ggn(loss, hessian_part, cache_dir=cache_dir)
    ef = empirical_fisher(g_train[: config.n_hessian], torch.tensor([len(s) for s in hessian_part]))
    curvatures = {c.name: c for c in (hess, ggn, ef, IdentityCurvature(loss.subset.size))}
    damping = scale_damping(hess, ggn, config.damping_alpha)
    scores = {m: influence(g_train, g_val, curvatures[m], damping)[:, 0] for m in config.methods if m != "random"}
    if "random" in config.methods:
        generator = torch.Generator().manual_seed(config.score_seed)
        scores["random"] = torch.rand(len(train), generator=generator, dtype=torch.float64)
    return scores, damping


def _summary(per_seed: dict[str, float]) -> dict:
    """Per-seed values, their mean and seed-to-seed standard deviation (ddof=1; None below two seeds)."""
    v = list(per_seed.values())
    return {"per_seed": per_seed, "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None}


def retrain_check(
    corpus: Corpus, config: RetrainConfig, checkpoint_dir: str | os.PathLike, results_path: str | os.PathLike,
    device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Run the check: full-data models, scores from the seed-``seeds[0]`` model, one retraining per method and seed.

    Every training is its own checkpoint under ``checkpoint_dir/<hash of the training settings>/``, named by seed,
    method and a hash of the removed set, and resumes after a kill (:func:`ifutils.train.train_language_model`);
    the results JSON is rewritten atomically after every training, with ``"complete": false`` until the end;
    ``cache_dir`` is passed to :func:`harmfulness`.

    Returns (and writes to ``results_path``) a dict with:
        ``config``, ``damping`` (lambda), ``n_removed``, ``environment``;
        ``full``: {split: {"per_seed": {seed: ppl}, "mean", "std"}} for ``"valid"`` (the whole validation split)
        and ``"valid sample"`` (the n_valid sentences the scores target); per-token perplexity, seeds as strings;
        ``noise_floor``: {split: seed-to-seed std (ddof=1) of the full-data perplexity};
        ``removed``: {method: indices into train[:n_train], most harmful first};
        ``methods``: {method: {split: {"per_seed": {seed: ppl(removed) - ppl(full)}, "mean", "std"}, and for
        influence methods "predicted_delta_nll": -(1/n) sum_{i in R} I_i, nats/token on the sample}};
        ``complete``.
    """
    eos_id = corpus.vocab.stoi["<eos>"]
    model_config = ModelConfig(len(corpus.vocab), config.emb_dim, config.hidden, 1, config.dropout)
    training = {k: getattr(config, k) for k in ("n_train", "epochs", "batch_size", "lr")}
    folder = Path(checkpoint_dir) / fingerprint(corpus.name, model_config.to_dict(), training)[:12]
    splits = {"valid": corpus.splits["valid"], "valid sample": validation_sample(corpus, config)}
    results = {"config": asdict(config), "environment": environment(), "complete": False}

    def write():
        atomic_write(results_path, lambda tmp: tmp.write_text(json.dumps(results, indent=1)))

    def train(seed: int, tag: str, removed) -> tuple[LSTMLM, dict[str, float]]:
        data = without(corpus, config.n_train, removed)
        name = f"seed{seed}_{tag}" + (f"_{fingerprint(sorted(removed))[:12]}" if len(removed) else "")
        model, _ = train_language_model(
            data, model_config, TrainConfig(config.epochs, config.batch_size, config.lr, seed=seed),
            folder / f"{name}.pt", device)
        return model, {split: perplexity(model, s, eos_id) for split, s in splits.items()}

    full = {}
    for seed in progress(config.seeds, desc="full-data trainings", unit="training"):
        model, full[str(seed)] = train(seed, "full", [])
        if seed == config.seeds[0]:
            scores, damping = harmfulness(model, corpus, config, cache_dir)
    results["full"] = {split: _summary({s: ppl[split] for s, ppl in full.items()}) for split in splits}
    results["noise_floor"] = {split: results["full"][split]["std"] for split in splits}
    removed = {m: top_percent(scores[m], config.percent).tolist() for m in config.methods}
    results.update(damping=damping, n_removed=len(removed[config.methods[0]]), removed=removed, methods={})
    write()
    delta = {m: {} for m in config.methods}
    for method, seed in progress([(m, s) for m in config.methods for s in config.seeds], desc="retrainings", unit="training"):
        ppl = train(seed, method, removed[method])[1]
        delta[method][str(seed)] = {split: ppl[split] - full[str(seed)][split] for split in splits}
        entry = {split: _summary({s: d[split] for s, d in delta[method].items()}) for split in splits}
        if method != "random":  # first-order prediction; the random scores are no influence
            entry["predicted_delta_nll"] = -float(scores[method][removed[method]].sum()) / config.n_train
        results["methods"][method] = entry
        write()
    results["complete"] = True
    write()
    return results
