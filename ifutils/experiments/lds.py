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
