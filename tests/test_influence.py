import torch
from scipy import stats

from ifutils.curvature import DenseCurvature, IdentityCurvature, hessian_and_ggn
from ifutils.data import make_batch
from ifutils.grads import per_sample_grads
from ifutils.influence import influence, relative_damping
from ifutils.retrain import newton_solve

from .conftest import random_sentences, subset_loss, tiny_model


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
    assert relative_damping(c, 0.1) == 0.1 * float(c.matrix.trace() / 6)


def test_leave_one_out_on_convex_decoder_slice_matches_exact_retraining():
    """Decoder-only subset = softmax regression on fixed LSTM features (convex). Predicted change of
    test loss on removing sample i, -I_i / n, against the actual change after an exact Newton re-solve."""
    model = tiny_model(vocab=12, emb=5, hidden=6)
    train = random_sentences(60, 12, max_len=6, seed=1)
    test = random_sentences(1, 12, max_len=6, seed=2)
    loss = subset_loss(model, "decoder")  # 15 coordinates of decoder.weight
    damping, n = 1e-3, len(train)
    theta_star, info = newton_solve(loss, train, damping, tol=1e-12)
    assert info["grad_norm"] <= 1e-12
    hess, _ = hessian_and_ggn(loss, train, theta=theta_star)
    g_train = per_sample_grads(loss, train, theta=theta_star, desc=None)
    g_test = per_sample_grads(loss, test, theta=theta_star, desc=None)
    predicted = -influence(g_train, g_test, hess, damping)[:, 0] / n

    inputs, targets, mask = make_batch(test, 0)
    test_loss = lambda th: float(loss.loss(th, inputs, targets, mask)[0])  # noqa: E731
    actual = []
    for i in range(50):
        weights = torch.ones(n, dtype=torch.float64)
        weights[i] = 0.0
        theta_i, _ = newton_solve(loss, train, damping, weights, theta_init=theta_star, tol=1e-12)
        actual.append(test_loss(theta_i) - test_loss(theta_star))
    actual = torch.tensor(actual, dtype=torch.float64)
    assert stats.pearsonr(predicted[:50].numpy(), actual.numpy())[0] >= 0.99
    # sign convention: a positive influence (harmful sample) means removal lowers the test loss
    big = predicted[:50].abs() > 0.1 * predicted[:50].abs().max()
    assert torch.equal(torch.sign(predicted[:50][big]), torch.sign(actual[big]))
