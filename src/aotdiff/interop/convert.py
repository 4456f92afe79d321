"""EDM-format pickles -> aotdiff models, and aotdiff models -> EDM-named state dicts.

Supported: EDM's ``EDMPrecond`` around a ``SongUNet`` (DDPM++ or NCSN++, any resolution, widths, label_dim,
augment_dim), which covers EDM's ``edm-cifar10-32x32-{cond,uncond}-{vp,ve}.pkl`` and EDM-AOT's snapshots. The
architecture comes from the pickled ``SongUNet``'s constructor arguments (``_init_kwargs``); the weights are then
matched to it by name and shape (:mod:`aotdiff.interop.edm_names`), and ``sigma_data`` comes from the pickled
``EDMPrecond``. EDM runs the network in float16 on CUDA when ``use_fp16`` is set; aotdiff runs it in float32 (the
flag is kept in the metadata).
"""

from __future__ import annotations

import inspect
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aotdiff.interop.edm_names import from_edm_state_dict, to_edm_state_dict
from aotdiff.interop.edm_pickle import (
    EdmPickleError,
    PersistentObject,
    class_name,
    module_tensors,
    read_edm_pickle,
)
from aotdiff.nets import build_network
from aotdiff.nets.songunet import SONGUNET_ARGS, SongUNet

