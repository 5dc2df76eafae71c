"""Profiling on several processes (GPUs or machines) with torch.distributed: each rank traces a contiguous
shard of the windows, then the statistics are merged exactly across ranks (:meth:`Tracer.all_reduce_`).

Launch with torchrun, e.g. ``torchrun --nproc-per-node 2 $(which outlierlab) profile --device cuda``; every
rank builds the same windows (same seed), traces its shard, and rank 0 writes the report.
"""

from __future__ import annotations

import os

import torch

from ..errors import OutlierlabError


def rank_world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialized."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """The windows [lo, hi) of ``rank``: contiguous, sizes differing by at most one, in rank order."""
    if n < world:
        raise OutlierlabError(f"{n} windows cannot be shared among {world} ranks: use at least one per rank")
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def init_from_env(device: str) -> tuple[int, int, str]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment), if any.

    Returns (rank, world size, device): with ``cuda`` each rank takes the GPU of its LOCAL_RANK. NCCL on
    CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def finish() -> None:
    """Leave the process group (no-op when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
