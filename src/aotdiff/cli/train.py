"""`aotdiff train`: every field of TrainConfig is a flag; rerunning the same command resumes."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from aotdiff.train.config import PRESET_HELP, PRESETS, TrainConfig, preset_config

_TYPES = typing.get_type_hints(TrainConfig)


def _int_list(text: str) -> list[int]:
    text = text.strip()
    if text in ("", "none", "[]"):
        return []
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,2,2, got '{text}'") from None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; the help shows the unit and the digits preset's value as an example."""
    base = preset_config("digits")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        typ = _TYPES[f.name]
        unit = f.metadata.get("unit")
        example = getattr(base, f.name)
        shown = ",".join(map(str, example)) if isinstance(example, list) else example
        help_text = f"{f.metadata['help']}{f' [{unit}]' if unit else ''} (digits preset: {shown})"
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif typ == list[int]:
            parser.add_argument(flag, type=_int_list, metavar="N,N,..", help=help_text)
        else:
            parser.add_argument(flag, type=typ, metavar=f.name.split("_")[-1].upper(), help=help_text)


def register(sub: Any) -> None:
    presets = "\n".join(f"  {name:20s} {PRESET_HELP.get(name, '')}" for name in PRESETS)
    p = sub.add_parser(
        "train",
        help="train a diffusion model (rerun the same command to resume)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        description=(
            "Train an EDM diffusion model, with independent or AOT (optimal-transport) noise coupling.\n"
            "Time is counted in images (kimg). Rerunning the same command resumes from the newest checkpoint;\n"
            "Ctrl-C or SIGTERM saves a checkpoint and exits. Under torchrun, every process trains its share.\n\n"
            f"Presets:\n{presets}\n\nAny preset value can be overridden with the flags below."
        ),
        epilog="Examples:\n  aotdiff train --out runs/digits\n  aotdiff train --preset digits --coupling aot "
        "--out runs/digits-aot\n  aotdiff train --preset toy2d --data toy:moons --out runs/moons\n"
        "  torchrun --nproc_per_node=4 -m aotdiff train --preset cifar10-uncond --data cifar10-32x32.zip --out runs/c10",
    )
    p.add_argument("--preset", default="digits", choices=list(PRESETS), help="named preset (default: digits)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/PRESET)")
    p.add_argument("--dry-run", action="store_true", default=False, help="print the resolved config and exit")
    p.add_argument("--force", action="store_true", default=False, help="resume even if the config changed")
    p.add_argument("--no-progress", action="store_true", default=False, help="no progress bar (logs still written)")
    add_config_flags(p)
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset"}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return preset_config(args.preset, **overrides)


def run(args: argparse.Namespace) -> int:
    from aotdiff.train.config import validate
    from aotdiff.train.loop import describe, train

    cfg = config_from_args(args)
    validate(cfg)
    if args.out is None:
        args.out = Path("runs") / args.preset
    if args.dry_run:
        text, _ = describe(cfg)
        print(f"run directory: {args.out}\n{text}")
        return 0
    result = train(cfg, args.out, force=args.force, progress=not args.no_progress)
    where = f"{result.nimg / 1000:.1f} kimg"
    if result.interrupted:
        print(f"stopped at {where}; rerun the same command to resume", file=sys.stderr)
    else:
        print(f"done: {where}; sample with `aotdiff sample {args.out} --grid grid.png`", file=sys.stderr)
    return 0
