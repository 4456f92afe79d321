"""How close a preset's training step runs to what the CPU can compute: the bare step's FLOP rate against a large
fp32 matrix product's on the same threads (issue 11, item 5: why the digits step cannot get 1.5x faster by how it
runs).

    python benchmarks/cpu_ceiling.py                      # digits, 1 thread, JSON on stdout
    python benchmarks/cpu_ceiling.py --threads 2 --preset digits --rounds 5

The step is :class:`aotdiff.bench.BareLoop` (forward + backward + Adam of the preset's network and batch, nothing
else), its FLOPs counted by ``torch.utils.flop_counter`` (2 per multiply-add). The ceiling is ``torch.mm`` of two
N x N fp32 matrices (N = 1024 and 2048, the best of them): the throughput of the CPU's BLAS, the best any network
layer can hope for. Both are timed interleaved, ``--rounds`` times, and the best round of each is kept (the least
disturbed by other processes); their ratio is the step's utilisation. Where the convolutions already run at a large
fraction of the matrix product's rate, no change of how the step runs (threads, layouts, compilation) can make it
much faster: only less arithmetic (a smaller network) could, which issue 11 rules out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from aotdiff.bench import BareLoop, item_shape
from aotdiff.train.config import PRESETS, preset_config

# Presets whose item shape is known without data and whose network takes no class labels.
UNCONDITIONAL_WITH_SHAPE = ["digits", "toy2d", "mnist5k", "cifar10-uncond", "edm-cifar10-uncond"]
assert set(UNCONDITIONAL_WITH_SHAPE) <= set(PRESETS)


def matmul_gflop_per_s(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits", choices=UNCONDITIONAL_WITH_SHAPE)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per round (default: 5)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = preset_config(args.preset, precision="fp32")
    shape = (1, 8, 8) if args.preset == "digits" else item_shape(cfg)
    bare = BareLoop(cfg, shape, 0, torch.device("cpu"))
    gflop_per_step = bare.gflop_per_img() * bare.batch * bare.accum
    for _ in range(2):
        bare.step()
    best_step, best_mm = 0.0, 0.0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            bare.step()
        best_step = max(best_step, gflop_per_step * args.steps / (time.perf_counter() - t0))
        best_mm = max(best_mm, matmul_gflop_per_s(1024, 8), matmul_gflop_per_s(2048, 2))
    result = {
        "preset": args.preset,
        "threads": args.threads,
        "batch": cfg.batch,
        "gflop_per_step": gflop_per_step,
        "step_gflop_per_s": best_step,
        "matmul_gflop_per_s": best_mm,
        "utilisation": best_step / best_mm,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
