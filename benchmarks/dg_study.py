"""Discriminator Guidance study on the 2-D toys: base model (independent, AOT) x discriminator (none, trained with
independent noise, trained with AOT-paired noise) x NFE, scored by the sliced W2 distance to the true distribution.

    python benchmarks/dg_study.py [--out docs/results] [--base-kimg 40] [--samples 4000] [--repeats 3]

Every number is the mean over ``--repeats`` disjoint seed blocks of ``--samples`` samples, with the standard deviation
across blocks (the sampling noise of the metric); the floor row is the same metric between two fresh samples of the
true distribution. A difference is a finding only where it exceeds those deviations. Writes OUT/dg.json and
OUT/../dg.md (a markdown section linked from docs/results.md). About 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from aotdiff.data import load_dataset
from aotdiff.generate import SamplerSettings, generate
from aotdiff.guidance import DiscriminatorGuidance, load_discriminator
from aotdiff.guidance.train import DGConfig, train_discriminator
from aotdiff.guidance.vp import edm_sigma
from aotdiff.metrics import sliced_wasserstein2
from aotdiff.train import load_model
from aotdiff.train.config import preset_config
from aotdiff.train.loop import train

STEPS = {9: 5, 15: 8, 27: 14, 35: 18}  # NFE -> Heun steps (2N - 1)


DG_SIGMA_WINDOW = float(edm_sigma(1.0))  # DG's window ends at VP time 1


# The AOT base models are the paper's AOT (as in DG + AOT, Kim et al. 2024), whatever `--coupling aot` ships.
PAPER_AOT: dict[str, dict[str, str]] = {"aot": {"aot_recipe": "paper"}}


def guidance(disc, weight: float) -> DiscriminatorGuidance | None:
    """`disc` is None (unguided), a discriminator (its recorded window) or (discriminator, sigma_max)."""
    if disc is None:
        return None
    disc, sigma_max = disc if isinstance(disc, tuple) else (disc, None)
    return DiscriminatorGuidance(disc, weight=weight, sigma_max=sigma_max)


def score(model, guidance, steps, seeds, reference) -> float:
    batches = generate(model.denoiser, seeds, model.shape, settings=SamplerSettings(steps=steps),
                       batch_size=len(seeds), guidance=guidance)  # fmt: skip
    points = torch.cat([b.raw for b in batches])
    return sliced_wasserstein2(points, reference)


def digits_study(args: argparse.Namespace) -> dict:
    """The same grid on scikit-learn's digits (denoiser-feature discriminators), scored by FD-digits."""
    from aotdiff.metrics.quality import make_quality

    nfes = {n: STEPS[n] for n in (15, 35)}
    rows = []
    for coupling in ("independent", "aot"):
        base = args.work / f"digits-base-{coupling}"
        cfg = preset_config("digits", coupling=coupling, duration_kimg=args.digits_kimg, device="cpu", threads=1,
                            **PAPER_AOT.get(coupling, {}))  # fmt: skip
        train(cfg, base, progress=False, log=lambda s: None)
        model = load_model(base)
        quality = make_quality("fd", model.shape, model.config, where=str(base), num=args.digits_samples)
        discs = {"none": None}
        for dg in ("independent", "aot"):
            out = args.work / f"digits-disc-{coupling}-{dg}"
            dcfg = DGConfig(base=str(base), dg_coupling=dg, epochs=args.digits_epochs, device="cpu", threads=1,
                            snapshot_kimg=1e6, tick_kimg=50)  # fmt: skip
            train_discriminator(dcfg, out, progress=False, log=lambda s: None)
            discs[dg] = load_discriminator(out)
        for name, disc in discs.items():
            for nfe, steps in nfes.items():
                values = []
                for r in range(2):
                    guide = DiscriminatorGuidance(disc, weight=args.weight) if disc is not None else None
                    seeds = range(r * args.digits_samples, (r + 1) * args.digits_samples)
                    values.append(quality.score(generate(model.denoiser, seeds, model.shape,
                                                         settings=SamplerSettings(steps=steps), batch_size=500,
                                                         guidance=guide)))  # fmt: skip
                rows.append({"base": coupling, "discriminator": name, "nfe": nfe, "fd": values,
                             "mean": statistics.mean(values), "sd": statistics.stdev(values)})  # fmt: skip
                print(f"digits base {coupling:11s} disc {name:11s} NFE {nfe:2d}: {rows[-1]['mean']:.3f} "
                      f"+- {rows[-1]['sd']:.3f}", flush=True)  # fmt: skip
    return {"rows": rows, "kimg": args.digits_kimg, "epochs": args.digits_epochs, "samples": args.digits_samples,
            "weight": args.weight}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--work", type=Path, default=Path("runs/dg-study"))
    ap.add_argument("--base-kimg", type=float, default=40.0, help="training length of the (under-trained) base models")
    ap.add_argument("--epochs", type=float, default=20.0, help="discriminator training epochs")
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--weight",
        type=float,
        default=2.0,
        help="DG weight on the Euler slope (default: 2, that of `aotdiff sample --dg` for unconditional models)",
    )
    ap.add_argument("--render-only", action="store_true", help="re-render OUT/../dg.md from OUT/dg.json")
    ap.add_argument("--digits", action="store_true", help="add the digits rows (FD-digits, 15 and 35 NFE)")
    ap.add_argument("--digits-only", action="store_true", help="run only the digits rows, merged into OUT/dg.json")
    ap.add_argument("--digits-kimg", type=float, default=30.0)
    ap.add_argument("--digits-epochs", type=float, default=10.0)
    ap.add_argument("--digits-samples", type=int, default=1000)
    args = ap.parse_args()
    if args.digits_only:
        torch.set_num_threads(1)
        start = time.time()
        result = json.loads((args.out / "dg.json").read_text())
        result["digits"] = digits_study(args) | {"minutes": round((time.time() - start) / 60, 1)}
        (args.out / "dg.json").write_text(json.dumps(result, indent=2) + "\n")
        render(result, args.out.parent / "dg.md")
        return
    if args.render_only:
        render(json.loads((args.out / "dg.json").read_text()), args.out.parent / "dg.md")
        return
    torch.set_num_threads(1)
    start = time.time()
    data = load_dataset("toy:8gaussians")
    refs = [data.sample(args.samples, torch.Generator().manual_seed(10_000 + r)).double() for r in range(args.repeats)]
    floor = [sliced_wasserstein2(data.sample(args.samples, torch.Generator().manual_seed(20_000 + r)), refs[r])
             for r in range(args.repeats)]  # fmt: skip
    rows = []
    for coupling in ("independent", "aot"):
        base = args.work / f"base-{coupling}"
        cfg = preset_config("toy2d", coupling=coupling, duration_kimg=args.base_kimg, device="cpu", threads=1,
                            **PAPER_AOT.get(coupling, {}))  # fmt: skip
        train(cfg, base, progress=False, log=lambda s: None)
        model = load_model(base)
        discs = {"none": None}
        for dg in ("independent", "aot"):
            out = args.work / f"disc-{coupling}-{dg}"
            dcfg = DGConfig(base=str(base), dg_coupling=dg, epochs=args.epochs, device="cpu", threads=1,
                            snapshot_kimg=1e6, tick_kimg=50)  # fmt: skip
            train_discriminator(dcfg, out, progress=False, log=lambda s: None)
            discs[dg] = load_discriminator(out)
        # the window ablation: the same discriminators over DG's whole window (sigma up to ~152)
        discs |= {f"{dg}, DG window": (discs[dg], DG_SIGMA_WINDOW) for dg in ("independent", "aot")}
        for name, disc in discs.items():
            for nfe, steps in STEPS.items():
                values = []
                for r in range(args.repeats):
                    seeds = range(r * args.samples, (r + 1) * args.samples)
                    values.append(score(model, guidance(disc, args.weight), steps, seeds, refs[r]))
                rows.append({"base": coupling, "discriminator": name, "nfe": nfe, "w2": values,
                             "mean": statistics.mean(values), "sd": statistics.stdev(values)})  # fmt: skip
                print(f"base {coupling:11s} disc {name:11s} NFE {nfe:2d}: {rows[-1]['mean']:.4f} +- {rows[-1]['sd']:.4f}",
                      flush=True)  # fmt: skip
    result = {"settings": vars(args) | {"out": str(args.out), "work": str(args.work)}, "floor": floor, "rows": rows,
              "minutes": round((time.time() - start) / 60, 1)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dg.json").write_text(json.dumps(result, indent=2) + "\n")
    render(result, args.out.parent / "dg.md")


def render(result: dict, path: Path) -> None:
    s = result["settings"]
    floor = result["floor"]
    lines = [
        "# Discriminator Guidance on 8 Gaussians",
        "",
        f"Generated by `python benchmarks/dg_study.py` ({result['minutes']} min on 2 CPU cores). Base models: the toy2d "
        f"preset trained {s['base_kimg']:g} kimg (under-trained on purpose), independent or AOT noise. Discriminators: "
        f"the `mlp` kind, {s['epochs']:g} epochs of DG's recipe on as many fakes as data, with independent or "
        f"AOT-paired perturbation noise. Guidance weight {s['weight']:g} on the Euler slope (DG's default for the "
        f"Heun correction: 0), at sigma <= 1 (the window `dg train` records for 2-D points; rows marked 'DG window': "
        f"DG's whole window, sigma <= {DG_SIGMA_WINDOW:.0f}). Sliced W2 to the true distribution, mean +- sd over {s['repeats']} disjoint blocks "
        f"of {s['samples']} samples; floor (two true samples): {statistics.mean(floor):.4f} +- "
        f"{statistics.stdev(floor):.4f}.",
        "",
        "| base | discriminator | " + " | ".join(f"{n} NFE" for n in STEPS) + " |",
        "|---|---|" + "---|" * len(STEPS),
    ]
    names = list(dict.fromkeys(r["discriminator"] for r in result["rows"]))
    for base in ("independent", "aot"):
        for disc in names:
            cells = [r for r in result["rows"] if r["base"] == base and r["discriminator"] == disc]
            lines.append(
                f"| {base} | {disc} | " + " | ".join(f"{r['mean']:.4f} +- {r['sd']:.4f}" for r in cells) + " |"
            )
    lines += [
        "",
        "Guided minus unguided, paired by seed block (the same latents), mean +- sd over blocks (negative = better):",
        "",
        "| base | discriminator | " + " | ".join(f"{n} NFE" for n in STEPS) + " |",
        "|---|---|" + "---|" * len(STEPS),
    ]
    for base in ("independent", "aot"):
        plain = {r["nfe"]: r["w2"] for r in result["rows"] if r["base"] == base and r["discriminator"] == "none"}
        for disc in names[1:]:
            cells = []
            for r in result["rows"]:
                if r["base"] == base and r["discriminator"] == disc:
                    d = [g - p for g, p in zip(r["w2"], plain[r["nfe"]])]
                    cells.append(f"{statistics.mean(d):+.4f} +- {statistics.stdev(d):.4f}")
            lines.append(f"| {base} | {disc} | " + " | ".join(cells) + " |")
    if "digits" in result:
        d = result["digits"]
        lines += [
            "",
            f"## Digits ({d['minutes']} min)",
            "",
            f"The digits preset trained {d['kimg']:g} kimg per coupling; `denoiser` discriminators (the base model's "
            f"frozen encoder), {d['epochs']:g} epochs; guidance weight {d.get('weight', s['weight']):g} over DG's "
            f"window (sigma <= {DG_SIGMA_WINDOW:.0f}). FD-digits of {d['samples']} samples against the whole dataset, "
            "mean +- sd over 2 disjoint seed blocks.",
            "",
            "| base | discriminator | 15 NFE | 35 NFE |",
            "|---|---|---|---|",
        ]
        for base in ("independent", "aot"):
            for disc in ("none", "independent", "aot"):
                cells = [r for r in d["rows"] if r["base"] == base and r["discriminator"] == disc]
                lines.append(f"| {base} | {disc} | " + " | ".join(f"{r['mean']:.3f} +- {r['sd']:.3f}" for r in cells)
                             + " |")  # fmt: skip
    # a hand-written reading below the marker survives re-rendering
    old = path.read_text() if path.is_file() else ""
    reading = old[old.index(READING_MARKER) :] if READING_MARKER in old else READING_MARKER + "\n"
    path.write_text("\n".join(lines) + "\n\n" + reading)
    print(f"wrote {path}")


READING_MARKER = "<!-- reading: written by hand from the tables above; kept when the tables are re-rendered -->"


if __name__ == "__main__":
    main()
