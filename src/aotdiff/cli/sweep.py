"""`aotdiff sweep`: sample quality against NFE for several runs, steps and rho values, plus each run's curvature.

Writes DIR/table.csv (one line per cell), DIR/table.md (quality per NFE, curvature per run), DIR/sweep.json
(everything, including the full curvature reports) and two plots: DIR/quality_vs_nfe.png and
DIR/curvature_vs_sigma.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from aotdiff.cli import UserError
from aotdiff.sweep import (
    DEFAULT_NUM,
    METRICS,
    CurvatureSettings,
    PlotsUnavailableError,
    SweepRun,
    default_metric,
    make_quality,
    parse_float_list,
    parse_int_list,
    plot_curvature_vs_sigma,
    plot_quality_vs_nfe,
    run_label,
    run_sweep,
    sweep_cost,
    write_csv,
    write_markdown,
)

SOLVERS = ("heun", "euler")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sweep",
        help="quality vs NFE over steps x rho for several runs, and their curvature",
        description="For every run x solver x rho x steps: generate --num samples from seeds 0..num-1 and score them "
        "(FD-digits for the built-in digits, FID with --ref and an Inception detector, or for 2-D toy runs the "
        "sliced W2 distance to a fresh exact sample of the true distribution); once per run, the trajectory "
        "curvature on a fine Heun grid. Tables and plots go to --out.",
        epilog="Example: aotdiff sweep runs/aot runs/independent --steps 3,5,8,14,18 --rho 7,72,90 --out sweep/",
    )
    p.add_argument("models", type=Path, nargs="+", help="run directories, checkpoint folders or .safetensors files")
    p.add_argument("--steps", default="3,5,8,14,18", help="sampler step counts (default: 3,5,8,14,18)")
    p.add_argument("--rho", default="7,72,90", help="schedule exponents (default: 7,72,90: EDM and the AOT paper)")
    p.add_argument("--solver", default="heun", help="solvers, comma-separated: heun, euler (default: heun)")
    p.add_argument("--metric", default="auto", help="'fd' (FD-digits), 'fid' or 'w2' (2-D toys); default 'auto' "
                   "picks per run: w2 for toys, fd for the built-in digits, fid otherwise")  # fmt: skip
    p.add_argument("--num", type=int, default=None, help="samples per cell (default: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_NUM.items()) + ")")  # fmt: skip
    p.add_argument("--ref", type=Path, default=None, help="reference statistics .npz (needed for fid; for fd the "
                   "default is the whole digits dataset)")  # fmt: skip
    p.add_argument("--detector", type=Path, default=None, help="Inception-v3 file for fid (default: "
                   "$AOTDIFF_DETECTOR or the cache folder)")  # fmt: skip
    p.add_argument("--sigma-min", type=float, default=0.002, help="smallest noise level (default: 0.002)")
    p.add_argument("--sigma-max", type=float, default=80.0, help="largest noise level (default: 80)")
    p.add_argument("--curvature-num", type=int, default=256, help="curvature trajectories per run (default: 256)")
    p.add_argument("--curvature-steps", type=int, default=256, help="Heun steps of the curvature grid (default: 256)")
    p.add_argument("--curvature-rho", type=float, default=7.0, help="rho of the curvature grid (default: 7)")
    p.add_argument("--no-curvature", action="store_true", help="skip the curvature reports")
    p.add_argument("--batch", type=int, default=500, help="samples per batch (default: 500)")
    p.add_argument("--out", type=Path, default=Path("sweep"), help="output folder (default: ./sweep)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (default: auto)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.set_defaults(run=run)


def _solvers(text: str) -> list[str]:
    solvers = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in solvers if s not in SOLVERS]
    if not solvers or bad:
        raise ValueError(f"--solver must list heun and/or euler, got '{text}'")
    return solvers


def run(args: argparse.Namespace) -> int:
    from aotdiff.train.checkpoint import load_model
    from aotdiff.train.distributed import pick_device

    steps = parse_int_list(args.steps, "--steps")
    rhos = parse_float_list(args.rho, "--rho")
    solvers = _solvers(args.solver)
    if args.metric != "auto" and args.metric not in METRICS:
        raise ValueError(f"unknown --metric '{args.metric}'; choose one of: auto, {', '.join(METRICS)}")
    if args.num is not None and args.num < 2:
        raise ValueError(f"--num must be at least 2, got {args.num}")
    if args.batch < 1:
        raise ValueError(f"--batch must be positive, got {args.batch}")
    if args.ref is not None and not args.ref.is_file():
        raise FileNotFoundError(f"reference statistics '{args.ref}' not found; create them with `aotdiff fid ref`")
    curvature = None
    if not args.no_curvature:
        if args.curvature_num < 1 or args.curvature_steps < 2:
            raise ValueError("--curvature-num must be positive and --curvature-steps at least 2")
        curvature = CurvatureSettings(args.curvature_num, args.curvature_steps, args.curvature_rho)
    device = pick_device(args.device)

    runs, nums = [], []
    for label, path in zip(run_label(args.models), args.models, strict=True):
        model = load_model(path, ema=not args.raw, device=device)
        metric = args.metric if args.metric != "auto" else default_metric(model.shape, model.config)
        num = args.num if args.num is not None else DEFAULT_NUM[metric]
        quality = make_quality(
            metric, model.shape, model.config, where=str(path), num=num, ref=args.ref, detector=args.detector,
            device=device,
        )  # fmt: skip
        info = {"coupling": model.config.get("coupling", ""), "data": model.config.get("data", ""),
                "nimg": model.nimg}  # fmt: skip
        runs.append(SweepRun(label, model.denoiser, tuple(model.shape), quality, model.num_classes, info))
        nums.append(num)
        print(f"{label}: {quality.name} on {num} samples per cell ({info['data']}, {info['coupling']} coupling)")

    total = sweep_cost(nums, steps, rhos, solvers, curvature)
    bar = tqdm(total=total, unit="eval", unit_scale=True, desc="sweep", dynamic_ncols=True)
    result = run_sweep(
        runs, steps, rhos, solvers=solvers, num={r.label: n for r, n in zip(runs, nums, strict=True)},
        sigma_min=args.sigma_min, sigma_max=args.sigma_max, curvature=curvature, batch_size=args.batch,
        device=device, progress=bar.update, on_cell=lambda text: bar.set_postfix_str(text, refresh=True),
    )  # fmt: skip
    bar.close()

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    write_csv(result, out / "table.csv")
    plots = ["quality_vs_nfe.png"] + (["curvature_vs_sigma.png"] if result.curvature else [])
    write_markdown(result, out / "table.md", title="aotdiff sweep: " + ", ".join(r.label for r in runs), plots=plots)
    print((out / "table.md").read_text())
    try:
        plot_quality_vs_nfe(result.rows, out / "quality_vs_nfe.png")
        if result.curvature:
            plot_curvature_vs_sigma(result.curvature, out / "curvature_vs_sigma.png")
    except PlotsUnavailableError as e:
        print(f"(the tables were written to {out})", file=sys.stderr)
        raise UserError(str(e)) from e
    print(f"wrote {out}/table.csv, table.md, sweep.json, " + ", ".join(plots))
    return 0
