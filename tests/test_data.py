import hashlib
import shutil

import pytest
import torch

from ifutils import data
from ifutils.data import (
    Vocabulary,
    bucket_batches,
    download,
    load_corpus,
    make_batch,
    ptb_files,
)


def test_vocabulary_and_encoding():
    vocab = Vocabulary.build([["a", "b", "a"], ["c", "a"]], max_size=3)
    assert vocab.itos == ["a", "<eos>", "<unk>"]  # "b" and "c" are rarest, replaced by <unk>
    assert vocab.encode(["a", "c"]).tolist() == [0, 2, 1]


def test_make_batch_shifts_and_masks():
    s1, s2 = torch.tensor([5, 6, 0]), torch.tensor([7, 0])
    inputs, targets, mask = make_batch([s1, s2], eos_id=0)
    assert inputs.tolist() == [[0, 5, 6], [0, 7, 0]]
    assert targets.tolist() == [[5, 6, 0], [7, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    with pytest.raises(ValueError, match="empty"):
        make_batch([s1, torch.tensor([], dtype=torch.long)], 0)


def test_bucket_batches_cover_every_index_once():
    lengths = [5, 1, 3, 3, 9, 2, 7]
    batches = bucket_batches(lengths, 3, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 4 for b in batches)


def test_ptb_corpus_has_mikolov_statistics():
    corpus = load_corpus("ptb", allow_download=False)
    assert len(corpus.vocab) == 10_000
    assert [len(corpus.splits[s]) for s in ("train", "valid", "test")] == [42068, 3370, 3761]
    assert corpus.num_tokens("train") == 929_589 and corpus.num_tokens("test") == 82_430
    assert all(int(s[-1]) == corpus.vocab.stoi["<eos>"] for s in corpus.splits["valid"])


def test_missing_data_names_files_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        ptb_files(allow_download=False)
    for text in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt", "IFUTILS_DATA_DIR", str(tmp_path)):
        assert text in str(err.value)


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="unknown dataset 'wikitext'"):
        load_corpus("wikitext")


def test_file_with_wrong_checksum_is_refused(tmp_path):
    real = ptb_files(allow_download=False)
    (tmp_path / "ptb").mkdir()
    for path in real.values():
        shutil.copy(path, tmp_path / "ptb" / path.name)
    with open(tmp_path / "ptb" / "ptb.valid.txt", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="ptb.valid.txt has md5"):
        ptb_files(tmp_path, allow_download=False)


def test_download_from_local_server_good_and_corrupt(http_root, tmp_path):
    root, url = http_root
    for path in ptb_files(allow_download=False).values():
        shutil.copy(path, root / path.name)
    paths = ptb_files(tmp_path / "dl", allow_download=True, base_url=url)
    assert all(p.is_file() for p in paths.values())
    # a corrupted copy is rejected by its checksum and deleted
    (root / "bad.txt").write_bytes((root / "ptb.test.txt").read_bytes()[:-10] + b"corrupted!")
    dest = tmp_path / "dl2" / "ptb.test.txt"
    with pytest.raises(ValueError, match="md5"):
        download(url + "bad.txt", dest, data.PTB_MD5["ptb.test.txt"])
    assert not dest.exists() and not list(dest.parent.iterdir())
    # a good arbitrary file passes
    good = root / "good.bin"
    good.write_bytes(b"hello")
    download(url + "good.bin", tmp_path / "g.bin", hashlib.md5(b"hello").hexdigest())
    assert (tmp_path / "g.bin").read_bytes() == b"hello"


def test_failed_download_reports_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="Download failed"):
        ptb_files(tmp_path, allow_download=True, base_url="http://127.0.0.1:9/")


# --- text in, text out: tokenize and the <unk> rate of encode ---

from ifutils.data import UNK_WARN_RATE, tokenize  # noqa: E402


@pytest.mark.parametrize("text, expected", [
    ('The company said, "profits rose 5%."', "the company said profits rose N N"),
    ("Investors' stake in AT&T fell $1.5 billion -- to C$100, Mr. Smith said.",
     "investors ' stake in at&t fell $ N billion to c$ N mr. smith said"),
    ("I can't and won't; don't you cannot? It's sold in the U.S.",
     "i ca n't and wo n't do n't you can not it 's sold in the u.s."),
    ("The 30-year bonds of the 1980s and '80s, 8.5 % in N.J. (Calif.-based non-U.S. unit) ...",
     "the 30-year bonds of the 1980s and '80s N N in n.j. calif.-based non-u.s. unit"),
    ("Capital Cities/ABC sold 1,000 shares at 3 1/2 on Oct. 5; they'll see O'Brien's \u201cplan.\u201d",
     "capital cities\\/abc sold N shares at N N on oct. N they 'll see o'brien 's plan"),
    (" ,;: -- ", ""),
])
def test_tokenize_writes_text_as_ptb_does(text, expected):
    assert tokenize(text) == expected.split()


def test_tokenize_keeps_ptb_lines_as_they_are():
    """PTB text is a fixed point (up to the footnote marks \\* of a few table lines)."""
    with open(ptb_files(allow_download=False)["valid"], encoding="utf-8") as f:
        lines = [line for line in f if line.split()]
    changed = [line for line in lines if tokenize(line) != line.split()]
    assert all("\\*" in line for line in changed) and len(changed) <= 5
    with pytest.raises(TypeError, match="one str"):
        tokenize(["a", "b"])


def test_encode_refuses_a_string_and_reports_the_unk_rate():
    vocab = Vocabulary.build([["the", "cat", "sat"], ["the", "dog"]], max_size=4)  # the <eos> cat <unk>
    with pytest.raises(TypeError, match="list of words.*tokenize\\(text\\)"):
        vocab.encode("the cat")
    with pytest.raises(TypeError, match="must all be str"):
        vocab.encode(["the", 3])
    words = ["the", "cat", "sat", "on", "the", "mat", "<unk>"]
    ids, rate = vocab.encode(words, return_unk_rate=True, warn_above=None)
    unk = vocab.stoi["<unk>"]
    assert rate == sum(w not in vocab.stoi or w == "<unk>" for w in words) / len(words) == 4 / 7
    assert ids.tolist() == [vocab.stoi.get(w, unk) for w in words] + [vocab.stoi["<eos>"]]
    with pytest.warns(UserWarning, match="57.1% of the 7 words map to '<unk>'"):
        vocab.encode(words)
    with pytest.warns(UserWarning):
        vocab.encode(["the", "mat"], warn_above=0.49)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vocab.encode(["the", "cat"], return_unk_rate=True)[1] == 0.0
        assert vocab.encode(["the"] * 9 + ["mat"], warn_above=UNK_WARN_RATE).shape == (11,)  # 10%: not above
        assert vocab.encode([], return_unk_rate=True)[1] == 0.0
