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
import os
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
    recompute: bool = param(False, "whole_network.ipynb: run the study even when the results file of this configuration and checkpoint exists")
    ground_truth: bool = param(False, "fisher_if.ipynb: also run the retraining ground truth (about an hour; experiments/ground_truth.py runs it alone)")

    def __post_init__(self):
        validate_fields(self)
        if self.run_name is not None and not _NAME.match(self.run_name):
            raise ValueError(f"run_name={self.run_name!r} must be a file-name stem (letters, digits, _ . -), e.g. 'ptb_tiny'")


def corpus_tag(corpus, dataset: str) -> str:
    """The corpus's name for files: ``corpus.tag`` when the loader gives one (corpus specs such as
    ``files:<dir>``), else ``dataset`` (``ptb``, ``text8``), made file-name safe."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(getattr(corpus, "tag", None) or dataset)).strip("_") or "corpus"


def dataset_tag(dataset: str, data_dir=None) -> str:
    """:func:`corpus_tag` before a checkpoint is loaded: the dataset itself for ``ptb`` and ``text8``, else the tag
    of the corpus the spec loads (read once for its tag)."""
    if dataset in ("ptb", "text8"):
        return dataset
    from ..data import load_corpus

    return corpus_tag(load_corpus(dataset, data_dir), dataset)


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


def training_run(run: RunConfig, tag: str, model_config: ModelConfig, train_config: TrainConfig) -> dict:
    """Run name and paths of a training-notebook run.

    Returns:
        ``{"name", "checkpoint", "results_file", "figures_dir"}`` (paths resolved; the user's paths as given).
    """
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


def comparison_run(run: RunConfig, tag: str, config, gt=None) -> dict:
    """Run name and paths of a ``fisher_if.ipynb`` run: ``<tag>`` for the default comparison (``<tag>_<subset>`` off
    the default subset), with a hash of the InfluenceConfig fields (and GroundTruthConfig fields, when ``gt`` is
    given, i.e. the ground truth runs) that differ from their defaults, and of the checkpoint when it is not
    ``checkpoints/<tag>_lstm.pt``. The checkpoint defaults to ``checkpoints/<run_name or tag>_lstm.pt``."""
    from .comparison import InfluenceConfig
    from .ground_truth import GroundTruthConfig

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
    paths = _paths(run, name, checkpoint)
    if paths["checkpoint"].is_file():  # refuse a results file of another model now, before any figure is drawn
        from ..io import check_results_checkpoint

        check_results_checkpoint(paths["results_file"], "influence", paths["checkpoint"], name)
    return paths


def whole_network_run(run: RunConfig, tag: str, config) -> dict:
    """Run name and paths of a whole-network run (``whole_network.ipynb``, ``experiments/whole_network.py``):
    ``<tag>_whole`` for the default :class:`~ifutils.experiments.whole_network.WholeNetworkConfig` on
    ``checkpoints/<tag>_lstm.pt``, ``<tag>_whole_<8 hex>`` otherwise; results ``results/<name>.json``; scores under
    ``cache/whole_scores/`` (one directory per pass, named by what its scores depend on, shared between runs)."""
    from .whole_network import WholeNetworkConfig

    checkpoint = run.checkpoint or f"checkpoints/{run.run_name or tag}_lstm.pt"
    name = run.run_name and f"{run.run_name}_whole"
    if name is None:
        settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "chunk_size"}
        settings["checkpoint"] = _checkpoint_setting(run, f"checkpoints/{tag}_lstm.pt")
        name = derive_name(f"{tag}_whole", settings, dataclasses.asdict(WholeNetworkConfig()))
    paths = _paths(run, name, checkpoint)
    paths["scores_dir"] = project_path("cache/whole_scores")
    return paths


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
    supersede(paths["results_file"], paths["checkpoint"])
    return update_results(paths["results_file"], "training", data, checkpoint=paths["checkpoint"], config=config,
                          run_name=paths["name"])


def supersede(results_file, checkpoint) -> Path | None:
    """Move a results file aside when its sections describe another model than ``checkpoint``.

    The training notebook defines a run's model: when it has just trained a new checkpoint (e.g. on a fresh clone,
    where the committed results came from a checkpoint that is not on disk, and training is not bit-reproducible
    across machines), the file's sections from another checkpoint, or without a recorded one, no longer describe it.
    They are kept, renamed to ``<stem>.superseded-<sha256[:8] of their checkpoint, or "unrecorded">[-<k>].json``
    beside it (never over an existing file), and the run starts a fresh file; nothing is lost or mixed.

    Returns:
        the new path of the old file, or None when nothing was moved (no file, or every section from this
        checkpoint).
    """
    path = Path(results_file)
    if not path.is_file():
        return None
    from ..io import file_sha256

    results = json.loads(path.read_text())
    sha = file_sha256(checkpoint)
    recorded = [s.get("provenance", {}).get("checkpoint", {}).get("sha256") if isinstance(s, dict) else None
                for s in results.values()]
    if results and all(r == sha for r in recorded):
        return None
    old = next((r for r in recorded if r and r != sha), None)
    stem = f"{path.stem}.superseded-{old[:8] if old else 'unrecorded'}"
    target, k = path.with_name(f"{stem}.json"), 1
    while target.exists():
        target, k = path.with_name(f"{stem}-{k}.json"), k + 1
    os.replace(path, target)
    print(f"{stored_path(path)} held sections of another checkpoint than {stored_path(checkpoint)}: moved to "
          f"{stored_path(target)}; this run starts {stored_path(path)} anew")
    return target


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


STUDY_RUN = "ptb"
"""The run the study-wide results (robustness sweeps, retraining check, spectrum statistics) belong to: they were
computed by experiments/*.py from checkpoints/ptb_lstm.pt and its family (experiments/train_family.sh)."""


def run_findings(paths: dict) -> str:
    """The Findings of one run, each table headed by the file and section it comes from: the run's own ground
    truth (only when its recorded checkpoint sha256 is this run's checkpoint), and the study-wide tables only for
    the default PTB run (:data:`STUDY_RUN`); for any other run a line says why they are not shown."""
    from .findings import (
        ground_truth_table,
        retrain_table,
        robustness_table,
        spectrum_table,
    )
    from .sweeps import SHOWN

    results_file, name = paths["results_file"], paths["name"]
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    where = stored_path(results_file)
    parts = [f"Findings of run {name!r} (checkpoint {stored_path(paths['checkpoint'])})"]
    note = provenance_note(results.get("ground_truth"), paths["checkpoint"])
    if note is None:
        parts.append(f"Ground truth by retraining the subset (from {where}, section ground_truth)\n"
                     + ground_truth_table(results["ground_truth"]))
    else:
        parts.append(f"No ground truth of this run: section ground_truth of {where} is {note}; rerun with "
                     "-p ground_truth True, or run experiments/ground_truth.py")
    if name != STUDY_RUN:
        parts.append(f"The study-wide tables (results/robustness.json, results/retrain_check.json, results/spectrum.json) "
                     f"belong to run {STUDY_RUN!r}, not to {name!r}; not shown")
        return "\n\n".join(parts)
    tables = (("robustness.json", "Robustness sweeps (Spearman with exact-Hessian influence), experiments/robustness.py",
               lambda r: robustness_table(r, SHOWN)),
              ("retrain_check.json", "Full-model retraining check, experiments/retrain_check.py", retrain_table),
              ("spectrum.json", "Spectrum statistics (whole network), experiments/spectrum.py", spectrum_table))
    for file, title, table in tables:
        path = project_path(f"results/{file}")
        data = json.loads(path.read_text()) if path.is_file() else None
        if data and (file == "robustness.json" or data.get("methods") or data.get("entries")):
            parts.append(f"{title} (from results/{file})\n" + table(data))
        else:
            parts.append(f"{title}: results/{file} not written yet")
    return "\n\n".join(parts)


def distinct_warnings(records) -> list[str]:
    """One line per distinct warning of ``warnings.catch_warnings(record=True)``, in order of first appearance,
    ``"<Category>: <message> (xN)"`` when it was raised N > 1 times."""
    counts: dict[tuple[str, str], int] = {}
    for w in records:
        key = (w.category.__name__, str(w.message))
        counts[key] = counts.get(key, 0) + 1
    return [f"{cat}: {msg}" + (f" (x{n})" if n > 1 else "") for (cat, msg), n in counts.items()]
