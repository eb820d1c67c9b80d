"""Shared set-up of the benchmark scripts (not a benchmark): this checkout's ``ifutils`` on the path, the model
they time, and the process's peak memory."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's ifutils, whatever the working directory
    sys.path.insert(0, str(ROOT))


def maxrss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_model(checkpoint: str | None, seed: int):
    """(model in eval mode, PTB corpus, description): the checkpoint when it exists (a relative path is taken from
    the repository root), else the default-size LSTMLM at a seeded random initialisation (the cost of every timed
    operation does not depend on the weights)."""
    import torch

    from ifutils.data import load_corpus
    from ifutils.io import load_checkpoint
    from ifutils.model import LSTMLM, ModelConfig

    path = Path(checkpoint) if checkpoint else None
    path = ROOT / path if path is not None and not path.is_absolute() else path
    if path is not None and path.is_file():
        model, vocab, _ = load_checkpoint(path)
        corpus, what = load_corpus("ptb", vocab=vocab), f"checkpoint {checkpoint}"
    else:
        corpus = load_corpus("ptb")
        torch.manual_seed(seed)
        model, what = LSTMLM(ModelConfig(vocab_size=len(corpus.vocab.itos))), "random init"
    return model.eval(), corpus, what
