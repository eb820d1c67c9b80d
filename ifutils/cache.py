"""On-disk cache of the chunks of long computations, so that a killed run resumes where it stopped.

Each cache lives in ``<root>/<key>/`` where ``key`` hashes everything the result depends on: the
configuration, the model weights, the samples and the source code that computes the stage -- the module named by
the caller and, recursively, every ``ifutils`` module it imports (:func:`code_version`). A cache made with any
other configuration, checkpoint or code of that stage therefore has another key and is never reused, while an
edit elsewhere (a plot, a docstring in another stage) keeps it. Every chunk is written to a temporary file and
renamed, so a kill leaves either a complete chunk or none.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Callable, Union

import torch

from .io import atomic_write

SOURCE_DIR = Path(__file__).resolve().parent
PACKAGE = "ifutils"
Code = Union[str, Callable, None, tuple]  # what a cache's key covers of the code: see ChunkCache


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


def module_path(module: str, root: str | os.PathLike = SOURCE_DIR) -> Path | None:
    """The source file of ``module`` (``"ifutils.curvature.exact"``) in the package directory ``root``: a
    ``.py`` file or a package's ``__init__.py``; None when it is no module of the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = Path(root).joinpath(*parts[1:])
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def package_imports(module: str, root: str | os.PathLike = SOURCE_DIR) -> set[str]:
    """The ``ifutils`` modules that ``module``'s source imports directly, from its syntax tree (:mod:`ast`):
    ``import ifutils.x``, ``from ifutils.x import y``, relative imports resolved against ``module``'s package;
    ``from P import name`` counts the submodule ``P.name`` when there is one, else ``P`` itself. The standard
    library and third-party modules are left out.

    Raises:
        ValueError: ``module`` is no module of the package under ``root`` (the message names the file looked for).
    """
    path = module_path(module, root)
    if path is None:
        raise ValueError(f"{module!r} is no module of {PACKAGE} under {root}; pass a name like 'ifutils.grads'")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.append(sub if module_path(sub, root) else base)
        else:
            continue
        found.update(n for n in names if module_path(n, root) is not None)
    found.discard(module)
    return found


@functools.lru_cache(maxsize=None)
def dependencies(module: str, root: str | os.PathLike = SOURCE_DIR) -> tuple[str, ...]:
    """``module`` and every ``ifutils`` module it imports, recursively (:func:`package_imports`), sorted.
    Cached per process and ``root``: a long run reads the sources once.

    Raises:
        ValueError: ``module`` is no module of the package.
    """
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(package_imports(name, root) - seen)
    return tuple(sorted(seen))


@functools.lru_cache(maxsize=None)
def _module_hash(module: str, root: str | os.PathLike) -> str:
    """sha256 of the sources of ``module`` and its package dependencies, named by module (cached per process)."""
    return fingerprint([[name, module_path(name, root).read_text()] for name in dependencies(module, root)])


def code_version(*code, root: str | os.PathLike = SOURCE_DIR) -> str:
    """sha256 of the source code a cached stage depends on.

    Args:
        *code: module names (``"ifutils.curvature.exact"``: that module and, recursively, the ``ifutils`` modules
            it imports, :func:`dependencies`) and functions or classes (their own source text,
            :func:`inspect.getsource`, for a stage computed by a few functions of a larger module). None, or
            nothing: every ``*.py`` file of the package, subpackages included (any change invalidates).
        root: the package directory (tests pass a copy).
    Returns:
        64 hex digits; the same for the same code whatever else in the package changed.
    Raises:
        ValueError: an unknown module name; TypeError: something neither a name nor a function or class.
    """
    code = tuple(c for c in code if c is not None)
    root = str(Path(root).resolve())
    if not code:
        files = sorted(Path(root).rglob("*.py"))
        return fingerprint([[str(p.relative_to(root)), p.read_text()] for p in files])
    parts = []
    for item in code:
        if isinstance(item, str):
            parts.append(["module", item, _module_hash(item, root)])
        elif inspect.isfunction(item) or inspect.isclass(item) or inspect.ismethod(item):
            parts.append(["source", f"{item.__module__}.{item.__qualname__}", inspect.getsource(item)])
        else:
            raise TypeError(f"code must be module names or functions/classes, got {type(item).__name__} {item!r}")
    return fingerprint(parts)


def _code_names(code: Code) -> list[str]:
    """JSON-able names of what ``code`` covers, for ``meta.json``."""
    items = code if isinstance(code, tuple) else (code,)
    return [i if isinstance(i, str) or i is None else f"{i.__module__}.{i.__qualname__}" for i in items]


class ChunkCache:
    """Named tensors stored under a key; ``get`` returns None for a chunk not yet computed.

    Args:
        root: cache directory (created on first write), e.g. ``cache/``.
        description: JSON-able dict naming what the key covers; saved as ``meta.json`` (with ``code``).
        *parts: tensors and values hashed into the key with ``description`` and :func:`code_version`.
        code: the module that computes the stage (``"ifutils.curvature.exact"``), or a tuple of module names and
            functions (see :func:`code_version`); the key covers that code and the package modules it imports.
            None: the whole package (safe, but any edit anywhere discards the cache).
    """

    def __init__(self, root: str | os.PathLike, description: dict, *parts, code: Code = None):
        items = code if isinstance(code, tuple) else (code,)
        version = code_version(*items)  # validates ``code`` first
        self.key = fingerprint(description, _code_names(code), version, *parts)[:20]
        self.dir = Path(root) / self.key
        self.description = {**description, "code": _code_names(code)}

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
