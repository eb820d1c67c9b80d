"""Re-solves of the subset objective against closed forms, and the influence they validate."""

import numpy as np
import pytest
import torch
from scipy import stats

from ifutils.curvature import hessian_and_ggn
from ifutils.experiments.ground_truth import (
    GroundTruthConfig,
    Retraining,
    agreement_with_retraining,
    finite_difference_check,
    noise_floor,
    retrain_all,
)
from ifutils.grads import per_sample_grads
from ifutils.influence import influence
from ifutils.metrics import bootstrap_ci, column_correlation
from ifutils.resolve import (
    SampleHessians,
    SubsetObjective,
    newton_solve,
    predicted_removal_effects,
    random_groups,
    removal_effects,
)

from .conftest import random_sentences, subset_loss, tiny_model


class Ridge:
    """J_w = (1/n) sum_i w_i (a_i . theta - b_i)^2 / 2 + (lam/2) ||theta - theta_hat||^2: closed-form minimiser."""

    def __init__(self, n=30, p=4, lam=0.1, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = torch.randn(n, p, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
        self.n, self.damping, self.theta_hat = n, lam, torch.randn(p, generator=g, dtype=torch.float64)
        self.hessians = 0

    def ones(self):
        return torch.ones(self.n, dtype=torch.float64)

    def value_and_grad(self, theta, w):
        r = self.a @ theta - self.b
        d = theta - self.theta_hat
        return float((w * r**2).sum() / (2 * self.n) + self.damping / 2 * d @ d), self.a.T @ (w * r) / self.n + self.damping * d

    def hessian(self, theta, w):
        self.hessians += 1
        return self.a.T @ (w[:, None] * self.a) / self.n + self.damping * torch.eye(len(theta), dtype=torch.float64)

    def closed_form(self, w):
        return torch.linalg.solve(self.hessian(self.theta_hat, w),
                                  self.a.T @ (w * self.b) / self.n + self.damping * self.theta_hat)


def test_newton_reaches_the_closed_form_minimiser_and_leave_one_out_equals_it():
    toy = Ridge()
    star = newton_solve(toy, tol=1e-13)
    torch.testing.assert_close(star.theta, toy.closed_form(toy.ones()), rtol=0, atol=1e-12)
    hessians = SampleHessians(torch.einsum("ip,iq->ipq", toy.a, toy.a), toy.damping)
    torch.testing.assert_close(hessians.matrix(toy.ones()), toy.hessian(star.theta, toy.ones()))
    effects, info = removal_effects(toy, star.theta, hessians, [[3], [7], [1, 2, 5]], lambda th: th, 1e-13, desc=None)
    for row, group in zip(effects, ([3], [7], [1, 2, 5])):
        w = toy.ones()
        w[group] = 0.0
        torch.testing.assert_close(row, toy.closed_form(w) - star.theta, rtol=0, atol=1e-12)
    assert all(i["grad_norm"] <= 1e-13 for i in info)


def test_resolve_of_the_unchanged_objective_returns_theta_star_on_the_recurrent_subset():
    model = tiny_model()
    loss = subset_loss(model, "recurrent")
    objective = SubsetObjective(loss, random_sentences(20, 13, seed=3), damping=0.05)
    star = newton_solve(objective, tol=1e-12)
    assert star.grad_norm <= 1e-12 and float((star.theta - loss.theta0).norm()) > 1e-3  # it moved, then stopped
    again = newton_solve(objective, theta_init=star.theta, newton_matrix=star.newton_matrix, tol=1e-12)
    assert again.iterations == 0
    perturbed = star.theta + 1e-3 * torch.randn(len(star.theta), dtype=torch.float64)
    back = newton_solve(objective, theta_init=perturbed, newton_matrix=star.newton_matrix, tol=1e-12)
    torch.testing.assert_close(back.theta, star.theta, rtol=0, atol=1e-9)


def test_upweighting_finite_difference_matches_exact_hessian_influence_on_the_recurrent_subset():
    """d L_test / d w_i = I_i / n at theta*_S, with I from the exact Hessian at theta*_S (relative error <= 1e-3)."""
    model = tiny_model()
    loss = subset_loss(model, "recurrent")
    train, test = random_sentences(20, 13, seed=3), random_sentences(3, 13, seed=4)
    config = GroundTruthConfig(n=20, damping=0.05, n_loo=1, group_size=1, fd_samples=2, epsilons=(0.5, 0.1))
    objective = SubsetObjective(loss, train, config.damping)
    star = newton_solve(objective, tol=1e-13)
    at_star = loss.at(star.theta)
    hess = hessian_and_ggn(at_star, train)[0]  # at theta*_S: the Newton matrix was formed at an earlier iterate
    scores = influence(per_sample_grads(at_star, train, desc=None), per_sample_grads(at_star, test, desc=None), hess,
                       config.damping)
    hessians = SampleHessians.compute(at_star, train, star.theta, config.damping)
    # the per-sentence Hessians sum to the structured pass's H (and so give each objective's exact Newton matrix)
    torch.testing.assert_close(hessians.matrix(objective.ones()),
                               hess.matrix + config.damping * torch.eye(hess.p, dtype=torch.float64))
    rows = finite_difference_check(objective, star.theta, hessians, test, scores, [0, 5], config)
    # H(theta_hat) instead of H(theta*_S) gives 6e-4 here, so the bound must be well below that
    assert len(rows) == 4 and max(r["relative_error"] for r in rows) <= 1e-5, rows


def test_the_newton_matrix_is_formed_again_only_when_contraction_is_slow():
    toy = Ridge()
    wrong = 10 * toy.hessian(toy.theta_hat, toy.ones())  # contracts by 0.9 per step: too slow, so replaced
    toy.hessians = 0
    sol = newton_solve(toy, newton_matrix=wrong, tol=1e-12)
    assert toy.hessians == 1 and sol.iterations <= 4


def test_indefinite_newton_matrix_is_refused_with_advice():
    toy = Ridge()
    with pytest.raises(ValueError, match="raise the damping"):
        newton_solve(toy, newton_matrix=-torch.eye(4, dtype=torch.float64))


def test_a_failed_resolve_is_a_nan_row_with_its_reason_and_is_left_out_of_the_correlations():
    toy = Ridge()
    star = newton_solve(toy, tol=1e-13)
    stack = torch.einsum("ip,iq->ipq", toy.a, toy.a)
    shift = 5.0 * toy.n * torch.eye(4, dtype=torch.float64)  # moved from sample 1 to sample 0: the sum is unchanged,
    stack[0], stack[1] = stack[0] + shift, stack[1] - shift  # so only removing sample 0 meets an indefinite matrix
    hessians = SampleHessians(stack, toy.damping)
    effects, info = removal_effects(toy, star.theta, hessians, [[0], [1], [2]], lambda th: th, 1e-13, desc=None)
    assert torch.isnan(effects[0]).all() and "not positive definite" in info[0]["error"]
    for row, i in ((effects[1], 1), (effects[2], 2)):  # the others still equal the closed form
        w = toy.ones()
        w[i] = 0.0
        torch.testing.assert_close(row, toy.closed_form(w) - star.theta, rtol=0, atol=1e-12)
    # agreement over the finite rows only, against a scipy loop over them
    g = torch.Generator().manual_seed(2)
    scores, loo = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    loo[4] = float("nan")
    noise = {1e-12: torch.zeros(2, 3, dtype=torch.float64)}
    pairs = [[0, 1], [2, 3], [1, 4], [0, 5]]
    retraining = Retraining(star.theta, list(range(6)), loo, pairs, loo[:4], pairs, loo[:4], noise, {})
    config = GroundTruthConfig(bootstrap=100)
    got = agreement_with_retraining(scores, retraining, 6, config)["leave-one-out"]["pearson"]
    keep = [0, 1, 2, 3, 5]
    loop = np.mean([stats.pearsonr(-scores[keep, j].numpy() / 6, loo[keep, j].numpy())[0] for j in range(3)])
    assert got == pytest.approx(loop, abs=1e-12)
    assert noise_floor(retraining)["median_abs_loo"] == pytest.approx(float(loo[keep].abs().median()))


def test_group_predictions_and_correlations_match_loops():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, 3, generator=g, dtype=torch.float64)
    groups = random_groups(12, 5, 4, seed=1)
    assert all(len(set(x)) == 4 and max(x) < 12 for x in groups)
    pred = predicted_removal_effects(scores, groups, 12)
    torch.testing.assert_close(pred[2], -sum(scores[i] for i in groups[2]) / 12)
    a, b = (torch.randn(9, 3, generator=g, dtype=torch.float64) for _ in range(2))
    for kind, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        loop = np.mean([fn(a[:, j].numpy(), b[:, j].numpy())[0] for j in range(3)])
        assert column_correlation(a, b, kind) == pytest.approx(loop, abs=1e-12)
    low, high = bootstrap_ci(lambda idx: float(a[idx, 0].mean()), 9, seed=0, resamples=500)
    assert low <= float(a[:, 0].mean()) <= high


def test_leave_one_out_on_convex_decoder_slice_matches_exact_retraining():
    """Decoder-only subset = softmax regression on fixed LSTM features (convex). Predicted change of test loss on
    removing sample i, -I_i / n at theta*_S, against the actual change after exact re-solves."""
    model = tiny_model(vocab=12, emb=5, hidden=6)
    train, test = random_sentences(60, 12, max_len=6, seed=1), random_sentences(2, 12, max_len=6, seed=2)
    loss = subset_loss(model, "decoder")  # 15 coordinates of decoder.weight
    objective = SubsetObjective(loss, train, damping=1e-3)
    star = newton_solve(objective, tol=1e-12)
    at_star = loss.at(star.theta)
    hess = hessian_and_ggn(at_star, train)[0]
    scores = influence(per_sample_grads(at_star, train, desc=None), per_sample_grads(at_star, test, desc=None), hess,
                       1e-3)
    config = GroundTruthConfig(n=60, damping=1e-3, n_loo=60, n_groups=20, group_size=5, lds_subsets=20, noise_repeats=2,
                               bootstrap=200, tol=1e-12)
    retraining = retrain_all(objective, star.theta, SampleHessians.compute(at_star, train, star.theta, 1e-3), test,
                             config, per_sample_grads(at_star, train, desc=None))
    predicted = predicted_removal_effects(scores, [[i] for i in retraining.loo_samples], 60)
    assert column_correlation(predicted, retraining.loo, "pearson") >= 0.99
    # sign convention: a positive influence (harmful sample) means removal lowers the test loss
    big = predicted.abs() > 0.1 * predicted.abs().max()
    assert torch.equal(torch.sign(predicted[big]), torch.sign(retraining.loo[big]))
    # the LDS removes the complement of each kept half: predictions from the removed sets must rank the subsets
    assert all(len(r) == 30 for r in retraining.lds_removed)
    result = agreement_with_retraining(scores, retraining, 60, config)
    assert result["LDS"]["spearman"] > 0.9 and result["leave-k-out"]["pearson"] > 0.95
    assert result["LDS"]["spearman_ci"][0] <= result["LDS"]["spearman"] <= result["LDS"]["spearman_ci"][1]
    assert noise_floor(retraining)["fraction_loo_below_floor"] == 0.0


def test_objective_hessian_skips_removed_sentences_without_changing_the_matrix():
    loss = subset_loss(tiny_model(), "recurrent")
    train = random_sentences(10, 13, seed=5)
    objective = SubsetObjective(loss, train, damping=0.1)
    weights = torch.tensor([0, 1, 2, 0, 1, 1, 0.5, 1, 0, 1], dtype=torch.float64)
    full = hessian_and_ggn(loss, train, weights=weights)[0].matrix + 0.1 * torch.eye(loss.subset.size, dtype=torch.float64)
    torch.testing.assert_close(objective.hessian(loss.theta0, weights), full, rtol=1e-12, atol=1e-14)
