"""`aotdiff convert`: EDM-format pickles -> aotdiff weights, and aotdiff models -> EDM-named state dicts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from aotdiff.cli import UserError
from aotdiff.cli.common import (
    add_device_flag,
    add_progress_flag,
    add_threads_flag,
    check_model_path,
    check_output_file,
    write_atomic,
)

NAMES = ("aotdiff", "edm")
_SUFFIX = {"aotdiff": ".safetensors", "edm": ".pt"}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert EDM / EDM-AOT network pickles to aotdiff weights (or aotdiff models to EDM names)",
        description="EDM-format pickle (EDM's edm-cifar10-32x32-*.pkl, EDM-AOT's network-snapshot-*.pkl) -> an aotdiff "
        ".safetensors file, read without running any code from the pickle; or an aotdiff model (run, checkpoint, "
        ".safetensors, or a pickle) -> a plain state dict in EDM's key names (--names edm, a .pt file that EDM's "
        "EDMPrecond.load_state_dict accepts and torch.load(..., weights_only=True) reads).",
        epilog="Examples: aotdiff convert edm-cifar10-32x32-uncond-vp.pkl --out edm-uncond-vp.safetensors; "
        "aotdiff convert runs/cifar10 --out cifar10-edm.pt --names edm",
    )
    p.add_argument("source", type=Path, help="EDM .pkl, run directory, checkpoint folder or .safetensors")
    p.add_argument(
        "--out", type=Path, required=True, help="output file: .safetensors (aotdiff names) or .pt (EDM names)"
    )
    p.add_argument("--names", choices=NAMES, default=None,
                   help="key names of the output (default: from --out: .safetensors -> aotdiff, .pt -> edm)")  # fmt: skip
    p.add_argument("--which", choices=("ema", "net"), default="ema",
                   help="the network to convert: the EMA (default; EDM snapshots hold only this) or the raw one")  # fmt: skip
    add_device_flag(p)  # where the converted network is test-run once before it is written
    add_threads_flag(p)
    add_progress_flag(p)  # accepted like every command's; conversion shows no progress bar
    p.set_defaults(run=run)


def _names(args: argparse.Namespace) -> str:
    suffix = args.out.suffix.lower()
    names = args.names or next((n for n, s in _SUFFIX.items() if s == suffix), None)
    if names is None or suffix != _SUFFIX[names]:
        want = " or ".join(f"{s} ({n} names)" for n, s in _SUFFIX.items())
        got = f"--names {names} needs {_SUFFIX[names]}" if names else f"give {want}"
        raise UserError(f"--out {args.out}: {got}")
    return names


def run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save as safetensors_bytes

    from aotdiff.interop.convert import check_runs, convert_edm_pickle, edm_precond_kwargs, edm_state_dict
    from aotdiff.train.checkpoint import is_edm_pickle, load_model, read_weights, resolve_weights
    from aotdiff.train.distributed import pick_device

    names = _names(args)
    device = pick_device(args.device)
    check_model_path(args.source)
    out = check_output_file(args.out, _SUFFIX[names])
    weights = resolve_weights(args.source, ema=args.which == "ema")
    if is_edm_pickle(weights):
        converted = convert_edm_pickle(weights, which=args.which)
        denoiser, metadata = converted.denoiser, converted.metadata
        tensors = {k: v.contiguous() for k, v in denoiser.state_dict().items()}
    else:  # already aotdiff's: one self-contained weights file (e.g. the EMA of a run's newest checkpoint)
        denoiser = load_model(weights, ema=args.which == "ema").denoiser
        tensors, metadata = read_weights(weights)
    check_runs(denoiser, tuple(json.loads(metadata["shape"])), device)
    denoiser.to("cpu")
    if names == "aotdiff":
        write_atomic(out, lambda f: f.write(safetensors_bytes(tensors, metadata=metadata)))
        print(f"wrote {out} ({len(tensors)} tensors) from {weights}")
        if "source_sha256" in metadata:
            print(f"source {metadata['source_file']} SHA-256 {metadata['source_sha256']}")
        return 0
    state = edm_state_dict(denoiser)
    write_atomic(out, lambda f: torch.save(dict(state), f))
    print(f"wrote {out} ({len(state)} tensors in EDM's names) from {weights}")
    # EDM's networks are built from their constructor arguments; the state dict alone does not say them.
    print(f"EDMPrecond arguments: {json.dumps(edm_precond_kwargs(denoiser))}")
    return 0
