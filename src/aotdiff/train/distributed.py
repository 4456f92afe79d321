"""Process-group helpers: the same entry point runs alone or under ``torchrun --nproc_per_node=K``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them we run as a single process and
never touch torch.distributed. NCCL is used on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_pref: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun, and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local), device


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device that exists here; anything else is a one-line ValueError.

    Checked before any work starts, so `--device tpu` or `--device cuda` on a CPU-only machine fails at once with the
    choices instead of a torch traceback (or an hour of CPU sampling that was meant for a GPU).
    """
    choices = "choose auto, cpu, cuda or cuda:N"
    m = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", str(pref).strip().lower(), flags=re.ASCII)
    if m is None:
        raise ValueError(f"--device {pref}: unknown device; {choices}")
    name = m.group(0)
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {pref}: CUDA is not available on this machine; use --device cpu (or auto)")
    index = int(m.group(1)) if m.group(1) is not None else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"--device {pref}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def any_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (used to agree on stopping)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
