"""Many small models retrained from scratch on chosen training sentences, each its own resumable unit.

The ground truth of the linear datamodeling score (Park et al. 2023, TRAK, sec. 2) and of counterfactual removals
(Ilyas et al. 2022) is the loss of held-out sentences under models retrained from scratch on subsets of the
training data. This module is the trainer for them:

* :class:`RetrainSpec`: the small configuration (model widths, the first ``n_train`` PTB training sentences,
  optimisation, epochs) that every unit shares;
* :func:`random_subsets`: the M seeded random subsets of fraction beta (TRAK's alpha-subsets);
* :func:`train_unit`: train one unit (a list of training indices and a seed) with
  :func:`ifutils.train.train_language_model` (which checkpoints after every epoch and resumes from the last
  finished one), then measure the loss of every validation sentence under it and write ``record.json``; a unit
  whose record exists is skipped;
* :func:`run_units`: train a list of units in order, or the share ``shard = (i, k)`` of them (unit j goes to
  shard j mod k), so that k processes can run side by side, one per core;
* :func:`wait_for_units`: wait for the units other processes are training now (before reading the records).

Side by side without shards: a unit being trained holds an exclusive lock on ``<unit>/train.lock`` (``fcntl.flock``,
released by the kernel when the process ends, killed or not), and :func:`train_unit` skips a unit whose lock another
process holds (it returns None). So k processes started on the same unit list (``shard = (0, 1)`` each) share the
units dynamically, each taking the next unit nobody trains, and a unit left by a killed process is taken up by the
next run. The lock coordinates the processes of one machine (a local file system); without ``fcntl`` (Windows) units
are not locked and shards must be used.

A unit's directory holds ``model.pt`` (weights, optimiser and RNG state after the last finished epoch) and, when it
is finished, ``record.json`` (written last, atomically): the training indices' fingerprint, the seed, the epochs'
history, and ``valid_losses``, the mean token NLL (nats/token) of each validation sentence in split order, and
``valid_mean``, the validation NLL per token over all tokens (log perplexity). Queries are chosen from these later:
every validation sentence's loss is kept, so the query set can change without retraining.

Records kept in the repository: a study's checkpoints live in an ignored folder that a fresh clone (or a new
machine) does not have, and each model takes minutes, so a study that spans sessions would start over. Passing
``archive`` (a folder inside the repository, e.g. ``results/retrained/<study>``) keeps a gzip-compressed copy of
every finished record there, ``<archive>/<unit name>.json.gz`` (about 30 kB; written atomically, same bytes for the
same record), to be committed. A unit whose record is in the archive is not retrained: the record is restored into
its directory (without ``model.pt``, so only the measured losses are available; studies that need the weights
afterwards do not pass ``archive``).

Determinism: a unit's training is seeded (initialisation, batch order and dropout), so a unit resumed after a kill
gives the same weights as an uninterrupted one on the same machine and thread count (tests/test_retrain.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .cache import fingerprint
from .config import param, require_positive, validate_fields
from .data import Corpus, bucket_batches, make_batch
from .io import atomic_write
from .model import ModelConfig, sentence_loss
from .progress import log, progress
from .train import TrainConfig, train_language_model

__all__ = ["RECORD_FILE", "MODEL_FILE", "LOCK_FILE", "ARCHIVE_SUFFIX", "RetrainSpec", "Unit", "random_subsets",
           "select_train", "sentence_losses", "train_unit", "train_each", "run_units", "load_records",
           "wait_for_units", "archive_record", "archived_record", "archive_records"]

RECORD_FILE, MODEL_FILE = "record.json", "model.pt"


@dataclass
class RetrainSpec:
    """The small configuration every retrained model shares (defaults: the LDS study's, issue 15).

    A 2-core CPU retrains it many times: about 1.4 minutes per model on 5,000 sentences on one core (measured in
    ``experiments/README.md``). ``epochs`` is chosen once by validation perplexity of the model trained on all
    ``n_train`` sentences (``experiments/lds.py --choose-epochs``), never by the test split.
    """

    n_train: int = param(10000, "the full data set is the first n_train PTB training sentences")
    emb_dim: int = param(128, "embedding width E")
    hidden: int = param(128, "LSTM width H")
    dropout: float = param(0.25, "dropout during training")
    epochs: int = param(4, "training epochs of every model (chosen by validation on the full-data model)")
    batch_size: int = param(32, "sentences per batch")
    lr: float = param(2e-3, "Adam learning rate (halved after an epoch without validation improvement)")
    threads: int = param(1, "torch threads per training process (1: two processes side by side on 2 cores)")

    def __post_init__(self):
        validate_fields(self)
        require_positive(self, "n_train", "emb_dim", "hidden", "epochs", "batch_size", "threads")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"RetrainSpec.dropout must be in [0, 1), got {self.dropout}")
        if not self.lr > 0:
            raise ValueError(f"RetrainSpec.lr must be > 0, got {self.lr}")

    def identity(self) -> dict:
        """The fields that change the trained weights (all but ``threads``), as a dict."""
        return {k: v for k, v in asdict(self).items() if k != "threads"}

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The :class:`~ifutils.model.ModelConfig` of every unit (one LSTM layer)."""
        return ModelConfig(vocab_size=vocab_size, emb_dim=self.emb_dim, hidden=self.hidden, num_layers=1,
                           dropout=self.dropout)

    def train_config(self, seed: int, epochs: int | None = None) -> TrainConfig:
        """The :class:`~ifutils.train.TrainConfig` of a unit with this seed (``epochs`` overrides the spec's)."""
        return TrainConfig(epochs=epochs or self.epochs, batch_size=self.batch_size, lr=self.lr, seed=seed)


@dataclass(frozen=True)
class Unit:
    """One model to train: ``name`` (its directory), the indices into ``train[:n_train]`` it trains on, a seed."""

    name: str
    indices: tuple[int, ...]
    seed: int


def random_subsets(n: int, m: int, beta: float, seed: int = 0) -> list[np.ndarray]:
    """M subsets of round(beta n) distinct indices of range(n), each uniformly at random (TRAK's alpha = beta).

    Args:
        n: training set size. m: number of subsets, >= 1. beta: fraction kept, in (0, 1). seed: numpy seed.
    Returns:
        list of m sorted int64 arrays.
    Raises:
        ValueError: n or m < 1, beta outside (0, 1), or round(beta n) = 0.
    """
    if n < 1 or m < 1:
        raise ValueError(f"n and m must be >= 1, got n={n}, m={m}")
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    size = round(beta * n)
    if size == 0:
        raise ValueError(f"beta={beta} of n={n} keeps no sentence; raise beta or n")
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n, size=size, replace=False)) for _ in range(m)]


