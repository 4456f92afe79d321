"""Benchmark of the AOT coupling: cost matrix, assignment solvers, and the training-step overhead of pools.

    python benchmarks/coupling.py [--quick] [--out table.md] [--step-ms 20] [--budget-s 20]

For pool sizes B in 128..2048 (4096 unless --quick) and data dimensions D in {2, 192, 3072}:
- cost ms: ``torch.cdist`` float32 on the CPU plus the float64 copy the solvers need;
- solve ms per backend (scipy, lapjv, pot when installed); a cell is skipped when its time, extrapolated as n^3
  from the previous size, exceeds --budget-s; 'auto' shows which backend the library would pick;
- step overhead: extra ms per training step of a PairedBatchStream (pool B, batch 64, auto backend) around a
  simulated training step of --step-ms, with the solve inline ("AOT") or in the background ("AOT + worker"),
  next to the baseline of independent coupling (drawing data and noise, timer overshoot). The simulated step
  sleeps, like a GPU step during which the CPU waits on the device. The worker hides the solve when
  cost + solve < (B / 64 - 1) x step.

Data: D = 2 is 8 Gaussians (std 0.1, radius 2) against N(0, I) noise: clustered low-dimensional costs, the hard
case for augmenting-path solvers. D = 192 / 3072 are "image-like" vectors: 10 class centres uniform in [-1, 1]^D
plus N(0, 0.25^2) per pixel, clipped to [-1, 1], against N(0, I) noise.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from aotdiff.coupling import (
    HungarianCoupling,
    IndependentCoupling,
    PairedBatchStream,
    TensorSource,
    available_backends,
    choose_backend,
    cost_matrix,
    solve_assignment,
)

DIMS = (2, 192, 3072)
BATCH = 64


def make_data(n: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """n points of the benchmark data set of dimension ``dim`` (see the module docstring)."""
    if dim == 2:
        angle = torch.randint(0, 8, (n,), generator=g).float() * (2 * math.pi / 8)
        return 2.0 * torch.stack([angle.cos(), angle.sin()], 1) + 0.1 * torch.randn(n, 2, generator=g)
    centres = torch.rand(10, dim, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (n,), generator=g)
    return (centres[labels] + 0.25 * torch.randn(n, dim, generator=g)).clamp(-1, 1)


def timed(fn, max_repeats: int = 3, min_total_s: float = 0.3) -> float:
    """Best wall time of ``fn`` in ms over up to ``max_repeats`` calls (stops early once ``min_total_s`` spent)."""
    best, spent = math.inf, 0.0
    for _ in range(max_repeats):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent >= min_total_s:
            break
    return 1e3 * best


def step_overhead_ms(dim: int, pool: int, worker: bool, step_ms: float, aot: bool = True, seed: int = 0) -> float:
    """Extra wall ms per simulated training step caused by the stream (first pool excluded).

    ``aot=False`` is the baseline every run pays (drawing data and noise, sleep overshoot): independent coupling.
    """
    g = torch.Generator().manual_seed(seed)
    source = TensorSource(make_data(2 * pool, dim, g), seed=seed)
    coupler = HungarianCoupling() if aot else IndependentCoupling()
    with PairedBatchStream(source, coupler, BATCH, pool if aot else None, worker=worker) as stream:
        steps = pool // BATCH
        for _ in range(steps):  # first pool: nothing to overlap with yet
            stream.next()
            time.sleep(step_ms / 1e3)
        n = 2 * steps
        t0 = time.perf_counter()
        for _ in range(n):
            stream.next()
            time.sleep(step_ms / 1e3)
        elapsed_ms = 1e3 * (time.perf_counter() - t0)
    return max(0.0, elapsed_ms / n - step_ms)


def fmt_ms(ms: float) -> str:
    return f"{ms:,.1f}" if ms < 100 else f"{ms:,.0f}"


def run(sizes: list[int], dims: tuple[int, ...], budget_s: float, step_ms: float) -> list[str]:
    backends = available_backends()
    for b in backends:  # warm-up: first calls pay for imports and lazy initialisation
        solve_assignment(np.random.default_rng(0).random((16, 16)), b)
    header = ["D", "B", "cost ms", *[f"{b} ms" for b in backends], "auto"]
    header += ["+ms/step independent", "+ms/step AOT", "+ms/step AOT + worker"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dim in dims:
        last: dict[str, tuple[int, float]] = {}
        for n in sizes:
            g = torch.Generator().manual_seed(n + dim)
            x, z = make_data(n, dim, g), torch.randn(n, dim, generator=g)
            cost_ms = timed(lambda x=x, z=z: cost_matrix(x, z).double().numpy())
            c = cost_matrix(x, z).double().numpy()
            cells = []
            for b in backends:
                prev = last.get(b)
                predicted_s = None if prev is None else prev[1] / 1e3 * (n / prev[0]) ** 3
                if predicted_s is not None and predicted_s > budget_s:
                    cells.append(f"skip (~{predicted_s:,.0f} s)")
                    last[b] = (n, predicted_s * 1e3)
                    continue
                ms = timed(lambda b=b, c=c: solve_assignment(c, b), max_repeats=3 if n <= 1024 else 1)
                last[b] = (n, ms)
                cells.append(fmt_ms(ms))
            auto = choose_backend(n, dim)
            baseline = step_overhead_ms(dim, n, worker=False, step_ms=step_ms, aot=False)
            no_worker = step_overhead_ms(dim, n, worker=False, step_ms=step_ms)
            with_worker = step_overhead_ms(dim, n, worker=True, step_ms=step_ms)
            row = [
                str(dim),
                str(n),
                fmt_ms(cost_ms),
                *cells,
                auto,
                fmt_ms(baseline),
                fmt_ms(no_worker),
                fmt_ms(with_worker),
            ]
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, numpy {np.__version__}, Python {sys.version.split()[0]}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="pool sizes up to 2048 only")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--budget-s", type=float, default=20.0, help="skip a solve predicted to take longer (s)")
    p.add_argument("--step-ms", type=float, default=50.0, help="duration of the simulated training step (ms)")
    p.add_argument("--threads", type=int, help="torch CPU threads for the cost matrix (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [128, 256, 512, 1024, 2048] + ([] if args.quick else [4096])
    title = (
        f"Coupling benchmark, {datetime.date.today().isoformat()}, {machine()}; "
        f"{torch.get_num_threads()} torch threads; batch {BATCH}, simulated step {args.step_ms:g} ms, "
        f"skip budget {args.budget_s:g} s"
    )
    print(title, flush=True)
    lines = run(sizes, DIMS, args.budget_s, args.step_ms)
    if args.out:
        with open(args.out, "w") as f:
            f.write(title + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
