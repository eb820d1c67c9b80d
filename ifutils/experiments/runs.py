"""Named runs: where a notebook run reads its checkpoint and writes its results and figures.

The default configuration keeps the historical names (``checkpoints/ptb_lstm.pt``, ``results/ptb.json``,
``figures/ptb_*.png``; ``ptb_decoder`` for the decoder subset). Any other configuration writes under its own run
name, given by the user or derived as ``<corpus tag>[_<subset>]_<8 hex digits>``, the digits a SHA-256 of the
settings that differ from their dataclass defaults, so a trial run never overwrites the committed outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import param, validate_fields
from ..io import environment, project_path, stored_path, update_results
from ..model import ModelConfig
from ..train import TrainConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class RunConfig:
    """Data and file settings shared by both notebooks (parameters of the same names; results never depend on
    ``data_dir``, ``device``, ``cache_dir``, ``figures_dir`` or ``results_file``, so they never change a run name)."""

    dataset: str = param("ptb", 'corpus: "ptb", "text8" (a text8-format sample is labelled as such), or another spec load_corpus takes')
    data_dir: str | None = param(None, "data directory; None: $IFUTILS_DATA_DIR, else data/")
    window: int = param(35, "text8 only: words per sample")
    vocab_size: int = param(10000, "text8 only: V, including <eos> and <unk>")
    run_name: str | None = param(None, "names checkpoint, results and figures; None: derived (the default run keeps <dataset>)")
    checkpoint: str | None = param(None, "None: checkpoints/<run name>_lstm.pt (any path, also outside the repository)")
    figures_dir: str = param("figures", "figures are <figures_dir>/<run name>_*.png")
    results_file: str | None = param(None, "None: results/<run name>.json")
    cache_dir: str | None = param("cache", "finished chunks of long stages; a rerun after a kill resumes; None: off")
    device: str = param("auto", '"auto": cuda when available')

    def __post_init__(self):
        validate_fields(self)
        if self.run_name is not None and not _NAME.match(self.run_name):
            raise ValueError(f"run_name={self.run_name!r} must be a file-name stem (letters, digits, _ . -), e.g. 'ptb_tiny'")


def corpus_tag(corpus, dataset: str) -> str:
    """The corpus's name for files: ``corpus.tag`` when the loader gives one (corpus specs such as
    ``files:<dir>``), else ``dataset`` (``ptb``, ``text8``), made file-name safe."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(getattr(corpus, "tag", None) or dataset)).strip("_") or "corpus"


def derive_name(base: str, settings: dict, defaults: dict) -> str:
    """``base`` when every setting equals its default, else ``base_<8 hex>`` hashing the differing settings.

    Values are compared after a JSON round trip (tuples and lists alike). ``settings`` keys missing from
    ``defaults`` count as differing unless their value is None.
    """
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731
    differing = {k: norm(v) for k, v in settings.items() if norm(v) != norm(defaults.get(k))}
    if not differing:
        return base
    digest = hashlib.sha256(json.dumps(differing, sort_keys=True).encode()).hexdigest()[:8]
    return f"{base}_{digest}"


def _checkpoint_setting(run: RunConfig, default: str) -> str | None:
    """The checkpoint as a naming setting: None when it is the default path for this run."""
    if run.checkpoint is None or project_path(run.checkpoint) == project_path(default):
        return None
    return stored_path(run.checkpoint)


def training_run(run: RunConfig, corpus, model_config: ModelConfig, train_config: TrainConfig) -> dict:
    """Run name and paths of a training-notebook run.

    Returns:
        ``{"name", "checkpoint", "results_file", "figures_dir"}`` (paths resolved; the user's paths as given).
    """
    tag = corpus_tag(corpus, run.dataset)
    name = run.run_name
    if name is None:
        model = {k: v for k, v in model_config.to_dict().items() if k != "vocab_size"}
        train = {k: v for k, v in dataclasses.asdict(train_config).items() if k != "keep_epochs"}
        settings = {**model, **train, "checkpoint": _checkpoint_setting(run, f"checkpoints/{tag}_lstm.pt")}
        defaults = {**ModelConfig(1).to_dict(), **dataclasses.asdict(TrainConfig())}
        if run.dataset == "text8":
            settings.update(window=run.window, vocab_size=run.vocab_size)
            defaults.update(window=RunConfig().window, vocab_size=RunConfig().vocab_size)
        name = derive_name(tag, settings, defaults)
    return _paths(run, name, run.checkpoint or f"checkpoints/{name}_lstm.pt")


