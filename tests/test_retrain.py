import json

import pytest
import torch

import ifutils.train
from ifutils.experiments.plots import retrain_deltas
from ifutils.experiments.retrain_check import (
    METHODS,
    RetrainConfig,
    retrain_check,
    top_percent,
    without,
)
from ifutils.model import ModelConfig
from ifutils.train import TrainConfig, train_language_model

from .test_train import toy_corpus

MODEL = ModelConfig(12, 8, 8, dropout=0.2)


def test_removed_sentences_are_exactly_the_ones_the_trainer_never_sees(tmp_path, monkeypatch):
    corpus, removed = toy_corpus(), [0, 5, 17, 40, 49]
    seen = []
    real = ifutils.train.make_batch

    def recording(sentences, eos_id):  # what the trainer (and its validation pass) batches
        seen.extend(map(id, sentences))
        return real(sentences, eos_id)

    monkeypatch.setattr(ifutils.train, "make_batch", recording)
    train_language_model(without(corpus, 50, removed), MODEL, TrainConfig(epochs=1, batch_size=8), tmp_path / "a.pt")
    expected = sorted(id(s) for i, s in enumerate(corpus.splits["train"][:50]) if i not in removed)  # brute force
    valid_ids = {id(s) for s in corpus.splits["valid"]}
    assert sorted(i for i in seen if i not in valid_ids) == expected


def test_bad_removals_and_settings_are_refused():
    corpus = toy_corpus()
    for bad in ([3, 3], [50], [-1]):
        with pytest.raises(ValueError, match="distinct and in"):
            without(corpus, 50, bad)
    with pytest.raises(ValueError, match="n_train"):
        without(corpus, 65, [])
    for percent in (0, 100, -5):
        with pytest.raises(ValueError, match="percent"):
            top_percent(torch.rand(10), percent)
    with pytest.raises(ValueError, match="rounds to none"):
        top_percent(torch.rand(10), 1.0)
    with pytest.raises(ValueError, match="unknown"):
        RetrainConfig(methods=("hessian", "kfac"))
    with pytest.raises(ValueError, match="two distinct seeds"):
        RetrainConfig(seeds=(0,))


def test_same_seed_gives_identical_weights(tmp_path):
    corpus, cfg = toy_corpus(), TrainConfig(epochs=2, batch_size=8, seed=3)
    a, _ = train_language_model(without(corpus, 40, [1, 2]), MODEL, cfg, tmp_path / "a.pt")
    b, _ = train_language_model(without(corpus, 40, [2, 1]), MODEL, cfg, tmp_path / "b.pt")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_resuming_with_another_removal_set_is_refused(tmp_path):
    corpus = toy_corpus()
    train_language_model(without(corpus, 40, [1, 2]), MODEL, TrainConfig(epochs=1, batch_size=8), tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"without 2 sentences \(\w+\).*but the data loaded is .*without 2 sentences"):
        train_language_model(without(corpus, 40, [1, 3]), MODEL, TrainConfig(epochs=2, batch_size=8), tmp_path / "a.pt")


def test_top_percent_picks_the_highest_scores():
    scores = torch.randn(97, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for percent in (1.0, 10.0, 33.3, 99.0):
        count = round(97 * percent / 100)
        brute = sorted(range(97), key=lambda i: -scores[i])[:count]
        assert top_percent(scores, percent).tolist() == brute


def test_end_to_end_on_a_tiny_corpus(tmp_path):
    config = RetrainConfig(n_train=60, emb_dim=8, hidden=8, epochs=1, batch_size=8, seeds=(0, 1), percent=10.0,
                           num_coords=16, n_hessian=20, n_valid=10)
    results = retrain_check(toy_corpus(), config, tmp_path / "ck", tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(results))
    assert results["complete"] and results["n_removed"] == 6 and set(results["methods"]) == set(METHODS)
    assert results["noise_floor"]["valid"] == pytest.approx(
        torch.tensor(list(results["full"]["valid"]["per_seed"].values())).std().item())
    for method, entry in results["methods"].items():
        assert len(set(results["removed"][method])) == 6
        assert set(entry["valid"]["per_seed"]) == {"0", "1"} and entry["valid"]["std"] is not None
        assert ("predicted_delta_nll" in entry) == (method != "random")
    assert len(list((tmp_path / "ck").rglob("*.pt"))) == 2 + 2 * len(METHODS)
    # a rerun loads every checkpoint and reproduces the numbers
    assert retrain_check(toy_corpus(), config, tmp_path / "ck", tmp_path / "r.json")["methods"] == results["methods"]
    retrain_deltas(results, "toy", tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
