"""Whole-network KFAC, EK-FAC and diagonal Fishers against independent oracles (float64, tiny models): the exact GGN
from ``torch.func.jacrev`` of the logits, per-sample gradients from a loop of ``torch.autograd.grad`` over the fused
``nn.LSTM``, brute-force one-hot sums, dense solves, and exact expectations over enumerated labels."""

import itertools
import math

import pytest
import torch
from torch.func import functional_call, jacrev

import ifutils.curvature.network_kfac as nk
from ifutils.data import bucket_batches, make_batch
from ifutils.model import sentence_loss
from ifutils.network import parameter_names
from tests.conftest import EOS, random_sentences, tiny_model

V = 13


def flat_layout(model):
    params = dict(model.named_parameters())
    offsets, start = {}, 0
    for n, t in params.items():
        offsets[n] = slice(start, start + t.numel())
        start += t.numel()
    return offsets, start


def loop_grads(model, sentences, targets=None):
    """(n, P) per-sample gradients of the mean token NLL, one autograd pass per sentence (targets: optional
    replacement labels, one (T_i,) tensor per sentence)."""
    params = list(model.parameters())
    rows = []
    for i, s in enumerate(sentences):
        inputs, tgt, mask = make_batch([s], EOS)
        if targets is not None:
            tgt = targets[i][None]
        loss = sentence_loss(model(inputs), tgt, mask).sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def sentence_ef(grads, sentences):
    """(1/n) sum_i T_i g_i g_i^T."""
    lengths = torch.tensor([len(s) for s in sentences], dtype=torch.float64)
    return (grads * lengths[:, None]).T @ grads / len(sentences)


def drawn_targets(model, sentences, seed, draws, chunk_size):
    """The labels fit_network_kfac draws: per draw, one (T_i,) tensor per sentence (same chunks and seeds)."""
    out = [[None] * len(sentences) for _ in range(draws)]
    for j, idx in enumerate(bucket_batches([len(s) for s in sentences], chunk_size)):
        inputs, _, _ = make_batch([sentences[i] for i in idx], EOS)
        with torch.no_grad():
            logits = model(inputs)
        for d in range(draws):
            t = nk.sampled_targets(logits, seed, d, j)
            for b, i in enumerate(idx):
                out[d][i] = t[b, : len(sentences[i])]
    return out


def exact_ggn(model, sentences):
    """(P, P) GGN = (1/n) sum_i (1/T_i) sum_t J_t^T (diag p_t - p_t p_t^T) J_t, J_t = d logits_t / d theta (jacrev)."""
    names = parameter_names(model)
    params = dict(model.named_parameters())
    offsets, p = flat_layout(model)
    theta = torch.cat([params[n].detach().flatten() for n in names])
    total = torch.zeros(p, p, dtype=torch.float64)
    for s in sentences:
        inputs, _, _ = make_batch([s], EOS)

        def logits(flat, inputs=inputs):
            weights = {n: flat[offsets[n]].view(params[n].shape) for n in names}
            return functional_call(model, weights, (inputs,), {"unrolled": True})[0]

        jac = jacrev(logits)(theta)  # (T, V, P)
        probs = torch.softmax(logits(theta), -1)
        for t in range(len(s)):
            lam = torch.diag(probs[t]) - torch.outer(probs[t], probs[t])
            total += jac[t].T @ lam @ jac[t] / len(s)
    return total / len(sentences)


def one_token_sentences(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (1,), generator=g) for _ in range(n)]


def block(matrix, offsets, name):
    return matrix[offsets[name], offsets[name]]


