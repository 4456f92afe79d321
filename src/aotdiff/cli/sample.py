"""`aotdiff sample`: images (.npz + PNG grid) from a run directory, checkpoint or weights file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    check_class_index,
    check_dg_flags,
    check_model_path,
    check_output_file,
    check_positive,
    guidance_from_args,
    guidance_meta,
    progress_bar,
    settings_from_args,
    variant_tag,
    write_atomic,
)
from aotdiff.generate import (
    PreparedDenoiser,
    SamplerSettings,
    auto_max_batch,
    check_class_label,
    generate,
    parse_seeds,
    resolve_precision,
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sample",
        help="generate samples from a trained run",
        description="Generate samples: one random generator per seed, so image k is the same whatever --max-batch. "
        "Writes a .npz (images N x H x W x C uint8, or points N x D for 2-D runs; seeds; labels; meta: the sampler "
        "settings, the network's precision and the network evaluations counted per sample) and, with --grid, a PNG.",
        epilog="Example: aotdiff sample runs/digits --steps 14 --rho 90 --seeds 0-63 --out s.npz --grid s.png",
    )
    p.add_argument(
        "model", type=Path, help="run directory (newest checkpoint), checkpoint folder, .safetensors or EDM .pkl"
    )
    add_sampler_flags(p)
    p.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-63 or 1,5,9-11: one sample per seed (default: 0-63)")
    add_class_flag(p)
    p.add_argument("--out", type=Path, default=None, help="samples file, written exactly as named; must end in .npz "
                   "(default: MODEL/samples-<solver><steps>-rho<rho>.npz for a run directory or checkpoint folder, "
                   "DIR/<name>-samples-<solver><steps>-rho<rho>.npz for a weights file DIR/<name>.safetensors or "
                   ".pkl; settings that change the samples add to the name: -churn40, -raw, -class3, -dg, ...)")  # fmt: skip
    p.add_argument("--grid", type=Path, default=None, help="also save a .png grid (a scatter plot for 2-D data)")
    add_max_batch_flag(p, default=None)
    add_network_flags(p)
    add_device_flag(p)
    add_threads_flag(p)
    add_progress_flag(p)
    add_raw_flag(p)
    add_dg_flags(p)
    p.set_defaults(run=run)


def default_out(model: Path, settings: SamplerSettings, variant: str = "") -> Path:
    """MODEL/samples-<settings><variant>.npz (``variant``: :func:`variant_tag`, e.g. ``-dg`` for guided samples);
    next to a weights file, prefixed with its name, since several weights files often share a folder and would
    otherwise overwrite each other's samples."""
    name = f"samples-{settings.solver}{settings.steps}-rho{settings.rho:g}{variant}.npz"
    if model.is_dir():
        return model / name
    return model.parent / f"{model.stem}-{name}"


def _plot_title(args: argparse.Namespace, settings: SamplerSettings, nfe: int | None) -> str:
    """What the scatter plot shows: the model, the sampler and NFE, and what changes the samples (raw, churn, DG)."""
    extras = [text for flag, text in ((args.raw, "raw weights"), (settings.churn > 0, f"churn {settings.churn:g}"),
              (args.dg is not None, f"DG {args.dg}")) if flag]  # fmt: skip
    return f"{args.model}: {settings.solver} {settings.steps} steps (NFE {nfe}), ρ={settings.rho:g}" + "".join(
        f", {e}" for e in extras
    )


def run(args: argparse.Namespace) -> int:
    from aotdiff.train.checkpoint import load_model
    from aotdiff.train.distributed import pick_device
    from aotdiff.viz import save_image_grid, save_points_plot

    # Everything the user typed is checked before the model is loaded, let alone sampled.
    settings = settings_from_args(args)
    if args.max_batch is not None:
        check_positive(args.max_batch, "--max-batch")
    seeds = parse_seeds(args.seeds)
    check_class_index(args.class_label)
    check_dg_flags(args)
    device = pick_device(args.device)
    resolve_precision(args.precision, device)  # bf16 on a GPU without it: refused before the model is loaded
    check_model_path(args.model)
    out = check_output_file(
        args.out if args.out is not None else default_out(args.model, settings, variant_tag(args)), ".npz"
    )
    if args.grid is not None:
        check_output_file(args.grid, ".png", "--grid")

    model = load_model(args.model, ema=not args.raw, device=device)
    check_class_label(args.class_label, model.num_classes)
    guidance = guidance_from_args(args, model.num_classes, device)
    denoiser = PreparedDenoiser(model.denoiser, precision=args.precision, compile=args.compile, device=device)
    max_batch = args.max_batch or auto_max_batch(
        denoiser, model.shape, device, num_classes=model.num_classes, default=DEFAULT_MAX_BATCH
    )
    images, raws, labels, seeds_done = [], [], [], []
    nfe: int | None = None
    dg_evals = 0
    bar = progress_bar(args, len(seeds), "img" if len(model.shape) == 3 else "pt", "sampling")
    for b in generate(
        denoiser, seeds, model.shape, settings=settings, num_classes=model.num_classes,
        class_label=args.class_label, batch_size=max_batch, device=device, progress=bar.update,
        guidance=guidance,
    ):  # fmt: skip
        images.append(b.images)
        raws.append(b.raw)
        seeds_done.append(b.seeds)
        if b.labels is not None:
            labels.append(b.labels)
        # The evaluations the sampler counted (per sample: one network call serves the whole batch), not a formula.
        nfe = b.nfe if nfe is None else max(nfe, b.nfe)
        dg_evals = max(dg_evals, b.guidance_evals)
    bar.close()
    is_image = len(model.shape) == 3
    meta = {
        "model": str(model.source), "nimg": model.nimg, "nfe": nfe, "sampler": settings.to_dict(),
        "class": args.class_label, "guidance": guidance_meta(guidance, args),
        "discriminator_evals": dg_evals,  # discriminator gradients per sample, beside the score network's NFE
        **denoiser.describe(),  # the network's precision and whether it was compiled
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
    # Through an open file: np.savez given a name appends ".npz" to one that lacks it, and the user must find the
    # file under exactly the name they gave (and never a half-written one: write_atomic renames at the end).
    write_atomic(out, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    guided = f" + {dg_evals} discriminator gradients" if guidance is not None else ""
    noun = "sample" if len(seeds) == 1 else "samples"
    print(f"wrote {len(seeds)} {noun} ({nfe} network evaluations{guided} each) to {out}")
    if args.grid is not None:
        if is_image:
            save_image_grid(torch.cat(images), args.grid)
        else:
            save_points_plot(torch.cat(raws), args.grid, title=_plot_title(args, settings, nfe))
        print(f"wrote {args.grid}")
    return 0
