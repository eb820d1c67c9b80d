"""Seeded corruption of training sentences, the ground truth of the detection benchmark (issue 16, item 1).

Three kinds, each applied to exactly ``round(fraction x n)`` sentences drawn without replacement (seeded), and each
guaranteed to change the sentence it touches (so the corrupted set is exactly the set of changed sentences):

* ``"shuffle"``: the words (not the final ``<eos>``) in a random order different from the original; only sentences
  with at least two distinct words are eligible;
* ``"random"``: every word replaced by a token drawn uniformly from the vocabulary without ``<eos>`` (redrawn in the
  rare case the sentence comes out unchanged);
* ``"repeat"``: a degenerate sentence of the same length, one token (uniform, without ``<eos>``) repeated.

These are the corruptions of noisy-data studies for language models (word shuffling and random tokens, e.g. the
synthetic noise of Xie et al. 2017 and the degenerate repetitions that deduplication filters target).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["KINDS", "corrupt"]

KINDS = ("shuffle", "random", "repeat")


def corrupt(sentences: list[torch.Tensor], fraction: float, kind: str, vocab_size: int, eos_id: int,
            seed: int = 0) -> tuple[list[torch.Tensor], np.ndarray]:
    """A copy of ``sentences`` with ``round(fraction n)`` of them corrupted, and the sorted corrupted indices.

    Args:
        sentences: 1-D int64 tensors of word ids, each ending in ``<eos>``.
        fraction: in (0, 1). kind: one of :data:`KINDS`. vocab_size: V (tokens are drawn from [0, V) without
            ``eos_id``). eos_id: the end token. seed: numpy seed of the draw and of every corruption.
    Returns:
        (the new list, the untouched sentences the same tensor objects; (k,) int64 sorted indices changed).
    Raises:
        ValueError: an unknown kind, fraction outside (0, 1), a vocabulary of fewer than 3 tokens, or fewer eligible
            sentences than the count asked.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {', '.join(KINDS)}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3 to draw tokens other than <eos>, got {vocab_size}")
    n = len(sentences)
    count = round(fraction * n)
    words = [s[:-1] for s in sentences]
    if kind == "shuffle":
        eligible = [i for i, w in enumerate(words) if len(torch.unique(w)) >= 2]
    else:
        eligible = [i for i, w in enumerate(words) if len(w) >= 1]
    if count > len(eligible):
        raise ValueError(f"{count} sentences to corrupt by {kind!r} but only {len(eligible)} are eligible")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(np.asarray(eligible, dtype=np.int64), size=count, replace=False))
    others = np.array([t for t in range(vocab_size) if t != eos_id])
    out = list(sentences)
    for i in chosen.tolist():
        w = words[i]
        while True:
            if kind == "shuffle":
                new = w[torch.as_tensor(rng.permutation(len(w)))]
            elif kind == "random":
                new = torch.as_tensor(rng.choice(others, size=len(w)), dtype=w.dtype)
            else:
                new = torch.full_like(w, int(rng.choice(others)))
            if not torch.equal(new, w):
                break
        out[i] = torch.cat([new, sentences[i][-1:]])
    return out, chosen
