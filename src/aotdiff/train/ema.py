"""Exponential moving average of the weights with a half-life measured in images (EDM's scheme).

beta = 0.5 ** (batch / half_life_images): after ``half_life`` images the old weights count for one half, whatever the
batch size. With a ramp-up ratio r, the half-life is min(half_life, r * images_seen), so early, fast-changing weights
are forgotten quickly (EDM training_loop, ``ema_rampup_ratio = 0.05``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(batch: int, images_seen: int, halflife_kimg: float, rampup_ratio: float = 0.0) -> float:
    """Decay factor applied to the EMA weights for one optimizer step of ``batch`` images."""
    halflife = halflife_kimg * 1000.0
    if rampup_ratio > 0:
        halflife = min(halflife, images_seen * rampup_ratio)
    return 0.5 ** (batch / max(halflife, 1e-8))


class EMA:
    """Holds a frozen copy of a module and blends the live weights into it after each step."""

    def __init__(self, module: nn.Module):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, live: nn.Module, beta: float) -> None:
        ema_params: list[torch.Tensor] = list(self.module.parameters())
        live_params: list[torch.Tensor] = list(live.parameters())
        if len(ema_params) != len(live_params):
            raise ValueError("EMA.update: the live module has a different number of parameters than the EMA copy")
        # One multi-tensor kernel instead of one per parameter (same arithmetic as p_ema.lerp_(p, 1 - beta)).
        torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for e, p in zip(ema_params, live_params)], 1.0 - beta)
        for b_ema, b in zip(self.module.buffers(), live.buffers(), strict=True):
            b_ema.copy_(b)
