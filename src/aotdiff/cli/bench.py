"""`aotdiff bench train|sample`: throughput numbers for a preset on this machine (synthetic data)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from aotdiff.cli.common import (
    add_device_flag,
    add_max_batch_flag,
    add_network_flags,
    add_renamed_flag,
    add_steps_flag,
    add_threads_flag,
    check_positive,
)
from aotdiff.train.config import PRESETS, preset_config


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure training / sampling speed of a preset (synthetic data)",
        description="Speed of a preset on this machine, with synthetic data of the preset's shape (no dataset "
        "needed). For the AOT coupling's cost see benchmarks/coupling.py.",
        epilog="Examples:\n  aotdiff bench train --preset edm-cifar10-uncond --batch 512 --precision tf32\n"
        "  aotdiff bench sample --preset edm-cifar10-uncond --steps 18 --max-batch 256",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bsub = p.add_subparsers(dest="bench_command", metavar="{train,sample}", required=True)

    t = bsub.add_parser(
        "train", help="img/s of the trainer and of a bare loop (trainer efficiency)",
        description="Images per second of aotdiff's training step (data, augmentation, noise coupling, loss, backward, "
        "non-finite guard, Adam, EMA) and of a bare loop (the same network, batch and precision: forward + backward + "
        "Adam on fixed tensors, nothing else), interleaved in rounds so load changes touch both alike. "
        "trainer_efficiency = img_per_s / bare_img_per_s. Presets with built-in data (digits, toy2d) train on it, "
        "the others on random data of their shape.",
        epilog="Examples:\n  aotdiff bench train --preset digits --json\n"
        "  aotdiff bench train --preset cifar10-uncond --precision bf16 --compile --json   # on a GPU",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _add_preset_flag(t)
    t.add_argument("--batch", type=int, default=None, help="training batch: images per optimizer step, as in "
                   "`aotdiff train` (default: the preset's)")  # fmt: skip
    t.add_argument("--batch-gpu", type=int, default=None, help="images per pass (accumulation); default = batch")
    t.add_argument(
        "--precision",
        choices=("auto", "fp32", "tf32", "bf16"),
        default=None,
        help="default: the preset's (auto = bf16 on a GPU that supports it, else fp32)",
    )
    t.add_argument("--compile", action="store_true", help="torch.compile the network")
    t.add_argument("--coupling", choices=("independent", "aot"), default=None, help="noise coupling (default: the "
                   "preset's)")  # fmt: skip
    t.add_argument("--aot-pool", type=int, default=None, help="AOT pool size per device (default: the preset's)")
    t.add_argument("--iters", type=int, default=10, help="timed optimizer steps per round, after 3 warm-up steps "
                   "(default: 10)")  # fmt: skip
    t.add_argument("--rounds", type=int, default=3, help="rounds of trainer steps then bare steps (default: 3)")
    add_threads_flag(t)
    add_renamed_flag(t, "--steps", "--iters N (timed optimizer steps)", "--steps means sampler steps")
    add_device_flag(t)
    t.add_argument("--json", action="store_true", help="print JSON instead of a table row")
    t.set_defaults(run=run)

    s = bsub.add_parser("sample", help="img/s of Heun sampling", description="Images per second of Heun sampling "
                        "(2N-1 network evaluations per image) with an untrained network of the preset.")  # fmt: skip
    _add_preset_flag(s)
    add_steps_flag(s)
    add_max_batch_flag(s, default=64)
    add_network_flags(s)
    add_device_flag(s)
    add_threads_flag(s)
    s.add_argument("--json", action="store_true", help="print JSON (the default and only format for sample)")
    s.set_defaults(run=run)


def _add_preset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="digits", choices=list(PRESETS), help="preset (default: digits)")


def run(args: argparse.Namespace) -> int:
    from aotdiff.bench import TABLE_HEADER, as_dict, sample_speed, train_speed
    from aotdiff.cpu import configure_threads
    from aotdiff.train.config import validate
    from aotdiff.train.distributed import pick_device
    from aotdiff.train.loop import load_training_data

    synthetic = {"data": "synthetic"} if not PRESETS[args.preset].get("data") else {}
    if args.bench_command == "train":
        check_positive(args.iters, "--iters")
        check_positive(args.rounds, "--rounds")
        overrides = dict(batch=args.batch, batch_gpu=args.batch_gpu, precision=args.precision,
                         compile=args.compile or None, coupling=args.coupling, aot_pool=args.aot_pool,
                         threads=args.threads)  # fmt: skip
        cfg = preset_config(args.preset, **overrides, **synthetic)
        validate(cfg, need_data=False)
        configure_threads(cfg.threads)
        device = pick_device(args.device)
        dataset = None if synthetic else load_training_data(cfg)
        r = train_speed(cfg, device, steps=args.iters, rounds=args.rounds, dataset=dataset)
        print(json.dumps(as_dict(r)) if args.json else f"{TABLE_HEADER}\n{r.row()}")
    else:
        check_positive(args.steps, "--steps")
        check_positive(args.max_batch, "--max-batch")
        cfg = preset_config(args.preset, **synthetic)
        configure_threads(args.threads)
        device = pick_device(args.device)
        speed = sample_speed(
            cfg, device, batch=args.max_batch, num_steps=args.steps, precision=args.precision, compile=args.compile
        )
        print(json.dumps(speed))
    return 0
