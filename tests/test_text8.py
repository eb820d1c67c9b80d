import zipfile

import pytest
import torch

from ifutils.data import (
    Vocabulary,
    download,
    extract_text8,
    load_corpus,
    read_text8,
    text8_file,
)


def word(i: int) -> str:
    """A distinct 9-letter lowercase word for each i."""
    letters = []
    for _ in range(9):
        i, r = divmod(i, 26)
        letters.append(chr(97 + r))
    return "".join(letters)


@pytest.fixture
def fixture_file(tmp_path):
    """200 units of ' ' + 9 letters: 2,000 bytes, so the 90/5/5 split falls exactly between words
    (train = words 0..179, valid = 180..189, test = 190..199)."""
    words = [word(i) for i in range(200)]
    path = tmp_path / "text8-sample" / "text8_sample"
    path.parent.mkdir()
    path.write_bytes("".join(f" {w}" for w in words).encode())
    return path, words


def test_character_split_boundaries_and_windows(fixture_file):
    path, words = fixture_file
    corpus = read_text8(path, window=5, vocab_size=1000)
    assert [len(corpus.splits[s]) for s in ("train", "valid", "test")] == [36, 2, 2]
    expected = {"train": words[:180], "valid": words[180:190], "test": words[190:]}
    for split, ws in expected.items():
        # windows tile the split in order with no overlap
        flat = torch.cat(corpus.splits[split]).tolist()
        assert flat == [corpus.vocab.stoi.get(w, corpus.vocab.stoi["<unk>"]) for w in ws]
    # the vocabulary comes from the train split only: valid/test words are <unk>
    assert words[185] not in corpus.vocab.stoi and corpus.vocab.itos[-1] == "<unk>"


def test_incomplete_last_window_is_dropped(fixture_file):
    path, _ = fixture_file
    corpus = read_text8(path, window=7, vocab_size=1000)
    assert len(corpus.splits["train"]) == 180 // 7 and all(len(w) == 7 for w in corpus.splits["train"])


def test_vocabulary_truncation_maps_rare_words_to_unk(tmp_path):
    path = tmp_path / "t8"
    path.write_bytes(b" the the the the cat cat dog" * 10)
    corpus = read_text8(path, window=3, vocab_size=3)
    assert corpus.vocab.itos == ["<eos>", "the", "<unk>"]
    ids = torch.cat(corpus.splits["train"]).tolist()
    assert set(ids) == {1, 2} and ids[:7] == [1, 1, 1, 1, 2, 2, 2]
    assert Vocabulary.from_counts({"a": 3, "b": 2, "c": 1}, 10).itos == ["<eos>", "a", "b", "c"]


@pytest.mark.parametrize("content, where, what", [
    (b" hello World foo", "byte 7", "'W'"),
    (b" hello\nworld", "byte 6", "'\\\\n'"),
    (b" hello  world", "byte 6", "double space"),
    (b" caf\xc3\xa9 ok", "byte 4", "xc3"),
])
def test_wrong_format_names_the_byte(tmp_path, content, where, what):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not in text8 format") as err:
        read_text8(path, window=2)
    assert where in str(err.value) and what.replace("\\\\", "\\") in str(err.value)


def test_double_space_across_read_blocks_is_found(tmp_path):
    from ifutils.data import _text8_words

    path = tmp_path / "t8"
    path.write_bytes(b" abc  def")  # the double space straddles the 5-byte block boundary
    with pytest.raises(ValueError, match="byte 4 .*double space"):
        list(_text8_words(path, 0, path.stat().st_size, "t", block=5))


def test_truncated_zip_is_rejected_and_removed(tmp_path):
    good = tmp_path / "text8.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("text8", " anarchism originated as a term" * 2000)
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated.*deleted"):
        extract_text8(good, tmp_path / "text8")
    assert not good.exists() and not (tmp_path / "text8").exists() and not list(tmp_path.iterdir())


def test_unzipped_member_of_wrong_size_is_rejected(tmp_path):
    z = tmp_path / "text8.zip"
    with zipfile.ZipFile(z, "w") as archive:
        archive.writestr("text8", " short")
    with pytest.raises(ValueError, match="6 bytes, expected 100,000,000"):
        extract_text8(z, tmp_path / "text8")
    assert not z.exists()


def test_short_download_is_deleted(http_root, tmp_path):
    root, url = http_root
    (root / "text8.zip").write_bytes(b"PK" + b"\0" * 100)
    with pytest.raises(ValueError, match="102 bytes, expected 31,344,016"):
        download(url + "text8.zip", tmp_path / "dl" / "text8.zip", size=31_344_016)
    assert not list((tmp_path / "dl").iterdir())


def test_locating_text8_labels_the_sample_and_names_missing_files(fixture_file, tmp_path):
    path, _ = fixture_file
    assert text8_file(tmp_path, allow_download=False) == (path, "text8-format sample")
    (tmp_path / "text8").mkdir()
    (tmp_path / "text8" / "text8").write_bytes(b" too short")
    with pytest.raises(ValueError, match="10 bytes, but text8 has 100,000,000"):
        text8_file(tmp_path, allow_download=False)
    with pytest.raises(FileNotFoundError, match="text8/text8.*text8-sample/text8_sample.*IFUTILS_DATA_DIR"):
        text8_file(tmp_path / "empty", allow_download=False)


def test_shared_text8_sample_loads_as_sample():
    corpus = load_corpus("text8", allow_download=False)
    assert corpus.name == "text8-format sample" and len(corpus.vocab) == 10_000
    assert len(corpus.splits["train"]) > 9000 and all(len(w) == 35 for w in corpus.splits["valid"])
