"""`aotdiff fid ref | calc`: reference statistics of a dataset, and FID (or a proxy FD) of a run or a set of samples.

Protocol (docs/metrics.md): 50,000 samples, seeds 0-49999, statistics streamed batch by batch (nothing is written
to disk per image), Fréchet distance against EDM-format reference statistics. The detector is named with its SHA-256
next to every number, because two Inception files give different FIDs. For the built-in digits, where Inception
features are meaningless, a proxy CNN is used and the number is called FD-digits (FD-mnist5k for mnist5k).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aotdiff import __version__
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
    check_output_file,
    check_positive,
    guidance_from_args,
    guidance_meta,
    progress_bar,
    settings_from_args,
    variant_tag,
    write_atomic,
)
from aotdiff.generate import MAX_SEEDS, SamplerSettings, check_class_label, parse_seeds, resolve_precision
from aotdiff.metrics import Detector, ReferenceStats, compute_stats, fid_from_stats, format_seeds, save_reference
from aotdiff.metrics.quality import DEFAULT_NUM, PROXY_SPECS, proxy_for

FULL_PROTOCOL = 50_000  # samples in the published FID protocol (EDM, AOT)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "fid",
        help="FID (or FD-digits): reference statistics and evaluation",
        description="Fréchet distances on detector features. `fid ref` computes a dataset's reference statistics "
        "(EDM's .npz layout); `fid calc` generates samples from a run (or reads a samples .npz / image folder), "
        "streams them through the detector and compares with the reference.",
        epilog="Examples:\n  aotdiff fid ref --data cifar-10-python.tar.gz --out cifar10-ref.npz\n"
        "  aotdiff fid calc runs/cifar --ref cifar10-ref.npz --steps 14 --rho 90\n"
        "  aotdiff fid ref --data digits --out digits-ref.npz && aotdiff fid calc runs/digits --ref digits-ref.npz "
        "--num 2000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fsub = p.add_subparsers(dest="fid_command", metavar="{ref,calc}", required=True)

    r = fsub.add_parser("ref", help="reference statistics of a dataset", description="Detector statistics (mean, "
                        "covariance) of every image of a dataset, written in EDM's .npz layout with a 'meta' record "
                        "of the detector (name, SHA-256) and image count.")  # fmt: skip
    r.add_argument("--data", required=True, help="dataset: 'digits', 'digits16', 'mnist5k', an image folder / .zip, "
                   "cifar-10-python.tar.gz or a .npz (images N x H x W x C uint8)")  # fmt: skip
    r.add_argument("--out", type=Path, required=True, help="output .npz (mu, sigma, meta), written exactly as named")
    _add_detector_flags(r)
    add_max_batch_flag(r)
    add_device_flag(r)
    add_threads_flag(r)
    add_progress_flag(r)
    r.set_defaults(run=run_ref)

    c = fsub.add_parser(
        "calc",
        help="FID of a run or of saved samples",
        description="Fréchet distance between the detector statistics of samples and reference statistics. A run "
        "is sampled on the fly (one generator per seed, as `aotdiff sample`); samples are never written to disk. "
        f"Without --num, fewer than {FULL_PROTOCOL:,} samples are refused: the published protocol uses "
        f"{FULL_PROTOCOL:,} and FID is biased upwards at smaller N.",
    )
    c.add_argument("source", type=Path, help="run directory, checkpoint folder, .safetensors, samples .npz "
                   "(images N x H x W x C uint8) or an image folder / .zip")  # fmt: skip
    c.add_argument("--ref", type=Path, required=True, help="reference statistics .npz (from `aotdiff fid ref`, or "
                   "EDM's cifar10-32x32.npz)")  # fmt: skip
    c.add_argument("--num", type=int, default=None, help=f"number of samples (default: {FULL_PROTOCOL:,}; giving "
                   "--num explicitly allows fewer)")  # fmt: skip
    add_sampler_flags(c)
    add_dg_flags(c)
    c.add_argument("--seeds", default=None, help="seeds, e.g. 0-49999 (default: 0 .. num-1)")
    add_class_flag(c)
    add_max_batch_flag(c, default=None)
    add_network_flags(c)
    _add_detector_flags(c)
    c.add_argument("--out", type=Path, default=None, help="result .json (default: next to the source: "
                   "<metric>-<solver><steps>-rho<rho>[-churn40, -raw, -class3, -dg, ...]-n<count>.json for a model, "
                   "<samples>-<metric>.json for stored samples)")  # fmt: skip
    add_device_flag(c)
    add_threads_flag(c)
    add_progress_flag(c)
    add_raw_flag(c)
    c.set_defaults(run=run_calc)


def _add_detector_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--detector", type=Path, default=None, help="Inception-v3 file (pytorch-fid .pth or EDM's .pkl); "
                   "default: $AOTDIFF_DETECTOR or the cache folder (see docs/metrics.md)")  # fmt: skip
    g.add_argument("--proxy", action="store_true", help="use the proxy CNN of the built-in digit datasets (FD-digits; "
                   "FD-mnist5k for 28x28 images); the default for digits, digits16 and mnist5k")  # fmt: skip


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ detectors
def choose_detector(
    args: argparse.Namespace, shape: tuple[int, ...], data: str, ref_meta: dict[str, Any], device: torch.device
) -> Detector:
    """--proxy / --detector if given; else the proxy for the built-in digits (or a proxy-made reference); else
    Inception from $AOTDIFF_DETECTOR or the cache folder."""
    from aotdiff.metrics import load_inception_detector, load_proxy_detector

    ref_detector = str(ref_meta.get("detector", {}).get("name", ""))
    if args.proxy or (args.detector is None and (data in PROXY_SPECS or ref_detector.startswith("proxy-cnn-"))):
        return load_proxy_detector(*proxy_for(shape, data, "--proxy"))
    return load_inception_detector(args.detector, device=device)


def check_reference(reference: ReferenceStats, detector: Detector, ref_path: Path) -> None:
    """Refuse a feature-length mismatch or another proxy network; warn when the reference was made by a different
    Inception file (it may be the same network in another format)."""
    if reference.mu.shape[0] != detector.dim:
        raise ValueError(
            f"reference statistics '{ref_path}' hold {reference.mu.shape[0]}-d features but {detector.name} gives "
            f"{detector.dim}-d ones; make the reference with the same detector (aotdiff fid ref --data DATA "
            f"{'--proxy' if detector.metric != 'FID' else '--detector FILE'} --out REF.npz)"
        )
    recorded = reference.meta.get("detector") or {}
    if not recorded:
        _warn(f"'{ref_path}' does not record its detector (e.g. EDM's published files); make sure it was computed "
              f"with the same network ({detector.name})")  # fmt: skip
    elif detector.metric != "FID" and recorded.get("name") != detector.name:
        # The proxies are aotdiff's own networks, one per dataset and image size: another name is another network
        # (e.g. a 16 px reference for 8 px samples), never the same weights in another file format.
        raise ValueError(
            f"'{ref_path}' was computed with {recorded.get('name')}, but these samples are scored with "
            f"{detector.name}: the distance would compare two different networks' features. Make the reference "
            "from data of the samples' size (aotdiff fid ref --data DATA --proxy --out REF.npz)"
        )
    elif recorded.get("sha256") != detector.sha256:
        # Inception files: EDM's .pkl and pytorch-fid's .pth hold the same network with different hashes.
        _warn(
            f"'{ref_path}' was computed with detector {recorded.get('name')} (SHA-256 {recorded.get('sha256')}), "
            f"but this evaluation uses {detector.name} (SHA-256 {detector.sha256}): the distance is not meaningful "
            "unless both are the same network"
        )


# ------------------------------------------------------------------------------------------------ fid ref
def run_ref(args: argparse.Namespace) -> int:
    from aotdiff.data import ImageDataset, load_dataset
    from aotdiff.train.distributed import pick_device

    check_positive(args.max_batch, "--max-batch")
    device = pick_device(args.device)
    check_output_file(args.out, ".npz")  # before reading the dataset: a typo should not cost a pass over it
    data = load_dataset(args.data)
    if not isinstance(data, ImageDataset):
        raise ValueError(f"--data {args.data} holds 2-D points, not images; toy runs are scored with W2 "
                         "(aotdiff sweep RUN --metric w2)")  # fmt: skip
    namespace = argparse.Namespace(proxy=args.proxy, detector=args.detector)
    detector = choose_detector(namespace, data.shape, args.data, {}, device)
    bar = progress_bar(args, len(data), "img", f"{detector.metric} reference")
    step = args.max_batch
    batches = (torch.from_numpy(data.images[i : i + step]) for i in range(0, len(data), step))
    stats = compute_stats(batches, detector, progress=bar.update)
    bar.close()
    meta = {"data": str(args.data), "detector": detector.describe(), "aotdiff": __version__}
    save_reference(args.out, stats, meta)
    print(f"wrote {args.out}: {detector.metric} reference statistics of {stats.count} images "
          f"(detector {detector.name}, SHA-256 {detector.sha256})")  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------ fid calc
@dataclass
class SampleSource:
    """Where the images come from: a model to sample, or stored images (uint8 NCHW)."""

    kind: str  # 'model' | 'npz' | 'folder'
    path: Path
    shape: tuple[int, ...]
    data: str = ""  # training data of a model ('' for stored images)
    model: Any = None  # aotdiff.train.checkpoint.LoadedModel
    images: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _is_model_path(path: Path) -> bool:
    if path.suffix in (".safetensors", ".pkl"):  # aotdiff weights, or an EDM-format network pickle (read safely)
        return True
    return path.is_dir() and ((path / "checkpoints").is_dir() or (path / "ema.safetensors").is_file())


def open_source(path: Path, *, ema: bool, device: torch.device) -> SampleSource:
    """A run / checkpoint / weights file, a samples .npz or an image folder / .zip."""
    from aotdiff.data import load_image_folder, load_npz
    from aotdiff.data.npz import is_npz
    from aotdiff.train.checkpoint import load_model

    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist; give a run directory, a samples .npz or an image folder")
    if _is_model_path(path):
        model = load_model(path, ema=ema, device=device)
        if len(model.shape) != 3:
            raise ValueError(f"'{path}' is a 2-D point model: score it with W2 (aotdiff sweep {path} --metric w2)")
        info = {"nimg": model.nimg, "weights": str(model.source), "data": model.config.get("data"),
                "coupling": model.config.get("coupling")}  # fmt: skip
        return SampleSource("model", path, tuple(model.shape), str(model.config.get("data", "")), model, info=info)
    if path.suffix == ".npz":
        if path.is_file() and not is_npz(path):
            raise ValueError(f"'{path}' is not an .npz archive: give samples written by `aotdiff sample`, an image "
                             "folder or .zip, or a model")  # fmt: skip
        with np.load(path, allow_pickle=False) as archive:
            if "points" in archive.files and "images" not in archive.files:
                raise ValueError(f"'{path}' holds 2-D points, not images; toy samples are scored with W2")
        data = load_npz(path)
        return SampleSource("npz", path, data.shape, images=data.images)
    if path.is_dir() or path.suffix == ".zip":
        data = load_image_folder(path)
        return SampleSource("folder", path, data.shape, images=data.images)
    raise ValueError(f"'{path}' is neither a run, a .npz of samples nor an image folder / .zip")


def resolve_count(args: argparse.Namespace, source: SampleSource) -> tuple[int, list[int] | None]:
    """(number of samples, seeds for a model); refuses fewer than 50,000 unless --num was given explicitly."""
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if source.kind == "model":
        available = len(seeds) if seeds is not None else None
    else:
        if seeds is not None:
            raise ValueError(f"--seeds applies to sampling a run; '{source.path}' holds stored images (use --num)")
        available = len(source.images) if source.images is not None else 0
    if args.num is None:
        count = available if available is not None else FULL_PROTOCOL
        if count < FULL_PROTOCOL:
            what = f"--seeds {args.seeds} gives" if source.kind == "model" else f"'{source.path}' holds"
            raise ValueError(
                f"{what} {count:,} samples, but the FID protocol uses {FULL_PROTOCOL:,}: with fewer the distance is "
                f"biased upwards and not comparable with published numbers. Pass --num {count} explicitly to compute "
                "it on fewer anyway."
            )
    else:
        count = args.num
        if count < 2:
            raise ValueError(f"--num must be at least 2 (a covariance needs two samples), got {count}")
        if count > MAX_SEEDS:
            raise ValueError(f"--num {count:,} is more samples than one command makes ({MAX_SEEDS:,})")
        if available is not None and count > available:
            what = f"--seeds {args.seeds} gives" if source.kind == "model" else f"'{source.path}' holds"
            raise ValueError(f"--num {count} asks for more samples than {what} ({available}); lower --num")
    if source.kind == "model":
        seeds = seeds[:count] if seeds is not None else list(range(count))
    return count, seeds


def _note_protocol_count(count: int, metric: str) -> None:
    """Say, before it starts, that the default is the full protocol: on a CPU that is many minutes of sampling.
    A proxy FD (FD-digits, ...) keeps the protocol's count by default (numbers stay comparable between runs of
    the command) but is never compared with published FIDs, so the note offers the sweep's count."""
    hint = "--num N for fewer"
    if metric != "FID":
        hint = (f"{metric} is not comparable with published FIDs: --num {DEFAULT_NUM['fd']:,}, as `aotdiff sweep` "
                f"uses, takes 1/{FULL_PROTOCOL // DEFAULT_NUM['fd']} of the time")  # fmt: skip
    print(f"{metric}: scoring {count:,} samples (the FID protocol's {FULL_PROTOCOL:,}; {hint})", file=sys.stderr)


