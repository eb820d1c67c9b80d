import pytest
import torch

from ifutils.curvature import DenseCurvature, IdentityCurvature
from ifutils.influence import (
    gradient_similarity,
    influence,
    outlier_scores,
    self_influence,
)


def test_identity_influence_is_gradient_dot_product():
    g_train, g_test = torch.randn(10, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    scores = influence(g_train, g_test, IdentityCurvature(6), damping=0.5)
    ref = torch.tensor([[-(gi @ gj) / 1.5 for gj in g_test] for gi in g_train], dtype=torch.float64)
    torch.testing.assert_close(scores, ref)


def test_influence_is_minus_test_gradient_times_inverse_times_train_gradient():
    a = torch.randn(6, 6, dtype=torch.float64)
    c = DenseCurvature(a @ a.T, "spd")
    g_train, g_test = torch.randn(10, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    inv = torch.linalg.inv(c.matrix + 0.1 * torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(influence(g_train, g_test, c, 0.1), -(g_train @ inv @ g_test.T))
    assert c.relative_damping(0.1) == 0.1 * float(c.matrix.trace() / 6)


def test_hessian_free_scores_match_loops():
    g = torch.randn(30, 6, dtype=torch.float64)
    t = torch.randn(4, 6, dtype=torch.float64)
    cos = gradient_similarity(g, t, "cosine")
    dot = gradient_similarity(g, t, "dot")
    for i in range(30):
        for j in range(4):
            assert abs(cos[i, j] + torch.dot(g[i], t[j]) / (g[i].norm() * t[j].norm())) < 1e-14
            assert abs(dot[i, j] + torch.dot(g[i], t[j])) < 1e-13
    torch.testing.assert_close(dot, influence(g, t, IdentityCurvature(6), 0.0))
    with pytest.raises(ValueError, match="zero"):
        gradient_similarity(torch.zeros(2, 6, dtype=torch.float64), t)


def test_outlier_scores_rank_a_planted_outlier_first():
    g = torch.randn(200, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g[17] *= 12  # one sample with an abnormally large gradient
    scores = outlier_scores(g, seed=0)
    for name, s in scores.items():
        assert s.shape == (200,) and int(s.argmax()) == 17, name
    torch.testing.assert_close(scores["gradient L1 norm"], torch.tensor([row.abs().sum() for row in g], dtype=torch.float64))
    assert torch.equal(outlier_scores(g, seed=0)["isolation forest"], scores["isolation forest"])  # seeded


def test_self_influence_is_the_diagonal_of_the_influence_matrix():
    g = torch.randn(9, 5, dtype=torch.float64)
    a = torch.randn(5, 5, dtype=torch.float64)
    c = DenseCurvature(a @ a.T, "spd")
    torch.testing.assert_close(self_influence(g, c, 0.1), -influence(g, g, c, 0.1).diagonal())
