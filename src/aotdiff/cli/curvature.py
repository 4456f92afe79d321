"""`aotdiff curvature`: how straight a run's sampling trajectories are, and the truncation error of coarse samplers.

A thin wrapper over :func:`aotdiff.metrics.curvature_report` (definitions in docs/metrics.md): it writes the report as
JSON, prints a short summary, and plots the curvature profile over sigma as a PNG next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aotdiff.cli import UserError
from aotdiff.generate import parse_seeds
from aotdiff.sweep import PlotsUnavailableError, parse_int_list, plot_curvature_vs_sigma


def register(sub: Any) -> None:
    p = sub.add_parser(
        "curvature",
        help="trajectory curvature and truncation error of a run",
        description="Solve the probability-flow ODE on a fine Heun grid from fixed seeds and measure how far the "
        "trajectories bend away from their chords (pooled curvature, median, 1 - cos, profile over sigma), and how "
        "far N-step samplers land from the fine solution (truncation error). Definitions: docs/metrics.md.",
        epilog="Example: aotdiff curvature runs/toy --num 1000 --truncation-steps 3,5,9,18 --out curv.json",
    )
    p.add_argument("model", type=Path, help="run directory (newest checkpoint), checkpoint folder or .safetensors")
    p.add_argument("--num", type=int, default=256, help="trajectories (seeds 0..num-1; default: 256)")
    p.add_argument("--seeds", default=None, help="explicit seeds instead of --num, e.g. 100-355")
    p.add_argument("--steps", type=int, default=256, help="Heun steps of the fine reference grid (default: 256)")
    p.add_argument("--rho", type=float, default=7.0, help="schedule exponent of the fine grid (default: 7)")
    p.add_argument("--truncation-steps", default="3,5,9,18", help="step counts N of the coarse samplers compared "
                   "with the fine solution (default: 3,5,9,18)")  # fmt: skip
    p.add_argument("--truncation-rho", type=float, default=None, help="their schedule exponent (default: --rho)")
    p.add_argument(
        "--truncation-solver", choices=("heun", "euler"), default="heun", help="their solver (default: heun)"
    )
    p.add_argument("--bands", type=int, default=8, help="log-spaced sigma bands of the profile (default: 8)")
    p.add_argument("--sigma-min", type=float, default=0.002, help="smallest noise level (default: 0.002)")
    p.add_argument("--sigma-max", type=float, default=80.0, help="largest noise level (default: 80)")
    p.add_argument("--class", dest="class_label", type=int, default=None, help="class label (default: random/seed)")
    p.add_argument("--batch", type=int, default=256, help="trajectories solved at once (default: 256)")
    p.add_argument("--out", type=Path, default=None, help="report .json; the plot goes next to it as .png "
                   "(default: MODEL/curvature-rho<R>-n<N>.json)")  # fmt: skip
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (default: auto)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.set_defaults(run=run)


def summary(report: dict[str, Any]) -> str:
    """Two lines a person can read: the curvature numbers, then the truncation error per step count."""
    errors = ", ".join(f"{n} steps {e:.4g}" for n, e in report["truncation_error"].items())
    return (
        f"curvature: pooled {report['curvature']:.4g}, median {report['curvature_median']:.4g}, "
        f"1 - cos {report['one_minus_cos']:.4g}  ({report['num']} trajectories, Heun {report['steps']} steps, "
        f"rho {report['rho']:g}, {report['nfe']} NFE each)\n"
        f"truncation error ({report['truncation_solver']}, rho {report['truncation_rho']:g}): {errors}"
    )


def run(args: argparse.Namespace) -> int:
    from aotdiff.metrics import curvature_report
    from aotdiff.train.checkpoint import load_model
    from aotdiff.train.distributed import pick_device

    truncation = parse_int_list(args.truncation_steps, "--truncation-steps")
    if args.seeds is not None:
        seeds = parse_seeds(args.seeds)
    else:
        if args.num < 1:
            raise ValueError(f"--num must be positive, got {args.num}")
        seeds = list(range(args.num))
    if args.steps < 2:
        raise ValueError(f"--steps (the fine grid) must be at least 2, got {args.steps}")
    device = pick_device(args.device)
    model = load_model(args.model, ema=not args.raw, device=device)
    bar = tqdm(total=len(seeds), unit="traj", desc="curvature", dynamic_ncols=True)
    report = curvature_report(
        model.denoiser, model.shape, seeds, num_classes=model.num_classes, class_label=args.class_label,
        fine_steps=args.steps, rho=args.rho, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
        truncation_steps=truncation, truncation_rho=args.truncation_rho, truncation_solver=args.truncation_solver,
        num_bands=args.bands, batch_size=args.batch, device=device, progress=bar.update,
    )  # fmt: skip
    bar.close()
    report["model"] = {
        "path": str(args.model), "weights": str(model.source), "nimg": model.nimg, "ema": not args.raw,
        "data": model.config.get("data"), "coupling": model.config.get("coupling"),
    }  # fmt: skip
    out = args.out
    if out is None:
        base = args.model if args.model.is_dir() else args.model.parent
        out = base / f"curvature-rho{args.rho:g}-n{len(seeds)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"wrote {out}")
    plot = out.with_suffix(".png")
    try:
        plot_curvature_vs_sigma({args.model.name or str(args.model): report}, plot,
                                title=f"Curvature against sigma: {args.model}")  # fmt: skip
    except PlotsUnavailableError as e:
        print(f"(the report was written to {out})", file=sys.stderr)
        raise UserError(str(e)) from e
    print(f"wrote {plot}")
    return 0
