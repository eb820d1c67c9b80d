"""Bad input gets an error that names what is wrong (the other cases live beside their modules:
test_data, test_text8, test_grads, test_curvature, test_train)."""

import pytest
import torch

from ifutils.curvature import DenseCurvature, check_dense_fits, empirical_fisher
from ifutils.data import Corpus, Vocabulary, ptb_files
from ifutils.experiments.comparison import InfluenceConfig, choose_samples
from ifutils.io import load_checkpoint, save_checkpoint
from ifutils.model import ModelConfig
from ifutils.train import TrainConfig

from .conftest import random_sentences, tiny_model


def small_corpus():
    vocab = Vocabulary(["<eos>"] + [f"w{i}" for i in range(1, 13)])
    return Corpus("toy", vocab, {s: random_sentences(10, 13, seed=i) for i, s in enumerate(("train", "valid", "test"))})


@pytest.mark.parametrize("field, value", [("n_train", 11), ("n_test", 11), ("n_hessian", 11)])
def test_counts_larger_than_the_split_are_named(field, value):
    config = InfluenceConfig(**{"n_train": 10, "n_test": 5, "n_hessian": 5, "top_k": 2, field: value})
    with pytest.raises(ValueError, match=f"{field}={value}"):
        choose_samples(small_corpus(), config)


def test_hessian_sentences_must_be_scored_training_sentences():
    with pytest.raises(ValueError, match="n_hessian=8 must not exceed n_train=6"):
        choose_samples(small_corpus(), InfluenceConfig(n_train=6, n_test=2, n_hessian=8, top_k=2))


@pytest.mark.parametrize("kwargs, text", [
    ({"n_train": 0}, "n_train must be >= 1"),
    ({"mc_samples": 0}, "mc_samples must be >= 1"),
    ({"n_train": 10}, "top_k=20 must not exceed n_train=10"),
    ({"absolute_dampings": (-1.0,)}, "absolute_dampings"),
    ({"dtype": "float16"}, "dtype must be 'float32' or 'float64'"),
])
def test_out_of_range_settings_fail_when_the_config_is_built(kwargs, text):
    with pytest.raises(ValueError, match=text):
        InfluenceConfig(**kwargs)


def test_checkpoint_of_another_dataset_is_refused():
    from ifutils.io import check_corpus

    corpus = small_corpus()
    check_corpus({"dataset": "toy", "window": None}, corpus)
    with pytest.raises(ValueError, match="trained on dataset='ptb'.*'toy'"):
        check_corpus({"dataset": "ptb", "window": None}, corpus)


@pytest.mark.parametrize("cls, kwargs, field", [
    (InfluenceConfig, {"num_coords": "512"}, "num_coords"),
    (InfluenceConfig, {"absolute_dampings": (1e-3, "big")}, "absolute_dampings"),
    (TrainConfig, {"epochs": 2.5}, "epochs"),
    (TrainConfig, {"max_train_sentences": "all"}, "max_train_sentences"),
    (ModelConfig, {"vocab_size": 10, "dropout": "0.1"}, "dropout"),
])
def test_parameters_of_the_wrong_type_are_named(cls, kwargs, field):
    with pytest.raises(TypeError, match=f"{cls.__name__}.{field} must be"):
        cls(**kwargs)


def test_dense_matrix_too_large_is_refused_before_allocation():
    with pytest.raises(MemoryError, match="p=3,000,000 .*GiB .* available .*lower num_coords"):
        check_dense_fits(3_000_000)
    grads = torch.zeros(1, 400_000)  # the 400,000^2 EF would need 1.2 TB
    with pytest.raises(MemoryError, match="p=400,000"):
        empirical_fisher(grads, torch.ones(1))


def test_indefinite_solve_warns_with_smallest_eigenvalue():
    c = DenseCurvature(torch.diag(torch.tensor([-2.0, 1.0, 3.0], dtype=torch.float64)), "H")
    with pytest.warns(UserWarning, match="smallest eigenvalue of H -2"):
        x = c.solve(torch.ones(3, dtype=torch.float64), 0.5)
    torch.testing.assert_close(x, 1 / torch.tensor([-1.5, 1.5, 3.5], dtype=torch.float64))


