"""Scores of every training sentence against fixed, already preconditioned queries, streamed to disk, resumable.

A query is q_j = (C + lambda I)^{-1} g_test_j (or any vector of the parameter space), formed once by the caller.
The influence of training sentence i on query j is

    I_ij = -g_i^T q_j,        g_i = d l_i / d theta,  l_i the mean token NLL of sentence i (nats/token),

the sign convention of :mod:`ifutils.influence` (Koh & Liang 2017, eq. 2, with the test gradient already
multiplied by the inverse curvature): positive = up-weighting sentence i raises the query's loss (harmful).
Two ways to get g_i^T q_j for a chunk of sentences, both without a (n, P) matrix:

* ``method="grads"``: :meth:`ifutils.network.NetworkGrads.dot`, one batched backward pass per chunk and the
  per-layer products sum_t <delta_t a_t^T, Q_j> (no (B, P) tensor either);
* ``method="forward"``: g_i^T q_j = d/de l_i(theta + e q_j) at e = 0, the directional derivative of the
  per-sentence losses along q_j. One Jacobian-vector product of the chunk's losses per query
  (:func:`torch.func.jvp` through :func:`torch.func.functional_call`), vmapped over blocks of queries; no g_i
  is ever formed. It runs through the unrolled LSTM (:func:`ifutils.model.unrolled_lstm`): the fused
  ``nn.LSTM`` also supports forward-mode AD on CPU once oneDNN is off (tests/test_scoring.py checks it), but
  under ``vmap`` over queries the unrolled path was about 7x faster (64-unit LSTM, 64 sentences of <= 26
  tokens, 8 queries, one thread: 0.17 s against 1.17 s per chunk), and cuDNN's LSTM has no forward-mode AD.
  Cost: one forward pass per query (Q passes per chunk), against one backward pass plus Q dot products for
  ``"grads"``.

Files written into ``out_dir`` (see :func:`score_all`):

* ``scores.npy``: the (n, Q) array of I_ij, rows in sentence index order, ``numpy.lib.format`` (read it with
  ``numpy.load(path, mmap_mode="r")``); rows not yet computed hold NaN;
* ``config.json``: what the scores depend on (fingerprints of the model's weights, the sentences and the
  queries; n, Q, the chunking, method, dtype, parameter names, the code version), written before any score;
* ``order.npy``: the fixed permutation of sentence indices that the chunks follow (stable sort by length, or
  the identity), saved once; chunk c is ``order[c * chunk_size:(c + 1) * chunk_size]``;
* ``progress.json``: the finished chunks, rewritten atomically after each chunk's rows are flushed to disk.

A killed run, called again with the same arguments, skips the finished chunks and recomputes the others; every
chunk is computed from the same sentences with the same code, so the finished file is bit-identical to that of an
uninterrupted run. Memory is that of one chunk (plus the queries), whatever n: the array lives on disk.

Under a :mod:`torch.distributed` process group (torchrun, :mod:`ifutils.distributed`) the ranks score one chunk
each per round and rank 0 writes the gathered rows: the same files, the same resume (``distributed`` of
:func:`score_all`).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch.func import functional_call, jvp, vmap

from . import distributed as dist_utils
from .cache import code_version, fingerprint
from .data import make_batch
from .io import atomic_write
from .model import LSTMLM, sentence_loss
from .network import NetworkGrads, parameter_names
from .progress import progress

__all__ = ["CONFIG_FILE", "METHODS", "ORDER_FILE", "PROGRESS_FILE", "SCORES_FILE", "chunk_scores", "load_scores",
           "query_dict", "score_all"]

METHODS = ("grads", "forward")
ORDERS = ("length", "index")
DTYPES = ("float32", "float64")
SCORES_FILE, CONFIG_FILE, ORDER_FILE, PROGRESS_FILE = "scores.npy", "config.json", "order.npy", "progress.json"
FORMAT = 1  # version of the directory layout above


def query_dict(model: LSTMLM, queries, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Queries in the layout of :mod:`ifutils.network`: ``{name: (Q, *shape)}``, names in ``named_parameters``
    order, on the model's device and dtype.

    Args:
        model: the :class:`LSTMLM` the queries belong to.
        queries: one of
            * a dict ``{name: (Q, *shape)}`` of whole parameter tensors (its keys are the parameters scored);
            * a flat (P,) tensor (one query) or a (Q, P) tensor: the chosen tensors flattened row-major and
              concatenated in ``named_parameters`` order (the layout of :meth:`NetworkGrads.flat`);
            * a list of (P,) tensors.
        names: the parameters the flat queries cover, default all; with a dict, None or the dict's keys.
    Returns:
        dict of (Q, *shape) tensors, float, the model's dtype and device.
    Raises:
        ValueError: no queries, a dict whose keys differ from ``names`` or whose tensors disagree on Q or with
            the parameter shapes, a flat query whose length is not P, unknown parameter names, non-finite values.
        TypeError: ``queries`` is none of the accepted types, or ``names`` is a string.
    """
    every = parameter_names(model)
    params = dict(model.named_parameters())
    ref = params[every[0]]
    if isinstance(queries, Mapping):
        keys = list(queries)
        unknown = [k for k in keys if k not in params]
        if unknown or not keys:
            raise ValueError(f"queries has unknown or no parameter names {unknown}; valid names: {', '.join(every)}")
        if names is not None and set(names) != set(keys):
            raise ValueError(f"names {list(names)} differ from the queries' keys {keys}; pass names=None with a dict")
        chosen = [n for n in every if n in set(keys)]
        out = {}
        for n in chosen:
            q = queries[n]
            if not isinstance(q, torch.Tensor) or tuple(q.shape[1:]) != tuple(params[n].shape) or q.dim() < 1:
                shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
                raise ValueError(f"queries[{n!r}] must be a (Q, {', '.join(map(str, params[n].shape))}) tensor, "
                                 f"got {shape}")
            out[n] = q.detach().to(device=ref.device, dtype=ref.dtype)
        counts = {n: len(q) for n, q in out.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"every tensor of queries needs the same number Q of queries, got {counts}")
    else:
        if isinstance(queries, (list, tuple)):
            if not queries or not all(isinstance(q, torch.Tensor) and q.dim() == 1 for q in queries):
                raise ValueError("a list of queries must hold one or more flat (P,) tensors")
            queries = torch.stack([q.detach().to(device=ref.device, dtype=ref.dtype) for q in queries])
        if not isinstance(queries, torch.Tensor):
            raise TypeError(f"queries must be a dict {{name: (Q, *shape)}}, a (P,) or (Q, P) tensor or a list of "
                            f"(P,) tensors, got {type(queries).__name__}")
        flat = queries.detach().to(device=ref.device, dtype=ref.dtype)
        flat = flat[None] if flat.dim() == 1 else flat
        if isinstance(names, str):
            raise TypeError(f"names must be a list of parameter names, e.g. [{names!r}], not a string")
        chosen = every if names is None else [n for n in every if n in set(names)]
        unknown = [] if names is None else [n for n in names if n not in params]
        if unknown or not chosen:
            raise ValueError(f"unknown or no parameter names {unknown}; valid names: {', '.join(every)}")
        p = sum(params[n].numel() for n in chosen)
        if flat.dim() != 2 or flat.shape[1] != p:
            raise ValueError(f"flat queries must be (P,) or (Q, P) with P = {p} (the sizes of {chosen}), got "
                             f"{tuple(queries.shape)}")
        sizes = [params[n].numel() for n in chosen]
        out = {n: x.reshape((len(flat),) + tuple(params[n].shape))
               for n, x in zip(chosen, flat.split(sizes, dim=1))}
    if len(next(iter(out.values()))) < 1:
        raise ValueError("queries holds Q = 0 queries; pass at least one")
    bad = [n for n, q in out.items() if not torch.isfinite(q).all()]
    if bad:
        raise ValueError(f"queries hold NaN or inf in {bad}; check the solve that produced them")
    return out


