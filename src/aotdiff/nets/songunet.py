"""SongUNet: the DDPM++ / NCSN++ U-Nets of Song et al. (ICLR 2021), in the configuration EDM trains them.

Architecture (Song et al. 2021, App. H; Karras et al. 2022, App. F.2):
- mapping network: noise embedding (positional for DDPM++, random Fourier for NCSN++) of c_noise, plus a linear map
  of the one-hot class label (scaled by sqrt(label_dim)) and of the 9 augmentation labels, then two Dense+SiLU
  layers to ``model_channels * channel_mult_emb`` channels;
- encoder: a 3x3 stem, then per resolution level ``num_blocks`` residual blocks (attention at ``attn_resolutions``),
  levels joined by a down-sampling residual block. 'skip' adds a 1x1 projection of the down-sampled input image at
  every level (progressive input), 'residual' runs a second, convolutional input pyramid and averages it in;
- decoder: two blocks at the lowest resolution (the first with attention), then per level ``num_blocks + 1`` blocks
  that each concatenate one encoder activation, levels joined by an up-sampling block. 'standard' reads the output
  from the top level; 'skip' sums up-sampled output heads of every level (progressive output).
The output layers start at 1e-5 of their fan-based scale, so a new network outputs ~0 and EDM's preconditioned
denoiser starts as D(x) ~ c_skip x.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    ConditioningMixin,
    Dense,
    FourierEmbedding,
    PositionalEmbedding,
    ResampleConv2d,
    UNetResBlock,
    check_labels,
    check_resample_filter,
    group_norm,
    positive_int,
    require,
)

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")

# Weight-init recipes of the score-SDE networks (Song et al. 2021, as in EDM): Glorot-uniform everywhere, biases
# zero; layers closing a residual branch or producing the output start at 1e-5 scale; q/k/v at sqrt(0.2).
INIT: dict[str, Any] = dict(init_mode="xavier_uniform")
INIT_ZERO: dict[str, Any] = dict(init_mode="xavier_uniform", init_weight=1e-5)
INIT_ATTN: dict[str, Any] = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))


def level_resolutions(img_resolution: int, num_levels: int) -> list[int]:
    """Feature-map side length at each U-Net level: img_resolution / 2^level."""
    return [img_resolution >> level for level in range(num_levels)]


def validate_songunet_args(
    img_resolution: int,
    in_channels: int,
    out_channels: int,
    label_dim: int,
    augment_dim: int,
    model_channels: int,
    channel_mult: Sequence[int],
    channel_mult_emb: int,
    num_blocks: int,
    attn_resolutions: Sequence[int],
    dropout: float,
    label_dropout: float,
    embedding_type: str,
    channel_mult_noise: int,
    encoder_type: str,
    decoder_type: str,
    resample_filter: Sequence[float],
) -> None:
    """Raise a ValueError naming the first argument that cannot give a working network."""
    for name, value, minimum in [
        ("img_resolution", img_resolution, 1),
        ("in_channels", in_channels, 1),
        ("out_channels", out_channels, 1),
        ("label_dim", label_dim, 0),
        ("augment_dim", augment_dim, 0),
        ("model_channels", model_channels, 1),
        ("channel_mult_emb", channel_mult_emb, 1),
        ("num_blocks", num_blocks, 1),
        ("channel_mult_noise", channel_mult_noise, 1),
    ]:
        positive_int(name, value, minimum)
    require(
        len(channel_mult) >= 1 and all(isinstance(m, int) and m >= 1 for m in channel_mult),
        f"channel_mult: expected a non-empty list of positive integers, got {list(channel_mult)}",
    )
    factor = 2 ** (len(channel_mult) - 1)
    require(
        img_resolution % factor == 0,
        f"img_resolution: {img_resolution} is not divisible by 2^(len(channel_mult)-1) = {factor} "
        f"(channel_mult={list(channel_mult)} has {len(channel_mult)} levels); use fewer levels or another size",
    )
    levels = level_resolutions(img_resolution, len(channel_mult))
    missing = [r for r in attn_resolutions if r not in levels]
    require(
        not missing,
        f"attn_resolutions: {missing} is not a resolution of this network (levels {levels} for "
        f"img_resolution={img_resolution}, channel_mult={list(channel_mult)})",
    )
    require(0 <= dropout < 1, f"dropout: expected a probability in [0, 1), got {dropout}")
    require(0 <= label_dropout <= 1, f"label_dropout: expected a probability in [0, 1], got {label_dropout}")
    require(
        embedding_type in EMBEDDING_TYPES, f"embedding_type: expected one of {EMBEDDING_TYPES}, got {embedding_type!r}"
    )
    require(encoder_type in ENCODER_TYPES, f"encoder_type: expected one of {ENCODER_TYPES}, got {encoder_type!r}")
    require(decoder_type in DECODER_TYPES, f"decoder_type: expected one of {DECODER_TYPES}, got {decoder_type!r}")
    check_resample_filter(resample_filter)
    require(
        (model_channels * channel_mult_noise) % 2 == 0 and model_channels * channel_mult_noise >= 4,
        f"model_channels * channel_mult_noise = {model_channels * channel_mult_noise} must be even and >= 4 "
        "(the noise embedding is sin/cos pairs)",
    )


class _EncoderLevel(nn.Module):
    """One resolution of the encoder: optional down-sampling block and input-pyramid branch, then res blocks.

    Input pyramid (Song et al. 2021 "progressive input"): 'skip' adds a 1x1 projection of the input image,
    FIR-down-sampled once more at every level; 'residual' averages in a strided 3x3 conv of the previous level's
    features, which become the next level's pyramid input.
    """

    def __init__(
        self,
        down: UNetResBlock | None,
        blocks: list[UNetResBlock],
        encoder_type: str = "standard",
        aux_down: ResampleConv2d | None = None,
        aux_proj: ResampleConv2d | None = None,
    ):
        super().__init__()
        self.down = down
        self.encoder_type = encoder_type
        self.aux_down = aux_down
        self.aux_proj = aux_proj
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self, x: torch.Tensor, pyramid: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the level, appending every activation the decoder will concatenate; return (x, pyramid input)."""
        if self.down is not None:
            x = self.down(x, emb)
            if self.encoder_type == "skip" and self.aux_down is not None and self.aux_proj is not None:
                pyramid = self.aux_down(pyramid)
                x = x + self.aux_proj(pyramid)
            elif self.encoder_type == "residual" and self.aux_proj is not None:
                x = (x + self.aux_proj(pyramid)) * math.sqrt(0.5)
                pyramid = x
            skips.append(x)
        for block in self.blocks:
            x = block(x, emb)
            skips.append(x)
        return x, pyramid


