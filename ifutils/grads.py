"""Per-sample and per-token gradients of the subset loss with ``torch.func`` (vmapped over sentences, chunked,
cached so that a killed run resumes)."""

from __future__ import annotations

import os

import torch
from torch.func import grad, jacrev, vmap

from ._checks import check_finite_parameters, check_tensor
from .cache import derive_seed
from .subset import SubsetLoss, sample_labels


def per_sample_grads(
    loss: SubsetLoss,
    sentences: list[torch.Tensor],
    chunk_size: int = 32,
    sampled_labels: int | None = None,
    desc: str | None = "per-sample gradients",
    theta: torch.Tensor | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Gradient of each sample's loss l_i (mean token NLL, nats) with respect to theta_S.

    g_i = d l_i / d theta_S at ``theta`` (default ``loss.theta0``), computed by ``vmap(grad(.))`` over
    length-bucketed chunks; padding never enters (see :func:`ifutils.model.sentence_loss`).

    Args:
        loss: the subset loss.
        sentences: n 1-D int64 tensors (sentences ending in ``<eos>``, or text8 windows).
        chunk_size: sentences per vectorised chunk (memory grows linearly with it).
        sampled_labels: a seed; if given, each target is replaced by a label drawn from the model's own
            softmax (for the true Fisher), chunk j with a generator seeded by (seed, j).
        theta: (p,) point of evaluation; default the trained values.
        cache_dir: if given, each chunk is stored there under a key of everything it depends on
            (:class:`~ifutils.cache.ChunkCache`), and a rerun after a kill loads finished chunks.
    Returns:
        (n, p) tensor in ``loss``'s dtype and device, row i for ``sentences[i]``; identical bit for bit
        whether chunks were computed now or loaded.
    Raises:
        TypeError: ``theta`` is not a torch tensor; a sample is not an integer tensor.
        IndexError: a word id is negative or >= vocab_size (the message names the sample and the id).
        FloatingPointError: ``theta`` holds NaN/Inf (checked first, as the model's weights are by
            :class:`~ifutils.subset.SubsetLoss`), or a gradient is NaN or infinite; the message lists the samples.
    """
    theta = loss.theta0 if theta is None else _check_theta(theta, loss)
    out = theta.new_empty(len(sentences), len(theta))
    one = vmap(grad(loss.loss), in_dims=(None, 0, 0, 0))
    cache = loss.cache(
        cache_dir, {"stage": "per-sample gradients", "chunk_size": chunk_size, "sampled_labels": sampled_labels},
        theta, sentences, code=__name__,
    )
    for j, (idx, inputs, targets, mask) in enumerate(loss.batches(sentences, chunk_size, desc)):
        grads = cache.get(f"chunk{j}") if cache else None
        if grads is None:
            if sampled_labels is not None:
                with torch.no_grad():
                    generator = torch.Generator().manual_seed(derive_seed(sampled_labels, j))
                    targets = sample_labels(loss.logits(theta, inputs), generator)
            grads = one(theta, inputs, targets, mask)
            if cache:
                cache.put(f"chunk{j}", grads.cpu())
        out[idx] = grads.to(out)
    bad = (~torch.isfinite(out).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(
            f"non-finite per-sample gradients for samples {bad[:20]} (of {len(bad)}); the model's weights and theta "
            f"were finite when checked, so the loss overflowed on those samples: try dtype=torch.float64 in "
            f"SubsetLoss, or inspect those samples"
        )
    return out


def _check_theta(theta, loss: SubsetLoss) -> torch.Tensor:
    """A finite (p,) tensor of the subset's size, else TypeError / ValueError / FloatingPointError naming theta."""
    check_tensor(theta, "theta", "(p,) tensor")
    if theta.shape != loss.theta0.shape:
        raise ValueError(f"theta must have shape (p,) = {tuple(loss.theta0.shape)}, the subset's size, "
                         f"got {tuple(theta.shape)}; pass loss.theta0 or a vector of the same size")
    check_finite_parameters({"theta": theta}, "the point theta",
                            "Pass a finite theta (loss.theta0, or a re-solved point that converged)")
    return theta


def per_token_grads(
    loss: SubsetLoss, sentences: list[torch.Tensor], chunk_size: int = 16, desc: str | None = "per-token gradients",
    theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of every token's NLL -log p(y_t | y_<t) (nats) with respect to theta_S.

    ``vmap`` over sentences of ``jacrev`` of the (L,) token-loss vector. A sentence's mean-loss gradient
    g_i is the mean of its rows (tested), and the token-level empirical Fisher is built from these
    (:func:`ifutils.curvature.token_empirical_fisher`).

    Args:
        loss: the subset loss; sentences: n 1-D int64 tensors; chunk_size: sentences per vectorised chunk.
        theta: (p,) point of evaluation, default ``loss.theta0``.
    Returns:
        (sum_i T_i, p) tensor in ``loss``'s dtype: the T_0 rows of sentence 0 in token order, then sentence 1, ...
    Raises:
        like :func:`per_sample_grads` for ``theta`` and the samples.
    """
    theta = loss.theta0 if theta is None else _check_theta(theta, loss)
    lengths = torch.tensor([len(s) for s in sentences])
    starts = (lengths.cumsum(0) - lengths).tolist()
    out = theta.new_empty(int(lengths.sum()), len(theta))
    jac = vmap(jacrev(loss.token_losses), in_dims=(None, 0, 0))
    for idx, inputs, targets, _ in loss.batches(sentences, chunk_size, desc):
        rows = jac(theta, inputs, targets)  # (B, L, p)
        for b, i in enumerate(idx):
            out[starts[i] : starts[i] + len(sentences[i])] = rows[b, : len(sentences[i])]
    return out
