"""`aotdiff sample`: images (.npz + PNG grid) from a run directory, checkpoint or weights file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from aotdiff.generate import SamplerSettings, generate, parse_seeds
from aotdiff.sampling import expected_nfe


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """Sampler flags shared by sample / fid / sweep."""
    p.add_argument("--steps", type=int, default=18, help="sampler steps N; Heun makes 2N-1 evaluations (default: 18)")
    p.add_argument("--rho", type=float, default=7.0, help="Karras schedule exponent (EDM 7; AOT paper 90 / 72)")
    p.add_argument("--solver", choices=("heun", "euler"), default="heun", help="ODE solver (default: heun)")
    p.add_argument("--churn", type=float, default=0.0, help="EDM S_churn; 0 = deterministic ODE (default: 0)")
    p.add_argument("--s-min", type=float, default=0.0, help="churn only for sigma >= this (default: 0)")
    p.add_argument("--s-max", type=float, default=float("inf"), help="churn only for sigma <= this (default: inf)")
    p.add_argument("--s-noise", type=float, default=1.0, help="EDM S_noise (default: 1)")
    p.add_argument("--sigma-min", type=float, default=0.002, help="smallest noise level (default: 0.002)")
    p.add_argument("--sigma-max", type=float, default=80.0, help="largest noise level (default: 80)")


def settings_from_args(args: argparse.Namespace) -> SamplerSettings:
    return SamplerSettings(
        steps=args.steps, rho=args.rho, solver=args.solver, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
        churn=args.churn, s_min=args.s_min, s_max=args.s_max, s_noise=args.s_noise,
    )  # fmt: skip


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sample",
        help="generate samples from a trained run",
        description="Generate samples: one random generator per seed, so image k is the same whatever the batch.",
        epilog="Example: aotdiff sample runs/digits --steps 14 --rho 90 --seeds 0-63 --out s.npz --grid s.png",
    )
    p.add_argument("model", type=Path, help="run directory (newest checkpoint), checkpoint folder or .safetensors")
    add_sampler_flags(p)
    p.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-63 or 1,5,9-11 (default: 0-63)")
    p.add_argument("--class", dest="class_label", type=int, default=None, help="class label (default: random/seed)")
    p.add_argument("--out", type=Path, default=None, help="samples .npz (default: MODEL/samples-<settings>.npz)")
    p.add_argument("--grid", type=Path, default=None, help="also save a PNG grid (scatter plot for 2-D data)")
    p.add_argument("--batch", type=int, default=256, help="images per sampler batch (default: 256)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (default: auto)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from aotdiff.train.checkpoint import load_model
    from aotdiff.train.distributed import pick_device
    from aotdiff.viz import save_image_grid, save_points_plot

    device = pick_device(args.device)
    model = load_model(args.model, ema=not args.raw, device=device)
    seeds = parse_seeds(args.seeds)
    settings = settings_from_args(args)
    out = args.out
    if out is None:
        base = args.model if args.model.is_dir() else args.model.parent
        out = base / f"samples-{settings.solver}{settings.steps}-rho{settings.rho:g}.npz"
    images, raws, labels, seeds_done = [], [], [], []
    bar = tqdm(total=len(seeds), unit="img", desc="sampling", dynamic_ncols=True)
    for b in generate(
        model.denoiser, seeds, model.shape, settings=settings, num_classes=model.num_classes,
        class_label=args.class_label, batch_size=args.batch, device=device, progress=bar.update,
    ):  # fmt: skip
        images.append(b.images)
        raws.append(b.raw)
        seeds_done.append(b.seeds)
        if b.labels is not None:
            labels.append(b.labels)
    bar.close()
    is_image = len(model.shape) == 3
    meta = {
        "model": str(model.source), "nimg": model.nimg, "nfe": expected_nfe(settings.steps, settings.solver)
        if settings.sigmas()[-2] > 0 else None, "sampler": settings.to_dict(), "class": args.class_label,
    }  # fmt: skip
    arrays: dict[str, np.ndarray] = {
        "seeds": torch.cat(seeds_done).numpy().astype(np.int64),
        "labels": torch.cat(labels).numpy().astype(np.int64) if labels else np.zeros(0, np.int64),
        "meta": np.array(json.dumps(meta)),
    }
    if is_image:
        arrays["images"] = torch.cat(images).permute(0, 2, 3, 1).numpy()  # N x H x W x C uint8
    else:
        arrays["points"] = torch.cat(raws).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)  # type: ignore[arg-type]
    print(f"wrote {len(seeds)} samples ({meta['nfe']} network evaluations each) to {out}")
    if args.grid is not None:
        if is_image:
            save_image_grid(torch.cat(images), args.grid)
        else:
            save_points_plot(torch.cat(raws), args.grid, title=f"{args.model} ({settings.steps} steps)")
        print(f"wrote {args.grid}")
    return 0
