"""Checkpoints that survive crashes, preemption and full disks, and never unpickle code.

Models for sampling (``load_model``) also come from EDM-format network pickles, read by :mod:`aotdiff.interop`
without executing anything in them.

Layout: ``RUN/checkpoints/<nimg, 10 digits>/`` holding

* ``model.safetensors`` and ``ema.safetensors`` — weights, with the run configuration and the network's constructor
  arguments in the safetensors metadata, so one file is enough to rebuild and sample the model;
* ``state.pt`` — optimizer, counters, RNG states, pool state: tensors and plain Python values only, loadable with
  ``torch.load(weights_only=True)``;
* ``manifest.json`` — size and SHA-256 of each file, written last.

A checkpoint is first written to a hidden temporary folder, every file is fsync'ed, then the folder is renamed into
place (an atomic operation on POSIX file systems). A checkpoint whose manifest is missing or does not match its files
(truncated copy, bit rot, a crash on a non-POSIX file system) is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
STATE_FILE = "state.pt"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or written; the message names the path and the fix."""


class NotADiffusionModelError(CheckpointError):
    """The weights are a discriminator's (`aotdiff dg train`); ``base`` is the model it was trained for ("" when it
    does not say), so each command can say what to do with it."""

    def __init__(self, message: str, base: str = ""):
        super().__init__(message)
        self.base = base


class WeightsMismatchError(ValueError):
    """Saved weights do not fit a network (other architecture or size); the message summarises how."""