def _counting(batches: Iterator[Any], counted: list[int], dg_counted: list[int]) -> Iterator[Any]:
    """Pass generator batches through, noting the network evaluations (and discriminator gradients) each counted."""
    for b in batches:
        counted.append(b.nfe)
        dg_counted.append(b.guidance_evals)
        yield b


def _stored_batches(images: np.ndarray, count: int, batch: int) -> Iterator[torch.Tensor]:
    for i in range(0, count, batch):
        yield torch.from_numpy(images[i : min(i + batch, count)])


def default_out(
    source: SampleSource, metric: str, settings: SamplerSettings | None, count: int, variant: str = ""
) -> Path:
    """Next to the model: <metric>-<solver><steps>-rho<rho><variant>-n<count>.json (``variant``:
    :func:`aotdiff.cli.common.variant_tag`), prefixed with a weights file's name; next to stored samples:
    <samples>-<metric>.json."""
    tag = metric.lower()
    if source.kind == "model":
        assert settings is not None
        name = f"{tag}-{settings.solver}{settings.steps}-rho{settings.rho:g}{variant}-n{count}.json"
        if source.path.is_dir():
            return source.path / name
        return source.path.parent / f"{source.path.stem}-{name}"
    if source.kind == "npz" or source.path.suffix == ".zip":
        return source.path.with_name(f"{source.path.stem}-{tag}.json")
    return source.path.parent / f"{source.path.name}-{tag}.json"


