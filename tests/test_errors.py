"""Errors a newcomer hit (issue 13, item 4) name the offending argument and what to pass instead; the device and
memory checks run with a faked CUDA device (item 5); PSD spectra are clipped for reporting, the Hessian's never
(item 7)."""

import numpy as np
import pytest
import torch

from ifutils.curvature import (
    DenseCurvature,
    IdentityCurvature,
    empirical_fisher,
    hessian_and_ggn,
)
from ifutils.curvature import base as curvature_base
from ifutils.data import Vocabulary
from ifutils.grads import per_sample_grads
from ifutils.influence import influence, self_influence
from ifutils.io import load_checkpoint, resolve_device, save_checkpoint
from ifutils.subset import SubsetLoss, select_subset

from .conftest import random_sentences, subset_loss, tiny_model

VOCAB = 13


def grads(n=5, p=4, seed=0):
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- damping of the wrong type -------------------------------------------------------------------------------

@pytest.mark.parametrize("damping, fix", [("1e-3", r"damping=float\('1e-3'\)"), (None, "pass a number such as 1e-3")])
def test_damping_string_or_none_is_named_in_influence(damping, fix):
    with pytest.raises(TypeError, match=f"damping must be a float >= 0 .*got (str|NoneType).*{fix}"):
        influence(grads(), grads(2), IdentityCurvature(4), damping)


def test_damping_string_is_named_in_self_influence():
    with pytest.raises(TypeError, match=r"damping must be a float.*got str '1e-3'.*float\('1e-3'\)"):
        self_influence(grads(), IdentityCurvature(4), "1e-3")


def test_damping_none_is_named_in_curvature_solve():
    c = DenseCurvature(torch.eye(4, dtype=torch.float64), "C")
    with pytest.raises(TypeError, match="damping must be a float >= 0.*got NoneType None.*relative_damping"):
        c.solve(torch.ones(4), None)


def test_numeric_dampings_of_other_types_still_work():
    """A NumPy float and an int are numbers, accepted and equal to the float result (closed form for C = I)."""
    g, t = grads(), grads(2, seed=1)
    expected = -(g @ t.T) / 1.5
    for damping in (0.5, np.float64(0.5)):
        torch.testing.assert_close(influence(g, t, IdentityCurvature(4), damping), expected)
    torch.testing.assert_close(influence(g, t, IdentityCurvature(4), 1), -(g @ t.T) / 2)


# --- NumPy arrays where tensors are expected -----------------------------------------------------------------

@pytest.mark.parametrize("which", ["train_grads", "test_grads"])
def test_numpy_gradients_are_named_with_the_conversion(which):
    args = {"train_grads": grads(), "test_grads": grads(2)}
    args[which] = args[which].numpy()
    with pytest.raises(TypeError, match=rf"{which} must be a torch \(n, p\) tensor, got numpy.ndarray.*"
                                        rf"torch.from_numpy\({which}\)"):
        influence(args["train_grads"], args["test_grads"], IdentityCurvature(4), 0.1)


def test_numpy_gradients_of_the_ef_are_named():
    with pytest.raises(TypeError, match=r"grads must be a torch .*numpy.ndarray.*torch.from_numpy\(grads\)"):
        empirical_fisher(grads().numpy(), torch.ones(5))


# --- word ids outside the vocabulary -------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", [VOCAB, 99, -1])
def test_word_id_outside_the_vocabulary_is_named(bad_id):
    loss = subset_loss(tiny_model(), "recurrent")
    sentences = random_sentences(4, VOCAB)
    sentences[2] = torch.tensor([1, bad_id, 0])
    with pytest.raises(IndexError, match=rf"sentences\[2\] holds word id {bad_id}, outside the vocabulary's range "
                                         rf"0..12.*vocab.encode"):
        per_sample_grads(loss, sentences, desc=None)


def test_word_id_outside_the_vocabulary_is_named_by_the_hessian():
    loss = subset_loss(tiny_model(), "recurrent")
    with pytest.raises(IndexError, match=r"sentences\[0\] holds word id 20"):
        hessian_and_ggn(loss, [torch.tensor([20, 0])])


def test_float_sentences_are_named():
    loss = subset_loss(tiny_model(), "recurrent")
    with pytest.raises(TypeError, match=r"sentences\[1\] is a torch.float32 tensor.*int64"):
        per_sample_grads(loss, [torch.tensor([1, 0]), torch.tensor([1.0, 0.0])], desc=None)


# --- eos_id a word instead of an id ----------------------------------------------------------------------------

def test_eos_given_as_a_word_is_refused_at_construction():
    model = tiny_model()
    with pytest.raises(TypeError, match=r"eos_id must be an int word id, got str '<eos>'; pass vocab.stoi\['<eos>'\]"):
        SubsetLoss(model, select_subset(model, ["decoder.weight"]), eos_id="<eos>")


