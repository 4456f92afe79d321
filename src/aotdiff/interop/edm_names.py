"""The correspondence between EDM's state-dict names (``EDMPrecond`` around ``SongUNet``) and aotdiff's.

EDM keeps its U-Net layers in two ``ModuleDict``s named by resolution (``model.enc.32x32_block0.conv0.weight``,
``model.dec.16x16_up.skip.weight``); aotdiff nests them by level (``encoder.1.blocks.0.conv0.weight``). The map is
derived from the structure of an aotdiff :class:`~aotdiff.nets.SongUNet` (so it holds for any resolution, channel
count, block count and encoder/decoder type) and pairs layers by role, never by position in the parameter list.

Besides weights, EDM's state dict holds one fixed buffer per resampling convolution (``resample_filter``, the
normalised outer product of the FIR taps, shape [1, 1, k, k]) and the Fourier frequencies of NCSN++
(``map_noise.freqs``). aotdiff derives the filters from the network's configuration, so they are written for EDM and,
when reading, checked against the configuration instead of loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from aotdiff.interop.edm_pickle import EdmPickleError
from aotdiff.nets.layers import ResampleConv2d, fir_kernel_2d
from aotdiff.nets.songunet import SongUNet

# Children of a residual block: aotdiff name -> EDM name (UNetBlock)
BLOCK_CHILDREN: tuple[tuple[str, str], ...] = (
    ("norm0", "norm0"),
    ("conv0", "conv0"),
    ("affine", "affine"),
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("shortcut", "skip"),
    ("attn.norm", "norm2"),
    ("attn.qkv", "qkv"),
    ("attn.proj", "proj"),
)
EDM_PREFIX = "model."  # EDMPrecond keeps the U-Net as `self.model`


@dataclass(frozen=True)
class EdmKey:
    """One entry of EDM's state dict and where it lives in aotdiff's SongUNet.

    ``ours`` is the key in ``SongUNet.state_dict()``, or None for EDM's ``resample_filter`` buffers (aotdiff derives
    them from the configuration).
    """

    edm: str
    ours: str | None


def module_pairs(net: SongUNet) -> list[tuple[str, str]]:
    """(aotdiff module path, EDM module path without ``model.``) for every layer holding weights or a fixed filter,
    in the order EDM registers them."""

    def tag(level: int) -> str:
        r = net.img_resolution >> level
        return f"{r}x{r}"

    def block(ours: str, edm: str) -> list[tuple[str, str]]:
        return [(f"{ours}.{a}", f"{edm}.{b}") for a, b in BLOCK_CHILDREN if _has(net, f"{ours}.{a}")]

    pairs = [(name, name) for name in ("map_noise", "map_label", "map_augment", "map_layer0", "map_layer1")]
    pairs = [p for p in pairs if _has(net, p[0])]
    pairs.append(("stem", f"enc.{tag(0)}_conv"))
    for level, enc in enumerate(net.encoder):
        t = tag(level)
        if enc.down is not None:
            pairs += block(f"encoder.{level}.down", f"enc.{t}_down")
        if enc.aux_down is not None:
            pairs.append((f"encoder.{level}.aux_down", f"enc.{t}_aux_down"))
        if enc.aux_proj is not None:
            kind = "skip" if net.encoder_type == "skip" else "residual"
            pairs.append((f"encoder.{level}.aux_proj", f"enc.{t}_aux_{kind}"))
        for i in range(len(cast(nn.ModuleList, enc.blocks))):
            pairs += block(f"encoder.{level}.blocks.{i}", f"enc.{t}_block{i}")
    top = len(net.encoder) - 1
    for i in range(len(net.middle)):
        pairs += block(f"middle.{i}", f"dec.{tag(top)}_in{i}")
    for k, dec in enumerate(net.decoder):  # aotdiff's decoder runs from the lowest resolution up
        t = tag(top - k)
        if dec.up is not None:
            pairs += block(f"decoder.{k}.up", f"dec.{t}_up")
        for i in range(len(cast(nn.ModuleList, dec.blocks))):
            pairs += block(f"decoder.{k}.blocks.{i}", f"dec.{t}_block{i}")
        if dec.aux_up is not None:
            pairs.append((f"decoder.{k}.aux_up", f"dec.{t}_aux_up"))
        if dec.head_norm is not None:
            pairs += [(f"decoder.{k}.head_norm", f"dec.{t}_aux_norm"), (f"decoder.{k}.head_conv", f"dec.{t}_aux_conv")]
    return pairs


def _has(net: torch.nn.Module, path: str) -> bool:
    try:
        return net.get_submodule(path) is not None
    except AttributeError:
        return False


def edm_keys(net: SongUNet) -> list[EdmKey]:
    """Every entry of the state dict EDM's ``EDMPrecond`` would have for this architecture, in EDM's order.

    Every entry of ``net.state_dict()`` is covered exactly once (checked), so a layer added to aotdiff's SongUNet
    without a name here fails loudly instead of being skipped.
    """
    keys: list[EdmKey] = []
    for ours, edm in module_pairs(net):
        module = net.get_submodule(ours)
        local = module.state_dict(keep_vars=True)  # persistent entries only, like EDM's
        for name in local:
            if "." not in name:  # the module's own entries; children have their own pair
                keys.append(EdmKey(f"{EDM_PREFIX}{edm}.{name}", f"{ours}.{name}"))
        if isinstance(module, ResampleConv2d) and module.resample != "none":
            keys.append(EdmKey(f"{EDM_PREFIX}{edm}.resample_filter", None))
    covered = [k.ours for k in keys if k.ours is not None]
    missing = sorted(set(net.state_dict()) - set(covered))
    if missing or len(covered) != len(set(covered)):
        raise RuntimeError(f"aotdiff's SongUNet has entries without an EDM name: {missing[:5]} (update edm_names)")
    return keys


def edm_resample_filter(net: SongUNet) -> torch.Tensor:
    """EDM's ``resample_filter`` buffer, [1, 1, k, k]: every resampling layer of a SongUNet uses the network's taps.

    Computed from the configuration (not read from a layer), so it is also right for a skeleton built on 'meta'."""
    return fir_kernel_2d(net.config["resample_filter"])[None, None]


def to_edm_state_dict(net: SongUNet) -> OrderedDict[str, torch.Tensor]:
    """aotdiff SongUNet -> the state dict EDM's ``EDMPrecond.load_state_dict`` accepts (buffers included)."""
    ours = net.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key in edm_keys(net):
        if key.ours is None:
            out[key.edm] = edm_resample_filter(net)
        else:
            out[key.edm] = ours[key.ours].detach().to("cpu").clone()
    return out


