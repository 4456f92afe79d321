"""Every GPU measurement of issue 11 in one run, written to one JSON file (and printed as it goes).

    python benchmarks/gpu_perf.py --out gpu_perf.json                 # on the lent GPU (about 8 minutes)
    python benchmarks/gpu_perf.py --out smoke.json --smoke --device cpu   # the script itself, tiny, on a CPU
    python benchmarks/gpu_perf.py --out s.json --only sample,frechet      # only the items whose name contains these

Measured, each in its own try block (one failure does not lose the others; the JSON is rewritten after each item):

1. checks: the training step makes no host synchronisation (``torch.cuda.set_sync_debug_mode('error')``), the
   GPU-resident dataset draws what the host path draws, bf16 losses stay within a few per cent of fp32;
2. training img/s of aotdiff's trainer and of a bare loop (``aotdiff.bench.train_speed``) for DDPM++ and NCSN++ at
   batch 512: fp32 (TF32 off, EDM's numerics), tf32, bf16, bf16 + torch.compile, and with the AOT coupling on at
   P = 512 (unconditional) and class-wise P = 2048 (conditional) against independent noise;
3. sampling img/s, Heun 35 NFE, batch 1024, fp32 / bf16 / bf16 + compile;
4. the Frechet distance of two 2048-dimensional Gaussians (the FID's last step), on the CPU.

Numbers are only comparable within one run on one machine; the JSON records the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aotdiff.bench import as_dict, item_shape, sample_speed, synthetic_dataset, train_speed
from aotdiff.train.config import preset_config
from aotdiff.train.distributed import pick_device


class Report:
    def __init__(self, path: Path, budget_s: float, only: list[str] | None = None) -> None:
        self.path, self.t0, self.budget_s, self.only = path, time.perf_counter(), budget_s, only
        self.data: dict[str, Any] = {
            "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "cpu": platform.processor(),
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "results": {}, "errors": {}, "skipped": [],
        }  # fmt: skip

    def time_left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def run(self, name: str, fn: Any, *args: Any, min_left_s: float = 30.0, **kw: Any) -> None:
        if self.only is not None and not any(pattern in name for pattern in self.only):
            return
        if self.time_left() < min_left_s:
            self.data["skipped"].append(name)
            print(f"[skip] {name}: {self.time_left():.0f} s left", flush=True)
            return
        t = time.perf_counter()
        try:
            value = fn(*args, **kw)
            self.data["results"][name] = value
            print(f"[ok] {name} ({time.perf_counter() - t:.1f} s): {json.dumps(value)[:400]}", flush=True)
        except Exception as e:  # noqa: BLE001 - a benchmark script records every failure and goes on
            self.data["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
            print(f"[error] {name}: {type(e).__name__}: {e}", flush=True)
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.path.write_text(json.dumps(self.data, indent=2))


# ------------------------------------------------------------------------------------------------ checks
def check_no_host_sync(device: torch.device, preset: str, batch: int, **overrides: Any) -> dict[str, Any]:
    """Trainer steps under CUDA's sync debug mode 'error': any host synchronisation in a step raises."""
    import tempfile

    from aotdiff.train.loop import Trainer

    cfg = preset_config(preset, batch=batch, coupling="independent", precision="bf16", device=str(device),
                        tick_kimg=1e9, snapshot_kimg=1e9, grid_seeds=0, data="synthetic", **overrides)  # fmt: skip
    data = synthetic_dataset(item_shape(cfg), 10)
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(cfg, tmp, dataset=data, progress=False, log=lambda s: None)
        try:
            for _ in range(3):  # warm-up (cuDNN autotuning may synchronise)
                t.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(5):
                    t.step()
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
            losses = t._flush_losses()
        finally:
            t.close()
    return {"steps_without_sync": 5, "losses": losses}


def check_resident_data(device: torch.device) -> dict[str, Any]:
    """The GPU-resident dataset gathers exactly what the host path gathers."""
    from aotdiff.train.loop import TrainingSource

    data = synthetic_dataset((3, 32, 32), 10, size=1000)
    kw = dict(seed=3, rank=0, world_size=1, accum=1, use_labels=True, augment=None)
    gpu = TrainingSource(data, device=device, **kw)  # type: ignore[arg-type]
    host = TrainingSource(data, device=torch.device("cpu"), **kw)  # type: ignore[arg-type]
    a, b = gpu.draw(256), host.draw(256)
    same = torch.equal(a.images.cpu(), b.images) and torch.equal(a.labels.cpu(), b.labels)  # type: ignore[union-attr]
    return {"resident": gpu.resident is not None, "identical_images_and_labels": bool(same)}


