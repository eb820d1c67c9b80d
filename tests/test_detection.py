"""The corruption benchmark end to end on a tiny corpus: models trained on corrupted sets, every ranking, the
table against detection_metrics on the rankings, and two rankings against a per-sentence autograd loop."""

import numpy as np
import pytest

from ifutils.experiments.detection import (
    DetectionConfig,
    corrupted_corpus,
    format_detection,
    rankings,
    score_models,
    train_models,
)
from ifutils.experiments.whole_network import WholeNetworkConfig
from ifutils.metrics import detection_metrics
from ifutils.retrain import RetrainSpec


def test_detection_study_on_a_tiny_corpus(tmp_path):
    from ifutils.io import load_checkpoint
    from ifutils.retrain import select_train

    from .test_datamodels import _flat_loop
    from .test_whole_network import _tiny_setup

    corpus, _ = _tiny_setup()
    spec = RetrainSpec(n_train=40, emb_dim=4, hidden=4, epochs=2, batch_size=8)
    config = DetectionConfig(fraction=0.1, kinds=("shuffle", "repeat"), seeds=(0, 1), k_out=2, k_in=2, subset_coords=6)
    wconfig = WholeNetworkConfig(n_fit=10, n_test=3, n_exact=0, exact_curvatures=(), chunk_size=8)
    assert train_models(corpus, spec, config, tmp_path / "m", (0, 2)) == ["shuffle_s0", "shuffle_s1"]
    train_models(corpus, spec, config, tmp_path / "m", (1, 2))
    written = []
    out = score_models(corpus, spec, config, wconfig, tmp_path / "m", tmp_path / "cache",
                       on_model=lambda per, info: written.append(len(info)))
    assert written == [1, 2, 3, 4] and set(out["table"]) == {"shuffle", "repeat"}
    assert out["models"]["repeat_s1"]["corrupted"] == 4
    # the table is detection_metrics of the (cached) rankings, mean over the two seeds
    values = []
    for seed in (0, 1):
        data, chosen = corrupted_corpus(corpus, spec, config, "repeat", seed)
        model, _, _ = load_checkpoint(tmp_path / "m" / f"repeat_s{seed}" / "model.pt")
        ranks, dampings = rankings(model, select_train(data, 40, range(40)), spec, config, wconfig, tmp_path / "cache")
        assert dampings["damping"] == pytest.approx(out["models"][f"repeat_s{seed}"]["damping"])
        cached, _ = rankings(model, select_train(data, 40, range(40)), spec, config, wconfig, tmp_path / "cache",
                             compute=False)  # status: read back, never computed
        assert cached.keys() == ranks.keys() and all(np.array_equal(cached[k], ranks[k]) for k in ranks)
        assert rankings(model, select_train(data, 40, range(40)), spec, config, wconfig, tmp_path / "empty",
                        compute=False) is None
        truth = np.zeros(40, bool)
        truth[chosen] = True
        values.append(detection_metrics(ranks["self:ekfac"], truth)["auroc"])
        if seed == 1:  # identity rankings against a loop of per-sentence gradients
            model = model.eval()
            g = _flat_loop(model.double(), data.splits["train"][:40]).float()
            gv = _flat_loop(model, data.splits["valid"]).mean(0).float()
            damping = dampings["damping"]
            np.testing.assert_allclose(ranks["self:identity"], ((g * g).sum(1) / (1 + damping)).numpy(), rtol=1e-3)
            np.testing.assert_allclose(ranks["valid:identity"], -(g @ gv / (1 + damping)).numpy(), rtol=1e-3,
                                       atol=1e-6)
            np.testing.assert_allclose(ranks["grad_l2"], (g * g).sum(1).numpy(), rtol=1e-3)
    assert out["table"]["repeat"]["rankings"]["self:ekfac"]["auroc"]["mean"] == pytest.approx(np.mean(values))
    # a later session on a fresh clone: the models scored before (the results file's per_model) are neither
    # loaded nor scored again, and the table is unchanged; the train stage skips them
    import shutil

    scored = {name: {"metrics": out["per_model"][name], "info": out["models"][name]} for name in out["models"]}
    shutil.rmtree(tmp_path / "m" / "repeat_s1")
    again = score_models(corpus, spec, config, wconfig, tmp_path / "m", tmp_path / "no_cache", scored=scored)
    assert again["table"] == out["table"] and not (tmp_path / "no_cache").exists()
    assert train_models(corpus, spec, config, tmp_path / "m", skip=set(scored)) == []
    assert not (tmp_path / "m" / "repeat_s1").exists()
    # the entry point finds them in its results file, for this configuration only (the spec's threads ignored)
    import json
    from dataclasses import asdict

    from ifutils.experiments.detection import scored_models

    header = json.loads(json.dumps({"spec": {k: v for k, v in asdict(spec).items() if k != "threads"},
                                    "config": asdict(config), "whole_network_config": asdict(wconfig)}))
    results = tmp_path / "ptb_detection.json"
    results.write_text(json.dumps({**header, "spec": asdict(spec), "table": out["table"], "models": out["models"],
                                   "per_model": out["per_model"]}))
    assert scored_models(results, header) == json.loads(json.dumps(scored))
    assert scored_models(results, {**header, "config": {**header["config"], "fraction": 0.2}}) == {}
    assert scored_models(tmp_path / "missing.json", header) == {}
    text = format_detection(out["table"], "recall@0.1")
    assert "self-influence, EK-FAC" in text and "OGA: isolation forest" in text and len(text.splitlines()) == 2 + 16

    # the applications notebook reads these results: executed headless on the tiny study's files
    _notebook_smoke(out, corpus, tmp_path)