def test_eos_id_out_of_range_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"eos_id=13 is outside the vocabulary's range 0..12.*vocab.stoi"):
        SubsetLoss(model, select_subset(model, ["decoder.weight"]), eos_id=13)


# --- a string where a list of names is expected ----------------------------------------------------------------

def test_a_single_name_as_a_string_is_refused():
    with pytest.raises(TypeError, match=r"names must be a list of parameter names, got the string "
                                        r"'decoder.weight'; pass \['decoder.weight'\]"):
        select_subset(tiny_model(), "decoder.weight")


# --- NaN weights named before the gradients --------------------------------------------------------------------

def test_nan_weights_are_named_before_any_gradient():
    model = tiny_model()
    with torch.no_grad():
        model.lstm.weight_hh_l0[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"NaN/Inf parameters: lstm.weight_hh_l0 \(1 of 144 entries\).*"
                                                r"weights are the cause.*reload the checkpoint"):
        subset_loss(model, "decoder")


def test_nan_theta_is_named():
    loss = subset_loss(tiny_model(), "recurrent")
    theta = loss.theta0.clone()
    theta[0] = float("inf")
    with pytest.raises(FloatingPointError, match="the point theta has NaN/Inf parameters: theta.*Pass a finite theta"):
        per_sample_grads(loss, random_sentences(3, VOCAB), desc=None, theta=theta)


# --- a NaN gradient of the EF names the gradient row ------------------------------------------------------------

def test_nan_gradient_of_the_ef_names_the_gradient_row():
    g = grads(20, 6)
    g[3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match=r"grads has NaN/Inf in gradient rows \(samples\) \[3\] \(1 of 20\).*"
                                                r"per_sample_grads"):
        empirical_fisher(g, torch.ones(20))


# --- devices ---------------------------------------------------------------------------------------------------

def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_checkpoint_on_cuda_without_a_gpu_names_the_device_not_the_file(tmp_path, monkeypatch):
    _no_gpu(monkeypatch)
    path = save_checkpoint(tmp_path / "ck.pt", tiny_model(), Vocabulary(["<eos>"] + [f"w{i}" for i in range(12)]))
    with pytest.raises(ValueError, match="device='cuda' requested but torch sees no CUDA device.*use device='cpu'"):
        load_checkpoint(path, "cuda")
    model, _, _ = load_checkpoint(path, "auto")  # auto falls back to the CPU
    assert next(model.parameters()).device.type == "cpu"


def test_mps_without_mps_is_refused(monkeypatch):
    _no_gpu(monkeypatch)
    with pytest.raises(ValueError, match="device='mps' requested but the MPS backend is not available.*'cpu'"):
        resolve_device("mps")


def test_unknown_device_name_is_refused():
    with pytest.raises(ValueError, match="device='gpu' is not a device name.*'cpu', 'cuda'"):
        resolve_device("gpu")


def test_garbage_file_is_not_a_torch_checkpoint(tmp_path):
    (tmp_path / "ck.pt").write_text("this is a text file, not a checkpoint\n")
    with pytest.raises(ValueError, match="is not a torch checkpoint \\(corrupt, truncated, or a file of another "
                                         "format.*train_lstm_penn_treebank.ipynb or ifutils.io.save_checkpoint"):
        load_checkpoint(tmp_path / "ck.pt")


class FakeCuda:
    """torch.cuda as a machine with ``count`` GPUs of ``free`` bytes would report it (no GPU is touched)."""

    def __init__(self, monkeypatch, count=2, free=3 * 2**30, total=80 * 2**30):
        self.queried = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

        def mem_get_info(device=None):
            self.queried.append(torch.device(device))
            return free, total

        monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)