def run_calc(args: argparse.Namespace) -> int:
    from aotdiff.generate import PreparedDenoiser, auto_max_batch, generate
    from aotdiff.metrics import load_reference
    from aotdiff.train.distributed import pick_device

    # Every number the user typed is checked before any file is read (the sampler settings apply to a model source).
    if args.max_batch is not None:
        check_positive(args.max_batch, "--max-batch")
    given_settings = settings_from_args(args)
    check_class_index(args.class_label)
    check_dg_flags(args)
    if args.out is not None:
        check_output_file(args.out, ".json")
    reference = load_reference(args.ref)  # first: a wrong path should not cost a model load
    device = pick_device(args.device)
    resolve_precision(args.precision, device)  # bf16 on a GPU without it: refused before the model is loaded
    source = open_source(args.source, ema=not args.raw, device=device)
    count, seeds = resolve_count(args, source)
    settings = given_settings if source.kind == "model" else None
    guidance = None
    if source.kind == "model":
        check_class_label(args.class_label, source.model.num_classes)
        guidance = guidance_from_args(args, source.model.num_classes, device)
    elif args.dg is not None:
        raise ValueError("--dg guides a sampler: give a model, not stored samples")
    elif args.precision != "auto" or args.compile:
        raise ValueError("--precision and --compile set how a model's network runs: give a model, not stored samples")
    detector = choose_detector(args, source.shape, source.data, reference.meta, device)
    check_reference(reference, detector, args.ref)
    # The default output name needs the detector; it is still checked before the (long) sampling starts.
    out = args.out or check_output_file(
        default_out(source, detector.metric, settings, count, variant_tag(args)), ".json"
    )
    if source.kind == "model" and args.num is None and args.seeds is None:
        _note_protocol_count(count, detector.metric)

    bar = progress_bar(args, count, "img", detector.metric)
    start = time.perf_counter()
    counted: list[int] = []  # network evaluations per sample, as the sampler counted them
    dg_counted: list[int] = []  # discriminator gradients per sample (Discriminator Guidance)
    network: dict[str, Any] = {"precision": None, "compile": None}  # stored images: no network ran
    if source.kind == "model":
        assert seeds is not None and settings is not None
        denoiser = PreparedDenoiser(source.model.denoiser, precision=args.precision, compile=args.compile,
                                    device=device)  # fmt: skip
        network = denoiser.describe()
        max_batch = args.max_batch or auto_max_batch(
            denoiser, source.model.shape, device, num_classes=source.model.num_classes, default=DEFAULT_MAX_BATCH
        )
        batches: Any = _counting(
            generate(
                denoiser, seeds, source.model.shape, settings=settings, num_classes=source.model.num_classes,
                class_label=args.class_label, batch_size=max_batch, device=device, guidance=guidance,
            ),
            counted,
            dg_counted,
        )  # fmt: skip
    else:
        assert source.images is not None
        batches = _stored_batches(source.images, count, args.max_batch or DEFAULT_MAX_BATCH)
    stats = compute_stats(batches, detector, max_items=count, progress=bar.update)
    bar.close()
    elapsed = time.perf_counter() - start
    value = fid_from_stats(stats, reference)

    nfe = max(counted) if counted else None
    result = {
        "metric": detector.metric,
        "value": value,
        "num": stats.count,
        "detector": detector.describe(),
        "reference": {"path": str(args.ref), "meta": reference.meta},
        "source": {"kind": source.kind, "path": str(args.source), **source.info},
        "sampler": settings.to_dict() if settings is not None else None,
        "nfe": nfe,
        **network,  # the network's precision and whether it was compiled (None for stored images)
        "guidance": guidance_meta(guidance, args),
        "discriminator_evals": max(dg_counted) if dg_counted else 0,
        "seeds": format_seeds(seeds) if seeds is not None else None,
        "class": args.class_label,
        "time_s": round(elapsed, 3),
        "img_per_s": round(stats.count / max(elapsed, 1e-9), 2),
        "aotdiff": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_atomic(out, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))

    how = (
        f"sampler {settings.solver} {settings.steps} steps, rho {settings.rho:g}, {nfe} NFE, {network['precision']} "
        f"network, seeds {result['seeds']}"
        if settings is not None else f"stored images from {args.source}"
    )  # fmt: skip
    print(f"{detector.metric} {value:.4f}  (N = {stats.count:,}; detector {detector.name}, SHA-256 {detector.sha256};"
          f" {how})")  # fmt: skip
    print(f"wrote {out}")
    return 0
