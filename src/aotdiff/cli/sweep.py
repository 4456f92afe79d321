"""`aotdiff sweep`: sample quality against NFE for several runs, steps and rho values (and Discriminator Guidance
weights, with --dg), plus each run's curvature.

Writes DIR/table.csv (one line per cell), DIR/table.md (quality per NFE, curvature per run), DIR/sweep.json
(everything, including the full curvature reports and the shared sampler settings) and two plots:
DIR/quality_vs_nfe.png and DIR/curvature_vs_sigma.png.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from aotdiff.cli import UserError
from aotdiff.cli.common import (
    DEFAULT_MAX_BATCH,
    add_class_flag,
    add_device_flag,
    add_dg_flags,
    add_max_batch_flag,
    add_network_flags,
    add_progress_flag,
    add_raw_flag,
    add_sampler_flags,
    add_threads_flag,
    check_dg_flags,
    check_positive,
    check_writable_folder,
    guidance_from_args,
    guidance_meta,
    note_unused_churn_flags,
    progress_bar,
)
from aotdiff.generate import (
    PreparedDenoiser,
    SamplerSettings,
    auto_max_batch,
    check_class_label,
    check_count,
    parse_seeds,
    resolve_precision,
)
from aotdiff.metrics import load_reference
from aotdiff.metrics.curvature import default_truncation_steps
from aotdiff.metrics.quality import DEFAULT_NUM, METRICS, default_metric, make_quality
from aotdiff.report import plot_curvature_vs_sigma, plot_quality_vs_nfe, write_csv, write_markdown
from aotdiff.sweep import (
    CurvatureSettings,
    SweepRun,
    parse_float_list,
    parse_int_list,
    parse_weight_list,
    run_label,
    run_sweep,
    sweep_cost,
)

SOLVERS = ("heun", "euler")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sweep",
        help="quality vs NFE over steps x rho for several runs, and their curvature",
        description="For every run x solver x rho x steps: generate samples from the same seeds (--seeds, or 0..N-1 "
        "with --num N) and score them (FD-digits for the built-in digits, FID with --ref and an Inception detector, "
        "or for 2-D toy runs the sliced W2 distance to a fresh exact sample of the true distribution); once per run, "
        "the trajectory curvature on a fine Heun grid. NFE in the tables is counted, not computed from a formula. "
        "With --dg, every cell is also sampled at each --dg-weight (0 = unguided) with the same discriminator for "
        "every run, and the discriminator gradients per sample are counted beside the NFE; the curvature stays that "
        "of the unguided ODE. With --precision bf16 or tf32 the cells run the network so, but the curvature report "
        "runs it in fp32 (it differences slopes on a fine grid, where that rounding would read as curvature); every "
        "row records the precision. Tables and plots go to --out.",
        epilog="Example: aotdiff sweep runs/aot runs/independent --steps 3,5,8,14,18 --rho 7,72,90 --out sweep/",
    )
    p.add_argument("models", type=Path, nargs="+", help="run directories, checkpoint folders, .safetensors files "
                   "or EDM .pkl networks (read without running code)")  # fmt: skip
    # --steps / --rho / --solver take lists here (one cell per value); the other sampler flags are the shared ones.
    p.add_argument("--steps", default="3,5,8,14,18", metavar="N,N,...", help="sampler step counts N, comma-separated: "
                   "Heun makes 2N-1 network evaluations per image, Euler N (default: 3,5,8,14,18)")  # fmt: skip
    p.add_argument(
        "--rho",
        default="7,72,90",
        metavar="R,R,...",
        help="schedule exponents (default: 7,72,90: EDM and the AOT paper)",
    )
    p.add_argument(
        "--solver", default="heun", metavar="S,S", help="solvers, comma-separated: heun, euler (default: heun)"
    )
    add_sampler_flags(p, steps=False, rho=False, solver=False)  # churn and sigma range, as in `aotdiff sample`
    p.add_argument("--seeds", default=None, help="seeds of every cell, e.g. 0-1999 or 1,5,9-11 (default: 0..N-1 with "
                   "N from --num)")  # fmt: skip
    p.add_argument("--num", type=int, default=None, help="samples per cell, seeds 0..num-1, instead of --seeds "
                   "(default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_NUM.items()) + ")")  # fmt: skip
    add_class_flag(p)
    p.add_argument("--metric", default="auto", help="'fd' (the proxy FD of the built-in digit datasets: FD-digits, "
                   "FD-mnist5k), 'fid' or 'w2' (2-D toys); default 'auto' picks per run: w2 for toys, fd for the "
                   "built-in digit datasets, fid otherwise")  # fmt: skip
    p.add_argument("--ref", type=Path, default=None, help="reference statistics .npz (needed for fid; for fd the "
                   "default is the whole built-in dataset)")  # fmt: skip
    p.add_argument("--detector", type=Path, default=None, help="Inception-v3 file for fid (default: "
                   "$AOTDIFF_DETECTOR or the cache folder)")  # fmt: skip
    p.add_argument("--curvature-num", type=int, default=256, help="curvature trajectories per run, seeds from the "
                   "first sweep seed on (default: 256)")  # fmt: skip
    p.add_argument("--curvature-steps", type=int, default=256, help="Heun steps of the curvature grid; the truncation "
                   "errors of 3, 5, 9 and 18 steps are measured against it, those below it (default: 256)")  # fmt: skip
    p.add_argument("--curvature-rho", type=float, default=7.0, help="rho of the curvature grid (default: 7)")
    p.add_argument("--no-curvature", action="store_true", help="skip the curvature reports")
    add_max_batch_flag(p, default=None)
    add_network_flags(p)
    p.add_argument("--out", type=Path, default=Path("sweep"), help="output folder (default: ./sweep)")
    add_device_flag(p)
    add_threads_flag(p)
    add_progress_flag(p)
    add_raw_flag(p)
    add_dg_flags(p)
    # The shared DG flags, with --dg-weight taking a list here (one sweep cell per weight), like --steps and --rho.
    for action in p._actions:
        if "--dg-weight" in action.option_strings:
            action.type, action.metavar = str, "W,W,..."
            action.help = ("guidance weights on the Euler slope, comma-separated: one sweep cell per weight, 0 = the "
                           "unguided sampler; the same --dg discriminator guides every run, and the curvature part "
                           "stays unguided (default with --dg: 2 for unconditional models, 1 for conditional ones, "
                           "as DG)")  # fmt: skip
    p.set_defaults(run=run)


def _solvers(text: str) -> list[str]:
    solvers = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in solvers if s not in SOLVERS]
    if not solvers or bad:
        raise ValueError(f"--solver must list heun and/or euler, got '{text}'")
    return solvers


def _seeds(args: argparse.Namespace, metric: str) -> list[int]:
    """The cells' seeds: --seeds, else 0..N-1 with N from --num or the metric's default."""
    if args.seeds is not None:
        return parse_seeds(args.seeds)
    return list(range(args.num if args.num is not None else DEFAULT_NUM[metric]))


def run(args: argparse.Namespace) -> int:
    from aotdiff.train.distributed import pick_device

    # Every flag is checked before a model is loaded or a sample drawn.
    steps = parse_int_list(args.steps, "--steps")
    rhos = parse_float_list(args.rho, "--rho")
    solvers = _solvers(args.solver)
    sampler = SamplerSettings(  # checks the sigma range and churn (NaN, inf, order) before any work
        sigma_min=args.sigma_min, sigma_max=args.sigma_max, churn=args.churn, s_min=args.s_min, s_max=args.s_max,
        s_noise=args.s_noise,
    )  # fmt: skip
    note_unused_churn_flags(args)
    if args.metric != "auto" and args.metric not in METRICS:
        raise ValueError(f"unknown --metric '{args.metric}'; choose one of: auto, {', '.join(METRICS)}")
    if args.seeds is not None and args.num is not None:
        raise UserError("give --seeds or --num, not both (--num N means --seeds 0-<N-1>)")
    if args.seeds is not None:
        if len(parse_seeds(args.seeds)) < 2:  # a distance between distributions needs at least two samples
            raise ValueError(f"--seeds must give at least 2 seeds, got '{args.seeds}'")
    elif args.num is not None:
        check_count(args.num, "--num")
        if args.num < 2:
            raise ValueError(f"--num must be at least 2, got {args.num}")
    if args.class_label is not None and args.class_label < 0:
        raise UserError(f"--class must be a class index >= 0, got {args.class_label}")
    if args.max_batch is not None:
        check_positive(args.max_batch, "--max-batch")
    dg_weights = None if args.dg_weight is None else parse_weight_list(args.dg_weight, "--dg-weight")
    if dg_weights is not None and args.dg is None:
        raise UserError("--dg-weight sets the weights of Discriminator Guidance: give the discriminator with --dg DISC")
    dg_args = copy.copy(args)
    dg_args.dg_weight = None  # the run's default weight; the list is the sweep's axis
    check_dg_flags(dg_args)
    if args.ref is not None:  # read once up front: a missing or wrong file is refused before any model is loaded
        load_reference(args.ref)
    curvature = None
    if not args.no_curvature:
        if args.curvature_num < 1 or args.curvature_steps < 2:
            raise ValueError("--curvature-num must be positive and --curvature-steps at least 2")
        SamplerSettings(steps=args.curvature_steps, rho=args.curvature_rho, sigma_min=args.sigma_min,
                        sigma_max=args.sigma_max)  # fmt: skip
        # Truncation errors are measured against the curvature grid, so only the coarser default counts are used.
        truncation = tuple(default_truncation_steps(args.curvature_steps))
        curvature = CurvatureSettings(args.curvature_num, args.curvature_steps, args.curvature_rho, truncation)
    device = pick_device(args.device)
    resolve_precision(args.precision, device)  # bf16 on a GPU without it: refused before any model is loaded
    out: Path = args.out
    seen: dict[Path, Path] = {}
    for path in args.models:
        if not path.exists():
            raise UserError(
                f"{path} does not exist; give a run directory, a checkpoint folder, a .safetensors file or an EDM .pkl"
            )
        if path.resolve() in seen:
            raise UserError(f"{path} is given twice (as {seen[path.resolve()]} before): each model is swept once; "
                            "drop the repeat")  # fmt: skip
        seen[path.resolve()] = path
    created = not out.exists()
    check_writable_folder(out, "--out")  # before hours of sampling, not after
    try:
        return _sweep(args, out, steps, rhos, solvers, sampler, curvature, dg_args, dg_weights, device)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused model or an interrupt leaves no empty folder behind
        raise


def _sweep(
    args: argparse.Namespace,
    out: Path,
    steps: list[int],
    rhos: list[float],
    solvers: list[str],
    sampler: SamplerSettings,
    curvature: CurvatureSettings | None,
    dg_args: argparse.Namespace,
    dg_weights: list[float] | None,
    device: Any,
) -> int:
    from aotdiff.train.checkpoint import load_model

    runs, seeds, guidance = [], {}, {}
    max_batch = args.max_batch
    for label, path in zip(run_label(args.models), args.models, strict=True):
        model = load_model(path, ema=not args.raw, device=device)
        denoiser = PreparedDenoiser(model.denoiser, precision=args.precision, compile=args.compile, device=device)
        curvature_net = denoiser
        if denoiser.precision != "fp32":
            curvature_net = PreparedDenoiser(model.denoiser, precision="fp32", compile=args.compile, device=device)
        if args.max_batch is None:  # sized for the largest network of the sweep
            size = auto_max_batch(denoiser, model.shape, device, num_classes=model.num_classes,
                                  default=DEFAULT_MAX_BATCH)  # fmt: skip
            max_batch = size if max_batch is None else min(max_batch, size)
        check_class_label(args.class_label, model.num_classes)
        metric = args.metric if args.metric != "auto" else default_metric(model.shape, model.config)
        seeds[label] = _seeds(args, metric)
        quality = make_quality(
            metric, model.shape, model.config, where=str(path), num=len(seeds[label]), ref=args.ref,
            detector=args.detector, device=device,
        )  # fmt: skip
        # The weights file says which network made the numbers (EMA, or the live weights with --raw).
        info = {"coupling": model.config.get("coupling", ""), "data": model.config.get("data", ""),
                "nimg": model.nimg, "weights": str(model.source)}  # fmt: skip
        guide = guidance_from_args(dg_args, model.num_classes, device)  # the same discriminator for every run
        runs.append(SweepRun(label, denoiser, tuple(model.shape), quality, model.num_classes, info, guide,
                             curvature_denoiser=curvature_net))  # fmt: skip
        guided = "" if guide is None else ", DG weights " + ",".join(f"{w:g}" for w in dg_weights or [guide.weight])
        print(f"{label}: {quality.name} on {len(seeds[label])} samples per cell ({info['data']}, "
              f"{info['coupling']} coupling{guided})")  # fmt: skip
        if guide is not None:
            meta = guidance_meta(guide, dg_args)
            assert meta is not None
            weight = meta.pop("weight")  # the run's default: the sweep's weights replace it
            guidance[label] = {**meta, "weights": dg_weights if dg_weights is not None else [weight]}

    num_weights = len(dg_weights) if dg_weights is not None else 1
    total = sweep_cost([len(s) for s in seeds.values()], steps, rhos, solvers, curvature, num_weights)
    bar = progress_bar(args, total, "eval", "sweep")
    result = run_sweep(
        runs, steps, rhos, solvers=solvers, seeds=seeds, sampler=sampler, class_label=args.class_label,
        curvature=curvature, batch_size=max_batch, device=device, progress=bar.update,
        on_cell=lambda text: bar.set_postfix_str(text, refresh=True), dg_weights=dg_weights,
    )  # fmt: skip
    bar.close()
    result.settings["guidance"] = guidance or None  # per run: discriminator, weights, weight2, boost

    (out / "sweep.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    write_csv(result, out / "table.csv")
    plots = ["quality_vs_nfe.png"] + (["curvature_vs_sigma.png"] if result.curvature else [])
    write_markdown(result, out / "table.md", title="aotdiff sweep: " + ", ".join(r.label for r in runs), plots=plots)
    print((out / "table.md").read_text())
    plot_quality_vs_nfe(result.rows, out / "quality_vs_nfe.png")
    if result.curvature:
        plot_curvature_vs_sigma(result.curvature, out / "curvature_vs_sigma.png")
    print(f"wrote {out}/table.csv, table.md, sweep.json, " + ", ".join(plots))
    return 0
