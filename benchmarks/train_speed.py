"""Training throughput (img/s) of presets on this machine, as a markdown table.

    python benchmarks/train_speed.py                       # digits + toy2d on the CPU
    python benchmarks/train_speed.py --preset edm-cifar10-uncond --batch 512 --precision fp32 tf32

Synthetic data of each preset's shape; 3 warm-up steps then --steps timed steps. Compare numbers only within one run.
"""

from __future__ import annotations

import argparse

from aotdiff.bench import TABLE_HEADER, train_speed
from aotdiff.train.config import PRESETS, preset_config
from aotdiff.train.distributed import pick_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["digits", "toy2d"], choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "tf32", "bf16"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    print(TABLE_HEADER)
    for name in args.preset:
        for precision in args.precision:
            cfg = preset_config(name, batch=args.batch, precision=precision, data="synthetic")
            print(train_speed(cfg, device, steps=args.steps).row(), flush=True)


if __name__ == "__main__":
    main()
