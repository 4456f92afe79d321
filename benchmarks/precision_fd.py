"""What bf16 sampling changes in the samples' quality: the same latents sampled with the network in fp32 and in bf16
(autocast; the sampler state and EDM's preconditioning stay float64, see aotdiff.generate.PreparedDenoiser), scored by
the run's proxy FD, with the paired difference's sampling noise from a bootstrap (issue 11, item 4).

    python benchmarks/precision_fd.py runs/digits                       # 2,000 samples, Heun 5 and 18 steps
    python benchmarks/precision_fd.py runs/digits --num 500 --steps 5,18 --out precision_fd.json

Runs on a CPU (bf16 autocast is emulated there: slow on CPUs without bf16 units, but the same rounding of the
network's matmul and convolution inputs) or a GPU (``--device cuda``). Prints and writes one JSON object: per sampler
setting the FD of each precision, the paired difference bf16 - fp32 with its bootstrap sd, and the largest and mean
absolute difference of the samples (in [-1, 1] units, before quantisation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from aotdiff.generate import PreparedDenoiser, SamplerSettings, generate
from aotdiff.metrics.fid import FeatureStats, fid_from_stats
from aotdiff.metrics.quality import FrechetQuality, make_quality
from aotdiff.train.checkpoint import load_model


def fd(features: np.ndarray, quality: FrechetQuality) -> float:
    stats = FeatureStats()
    stats.update(features)
    return fid_from_stats(stats, quality.reference)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a trained run with a built-in image dataset (digits, mnist5k)")
    parser.add_argument("--num", type=int, default=2000, help="samples per setting (default: 2000)")
    parser.add_argument("--steps", default="5,18", help="Heun steps, comma-separated (default: 5,18 = 9 and 35 NFE)")
    parser.add_argument("--boot", type=int, default=200, help="bootstrap resamples (default: 200)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch", type=int, default=250)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = load_model(args.run, device=device)
    quality = make_quality("fd", model.shape, model.config, where=args.run, num=args.num, device=device)
    assert isinstance(quality, FrechetQuality)
    seeds = list(range(args.num))
    boot = np.random.default_rng(0).integers(0, args.num, size=(args.boot, args.num))
    result: dict[str, object] = {"run": args.run, "num": args.num, "device": str(device), "settings": {}}
    for steps in (int(s) for s in args.steps.split(",")):
        per: dict[str, object] = {}
        feats, raws = {}, {}
        for precision in ("fp32", "bf16"):
            net = PreparedDenoiser(model.denoiser, precision=precision, device=device)
            t0 = time.perf_counter()
            f, r = [], []
            for batch in generate(net, seeds, model.shape, settings=SamplerSettings(steps=steps, solver="heun"),
                                  batch_size=args.max_batch, num_classes=model.num_classes, device=device):  # fmt: skip
                with torch.no_grad():
                    f.append(quality.detector.features(batch.images).double().cpu().numpy())
                r.append(batch.raw.double().cpu())
            feats[precision], raws[precision] = np.concatenate(f), torch.cat(r)
            per[f"fd_{precision}"] = fd(feats[precision], quality)
            per[f"seconds_{precision}"] = time.perf_counter() - t0
        diffs = [fd(feats["bf16"][i], quality) - fd(feats["fp32"][i], quality) for i in boot]
        gap = (raws["bf16"] - raws["fp32"]).abs()
        per.update(
            fd_difference=per["fd_bf16"] - per["fd_fp32"],  # type: ignore[operator]
            fd_difference_boot_sd=float(np.std(diffs, ddof=1)),
            max_abs_sample_difference=gap.max().item(),
            mean_abs_sample_difference=gap.mean().item(),
            nfe=2 * steps - 1,
        )
        result["settings"][f"heun-{steps}"] = per  # type: ignore[index]
        print(json.dumps({f"heun-{steps}": per}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
