"""`aotdiff dg`: Discriminator Guidance. `dg train` trains a discriminator for a run; `sample --dg` uses it."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

from aotdiff.cli.common import DEVICE_HELP, MAX_BATCH_HELP, add_progress_flag, add_run_dir_flags, exit_status

# Flag names of DGConfig fields that differ from "--field-name".
_FLAGS = {"extractor": "--dg-extractor", "classifier": "--classifier", "guide_sigma_max": "--dg-sigma-max"}
_HELP = {"device": DEVICE_HELP, "max_batch": MAX_BATCH_HELP}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "dg",
        help="Discriminator Guidance: train a discriminator (then sample with --dg)",
        description="Discriminator Guidance (Kim et al. 2023) with AOT-trained discriminators (Kim et al. 2024). "
        "`aotdiff dg train RUN --out DISC` trains a discriminator between RUN's data and RUN's samples; "
        "`aotdiff sample RUN --dg DISC` (also fid calc, sweep, curvature) samples with its guidance.",
        epilog="Examples:\n  aotdiff dg train runs/toy2d --out runs/toy2d-dg --dg-coupling aot\n"
        "  aotdiff sample runs/toy2d --dg runs/toy2d-dg --steps 18 --seeds 0-999 --out guided.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dsub = p.add_subparsers(dest="dg_command", metavar="{train}", required=True)
    t = dsub.add_parser(
        "train",
        help="train a discriminator for a diffusion run (rerun the same command to resume)",
        description="Real items (RUN's dataset, or --data) against the model's samples (generated once into "
        "DISC/fakes.npz, or --fakes FILE.npz), perturbed to noise levels log-uniform in sigma over [1e-3, 152] "
        "(DG's importance sampling), binary cross-entropy. --dg-coupling aot pairs the perturbation noise with the "
        "items by exact optimal transport (class-wise for conditional models). Resumes like `aotdiff train`; "
        "log.jsonl holds loss and accuracy overall and per sigma band.",
        argument_default=argparse.SUPPRESS,
    )
    t.add_argument("base", type=Path, metavar="RUN", help="the trained diffusion model (run, checkpoint, .safetensors)")
    t.add_argument("--out", type=Path, default=None, help="discriminator run directory (default: RUN-dg next to RUN)")
    t.add_argument("--dry-run", action="store_true", default=False, help="print the resolved config and exit")
    add_run_dir_flags(t)
    add_progress_flag(t)
    _add_config_flags(t)
    t.set_defaults(run=run_train)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from aotdiff.guidance.train import DGConfig

    types = typing.get_type_hints(DGConfig)
    defaults = DGConfig()
    for f in dataclasses.fields(DGConfig):
        if f.name == "base":
            continue
        flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        default = getattr(defaults, f.name)
        help_text = _HELP.get(f.name, f.metadata["help"])
        if "default" not in help_text:  # a help that explains its default (e.g. --data) says it once
            help_text += f" (default: {default if default != '' else 'none'})"
        p.add_argument(flag, dest=f.name, type=types[f.name], metavar=f.name.split("_")[-1].upper(), help=help_text)


def run_train(args: argparse.Namespace) -> int:
    from aotdiff.guidance.train import DGConfig, check_plan, load_base, resolved_plan, train_discriminator

    names = {f.name for f in dataclasses.fields(DGConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    cfg = DGConfig.from_dict({**values, "base": str(args.base)})
    cfg.validate()
    out = args.out if args.out is not None else args.base.with_name(args.base.name + "-dg")
    if args.dry_run:  # the checks a real start makes before any work, so a dry run fails where it would
        base = load_base(cfg.base)
        kind = check_plan(cfg, base)
        plan = resolved_plan(cfg, base, kind)
        window = plan["guide_sigma_max"]
        where = "DG's, sigma <= ~152" if window is None else f"sigma <= {window:g}"
        given = f" (--fakes {cfg.fakes})" if cfg.fakes else ""
        print(f"run directory: {out}\ndiscriminator: {kind}, items of shape {tuple(base.shape)}\n"
              f"real items: {plan['num_real']:,} ({plan['data']}); fakes: {plan['num_fakes']:,}{given}\n"
              f"guidance window when sampling: {where}\n{cfg.to_json()}")  # fmt: skip
        return 0
    result = train_discriminator(
        cfg, out, force=args.force, restart=args.restart, keep_going=args.keep_going,
        progress=not getattr(args, "no_progress", False),
    )  # fmt: skip
    return exit_status(result, f"sample with `aotdiff sample {args.base} --dg {out}`")