SUPPORTED = (
    "supported: EDM's EDMPrecond around a SongUNet (DDPM++ or NCSN++, e.g. EDM's edm-cifar10-32x32-*-vp/ve.pkl and "
    "EDM-AOT's network snapshots)"
)
_OTHER_PRECONDS = {
    "VPPrecond": "VP preconditioning (VPPrecond)",
    "VEPrecond": "VE preconditioning (VEPrecond)",
    "iDDPMPrecond": "iDDPM preconditioning (iDDPMPrecond)",
    "Precond": "an EDM2 network (Precond)",
}
_OTHER_MODELS = {"DhariwalUNet": "ADM (DhariwalUNet)", "UNet": "an EDM2 U-Net"}
# EDMPrecond's own arguments; everything else in its _init_kwargs is passed on to the SongUNet
_PRECOND_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data")
_SONGUNET_DEFAULTS: dict[str, Any] = {
    name: p.default
    for name, p in inspect.signature(SongUNet.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}
# Settings that make a SongUNet DDPM++ or NCSN++ (the name only labels the config; all arguments are explicit)
_FLAVOURS: dict[str, dict[str, Any]] = {
    "ddpmpp": dict(
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=[1.0, 1.0],
    ),
    "ncsnpp": dict(
        embedding_type="fourier",
        channel_mult_noise=2,
        encoder_type="residual",
        decoder_type="standard",
        resample_filter=[1.0, 3.0, 3.0, 1.0],
    ),
}
FORMAT = "aotdiff/1"


@dataclass
class ConvertedModel:
    """An EDM network as an aotdiff denoiser, with the metadata a converted .safetensors file carries."""

    denoiser: Any  # aotdiff.diffusion.Precond, eval mode, on the CPU
    metadata: dict[str, str]


def _plain(value: Any, where: str) -> Any:
    """A constructor argument as JSON-able Python (NumPy scalars unwrapped, tuples as lists)."""
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    raise EdmPickleError(f"{where}: a network argument of type {type(value).__name__} is not understood")


def songunet_arguments(model: PersistentObject, precond: PersistentObject, source: str) -> dict[str, Any]:
    """The SongUNet's constructor arguments: its recorded ``_init_kwargs`` (else EDMPrecond's), EDM's defaults for
    the rest (aotdiff's SongUNet has the same defaults)."""
    kwargs = model.state.get("_init_kwargs")
    args = model.state.get("_init_args") or ()
    if isinstance(kwargs, dict):
        given = dict(kwargs)
    else:  # constructed without recording its arguments: EDMPrecond passes its own on, as EDM does
        outer = precond.state.get("_init_kwargs")
        if not isinstance(outer, dict) or "img_resolution" not in outer:
            raise EdmPickleError(f"{source}: the network does not record its constructor arguments (_init_kwargs)")
        given = {k: v for k, v in outer.items() if k not in _PRECOND_ARGS and k != "model_type"}
        channels = outer.get("img_channels", 3)
        given.update(img_resolution=outer["img_resolution"], in_channels=channels, out_channels=channels)
        given["label_dim"] = outer.get("label_dim", 0)
    if not isinstance(args, tuple | list) or len(args) > len(SONGUNET_ARGS):
        raise EdmPickleError(f"{source}: the network's positional arguments are not understood")
    given.update(zip(SONGUNET_ARGS, args))
    unknown = sorted(str(k) for k in set(given) - set(SONGUNET_ARGS))
    if unknown:
        raise EdmPickleError(f"{source}: SongUNet argument(s) {unknown} are not supported by aotdiff's SongUNet")
    merged = {**_SONGUNET_DEFAULTS, **given}
    missing = [k for k in SONGUNET_ARGS if k not in merged]
    if missing:
        raise EdmPickleError(f"{source}: the network's arguments lack {missing}")
    return {k: _plain(merged[k], source) for k in SONGUNET_ARGS}


def flavour(args: dict[str, Any]) -> str:
    """'ddpmpp', 'ncsnpp', or 'songunet' (another combination of embedding / encoder / decoder / filter)."""
    for name, settings in _FLAVOURS.items():
        if all(
            [float(t) for t in args[k]] == v if k == "resample_filter" else args[k] == v for k, v in settings.items()
        ):
            return name
    return "songunet"


def _pick_network(data: Any, which: str | None, source: str) -> tuple[str, PersistentObject]:
    if isinstance(data, PersistentObject):  # a bare pickled network rather than a snapshot dict
        return "(file)", data
    if not isinstance(data, dict):
        raise EdmPickleError(f"{source} holds a {class_name(data)}, not an EDM network snapshot (a dict with 'ema')")
    keys = [str(k) for k in data]
    if which is None:
        which = "ema" if "ema" in data else "net" if "net" in data else None
        if which is None:
            raise EdmPickleError(f"{source} has no 'ema' network (it holds {keys}); not an EDM network snapshot")
    if which not in data:
        hint = " (EDM's snapshots keep only the EMA network, 'ema')" if which == "net" else ""
        raise EdmPickleError(f"{source} has no '{which}' entry; it holds {keys}{hint}")
    net = data[which]
    if not isinstance(net, PersistentObject):
        raise EdmPickleError(f"{source}: '{which}' is a {class_name(net)}, not a pickled EDM network")
    return which, net


def _check_supported(precond: PersistentObject, source: str) -> PersistentObject:
    name = precond.class_name
    if name != "EDMPrecond":
        what = _OTHER_PRECONDS.get(name, f"a '{name}'")
        raise EdmPickleError(f"{source}: the network is {what}, which aotdiff does not run; {SUPPORTED}")
    model = precond.modules.get("model")
    if not isinstance(model, PersistentObject):
        raise EdmPickleError(f"{source}: EDMPrecond holds no pickled 'model' network")
    if model.class_name != "SongUNet":
        what = _OTHER_MODELS.get(model.class_name, f"a '{model.class_name}'")
        raise EdmPickleError(f"{source}: the U-Net is {what}, which aotdiff does not have; {SUPPORTED}")
    return model


def _snapshot_nimg(path: Path) -> int:
    """Images seen, from EDM's file name network-snapshot-<kimg>.pkl (0 when the name does not say)."""
    match = re.search(r"network-snapshot-(\d+)", path.name)
    return int(match.group(1)) * 1000 if match else 0


def convert_edm_pickle(path: str | Path, which: str | None = None) -> ConvertedModel:
    """Read an EDM-format pickle safely and return the equivalent aotdiff denoiser (``which``: the snapshot entry,
    default 'ema', else 'net'). Raises a one-line :class:`EdmPickleError` for anything unsupported or inconsistent."""
    from aotdiff.diffusion import Precond

    pickled = read_edm_pickle(path)
    source = str(pickled.path)
    entry, precond_obj = _pick_network(pickled.data, which, source)
    model_obj = _check_supported(precond_obj, source)
    args = songunet_arguments(model_obj, precond_obj, source)
    name = flavour(args)
    try:
        with torch.device("meta"):  # names and shapes first: nothing allocated for an architecture the file lacks
            skeleton = build_network(name, **args)
    except ValueError as e:
        raise EdmPickleError(f"{source}: its network arguments do not build a SongUNet here: {e}") from None
    assert isinstance(skeleton, SongUNet)
    weights = from_edm_state_dict(skeleton, module_tensors(model_obj, "model."), source)
    net = build_network(name, **args)
    net.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()})

    state = precond_obj.state
    sigma_data = float(_plain(state.get("sigma_data", 0.5), source))
    label_dim = int(args["label_dim"])
    if int(_plain(state.get("label_dim", label_dim), source)) != label_dim:
        raise EdmPickleError(f"{source}: EDMPrecond and its SongUNet disagree on label_dim")
    denoiser = Precond(net, label_dim=label_dim, sigma_data=sigma_data).eval().requires_grad_(False)

    dataset = pickled.data.get("dataset_kwargs") if isinstance(pickled.data, dict) else None
    data_path = dataset.get("path") if isinstance(dataset, dict) else None
    config = {"origin": "EDM pickle", "data": data_path if isinstance(data_path, str) else ""}
    metadata = {
        "format": FORMAT,
        "network": json.dumps(net.config),
        "shape": json.dumps([args["in_channels"], args["img_resolution"], args["img_resolution"]]),
        "label_dim": str(label_dim),
        "sigma_data": repr(sigma_data),
        "config": json.dumps(config),
        "nimg": str(_snapshot_nimg(pickled.path)),
        "source_file": pickled.path.name,
        "source_sha256": pickled.sha256,
        "edm_classes": json.dumps({"entry": entry, "precond": precond_obj.class_name, "model": model_obj.class_name}),
        "edm_module_sha256": precond_obj.module_sha256,  # the embedded networks.py source (never executed)
        "edm_use_fp16": str(bool(_plain(state.get("use_fp16", False), source))).lower(),
    }
    return ConvertedModel(denoiser, metadata)


