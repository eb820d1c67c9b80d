"""Files: atomic writes, checkpoints (loaded with ``weights_only=True``) and the results JSON."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from .data import PROJECT_ROOT, Vocabulary
from .model import LSTMLM, ModelConfig


def project_path(path: str | os.PathLike) -> Path:
    """Resolve a path the user named: a relative one against the project root, ``~`` expanded, an absolute one
    kept wherever it is (checkpoints and data often live on other disks; nothing is refused).

    What the project writes by itself (figures, results, caches, checkpoints under their default names) is
    derived from the project root or from a path the user named, so it stays in one of those places.

    Raises:
        TypeError: ``path`` is not a str or os.PathLike (e.g. None: pass a path, or leave the parameter at its
            default so the run name decides).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {path!r} ({type(path).__name__}); pass a file path")
    return (PROJECT_ROOT / Path(path).expanduser()).resolve()


def stored_path(path: str | os.PathLike) -> str:
    """How a path is written into results: relative to the project root when inside it (so no machine's absolute
    path is stored for files of the repository), else the resolved path as given."""
    resolved = project_path(path)
    return resolved.relative_to(PROJECT_ROOT).as_posix() if resolved.is_relative_to(PROJECT_ROOT) else str(resolved)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """Hex SHA-256 of a model's parameters (names, shapes, dtypes and bytes, in order): the same for the same weights,
    whatever else a checkpoint file holds (its history records wall times, so two bit-identical trainings give
    checkpoint files of different hashes)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def checkpoint_record(path: str | os.PathLike) -> dict:
    """``{"path": stored_path(path), "sha256": ...}``: which checkpoint produced a results section."""
    return {"path": stored_path(path), "sha256": file_sha256(project_path(path))}


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, flush it to disk, then rename it onto ``path``.

    A crash midway (a killed process, or the machine going down: the data is on disk before the rename) leaves the
    old file (or none), never a half-written one. The file gets the usual permissions (0666 minus the umask), not
    ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | os.PathLike, model: LSTMLM, vocab: Vocabulary, **extra: Any) -> Path:
    """Atomically save weights, vocabulary, model config and ``extra`` (tensors, numbers, strings,
    lists and dicts only, so that :func:`load_checkpoint` can use ``weights_only=True``)."""
    payload = {
        "state_dict": model.state_dict(),
        "vocab": list(vocab.itos),
        "model_config": model.config.to_dict(),
        **extra,
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[LSTMLM, Vocabulary, dict]:
    """Load a checkpoint written by :func:`save_checkpoint` without unpickling arbitrary objects.

    Args:
        path: the file.
        device: where the model goes: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"``
            (checked by :func:`resolve_device` before the file is read).
    Returns:
        (model in eval mode on ``device``, vocabulary, the whole payload dict).
    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: ``device`` names a device this machine lacks (no CUDA/MPS: the message says so, not the file);
            the file is not a torch checkpoint at all (corrupt, truncated, or another format); it holds non-weight
            objects (``torch.load(weights_only=True)`` refused it); or its vocabulary and weights disagree.
    """
    path = Path(path)
    device = resolve_device(device)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with train_lstm_penn_treebank.ipynb")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, KeyError, ... depending on the file
        if not _looks_like_torch_file(path):
            raise ValueError(
                f"{path} is not a torch checkpoint (corrupt, truncated, or a file of another format: torch.load "
                f"failed with {type(err).__name__}: {err}); make one with train_lstm_penn_treebank.ipynb or "
                f"ifutils.io.save_checkpoint(path, model, vocab)"
            ) from err
        raise ValueError(
            f"{path} is a torch file but not a loadable weights-only checkpoint ({type(err).__name__}: {err}); "
            f"it may hold pickled objects other than tensors, numbers, strings, lists and dicts. Re-save the "
            f"model with ifutils.io.save_checkpoint(path, model, vocab)"
        ) from err
    if not isinstance(payload, dict) or not {"state_dict", "vocab", "model_config"} <= set(payload):
        raise ValueError(f"{path} lacks state_dict/vocab/model_config; it was not written by ifutils")
    config = ModelConfig(**payload["model_config"])
    vocab = Vocabulary(payload["vocab"])
    if len(vocab) != config.vocab_size:
        raise ValueError(f"{path}: vocabulary has {len(vocab)} words but the model {config.vocab_size}")
    model = LSTMLM(config).to(device)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, vocab, payload


def check_corpus(payload: dict, corpus) -> None:
    """Refuse to score a corpus the checkpoint was not trained on.

    Raises:
        ValueError: the checkpoint's dataset label or text8 window differs from ``corpus``'s.
    """
    trained = (payload.get("dataset"), payload.get("window"))
    if trained != (corpus.name, corpus.window):
        raise ValueError(
            f"the checkpoint was trained on dataset={trained[0]!r} (window={trained[1]}), but the data loaded is "
            f"{corpus.name!r} (window={corpus.window}); pass the matching dataset/window or checkpoint"
        )


def environment() -> dict:
    """Versions and git commit to store beside results, so each number can be traced."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        commit = ""
    import numpy  # noqa: E401  (imported here: only their versions are needed)
    import scipy

    return {
        "git_commit": commit or "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
    }


