"""The two collectives of the 'global' coupling scope, written for gloo (CPU) and NCCL (CUDA tensors) alike.

Global scope: every rank's pool is gathered, the first rank of the group solves one assignment over the union and
broadcasts the permutation; every rank then takes the noise rows of its own images. Solving on one rank (instead
of all ranks solving the same problem) guarantees that all ranks use the same permutation even if their cost
matrices differed in the last bit, so the union of the noise each rank uses is exactly the gathered noise.
Both collectives are called from the main thread at fixed points of the stream, never from the worker thread, so
they are ordered identically on every rank and cannot interleave with DDP's own collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_rank_and_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_rows(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``t`` [n, ...] from every rank in rank order -> [world * n, ...] (same shape on every rank)."""
    _, world = group_rank_and_size(group)
    if world == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts)


def broadcast_from_first(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``t`` as held by the group's first rank, on every rank (in place on a contiguous copy)."""
    _, world = group_rank_and_size(group)
    if world == 1:
        return t
    t = t.contiguous()
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(t, src=src, group=group)
    return t
