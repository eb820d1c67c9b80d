"""Seeded corruption touches exactly the requested fraction; detection metrics on constructed cases equal
scikit-learn's (perfect separation 1.0, reversed 0.0) and a brute-force recall."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from ifutils.corruption import KINDS, corrupt
from ifutils.metrics import detection_metrics
from tests.conftest import random_sentences


@pytest.mark.parametrize("kind", KINDS)
def test_exactly_the_requested_fraction_changes_and_the_draw_is_seeded(kind):
    sentences = random_sentences(200, 13, max_len=8, seed=4)
    out, chosen = corrupt(sentences, 0.05, kind, vocab_size=13, eos_id=0, seed=3)
    changed = [i for i, (a, b) in enumerate(zip(sentences, out)) if not torch.equal(a, b)]
    assert changed == chosen.tolist() and len(changed) == 10
    for i in changed:
        assert len(out[i]) == len(sentences[i]) and out[i][-1] == 0 and (out[i][:-1] != 0).all()
        if kind == "shuffle":
            assert sorted(out[i].tolist()) == sorted(sentences[i].tolist())
        if kind == "repeat":
            assert len(set(out[i][:-1].tolist())) == 1
    again, chosen2 = corrupt(sentences, 0.05, kind, 13, 0, seed=3)
    assert chosen2.tolist() == chosen.tolist() and all(torch.equal(a, b) for a, b in zip(out, again))
    assert corrupt(sentences, 0.05, kind, 13, 0, seed=4)[1].tolist() != chosen.tolist()
    assert all(out[i] is sentences[i] for i in range(200) if i not in set(changed))


def test_bad_corruption_arguments():
    sentences = random_sentences(10, 13, seed=1)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(sentences, 0.1, "flip", 13, 0)
    with pytest.raises(ValueError, match="fraction"):
        corrupt(sentences, 1.0, "random", 13, 0)
    with pytest.raises(ValueError, match="eligible"):
        corrupt([torch.tensor([3, 3, 0])] * 10, 0.5, "shuffle", 13, 0)


def test_detection_metrics_on_known_cases_equal_scikit_learn():
    truth = np.array([True] * 5 + [False] * 15)
    perfect = np.linspace(1, 0, 20)
    out = detection_metrics(perfect, truth, inspected=(0.25, 0.5))
    assert out["auroc"] == 1.0 and out["average_precision"] == 1.0 and out["recall_at"]["0.25"] == 1.0
    reversed_ = detection_metrics(-perfect, truth)
    assert reversed_["auroc"] == 0.0
    assert reversed_["average_precision"] == pytest.approx(average_precision_score(truth, -perfect))
    rng = np.random.default_rng(0)
    scores = rng.normal(size=20) + truth
    got = detection_metrics(scores, truth, inspected=(0.1, 0.2))
    assert got["auroc"] == pytest.approx(roc_auc_score(truth, scores))
    top = np.argsort(-scores)[:4]
    assert got["recall_at"]["0.2"] == pytest.approx(truth[top].sum() / 5)
    with pytest.raises(ValueError, match="both"):
        detection_metrics(scores, np.ones(20, bool))
