"""The whole-network study's summaries: agreement with the reference against scipy loops, top sentences by rank,
and the configuration's checks (the pipeline itself is made of tested core parts: network, network_kfac, scoring)."""

import numpy as np
import pytest
import torch
from scipy import stats

from ifutils.experiments.whole_network import (
    WholeNetworkConfig,
    agreement_with_reference,
    top_sentences,
)


def test_agreement_equals_scipy_per_column_and_the_validation_query_apart():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 6))
    est = ref + rng.normal(scale=0.5, size=ref.shape)
    out = agreement_with_reference(est, ref, top_k=10)
    spearman = [stats.spearmanr(est[:, j], ref[:, j])[0] for j in range(1, 6)]
    assert out["spearman"]["mean"] == pytest.approx(np.mean(spearman), rel=1e-12)
    assert out["spearman"]["ci"][0] <= out["spearman"]["mean"] <= out["spearman"]["ci"][1]
    assert out["validation"]["pearson"] == pytest.approx(stats.pearsonr(est[:, 0], ref[:, 0])[0], rel=1e-12)
    harmful = [len(set(np.argsort(est[:, j])[-10:]) & set(np.argsort(ref[:, j])[-10:])) / 10 for j in range(1, 6)]
    assert out["top_k_harmful"]["mean"] == pytest.approx(np.mean(harmful))
    same = agreement_with_reference(ref, ref, top_k=10)
    assert same["spearman"]["mean"] == pytest.approx(1.0) and same["top_k_helpful"]["mean"] == 1.0


class _Vocab:
    itos = ["<eos>", "a", "b", "c"]


def test_top_sentences_are_the_most_negative_and_most_positive_influences():
    scores = np.array([[0.0, 3.0], [0.0, -2.0], [0.0, 1.0], [0.0, -5.0]])
    sentences = [torch.tensor([1, 0]), torch.tensor([2, 0]), torch.tensor([3, 0]), torch.tensor([1, 2, 0])]
    top = top_sentences(scores, 1, sentences, _Vocab(), shown=2)
    assert [s["index"] for s in top["helpful"]] == [3, 1] and [s["index"] for s in top["harmful"]] == [0, 2]
    assert top["helpful"][0] == {"index": 3, "influence": -5.0, "text": "a b"}


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="alpha"):
        WholeNetworkConfig(alpha=0.0)
    with pytest.raises(ValueError, match="n_test"):
        WholeNetworkConfig(n_test=0)