def _forward_dot(model: LSTMLM, batch: tuple[torch.Tensor, ...], queries: dict[str, torch.Tensor],
                 query_block: int) -> torch.Tensor:
    """(B, Q) directional derivatives g_i^T q_j of the chunk's losses l_i, by vmapped jvp (module docstring)."""
    inputs, targets, mask = batch
    primals = {n: p.detach() for n, p in model.named_parameters() if n in queries}

    def losses(params):  # (B,) mean token NLL per sentence, nats/token; the other parameters stay fixed
        return sentence_loss(functional_call(model, params, (inputs,), {"unrolled": True}), targets, mask)

    def along(tangent):
        return jvp(losses, (primals,), (tangent,))[1]

    q = len(next(iter(queries.values())))
    # no_grad: torch.func ignores it inside, but it keeps autograd graphs of the model's parameters from forming;
    # torch registers its jvp decompositions through the deprecated torch.jit.script at the first jvp of a process
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
        blocks = [vmap(along)({n: t[s : s + query_block] for n, t in queries.items()})
                  for s in range(0, q, query_block)]
    return torch.cat(blocks).T


def chunk_scores(model: LSTMLM, sentences: list[torch.Tensor], eos_id: int, queries: dict[str, torch.Tensor],
                 method: str = "grads", query_block: int = 8, grads: NetworkGrads | None = None) -> torch.Tensor:
    """g_i^T q_j for one chunk of sentences (no sign flip, no files).

    Args:
        model: an :class:`LSTMLM` in eval mode.
        sentences: B 1-D int64 tensors ending in ``<eos>``.
        eos_id: start and padding id.
        queries: ``{name: (Q, *shape)}`` from :func:`query_dict`.
        method: ``"grads"`` (per-layer products of :meth:`NetworkGrads.dot`) or ``"forward"`` (vmapped jvp).
        query_block: queries per vmapped jvp (``"forward"`` only); memory grows with it (the jvp carries a
            (block, B, L, V) tangent of the logits).
        grads: a :class:`NetworkGrads` for the queries' names, reused across chunks (``"grads"`` only).
    Returns:
        (B, Q) float tensor, the model's dtype, on its device.
    """
    if method == "grads":
        grads = grads or NetworkGrads(model, eos_id, list(queries))
        with torch.no_grad():
            return grads.dot(sentences, queries)
    device = next(model.parameters()).device
    batch = tuple(t.to(device) for t in make_batch(sentences, eos_id))
    return _forward_dot(model, batch, queries, query_block)


