"""Any text corpus through the `datasets` library: local text files (``files:<dir>``) and Hugging Face
datasets (``hf:<name>[:<config>]``), checked offline against a brute-force count, and both notebooks run
on a local corpus with the single parameter change ``dataset="files:<dir>"``."""

import json
import re
import time
from collections import Counter
from pathlib import Path

import papermill
import pytest

from ifutils.data import EOS, UNK, load_corpus, ptb_files

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SIZES = {"train": 300, "valid": 60, "test": 60}


def write_corpus(folder: Path) -> dict[str, list[str]]:
    """The first lines of each PTB split as <folder>/{train,valid,test}.txt, with blank lines mixed in
    (to be skipped); returns the non-empty lines."""
    folder.mkdir(parents=True)
    lines = {}
    for split, path in ptb_files(allow_download=False).items():
        with open(path, encoding="utf-8") as f:
            lines[split] = [next(f) for _ in range(SIZES[split])]
        (folder / f"{split}.txt").write_text("\n".join(lines[split][:5]) + "\n\n   \n" + "".join(lines[split][5:]) + "\n")
    return {split: [ln for ln in ls if ln.split()] for split, ls in lines.items()}


def brute_force_vocab(train_lines: list[str], size: int) -> list[str]:
    """Top-`size` words of the train lines with <eos> counted once per line, ties alphabetical, <unk> last
    when words are dropped (or present with count 0 otherwise)."""
    counts = Counter()
    for line in train_lines:
        for word in line.split():
            counts[word] += 1
        counts[EOS] += 1
    counts.setdefault(UNK, 0)
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    return ranked if len(ranked) <= size else [w for w in ranked if w != UNK][: size - 1] + [UNK]


@pytest.mark.parametrize("vocab_size", [200, 100_000])
def test_text_files_match_a_brute_force_count(tmp_path, vocab_size):
    lines = write_corpus(tmp_path / "mini")
    corpus = load_corpus(f"files:{tmp_path / 'mini'}", vocab_size=vocab_size, cache_dir=tmp_path / "hf")
    expected_itos = brute_force_vocab(lines["train"], vocab_size)
    assert corpus.vocab.itos == expected_itos
    assert (corpus.name, corpus.window) == ("mini (text files)", None)
    assert re.fullmatch(r"files_mini_[0-9a-f]{8}", corpus.tag)
    stoi = {w: i for i, w in enumerate(expected_itos)}
    for split, ls in lines.items():
        assert len(corpus.splits[split]) == len(ls) == SIZES[split]  # the blank lines are skipped
        for line, ids in zip(ls, corpus.splits[split]):
            assert ids.tolist() == [stoi.get(w, stoi[UNK]) for w in line.split()] + [stoi[EOS]]
        assert corpus.num_tokens(split) == sum(len(line.split()) + 1 for line in ls)


