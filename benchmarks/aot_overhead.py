"""Training-step overhead of AOT in a real training loop: independent vs AOT with / without the background worker.

    python benchmarks/aot_overhead.py --preset digits --pool 512 --kimg 10

Trains the preset for --kimg (after a 1-kimg warm-up that is not timed) three times in a temporary folder and prints
sec/kimg and the AOT overhead per step. All three runs see the same images (counter-based randomness), so only the
coupling differs. On a CPU the solver thread competes with the training threads for cores; on a GPU it does not.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from aotdiff.train.config import preset_config
from aotdiff.train.loop import train


def timed_run(preset: str, kimg: float, out: Path, **overrides: object) -> dict[str, float]:
    cfg = preset_config(preset, duration_kimg=kimg + 1, tick_kimg=1.0, snapshot_kimg=10_000, grid_seeds=1, **overrides)
    train(cfg, out, progress=False, log=lambda s: None)
    warmup, *lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]  # first tick: warm-up
    steps = lines[-1]["step"] - warmup["step"]
    seconds = lines[-1]["time_s"] - warmup["time_s"]
    out_row = {"sec_per_kimg": seconds / (kimg or 1), "ms_per_step": 1e3 * seconds / max(steps, 1)}
    if "ot_ms" in lines[-1]:
        out_row["ot_ms"] = sum(x.get("ot_ms", 0) for x in lines) / len(lines)
        out_row["ot_wait_ms_per_pool"] = sum(x.get("ot_wait_ms", 0) for x in lines) / len(lines)
        out_row["ot_cost_ratio"] = lines[-1]["ot_cost_ratio"]
    return out_row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits")
    p.add_argument("--pool", type=int, default=512)
    p.add_argument("--kimg", type=float, default=10.0)
    args = p.parse_args()
    variants = {
        "independent": dict(coupling="independent"),
        "aot, no worker": dict(coupling="aot", aot_pool=args.pool, aot_prefetch=False),
        "aot + worker": dict(coupling="aot", aot_pool=args.pool, aot_prefetch=True),
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in variants.items():
            rows[name] = timed_run(args.preset, args.kimg, Path(tmp) / name.replace(" ", "_"), **overrides)
    base = rows["independent"]["ms_per_step"]
    print(f"preset {args.preset}, P = {args.pool}, {args.kimg} kimg timed\n")
    print("| coupling | ms/step | overhead ms/step | overhead % | solve ms/pool | wait ms/pool | cost ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        over = r["ms_per_step"] - base
        print(
            f"| {name} | {r['ms_per_step']:.1f} | {over:+.1f} | {100 * over / base:+.1f}% | "
            f"{r.get('ot_ms', 0):.1f} | {r.get('ot_wait_ms_per_pool', 0):.1f} | {r.get('ot_cost_ratio', 1):.3f} |"
        )


if __name__ == "__main__":
    main()