def _check_sentences(sentences) -> None:
    if not isinstance(sentences, Sequence) or isinstance(sentences, (str, torch.Tensor)) or not sentences:
        raise ValueError("sentences must be a non-empty list of 1-D int64 tensors (e.g. corpus.train)")
    for i, s in enumerate(sentences):
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.dtype != torch.long or len(s) == 0:
            what = f"{s.dtype} tensor of shape {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"sentence {i} must be a non-empty 1-D int64 tensor of word ids, got {what}")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def load_scores(out_dir: str | os.PathLike, allow_partial: bool = False) -> tuple[np.ndarray, dict]:
    """The scores and configuration that :func:`score_all` wrote into ``out_dir``.

    Args:
        out_dir: the directory passed to :func:`score_all`.
        allow_partial: return an unfinished run's array too (its missing rows hold NaN).
    Returns:
        (scores, config): scores a read-only (n, Q) ``numpy.memmap`` of I_ij = -g_i^T q_j (float32 or float64, as
        configured), rows in sentence index order; config the dict of ``config.json`` plus ``finished_chunks``.
    Raises:
        FileNotFoundError: no ``config.json`` or ``scores.npy`` in ``out_dir``.
        ValueError: the run is unfinished and ``allow_partial`` is False (call :func:`score_all` again to finish).
    """
    out = Path(out_dir)
    if not (out / CONFIG_FILE).is_file() or not (out / SCORES_FILE).is_file():
        raise FileNotFoundError(f"no scores in {out} ({CONFIG_FILE} and {SCORES_FILE} expected); run score_all")
    config = _read_json(out / CONFIG_FILE)
    done = _read_json(out / PROGRESS_FILE)["done"] if (out / PROGRESS_FILE).is_file() else []
    if len(done) < config["n_chunks"] and not allow_partial:
        raise ValueError(f"{out} holds {len(done)} of {config['n_chunks']} chunks; call score_all with the same "
                         f"arguments to finish it, or pass allow_partial=True")
    return np.load(out / SCORES_FILE, mmap_mode="r"), {**config, "finished_chunks": len(done)}