class _DecoderLevel(nn.Module):
    """One resolution of the decoder: optional up-sampling block, res blocks that each concatenate one encoder
    activation, and an optional output head (GroupNorm, SiLU, 3x3 conv) whose result is added to the up-sampled
    output of the level below ('skip' decoder, "progressive output")."""

    def __init__(
        self,
        up: UNetResBlock | None,
        blocks: list[UNetResBlock],
        head_norm: nn.GroupNorm | None = None,
        head_conv: ResampleConv2d | None = None,
        aux_up: ResampleConv2d | None = None,
    ):
        super().__init__()
        self.up = up
        self.blocks = nn.ModuleList(blocks)
        self.head_norm = head_norm
        self.head_conv = head_conv
        self.aux_up = aux_up

    def forward(
        self, x: torch.Tensor, out: torch.Tensor | None, emb: torch.Tensor, skips: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the level, popping one skip per block; return (features, output image so far)."""
        if self.up is not None:
            x = self.up(x, emb)
        for block in self.blocks:
            x = block(torch.cat([x, skips.pop()], dim=1), emb)
        if self.head_conv is not None and self.head_norm is not None:
            if self.aux_up is not None and out is not None:
                out = self.aux_up(out)
            head = self.head_conv(F.silu(self.head_norm(x)))
            out = head if out is None else out + head
        return x, out


class SongUNet(ConditioningMixin, nn.Module):
    """DDPM++ / NCSN++ U-Net. ``forward(x, noise_labels, class_labels=None, augment_labels=None) -> [B, out, H, W]``.

    ``config`` holds the constructor arguments (JSON-serialisable, plus ``name``) so that
    ``aotdiff.nets.build_network(**net.config)`` rebuilds the same architecture.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ):
        super().__init__()
        channel_mult = list(channel_mult)
        attn_resolutions = list(attn_resolutions)
        args: dict[str, Any] = dict(
            img_resolution=img_resolution,
            in_channels=in_channels,
            out_channels=out_channels,
            label_dim=label_dim,
            augment_dim=augment_dim,
            model_channels=model_channels,
            channel_mult=channel_mult,
            channel_mult_emb=channel_mult_emb,
            num_blocks=num_blocks,
            attn_resolutions=attn_resolutions,
            dropout=float(dropout),
            label_dropout=float(label_dropout),
            embedding_type=embedding_type,
            channel_mult_noise=channel_mult_noise,
            encoder_type=encoder_type,
            decoder_type=decoder_type,
            resample_filter=[float(t) for t in resample_filter],
        )
        validate_songunet_args(**args)
        self.config: dict[str, Any] = {"name": "songunet", **args}
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = float(label_dropout)
        self.encoder_type = encoder_type
        self.decoder_type = decoder_type

        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        self._build_mapping(embedding_type, noise_channels, emb_channels)
        block: dict[str, Any] = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=float(dropout),
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            init=INIT,
            init_zero=INIT_ZERO,
            init_attn=INIT_ATTN,
        )
        skip_widths = self._build_encoder(model_channels, channel_mult, num_blocks, attn_resolutions, block)
        self._build_decoder(model_channels, channel_mult, num_blocks, attn_resolutions, block, skip_widths)

    # ----------------------------------------------------------------------------------------------- construction
    def _build_mapping(self, embedding_type: str, noise_channels: int, emb_channels: int) -> None:
        if embedding_type == "positional":
            self.map_noise: nn.Module = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Dense(self.label_dim, noise_channels, **INIT) if self.label_dim else None
        self.map_augment = Dense(self.augment_dim, noise_channels, bias=False, **INIT) if self.augment_dim else None
        self.map_layer0 = Dense(noise_channels, emb_channels, **INIT)
        self.map_layer1 = Dense(emb_channels, emb_channels, **INIT)

    def _build_encoder(
        self,
        model_channels: int,
        channel_mult: Sequence[int],
        num_blocks: int,
        attn_resolutions: Sequence[int],
        block: dict,
    ) -> list[int]:
        """Create the encoder; return the widths of the activations it hands to the decoder, in push order."""
        resolutions = level_resolutions(self.img_resolution, len(channel_mult))
        self.stem = ResampleConv2d(self.in_channels, model_channels, kernel=3, **INIT)
        widths = [model_channels]
        cout, caux = model_channels, self.in_channels
        levels = []
        for level, (mult, res) in enumerate(zip(channel_mult, resolutions)):
            down, aux_down, aux_proj = None, None, None
            if level > 0:
                down = UNetResBlock(cout, cout, resample="down", **block)
                aux_down, aux_proj, caux = self._input_pyramid_branch(caux, cout, block["resample_filter"])
                widths.append(cout)
            blocks = []
            for _ in range(num_blocks):
                blocks.append(UNetResBlock(cout, model_channels * mult, attention=res in attn_resolutions, **block))
                cout = model_channels * mult
                widths.append(cout)
            levels.append(_EncoderLevel(down, blocks, self.encoder_type, aux_down, aux_proj))
        self.encoder = nn.ModuleList(levels)
        self._bottom_channels = cout
        return widths

    def _input_pyramid_branch(
        self, caux: int, cout: int, taps: Sequence[float]
    ) -> tuple[ResampleConv2d | None, ResampleConv2d | None, int]:
        """(aux_down, aux_proj, next pyramid width) of the 'skip' / 'residual' encoders at one level."""
        if self.encoder_type == "skip":
            # the raw input image, FIR-down-sampled again at every level, projected by a 1x1 conv
            aux_down = ResampleConv2d(caux, caux, kernel=0, resample="down", resample_filter=taps)
            return aux_down, ResampleConv2d(caux, cout, kernel=1, **INIT), caux
        if self.encoder_type == "residual":
            # a 3x3 conv + decimation of the previous level's (averaged) features
            conv = ResampleConv2d(caux, cout, 3, resample="down", resample_filter=taps, fused=True, **INIT)
            return None, conv, cout
        return None, None, caux

    def _build_decoder(
        self,
        model_channels: int,
        channel_mult: Sequence[int],
        num_blocks: int,
        attn_resolutions: Sequence[int],
        block: dict,
        skip_widths: list[int],
    ) -> None:
        resolutions = level_resolutions(self.img_resolution, len(channel_mult))
        cout = self._bottom_channels
        self.middle = nn.ModuleList(
            [UNetResBlock(cout, cout, attention=True, **block), UNetResBlock(cout, cout, **block)]
        )
        widths = list(skip_widths)
        levels: list[_DecoderLevel] = []
        top = len(channel_mult) - 1
        for level in reversed(range(len(channel_mult))):
            mult, res = channel_mult[level], resolutions[level]
            up = UNetResBlock(cout, cout, resample="up", **block) if level < top else None
            blocks = []
            for idx in range(num_blocks + 1):
                cin = cout + widths.pop()
                cout = model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                blocks.append(UNetResBlock(cin, cout, attention=attention, **block))
            head_norm = head_conv = aux_up = None
            if self.decoder_type == "skip" or level == 0:
                if self.decoder_type == "skip" and level < top:
                    taps = block["resample_filter"]
                    aux_up = ResampleConv2d(
                        self.out_channels, self.out_channels, 0, resample="up", resample_filter=taps
                    )
                head_norm = group_norm(cout, eps=1e-6)
                head_conv = ResampleConv2d(cout, self.out_channels, kernel=3, **INIT_ZERO)
            levels.append(_DecoderLevel(up, blocks, head_norm, head_conv, aux_up))
        self.decoder = nn.ModuleList(levels)

    # ---------------------------------------------------------------------------------------------------- forward
    def _check_inputs(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None,
    ) -> None:
        r, c = self.img_resolution, self.in_channels
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] != r or x.shape[3] != r:
            raise ValueError(f"x: expected shape [B, {c}, {r}, {r}] for this network, got {list(x.shape)}")
        b = x.shape[0]
        if noise_labels.shape != (b,):
            raise ValueError(
                f"noise_labels: expected shape [{b}] (one c_noise per image), got {list(noise_labels.shape)}"
            )
        check_labels("class_labels", class_labels, b, self.label_dim, "label_dim")
        check_labels("augment_labels", augment_labels, b, self.augment_dim, "augment_dim")

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw network output F(x; c_noise, labels), same shape as ``x`` but with ``out_channels`` channels.

        ``class_labels=None`` on a conditional net means "no class" (all-zero one-hot, as after label dropout);
        ``augment_labels=None`` means "not augmented" (all zeros: the augment map has no bias).
        """
        self._check_inputs(x, noise_labels, class_labels, augment_labels)
        emb = self.embed(noise_labels, class_labels, augment_labels)
        skips = self._encode(x, emb)
        return self._decode(skips[-1], emb, skips)

    def encode(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The encoder's last activation: [B, feature_channels, feature_resolution, feature_resolution].

        A frozen trained encoder is a feature extractor for Discriminator Guidance (``aotdiff.guidance``): it was
        trained on the noise levels the discriminator sees, on the very data the discriminator judges.
        """
        self._check_inputs(x, noise_labels, class_labels, augment_labels)
        return self._encode(x, self.embed(noise_labels, class_labels, augment_labels))[-1]

    @property
    def feature_channels(self) -> int:
        return self._bottom_channels

    @property
    def feature_resolution(self) -> int:
        return self.img_resolution >> (len(self.encoder) - 1)

    def _encode(self, x: torch.Tensor, emb: torch.Tensor) -> list[torch.Tensor]:
        pyramid = x
        x = self.stem(x)
        skips = [x]
        for level in self.encoder:
            x, pyramid = level(x, pyramid, emb, skips)
        return skips

    def _decode(self, x: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for block in self.middle:
            x = block(x, emb)
        out: torch.Tensor | None = None
        for level in self.decoder:
            x, out = level(x, out, emb, skips)
        assert out is not None and not skips
        return out


# ---------------------------------------------------------------------------------------------------- factories
def _named(name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> SongUNet:
    """Build a SongUNet from a preset's defaults and the caller's overrides; record the preset name in its config."""
    unknown = set(overrides) - set(SONGUNET_ARGS)
    if unknown:
        raise ValueError(f"{name}: unknown argument(s) {sorted(unknown)}; valid: {sorted(SONGUNET_ARGS)}")
    net = SongUNet(**{**defaults, **overrides})
    net.config["name"] = name
    return net


SONGUNET_ARGS: tuple[str, ...] = tuple(inspect.signature(SongUNet.__init__).parameters)[1:]  # minus self

# Settings of EDM's `--arch=ddpmpp` / `--arch=ncsnpp` (CIFAR-10 32x32): cbase 128, cres [2,2,2], 4 blocks,
# attention at 16x16. EDM's train.py passes dropout 0.13 at training time; 0.10 is the network's own default.
_SONG_COMMON: dict[str, Any] = dict(
    model_channels=128,
    channel_mult=(2, 2, 2),
    channel_mult_emb=4,
    num_blocks=4,
    attn_resolutions=(16,),
    dropout=0.10,
)


def ddpmpp(
    img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0, augment_dim: int = 0, **overrides
) -> SongUNet:
    """DDPM++ (EDM "VP" architecture): positional noise embedding, standard encoder/decoder, box resampling."""
    defaults = dict(
        _SONG_COMMON,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=(1, 1),
    )
    io = dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels)
    return _named("ddpmpp", {**defaults, **io, "label_dim": label_dim, "augment_dim": augment_dim}, overrides)


def ncsnpp(
    img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0, augment_dim: int = 0, **overrides
) -> SongUNet:
    """NCSN++ (EDM "VE" architecture, used by AOT): Fourier noise embedding, residual encoder, binomial resampling."""
    defaults = dict(
        _SONG_COMMON,
        embedding_type="fourier",
        channel_mult_noise=2,
        encoder_type="residual",
        decoder_type="standard",
        resample_filter=(1, 3, 3, 1),
    )
    io = dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels)
    return _named("ncsnpp", {**defaults, **io, "label_dim": label_dim, "augment_dim": augment_dim}, overrides)


