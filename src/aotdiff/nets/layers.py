"""Building blocks of the score-SDE U-Nets (Song et al. 2021) in the form EDM (Karras et al. 2022, App. F) uses.

Everything here is written from the papers' description:
- weights are initialised from a fan-based distribution and then multiplied by a per-layer gain; layers whose output
  feeds a residual sum start near zero (gain 1e-5) so that a fresh network is close to the identity of its skips;
- resampling is a fixed separable FIR filter (box [1,1] for DDPM++, binomial [1,3,3,1] for NCSN++) applied per
  channel with stride 2, optionally followed or preceded by a learned convolution;
- residual blocks add a projection of the noise/label embedding after their first convolution, scale the residual sum
  by sqrt(1/2) and may end with single-head self-attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

InitMode = Literal["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"]
Resample = Literal["none", "up", "down"]

INIT_MODES: tuple[str, ...] = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def fan_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int, gain: float = 1.0) -> torch.Tensor:
    """Random tensor with ``gain`` times the standard deviation of the named scheme (Glorot & Bengio 2010; He et al.
    2015).

    xavier: Var = 2 / (fan_in + fan_out); kaiming: Var = 1 / fan_in (gain 1, as in EDM, not the ReLU gain 2).
    Uniform variants draw from U(-a, a) with a = sqrt(3 Var). ``gain == 0`` gives exact zeros. Created in place on
    the default device, so building under ``with torch.device('meta')`` allocates nothing and is quick.
    """
    if mode not in INIT_MODES:
        raise ValueError(f"init_mode: unknown weight initialisation {mode!r}; use one of {INIT_MODES}")
    if gain == 0:
        return torch.zeros(*shape)
    variance = 2.0 / (fan_in + fan_out) if mode.startswith("xavier") else 1.0 / fan_in
    std = gain * math.sqrt(variance)
    if mode.endswith("uniform"):
        bound = math.sqrt(3.0) * std
        return torch.empty(*shape).uniform_(-bound, bound)
    return torch.empty(*shape).normal_(0.0, std)


class Dense(nn.Module):
    """Fully connected layer y = x W^T + b with fan-based init scaled by ``init_weight`` / ``init_bias``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "xavier_uniform",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans: dict[str, Any] = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(fan_init([out_features, in_features], **fans, gain=init_weight))
        self.bias = nn.Parameter(fan_init([out_features], **fans, gain=init_bias)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def fir_kernel_2d(taps: Sequence[float]) -> torch.Tensor:
    """Separable 2-D FIR kernel outer(f, f) / sum(f)^2: unit DC gain, so a constant image stays constant.

    Computed in Python (no tensor ops), which keeps construction on the 'meta' device free of heavy imports.
    """
    total = float(sum(taps)) ** 2
    return torch.tensor([[float(a) * float(b) / total for b in taps] for a in taps], dtype=torch.float32)


def check_resample_filter(taps: Sequence[float]) -> list[float]:
    """Validate a resampling filter: an even number (>= 2) of positive taps, e.g. [1,1] or [1,3,3,1].

    Even length keeps stride-2 resampling aligned (output size exactly half / double the input).
    """
    values = [float(t) for t in taps]
    if len(values) < 2 or len(values) % 2 or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(
            f"resample_filter: expected an even number (>= 2) of positive taps such as [1, 1] or [1, 3, 3, 1], "
            f"got {list(taps)}"
        )
    return values


class ResampleConv2d(nn.Module):
    """Convolution with optional stride-2 FIR up/down-sampling (the filter is fixed, not learned).

    ``kernel=0`` gives a pure resampler (no weights). Unfused order: down/up-sample first, then convolve. With
    ``fused=True`` and down-sampling, the convolution runs first at full resolution and the filter then decimates
    (NCSN++ residual input branch). The up-sampler is the transposed filter scaled by 4 (unit DC gain after
    zero insertion). A [1,1] filter takes fast equivalent paths: 2x2 average pooling and nearest-neighbour doubling.
    """

    fir: torch.Tensor
    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        resample: Resample = "none",
        resample_filter: Sequence[float] = (1, 1),
        fused: bool = False,
        init_mode: str = "xavier_uniform",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        if resample not in ("none", "up", "down"):
            raise ValueError(f"resample: expected 'none', 'up' or 'down', got {resample!r}")
        if kernel == 0 and in_channels != out_channels:
            raise ValueError(f"a resampler without weights keeps channels: got {in_channels} -> {out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resample = resample
        self.fused = fused and resample == "down" and kernel > 0
        fans: dict[str, Any] = dict(
            mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel
        )
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(fan_init(shape, **fans, gain=init_weight)) if kernel else None
        self.bias = nn.Parameter(fan_init([out_channels], **fans, gain=init_bias)) if kernel and bias else None
        taps = check_resample_filter(resample_filter)
        self.is_box = len(taps) == 2 and taps[0] == taps[1]
        # Deterministic from the config, so not saved in checkpoints.
        self.register_buffer("fir", fir_kernel_2d(taps), persistent=False)

    def _down(self, x: torch.Tensor, pad: int) -> torch.Tensor:
        if self.is_box and pad == 0:
            return F.avg_pool2d(x, 2)
        c = x.shape[1]
        kernel = self.fir.to(x.dtype).expand(c, 1, *self.fir.shape)
        return F.conv2d(x, kernel, stride=2, padding=pad, groups=c)

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_box:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        c = x.shape[1]
        kernel = (self.fir * 4).to(x.dtype).expand(c, 1, *self.fir.shape)
        return F.conv_transpose2d(x, kernel, stride=2, padding=(int(self.fir.shape[-1]) - 1) // 2, groups=c)

    def _conv(self, x: torch.Tensor, padding: int) -> torch.Tensor:
        assert self.weight is not None
        return F.conv2d(x, self.weight, self.bias, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fir_pad = (int(self.fir.shape[-1]) - 1) // 2
        w_pad = int(self.weight.shape[-1]) // 2 if self.weight is not None else 0
        if self.fused:
            # conv over a border widened by the filter's padding, then decimate with no further padding
            return self._down(self._conv(x, w_pad + fir_pad), 0)
        if self.resample == "down":
            x = self._down(x, fir_pad)
        elif self.resample == "up":
            x = self._up(x)
        if self.weight is not None:
            x = self._conv(x, w_pad)
        return x


def group_norm(channels: int, eps: float, max_groups: int = 32, min_channels_per_group: int = 4) -> GroupNorm:
    """GroupNorm with min(32, C // 4) groups (EDM's rule, so narrow layers keep >= 4 channels per group)."""
    groups = min(max_groups, channels // min_channels_per_group)
    if groups < 1 or channels % groups:
        raise ValueError(
            f"a layer with {channels} channels cannot be split into {max(groups, 1)} GroupNorm groups; "
            "choose model_channels and channel_mult so that every width is a multiple of 32 "
            "(or, below 128 channels, a multiple of 4 that its quarter divides)"
        )
    return GroupNorm(groups, channels, eps=eps)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalises half-precision input in fp32 and returns fp32 (what CUDA's autocast does for
    group_norm, made device-independent: CPU autocast would keep bf16, whose 8-bit mantissa makes the variance of a
    group with a large mean inaccurate). fp32 / fp64 input is untouched; the state dict is nn.GroupNorm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions, residual: x + proj(attn(norm(x)))."""

    def __init__(self, channels: int, num_heads: int, eps: float, init_qkv: dict, init_zero: dict):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, eps)
        self.qkv = ResampleConv2d(channels, channels * 3, kernel=1, **init_qkv)
        self.proj = ResampleConv2d(channels, channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # qkv channels are ordered (head, channel, q|k|v), the layout of EDM's checkpoints, so converted weights
        # need no permutation
        qkv = self.qkv(self.norm(x)).reshape(b, self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(3))  # each [B, heads, HW, C/heads]
        # softmax(q k^T / sqrt(C/heads)) v
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(a.transpose(-1, -2).reshape(b, c, h, w))


class UNetResBlock(nn.Module):
    """Residual block of DDPM++ / NCSN++ (Song et al. 2021, as configured in EDM):

    h = conv0(silu(norm0(x)))            (with up/down-sampling inside conv0 when requested)
    h = silu(norm1(h + A emb))           (additive embedding; EDM's "adaptive_scale=False")
    h = conv1(dropout(h))                (zero-ish init)
    x = (h + shortcut(x)) * sqrt(1/2)    (shortcut: 1x1 conv, resampled, when shape changes)
    x = (x + attn(x)) * sqrt(1/2)        (optional)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        resample: Resample = "none",
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        skip_scale: float = math.sqrt(0.5),
        eps: float = 1e-6,
        resample_filter: Sequence[float] = (1, 1),
        init: dict,
        init_zero: dict,
        init_attn: dict,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout = dropout
        self.skip_scale = skip_scale
        rs: dict[str, Any] = dict(resample=resample, resample_filter=resample_filter)
        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = ResampleConv2d(in_channels, out_channels, kernel=3, **rs, **init)
        self.affine = Dense(emb_channels, out_channels, **init)
        self.norm1 = group_norm(out_channels, eps)
        self.conv1 = ResampleConv2d(out_channels, out_channels, kernel=3, **init_zero)
        needs_projection = in_channels != out_channels or resample != "none"
        self.shortcut = ResampleConv2d(in_channels, out_channels, 1, **rs, **init) if needs_projection else None
        self.attn = SelfAttention2d(out_channels, num_heads, eps, init_attn, init_zero) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.shortcut(x) if self.shortcut is not None else x)) * self.skip_scale
        if self.attn is not None:
            x = self.attn(x) * self.skip_scale
        return x


def check_labels(name: str, labels: torch.Tensor | None, batch: int, dim: int, dim_name: str) -> None:
    """Labels must be [B, dim]; None is allowed (means zeros); a net with dim 0 accepts only empty labels."""
    if labels is None:
        return
    if dim == 0:
        if labels.numel():
            raise ValueError(
                f"{name}: this network was built with {dim_name}=0 but got labels of shape {list(labels.shape)}; "
                f"rebuild it with {dim_name}={labels.shape[-1]} or pass None"
            )
        return
    if labels.shape != (batch, dim):
        raise ValueError(f"{name}: expected shape [{batch}, {dim}] ({dim_name}={dim}), got {list(labels.shape)}")


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of a scalar (Vaswani et al. 2017), used for the noise level in DDPM++.

    Output [sin(t f_0), ..., sin(t f_{n-1}), cos(t f_0), ..., cos(t f_{n-1})], n = channels/2, with geometric
    frequencies f_i = max_positions^(-i / (n - 1)) when ``endpoint`` (f from 1 down to 1/max_positions inclusive),
    else f_i = max_positions^(-i / n).
    """

    freqs: torch.Tensor

    def __init__(self, channels: int, max_positions: float = 10000.0, endpoint: bool = True):
        super().__init__()
        if channels < 4 or channels % 2:
            raise ValueError(f"noise embedding: needs an even number >= 4 of channels, got {channels}")
        n = channels // 2
        freqs = [max_positions ** (-i / (n - 1 if endpoint else n)) for i in range(n)]  # float64 maths
        self.register_buffer("freqs", torch.tensor(freqs, dtype=torch.float32), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(t.to(self.freqs.dtype), self.freqs)  # float64 after net.double()
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (Tancik et al. 2020), used for the noise level in NCSN++.

    Output [sin(2 pi f t), cos(2 pi f t)] with f ~ N(0, scale^2) drawn once at construction and saved in the
    state dict (a rebuilt model needs its checkpoint to reproduce them).
    """

    freqs: torch.Tensor

    def __init__(self, channels: int, scale: float = 16.0):
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(f"noise embedding: needs an even number of channels, got {channels}")
        # drawn on the CPU (same draw whatever the device), then moved to the default device
        freqs = torch.randn(channels // 2, device="cpu").mul_(scale)
        self.register_buffer("freqs", freqs.to(torch.empty(0).device))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(t.to(self.freqs.dtype), 2 * math.pi * self.freqs)
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class ConditioningMixin:
    """The mapping network shared by SongUNet and the MLP: noise embedding (+ class, + augmentation labels) -> two
    Dense+SiLU layers. The host module defines ``map_noise``, ``map_label`` (or None), ``map_augment`` (or None),
    ``map_layer0``, ``map_layer1``, ``label_dim``, ``augment_dim``, ``label_dropout`` and ``training``."""

    map_noise: nn.Module
    map_label: nn.Module | None
    map_augment: nn.Module | None
    map_layer0: nn.Module
    map_layer1: nn.Module
    label_dim: int
    augment_dim: int
    label_dropout: float
    training: bool

    def embed(
        self,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mapping network: [B] noise labels (+ labels) -> [B, emb_channels] conditioning vector."""
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            # None = no class: the all-zero one-hot, which still receives map_label's bias (as after label dropout)
            labels = emb.new_zeros(emb.shape[0], self.label_dim) if class_labels is None else class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand([labels.shape[0], 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            # sqrt(label_dim) makes a one-hot vector unit-variance per entry on average
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None:
            # None = not augmented = zeros; still applied, so every parameter takes part in the graph (DDP-safe)
            aug = emb.new_zeros(emb.shape[0], self.augment_dim) if augment_labels is None else augment_labels
            emb = emb + self.map_augment(aug.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))


def require(condition: bool, message: str) -> None:
    """Raise a ValueError with ``message`` (which names the argument) unless ``condition`` holds."""
    if not condition:
        raise ValueError(message)


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int, refusing bools, non-integers and values below ``minimum`` (message names ``name``)."""
    require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{name}: expected an integer >= {minimum}, got {value!r}",
    )
    return int(value)