def select_train(corpus: Corpus, n_train: int, indices: Sequence[int]) -> Corpus:
    """A copy of ``corpus`` whose train split is ``[train[i] for i in indices]`` (indices into train[:n_train]).

    The name records n_train, the count and a fingerprint of the indices; the trainer stores it in the checkpoint,
    and a checkpoint of another selection is refused on resume (:func:`ifutils.io.check_corpus`).

    Raises:
        ValueError: n_train larger than the split, no indices, or an index repeated or outside [0, n_train).
    """
    train = corpus.splits["train"]
    if not 1 <= n_train <= len(train):
        raise ValueError(f"n_train={n_train} must be in [1, {len(train)}] (the train split's size)")
    idx = [int(i) for i in indices]
    if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= n_train:
        raise ValueError(f"indices must be one or more distinct ints in [0, {n_train}), got {len(idx)} indices")
    name = f"{corpus.name} train[:{n_train}] {len(idx)} sentences ({fingerprint(sorted(idx))[:12]})"
    return Corpus(name, corpus.vocab, {**corpus.splits, "train": [train[i] for i in idx]}, corpus.window)


@torch.no_grad()
def sentence_losses(model, sentences: list[torch.Tensor], eos_id: int, batch_size: int = 128) -> tuple[np.ndarray, float]:
    """Per-sentence mean token NLL (nats/token, float64, input order) and the NLL per token over all tokens.

    Each sentence starts from a zero state and contributes its words and one ``<eos>`` (as
    :func:`ifutils.train.perplexity`, whose log this second value is). The model is evaluated in eval mode.
    """
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros(len(sentences))
    total, tokens = 0.0, 0
    for idx in bucket_batches([len(s) for s in sentences], batch_size):
        inputs, targets, mask = (t.to(device) for t in make_batch([sentences[i] for i in idx], eos_id))
        per = sentence_loss(model(inputs), targets, mask).double().cpu()
        counts = mask.sum(1).double().cpu()
        out[idx] = per.numpy()
        total += float((per * counts).sum())
        tokens += int(counts.sum())
    model.train(was)
    return out, total / tokens


