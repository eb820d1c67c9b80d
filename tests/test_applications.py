"""Trimming, selection, buffer and unlearning designs: the units remove or keep exactly the chosen sentences, the
second task's corpus maps words to the first task's vocabulary, training can start from given weights, the Newton
steps equal the closed form for the identity, and the tables equal a loop over records."""

import numpy as np
import pytest
import torch

from ifutils.experiments import applications as app


def _harm(n, seed=0):
    rng = np.random.default_rng(seed)
    return {m: rng.normal(size=n) for m in app.HARM_METHODS}


def test_trimming_and_selection_units_remove_and_keep_exactly_the_ranked_sentences():
    n, harm = 200, _harm(200)
    config = app.ApplicationsConfig(seeds=(0, 1), trim_percents=(5.0,), select_percents=(10.0,))
    trim = {u.name: u for u in app.trimming_units(harm, config, n)}
    assert len(trim) == 2 + 2 * (1 + len(app.HARM_METHODS))
    removed = set(range(n)) - set(trim["trim_valid-ekfac_5_s1"].indices)
    assert removed == set(np.argsort(-harm["valid:ekfac"])[:10].tolist())  # the 10 most harmful
    assert len(trim["trim_random_5_s0"].indices) == 190 and trim["trim_none_s0"].indices == tuple(range(n))
    select = {u.name: u for u in app.selection_units(harm, config, n)}
    assert set(select["select_grad_l2_10_s0"].indices) == set(np.argsort(harm["grad_l2"])[:20].tolist())
    assert select["select_random_10_s1"].indices == select["select_random_10_s0"].indices  # one draw for the seeds


def test_buffers_task2_corpus_and_buffer_corpus(tmp_path):
    from ifutils.data import Corpus, Vocabulary

    vocab = Vocabulary(["<eos>", "<unk>", "a", "b", "c"])
    corpus = Corpus("toy", vocab, {"train": [torch.tensor([2, 3, 0]), torch.tensor([4, 0])] * 5,
                                   "valid": [torch.tensor([2, 0])], "test": [torch.tensor([3, 0])]})
    (tmp_path / "t8").write_text("a b zz c a b c c zz a b")
    task2 = app.task2_corpus(corpus, tmp_path / "t8", window=2, max_words=10)
    assert [w.tolist() for w in task2.splits["train"] + task2.splits["valid"]] == [
        [2, 3, 0], [1, 4, 0], [2, 3, 0], [4, 4, 0], [1, 2, 0]]
    assert task2.splits["ptb_valid"] is corpus.splits["valid"] and len(task2.splits["train"]) == 4
    config = app.ApplicationsConfig(buffer_sizes=(3,), buffer_methods=("valid:ekfac", "train_loss"))
    harm = _harm(10, seed=2)
    b = app.buffers(harm, config, 10)
    assert b[("none", 0)] == [] and b[("valid:ekfac", 3)] == sorted(np.argsort(harm["valid:ekfac"])[:3].tolist())
    assert b[("train_loss", 3)] == sorted(np.argsort(-harm["train_loss"])[:3].tolist())  # the hardest
    data = app.buffer_corpus(task2, corpus, b[("random", 3)], 10)
    assert len(data.splits["train"]) == 4 + 3 and data.splits["train"][4] is corpus.splits["train"][b[("random", 3)][0]]


def test_training_can_start_from_given_weights(tmp_path):
    from ifutils.model import ModelConfig
    from ifutils.train import TrainConfig, train_language_model

    from .test_whole_network import _tiny_setup

    corpus, model = _tiny_setup()
    cfg = model.config
    assert isinstance(cfg, ModelConfig)
    trained, _ = train_language_model(corpus, cfg, TrainConfig(epochs=1, batch_size=8, lr=1e-12, seed=3),
                                      tmp_path / "m.pt", init=model)
    for a, b in zip(trained.parameters(), model.parameters()):
        assert torch.allclose(a, b.float(), atol=1e-8)  # lr 1e-12: the weights stay at init
    other, _ = train_language_model(corpus, cfg, TrainConfig(epochs=1, batch_size=8, lr=1e-12, seed=3),
                                    tmp_path / "n.pt")
    assert not torch.allclose(next(other.parameters()), next(model.parameters()).float())


