"""Counter-based randomness for training: every random draw is a pure function of (seed, purpose, index).

Why: a run must give the same numbers whether it runs on one device or K (DDP), with or without gradient
accumulation, and whether or not it was interrupted and resumed. Instead of advancing one global generator, each unit
of work (a pool draw, an accumulation slice, an epoch's data order) gets its own generator seeded from a hash of the
run seed, the purpose ('data', 'noise', 'augment', 'sigma') and the unit's *global* index. Resuming then only needs the
counters, and a two-process run computes exactly what a one-process run with the same global batch computes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, purpose: str, index: int) -> int:
    """A 63-bit seed from (run seed, purpose, index), well mixed (BLAKE2b) so nearby indices are unrelated."""
    digest = hashlib.blake2b(f"{seed}/{purpose}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_generator(seed: int, purpose: str, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, purpose, index))


def global_unit(local_index: int, rank: int, world_size: int, accum: int) -> int:
    """Global index of a rank's ``local_index``-th unit of work when each step has ``accum`` units per rank.

    Step s, accumulation round a, rank r -> s * (world * accum) + a * world + r. One process with accumulation A*W
    and W processes with accumulation A therefore number their units identically.
    """
    step, round_ = divmod(local_index, accum)
    return step * world_size * accum + round_ * world_size + rank


class EpochOrder:
    """Data order: position p of the infinite stream is item perm_e[p mod N] of epoch e = p // N."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = keyed_generator(self.seed, "data", epoch)
            self._perm = torch.randperm(self.size, generator=g).numpy()
            self._epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        """Dataset indices of stream positions [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        pos = 0
        while pos < count:
            epoch, offset = divmod(start + pos, self.size)
            take = min(count - pos, self.size - offset)
            out[pos : pos + take] = self._permutation(epoch)[offset : offset + take]
            pos += take
        return out
