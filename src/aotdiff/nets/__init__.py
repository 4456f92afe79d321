"""Denoiser networks: SongUNet (DDPM++ / NCSN++, Song et al. 2021 as configured by EDM) and an MLP for 2-D toys.

All share the raw-network contract used by ``aotdiff.diffusion.Precond``:
``net(x, noise_labels, class_labels=None, augment_labels=None) -> Tensor`` with ``noise_labels = ln(sigma) / 4``,
and carry a JSON-serialisable ``config`` dict such that ``build_network(**net.config)`` rebuilds the architecture
(weights then come from the checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .mlp import MLPDenoiser
from .songunet import SongUNet, ddpmpp, ncsnpp, small_songunet

__all__ = [
    "NETWORKS",
    "MLPDenoiser",
    "SongUNet",
    "build_network",
    "count_parameters",
    "ddpmpp",
    "ncsnpp",
    "small_songunet",
]


def _songunet(**kwargs) -> SongUNet:
    """The raw class, for configs written by ``SongUNet(...)`` directly (``name='songunet'``)."""
    return SongUNet(**kwargs)


NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "ddpmpp": ddpmpp,
    "ncsnpp": ncsnpp,
    "small": small_songunet,
    "mlp": MLPDenoiser,
    "songunet": _songunet,
}


def build_network(name: str, **kwargs) -> nn.Module:
    """Build a network by name ('ddpmpp' | 'ncsnpp' | 'small' | 'mlp'; 'songunet' = the bare class).

    ``build_network(**net.config)`` rebuilds ``net``'s architecture exactly; missing arguments take the named
    preset's defaults, e.g. ``build_network('ncsnpp', img_resolution=32, in_channels=3, out_channels=3)``.
    """
    if name not in NETWORKS:
        raise ValueError(f"network name: unknown network {name!r}; choose one of {sorted(NETWORKS)}")
    try:
        return NETWORKS[name](**kwargs)
    except TypeError as err:  # missing / unexpected keyword: say which network and what it takes
        raise ValueError(f"network {name!r}: bad arguments {sorted(kwargs)}: {err}") from err


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (buffers such as Fourier frequencies excluded)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