def test_newton_steps_for_the_identity_and_the_unlearning_table(tmp_path):
    from ifutils.experiments.whole_network import WholeNetworkConfig

    from .test_datamodels import _flat_loop
    from .test_whole_network import _tiny_setup

    corpus, model = _tiny_setup()
    model = model.double().eval()
    forget = [1, 5, 7]
    wconfig = WholeNetworkConfig(n_fit=10, n_test=3, n_exact=0, exact_curvatures=(), chunk_size=8)
    steps = app.newton_steps(model, corpus, forget, 40, wconfig, (0.5,))
    g = _flat_loop(model, [corpus.splits["train"][i] for i in forget]).sum(0)
    theta = app.flat_params(model)
    torch.testing.assert_close(steps[("identity", 0.5)], theta + g / (1.5 * 40))
    assert {k for k, _ in steps} == {"default", "ekfac", "kfac", "mc_fisher_k1_diag", "ef_diag", "identity"}
    table = app.unlearning_table(model, corpus, forget, 40, steps, {0: model, 1: model}, original_seed=0)
    orig = table["rows"][0]
    assert orig["method"] == "original" and orig["distance_to_retrained"] == 0.0
    assert table["retrained_summary"]["forget_loss"]["std"] == 0.0
    m = app.unlearning_measures(model, theta, corpus, forget, 40)
    assert m["mia_gap"] == pytest.approx(m["forget_loss"] - m["test_loss"])
    assert "retrained (2 seeds)" in app.format_unlearning(table)


def test_perplexity_table_equals_a_loop_over_records():
    config = app.ApplicationsConfig(seeds=(0, 1, 2))
    rng = np.random.default_rng(0)
    records = {f"trim_{m}_{k:g}_s{s}": {"valid_mean": rng.normal(5), "test_mean": rng.normal(5)}
               for m in ("random", "valid-ekfac") for k in (1.0, 5.0) for s in (0, 1, 2)}
    del records["trim_random_5_s2"]
    rows = app.perplexity_table(records, "trim", config, (1.0, 5.0), ["random", "valid:ekfac"])
    assert len(rows) == 4
    r = next(r for r in rows if r["method"] == "random" and r["level"] == 5.0)
    assert r["seeds"] == 2
    expected = [np.exp(records[f"trim_random_5_s{s}"]["valid_mean"]) for s in (0, 1)]
    assert r["valid_ppl"]["mean"] == pytest.approx(np.mean(expected)) and r["valid_ppl"]["std"] == pytest.approx(np.std(expected))
    assert "| 5 | random | 2 |" in app.format_perplexity(rows, "percent removed")


def test_rankings_kept_in_the_repository_are_read_back_for_the_same_model_only(tmp_path):
    """The rankings the application units are built from: archived once, read back bit for bit (a fresh clone
    trims and selects the same sentences as the archived models), refused for another model's weights."""
    rng = np.random.default_rng(0)
    scores = {"valid:ekfac": rng.normal(size=50), "train_loss": rng.normal(size=50)}
    description = {"weights_sha256": "ab" * 32, "methods": sorted(scores)}
    base = tmp_path / "archive" / "rankings"
    assert app.archived_rankings(base, description) is None
    app.archive_rankings(base, description, scores, {"damping": 1e-6, "subset_damping": 1e-3})
    back, dampings = app.archived_rankings(base, description)
    assert dampings == {"damping": 1e-6, "subset_damping": 1e-3} and back.keys() == scores.keys()
    assert all(np.array_equal(back[k], scores[k]) and back[k].dtype == np.float64 for k in scores)
    assert app.archived_rankings(base, {**description, "weights_sha256": "cd" * 32}) is None