def edm_pickle_weights(path: str | Path, which: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict in aotdiff's names, metadata): what ``aotdiff convert FILE.pkl --out X.safetensors`` writes."""
    converted = convert_edm_pickle(path, which)
    return dict(converted.denoiser.state_dict()), converted.metadata


# ------------------------------------------------------------------------------------------ the other direction
def _songunet_of(denoiser: torch.nn.Module) -> SongUNet:
    net = getattr(denoiser, "net", None)
    if not isinstance(net, SongUNet):
        raise ValueError(
            f"only SongUNet models have EDM names; this model's network is a {type(net).__name__} (2-D toy models "
            "have no EDM counterpart)"
        )
    return net


def edm_state_dict(denoiser: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """An aotdiff denoiser (Precond around a SongUNet) as the state dict of EDM's ``EDMPrecond``: plain tensors in
    EDM's key names, buffers included, loadable with ``torch.load(..., weights_only=True)``."""
    return to_edm_state_dict(_songunet_of(denoiser))


def edm_precond_kwargs(denoiser: torch.nn.Module) -> dict[str, Any]:
    """The keyword arguments that make EDM's ``EDMPrecond`` the same network (then load :func:`edm_state_dict`)."""
    net = _songunet_of(denoiser)
    config = {k: v for k, v in net.config.items() if k != "name"}
    if config["in_channels"] != config["out_channels"]:
        raise ValueError("EDMPrecond needs a network with as many output channels as input channels")
    rest = {k: v for k, v in config.items() if k not in ("img_resolution", "in_channels", "out_channels", "label_dim")}
    return {
        "img_resolution": config["img_resolution"],
        "img_channels": config["in_channels"],
        "label_dim": config["label_dim"],
        "sigma_data": float(getattr(denoiser, "sigma_data", 0.5)),
        "model_type": "SongUNet",
        **rest,
    }


def check_runs(denoiser: torch.nn.Module, shape: tuple[int, ...], device: torch.device | str = "cpu") -> None:
    """One forward pass at a high and a low noise level; non-finite output means corrupt weights (one-line error)."""
    label_dim = int(getattr(denoiser, "label_dim", 0))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    sigma = torch.tensor([80.0, 0.5], device=device)
    labels = torch.zeros(2, dtype=torch.long, device=device) if label_dim else None
    with torch.no_grad():
        out = denoiser.to(device)(x * sigma.reshape(-1, *[1] * len(shape)), sigma, labels)
    if not torch.isfinite(out).all():
        raise EdmPickleError("the converted network gives non-finite outputs; its weights are corrupt")
