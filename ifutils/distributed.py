"""Several processes sharing one computation through :mod:`torch.distributed`, launched by ``torchrun``.

The curvature fits (:func:`ifutils.curvature.network_kfac.fit_network_kfac`, ``diagonal_fisher``) and the scoring
of every training sentence (:func:`ifutils.scoring.score_all`) are sums or rows over independent chunks of
sentences. Under a process group each rank takes a slice of the chunks (:func:`shard`); the fits add their per-rank
sums (:func:`all_reduce_sum`), the scoring gathers its rows to rank 0, which alone writes the files
(:func:`gather_rows`). Launch a script that calls :func:`init` first, e.g.::

    torchrun --standalone --nproc_per_node=2 experiments/distributed_check.py --out runs/dist

On CPU the backend is gloo; on CUDA it is NCCL, one GPU per local rank (``cuda:LOCAL_RANK``). Without
``torchrun`` (no ``RANK``/``WORLD_SIZE`` in the environment) :func:`init` sets nothing up, and every helper here
acts as the identity of a single process (rank 0 of 1), so the same code runs alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "SHARD_MODES",
    "Context",
    "active",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "finalize",
    "gather_rows",
    "init",
    "is_main",
    "process_world",
    "rank",
    "shard",
    "world_size",
]

SHARD_MODES = ("strided", "contiguous")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world`` processes, ``local_rank`` on its node, the ``backend``
    (``"gloo"``, ``"nccl"`` or None for a single process without a group) and the ``device`` to compute on."""

    rank: int
    world: int
    local_rank: int
    backend: str | None
    device: torch.device


def active() -> bool:
    """True when a :mod:`torch.distributed` process group is initialised (by :func:`init` or the caller)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the group, 0 without one."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes in the group, 1 without one."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return rank() == 0


def process_world(distributed: bool | None) -> tuple[int, int]:
    """(rank, world) a sharded computation runs over: the process group's with ``distributed`` None (when one is
    initialised) or True, (0, 1) with False.

    Raises:
        ValueError: ``distributed=True`` without an initialised process group.
    """
    if distributed is None:
        distributed = active()
    if distributed and not active():
        raise ValueError("distributed=True needs a process group: launch with torchrun and call "
                         "ifutils.distributed.init() first, or pass distributed=None/False")
    return (rank(), world_size()) if distributed else (0, 1)


def init(device: str | torch.device | None = None, backend: str | None = None) -> Context:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or stay a single process when they are absent.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (default: CUDA when available, else CPU). With CUDA each process uses
            ``cuda:LOCAL_RANK`` (made the current device), so run at most as many processes per node as GPUs.
        backend: default gloo on CPU, NCCL on CUDA; pass ``"gloo"`` to keep CUDA tensors but move every
            collective through the CPU.
    Returns:
        :class:`Context`. Called again once the group exists, it returns the same context without a new group.
    Raises:
        ValueError: an incomplete torchrun environment (some of ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` only), an
            unknown device or backend, NCCL on CPU, or a ``LOCAL_RANK`` without a GPU of that number.
        RuntimeError: :mod:`torch.distributed` is not built into this torch.
    """
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"backend must be None (gloo on CPU, nccl on CUDA), 'gloo' or 'nccl', got {backend!r}")
    present = [k for k in _ENV if k in os.environ]
    if not present and not active():
        return Context(0, 1, 0, None, torch.device("cuda" if kind == "cuda" else "cpu"))
    if present and len(present) != len(_ENV):
        raise ValueError(f"the environment sets {present} but not all of {list(_ENV)}; launch with torchrun, or "
                         f"unset them for a single process")
    if not dist.is_available():
        raise RuntimeError("this torch has no torch.distributed; run a single process (no torchrun)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if kind == "cuda" else "gloo")
    if backend == "nccl" and kind != "cuda":
        raise ValueError("the NCCL backend needs CUDA tensors; pass device='cuda' or backend='gloo'")
    if kind == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} has no GPU (only {torch.cuda.device_count()}); start at most that "
                             f"many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local)
        where = torch.device("cuda", local)
    else:
        where = torch.device("cpu")
    if not active():
        dist.init_process_group(backend=backend, device_id=where if backend == "nccl" else None)
    return Context(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), where)


