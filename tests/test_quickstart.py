"""The Python quick starts run as written: README.md's (the 512-coordinate subset) and docs/method.md's (the whole
network), with a tiny corpus and checkpoint standing in for PTB and the main job's model, and their scores equal
the formula computed independently (a dense solve; a per-sentence autograd loop)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import ifutils
from ifutils.data import Corpus, Vocabulary
from ifutils.io import save_checkpoint

from .conftest import random_sentences, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _python_block(doc: str, contains: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(encoding="utf-8"), flags=re.S)
    chosen = [b for b in blocks if contains in b]
    assert len(chosen) == 1, f"{doc}: expected one python block containing {contains!r}, found {len(chosen)}"
    return chosen[0]


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A tiny corpus served by ``ifutils.load_corpus`` and a tiny model at checkpoints/ptb_lstm.pt in the cwd."""
    vocab = Vocabulary(["<eos>"] + [f"w{i}" for i in range(1, 20)])
    corpus = Corpus("ptb", vocab, {"train": random_sentences(260, 20, max_len=6, seed=1),
                                   "valid": random_sentences(8, 20, max_len=6, seed=2),
                                   "test": random_sentences(8, 20, max_len=6, seed=3)})
    model = tiny_model(vocab=20, emb=4, hidden=12, seed=4).float()  # weight_hh: 4 x 12 x 12 = 576 >= 512
    save_checkpoint(tmp_path / "checkpoints" / "ptb_lstm.pt", model, vocab)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ifutils, "load_corpus", lambda name, vocab=None, **kw: corpus)
    return corpus


def test_the_readme_quick_start_runs_and_its_scores_are_the_dense_ggn_solve(stand_in):
    ns: dict = {}
    exec(compile(_python_block("README.md", "per_sample_grads"), "README.md", "exec"), ns)
    g_train, g_test, ggn = ns["g_train"], ns["g_test"], ns["ggn"]
    assert ns["scores"].shape == (50, 5) and g_train.shape == (50, 512)
    matrix = ggn.matrix.double() + 1e-4 * torch.eye(512, dtype=torch.float64)
    expected = -(g_train.double() @ torch.linalg.solve(matrix, g_test.double().T))
    np.testing.assert_allclose(np.asarray(ns["scores"], dtype=np.float64), expected.numpy(), rtol=1e-6, atol=1e-9)


def test_the_whole_network_quick_start_runs_and_its_scores_are_minus_g_dot_q(stand_in):
    from .test_datamodels import _flat_loop

    ns: dict = {}
    exec(compile(_python_block("docs/method.md", "score_all"), "docs/method.md", "exec"), ns)
    scores, q, train = np.asarray(ns["scores"]), ns["q"], ns["train"]
    assert scores.shape == (len(train), 5) and q.shape == (5, ns["net"].p)
    g = _flat_loop(ns["model"], train).float()  # (n, P) per-sentence gradients, one autograd call each
    np.testing.assert_allclose(scores, -(g @ q.T).numpy(), rtol=1e-4, atol=1e-6)
    assert (Path("runs") / "quickstart_scores").is_dir()