def comparison_run(run: RunConfig, corpus, config, gt=None) -> dict:
    """Run name and paths of a ``fisher_if.ipynb`` run: ``<tag>`` for the default comparison (``<tag>_<subset>`` off
    the default subset), with a hash of the InfluenceConfig fields (and GroundTruthConfig fields, when ``gt`` is
    given, i.e. the ground truth runs) that differ from their defaults, and of the checkpoint when it is not
    ``checkpoints/<tag>_lstm.pt``. The checkpoint defaults to ``checkpoints/<run_name or tag>_lstm.pt``."""
    from .comparison import InfluenceConfig
    from .ground_truth import GroundTruthConfig

    tag = corpus_tag(corpus, run.dataset)
    checkpoint = run.checkpoint or f"checkpoints/{run.run_name or tag}_lstm.pt"
    name = run.run_name
    if name is None:
        base = tag if config.subset == "recurrent" else f"{tag}_{config.subset.replace('+', '_')}"
        skip = {"subset", "chunk_size"}  # subset is in the base name; chunk size only batches the work
        settings = {k: v for k, v in config.to_dict().items() if k not in skip}
        defaults = InfluenceConfig().to_dict()
        if gt is not None:
            settings.update({f"gt_{k}": v for k, v in gt.to_dict().items()})
            defaults.update({f"gt_{k}": v for k, v in GroundTruthConfig().to_dict().items()})
        settings["checkpoint"] = _checkpoint_setting(run, f"checkpoints/{tag}_lstm.pt")
        if run.dataset == "text8":
            settings["window"], defaults["window"] = run.window, RunConfig().window
        name = derive_name(base, settings, defaults)
    return _paths(run, name, checkpoint)


def _paths(run: RunConfig, name: str, checkpoint: str) -> dict:
    return {"name": name, "checkpoint": project_path(checkpoint),
            "results_file": project_path(run.results_file or f"results/{name}.json"),
            "figures_dir": project_path(run.figures_dir)}


def save_training(paths: dict, corpus, run: RunConfig, model_config: ModelConfig, train_config: TrainConfig,
                  history: list[dict], valid_ppl: float, test_ppl: float, seconds: float, device) -> Path:
    """Write the ``training`` section of the run's results file (with the checkpoint's path and sha256).

    Raises:
        ValueError: the file already holds sections of another checkpoint (see :func:`ifutils.io.update_results`).
    """
    data = {
        "dataset": run.dataset, "data_label": corpus.name, "run_name": paths["name"],
        "window": run.window if run.dataset == "text8" else None,
        "model_config": model_config.to_dict(), "train_config": dataclasses.asdict(train_config),
        "valid_ppl": valid_ppl, "test_ppl": test_ppl, "history": history,
        "seconds": {"training (all epochs, this and earlier runs)": sum(h["seconds"] for h in history),
                    "this run": seconds},
        "checkpoint": stored_path(paths["checkpoint"]), "device": str(device), "environment": environment(),
    }
    config = {"model": model_config.to_dict(), "train": dataclasses.asdict(train_config)}
    return update_results(paths["results_file"], "training", data, checkpoint=paths["checkpoint"], config=config,
                          run_name=paths["name"])


def provenance_note(section: dict | None, checkpoint) -> str | None:
    """Why a stored section does not belong to this run (another checkpoint, or none recorded), or None if it does."""
    if section is None:
        return "absent"
    recorded = section.get("provenance", {}).get("checkpoint")
    if recorded is None:
        return "recorded without a checkpoint checksum (written before runs were named)"
    from ..io import file_sha256

    if recorded["sha256"] != file_sha256(checkpoint):
        return f"produced from another checkpoint ({recorded['path']}, sha256 {recorded['sha256'][:12]})"
    return None