def weights_mismatch(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> str:
    """How ``tensors`` fail to fit ``module.load_state_dict`` ('' when they fit), in one short line.

    torch's own error lists every key (thousands of characters for a U-Net); a user needs the kind of mismatch and
    an example of each."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    reshaped = [k for k in expected if k in tensors and tuple(expected[k].shape) != tuple(tensors[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the network missing from the file (e.g. '{missing[0]}')")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) the network does not have (e.g. '{unexpected[0]}')")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. '{k}': {list(tensors[k].shape)} in the file, "
                     f"{list(expected[k].shape)} in the network)")  # fmt: skip
    return "; ".join(parts)


def load_matching(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(tensors)``, or a :class:`WeightsMismatchError` naming ``what`` and the mismatch."""
    problem = weights_mismatch(module, tensors)
    if problem:
        raise WeightsMismatchError(f"{what} do not fit this network: {problem}")
    module.load_state_dict(tensors)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return safetensors_bytes(tensors, metadata=metadata)


def save_checkpoint(
    run_dir: str | Path,
    nimg: int,
    *,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    state: dict[str, Any],
    metadata: dict[str, str],
    keep: int = 3,
) -> Path:
    """Write one checkpoint atomically, then delete all but the newest ``keep``. Returns the checkpoint folder.

    On any failure (e.g. disk full) the temporary folder is removed, earlier checkpoints are untouched, and a
    :class:`CheckpointError` explains what happened.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{nimg:010d}"
    tmp = root / f".tmp-{nimg:010d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        buf = io.BytesIO()
        torch.save(state, buf)
        blobs = {
            "model.safetensors": _weights_bytes(model, metadata),
            "ema.safetensors": _weights_bytes(ema, metadata),
            STATE_FILE: buf.getvalue(),
        }
        files: dict[str, dict[str, Any]] = {}
        manifest = {"nimg": nimg, "files": files}
        for name, data in blobs.items():
            _fsync_write(tmp / name, data)
            files[name] = {"bytes": len(data), "sha256": _sha256(data)}
        _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        if final.exists():  # same image count written twice (e.g. a preemption right after a snapshot)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final}: {e.strerror or e}. Earlier checkpoints in {root} are intact; "
            "free some disk space (or lower --keep-checkpoints) and training will save again at the next snapshot"
        ) from e
    prune(run_dir, keep)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (temporary folders excluded)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def prune(run_dir: str | Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    remove_temporary(run_dir, keep_own=True)


def remove_temporary(run_dir: str | Path, *, keep_own: bool = False) -> list[Path]:
    """Delete the temporary folders a killed save left behind (call only while holding the run's lock)."""
    root = checkpoint_dir(run_dir)
    removed = []
    for tmp in root.glob(".tmp-*") if root.is_dir() else []:
        if keep_own and tmp.name.endswith(f"-{os.getpid()}"):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def verify(ckpt: Path) -> None:
    """Raise :class:`CheckpointError` unless every file matches the manifest."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt} has no {MANIFEST} (incomplete write)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable: {e}") from e
    for name, info in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        data = path.read_bytes()
        if len(data) != info["bytes"] or _sha256(data) != info["sha256"]:
            raise CheckpointError(f"{path} is truncated or corrupt (size/SHA-256 differ from {MANIFEST})")


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    state: dict[str, Any]
    metadata: dict[str, str]


def read_weights(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or of an EDM-format pickle converted on the fly (the 'ema' network,
    in aotdiff's names, with the metadata ``aotdiff convert`` would write). Never executes code from the file."""
    if is_edm_pickle(Path(path)):
        from aotdiff.interop.convert import edm_pickle_weights

        tensors, metadata = edm_pickle_weights(path)
        return {k: v.to(device) for k, v in tensors.items()}, metadata
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except OSError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError (truncated file, bad header, not safetensors)
        raise CheckpointError(
            f"{path} is not a readable .safetensors file ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it may be truncated or corrupt: use another checkpoint"
        ) from None
    return tensors, metadata


def load_checkpoint(ckpt: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    ckpt = Path(ckpt)
    verify(ckpt)
    model, metadata = read_weights(ckpt / "model.safetensors", device)
    ema, _ = read_weights(ckpt / "ema.safetensors", device)
    return Checkpoint(ckpt, model, ema, load_state(ckpt / STATE_FILE, device), metadata)


def load_state(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """``state.pt`` with weights-only unpickling; anything else inside is refused (never executed)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests retrying with weights_only=False, i.e. running the file's code: never.
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values (not written by aotdiff, or tampered with); "
            "it was refused without running anything"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not the state dict aotdiff writes")
    return state


def find_resumable(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint that loads, and a line per newer checkpoint that did not (path: reason)."""
    problems: list[str] = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(ckpt, device), problems
        except (CheckpointError, OSError, RuntimeError, KeyError, ValueError) as e:
            problems.append(f"{ckpt}: {e}")
    return None, problems


def load_latest(run_dir: str | Path, device: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are skipped with a warning. None if there is none."""
    latest, problems = find_resumable(run_dir, device)
    for problem in problems:
        warnings.warn(f"skipping checkpoint {problem}; trying the previous one", stacklevel=2)
    return latest


# ------------------------------------------------------------------------------------------ models for sampling
@dataclass
class LoadedModel:
    """A trained denoiser ready to sample, with what is needed to interpret it."""

    denoiser: torch.nn.Module  # aotdiff.diffusion.Precond in eval mode
    shape: tuple[int, ...]  # one item: (C, H, W) or (D,)
    num_classes: int  # 0 = unconditional
    config: dict[str, Any]  # the training configuration
    nimg: int  # images seen when saved
    source: Path  # the weights file


def resolve_weights(path: str | Path, ema: bool = True) -> Path:
    """A run directory, a checkpoint folder, a .safetensors file or an EDM-format network pickle -> the file to load.

    A file is returned as is whatever ``ema`` says: it holds one network (a pickle's entry is chosen when reading).
    """
    p = Path(path)
    name = "ema.safetensors" if ema else "model.safetensors"
    if p.is_file():
        if p.suffix != ".safetensors" and not is_edm_pickle(p):
            raise CheckpointError(
                f"{p} is neither a .safetensors file nor an EDM network pickle (.pkl); give a run directory, "
                "a checkpoint folder, a .safetensors file or an EDM .pkl"
            )
        return p
    if (p / name).is_file():
        return p / name
    if p.is_dir() and p == checkpoint_dir(p.parent) and list_checkpoints(p.parent):
        return resolve_weights(p.parent, ema)  # RUN/checkpoints: the run's latest, as for RUN
    if p.is_dir():
        for ckpt in reversed(list_checkpoints(p)):
            try:
                verify(ckpt)
                return ckpt / name
            except CheckpointError as e:
                warnings.warn(f"skipping checkpoint {ckpt}: {e}", stacklevel=2)
        from aotdiff.train.rundir import CONFIG_FILE, LOCK_FILE, running_holder

        holder = running_holder(p)
        if holder is not None and not list_checkpoints(p):
            raise CheckpointError(
                f"{p} holds no checkpoint yet: it is training ({holder}); the first is written at its first "
                "snapshot (--snapshot-kimg), then sample it"
            )
        if not any((p / marker).exists() for marker in ("checkpoints", CONFIG_FILE, LOCK_FILE)):
            # Not a run at all: "train first (aotdiff train --out DIR)" would start a run inside any folder given.
            raise CheckpointError(
                f"{p} is not a run directory (no config.json, no checkpoints/); give a run directory, a checkpoint "
                "folder, a .safetensors file or an EDM .pkl"
            )
        raise CheckpointError(f"{p} holds no usable checkpoint; train first (aotdiff train --out {p})")
    raise CheckpointError(
        f"{p} does not exist; give a run directory, a checkpoint folder, a .safetensors file or an EDM .pkl"
    )


def is_edm_pickle(path: str | Path) -> bool:
    """An EDM-format network pickle (a .pkl name or pickle's first bytes), as opposed to aotdiff's .safetensors."""
    from aotdiff.interop.edm_pickle import looks_like_pickle  # lazily: aotdiff.interop imports this module

    return looks_like_pickle(path)


def load_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a trained denoiser from a run directory (latest checkpoint), a checkpoint folder, a weights file or an
    EDM-format network pickle (EDM's / EDM-AOT's ``*.pkl``: its 'ema' network, or 'net' with ``ema=False``; read
    without running anything in it)."""
    from aotdiff.diffusion import Precond
    from aotdiff.nets import build_network

    weights = resolve_weights(path, ema)
    if is_edm_pickle(weights):
        from aotdiff.interop.convert import convert_edm_pickle

        converted = convert_edm_pickle(weights, which=None if ema else "net")
        model, meta = converted.denoiser, converted.metadata
    else:
        tensors, meta = read_weights(weights, device)
        if "discriminator" in meta:  # an `aotdiff dg train` run: it guides a model, it is not one
            base = json.loads(meta.get("config", "{}")).get("base", "")
            raise NotADiffusionModelError(
                f"{path} is a discriminator (`aotdiff dg train`), not a diffusion model: guide with it via --dg {path} "
                f"and give the diffusion model{f' it was trained for ({base})' if base else ''} as the model",
                base=str(base),
            )
        if "network" not in meta or "shape" not in meta:
            raise CheckpointError(f"{weights} was not written by aotdiff (no network description in its metadata)")
        raw = build_network(**json.loads(meta["network"]))
        sigma_data = float(meta.get("sigma_data", "0.5"))  # written by `aotdiff convert` (EDM's sigma_data)
        model = Precond(raw, label_dim=int(meta.get("label_dim", "0")), sigma_data=sigma_data)
        model.load_state_dict(tensors)
    model.to(device).eval().requires_grad_(False)
    label_dim = int(meta.get("label_dim", "0"))
    return LoadedModel(
        denoiser=model,
        shape=tuple(json.loads(meta["shape"])),
        num_classes=label_dim,
        config=json.loads(meta.get("config", "{}")),
        nimg=int(meta.get("nimg", "0")),
        source=weights,
    )