def test_device_choice_with_a_faked_gpu(monkeypatch):
    FakeCuda(monkeypatch, count=2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="device='cuda:2' requested but this machine has 2 CUDA device\\(s\\), "
                                         "cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_memory_check_on_a_faked_gpu_uses_its_free_memory(monkeypatch):
    fake = FakeCuda(monkeypatch, free=3 * 2**30)
    assert curvature_base.available_memory("cuda:1") == 3 * 2**30
    assert fake.queried == [torch.device("cuda", 1)]
    # 2 float64 matrices of p = 12,000 need 2.15 GiB < 3 GiB; p = 15,000 needs 3.35 GiB > 3 GiB
    curvature_base.check_dense_fits(12_000, 2, "cuda")
    with pytest.raises(MemoryError, match="p=15,000 coordinates needs about 3.4 GiB .* but 3.0 GiB is available on cuda; "
                                          "lower num_coords"):
        curvature_base.check_dense_fits(15_000, 2, "cuda")
    # the CPU check never asks the GPU
    fake.queried.clear()
    curvature_base.check_dense_fits(10, 2, "cpu")
    assert fake.queried == []


def test_every_dense_memory_check_gets_the_data_device(monkeypatch, model):
    """KFAC, the EF and the exact pass pass the device their data lives on to check_dense_fits (on a GPU machine
    it is the GPU's free memory that counts); here a spy records what each is given."""
    from ifutils.curvature import exact, fisher, kfac

    seen = []

    def spy(p, count=4, *args, **kwargs):
        assert args or "device" in kwargs, "check_dense_fits was called without the data's device"
        seen.append(torch.device(args[0] if args else kwargs["device"]))

    for module in (exact, fisher, kfac):
        monkeypatch.setattr(module, "check_dense_fits", spy)
    loss = subset_loss(model, "decoder")
    sentences = random_sentences(4, VOCAB)
    hessian_and_ggn(loss, sentences)
    empirical_fisher(grads(4, len(loss.theta0)), torch.ones(4))
    kfac.kfac_curvature(kfac.fit_kfac(loss, sentences, ekfac=False), len(loss.theta0))
    assert seen == [torch.device("cpu")] * 3


# --- reporting: PSD spectra clipped, the Hessian's never ------------------------------------------------------

def test_ef_reports_no_negative_eigenvalues_and_the_clipped_mass_is_exact():
    from ifutils.experiments.comparison import reported_eigenvalues, spectrum_summary

    # n = 3 gradients in p = 40: rank 3, so 37 eigenvalues are zero up to rounding, some of them negative
    g, lengths = grads(3, 40, seed=2), torch.tensor([4.0, 7.0, 2.0], dtype=torch.float64)
    ef = empirical_fisher(g, lengths)
    assert ef.psd
    # the computed spectrum, unclipped (Curvature.eigvalsh never clips); the clipping is what is tested, by a loop
    raw = ef.eigvalsh().tolist()
    assert any(x < 0 for x in raw), "the test needs rounding-level negatives to clip"
    summary = spectrum_summary(ef)
    assert summary["num_negative"] == 0 and summary["negative_mass"] == 0 and summary["min"] >= 0
    assert summary["num_clipped"] == sum(1 for x in raw if x < 0)
    expected = sum(abs(x) for x in raw if x < 0) / sum(abs(x) for x in raw)
    assert summary["clipped_negative_mass"] == pytest.approx(expected, rel=1e-6, abs=1e-30)
    assert 0 < summary["clipped_negative_mass"] < 1e-12
    ev, count, _ = reported_eigenvalues(ef)
    assert count == summary["num_clipped"] and (ev >= 0).all()
    # the nonzero spectrum equals that of the 3 x 3 Gram matrix (T_i / n) g_i . g_j
    w = (lengths / 3).sqrt()
    gram = np.linalg.eigvalsh(((g * w[:, None]) @ (g * w[:, None]).T).numpy())
    np.testing.assert_allclose(np.sort(ev.numpy())[-3:], gram, rtol=1e-10)


def test_hessian_keeps_its_negative_eigenvalues(model):
    from ifutils.experiments.comparison import reported_eigenvalues, spectrum_summary

    hess, ggn = hessian_and_ggn(subset_loss(model, "recurrent"), random_sentences(6, VOCAB))
    assert not hess.psd and ggn.psd
    raw = np.linalg.eigvalsh(hess.matrix.numpy())
    assert (raw < -1e-8).any(), "the recurrent block of the Hessian should be indefinite"
    summary = spectrum_summary(hess)
    assert summary["num_negative"] == int((raw < 0).sum()) and summary["num_clipped"] == 0
    assert summary["clipped_negative_mass"] == 0.0
    assert summary["min"] == pytest.approx(raw.min(), rel=1e-8)
    assert summary["negative_mass"] == pytest.approx(np.abs(raw[raw < 0]).sum() / np.abs(raw).sum(), rel=1e-8)
    np.testing.assert_allclose(reported_eigenvalues(hess)[0].numpy(), raw, rtol=1e-8, atol=1e-14)


def test_derived_forms_keep_the_psd_flag(model):
    hess, ggn = hessian_and_ggn(subset_loss(model, "recurrent"), random_sentences(6, VOCAB))
    blocks = [torch.arange(0, 3), torch.arange(3, hess.p)]
    assert ggn.diagonal().psd and ggn.block_diagonal(blocks).psd and IdentityCurvature(3).psd
    assert not hess.diagonal().psd and not hess.block_diagonal(blocks).psd


def test_a_string_where_a_list_of_numbers_is_expected_points_to_papermills_yaml_option():
    from ifutils.experiments.comparison import InfluenceConfig

    with pytest.raises(TypeError, match=r"mc_error_ks.*-y 'mc_error_ks: \[1, 2, 4\]'"):
        InfluenceConfig(mc_error_ks=tuple("[1, 2]"))
