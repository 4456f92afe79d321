"""AOT under DDP with the per-rank pool scope (`--aot-scope rank`, the paper's setting), on two gloo processes.

Each rank draws its pools from its own global units (``train.randomness.global_unit``) and solves them alone. With
pools that last one step (``--aot-pool`` = the per-device batch), one process with accumulation 2 draws unit 2s on
round 0 and unit 2s + 1 on round 1 of step s: exactly the pools of ranks 0 and 1, paired by the same assignments, with
noise levels from the same units. The two runs must therefore give the same losses up to round-off.

(The global scope's equivalence with one process holding the union of the pools is tested on the pool stream itself,
in test_coupling_ddp.py; independent coupling under DDP in test_train.py.)
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aotdiff.train.config import TrainConfig, preset_config
from aotdiff.train.loop import train

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

# The tiny digits settings of the CLI tests: a 16-channel SongUNet, one block per level, 4 optimizer steps of 32.
TINY_DIGITS = dict(
    model_channels=16, num_blocks=1, batch=32, duration_kimg=0.128, tick_kimg=0.128, snapshot_kimg=0.128,
    lr_rampup_kimg=0.1, ema_halflife_kimg=0.1, grid_seeds=4, grid_steps=2, device="cpu", coupling="aot",
    aot_scope="rank", aot_pool=16, aot_backend="scipy", aot_prefetch=False,
)  # fmt: skip


def tiny_aot(**overrides: object) -> TrainConfig:
    return preset_config("digits", **{**TINY_DIGITS, **overrides})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict, run_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    result = train(TrainConfig.from_dict(cfg_dict), run_dir, progress=False, log=lambda s: None)
    torch.save(torch.tensor(result.losses, dtype=torch.float64), f"{out}.{rank}")


def two_processes(cfg: TrainConfig, tmp_path: Path, timeout_s: float = 240.0) -> torch.Tensor:
    """Losses of ``cfg`` trained by 2 gloo processes (the same on both ranks: they are all-reduced)."""
    args = (2, _free_port(), cfg.to_dict(), str(tmp_path / "ddp"), str(tmp_path / "loss"))
    context = mp.spawn(_worker, args=args, nprocs=2, join=False)  # spawn: forking a threaded xdist worker can hang
    deadline = time.monotonic() + timeout_s  # a collective that never completes fails this test, not the suite
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.terminate()
            pytest.fail(f"the 2 gloo training processes did not finish within {timeout_s:g} s")
    losses = torch.load(tmp_path / "loss.0", weights_only=True)
    torch.testing.assert_close(losses, torch.load(tmp_path / "loss.1", weights_only=True))
    return losses


def test_rank_scope_aot_on_two_processes_matches_one_process_with_accumulation(tmp_path):
    """2 ranks x (pool 16, batch 16) = 1 process x 2 accumulation rounds of (pool 16, batch 16)."""
    ddp = two_processes(tiny_aot(), tmp_path)
    single = train(tiny_aot(batch_gpu=16), tmp_path / "single", progress=False, log=lambda s: None).losses
    assert len(single) == len(ddp) == 4
    np.testing.assert_allclose(ddp.numpy(), single, rtol=1e-5)
    # AOT did pair: the same run with independent noise gives other losses (so the comparison above has teeth)
    independent = train(tiny_aot(coupling="independent", batch_gpu=16), tmp_path / "ind", progress=False,
                        log=lambda s: None)  # fmt: skip
    assert not np.allclose(independent.losses, single, rtol=1e-3)


def test_one_device_emulating_two_pools_matches_two_processes(tmp_path):
    """2 ranks x one pool of 32 lasting 2 steps = 1 process with --aot-pools 2 (two pools of 32, 16 rows each a step):
    the same images, the same pairings and the same noise levels (keyed per virtual rank), so the same losses."""
    ddp = two_processes(tiny_aot(aot_pool=32), tmp_path)
    single = train(tiny_aot(aot_pool=32, aot_pools=2), tmp_path / "single", progress=False, log=lambda s: None)
    np.testing.assert_allclose(ddp.numpy(), single.losses, rtol=1e-5)