def small_channel_mult(img_resolution: int) -> tuple[int, ...]:
    """Level widths of the small CPU net: levels halve the size while the next one stays >= 4 pixels (at most 4).

    8 -> [8, 4] px, mult (1, 2); 16 -> [16, 8, 4], (1, 2, 2); 32 -> [32, 16, 8, 4], (1, 2, 2, 2); 28 -> [28, 14, 7].
    """
    positive_int("img_resolution", img_resolution)
    num_levels, res = 1, img_resolution
    while num_levels < 4 and res % 2 == 0 and res // 2 >= 4:
        res //= 2
        num_levels += 1
    if num_levels < 2:
        raise ValueError(
            f"img_resolution: {img_resolution} has no automatic small layout (needs an even size >= 8); "
            "pass channel_mult and attn_resolutions explicitly"
        )
    return (1,) + (2,) * (num_levels - 1)


def small_attention(img_resolution: int, channel_mult: Sequence[int]) -> tuple[int, ...]:
    """Attention at the second-lowest level (the lowest one for a 2-level net): cheap, yet over several positions.

    The middle block of every SongUNet also attends, at the lowest level.
    """
    resolutions = level_resolutions(img_resolution, len(channel_mult))
    return (resolutions[-2] if len(resolutions) >= 3 else resolutions[-1],)


