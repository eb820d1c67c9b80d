"""Named runs never overwrite another run's outputs; user paths are honoured anywhere; one results file holds
the sections of one checkpoint."""

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import papermill
import pytest
import torch

from ifutils.data import PROJECT_ROOT
from ifutils.experiments.comparison import InfluenceConfig
from ifutils.experiments.runs import (
    RunConfig,
    comparison_run,
    derive_name,
    distinct_warnings,
    training_run,
)
from ifutils.io import file_sha256, project_path, stored_path, update_results
from ifutils.model import ModelConfig
from ifutils.train import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def outside():
    """A directory outside the repository (pytest's tmp_path may lie inside it)."""
    with tempfile.TemporaryDirectory() as name:
        yield Path(name).resolve()


def test_user_paths_are_honoured_anywhere(outside):
    tmp_path = outside
    assert not tmp_path.is_relative_to(PROJECT_ROOT)
    assert project_path("figures") == PROJECT_ROOT / "figures"
    assert project_path(tmp_path / "x.pt") == (tmp_path / "x.pt").resolve()
    assert project_path("../outside.pt") == (PROJECT_ROOT.parent / "outside.pt").resolve()
    assert stored_path(PROJECT_ROOT / "checkpoints" / "a.pt") == "checkpoints/a.pt"  # never this machine's root
    assert stored_path(tmp_path / "x.pt") == str((tmp_path / "x.pt").resolve())
    with pytest.raises(TypeError, match="path must be a str"):
        project_path(None)


def test_one_results_file_holds_one_checkpoint(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"model a")
    b.write_bytes(b"model b")
    results = tmp_path / "run.json"
    update_results(results, "training", {"x": 1}, checkpoint=a, run_name="run")
    update_results(results, "influence", {"y": 2}, checkpoint=a, run_name="run")
    stored = json.loads(results.read_text())
    assert stored["influence"]["provenance"]["checkpoint"] == {"path": stored_path(a),
                                                               "sha256": hashlib.sha256(b"model a").hexdigest()}
    before = results.read_bytes()
    expected = f"run_name='run_{file_sha256(b)[:8]}'"
    with pytest.raises(ValueError, match=expected):
        update_results(results, "influence", {"y": 3}, checkpoint=b, run_name="run")
    assert results.read_bytes() == before
    update_results(tmp_path / "only.json", "training", {}, checkpoint=a)  # replacing the only section is fine
    update_results(tmp_path / "only.json", "training", {}, checkpoint=b)


def test_run_names():
    model, train = ModelConfig(10000), TrainConfig()
    paths = training_run(RunConfig(), "ptb", model, train)
    assert (paths["name"], stored_path(paths["checkpoint"]), stored_path(paths["results_file"])) == (
        "ptb", "checkpoints/ptb_lstm.pt", "results/ptb.json")
    tiny = training_run(RunConfig(), "ptb", ModelConfig(10000, 32, 32), TrainConfig(epochs=1))
    assert tiny["name"].startswith("ptb_") and tiny["name"] != "ptb"
    assert stored_path(tiny["checkpoint"]) == f"checkpoints/{tiny['name']}_lstm.pt"
    other_ck = training_run(RunConfig(checkpoint="checkpoints/tiny.pt"), "ptb", model, train)
    assert other_ck["name"] != "ptb" and stored_path(other_ck["checkpoint"]) == "checkpoints/tiny.pt"
    assert training_run(RunConfig(run_name="mine"), "ptb", model, train)["name"] == "mine"
    assert comparison_run(RunConfig(), "ptb", InfluenceConfig())["name"] == "ptb"
    assert comparison_run(RunConfig(), "ptb", InfluenceConfig(subset="decoder"))["name"] == "ptb_decoder"
    assert comparison_run(RunConfig(), "ptb", InfluenceConfig(subset="lstm+decoder"))["name"] == "ptb_lstm_decoder"
    assert comparison_run(RunConfig(), "ptb", InfluenceConfig(n_test=3))["name"] != "ptb"
    assert comparison_run(RunConfig(), "corpus_tag", InfluenceConfig())["name"] == "corpus_tag"
    assert derive_name("t", {"a": [1, 2]}, {"a": (1, 2)}) == "t"
    with pytest.raises(ValueError, match="run_name"):
        RunConfig(run_name="../results/ptb")


def test_repeated_warnings_are_counted():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            warnings.warn("CG did not converge")
        warnings.warn("other", RuntimeWarning)
    assert distinct_warnings(caught) == ["UserWarning: CG did not converge (x3)", "RuntimeWarning: other"]


TINY_TRAIN = {"emb_dim": 16, "hidden": 16, "epochs": 1, "max_train_sentences": 400, "device": "cpu"}
TINY_FISHER = {"num_coords": 24, "n_hessian": 20, "n_train": 60, "n_test": 3, "mc_samples": 2, "mc_error_ks": [1, 2],
               "arnoldi_rank": 8, "lissa_depth": 300, "cache_dir": None, "device": "cpu"}


def committed_outputs(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for pattern in ("results/*.json", "figures/*.png") for p in root.glob(pattern)}


@pytest.fixture(scope="module")
def copied_repo(tmp_path_factory):
    """A copy of the repository's tracked files, and the kernel importing ifutils from it."""
    root = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        if (PROJECT_ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, root / name)
    return root


def run(notebook: str, root: Path, out: Path, parameters: dict, monkeypatch) -> str:
    monkeypatch.setenv("PYTHONPATH", str(root))
    papermill.execute_notebook(str(root / notebook), str(out), parameters=parameters, cwd=str(root),
                               progress_bar=False)
    return json.dumps(json.loads(out.read_text())["cells"])


