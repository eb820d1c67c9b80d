"""Fault injection: a computation killed with SIGKILL mid-write resumes from its cache to the same bits."""

import subprocess
import sys
import textwrap

import pytest
import torch

from ifutils.curvature import hessian_and_ggn, mc_true_fisher
from ifutils.grads import per_sample_grads
from ifutils.influence import influence

from .conftest import one_thread_env, random_sentences, subset_loss, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identity per thread count (seen to fail once under load)

SETUP = """
import os, signal, sys, torch
import ifutils.cache
sys.path.insert(0, {root!r})
from tests.conftest import random_sentences, subset_loss, tiny_model
from ifutils.grads import per_sample_grads
from ifutils.influence import influence
from ifutils.curvature import hessian_and_ggn
calls = [0]
real_save = torch.save
def dying_save(obj, path):
    calls[0] += 1
    if calls[0] == {kill_at}:  # half-write this file, then die without cleaning up
        real_save(obj, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, path)
ifutils.cache.torch.save = dying_save
loss = subset_loss(tiny_model(), "recurrent")
sentences = random_sentences(24, 13, seed=7)
"""


def run_killed(tmp_path, code: str, kill_at: int) -> None:
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    script = SETUP.format(root=root, kill_at=kill_at) + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=one_thread_env())
    assert proc.returncode == -9, proc.stderr  # killed by SIGKILL, as intended


def cache_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_per_sample_gradients_resume_after_sigkill(tmp_path):
    run_killed(tmp_path, "per_sample_grads(loss, sentences, chunk_size=3, sampled_labels=5, cache_dir='cache')", 4)
    files = cache_files(tmp_path)
    # chunks 0-2 are complete; chunk 3 died mid-write and exists only as a temporary file
    assert {"meta.json", "chunk0.pt", "chunk1.pt", "chunk2.pt"} <= set(files) and "chunk3.pt" not in files
    assert any(f.endswith(".tmp") for f in files)
    loss = subset_loss(tiny_model(), "recurrent")
    sentences = random_sentences(24, 13, seed=7)
    resumed = per_sample_grads(loss, sentences, 3, sampled_labels=5, cache_dir=tmp_path / "cache", desc=None)
    fresh = per_sample_grads(loss, sentences, 3, sampled_labels=5, desc=None)
    assert torch.equal(resumed, fresh)


def test_hessian_resumes_after_sigkill(tmp_path):
    run_killed(tmp_path, "hessian_and_ggn(loss, sentences, chunk_size=4, cache_dir='cache')", 4)
    loss = subset_loss(tiny_model(), "recurrent")
    sentences = random_sentences(24, 13, seed=7)
    progress = torch.load(next((tmp_path / "cache").rglob("progress.pt")), weights_only=True)
    assert progress["chunks"] == 3  # the fourth write was cut short; the previous complete one stands
    hess, ggn = hessian_and_ggn(loss, sentences, chunk_size=4, cache_dir=tmp_path / "cache")
    ref_h, ref_g = hessian_and_ggn(loss, sentences, chunk_size=4)
    assert torch.equal(hess.matrix, ref_h.matrix) and torch.equal(ggn.matrix, ref_g.matrix)


def test_cache_of_another_configuration_is_not_reused(tmp_path):
    loss = subset_loss(tiny_model(), "recurrent")
    sentences = random_sentences(10, 13, seed=7)
    per_sample_grads(loss, sentences, 4, cache_dir=tmp_path, desc=None)
    other = subset_loss(tiny_model(seed=1), "recurrent")  # another checkpoint
    got = per_sample_grads(other, sentences, 4, cache_dir=tmp_path, desc=None)
    assert torch.equal(got, per_sample_grads(other, sentences, 4, desc=None))
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # two keys, nothing shared


def test_scoring_with_monte_carlo_fisher_is_bitwise_deterministic():
    def score():
        loss = subset_loss(tiny_model(), "mixed")
        train, test = random_sentences(12, 13, seed=7), random_sentences(3, 13, seed=8)
        fisher = mc_true_fisher(loss, train, 3, seed=11, chunk_size=5)
        g_train = per_sample_grads(loss, train, 5, desc=None)
        return fisher.matrix, influence(g_train, per_sample_grads(loss, test, 5, desc=None), fisher, 1e-3)

    (f1, s1), (f2, s2) = score(), score()
    assert torch.equal(f1, f2) and torch.equal(s1, s2)


def test_atomic_write_leaves_the_old_file_when_the_writer_fails_and_gives_umask_permissions(tmp_path):
    import os
    import stat

    from ifutils.io import atomic_write

    target = tmp_path / "record.json"
    atomic_write(target, lambda tmp: tmp.write_text("old"))
    mask = os.umask(0o022)
    try:
        atomic_write(target, lambda tmp: tmp.write_text("new"))
    finally:
        os.umask(mask)
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temp left


def test_weights_sha256_names_the_weights_not_the_checkpoint_file(tmp_path):
    """Two files of the same weights with other histories (wall times): the file hashes differ, the weights' do not;
    one changed weight changes it."""
    import copy

    from ifutils.io import file_sha256, weights_sha256

    model = tiny_model()
    twin = copy.deepcopy(model)
    torch.save({"state_dict": model.state_dict(), "history": [{"seconds": 1.0}]}, tmp_path / "a.pt")
    torch.save({"state_dict": twin.state_dict(), "history": [{"seconds": 2.0}]}, tmp_path / "b.pt")
    assert file_sha256(tmp_path / "a.pt") != file_sha256(tmp_path / "b.pt")
    assert weights_sha256(model) == weights_sha256(twin)
    with torch.no_grad():
        next(twin.parameters()).view(-1)[0] += 1e-7
    assert weights_sha256(twin) != weights_sha256(model)
