"""`aotdiff curvature`: how straight a run's sampling trajectories are, and the truncation error of coarse samplers.

A thin wrapper over :func:`aotdiff.metrics.curvature_report` (definitions in docs/metrics.md): it writes the report as
JSON, prints a short summary, and plots the curvature profile over sigma as a PNG next to the JSON. With ``--dg`` it
measures the ODE guided by a discriminator (Discriminator Guidance, without boosting: boosting adds churn, and churned
trajectories are not ODE solutions).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from aotdiff.cli import UserError
from aotdiff.cli.common import (
    add_class_flag,
    add_device_flag,
    add_dg_flags,
    add_max_batch_flag,
    add_progress_flag,
    add_raw_flag,
    add_sigma_range_flags,
    add_threads_flag,
    check_class_index,
    check_dg_flags,
    check_model_path,
    check_output_file,
    check_positive,
    guidance_from_args,
    guidance_meta,
    progress_bar,
    variant_tag,
    write_atomic,
)
from aotdiff.generate import SamplerSettings, check_class_label, check_count, parse_seeds
from aotdiff.report import plot_curvature_vs_sigma
from aotdiff.sweep import parse_int_list


def register(sub: Any) -> None:
    p = sub.add_parser(
        "curvature",
        help="trajectory curvature and truncation error of a run",
        description="Solve the probability-flow ODE on a fine Heun grid from fixed seeds and measure how far the "
        "trajectories bend away from their chords (pooled curvature, median, 1 - cos, profile over sigma), and how "
        "far N-step samplers land from the fine solution (truncation error). Definitions: docs/metrics.md. With --dg, "
        "both are those of the ODE guided by the discriminator (no boosting).",
        epilog="Example: aotdiff curvature runs/toy --num 1000 --truncation-steps 3,5,9,18 --out curv.json",
    )
    p.add_argument(
        "model", type=Path, help="run directory (newest checkpoint), checkpoint folder, .safetensors or EDM .pkl"
    )
    # --num defaults to None so that --num given beside --seeds can be refused (as in `sweep`), not silently dropped.
    p.add_argument("--num", type=int, default=None, help=f"trajectories, seeds 0..num-1 (default: {DEFAULT_NUM})")
    p.add_argument("--seeds", default=None, help="explicit seeds instead of --num (give one or the other), e.g. "
                   "100-355")  # fmt: skip
    p.add_argument("--steps", "--fine-steps", dest="steps", type=int, default=256, metavar="N", help="sampler steps N "
                   "of the fine reference grid: Heun, 2N-1 network evaluations per trajectory (default: 256)")  # fmt: skip
    p.add_argument("--rho", type=float, default=7.0, help="schedule exponent of the fine grid (default: 7)")
    p.add_argument("--truncation-steps", default=None, help="step counts N of the coarse samplers compared "
                   "with the fine solution, each below --steps (default: those of 3,5,9,18 below --steps)")  # fmt: skip
    p.add_argument("--truncation-rho", type=float, default=None, help="their schedule exponent (default: --rho)")
    p.add_argument(
        "--truncation-solver", choices=("heun", "euler"), default="heun", help="their solver (default: heun)"
    )
    p.add_argument("--bands", type=int, default=8, help="log-spaced sigma bands of the profile (default: 8)")
    add_sigma_range_flags(p)
    add_class_flag(p)
    add_max_batch_flag(p)
    p.add_argument("--out", type=Path, default=None, help="report .json; the plot goes next to it as .png "
                   "(default: MODEL/curvature-rho<R>-n<N>.json, with -raw, -class3, -dg, ... before -n when set)")  # fmt: skip
    add_device_flag(p)
    add_threads_flag(p)
    add_progress_flag(p)
    add_raw_flag(p)
    add_dg_flags(p)
    # Same flag as elsewhere, so a script that passes it gets a clear refusal rather than argparse's usage dump.
    for action in p._actions:
        if "--dg-boost" in action.option_strings:
            action.help = f"refused here: {BOOST_REFUSED}"
    p.set_defaults(run=run)


DEFAULT_NUM = 256
BOOST_REFUSED = "boosting adds churn, so the trajectories would be stochastic, not the ODE whose curvature is measured"


def summary(report: dict[str, Any]) -> str:
    """Two lines a person can read: the curvature numbers, then the truncation error per step count."""
    errors = ", ".join(f"{n} steps {e:.4g}" for n, e in report["truncation_error"].items())
    return (
        f"curvature: pooled {report['curvature']:.4g}, median {report['curvature_median']:.4g}, "
        f"1 - cos {report['one_minus_cos']:.4g}  ({report['num']} trajectories, Heun {report['steps']} steps, "
        f"rho {report['rho']:g}, {report['nfe']} NFE each)\n"
        f"truncation error ({report['truncation_solver']}, rho {report['truncation_rho']:g}): {errors}"
    )


def _seeds(args: argparse.Namespace) -> list[int]:
    """--seeds, else 0..N-1 with N from --num; both at once is refused, as in `aotdiff sweep`."""
    if args.seeds is not None and args.num is not None:
        raise UserError("give --seeds or --num, not both (--num N means --seeds 0-<N-1>)")
    if args.seeds is not None:
        return parse_seeds(args.seeds)
    num = args.num if args.num is not None else DEFAULT_NUM
    check_count(num, "--num")
    return list(range(num))


def _check_truncation_below_fine(truncation: list[int], fine_steps: int) -> None:
    """The truncation error is measured against the fine solution, so a coarse grid that is not coarser than the
    fine one would report a number against a reference no better than itself."""
    bad = [n for n in truncation if n >= fine_steps]
    if bad:
        listed = ",".join(str(n) for n in bad)
        verb = "is" if len(bad) == 1 else "are"
        raise UserError(
            f"--truncation-steps {listed} {verb} not below --steps {fine_steps}, the fine reference grid the truncation "
            f"error is measured against; raise --steps above {max(bad)} or give --truncation-steps counts below "
            f"{fine_steps}"
        )


def run(args: argparse.Namespace) -> int:
    from aotdiff.metrics import curvature_report
    from aotdiff.metrics.curvature import default_truncation_steps
    from aotdiff.train.checkpoint import load_model
    from aotdiff.train.distributed import pick_device

    # Every number is checked before the model is loaded: the fine grid and each coarse grid are sampler settings.
    if args.truncation_steps is None:  # the defaults adapt to the fine grid; counts the user gives are checked
        truncation = default_truncation_steps(args.steps)
    else:
        truncation = parse_int_list(args.truncation_steps, "--truncation-steps")
    seeds = _seeds(args)
    if args.steps < 2:
        raise ValueError(f"--steps (the fine grid) must be at least 2, got {args.steps}")
    _check_truncation_below_fine(truncation, args.steps)
    SamplerSettings(steps=args.steps, rho=args.rho, sigma_min=args.sigma_min, sigma_max=args.sigma_max)
    t_rho = args.rho if args.truncation_rho is None else args.truncation_rho
    for n in truncation:
        SamplerSettings(steps=n, rho=t_rho, solver=args.truncation_solver, sigma_min=args.sigma_min,
                        sigma_max=args.sigma_max)  # fmt: skip
    check_positive(args.bands, "--bands")
    check_positive(args.max_batch, "--max-batch")
    check_class_index(args.class_label)
    check_dg_flags(args)
    if args.dg_boost:
        raise UserError(f"--dg-boost is not available in `aotdiff curvature`: {BOOST_REFUSED}; drop it")
    args.dg_boost = False  # the guidance default turns it on for conditional models: never here
    device = pick_device(args.device)
    check_model_path(args.model)
    out = args.out
    if out is None:
        base = args.model if args.model.is_dir() else args.model.parent
        name = f"curvature-rho{args.rho:g}{variant_tag(args)}-n{len(seeds)}.json"
        out = base / name if args.model.is_dir() else base / f"{args.model.stem}-{name}"
    check_output_file(out, ".json")  # the plot goes to the same folder
    model = load_model(args.model, ema=not args.raw, device=device)
    check_class_label(args.class_label, model.num_classes)
    guidance = guidance_from_args(args, model.num_classes, device)
    bar = progress_bar(args, len(seeds), "traj", "curvature")
    report = curvature_report(
        model.denoiser, model.shape, seeds, num_classes=model.num_classes, class_label=args.class_label,
        fine_steps=args.steps, rho=args.rho, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
        truncation_steps=truncation, truncation_rho=args.truncation_rho, truncation_solver=args.truncation_solver,
        num_bands=args.bands, batch_size=args.max_batch, device=device, progress=bar.update, guidance=guidance,
    )  # fmt: skip
    bar.close()
    report["model"] = {
        "path": str(args.model), "weights": str(model.source), "nimg": model.nimg, "ema": not args.raw,
        "data": model.config.get("data"), "coupling": model.config.get("coupling"),
    }  # fmt: skip
    report["guidance"] = guidance_meta(guidance, args)  # None: the unguided ODE
    if guidance is not None:  # every solve of the report together (fine grid and coarse grids), per trajectory
        report["discriminator_evals"] = guidance.evaluations // -(-len(seeds) // args.max_batch)
    write_atomic(out, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    print(summary(report))
    if guidance is not None:
        print(f"guided by {args.dg} (weight {guidance.weight:g}, weight2 {guidance.weight2:g}, no boosting): "
              f"{report['discriminator_evals']} discriminator gradients per trajectory")  # fmt: skip
    print(f"wrote {out}")
    plot = out.with_suffix(".png")
    plot_curvature_vs_sigma({args.model.name or str(args.model): report}, plot,
                            title=f"Curvature against sigma: {args.model}")  # fmt: skip
    print(f"wrote {plot}")
    return 0
