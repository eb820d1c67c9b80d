"""One source of defaults: every notebook parameter parses with papermill, shows in --help-notebook, and has the
default of the dataclass field it feeds; entry points take defaults and help from the dataclasses."""

import argparse
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import papermill
import pytest

from ifutils.config import add_arguments, defaults, from_args
from ifutils.experiments.comparison import InfluenceConfig
from ifutils.experiments.ground_truth import GroundTruthConfig
from ifutils.experiments.retrain_check import RetrainConfig
from ifutils.experiments.runs import RunConfig
from ifutils.model import ModelConfig
from ifutils.train import TrainConfig
from ifutils.experiments.whole_network import WholeNetworkConfig

ROOT = Path(__file__).resolve().parent.parent
GT = {"gt_n": "n", "gt_damping": "damping", "gt_loo": "n_loo", "gt_groups": "n_groups", "gt_group_size": "group_size",
      "gt_lds_subsets": "lds_subsets", "gt_lds_fraction": "lds_fraction", "gt_fd_samples": "fd_samples"}
# notebook parameter -> (dataclass, field); every parameter must appear here
SOURCES = {
    "train_lstm_penn_treebank.ipynb": [(RunConfig, None), (ModelConfig, None), (TrainConfig, None)],
    "fisher_if.ipynb": [(RunConfig, None), (InfluenceConfig, None), (GroundTruthConfig, GT)],
    "whole_network.ipynb": [(RunConfig, None), (WholeNetworkConfig, None)],
}


def parameters_cell(notebook: str) -> str:
    import nbformat

    nb = nbformat.read(ROOT / notebook, as_version=4)
    return next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))


def literal_defaults(notebook: str) -> dict:
    """The parameters cell parsed independently of papermill: ``{name: literal value}``."""
    tree = ast.parse(parameters_cell(notebook))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)}


def field_of(notebook: str, name: str):
    for cls, mapping in SOURCES[notebook]:
        field = mapping.get(name) if mapping is not None else name
        if field in {f.name for f in dataclasses.fields(cls)}:
            return cls, field
    return None


@pytest.mark.parametrize("notebook", list(SOURCES))
def test_every_parameter_parses_with_papermill(notebook):
    inferred = papermill.inspect_notebook(str(ROOT / notebook))
    assert set(inferred) == set(literal_defaults(notebook))
    for name, info in inferred.items():
        assert info["help"], f"{notebook}: parameter {name} has no help comment"


@pytest.mark.parametrize("notebook", list(SOURCES))
def test_notebook_defaults_are_the_dataclass_defaults(notebook):
    for name, value in literal_defaults(notebook).items():
        source = field_of(notebook, name)
        assert source is not None, f"{notebook}: parameter {name} feeds no configuration dataclass field"
        cls, field = source
        expected = defaults(cls)[field]
        got = tuple(value) if isinstance(value, list) else value
        assert got == expected and type(got) is type(expected), (
            f"{notebook}: {name} = {value!r}, but {cls.__name__}.{field} defaults to {expected!r}")


def test_a_changed_default_is_caught(monkeypatch):
    """The check above can fail: a dataclass default that differs from the notebook's is reported."""
    changed = dataclasses.make_dataclass("Changed", [("damping", float, dataclasses.field(default=1e-4))],
                                         bases=(GroundTruthConfig,))
    monkeypatch.setitem(SOURCES, "fisher_if.ipynb", [(RunConfig, None), (InfluenceConfig, None), (changed, GT)])
    with pytest.raises(AssertionError, match="gt_damping"):
        test_notebook_defaults_are_the_dataclass_defaults("fisher_if.ipynb")


def test_help_notebook_lists_every_parameter():
    out = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(ROOT / "fisher_if.ipynb")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "Unable to parse" not in out
    listed = {line.split(":")[0].strip() for line in out.splitlines() if ": Unknown type" in line or "(default" in line}
    assert set(literal_defaults("fisher_if.ipynb")) <= listed


@pytest.mark.parametrize("cls", [ModelConfig, TrainConfig, InfluenceConfig, GroundTruthConfig, RetrainConfig, RunConfig])
def test_every_field_has_help(cls):
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help string"


def test_add_arguments_round_trip():
    parser = argparse.ArgumentParser()
    add_arguments(parser, InfluenceConfig, n_hessian=500)
    add_arguments(parser, TrainConfig, prefix="train-", exclude={"seed"})
    args = parser.parse_args(["--mc-error-ks", "1", "3", "--train-max-train-sentences", "7", "--train-keep-epochs"])
    config = from_args(InfluenceConfig, args)
    assert config == InfluenceConfig(n_hessian=500, mc_error_ks=(1, 3))
    assert from_args(TrainConfig, args, prefix="train-") == TrainConfig(max_train_sentences=7, keep_epochs=True)
    assert "pins 500" in parser.format_help() and "n_H, training sentences" in parser.format_help()
    with pytest.raises(ValueError, match="no field"):
        add_arguments(argparse.ArgumentParser(), InfluenceConfig, n_hesian=5)


def test_defaults_of_the_main_job():
    assert GroundTruthConfig().damping == 1e-3
    assert InfluenceConfig().n_hessian == 300 and InfluenceConfig().mc_error_ks == (1, 2, 4, 8, 16)
    assert literal_defaults("fisher_if.ipynb")["ground_truth"] is False


@pytest.mark.parametrize("script", ["ground_truth.py", "retrain_check.py", "robustness.py"])
def test_entry_points_show_dataclass_help(script):
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--help"], capture_output=True, text=True,
                         timeout=120, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}).stdout
    assert "(default:" in out


@pytest.mark.parametrize("notebook", ["train_lstm_penn_treebank.ipynb", "fisher_if.ipynb"])
def test_notebooks_validate_with_cell_ids_and_no_warning(notebook):
    """nbformat 4.5: every cell carries a unique id, and validation raises no warning (MissingIDFieldWarning)."""
    import warnings

    import nbformat

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nb = nbformat.read(ROOT / notebook, as_version=4)
        nbformat.validate(nb)
    assert (nb.nbformat, nb.nbformat_minor) >= (4, 5)
    ids = [c.get("id") for c in nb.cells]
    assert all(ids) and len(set(ids)) == len(ids)