LOCK_FILE = "train.lock"
ARCHIVE_SUFFIX = ".json.gz"


def _record_path(root: Path, unit: Unit) -> Path:
    return root / unit.name / RECORD_FILE


def archive_record(archive: str | os.PathLike, name: str, record: dict) -> Path:
    """Write ``record`` to ``<archive>/<name>.json.gz`` atomically (gzip without a timestamp: the same record gives
    the same bytes, so re-archiving leaves git nothing to commit). Returns the path."""
    import gzip

    data = gzip.compress(json.dumps(record, sort_keys=True).encode(), compresslevel=9, mtime=0)
    return atomic_write(Path(archive) / f"{name}{ARCHIVE_SUFFIX}", lambda tmp: tmp.write_bytes(data))


def archived_record(archive: str | os.PathLike | None, name: str, identity: dict | None = None) -> dict | None:
    """The record of unit ``name`` in ``archive`` (:func:`archive_record`), or None when there is none.

    Raises:
        ValueError: ``identity`` given and the archived record was written for other indices, seed or configuration
            (an archive folder belongs to one design: pick another).
    """
    import gzip

    if archive is None:
        return None
    path = Path(archive) / f"{name}{ARCHIVE_SUFFIX}"
    if not path.is_file():
        return None
    record = json.loads(gzip.decompress(path.read_bytes()))
    if identity is not None and {k: record.get(k) for k in identity} != identity:
        raise ValueError(f"{path} was written for other indices, seed or configuration; pick another archive")
    return record


def archive_records(root: str | os.PathLike, units: Sequence[Unit], archive: str | os.PathLike) -> list[str]:
    """Copy the finished records of ``units`` under ``root`` that ``archive`` lacks into it (units trained before
    the study had an archive). Returns the names copied."""
    copied = []
    for u in units:
        path = _record_path(Path(root), u)
        if path.is_file() and archived_record(archive, u.name) is None:
            archive_record(archive, u.name, json.loads(path.read_text()))
            copied.append(u.name)
    return copied