def test_a_tiny_run_keeps_the_committed_outputs(copied_repo, tmp_path, monkeypatch):
    root = copied_repo
    before = committed_outputs(root)
    assert "results/ptb.json" in before and "figures/ptb_training.png" in before
    run("train_lstm_penn_treebank.ipynb", root, tmp_path / "train.ipynb", TINY_TRAIN, monkeypatch)
    new = sorted(p.name for p in (root / "results").glob("*.json") if f"results/{p.name}" not in before)
    assert len(new) == 1 and new[0].startswith("ptb_"), new
    train_run = new[0][: -len(".json")]
    training = json.loads((root / "results" / new[0]).read_text())["training"]
    assert training["provenance"]["checkpoint"]["path"] == f"checkpoints/{train_run}_lstm.pt"
    assert (root / "figures" / f"{train_run}_training.png").is_file()

    cells = run("fisher_if.ipynb", root, tmp_path / "fisher.ipynb",
                {**TINY_FISHER, "checkpoint": f"checkpoints/{train_run}_lstm.pt"}, monkeypatch)
    after = committed_outputs(root)
    assert all(after[name] == data for name, data in before.items())  # byte-identical
    fisher_runs = [p.stem for p in (root / "results").glob("*.json")
                   if f"results/{p.name}" not in before and p.stem != train_run]
    assert len(fisher_runs) == 1
    influence = json.loads((root / "results" / f"{fisher_runs[0]}.json").read_text())["influence"]
    assert influence["checkpoint"] == f"checkpoints/{train_run}_lstm.pt"
    assert influence["provenance"]["checkpoint"]["sha256"] == training["provenance"]["checkpoint"]["sha256"]
    for figure in ("spectra", "mc_fisher_error", "correlation_vs_damping", "scatter"):
        assert (root / "figures" / f"{fisher_runs[0]}_{figure}.png").is_file()
    # the Findings cell shows no committed numbers of another run
    assert "No ground truth of this run" in cells and "not shown" in cells
    assert "Ground truth by retraining the subset (from" not in cells

    # the same model read from a directory outside the repository, through the checkpoint parameter
    elsewhere = tmp_path / "elsewhere" / "model.pt"
    elsewhere.parent.mkdir()
    shutil.copy2(root / "checkpoints" / f"{train_run}_lstm.pt", elsewhere)
    run("fisher_if.ipynb", root, tmp_path / "fisher2.ipynb",
        {**TINY_FISHER, "checkpoint": str(elsewhere), "results_file": str(tmp_path / "outside.json"),
         "figures_dir": str(tmp_path / "figures")}, monkeypatch)
    outside = json.loads((tmp_path / "outside.json").read_text())["influence"]
    assert outside["checkpoint"] == str(elsewhere.resolve())
    assert outside["provenance"]["checkpoint"]["sha256"] == file_sha256(elsewhere)
    assert len(list((tmp_path / "figures").glob("*_scatter.png"))) == 1
    assert committed_outputs(root).keys() >= before.keys()
    torch.load(elsewhere, weights_only=True)  # untouched, still a checkpoint


def test_a_newly_trained_checkpoint_supersedes_the_sections_of_another(tmp_path):
    """The training notebook's save moves a results file of another model aside (kept whole, never overwritten),
    so a fresh clone's main job starts the default run's file anew instead of mixing models or being refused."""
    import json

    from ifutils.experiments.runs import supersede
    from ifutils.io import file_sha256

    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"new weights")
    results = tmp_path / "ptb.json"
    old = {"training": {"valid_ppl": 144.2}, "ground_truth": {"agreement": {}}}
    results.write_text(json.dumps(old))
    moved = supersede(results, checkpoint)
    assert moved == tmp_path / "ptb.superseded-unrecorded.json" and json.loads(moved.read_text()) == old
    assert not results.exists()
    # same checkpoint: nothing moves
    results.write_text(json.dumps({"training": {"provenance": {"checkpoint": {"sha256": file_sha256(checkpoint)}}}}))
    assert supersede(results, checkpoint) is None and results.exists()
    # another recorded checkpoint: named by its hash; a second supersede never overwrites the first
    results.write_text(json.dumps({"training": {"provenance": {"checkpoint": {"sha256": "ab" * 32}}}}))
    assert supersede(results, checkpoint).name == "ptb.superseded-abababab.json"
    results.write_text(json.dumps(old))
    assert supersede(results, checkpoint).name == "ptb.superseded-unrecorded-1.json"
    assert json.loads((tmp_path / "ptb.superseded-unrecorded.json").read_text()) == old


def test_a_comparison_of_another_checkpoint_is_refused_before_any_figure(tmp_path):
    """comparison_run (the notebook's first cell) checks the results file against the checkpoint, so a refused run
    never reaches the cells that draw figures."""
    from ifutils.io import update_results

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"model a")
    b.write_bytes(b"model b")
    results = tmp_path / "run.json"
    update_results(results, "training", {"x": 1}, checkpoint=a, run_name="run")
    run = RunConfig(run_name="run", checkpoint=str(b), results_file=str(results), figures_dir=str(tmp_path / "figs"))
    with pytest.raises(ValueError, match="one results file holds one model"):
        comparison_run(run, "ptb", InfluenceConfig())
    assert not (tmp_path / "figs").exists()
    ok = RunConfig(run_name="run", checkpoint=str(a), results_file=str(results))
    assert comparison_run(ok, "ptb", InfluenceConfig())["name"] == "run"