def test_one_token_kfac_equals_exact_ggn_and_ef_blocks():
    model = tiny_model(layers=2)
    sentences = one_token_sentences(6)
    offsets, _ = flat_layout(model)
    ggn = exact_ggn(model, sentences)
    factors = nk.fit_network_kfac(model, sentences, EOS, mc_samples=3, ekfac=False)
    kfac = nk.kfac_network_curvature(factors)
    f = factors.factors
    # decoder: closed-form true Fisher, exact for one token (G (x) A in the row-major layout)
    for name in ("decoder.weight", "decoder.bias"):
        torch.testing.assert_close(kfac.dense_block(name), block(ggn, offsets, name), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(kfac.dense_block("decoder.weight"), torch.kron(f["G.decoder"], f["A.decoder"]),
                               rtol=1e-9, atol=1e-12)
    # every other layer: sampled labels, so the oracle is the EF with the very labels drawn, averaged over draws
    draws = drawn_targets(model, sentences, seed=0, draws=3, chunk_size=16)
    sampled = sum(sentence_ef(loop_grads(model, sentences, t), sentences) for t in draws) / 3
    for name in parameter_names(model):
        if not name.startswith("decoder."):
            torch.testing.assert_close(kfac.dense_block(name), block(sampled, offsets, name), rtol=1e-9, atol=1e-12,
                                       msg=name)
    # data labels: every block equals the empirical-Fisher block
    ef = sentence_ef(loop_grads(model, sentences), sentences)
    kfac_ef = nk.kfac_network_curvature(nk.fit_network_kfac(model, sentences, EOS, labels="data", ekfac=False))
    assert kfac_ef.name == "kfac_ef"
    for name in parameter_names(model):
        torch.testing.assert_close(kfac_ef.dense_block(name), block(ef, offsets, name), rtol=1e-9, atol=1e-12, msg=name)


def test_decoder_factors_of_longer_sentences_use_the_sentence_sum_delta():
    """G = sum_t w_t r_t r_t^T with r_t = p_t - onehot(y_t), the gradient of the sentence SUM of NLLs w.r.t. the
    logits (not the mean's r_t / T_i), and A = sum_t w_t h_t h_t^T, w_t = 1 / (n T_i); from the model's forward."""
    model = tiny_model(layers=2)
    sentences = random_sentences(6, V, max_len=6, seed=12)
    factors = nk.fit_network_kfac(model, sentences, EOS, labels="data", ekfac=False, chunk_size=4).factors
    g_expected, a_expected = 0, 0
    for s in sentences:
        inputs, targets, _ = make_batch([s], EOS)
        with torch.no_grad():
            r = torch.softmax(model(inputs)[0], -1) - torch.nn.functional.one_hot(targets[0], V).double()
            h = model(inputs, return_hidden=True)[0]
        g_expected = g_expected + r.T @ r / (len(sentences) * len(s))
        a_expected = a_expected + h.T @ h / (len(sentences) * len(s))
    torch.testing.assert_close(factors["G.decoder"], g_expected, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(factors["A.decoder"], a_expected, rtol=1e-10, atol=1e-13)
    assert factors["A.bias"].item() == pytest.approx(1.0)


def test_embedding_input_factor_is_the_weighted_one_hot_covariance():
    model = tiny_model()
    sentences = random_sentences(7, V, max_len=5, seed=2)
    factors = nk.fit_network_kfac(model, sentences, EOS, labels="data", ekfac=False, chunk_size=3)
    expected = torch.zeros(V, V, dtype=torch.float64)
    for s in sentences:
        inputs, _, _ = make_batch([s], EOS)
        for w in inputs[0]:
            onehot = torch.nn.functional.one_hot(w, V).double()
            expected += torch.outer(onehot, onehot) / (len(sentences) * len(s))
    torch.testing.assert_close(torch.diag(factors.factors["A.embedding"]), expected, rtol=1e-12, atol=1e-14)
    assert factors.factors["A.embedding"].sum().item() == pytest.approx(1.0)
    kfac = nk.kfac_network_curvature(factors)
    torch.testing.assert_close(kfac.dense_block("embedding.weight"),
                               torch.kron(expected, factors.factors["G.embedding"]), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("labels", ["data", "model"])
def test_ekfac_eigenvalues_equal_a_brute_force_fit(labels, monkeypatch):
    monkeypatch.setattr(nk, "_BUDGET", 100)  # dense per-sentence gradients in sub-batches of 1 to 4 sentences
    model = tiny_model(layers=2)
    # model labels: the decoder's oracle enumerates all V^T label sequences, so keep T = 2
    sentences = random_sentences(5, V, max_len=4 if labels == "data" else 1, seed=6)
    factors = nk.fit_network_kfac(model, sentences, EOS, labels=labels, mc_samples=2, chunk_size=2, seed=3)
    bases = factors.eigenbases()
    offsets, _ = flat_layout(model)
    if labels == "data":
        sets = [loop_grads(model, sentences)]
    else:
        sets = [loop_grads(model, sentences, t) for t in drawn_targets(model, sentences, 3, 2, 2)]
    lengths = torch.tensor([len(s) for s in sentences], dtype=torch.float64)
    for name, shape in factors.shapes.items():
        if labels == "model" and name.startswith("decoder."):
            continue  # exact expectation: checked by enumeration below
        r_key, c_key = nk.factor_keys(name)
        q_r, q_c = bases[r_key][1], bases[c_key][1]
        rows, cols = shape[0], (shape[1] if len(shape) == 2 else 1)
        expected = 0
        for grads in sets:
            g = grads[:, offsets[name]].reshape(-1, rows, cols)
            g = (q_r.T @ g if q_r is not None else g)
            g = g @ q_c if q_c is not None else g
            expected = expected + torch.einsum("brc,b->rc", g**2, lengths) / len(sentences) / len(sets)
        torch.testing.assert_close(factors.eigenvalues[name], expected, rtol=1e-9, atol=1e-13, msg=name)
    if labels == "model":  # decoder: E over every label sequence of (1/n) sum_i T_i (Q_G^T g_i Q_A)^2
        q_g, q_a = bases["G.decoder"][1], bases["A.decoder"][1]
        expected_w, expected_b = 0, 0
        for s in sentences:
            inputs, _, mask = make_batch([s], EOS)
            with torch.no_grad():
                logp = torch.log_softmax(model(inputs)[0], -1)
            for y in itertools.product(range(V), repeat=len(s)):
                y = torch.tensor(y)
                prob = logp[torch.arange(len(s)), y].sum().exp()
                loss = sentence_loss(model(inputs), y[None], mask).sum()
                gw, gb = torch.autograd.grad(loss, [model.decoder.weight, model.decoder.bias])
                expected_w = expected_w + prob * len(s) * (q_g.T @ gw @ q_a) ** 2 / len(sentences)
                expected_b = expected_b + prob * len(s) * (q_g.T @ gb)[:, None] ** 2 / len(sentences)
        torch.testing.assert_close(factors.eigenvalues["decoder.weight"], expected_w, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(factors.eigenvalues["decoder.bias"], expected_b, rtol=1e-8, atol=1e-12)


def assembled(curvature):
    return torch.block_diag(*[curvature.dense_block(n) for n in curvature.names])


def test_solve_equals_a_dense_solve_of_the_assembled_matrix():
    model = tiny_model(layers=2)
    sentences = random_sentences(6, V, max_len=4, seed=8)
    factors = nk.fit_network_kfac(model, sentences, EOS, chunk_size=4)
    g = torch.Generator().manual_seed(1)
    for curvature in (nk.kfac_network_curvature(factors), nk.ekfac_network_curvature(factors)):
        dense = assembled(curvature)
        assert dense.shape == (curvature.p, curvature.p) == (flat_layout(model)[1],) * 2
        torch.testing.assert_close(curvature.eigvalsh(), torch.linalg.eigvalsh(dense), rtol=1e-8, atol=1e-12)
        assert curvature.mean_eigenvalue() == pytest.approx(float(dense.trace()) / curvature.p)
        v = torch.randn(curvature.p, 3, generator=g, dtype=torch.float64)
        damping = curvature.relative_damping(0.1)
        for n, (r, c) in [(n, nk._rows_cols(s)) for n, s in curvature.shapes.items()]:
            sl = slice(curvature.offsets[n], curvature.offsets[n] + r * c)
            assert torch.allclose(damping[sl], torch.full((r * c,), 0.1 * float(dense[sl, sl].trace()) / (r * c),
                                                          dtype=torch.float64))
        torch.testing.assert_close(curvature.solve(v, damping), torch.linalg.solve(dense + torch.diag(damping), v))
        torch.testing.assert_close(curvature.solve(v[:, 0], 1e-2),
                                   torch.linalg.solve(dense + 1e-2 * torch.eye(curvature.p, dtype=torch.float64), v[:, 0]))
        per_tensor = curvature.damping({n: 1e-3 * (i + 1) for i, n in enumerate(curvature.names)})
        torch.testing.assert_close(curvature.solve(v, per_tensor), torch.linalg.solve(dense + torch.diag(per_tensor), v))
        with pytest.raises(ValueError, match="constant within each parameter tensor"):
            curvature.solve(v, torch.linspace(0.1, 1.0, curvature.p, dtype=torch.float64))
        with pytest.raises(ValueError, match="singular"):
            curvature.solve(v, 0.0)  # the decoder's G has the null vector 1 (softmax rows sum to one)
        assert curvature.psd and curvature.nbytes > 0


@pytest.mark.parametrize("labels", ["data", "model"])
def test_diagonal_fisher_equals_brute_force(labels, monkeypatch):
    monkeypatch.setattr(nk, "_BUDGET", 100)  # dense per-sentence gradients in sub-batches of 1 to 4 sentences
    model = tiny_model(layers=2)
    sentences = random_sentences(7, V, max_len=5, seed=9)
    diag = nk.diagonal_fisher(model, sentences, EOS, labels=labels, mc_samples=2, chunk_size=3, seed=4)
    if labels == "data":
        expected = sentence_ef(loop_grads(model, sentences), sentences).diagonal()
        assert diag.name == "ef_diag"
    else:
        draws = drawn_targets(model, sentences, 4, 2, 3)
        expected = sum(sentence_ef(loop_grads(model, sentences, t), sentences).diagonal() for t in draws) / 2
        assert diag.name == "mc_fisher_k2_diag"
    torch.testing.assert_close(diag.d, expected, rtol=1e-9, atol=1e-14)


def test_n_fit_draws_a_seeded_subset():
    model = tiny_model()
    sentences = random_sentences(8, V, seed=10)
    factors = nk.fit_network_kfac(model, sentences, EOS, labels="data", n_fit=3, seed=5, ekfac=False)
    chosen = torch.randperm(8, generator=torch.Generator().manual_seed(5))[:3].sort().values.tolist()
    direct = nk.fit_network_kfac(model, [sentences[i] for i in chosen], EOS, labels="data", ekfac=False)
    assert factors.n == 3
    for key in direct.factors:
        torch.testing.assert_close(factors.factors[key], direct.factors[key], rtol=0, atol=0)


def test_resume_after_a_kill_gives_identical_factors(tmp_path, monkeypatch):
    model = tiny_model(layers=2)
    sentences = random_sentences(10, V, max_len=5, seed=11)
    kwargs = {"mc_samples": 2, "chunk_size": 2, "seed": 1, "save_every": 0.0}
    expected = nk.fit_network_kfac(model, sentences, EOS, **kwargs)
    real, calls = nk._ekfac_chunk, []

    def dying(*args, **kw):
        calls.append(1)
        if len(calls) == 5:  # chunk 2 of the EK-FAC pass, draw 0
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(nk, "_ekfac_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        nk.fit_network_kfac(model, sentences, EOS, cache_dir=tmp_path, **kwargs)
    counted = []
    monkeypatch.setattr(nk, "_ekfac_chunk", lambda *a, **k: (counted.append(1), real(*a, **k)))
    monkeypatch.setattr(nk, "_factor_chunk", lambda *a, **k: pytest.fail("the factor pass was cached"))
    got = nk.fit_network_kfac(model, sentences, EOS, cache_dir=tmp_path, **kwargs)
    assert len(counted) == 2 * (5 - 2)  # chunks 2, 3, 4 of 5, two draws each
    for key in expected.factors:
        assert torch.equal(got.factors[key], expected.factors[key]), key
    for name in expected.eigenvalues:
        assert torch.equal(got.eigenvalues[name], expected.eigenvalues[name]), name
    again = nk.fit_network_kfac(model, sentences, EOS, cache_dir=tmp_path, **kwargs)  # fully cached now
    assert len(counted) == 6 and torch.equal(again.eigenvalues["decoder.weight"], expected.eigenvalues["decoder.weight"])
    # the eigendecompositions are cached with the sums: a rerun reads them and never calls eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: pytest.fail("eigh was repeated"))
    cached = nk.fit_network_kfac(model, sentences, EOS, cache_dir=tmp_path, **kwargs)
    v = torch.randn(sum(math.prod(s) for s in expected.shapes.values()), 3, dtype=torch.float64)
    assert torch.equal(nk.ekfac_network_curvature(cached).solve(v, 0.1), nk.ekfac_network_curvature(again).solve(v, 0.1))
    for key, (values, vectors) in expected.eigenbases().items():
        assert torch.equal(cached.eigenbases()[key][0], values) and (vectors is None or torch.equal(
            cached.eigenbases()[key][1], vectors)), key


def test_argument_errors():
    model = tiny_model()
    sentences = random_sentences(3, V)
    with pytest.raises(ValueError, match="labels must be one of"):
        nk.fit_network_kfac(model, sentences, EOS, labels="true")
    with pytest.raises(ValueError, match="mc_samples"):
        nk.fit_network_kfac(model, sentences, EOS, mc_samples=0)
    with pytest.raises(ValueError, match="n_fit"):
        nk.fit_network_kfac(model, sentences, EOS, n_fit=4)
    with pytest.raises(ValueError, match="chunk_size"):
        nk.diagonal_fisher(model, sentences, EOS, chunk_size=0)
    with pytest.raises(ValueError, match="non-empty"):
        nk.fit_network_kfac(model, [], EOS)
    with pytest.raises(TypeError, match="LSTMLM"):
        nk.fit_network_kfac(torch.nn.Linear(2, 2), sentences, EOS)
    with pytest.raises(TypeError, match="eos_id"):
        nk.fit_network_kfac(model, sentences, "<eos>")
    with pytest.raises(ValueError, match="eval"):
        nk.fit_network_kfac(tiny_model().train(), sentences, EOS)
    factors = nk.fit_network_kfac(model, sentences, EOS, ekfac=False)
    with pytest.raises(ValueError, match="ekfac=True"):
        nk.ekfac_network_curvature(factors)
    kfac = nk.kfac_network_curvature(factors)
    with pytest.raises(ValueError, match="missing"):
        kfac.damping({"decoder.weight": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        kfac.relative_damping(-1.0)
    with pytest.raises(TypeError, match="damping"):
        kfac.solve(torch.zeros(kfac.p, dtype=torch.float64), "0.1")
    with pytest.raises(ValueError, match="rows"):
        kfac.solve(torch.zeros(kfac.p + 1, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="no Kronecker factors"):
        nk.factor_keys("lstm.weight_xx_l0")
    assert math.isfinite(kfac.mean_eigenvalue())
