"""`aotdiff bench train|sample`: throughput numbers for a preset on this machine (synthetic data)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from aotdiff.train.config import PRESETS, preset_config


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure training / sampling speed of a preset (synthetic data)",
        description="Speed of a preset on this machine, with synthetic data of the preset's shape (no dataset "
        "needed). For the AOT coupling's cost see benchmarks/coupling.py.",
        epilog="Example: aotdiff bench train --preset edm-cifar10-uncond --batch 512 --precision tf32",
    )
    p.add_argument("what", choices=("train", "sample"), help="what to time")
    p.add_argument("--preset", default="digits", choices=list(PRESETS), help="preset (default: digits)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: the preset's batch)")
    p.add_argument("--batch-gpu", type=int, default=None, help="images per pass (accumulation); default = batch")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default=None, help="default: the preset's")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--steps", type=int, default=10, help="timed steps after 3 warm-up steps (default: 10)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (default: auto)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table row")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from aotdiff.bench import TABLE_HEADER, as_dict, sample_speed, train_speed
    from aotdiff.train.distributed import pick_device

    overrides = dict(batch=args.batch, batch_gpu=args.batch_gpu, precision=args.precision, compile=args.compile or None)
    cfg = preset_config(
        args.preset, **overrides, **({"data": "synthetic"} if not PRESETS[args.preset].get("data") else {})
    )
    device = pick_device(args.device)
    if args.what == "train":
        r = train_speed(cfg, device, steps=args.steps)
        print(json.dumps(as_dict(r)) if args.json else f"{TABLE_HEADER}\n{r.row()}")
    else:
        print(json.dumps(sample_speed(cfg, device, batch=args.batch or 64)))
    return 0
