"""The linear datamodeling study on the whole network (issue 15): models retrained from scratch on random halves.

Stages (each resumable per model, :mod:`ifutils.retrain`):

1. ``choose``: the model of :class:`~ifutils.retrain.RetrainSpec` trained on all ``n_train`` sentences (seed 0) for
   ``max_epochs`` epochs, keeping every epoch; the number of epochs of every retrained model is the one with the
   lowest validation perplexity (never the test split). Its checkpoint at that epoch is the model whose influence
   scores predict the retrained losses.
2. ``train``: M random subsets of fraction beta (:func:`~ifutils.retrain.random_subsets`), each retrained from
   scratch with every seed of ``seeds``: M x S models, listed subset-major so that a stopped study holds complete
   subsets; every validation sentence's loss under each model is recorded.

The LDS itself (Park et al. 2023, eq. 4) is computed from the records and the influence scores of the full-data
model; the records hold every validation sentence's loss, so the queries can be chosen afterwards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import param, validate_fields
from ..data import Corpus
from ..io import atomic_write
from ..retrain import RetrainSpec, Unit, random_subsets, train_unit
from ..train import TrainConfig, train_language_model

CHOICE_FILE = "epochs.json"


@dataclass
class LdsConfig:
    """The study's design (the model's configuration is the :class:`~ifutils.retrain.RetrainSpec` beside it)."""

    subsets: int = param(100, "M, random training subsets, each retrained with every seed")
    seeds: tuple[int, ...] = param((0, 1), "training seeds of every subset (S >= 2 gives the noise ceiling)")
    beta: float = param(0.5, "fraction of the n_train sentences in each subset")
    subset_seed: int = param(0, "seeds the subset draws")
    max_epochs: int = param(8, "epochs of the full-data model the epoch count is chosen from")

    def __post_init__(self):
        validate_fields(self)
        if self.subsets < 1 or self.max_epochs < 1:
            raise ValueError(f"subsets and max_epochs must be >= 1, got {self.subsets}, {self.max_epochs}")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError(f"seeds must be one or more distinct ints, got {self.seeds}")
        if not 0 < self.beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {self.beta}")


def choose_epochs(corpus: Corpus, spec: RetrainSpec, config: LdsConfig, root: str | Path, device="cpu") -> dict:
    """Stage 1: train (or resume) the full-data model and choose the epoch count by validation perplexity.

    Writes ``<root>/epochs.json``: the history, the chosen epoch count and the chosen checkpoint's path
    (``<root>/full/model_epoch<k>.pt``). Returns that dict.
    """
    root = model_root(root, spec)
    from ..retrain import select_train

    data = select_train(corpus, spec.n_train, range(spec.n_train))
    tc = TrainConfig(epochs=config.max_epochs, batch_size=spec.batch_size, lr=spec.lr, seed=0, keep_epochs=True)
    import torch

    torch.set_num_threads(spec.threads)
    _, history = train_language_model(data, spec.model_config(len(corpus.vocab)), tc, root / "full" / "model.pt",
                                      device)
    best = int(np.argmin([h["valid_ppl"] for h in history])) + 1
    choice = {"spec": asdict(spec), "max_epochs": config.max_epochs, "history": history, "epochs": best,
              "checkpoint": str(root / "full" / f"model_epoch{best}.pt")}
    atomic_write(root / CHOICE_FILE, lambda tmp: tmp.write_text(json.dumps(choice, indent=1)))
    return choice


def study_units(spec: RetrainSpec, config: LdsConfig) -> list[Unit]:
    """Stage 2's units, subset-major: ``m<mmm>_s<seed>`` for every subset m and seed."""
    subsets = random_subsets(spec.n_train, config.subsets, config.beta, config.subset_seed)
    return [Unit(f"m{m:03d}_s{s}", tuple(int(i) for i in idx), s) for m, idx in enumerate(subsets)
            for s in config.seeds]


def model_root(root: str | Path, spec: RetrainSpec) -> Path:
    """``<root>/<fingerprint of the spec without its epochs>``: the full-data model of stage 1 lives here."""
    from ..cache import fingerprint

    fields = {k: v for k, v in spec.identity().items() if k != "epochs"}
    return Path(root) / f"w{spec.hidden}_n{spec.n_train}_{fingerprint(fields)[:8]}"


def study_root(root: str | Path, spec: RetrainSpec, config: LdsConfig) -> Path:
    """The directory of one design, ``<model root>/e<epochs>_beta<beta>_subsets<seed>``: another design (epochs,
    beta, subset draw) never mixes into it; more subsets or seeds add units to the same directory."""
    return model_root(root, spec) / f"e{spec.epochs}_beta{config.beta:g}_subsets{config.subset_seed}"


def train_study(corpus: Corpus, spec: RetrainSpec, config: LdsConfig, root: str | Path, shard=(0, 1),
                device="cpu") -> list[str]:
    """Stage 2: every unit of this shard (see :func:`ifutils.retrain.run_units`)."""
    from ..retrain import run_units

    return run_units(corpus, spec, study_units(spec, config), study_root(root, spec, config), shard, device)


__all__ = ["LdsConfig", "choose_epochs", "study_root", "study_units", "train_study", "train_unit"]


# ------------------------------------------------------------------------------------------- predictions and LDS


def query_indices(corpus: Corpus, n_queries: int, seed: int = 0) -> list[int]:
    """The validation sentences whose retrained losses are predicted (seeded draw without replacement)."""
    import torch

    valid = corpus.splits["valid"]
    if not 1 <= n_queries <= len(valid):
        raise ValueError(f"n_queries must be in [1, {len(valid)}], got {n_queries}")
    return torch.randperm(len(valid), generator=torch.Generator().manual_seed(seed))[:n_queries].tolist()