def check_bf16_losses(device: torch.device, preset: str, steps: int, **overrides: Any) -> dict[str, Any]:
    """Per-step losses of the same short run in fp32 and bf16 (same data, noise, sigma)."""
    import tempfile

    from aotdiff.train.loop import Trainer

    out: dict[str, list[float]] = {}
    data = synthetic_dataset(item_shape(preset_config(preset)), 10)
    for precision in ("fp32", "bf16"):
        cfg = preset_config(preset, batch=64, coupling="independent", precision=precision, device=str(device),
                            tick_kimg=1e9, snapshot_kimg=1e9, grid_seeds=0, data="synthetic", **overrides)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            t = Trainer(cfg, tmp, dataset=data, progress=False, log=lambda s: None)
            try:
                for _ in range(steps):
                    t.step()
                out[precision] = t._flush_losses()
            finally:
                t.close()
    rel = [abs(a - b) / abs(a) for a, b in zip(out["fp32"], out["bf16"], strict=True)]
    return {**out, "max_rel_diff": max(rel)}


# ------------------------------------------------------------------------------------------------ speed
def training(device: torch.device, preset: str, batch: int, iters: int, **overrides: Any) -> dict[str, Any]:
    cfg = preset_config(preset, batch=batch, data="synthetic", **overrides)
    return as_dict(train_speed(cfg, device, steps=iters, rounds=2, warmup=3))


def sampling(
    device: torch.device, preset: str, batch: int, steps: int, small: dict[str, Any], **kw: Any
) -> dict[str, Any]:
    cfg = preset_config(preset, data="synthetic", **small)
    return sample_speed(cfg, device, batch=batch, num_steps=steps, **kw)


def frechet(dim: int) -> dict[str, Any]:
    from aotdiff.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((dim, 3 * dim)), rng.standard_normal((dim, 3 * dim))
    s1, s2 = a @ a.T / (3 * dim), b @ b.T / (3 * dim)
    t = time.perf_counter()
    value = frechet_distance(np.zeros(dim), s1, np.ones(dim) * 0.01, s2)
    return {"dim": dim, "seconds": time.perf_counter() - t, "value": float(value)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_perf.json")
    p.add_argument("--device", default="auto")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting new items after this long")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to test the script on a CPU")
    p.add_argument("--only", default="", help="run only the items whose name contains one of these comma-separated "
                   "strings (e.g. 'sample,frechet'); default: every item")  # fmt: skip
    args = p.parse_args()
    device = pick_device(args.device)
    only = [s for s in args.only.split(",") if s] or None
    rep = Report(Path(args.out), args.budget_s, only)
    rep.data["device"] = str(device)
    smoke = args.smoke
    batch, iters, sample_batch = (8, 1, 4) if smoke else (512, 10, 1024)
    small = dict(model_channels=16, num_blocks=1) if smoke else {}

    rep.run("check_resident_data", check_resident_data, device)
    rep.run("check_no_host_sync", check_no_host_sync, device, "cifar10-uncond", 8 if smoke else 128, **small)
    rep.run("check_bf16_losses", check_bf16_losses, device, "cifar10-uncond", 2 if smoke else 5, **small)
    rep.run("frechet_2048", frechet, 64 if smoke else 2048)
    # Training: the headline comparisons first, so a short budget still answers the main questions.
    for arch in ("ddpmpp", "ncsnpp"):
        for precision in ("bf16", "fp32", "tf32"):
            rep.run(f"train_{arch}_{precision}_independent", training, device, "cifar10-uncond", batch, iters,
                    arch=arch, precision=precision, coupling="independent", **small)  # fmt: skip
        rep.run(f"train_{arch}_bf16_aot512", training, device, "cifar10-uncond", batch, iters, arch=arch,
                precision="bf16", coupling="aot", aot_pool=512, aot_pools=1, **small)  # fmt: skip
    rep.run("train_ncsnpp_bf16_cond_independent", training, device, "cifar10-cond", batch, iters,
            precision="bf16", coupling="independent", **small)  # fmt: skip
    rep.run("train_ncsnpp_bf16_cond_aot2048_classwise", training, device, "cifar10-cond", batch, iters,
            precision="bf16", coupling="aot", aot_pool=2048, aot_pools=1, **small)  # fmt: skip
    for precision, compile_ in (("fp32", False), ("bf16", False), ("bf16", True)):
        name = f"sample_heun35_{precision}" + ("_compile" if compile_ else "")
        rep.run(name, sampling, device, "cifar10-uncond", sample_batch, 2 if smoke else 18, small, precision=precision,
                compile=compile_)  # fmt: skip
    for arch in ("ddpmpp", "ncsnpp"):
        rep.run(f"train_{arch}_bf16_compile_independent", training, device, "cifar10-uncond", batch, iters,
                arch=arch, precision="bf16", coupling="independent", compile=True, min_left_s=120, **small)  # fmt: skip
    print(f"wrote {args.out}: {len(rep.data['results'])} results, {len(rep.data['errors'])} errors, "
          f"{len(rep.data['skipped'])} skipped")  # fmt: skip


if __name__ == "__main__":
    main()