def finalize() -> None:
    """Leave the process group (a no-op without one); call at the end of a torchrun script."""
    if active():
        dist.destroy_process_group()


def shard(indices: Sequence, rank: int, world: int, mode: str = "strided") -> list:
    """This rank's part of ``indices``: over ranks 0..world-1 every element is taken exactly once.

    Args:
        indices: any sequence (chunk numbers, sentence ids); its order is kept within a part.
        rank: 0 <= rank < world. world: number of parts (>= 1).
        mode: ``"strided"`` (``indices[rank::world]``, balances length-sorted chunks) or ``"contiguous"`` (the
            rank-th of ``world`` consecutive blocks, sizes differing by at most one, the larger ones first).
    Returns:
        list, possibly empty (more ranks than indices).
    Raises:
        ValueError: ``world < 1``, ``rank`` outside ``[0, world)``, or an unknown ``mode``.
    """
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}), got {rank!r}")
    if mode not in SHARD_MODES:
        raise ValueError(f"mode must be one of {SHARD_MODES}, got {mode!r}")
    items = list(indices)
    if mode == "strided":
        return items[rank::world]
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return items[start : start + base + (rank < extra)]


def _comm_device() -> torch.device:
    """Where the backend's collectives want their tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> dict[str, torch.Tensor] | list[torch.Tensor]:
    """Sum over ranks of each tensor (the same result, bit for bit, on every rank).

    Args:
        tensors: a list of tensors (same shapes and dtypes, same order on every rank), or a dict {key: tensor}
            whose keys may differ between ranks (a rank without chunks has none): the union of the keys is summed,
            a key missing on a rank counting as zeros of the shape and dtype another rank gives it.
    Returns:
        the same container type, with new tensors on each input's device (a missing key: the first input's
        device, else the backend's). The summation order over ranks is the backend's, so a sum over world > 1
        ranks equals a single process's sequential sum only up to rounding (relative 1e-16 in float64).
    Raises:
        ValueError: ranks disagree on a key's shape or dtype.
    """
    if not active() or world_size() == 1:
        return dict(tensors) if isinstance(tensors, dict) else list(tensors)
    comm = _comm_device()
    if isinstance(tensors, dict):
        layouts = [None] * world_size()
        dist.all_gather_object(layouts, {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()})
        union: dict[str, tuple] = {}
        for layout in layouts:
            for k, spec in layout.items():
                if union.setdefault(k, spec) != spec:
                    raise ValueError(f"ranks disagree on {k!r}: {union[k]} and {spec}")
        home = next(iter(tensors.values())).device if tensors else comm
        out = {}
        for k in sorted(union):
            shape, dtype = union[k]
            value = tensors.get(k)
            if value is None:
                value = torch.zeros(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=home)
            out[k] = _reduce(value, comm)
        return out
    return [_reduce(t, comm) for t in tensors]


def _reduce(t: torch.Tensor, comm: torch.device) -> torch.Tensor:
    buffer = t.detach().to(comm, copy=True).contiguous()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(t.device)


def gather_rows(rows: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``rows`` (b_r, *shape), on every rank, in rank order; b_r may differ (0 included).

    Args:
        rows: a tensor whose trailing shape and dtype agree over ranks.
    Returns:
        list of ``world`` tensors on ``rows``' device, exact copies (no arithmetic).
    Raises:
        ValueError: ranks disagree on the trailing shape or the dtype.
    """
    if not active() or world_size() == 1:
        return [rows]
    comm = _comm_device()
    specs = [None] * world_size()
    dist.all_gather_object(specs, (len(rows), tuple(rows.shape[1:]), str(rows.dtype)))
    if len({s[1:] for s in specs}) != 1:
        raise ValueError(f"ranks disagree on the rows' trailing shape or dtype: {[s[1:] for s in specs]}")
    most = max(s[0] for s in specs)
    padded = torch.zeros((most,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=comm)
    padded[: len(rows)] = rows.detach().to(comm)
    parts = [torch.empty_like(padded) for _ in specs]
    dist.all_gather(parts, padded)
    return [p[: s[0]].to(rows.device) for p, s in zip(parts, specs)]


def barrier() -> None:
    """Wait until every rank arrives (a no-op without a group)."""
    if active() and world_size() > 1:
        dist.barrier()


def broadcast_object(obj=None, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` is ignored elsewhere); the object itself alone."""
    if not active() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