def test_checkpoint_with_mismatched_vocabulary_is_named(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "ck.pt", model, Vocabulary(["<eos>", "a", "b"]))
    with pytest.raises(ValueError, match="vocabulary has 3 words but the model 13"):
        load_checkpoint(tmp_path / "ck.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_empty_data_file_is_named(tmp_path):
    (tmp_path / "ptb").mkdir()
    for split in ("train", "valid", "test"):
        (tmp_path / "ptb" / f"ptb.{split}.txt").write_text("")
    with pytest.raises(ValueError, match="ptb.train.txt has md5"):
        ptb_files(tmp_path, allow_download=False)


@pytest.mark.parametrize("length, text", [(0, "sample 2 has 0 tokens"), (50, "sample 2 has 50 tokens")])
def test_empty_or_too_long_samples_are_named(length, text):
    from ifutils.grads import per_sample_grads

    from .conftest import subset_loss

    loss = subset_loss(tiny_model(), "recurrent")
    loss.max_len = 40
    sentences = random_sentences(4, 13)
    sentences[2] = torch.ones(length, dtype=torch.long)
    with pytest.raises(ValueError, match=text):
        per_sample_grads(loss, sentences, desc=None)


def test_influence_refuses_non_finite_or_one_dimensional_gradients():
    from ifutils.curvature import IdentityCurvature
    from ifutils.influence import influence

    good = torch.ones(3, 4)
    with pytest.raises(FloatingPointError, match="train_grads has NaN/Inf in rows \\[1\\]"):
        influence(torch.tensor([[0.0] * 4, [float("nan")] * 4]), good, IdentityCurvature(4), 0.1)
    with pytest.raises(ValueError, match="test_grads must be \\(n, p\\)"):
        influence(good, torch.ones(4), IdentityCurvature(4), 0.1)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        IdentityCurvature(4).relative_damping(-1.0)


def test_curvature_inputs_are_checked():
    import warnings

    from ifutils.curvature import (
        DenseCurvature,
        DiagonalCurvature,
        LowRankCurvature,
        empirical_fisher,
    )
    from ifutils.influence import gradient_similarity, self_influence

    nan = float("nan")
    with pytest.raises(FloatingPointError, match="rows \\[2\\]"):
        DiagonalCurvature(torch.tensor([1.0, 2.0, nan]), "d")
    with pytest.raises(FloatingPointError, match="rows \\[0\\]"):
        LowRankCurvature(torch.tensor([[nan, 1.0], [1.0, 1.0]]), "u")
    with pytest.raises(ValueError, match="square"):
        DenseCurvature(torch.ones(3, 2), "rect")
    # exactly singular once damped, although Cholesky may not notice
    c = DenseCurvature(torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64)), "h")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="singular"):
            c.solve(torch.ones(3), 1.0)
    with pytest.warns(UserWarning, match="not positive definite"):
        DiagonalCurvature(torch.tensor([-1.0, 2.0]), "d").solve(torch.ones(2), 0.5)
    with pytest.raises(ValueError, match="shape \\(p,\\)"):
        c.solve(torch.ones(3), torch.ones(2))
    g = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="lengths must be a \\(4,\\) tensor"):
        empirical_fisher(g, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="must be \\(n, p\\)"):
        self_influence(g[0], c, 1.0)
    with pytest.raises(ValueError, match="p=3, test gradients p=2"):
        gradient_similarity(g, torch.ones(2, 2, dtype=torch.float64))


def test_no_sentences_is_refused(model):
    from ifutils.curvature import hessian_and_ggn

    from .conftest import subset_loss

    with pytest.raises(ValueError, match="no samples"):
        hessian_and_ggn(subset_loss(model, "recurrent"), [])