def _notebook_smoke(detection, corpus, tmp_path):
    import json

    import papermill

    from ifutils.experiments import applications as app

    from .test_whole_network import _tiny_setup

    _, model = _tiny_setup()
    model = model.double().eval()
    config = app.ApplicationsConfig(seeds=(0, 1))
    rng = np.random.default_rng(0)
    fake = lambda prefix, m, k: {f"{prefix}_{m}_{k}_s{s}": {"valid_mean": 5 + rng.normal(0, 0.1),  # noqa: E731
                                                             "test_mean": 5 + rng.normal(0, 0.1),
                                                             "ptb_valid_mean": 5 + rng.normal(0, 0.1)}
                                  for s in (0, 1)}
    records = {}
    for m in ("random", "valid-ekfac"):
        for k in ("1", "5"):
            records.update(fake("trim", m, k))
            records.update(fake("select", m, k))
            records.update(fake("buffer", m, k))
    records.update({f"trim_none_s{s}": {"valid_mean": 5.0, "test_mean": 5.0} for s in (0, 1)})
    wconfig = WholeNetworkConfig(n_fit=10, n_test=3, n_exact=0, exact_curvatures=(), chunk_size=8)
    forget = [1, 2, 3]
    steps = app.newton_steps(model, corpus, forget, 40, wconfig, (0.1,))
    results = {
        "trimming": app.perplexity_table(records, "trim", config, [None], ["none"])
        + app.perplexity_table(records, "trim", config, (1.0, 5.0), ["random", "valid:ekfac"]),
        "selection": app.perplexity_table(records, "select", config, (1.0, 5.0), ["random", "valid:ekfac"]),
        "buffer": app.perplexity_table(records, "buffer", config, (1, 5), ["random", "valid:ekfac"], valid="ptb_valid"),
        "task2": "toy", "full_data_model": {"perplexity": {"valid": 9.0, "test": 9.0}},
        "unlearning": app.unlearning_table(model, corpus, forget, 40, steps, {0: model}, original_seed=0)}
    (tmp_path / "det.json").write_text(json.dumps({"table": detection["table"]}, default=float))
    (tmp_path / "app.json").write_text(json.dumps(results, default=float))
    papermill.execute_notebook("applications.ipynb", str(tmp_path / "applications.ipynb"), progress_bar=False,
                               parameters={"detection_results": str(tmp_path / "det.json"),
                                           "applications_results": str(tmp_path / "app.json"),
                                           "figures_dir": str(tmp_path / "figures"), "figure_prefix": "toy"})
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == [f"toy_{n}.png" for n in ("buffer", "detection_auroc", "selection", "trimming", "unlearning")]
    shown = json.dumps(json.loads((tmp_path / "applications.ipynb").read_text())["cells"])
    assert "influence - OGA per seed" in shown and "OGA as good or better?" in shown and "retrained (1 seeds)" in shown
    # docs/results.md renders both files
    from ifutils.experiments.report import results_markdown

    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "det.json").write_text(json.dumps({"table": detection["table"], "models": detection["models"],
                                                            "config": {"fraction": 0.1}}, default=float))
    (tmp_path / "res" / "app.json").write_text(json.dumps({**results, "trained_models": 20, "models": 30}, default=float))
    text = results_markdown(tmp_path / "res")
    assert "## Corrupted-sentence detection" in text and "The Outlier Gradient Analysis claim" in text and "## Trimming, selection, replay buffer, unlearning" in text
    assert "Other results files" not in text


def test_the_oga_verdict_from_a_constructed_table():
    """Per kind: the best influence and OGA rankings by mean, and a verdict from the paired per-seed differences."""
    from ifutils.experiments.detection import format_oga_comparison, oga_comparison

    def entry(values):
        return {"auroc": {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values},
                "average_precision": {"mean": 0.0, "std": 0.0, "values": [0.0, 0.0]}, "recall_at": {}}

    def kind(self_ekfac, valid_ekfac, l2, forest):
        return {"seeds": 2, "rankings": {"self:ekfac": entry(self_ekfac), "self:identity": entry([0.1, 0.1]),
                                         "valid:ekfac": entry(valid_ekfac), "grad_l2": entry(l2),
                                         "grad_l1": entry([0.0, 0.0]), "isolation_forest": entry(forest),
                                         "train_loss": entry([0.99, 0.99])}}

    table = {"a": kind([0.9, 0.8], [0.5, 0.5], [0.7, 0.6], [0.2, 0.2]),   # influence better in both seeds
             "b": kind([0.6, 0.6], [0.75, 0.55], [0.9, 0.9], [0.8, 0.8]),   # OGA better in both
             "c": kind([0.6, 0.8], [0.1, 0.1], [0.7, 0.7], [0.1, 0.1])}   # the seeds disagree
    out = oga_comparison(table)
    assert out["a"]["influence"][0] == "self:ekfac" and out["a"]["oga"][0] == "grad_l2"
    assert out["a"]["differences"] == pytest.approx([0.2, 0.2]) and out["a"]["verdict"] == "did not hold"
    assert out["b"]["influence"] == ("valid:ekfac", pytest.approx(0.65)) and out["b"]["verdict"] == "held"
    assert out["c"]["differences"] == pytest.approx([-0.1, 0.1]) and out["c"]["verdict"] == "mixed"
    text = format_oga_comparison(table)
    assert len(text.splitlines()) == 2 + 3 and "did not hold" in text and "| b |" in text
    with pytest.raises(ValueError, match="recall@0.1"):
        oga_comparison(table, "precision")