def score_all(model: LSTMLM, sentences: list[torch.Tensor], eos_id: int, queries, out_dir: str | os.PathLike,
              chunk_size: int = 64, names: list[str] | None = None, method: str = "grads", *,
              dtype: str = "float32", order: str = "length", query_block: int = 8, show_progress: bool = True,
              on_chunk: Callable[[int, int], None] | None = None, distributed: bool | None = None) -> np.ndarray:
    """Influence I_ij = -g_i^T q_j of every sentence i on every query j, streamed chunk by chunk into ``out_dir``.

    See the module docstring for the formulas and the files. A call on a directory that holds an unfinished run
    with the same configuration resumes it (bit-identical result); one with a finished run returns it without
    computing; one with another configuration is refused, nothing is overwritten.

    Args:
        model: an :class:`LSTMLM` in eval mode (dropout off); read, never changed. Computation in its dtype and
            on its device.
        sentences: the n training sentences, 1-D int64 tensors ending in ``<eos>`` (e.g. ``corpus.train``).
        eos_id: id of ``<eos>`` (start and padding token).
        queries: preconditioned query vectors q_j, in any form :func:`query_dict` accepts (a (P,) or (Q, P)
            tensor, a list of (P,) tensors, or ``{name: (Q, *shape)}``).
        out_dir: directory for the files (created); one directory per configuration.
        chunk_size: sentences per chunk (memory: one chunk's activations, B x L x V logits and their tangents).
        names: the parameter tensors the flat queries cover, default all; None with dict queries.
        method: ``"grads"`` or ``"forward"`` (module docstring); both give g_i^T q_j up to rounding.
        dtype: ``"float32"`` (default) or ``"float64"``, the dtype of the stored scores.
        order: ``"length"``: chunks of sentences of similar length (stable sort of the indices by length, a
            fixed permutation saved as ``order.npy``), less padding; ``"index"``: chunks in index order.
        query_block: queries per vmapped jvp with ``method="forward"``.
        show_progress: a progress bar over chunks (:func:`ifutils.progress.progress`).
        on_chunk: called as ``on_chunk(chunk, finished)`` after each chunk is recorded on disk (chunk index,
            number of finished chunks); an exception raised there stops the run like a kill (tests use it). Under
            a process group it is called on every rank for every chunk of a round (on rank 0 once it has recorded
            them, on the others once the rows are gathered); raise on every rank alike, or the others wait.
        distributed: shard the chunks over the ranks of a :mod:`torch.distributed` process group
            (:mod:`ifutils.distributed`, torchrun): round k gives the k-th ``world`` unfinished chunks one per
            rank, their rows are gathered to rank 0 (:func:`ifutils.distributed.gather_rows`, exact copies), which
            alone checks, creates and writes the files (rows, then ``progress.json``), so the files and the resume
            are those of one process: a run killed under any number of ranks is resumed by any other, with the
            same rows (each chunk's rows depend only on its sentences, the code and the device type). None
            (default): shard when a group is initialised; False: this process alone (never from several ranks on
            one ``out_dir``); True: require a group. Every rank must call with the same arguments; every rank
            returns the array once rank 0 has finished it (``out_dir`` shared by the ranks, as on one node).
    Returns:
        The read-only (n, Q) ``numpy.memmap`` of ``scores.npy``, rows in sentence index order.
    Raises:
        ValueError: bad arguments (the message says what to pass), the model in training mode, or ``out_dir``
            holding files of another configuration (the message names the differing fields) or foreign files (on
            every rank, from rank 0's check); ``distributed=True`` without a process group.
        TypeError: ``eos_id`` not an int; ``queries`` of no accepted type.
    """
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() so that dropout is off")
    if not isinstance(eos_id, int) or isinstance(eos_id, bool):
        raise TypeError(f"eos_id must be an int id, e.g. vocab.stoi['<eos>'], got {eos_id!r}")
    _check_sentences(sentences)
    for label, value in (("chunk_size", chunk_size), ("query_block", query_block)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be an int >= 1, got {value!r}")
    for label, value, allowed in (("method", method, METHODS), ("dtype", dtype, DTYPES), ("order", order, ORDERS)):
        if value not in allowed:
            raise ValueError(f"{label}={value!r} is not one of {allowed}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a directory path, got {type(out_dir).__name__}")
    vocab = model.config.vocab_size
    too_big = next((i for i, s in enumerate(sentences) if int(s.max()) >= vocab or int(s.min()) < 0), None)
    if too_big is not None:
        raise ValueError(f"sentence {too_big} holds ids outside 0..{vocab - 1}, the model's vocabulary")
    qd = query_dict(model, queries, names)
    chosen, n, q = list(qd), len(sentences), len(next(iter(qd.values())))
    lengths = [len(s) for s in sentences]
    perm = np.asarray(sorted(range(n), key=lambda i: lengths[i]) if order == "length" else range(n), dtype=np.int64)
    n_chunks = -(-n // chunk_size)
    config = {
        "format": FORMAT, "quantity": "influence I_ij = -g_i^T q_j (positive = harmful), g_i = d l_i / d theta, "
        "l_i the mean token NLL of sentence i in nats/token; rows sentence i, columns query j",
        "n": n, "q": q, "chunk_size": chunk_size, "n_chunks": n_chunks, "method": method, "dtype": dtype,
        "order": order, "order_sha256": fingerprint(perm.tolist()), "names": chosen, "eos_id": eos_id,
        "model_sha256": fingerprint(dict(model.state_dict()), model.config.to_dict()),
        "model_dtype": str(next(model.parameters()).dtype), "device": str(next(model.parameters()).device),
        "sentences_sha256": fingerprint(list(sentences)), "queries_sha256": fingerprint(qd),
        "query_block": query_block if method == "forward" else None,
        "code": code_version("ifutils.scoring"),
    }
    out = Path(out_dir)
    paths = {k: out / f for k, f in (("scores", SCORES_FILE), ("config", CONFIG_FILE), ("order", ORDER_FILE),
                                      ("progress", PROGRESS_FILE))}
    rank, world = _world(distributed)
    if world == 1:
        done = _open_run(paths, config, perm, (n, q), dtype, chunk_size)
    else:  # rank 0 alone reads and writes the files; the others learn the finished chunks, or the refusal
        state = None
        if rank == 0:
            try:
                state = {"done": _open_run(paths, config, perm, (n, q), dtype, chunk_size)}
            except ValueError as error:
                state = {"error": str(error)}
        state = dist_utils.broadcast_object(state)
        if "error" in state:
            raise ValueError(state["error"])
        done = state["done"]
    if done is None:  # finished
        return np.load(paths["scores"], mmap_mode="r")
    scores = open_memmap(paths["scores"], mode="r+") if rank == 0 else None
    grads = NetworkGrads(model, eos_id, chosen) if method == "grads" else None
    todo = [c for c in range(n_chunks) if c not in done]
    finished = len(done)
    bar = progress(total=n_chunks, initial=finished, desc=f"scoring ({method}, {q} queries)", unit="chunk",
                   disable=not show_progress or rank != 0)
    try:
        for start in range(0, len(todo), world):  # one round: chunk todo[start + r] on rank r
            round_chunks = todo[start : start + world]
            mine = dist_utils.shard(round_chunks, rank, world)
            rows = None
            if mine:
                idx = perm[mine[0] * chunk_size : (mine[0] + 1) * chunk_size]
                g_dot_q = chunk_scores(model, [sentences[i] for i in idx], eos_id, qd, method, query_block, grads)
                rows = -g_dot_q.detach()
            if world > 1:
                empty = torch.zeros(0, q, dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)
                gathered = dist_utils.gather_rows(empty if rows is None else rows)
            else:
                gathered = [rows]
            if rank == 0:
                for c, part in zip(round_chunks, gathered):
                    scores[perm[c * chunk_size : (c + 1) * chunk_size]] = part.cpu().numpy().astype(dtype)
                scores.flush()  # the rows reach the file before their chunks are recorded as finished
                done.update(round_chunks)
                _write_json(paths["progress"], {"done": sorted(done)})
            bar.update(len(round_chunks))
            for c in round_chunks:
                finished += 1
                if on_chunk is not None:
                    on_chunk(c, finished)
    finally:
        bar.close()
        del scores
    if world > 1:
        dist_utils.barrier()  # the other ranks read the file once rank 0 has written every row
    return np.load(paths["scores"], mmap_mode="r")


_world = dist_utils.process_world  # (rank, world) of the scoring


def _open_run(paths: dict[str, Path], config: dict, perm: np.ndarray, shape: tuple[int, int], dtype: str,
              chunk_size: int) -> set[int] | None:
    """Check ``out_dir`` against ``config`` and create the files of a new run; None when the run there is finished,
    else the set of finished chunks (empty for a new run).

    Raises:
        ValueError: files of another configuration, foreign files, or an order or array that does not fit.
    """
    out = paths["config"].parent
    done: set[int] = set()
    if paths["config"].is_file():
        old = _read_json(paths["config"])
        if paths["progress"].is_file() and paths["scores"].is_file():
            done = set(_read_json(paths["progress"])["done"])
        finished = len(done) == old.get("n_chunks")
        # a finished array stays valid whatever code or device made it; an unfinished one is continued only by the
        # same code on the same device, so that its chunks are bit-identical to an uninterrupted run's
        ignore = {"code", "device"} if finished else set()
        differ = sorted(k for k in set(config) | set(old) if k not in ignore and config.get(k) != old.get(k))
        if differ:
            raise ValueError(f"{out} holds scores of another configuration (differing: {', '.join(differ)}); "
                             f"pass another out_dir for this one, or remove {out} to recompute")
        if finished:
            return None
    elif any(p.exists() for p in paths.values()):
        raise ValueError(f"{out} holds score files without {CONFIG_FILE} (not written by score_all); pass an empty "
                         f"or new out_dir")
    else:
        _write_json(paths["config"], config)
    if not paths["scores"].is_file():
        done = set()
        atomic_write(paths["order"], lambda tmp: tmp.write_bytes(_npy_bytes(perm)))
        atomic_write(paths["scores"], lambda tmp: _nan_array(tmp, shape, dtype, chunk_size))
        _write_json(paths["progress"], {"done": []})
    elif not np.array_equal(np.load(paths["order"]), perm):
        raise ValueError(f"{paths['order']} differs from this run's chunk order; remove {out} to recompute")
    scores = open_memmap(paths["scores"], mode="r")
    if scores.shape != shape or scores.dtype != np.dtype(dtype):
        raise ValueError(f"{paths['scores']} is {scores.shape} {scores.dtype}, not {shape} {dtype}; remove {out}")
    del scores
    return done


def _npy_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` file bytes of a small array (``numpy.lib.format``)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _nan_array(path: Path, shape: tuple[int, int], dtype: str, rows: int) -> None:
    """Create a ``.npy`` file of ``shape`` filled with NaN, ``rows`` rows at a time (memory independent of n)."""
    array = open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    for start in range(0, shape[0], rows):
        array[start : start + rows] = np.nan
    array.flush()
    del array
