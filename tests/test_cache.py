"""Cache keys that follow the code a stage depends on (:func:`ifutils.cache.code_version`), checked on copies of the
package in tmp_path (the real files are never edited), and a cached stage reused on a rerun."""

import shutil

import pytest
import torch

from ifutils.cache import SOURCE_DIR, ChunkCache, code_version, dependencies
from ifutils.grads import per_sample_grads

from .conftest import random_sentences, subset_loss, tiny_model

STAGES = ("ifutils.curvature.exact", "ifutils.curvature.kfac", "ifutils.grads", "ifutils.resolve")


def copy_package(dest):
    """A copy of the real package as ``dest/ifutils``; returns that directory."""
    root = dest / "ifutils"
    shutil.copytree(SOURCE_DIR, root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def edited_copy(tmp_path, name: str, relative: str, edit=lambda text: text + "\n# an edit\n"):
    """A copy of the package under ``tmp_path/name`` with ``relative`` (e.g. ``experiments/plots.py``) edited."""
    root = copy_package(tmp_path / name)
    path = root / relative
    before = path.read_text()
    path.write_text(edit(before))
    assert path.read_text() != before
    return root


@pytest.fixture
def original(tmp_path):
    return copy_package(tmp_path / "original")


def test_a_plotting_edit_keeps_every_curvature_key(tmp_path, original):
    docstring = lambda text: text.replace('"""', '"""Edited docstring. ', 1)  # noqa: E731
    edited = edited_copy(tmp_path, "plots", "experiments/plots.py", docstring)
    for stage in STAGES:
        assert code_version(stage, root=edited) == code_version(stage, root=original), stage
    # the whole-package hash does see it (so the comparison above could fail)
    assert code_version(root=edited) != code_version(root=original)
    assert code_version("ifutils.experiments.plots", root=edited) != code_version("ifutils.experiments.plots", root=original)


def test_an_edit_of_the_stage_or_of_what_it_imports_changes_its_key(tmp_path, original):
    exact = edited_copy(tmp_path, "exact", "curvature/exact.py")
    assert code_version("ifutils.curvature.exact", root=exact) != code_version("ifutils.curvature.exact", root=original)
    assert code_version("ifutils.grads", root=exact) == code_version("ifutils.grads", root=original)  # not imported
    model = edited_copy(tmp_path, "model", "model.py")  # imported by every stage through ifutils.subset
    for stage in STAGES:
        assert code_version(stage, root=model) != code_version(stage, root=original), stage


def test_subpackage_modules_are_hashed(tmp_path, original):
    base = edited_copy(tmp_path, "base", "curvature/base.py")  # imported by exact.py as .base
    assert code_version("ifutils.curvature.exact", root=base) != code_version("ifutils.curvature.exact", root=original)
    assert "ifutils.curvature.base" in dependencies("ifutils.curvature.exact", str(original))
    spectrum = edited_copy(tmp_path, "spectrum", "experiments/spectrum.py")
    assert code_version(root=spectrum) != code_version(root=original)  # the default covers subpackages too


def test_dependencies_follow_imports_on_a_synthetic_package(tmp_path):
    """Hand-derived closure: relative imports of every level, ``from . import module``, absolute imports, stdlib
    and third-party imports ignored, a module not imported left out, the parent package's __init__ not followed."""
    root = tmp_path / "ifutils"
    files = {
        "__init__.py": "from .unrelated import thing\n",
        "a.py": "import os\nimport torch\nfrom .b import x\n",
        "b.py": "from . import c\nfrom collections import OrderedDict\nx = 1\n",
        "c.py": "import ifutils.sub.e\n",
        "unrelated.py": "thing = 2\n",
        "sub/__init__.py": "",
        "sub/d.py": "from ..a import y\nfrom .e import z\nfrom .. import c as see\n",
        "sub/e.py": "z = 3\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert dependencies("ifutils.sub.d", str(root)) == (
        "ifutils.a", "ifutils.b", "ifutils.c", "ifutils.sub.d", "ifutils.sub.e")
    assert dependencies("ifutils.sub.e", str(root)) == ("ifutils.sub.e",)
    with pytest.raises(ValueError, match="no module"):
        dependencies("ifutils.missing", str(root))


def test_core_stages_do_not_depend_on_the_experiments():
    for stage in STAGES:
        assert not [m for m in dependencies(stage) if m.startswith("ifutils.experiments")], stage


def test_the_key_depends_on_the_code_named(tmp_path):
    a = ChunkCache(tmp_path, {"stage": "x"}, torch.arange(3), code="ifutils.grads")
    assert a.key == ChunkCache(tmp_path, {"stage": "x"}, torch.arange(3), code="ifutils.grads").key
    assert a.key != ChunkCache(tmp_path, {"stage": "x"}, torch.arange(3), code="ifutils.curvature.exact").key
    assert a.key != ChunkCache(tmp_path, {"stage": "x"}, torch.arange(4), code="ifutils.grads").key
    with pytest.raises(ValueError, match="no module"):
        ChunkCache(tmp_path, {"stage": "x"}, code="ifutils.nonexistent")
    with pytest.raises(TypeError):
        ChunkCache(tmp_path, {"stage": "x"}, code=(3,))


def test_a_written_stage_is_read_back_on_a_rerun(tmp_path):
    loss = subset_loss(tiny_model(), "recurrent")
    sentences = random_sentences(10, 13, seed=3)
    first = per_sample_grads(loss, sentences, chunk_size=4, cache_dir=tmp_path, desc=None)
    (key,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in key.iterdir()) == ["chunk0.pt", "chunk1.pt", "chunk2.pt", "meta.json"]
    # a rerun reads the chunks: tamper with one stored chunk and the rerun returns the tampered rows
    cache = ChunkCache(tmp_path, {}, code="ifutils.grads")
    cache.dir = key
    stored = cache.get("chunk0")
    cache.put("chunk0", torch.zeros_like(stored))
    again = per_sample_grads(loss, sentences, chunk_size=4, cache_dir=tmp_path, desc=None)
    zero_rows = (again == 0).all(dim=1)
    assert int(zero_rows.sum()) == len(stored) and not (first == 0).all(dim=1).any()
    assert torch.equal(again[~zero_rows], first[~zero_rows])