def measured_losses(records: dict, units: list[Unit], seeds, queries: list[int], n_train: int
                    ) -> tuple[np.ndarray, np.ndarray, list]:
    """(masks (M, n_train) bool, losses (M, S, 1 + Q) nats/token, subset names) from the units' records.

    Column 0 is the mean validation loss (1/n_val) sum_j l_j (the mean of the per-sentence losses, the objective
    whose gradient is the mean-validation query of :func:`~ifutils.experiments.whole_network.query_gradients`),
    columns 1.. the losses of the validation sentences ``queries``; NaN for a unit without a record.
    """
    subsets = list(dict.fromkeys(u.name.rsplit("_s", 1)[0] for u in units))
    by_name = {u.name: u for u in units}
    masks = np.zeros((len(subsets), n_train), dtype=bool)
    losses = np.full((len(subsets), len(seeds), 1 + len(queries)), np.nan)
    for m, subset in enumerate(subsets):
        masks[m, list(by_name[f"{subset}_s{seeds[0]}"].indices)] = True
        for k, seed in enumerate(seeds):
            r = records.get(f"{subset}_s{seed}")
            if r is not None:
                v = np.asarray(r["valid_losses"])
                losses[m, k] = np.concatenate([[v.mean()], v[queries]])
    return masks, losses, subsets


def lds_table(predictions: dict, masks: np.ndarray, losses: np.ndarray, seed: int = 0) -> dict:
    """{"<key>@<damping>": linear datamodeling score} for (n_train, 1 + Q) predicted influences per (key, damping):
    the LDS over the Q sentence queries (column 0, the mean validation loss, reported apart as ``validation``:
    the Spearman over subsets of that one query)."""
    from scipy import stats

    from ..metrics import linear_datamodeling_score

    done = ~np.isnan(losses).any(axis=(1, 2))
    out = {}
    for (key, d), scores in predictions.items():
        entry = linear_datamodeling_score(scores[: masks.shape[1], 1:], masks, losses[:, :, 1:], seed)
        pred = masks[done] @ scores[: masks.shape[1], 0]
        entry["validation"] = float(stats.spearmanr(pred, losses[done, :, 0].mean(1))[0])
        out[f"{key}@{d:g}"] = {"curvature": key, "damping": d, **entry}
    return out


def lds_predictions(model, corpus: Corpus, n_train: int, queries: list[int], config, dampings, scores_root,
                    cache_dir=None, stages=None) -> tuple[dict, dict]:
    """Influence of each of the first ``n_train`` training sentences on the mean validation loss and on each
    validation sentence of ``queries``, for every whole-network curvature of the whole-network study (KFAC and
    EK-FAC with true-Fisher and data labels, diagonal true Fisher and EF, identity), at the default damping
    (``config.alpha`` x EK-FAC's mean eigenvalue) and at each absolute damping of ``dampings``.

    ``config`` is a :class:`~ifutils.experiments.whole_network.WholeNetworkConfig` (n_fit, mc_samples, alpha,
    seed, chunk_size, pass_gib are used). Scores stream into resumable pass directories under ``scores_root``.

    Returns:
        ({(key, damping): (n_train, 1 + Q) float32 influence}, info dict: default damping, passes, curvature means).
    """
    from ..cache import fingerprint
    from ..curvature.base import IdentityCurvature
    from ..curvature.network_kfac import (
        diagonal_fisher,
        ekfac_network_curvature,
        fit_network_kfac,
        kfac_network_curvature,
    )
    from ..network import NetworkGrads
    from .whole_network import Stages, query_gradients, score_passes

    stages = stages or Stages()
    model = model.eval()
    eos = corpus.vocab.stoi["<eos>"]
    net = NetworkGrads(model, eos)
    valid = corpus.splits["valid"]
    with stages("query gradients (validation)"):
        grads = query_gradients(net, valid, [valid[i] for i in queries], config.chunk_size, cache_dir)
    fit_args = dict(n_fit=config.n_fit, chunk_size=config.chunk_size, seed=config.seed, cache_dir=cache_dir)
    curvatures = {}
    for labels in ("model", "data"):
        with stages(f"KFAC + EK-FAC factors ({labels} labels)"):
            factors = fit_network_kfac(model, corpus.splits["train"], eos, labels=labels,
                                       mc_samples=config.mc_samples, **fit_args)
        for c in (ekfac_network_curvature(factors), kfac_network_curvature(factors)):
            curvatures[c.name] = c
        with stages(f"diagonal Fisher ({labels} labels)"):
            c = diagonal_fisher(model, corpus.splits["train"], eos, labels=labels, mc_samples=config.mc_samples,
                                **fit_args)
        curvatures[c.name] = c
    curvatures["identity"] = IdentityCurvature(net.p, "identity")
    default = config.alpha * curvatures["ekfac"].mean_eigenvalue()
    blocks = [(key, d, None, len(grads)) for key in curvatures for d in [default, *map(float, dampings)]]
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    name = [fingerprint(weights), n_train, queries, config.n_fit, config.mc_samples, config.seed, config.chunk_size]
    scores, passes = score_passes(model, corpus.splits["train"][:n_train], eos, blocks, grads, curvatures,
                                  Path(scores_root), name, config.pass_gib, config.chunk_size, stages, what="lds")
    info = {"default_damping": default, "passes": passes,
            "mean_eigenvalues": {k: (c.mean_eigenvalue() if k != "identity" else 1.0) for k, c in curvatures.items()}}
    return scores, info