def from_edm_state_dict(
    net: SongUNet, state: dict[str, torch.Tensor], source: str = "the file"
) -> dict[str, torch.Tensor]:
    """EDM-named tensors -> ``net.state_dict()`` keys, after checking that the key sets match exactly, every shape
    agrees and every resampling filter equals the one ``net``'s configuration implies. Errors name the first
    offending keys and are one line. ``net`` may be a skeleton on the 'meta' device (only names and shapes are used),
    so a file is checked before memory is spent on the network it describes."""
    keys = edm_keys(net)
    expected = {k.edm for k in keys}
    missing = [k.edm for k in keys if k.edm not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise EdmPickleError(
            f"{source}: the weights do not match the architecture its settings describe: {'; '.join(parts)}"
        )
    ours = net.state_dict()
    want = edm_resample_filter(net)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        tensor = state[key.edm]
        if key.ours is None:
            if tensor.shape != want.shape or not torch.allclose(tensor.float(), want, atol=1e-6):
                raise EdmPickleError(
                    f"{source}: {key.edm} is not the resampling filter its settings give "
                    f"(resample_filter in the network's arguments); refusing a network aotdiff would run differently"
                )
            continue
        if tensor.shape != ours[key.ours].shape:
            raise EdmPickleError(
                f"{source}: {key.edm} has shape {list(tensor.shape)}, but the architecture its settings describe "
                f"needs {list(ours[key.ours].shape)}"
            )
        if not tensor.is_floating_point():
            raise EdmPickleError(f"{source}: {key.edm} holds {tensor.dtype} values, not floating-point weights")
        out[key.ours] = tensor
    return out
