import pytest
import torch

from ifutils.data import Corpus, Vocabulary
from ifutils.io import load_checkpoint
from ifutils.model import ModelConfig
from ifutils.train import TrainConfig, perplexity, train_language_model

from .conftest import one_thread_env, random_sentences


def toy_corpus():
    vocab = Vocabulary(["<eos>"] + [f"w{i}" for i in range(1, 12)])
    splits = {"train": random_sentences(64, 12, seed=3), "valid": random_sentences(16, 12, seed=4),
              "test": random_sentences(16, 12, seed=5)}
    return Corpus("toy", vocab, splits)


def test_training_lowers_perplexity_and_checkpoint_round_trips(tmp_path):
    corpus = toy_corpus()
    cfg = ModelConfig(12, 8, 8, dropout=0.1)
    model, history = train_language_model(corpus, cfg, TrainConfig(epochs=3, batch_size=8, lr=1e-2),
                                          tmp_path / "ck.pt")
    assert history[-1]["valid_ppl"] < history[0]["valid_ppl"]
    loaded, vocab, payload = load_checkpoint(tmp_path / "ck.pt")
    assert vocab.itos == corpus.vocab.itos and len(payload["history"]) == 3
    assert perplexity(loaded, corpus.splits["valid"], 0) == pytest.approx(history[-1]["valid_ppl"], rel=1e-6)
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_from_other_configuration_is_refused(tmp_path):
    corpus = toy_corpus()
    train_language_model(corpus, ModelConfig(12, 8, 8), TrainConfig(epochs=1, batch_size=8), tmp_path / "a.pt")
    with pytest.raises(ValueError, match="another configuration"):
        train_language_model(corpus, ModelConfig(12, 8, 16), TrainConfig(epochs=1, batch_size=8), tmp_path / "a.pt")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    corpus = toy_corpus()
    cfg = ModelConfig(12, 8, 8)
    train_language_model(corpus, cfg, TrainConfig(epochs=1, batch_size=8), tmp_path / "a.pt")
    payload = torch.load(tmp_path / "a.pt", weights_only=True)
    payload["state_dict"]["decoder.bias"][3] = float("inf")  # poisons the next epoch's loss
    payload["train_config"]["epochs"] = 2
    torch.save(payload, tmp_path / "a.pt")
    before = (tmp_path / "a.pt").read_bytes()
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train_language_model(corpus, cfg, TrainConfig(epochs=2, batch_size=8), tmp_path / "a.pt")
    assert (tmp_path / "a.pt").read_bytes() == before


def test_pickle_checkpoint_does_not_execute_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": Evil(), "vocab": [], "model_config": {}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_training_killed_between_epochs_resumes_to_the_same_weights(tmp_path, one_thread):
    """A subprocess is killed with SIGKILL right after its first epoch's checkpoint; resuming it gives
    the weights of an uninterrupted run, bit for bit."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    script = f"""
import os, signal, sys
sys.path.insert(0, {root!r})
import ifutils.train as train
from tests.test_train import toy_corpus
from ifutils.model import ModelConfig
real = train.save_checkpoint
def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
train.save_checkpoint = save_then_die
train.train_language_model(toy_corpus(), ModelConfig(12, 8, 8, dropout=0.2), train.TrainConfig(epochs=3, batch_size=8),
                           {str(tmp_path / 'killed.pt')!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=one_thread_env())
    assert proc.returncode == -9, proc.stderr
    assert len(torch.load(tmp_path / "killed.pt", weights_only=True)["history"]) == 1
    cfg, train_cfg = ModelConfig(12, 8, 8, dropout=0.2), TrainConfig(epochs=3, batch_size=8)
    resumed, _ = train_language_model(toy_corpus(), cfg, train_cfg, tmp_path / "killed.pt")
    full, _ = train_language_model(toy_corpus(), cfg, train_cfg, tmp_path / "full.pt")
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_keep_epochs_writes_one_loadable_checkpoint_per_epoch(tmp_path):
    corpus, cfg = toy_corpus(), ModelConfig(12, 8, 8)
    train_language_model(corpus, cfg, TrainConfig(epochs=1, batch_size=8), tmp_path / "ck.pt")
    assert not list(tmp_path.glob("ck_epoch*"))  # off by default
    payload = torch.load(tmp_path / "ck.pt", weights_only=True)
    del payload["train_config"]["keep_epochs"]  # a checkpoint from before the option existed still resumes
    torch.save(payload, tmp_path / "ck.pt")
    model, _ = train_language_model(corpus, cfg, TrainConfig(epochs=3, batch_size=8, keep_epochs=True), tmp_path / "ck.pt")
    assert sorted(p.name for p in tmp_path.glob("ck_epoch*")) == ["ck_epoch2.pt", "ck_epoch3.pt"]
    second, _, second_payload = load_checkpoint(tmp_path / "ck_epoch2.pt")
    last, _, _ = load_checkpoint(tmp_path / "ck_epoch3.pt")
    assert len(second_payload["history"]) == 2
    for a, b, c in zip(model.state_dict().values(), last.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(model.state_dict().values(), second.state_dict().values()))
    assert not list(tmp_path.glob("*.tmp"))