def test_text_files_relative_to_the_data_dir_and_missing_files(tmp_path):
    write_corpus(tmp_path / "data" / "mini")
    corpus = load_corpus("files:mini", root=tmp_path / "data", cache_dir=tmp_path / "hf")
    assert corpus.tag.startswith("files_mini_") and len(corpus.splits["valid"]) == SIZES["valid"]
    (tmp_path / "data" / "mini" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test.txt") as err:
        load_corpus("files:mini", root=tmp_path / "data", cache_dir=tmp_path / "hf")
    assert str(tmp_path / "data" / "mini") in str(err.value)
    (tmp_path / "data" / "mini" / "test.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="test split"):
        load_corpus("files:mini", root=tmp_path / "data", cache_dir=tmp_path / "hf")


def test_reused_vocabulary_and_ptb_tokenisation(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"{split}.txt").write_text('The company said, "profits rose 5%."\n\nIt can\'t, Mr. Smith said.\n')
    corpus = load_corpus(f"files:{folder}", ptb_tokenize=True, cache_dir=tmp_path / "hf")
    words = [corpus.vocab.itos[i] for i in corpus.splits["test"][0].tolist()]
    assert words == ["the", "company", "said", "profits", "rose", "N", "N", EOS]
    again = load_corpus(f"files:{folder}", vocab=corpus.vocab, cache_dir=tmp_path / "hf")  # whitespace split
    assert again.vocab is corpus.vocab and int(again.splits["train"][0][0]) == corpus.vocab.stoi[UNK]  # "The"


def test_hugging_face_dataset_offline(tmp_path, monkeypatch):
    """A dataset folder in the Hub's layout (split CSV files, a non-default text column) loads offline;
    a Hub name that is not cached fails within seconds, naming the way out."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines = write_corpus(tmp_path / "mini")
    folder = tmp_path / "hub_layout"
    folder.mkdir()
    for split, name in (("train", "train"), ("valid", "validation"), ("test", "test")):
        rows = ["id,sentence"] + [f'{i},"{ln.strip()}"' for i, ln in enumerate(lines[split])]
        (folder / f"{name}.csv").write_text("\n".join(rows) + "\n")
    corpus = load_corpus(f"hf:{folder}", text_column="sentence", vocab_size=300, cache_dir=tmp_path / "hf")
    assert corpus.vocab.itos == brute_force_vocab(lines["train"], 300)
    assert [len(corpus.splits[s]) for s in SIZES] == list(SIZES.values())
    assert corpus.tag.startswith("hf_") and "/" not in corpus.tag and corpus.name.endswith("(Hugging Face)")
    with pytest.raises(ValueError, match="no column 'text'.*sentence"):
        load_corpus(f"hf:{folder}", cache_dir=tmp_path / "hf")
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="offline mode is on.*files:<dir>"):
        load_corpus("hf:wikitext:wikitext-2-raw-v1", cache_dir=tmp_path / "hf")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ConnectionError, match="allow_download=False"):
        load_corpus("hf:wikitext:wikitext-2-raw-v1", allow_download=False, cache_dir=tmp_path / "hf")
    assert time.perf_counter() - start < 10


def test_unknown_spec_lists_the_forms():
    with pytest.raises(ValueError, match="unknown dataset 'files:'.*files:<dir>.*hf:<name>"):
        load_corpus("files:")


def test_notebooks_run_on_a_text_file_corpus(tmp_path, monkeypatch):
    """The smoke configuration of tests/test_notebooks.py with dataset='files:<dir>' (and no ground truth)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))  # the kernels inherit the environment
    write_corpus(tmp_path / "mini")
    out = tmp_path / "out"
    out.mkdir()
    common = {"dataset": f"files:{tmp_path / 'mini'}", "figures_dir": str(out / "figures"),
              "results_file": str(out / "results.json"), "checkpoint": str(out / "lstm.pt"), "device": "cpu"}
    papermill.execute_notebook(
        "train_lstm_penn_treebank.ipynb", str(out / "train.ipynb"), progress_bar=False,
        parameters={**common, "emb_dim": 16, "hidden": 16, "epochs": 1, "max_train_sentences": 400},
    )
    papermill.execute_notebook(
        "fisher_if.ipynb", str(out / "fisher.ipynb"), progress_bar=False,
        parameters={**common, "num_coords": 24, "n_hessian": 20, "n_train": 60, "n_test": 3, "mc_samples": 2,
                    "mc_error_ks": [1, 2], "arnoldi_rank": 8, "lissa_depth": 300, "ground_truth": False},
    )
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["data_label"] == results["influence"]["data_label"] == "mini (text files)"
    assert results["training"]["valid_ppl"] > 1
    assert (results["influence"]["n_train"], results["influence"]["n_test"]) == (60, 3)
    assert "hessian" in {r["curvature"] for r in results["influence"]["agreement"]}
    # figures are named from `dataset` by the notebooks: wherever they land under figures_dir, all are there
    figures = sorted(p.name.rsplit("_", 1)[-1] for p in (out / "figures").rglob("*.png"))
    assert {"training.png", "spectra.png", "scatter.png", "error.png", "damping.png"} <= set(figures)
    assert "mini (text files)" in json.dumps(json.loads((out / "fisher.ipynb").read_text())["cells"])
    # the third notebook on the same model: whole-network influence with an exact reference, in a smoke configuration
    papermill.execute_notebook(
        "whole_network.ipynb", str(out / "whole.ipynb"), progress_bar=False,
        parameters={**common, "results_file": str(out / "whole.json"), "cache_dir": None, "n_fit": 20, "n_test": 3,
                    "n_exact": 2, "n_agree": 60, "exact_dampings": [0.1], "damping_grid": [0.01, 0.1],
                    "cg_max_iter": 60, "cg_tol": 1e-6, "lanczos_matvecs": 60, "lanczos_tol": 0.05, "chunk_size": 16,
                    "top_k": 10, "shown": 3},
    )
    whole = json.loads((out / "whole.json").read_text())
    assert whole["n_train"] == 300 and whole["n_agree"] == 60 and len(whole["test_indices"]) == 3
    assert "ggn@0.1" in whole["agreement_with_exact"] and whole["exact"]["spectrum"]["H"]["lambda_max"] > 0
    solved = [s for s in whole["exact"]["solves"] if "skipped" not in s]
    assert solved and all(max(s["relative_residual"]) < 1e-4 for s in solved)
    assert len(whole["top_sentences"]["all_training_sentences"]["test_sentence"]["harmful"]) == 3
    assert list((out / "figures").rglob("*_whole*_agreement.png"))
    shown = json.dumps(json.loads((out / "whole.ipynb").read_text())["cells"])
    assert "Most harmful" in shown and "Agreement with the exact" in shown


def test_corpora_in_folders_of_the_same_name_get_distinct_tags(tmp_path):
    """Two corpora in folders called alike must not share a run name (and so resume each other's checkpoint)."""
    from ifutils.data import load_corpus

    tags = []
    for where, word in (("a", "cat"), ("b", "dog")):
        folder = tmp_path / where / "corpus"
        folder.mkdir(parents=True)
        for split in ("train", "valid", "test"):
            (folder / f"{split}.txt").write_text(f"the {word} sat\nthe mat\n")
        tags.append(load_corpus(f"files:{folder}").tag)
    assert tags[0] != tags[1] and all(t.startswith("files_corpus_") for t in tags)