def update_results(path: str | os.PathLike, section: str, data: dict, *, checkpoint: str | os.PathLike | None = None,
                   config: dict | None = None, run_name: str | None = None) -> Path:
    """Set ``results[section] = data`` in the JSON file at ``path`` (created if absent), atomically.

    With ``checkpoint`` the section records its provenance, ``data["provenance"] = {"checkpoint": {"path",
    "sha256"}, "config": config, "run_name": run_name}``, and a section produced from another checkpoint (another
    sha256) than the other sections already in the file is refused, so one file never mixes two models. Sections
    written without a provenance record (results older than this check) are not compared.

    Raises:
        ValueError: another section of the file records a different checkpoint; the message names both and the
            run name to pass instead (``run_name`` with the new checkpoint's hash), or to move the file away.
    """
    path = Path(path)
    results = json.loads(path.read_text()) if path.is_file() else {}
    if checkpoint is not None:
        record = check_results_checkpoint(path, section, checkpoint, run_name)
        data = {**data, "provenance": {"checkpoint": record, "config": config, "run_name": run_name}}
    results[section] = data
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(results, indent=1, default=float)))


def check_results_checkpoint(path: str | os.PathLike, section: str, checkpoint: str | os.PathLike,
                             run_name: str | None = None) -> dict:
    """Refuse, before anything is computed or drawn, a run whose ``section`` would join a results file holding
    sections of another checkpoint (see :func:`update_results`); return the checkpoint's record.

    Raises:
        ValueError: as :func:`update_results`.
    """
    path = Path(path)
    results = json.loads(path.read_text()) if path.is_file() else {}
    record = checkpoint_record(checkpoint)
    for name, other in results.items():
        theirs = other.get("provenance", {}).get("checkpoint") if isinstance(other, dict) else None
        if name != section and theirs and theirs.get("sha256") != record["sha256"]:
            suggestion = f"{run_name or path.stem}_{record['sha256'][:8]}"
            raise ValueError(
                f"{path} section {name!r} was produced from checkpoint {theirs['path']} (sha256 "
                f"{theirs['sha256'][:12]}), but this {section!r} section comes from {record['path']} (sha256 "
                f"{record['sha256'][:12]}); one results file holds one model's sections. Pass "
                f"run_name={suggestion!r} (papermill -p run_name {suggestion}) or a results_file of its own, or "
                f"move {path} away to start it anew"
            )
    return record


def _looks_like_torch_file(path: Path) -> bool:
    """True for what ``torch.save`` writes: a zip archive (the default since torch 1.6) or a legacy pickle (its
    first byte is the pickle protocol opcode 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; other names (``"cpu"``, ``"cuda"``, ``"cuda:N"``,
    ``"mps"``) are checked against this machine and returned as a ``torch.device``.

    Raises:
        ValueError: not a device name, a type other than cpu/cuda/mps, or a device this machine lacks: ``cuda``
            without a visible CUDA device, ``cuda:N`` with N >= the device count, ``mps`` without MPS. The
            message says which, and to use ``"cpu"`` or ``"auto"``.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device={device!r} is not a device name ({err}); use 'cpu', 'cuda', 'cuda:N', 'mps' "
                         f"or 'auto'") from None
    if resolved.type not in DEVICE_TYPES:
        raise ValueError(f"device={device!r}: type {resolved.type!r} is not supported; use one of "
                         f"{', '.join(DEVICE_TYPES)} or 'auto'")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but torch sees no CUDA device on this machine "
                             f"(torch.cuda.is_available() is False); use device='cpu' or 'auto'")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device={device!r} requested but this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}; use one of them, 'cuda' or 'auto'")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} requested but the MPS backend is not available on this machine "
                         f"(torch.backends.mps.is_available() is False; it needs Apple silicon and macOS 12.3+); "
                         f"use device='cpu' or 'auto'")
    return resolved