def _try_lock(directory: Path):
    """An open file holding an exclusive ``flock`` on ``directory / LOCK_FILE``, or None when another process (or
    another open of the file) holds it; without ``fcntl``, an unlocked stand-in. Close it to release."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_FILE, "a+")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; shards keep processes apart
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except BaseException:  # no lock support here (some network file systems): close, then fail loudly
        handle.close()
        raise
    return handle


def wait_for_units(root: str | os.PathLike, units: Sequence[Unit], poll_s: float = 5.0,
                   timeout_s: float | None = None) -> list[str]:
    """Wait until the unfinished units of ``units`` that another process is training now (their lock held) are
    released, so that a stage reading the records right after the last models sees them all. Only the units busy
    at the call are waited for (at most about one model's training time per process), not those taken up later,
    and units never started or left by a killed process (their lock free) stay unfinished.

    A check takes each candidate's lock for a moment (``flock`` has no test without taking it): a trainer that
    tries that unit in the same instant skips it, and its next run trains it.

    Args:
        root: the study's directory. units: the units to check. poll_s: seconds between checks (> 0).
        timeout_s: give up after this many seconds (None: wait as long as those trainings run).
    Returns:
        the names of the units that were being trained when this was called (empty: nothing to wait for).
    Raises:
        ValueError: ``poll_s`` <= 0 or ``timeout_s`` < 0.
        TimeoutError: one of them was still locked after ``timeout_s``.
    """
    if not poll_s > 0 or (timeout_s is not None and timeout_s < 0):
        raise ValueError(f"poll_s must be > 0 and timeout_s >= 0 or None, got {poll_s}, {timeout_s}")
    root = Path(root)

    def busy(candidates) -> list:
        out = []
        for u in candidates:
            if _record_path(root, u).is_file() or not (root / u.name / LOCK_FILE).is_file():
                continue
            lock = _try_lock(root / u.name)
            if lock is None:
                out.append(u)
            else:
                lock.close()
        return out

    first = busy(units)
    if first:
        log(f"waiting for {len(first)} unit(s) being trained by another process: "
            f"{', '.join(u.name for u in first[:5])}{' ...' if len(first) > 5 else ''}")
    start, now = time.monotonic(), first
    while now:
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"units still being trained after {timeout_s} s: {', '.join(u.name for u in now[:5])}")
        time.sleep(poll_s)
        now = busy(now)
    return [u.name for u in first]


def train_each(jobs, desc: str) -> tuple[list[str], list[str]]:
    """Run ``jobs`` [(name, fn)], fn() -> record or None (another process trains it), with a progress bar; a job
    that raises is logged and the others still run (a seeded unit that fails would otherwise fail first on every
    rerun and block every unit after it).

    Returns:
        (names whose fn returned None: left to another process, names that finished here or before).
    Raises:
        TypeError: a job that is not a (name, callable) pair (checked before any runs).
        RuntimeError: after every job ran, naming the ones that raised and their errors.
    """
    jobs = list(jobs)
    if bad := [j for j in jobs if not (isinstance(j, tuple) and len(j) == 2 and callable(j[1]))]:
        raise TypeError(f"jobs must be (name, callable) pairs, e.g. ('m000_s0', lambda: train_unit(...)); got {bad[:2]}")
    busy, done, failed = [], [], []
    for name, fn in progress(jobs, desc=desc, unit="model"):
        try:
            record = fn()
        except Exception as error:  # noqa: BLE001 - reported below, after the other units
            log(f"unit {name} failed: {error!r}")
            failed.append(f"{name}: {error!r}")
            continue
        (busy if record is None else done).append(name)
    if busy:
        log(f"{len(busy)} units were being trained by another process and were left to it: {', '.join(busy[:5])}"
            f"{' ...' if len(busy) > 5 else ''}")
    if failed:
        raise RuntimeError(f"{len(failed)} units failed (the others ran): " + "; ".join(failed[:5])
                           + (" ..." if len(failed) > 5 else ""))
    return busy, done


def train_unit(corpus: Corpus, spec: RetrainSpec, unit: Unit, root: str | os.PathLike,
               device: str | torch.device = "cpu", splits: tuple[str, ...] = ("valid",),
               init: torch.nn.Module | None = None, archive: str | os.PathLike | None = None) -> dict | None:
    """Train one unit (or resume it, or skip it when finished) and measure its validation losses.

    A unit that another process is training (its ``train.lock`` held, module docstring) is skipped: None is returned
    and nothing is written.

    Args:
        corpus: the full corpus (PTB); the unit trains on ``train[:spec.n_train]`` at ``unit.indices``.
        spec: the shared configuration. unit: what to train. root: the study's directory.
        device: where to train.
        splits: the splits whose per-sentence losses are recorded (``<split>_losses``, ``<split>_mean``); "valid"
            always. The test split is only ever measured, never used for a choice.
        init: starting weights (continued training, :func:`ifutils.train.train_language_model`); None: seeded.
        archive: a folder in the repository that keeps a copy of every finished record (module docstring); a unit
            archived there is restored, not retrained. None: no archive.
    Returns:
        the unit's record (see the module docstring); read from disk when the unit was finished before (or from
        the archive); None when another process holds the unit's lock.
    Raises:
        ValueError: bad indices (:func:`select_train`); a record, archived record or checkpoint of this unit written
            for other indices, seed or configuration (pick another root or archive).
    """
    root = Path(root)
    path = _record_path(root, unit)
    identity = {"indices": fingerprint(sorted(unit.indices)), "seed": unit.seed, "spec": spec.identity()}
    if path.is_file():
        record = _read_record(path, identity)
        if archive is not None and archived_record(archive, unit.name, identity) is None:  # a mismatch raises
            archive_record(archive, unit.name, record)
        return record
    stored = archived_record(archive, unit.name, identity)
    if stored is not None:  # finished in an earlier session: restore the record, keep the weights unneeded
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(stored)))
        return stored
    data = select_train(corpus, spec.n_train, unit.indices)  # bad indices raise before anything is written
    lock = _try_lock(root / unit.name)
    if lock is None:
        return None
    try:
        if path.is_file():  # finished by another process between the check and the lock
            return _read_record(path, identity)
        record = _train_locked(data, corpus, spec, unit, root, device, splits, init, identity)
    finally:
        lock.close()
    if archive is not None:
        archive_record(archive, unit.name, record)
    return record


def _read_record(path: Path, identity: dict) -> dict:
    record = json.loads(path.read_text())
    if {k: record.get(k) for k in identity} != identity:
        raise ValueError(f"{path} was written for other indices, seed or configuration; pick another root")
    return record


def _train_locked(data, corpus, spec, unit, root, device, splits, init, identity) -> dict:
    path = _record_path(root, unit)
    start = time.perf_counter()
    model, history = train_language_model(data, spec.model_config(len(corpus.vocab)), spec.train_config(unit.seed),
                                          root / unit.name / MODEL_FILE, device, init=init)
    eos = corpus.vocab.stoi["<eos>"]
    record = {**identity, "name": unit.name, "n_sentences": len(unit.indices), "history": history}
    for split in dict.fromkeys(("valid", *splits)):
        losses, mean = sentence_losses(model, corpus.splits[split], eos)
        record.update({f"{split}_losses": losses.tolist(), f"{split}_mean": mean})
    record["seconds_this_run"] = time.perf_counter() - start
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record)))
    return record


def run_units(corpus: Corpus, spec: RetrainSpec, units: Sequence[Unit], root: str | os.PathLike,
              shard: tuple[int, int] = (0, 1), device: str | torch.device = "cpu",
              archive: str | os.PathLike | None = None) -> list[str]:
    """Train every unit of this shard (unit j belongs to shard j mod k), skipping finished ones and those another
    process is training (module docstring), with progress.

    ``spec.threads`` torch threads are used (set here). Units are trained in list order, so a study listed
    subset-major keeps its finished units in complete groups.

    Args:
        shard: (i, k), 0 <= i < k: this process's share of the units.
        archive: the study's archive of records (:func:`train_unit`); archived units are restored, not trained.
    Returns:
        the names of this shard's units that are finished when it returns.
    Raises:
        ValueError: a bad shard or repeated unit names.
        RuntimeError: some units raised (:func:`train_each`; the others were trained first).
    """
    i, k = shard
    if not (isinstance(i, int) and isinstance(k, int) and 0 <= i < k):
        raise ValueError(f"shard must be (i, k) with 0 <= i < k, got {shard!r}")
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ValueError("unit names must be distinct")
    torch.set_num_threads(spec.threads)
    mine = [u for j, u in enumerate(units) if j % k == i]
    if archive is not None:
        archive = Path(archive)
        archive_records(root, mine, archive)  # units finished before the study had an archive
        for u in mine:  # archived ones restored (not trained) before the progress bar, which counts only trainings
            if not _record_path(Path(root), u).is_file() and (archive / f"{u.name}{ARCHIVE_SUFFIX}").is_file():
                try:
                    train_unit(corpus, spec, u, root, device, archive=archive)
                except ValueError:  # an archived record of another design: raised again by train_each below,
                    pass  # which logs it and trains the other units first
    todo = [u for u in mine if not _record_path(Path(root), u).is_file()]
    log(f"{len(mine)} units in shard {i}/{k}: {len(mine) - len(todo)} finished, {len(todo)} to train")
    train_each([(u.name, lambda u=u: train_unit(corpus, spec, u, root, device, archive=archive)) for u in todo],
               f"retraining (shard {i}/{k})")
    return [u.name for u in mine if _record_path(Path(root), u).is_file()]


def load_records(root: str | os.PathLike, units: Sequence[Unit],
                 archive: str | os.PathLike | None = None) -> dict[str, dict]:
    """The records of the finished units, by name: under ``root``, else in ``archive`` (:func:`archive_record`);
    units without a record are left out."""
    out = {}
    for u in units:
        path = _record_path(Path(root), u)
        if path.is_file():
            out[u.name] = json.loads(path.read_text())
        elif (stored := archived_record(archive, u.name)) is not None:
            out[u.name] = stored
    return out