def small_model_channels(img_resolution: int) -> int:
    """Base width of the small net: 32 up to 8x8, 16 above, so that a 1-channel 8x8 or 16x16 model trains at a few
    hundred images/s on 2 CPU cores (3x3 convolutions at full resolution dominate the cost, ~ H W C^2)."""
    return 32 if img_resolution <= 8 else 16


def small_songunet(
    img_resolution: int,
    in_channels: int,
    out_channels: int | None = None,
    label_dim: int = 0,
    augment_dim: int = 0,
    model_channels: int | None = None,
    **overrides,
) -> SongUNet:
    """A DDPM++-style net sized for 8x8 .. 32x32 data on a CPU: 2 blocks per level, ``small_channel_mult`` levels,
    ``small_model_channels`` base width, attention per ``small_attention``.

    ``out_channels`` defaults to ``in_channels``. Any SongUNet argument can be overridden; without
    ``attn_resolutions`` the attention level follows ``small_attention`` for the (possibly overridden) channel_mult.
    """
    channel_mult = overrides.pop("channel_mult", None)
    if channel_mult is None:
        channel_mult = small_channel_mult(img_resolution)
    attn = overrides.pop("attn_resolutions", None)
    if attn is None:
        attn = small_attention(img_resolution, channel_mult)
    if model_channels is None:
        model_channels = small_model_channels(img_resolution)
    defaults: dict[str, Any] = dict(
        img_resolution=img_resolution,
        in_channels=in_channels,
        out_channels=in_channels if out_channels is None else out_channels,
        label_dim=label_dim,
        augment_dim=augment_dim,
        model_channels=model_channels,
        channel_mult=channel_mult,
        channel_mult_emb=4,
        num_blocks=2,
        attn_resolutions=attn,
        dropout=0.10,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=(1, 1),
    )
    return _named("small", defaults, overrides)
