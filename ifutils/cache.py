"""On-disk cache of the chunks of long computations, so that a killed run resumes where it stopped.

Each cache lives in ``<root>/<key>/`` where ``key`` hashes everything the result depends on: the
configuration, the model weights, the samples and the source code of ``ifutils``. A cache made with any
other configuration, checkpoint or code therefore has another key and is never reused. Every chunk is
written to a temporary file and renamed, so a kill leaves either a complete chunk or none.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .io import atomic_write

SOURCE_DIR = Path(__file__).resolve().parent


def fingerprint(*parts) -> str:
    """Hex sha256 of tensors (their dtype, shape and bytes), lists of tensors, and JSON-able values."""
    digest = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
            for item in x:
                feed(item)
        elif isinstance(x, dict) and x and isinstance(next(iter(x.values())), torch.Tensor):
            for name in sorted(x):
                digest.update(name.encode())
                feed(x[name])
        else:
            digest.update(json.dumps(x, sort_keys=True, default=str).encode())

    for part in parts:
        feed(part)
    return digest.hexdigest()


def code_version() -> str:
    """sha256 of the package's source files: any code change invalidates old caches."""
    return fingerprint([p.read_text() for p in sorted(SOURCE_DIR.glob("*.py"))])


class ChunkCache:
    """Named tensors stored under a key; ``get`` returns None for a chunk not yet computed.

    Args:
        root: cache directory (created on first write), e.g. ``cache/``.
        description: JSON-able dict naming what the key covers; saved as ``meta.json``.
        *parts: tensors and values hashed into the key with ``description`` and :func:`code_version`.
    """

    def __init__(self, root: str | os.PathLike, description: dict, *parts):
        self.key = fingerprint(description, code_version(), *parts)[:20]
        self.dir = Path(root) / self.key
        self.description = description

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.pt"

    def get(self, name: str):
        """The stored tensor (or dict of tensors), or None. Loaded with ``weights_only=True``."""
        path = self._path(name)
        return torch.load(path, weights_only=True) if path.is_file() else None

    def put(self, name: str, value):
        """Store a tensor or a dict of tensors and numbers atomically under ``name``; return it."""
        if not (self.dir / "meta.json").is_file():
            atomic_write(self.dir / "meta.json", lambda tmp: tmp.write_text(json.dumps(self.description, indent=1)))
        atomic_write(self._path(name), lambda tmp: torch.save(value, tmp))
        return value


def derive_seed(*parts: int) -> int:
    """A 63-bit seed determined by ``parts`` (e.g. a run's seed and a chunk index), so each chunk draws
    the same random numbers whether or not earlier chunks came from the cache."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1
