"""The exact Hessian and Gauss-Newton matrix (= true Fisher in closed form) of the subset objective, in one
structured pass (formulas in :mod:`ifutils.curvature.base`)."""

from __future__ import annotations

import os

import torch
from torch.func import grad, jacfwd, vmap

from ..subset import DECODER, SubsetLoss
from .base import DenseCurvature, check_dense_fits


def _decoder_coords(loss: SubsetLoss) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions in theta of LSTM-side and decoder coordinates, and for the decoder ones the
    output row v_a and input feature k_a (-1 for the bias, whose feature is the constant 1)."""
    positions, rows, feats, hidden = [], [], [], loss.base["decoder.weight"].shape[1]
    for name in loss.subset.names:
        idx = loss.indices[name]
        pos = torch.arange(len(idx), device=idx.device) + loss._offsets[name]
        if name in DECODER:
            positions.append(pos)
            rows.append(idx // hidden if name == "decoder.weight" else idx)
            feats.append(idx % hidden if name == "decoder.weight" else torch.full_like(idx, -1))
    p = len(loss.theta0)
    is_dec = torch.zeros(p, dtype=torch.bool, device=loss.theta0.device)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long, device=is_dec.device)  # noqa: E731
    dec_pos = cat(positions)
    is_dec[dec_pos] = True
    return (~is_dec).nonzero().flatten(), dec_pos, cat(rows), cat(feats)


def hessian_and_ggn(
    loss: SubsetLoss,
    sentences: list[torch.Tensor],
    chunk_size: int = 8,
    token_chunk: int = 16,
    theta: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    cache_dir: str | os.PathLike | None = None,
    token_ef: bool = False,
) -> tuple[DenseCurvature, ...]:
    """Exact Hessian H and Gauss-Newton G (= closed-form true Fisher) of the mean training loss
    (1/n) sum_i w_i l_i(theta), with sample weights w_i (default 1), and optionally the token-level EF.

    Uses the structure of the loss instead of p Hessian-vector products through the V-way softmax.
    Split theta into LSTM-side coordinates (l) and decoder coordinates (d). Per token,
      G_ll = J^T (W_d^T Lambda W_d) J,   G_ld = J^T W_d^T Lambda E_d diag(f),   G_dd = diag(f) E_d^T Lambda E_d diag(f),
      R_ll = d^2/dtheta_l^2 [ (W_d^T r)^T h(theta_l) ]  (second derivatives of h only),
      R_ld[:, a] = r[v_a] J[k_a, :],   R_dd = 0,
    where E_d selects the output rows v_a of the decoder coordinates and f_a = h[k_a] (1 for a bias).
    H = G + R, each weighted by 1/(n T_i). J and R_ll come from one forward-over-reverse pass
    (``jacfwd(grad)``) through the unrolled LSTM only; the softmax enters through W_d^T Lambda W_d.
    The same pass gives every token's gradient, J^T W_d^T r on the LSTM side and r[v_a] f_a on the decoder
    side, hence the token-level EF (:func:`token_empirical_fisher`) at the cost of one outer product per token.

    Args:
        loss: subset loss; its dtype sets the compute precision (results are float64).
        sentences: the n_H sentences.
        chunk_size: sentences per vectorised chunk; token_chunk: tokens per (H, V) x (V, H) product.
        theta: (p,) point of evaluation, default ``loss.theta0``.
        weights: (n,) sample weights w_i, default all ones (retraining uses 0 to remove a sample).
        cache_dir: if given, the running sums are saved after every chunk (:class:`~ifutils.cache.ChunkCache`)
            and a rerun after a kill continues from the last saved chunk, with bit-identical results.
        token_ef: also return the token-level empirical Fisher (with weights w_i / (n T_i)).
    Returns:
        (DenseCurvature "hessian", DenseCurvature "ggn"[, DenseCurvature "ef_token"]), named by their keys
        (:mod:`ifutils.curvature.labels`).
    Raises:
        ValueError: no sentences, a sentence too long (``SubsetLoss.max_len``), or ``weights`` not of shape (n,).
        MemoryError: the dense p x p matrices would not fit (:func:`check_dense_fits`).
        FloatingPointError: a result holds NaN/Inf.
    Cost: one forward-over-reverse pass with p_l tangents per sentence; about 200 s for p = 512 and 500 PTB
    sentences on 2 CPU cores in float32 (``benchmarks/exact_hessian.py``).
    """
    lpos, dpos, rows, feats = _decoder_coords(loss)
    theta = loss.theta0 if theta is None else theta
    p, n = len(theta), len(sentences)
    check_dense_fits(p, 4, theta.device)
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"weights must have shape (n,) = ({n},), one per sentence, got {tuple(weights.shape)}")
    weights = torch.ones(n, dtype=theta.dtype, device=theta.device) if weights is None else weights.to(theta)
    W, bias = loss.dense("decoder.weight", theta), loss.dense("decoder.bias", theta)
    hess = torch.zeros(p, p, dtype=torch.float64, device=W.device)
    ggn, ef = torch.zeros_like(hess), torch.zeros_like(hess) if token_ef else None
    theta_l0 = theta[lpos]

    def hidden(theta_l, inputs):
        return loss.logits(theta.index_put((lpos,), theta_l), inputs, return_hidden=True)

    def grad_psi_and_h(theta_l, inputs, u):  # psi = sum_t u_t . h_t(theta_l), u held fixed
        return grad(lambda th: ((u * (h := hidden(th, inputs))).sum(), h), has_aux=True)(theta_l)

    second = vmap(jacfwd(grad_psi_and_h), in_dims=(None, 0, 0))
    cache = loss.cache(
        cache_dir, {"stage": "Hessian and GGN", "chunk_size": chunk_size, "token_chunk": token_chunk, "token_ef": token_ef},
        theta, weights, sentences, code=__name__,
    )
    progress = (cache.get("progress") if cache else None) or {"chunks": 0}
    if progress["chunks"]:
        hess, ggn = progress["hess"].to(hess), progress["ggn"].to(ggn)
        ef = progress["ef"].to(hess) if token_ef else None
    for j, (idx, inputs, targets, mask) in enumerate(loss.batches(sentences, chunk_size, "exact Hessian and GGN")):
        if j < progress["chunks"]:
            continue
        # w_i / T_i at real tokens, 0 at padding
        w = mask.to(W.dtype) * (weights[idx][:, None] / mask.sum(-1, keepdim=True))
        with torch.no_grad():
            h = hidden(theta_l0, inputs)
            probs = torch.softmax(h @ W.T + bias, dim=-1)
            r = probs - torch.nn.functional.one_hot(targets, probs.shape[-1]).to(probs.dtype)
        jac = None
        if len(lpos):
            r_ll, jac = second(theta_l0, inputs, w[..., None] * (r @ W))
            hess[lpos[:, None], lpos] += r_ll.sum(0).double()
            jac = jac[mask]
        g_parts, r_ld = _token_blocks(W, h[mask], probs[mask], r[mask], w[mask], rows, feats, jac, token_chunk)
        for (a, b), block in zip(((lpos, lpos), (lpos, dpos), (dpos, dpos)), g_parts):
            ggn[a[:, None], b] += block
            hess[a[:, None], b] += block
        hess[lpos[:, None], dpos] += r_ld
        if token_ef:
            g = torch.zeros(int(mask.sum()), p, dtype=torch.float64, device=W.device)
            g[:, lpos] = torch.einsum("nhp,nh->np", jac, r[mask] @ W).double() if jac is not None else 0.0
            g[:, dpos] = (r[mask][:, rows] * _features(h[mask], feats)).double()
            ef += (g * w[mask].double()[:, None]).T @ g
        if cache:
            cache.put("progress", {"chunks": j + 1, "hess": hess.cpu(), "ggn": ggn.cpu(),
                                   **({"ef": ef.cpu()} if token_ef else {})})
    for m in (hess, ggn):
        m[dpos[:, None], lpos] = m[lpos[:, None], dpos].T
    out = (DenseCurvature(hess / n, "hessian"), DenseCurvature(ggn / n, "ggn", psd=True))
    return out + (DenseCurvature(ef / n, "ef_token", psd=True),) if token_ef else out


def _features(h: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """(N, p_d) input feature f_a = h[k_a] of each decoder coordinate, 1 for a bias (k_a = -1)."""
    return torch.where(feats >= 0, h[:, feats.clamp(min=0)], 1.0)


def _token_blocks(W, h, probs, r, w, rows, feats, jac=None, token_chunk: int = 16):
    """GGN blocks (ll, ld, dd) and R_ld summed over N real tokens, in float64.

    Shapes: h (N, H), probs and r (N, V), w (N,), rows and feats (p_d,), jac (N, H, p_l) or None.
    """
    p_l = 0 if jac is None else jac.shape[-1]
    f = _features(h, feats)
    pv = probs[:, rows]
    q = pv * f
    same_row = rows[:, None] == rows[None, :]
    g_dd = same_row * ((w[:, None] * pv * f).T @ f) - (w[:, None] * q).T @ q
    g_ll = h.new_zeros(p_l, p_l)
    g_ld = h.new_zeros(p_l, len(rows))
    r_ld = h.new_zeros(p_l, len(rows))
    for s in range(0, len(h) if jac is not None else 0, token_chunk):
        sl = slice(s, s + token_chunk)
        jw = jac[sl] * w[sl, None, None]
        m = probs[sl] @ W  # (n, H) = W_d^T p_t
        a = (W.T[None] * probs[sl, None, :]) @ W  # (n, H, H) = W_d^T diag(p_t) W_d
        jm = torch.einsum("nhp,nh->np", jac[sl], m)
        g_ll += jw.flatten(0, 1).T @ (a @ jac[sl]).flatten(0, 1) - (jm * w[sl, None]).T @ jm
        x = (W[rows].T[None] - m[:, :, None]) * q[sl, None, :]  # (n, H, p_d) = W_d^T Lambda E_d diag(f)
        g_ld += torch.einsum("nhp,nha->pa", jw, x)
        coef = w[sl, None] * r[sl][:, rows] * (feats >= 0)  # (n, p_d)
        r_ld += torch.einsum("na,nap->pa", coef, jac[sl][:, feats.clamp(min=0), :])
    return (g_ll.double(), g_ld.double(), g_dd.double()), r_ld.double()
