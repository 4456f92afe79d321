"""`aotdiff train`: every field of TrainConfig is a flag; rerunning the same command resumes."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any

from aotdiff.cli.common import add_progress_flag, add_run_dir_flags, exit_status
from aotdiff.train.config import AOT_KNOBS, FLAG_NAMES, PRESET_HELP, PRESETS, TrainConfig, preset_config

_TYPES = typing.get_type_hints(TrainConfig)


def _int_list(text: str) -> list[int]:
    text = text.strip()
    if text in ("", "none", "[]"):
        return []
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,2,2, got '{text}'") from None


def preset_in_argv(argv: list[str] | None) -> str:
    """The --preset given on the command line (so --help can show that preset's values), else 'digits'."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(args):
        if a == "--preset" and i + 1 < len(args):
            return args[i + 1] if args[i + 1] in PRESETS else "digits"
        if a.startswith("--preset="):
            name = a.split("=", 1)[1]
            return name if name in PRESETS else "digits"
    return "digits"


def add_config_flags(parser: argparse.ArgumentParser, preset: str = "digits") -> None:
    """One flag per TrainConfig field; the help shows the unit and the value of the chosen preset."""
    base = TrainConfig.from_dict({**PRESETS[preset], "preset": preset})
    # The AOT knobs' help shows what `--coupling aot` resolves them to (the shipped recipe), also for presets whose
    # default coupling is independent (which records them off).
    base_aot = TrainConfig.from_dict({**PRESETS[preset], "preset": preset, "coupling": "aot"})
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        flags = FLAG_NAMES.get(f.name, ("--" + f.name.replace("_", "-"),))
        typ = _TYPES[f.name]
        args = typing.get_args(typ)
        if type(None) in args:  # `X | None` (an AOT knob: None = from the recipe): the flag takes an X
            typ = next(a for a in args if a is not type(None))
        unit = f.metadata.get("unit")
        value = getattr(base_aot if f.name in AOT_KNOBS else base, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, list) else (value if value != "" else "none")
        help_text = f"{f.metadata['help']}{f' [{unit}]' if unit else ''} ({preset} preset: {shown})"
        kw: dict[str, Any] = {"dest": f.name, "help": help_text}
        if typ is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif typ == list[int]:
            parser.add_argument(*flags, type=_int_list, metavar="N,N,..", **kw)
        else:
            parser.add_argument(*flags, type=typ, metavar=f.name.split("_")[-1].upper(), **kw)


def register(sub: Any, argv: list[str] | None = None) -> None:
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
        epilog="Examples:\n  aotdiff train --out runs/digits --kimg 100\n  aotdiff train --preset digits --coupling aot "
        "--out runs/digits-aot\n  aotdiff train --preset toy2d --data toy:moons --out runs/moons\n"
        "  torchrun --nproc_per_node=4 -m aotdiff train --preset cifar10-uncond --data cifar10-32x32.zip --out runs/c10",
    )
    p.add_argument("--preset", default="digits", choices=list(PRESETS), help="named preset (default: digits)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/PRESET)")
    p.add_argument("--dry-run", action="store_true", default=False,
                   help="print the resolved config and the parameter count, then exit (no data needed for a preset "
                   "that knows its data's shape)")  # fmt: skip
    add_run_dir_flags(p)
    add_progress_flag(p)
    add_config_flags(p, preset_in_argv(argv))
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset"}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return preset_config(args.preset, **overrides)


def keep_recorded_aot_knobs(args: argparse.Namespace, cfg: TrainConfig) -> TrainConfig:
    """Rerunning the command of an AOT run continues it with the knobs it was started with, when the shipped recipe
    (what unset knobs resolve to) has changed since: the run goes on training what it trained, not the new recipe.

    Only knobs that nothing on the command line or in the preset sets are taken from ``RUN/config.json``, and only
    when ``--aot-recipe`` is not given; ``--restart`` and ``--force`` (which mean: the new settings) skip this. Knobs
    given as flags are compared with the run as usual (a change is refused).
    """
    from aotdiff.train.config import AOT_PAPER, flag_name
    from aotdiff.train.rundir import RunDirectoryError, read_config

    given = vars(args)  # the parser suppresses unset flags: a name present here was on the command line
    if cfg.coupling != "aot" or cfg.aot_recipe != "shipped" or "aot_recipe" in given:
        return cfg
    if given.get("restart") or given.get("force"):
        return cfg
    try:
        old = read_config(Path(args.out))
    except RunDirectoryError:
        return cfg  # an unreadable config.json is reported by the run itself
    if old is None or old.get("coupling") != "aot" or old.get("aot_recipe", "shipped") != "shipped":
        return cfg
    preset = PRESETS[args.preset]
    unset = [k for k in AOT_KNOBS if given.get(k) is None and k not in preset]
    recorded = {k: old.get(k, AOT_PAPER[k]) for k in unset}  # a config.json older than a knob: the paper's value
    changed = {k: v for k, v in recorded.items() if getattr(cfg, k) != v}
    if not changed:
        return cfg
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        shown = ", ".join(f"{flag_name(k)} {v}" for k, v in changed.items())
        print(f"{args.out}: continuing with the AOT knobs recorded in its config.json ({shown}): the shipped recipe "
              "has changed since the run started. To train the new recipe, use another --out, --restart, or "
              "--force.", file=sys.stderr)  # fmt: skip
    return dataclasses.replace(cfg, **changed)


def run(args: argparse.Namespace) -> int:
    from aotdiff.train.config import validate
    from aotdiff.train.distributed import pick_device
    from aotdiff.train.loop import check_layout, describe, train

    if args.out is None:
        args.out = Path("runs") / args.preset
    cfg = keep_recorded_aot_knobs(args, config_from_args(args))
    validate(cfg, need_data=not args.dry_run)
    # What can be refused without data is refused before the run directory exists (and by --dry-run alike).
    pick_device(cfg.device)
    check_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if args.dry_run:
        text, _ = describe(cfg)
        print(f"run directory: {args.out}\n{text}")
        return 0
    result = train(
        cfg, args.out, force=args.force, restart=args.restart, keep_going=args.keep_going,
        progress=not getattr(args, "no_progress", False),
    )  # fmt: skip
    return exit_status(result, f"sample with `aotdiff sample {args.out} --grid grid.png`")
