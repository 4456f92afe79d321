"""ADM encoder networks (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", the noise-conditional classifier)
as Discriminator Guidance uses them (Kim et al. 2023, "Refining Generative Process with Discriminator Guidance").

DG builds two networks of the same family, the encoder half of the ADM U-Net:

* a frozen **feature extractor**: the 32 px ImageNet classifier (``adm_classifier_32``), whose middle-block output
  (512 x 8 x 8) is the feature map the discriminator sees;
* a small trainable **head** on those features (``dg_head``): image 8, width 128, two res-blocks, attention pool to
  one logit; the class-conditional head adds a label embedding to the time embedding.

Architecture (written from the paper's description and the MIT-licensed guided-diffusion release it refers to): a
sinusoidal time embedding and a two-layer MLP; a 3x3 stem; per level ``depth`` residual blocks whose second
normalisation is modulated by the embedding ("adaptive group normalisation": ``norm(h) * (1 + scale) + shift``),
self-attention at chosen resolutions, levels joined by residual blocks that average-pool both paths; a middle block
(res, attention, res); and an attention-pooling head (CLIP style: the spatial mean is a query token that attends to
all positions).

The module names reproduce guided-diffusion's state-dict keys (``time_embed.0.weight``, ``input_blocks.1.0.in_layers.0
.weight``, ``middle_block.1.proj_out.bias``, ``out.2.positional_embedding``, ``label_emb.weight``...) so that the
files the DG authors published (``32x32_classifier.pt``, ``discriminator_60.pt``, ``discriminator_250.pt``) load with
``load_state_dict(strict=True)``; see ``load_adm_weights``. Nothing is ever downloaded.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aotdiff.nets.layers import positive_int, require
from aotdiff.train.checkpoint import CheckpointError

__all__ = [
    "ADM_TIME_SCALE",
    "AttentionBlock",
    "AttentionPool2d",
    "EncoderUNet",
    "GroupNorm32",
    "ResBlock",
    "adm_classifier_32",
    "dg_head",
    "legacy_qkv_attention",
    "load_adm_weights",
    "qkv_attention",
    "timestep_embedding",
]

# ADM is a discrete-time model with 1000 steps; DG feeds the continuous VP time t in [0, 1] as t * 999.
ADM_TIME_SCALE = 999.0


def timestep_embedding(steps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(steps f_i), sin(steps f_i)] with f_i = max_period^(-i / (dim // 2)), i < dim // 2.

    ADM's order (cosines first; the transformer convention is sines first). An odd ``dim`` gets one trailing zero.
    ``steps`` is a 1-D tensor in ADM's units (discrete steps, 0..999); the result is float32, shape [len(steps), dim].
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=steps.device) / half)
    args = steps.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 whatever the input dtype (ADM's choice: statistics over few groups are
    fragile in half precision), cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _norm(channels: int, groups: int) -> GroupNorm32:
    require(channels % groups == 0, f"channels: {channels} is not divisible by the {groups} normalisation groups")
    return GroupNorm32(groups, channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: a residual branch that ends in it starts as exactly nothing (out = skip(x))."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def legacy_qkv_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention, ADM's "legacy" channel layout: heads first, then q;k;v inside each head.

    ``qkv``: [B, heads * 3 * ch, T] -> [B, heads * ch, T]; per head, out = v softmax(q^T k / sqrt(ch))^T over keys.
    The layout decides which rows of the trained ``qkv`` convolution are queries, keys and values, so it must match
    the published weights (guided-diffusion's ``AttentionBlock`` default).
    """
    b, width, length = qkv.shape
    require(width % (3 * heads) == 0, f"qkv: width {width} is not divisible by 3 x {heads} heads")
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    return _attend(q, k, v).reshape(b, heads * ch, length)


def qkv_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention, "new" layout: q, k, v blocks first, heads inside each (used by the pooling head).

    ``qkv``: [B, 3 * heads * ch, T] -> [B, heads * ch, T].
    """
    b, width, length = qkv.shape
    require(width % (3 * heads) == 0, f"qkv: width {width} is not divisible by 3 x {heads} heads")
    ch = width // (3 * heads)
    q, k, v = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
    return _attend(q, k, v).reshape(b, heads * ch, length)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q^T k / sqrt(ch)) applied to v, for channel-first [N, ch, T] tensors.

    The fused kernel never materialises the T x T weights (1024 x 1024 per head at 32 px), which matters when DG
    back-propagates through the extractor for a whole batch.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class ResBlock(nn.Module):
    """ADM residual block: GroupNorm-SiLU-conv, time-modulated GroupNorm-SiLU-dropout-conv, plus a skip path.

    With ``scale_shift`` the embedding gives a per-channel (scale, shift) applied after the second normalisation
    (ADM's "AdaGN", Dhariwal & Nichol 2021 sec. 3); otherwise it is added before it. ``down=True`` average-pools both
    the residual path (after its first norm/activation, before the conv) and the skip path by 2.
    The last conv starts at zero, so a fresh block is ``skip_connection(x)``.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        scale_shift: bool = True,
        down: bool = False,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.scale_shift = scale_shift
        self.down = down
        self.in_layers = nn.Sequential(
            _norm(channels, norm_groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        # Parameter-free, so they do not appear in the state dict (as in the reference).
        self.h_upd: nn.Module = nn.AvgPool2d(2) if down else nn.Identity()
        self.x_upd: nn.Module = nn.AvgPool2d(2) if down else nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels))
        self.out_layers = nn.Sequential(
            _norm(out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        # A 1x1 projection only where the channel count changes (the first block of each wider level).
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.down:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))  # pool before the conv: the conv runs at the lower resolution
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all positions, ``num_head_channels`` channels per head, legacy qkv
    layout; the output projection starts at zero (a fresh block is the identity)."""

    def __init__(self, channels: int, num_head_channels: int = 64, norm_groups: int = 32) -> None:
        super().__init__()
        require(
            channels % num_head_channels == 0,
            f"num_head_channels: {channels} channels are not divisible into heads of {num_head_channels}",
        )
        self.heads = channels // num_head_channels
        self.norm = _norm(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(legacy_qkv_attention(self.qkv(self.norm(x)), self.heads))
        return (x + h).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling (Radford et al. 2021), as ADM's classifier head: the spatial mean is prepended
    as an extra token, a learned positional embedding [C, HW + 1] is added, multi-head attention runs over the
    HW + 1 tokens, and the mean token's output, projected by ``c_proj``, is the result [B, out_channels]."""

    def __init__(self, spatial: int, channels: int, num_head_channels: int, out_channels: int) -> None:
        super().__init__()
        require(
            channels % num_head_channels == 0,
            f"num_head_channels: {channels} channels are not divisible into heads of {num_head_channels}",
        )
        self.spatial = spatial
        self.heads = channels // num_head_channels
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial**2 + 1) / channels**0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        require(
            list(spatial) == [self.spatial, self.spatial],
            f"attention pool: expected {self.spatial}x{self.spatial} features, got {'x'.join(map(str, spatial))}",
        )
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(qkv_attention(self.qkv_proj(x), self.heads))
        return x[:, :, 0]


class _EmbedSequential(nn.Sequential):
    """A Sequential whose residual blocks also receive the time embedding (module indices give the keys' ``.0``,
    ``.1``)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class EncoderUNet(nn.Module):
    """The encoder half of ADM's U-Net with an attention-pooling head (guided-diffusion's ``EncoderUNetModel``,
    ``pool="attention"``, ``resblock_updown=True``, legacy attention order, float32).

    Arguments (guided-diffusion's names in brackets):

    * ``resolution`` [image_size]: input height = width in pixels; must be divisible by 2^(len(channel_mult) - 1);
    * ``in_channels``, ``out_channels``: input channels, number of logits;
    * ``width`` [model_channels]: base channels; the time embedding has 4 * width channels;
    * ``depth`` [num_res_blocks]: residual blocks per level;
    * ``channel_mult``: channels per level as multiples of ``width``; consecutive levels are joined by a
      down-sampling residual block;
    * ``attention_resolutions``: resolutions **in pixels** where each residual block is followed by self-attention
      (guided-diffusion takes down-sampling factors, image_size // pixels);
    * ``num_head_channels``: channels per attention head (also in the pooling head);
    * ``num_classes``: 0 for an unconditional net, K for a ``label_emb`` Embedding(K, 4 * width) added to the time
      embedding (DG's conditional discriminator);
    * ``scale_shift`` [use_scale_shift_norm], ``dropout``, ``norm_groups`` (32 in ADM; smaller allows narrow heads).

    ``forward(x, t, labels=None, features=False)``: ``t`` is the VP time in [0, 1] (scalar or [B]), multiplied by
    ``ADM_TIME_SCALE`` = 999 inside as DG does; returns logits [B, out_channels] or, with ``features=True``, the
    middle block's output [B, C, r, r] (DG's feature map; the pooling head is then unused).
    ``config`` holds the constructor arguments (JSON-serialisable) so that ``EncoderUNet(**net.config)`` rebuilds it.
    """

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        out_channels: int,
        width: int = 128,
        depth: int = 2,
        channel_mult: Sequence[int] = (1,),
        attention_resolutions: Sequence[int] = (),
        num_head_channels: int = 64,
        num_classes: int = 0,
        scale_shift: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        resolution = positive_int("resolution", resolution)
        in_channels = positive_int("in_channels", in_channels)
        out_channels = positive_int("out_channels", out_channels)
        width = positive_int("width", width)
        depth = positive_int("depth", depth, minimum=0)
        num_head_channels = positive_int("num_head_channels", num_head_channels)
        num_classes = positive_int("num_classes", num_classes, minimum=0)
        norm_groups = positive_int("norm_groups", norm_groups)
        mults = [positive_int("channel_mult", m) for m in channel_mult]
        require(len(mults) >= 1, "channel_mult: at least one level")
        attn = sorted({positive_int("attention_resolutions", r) for r in attention_resolutions}, reverse=True)
        require(
            resolution % 2 ** (len(mults) - 1) == 0,
            f"resolution: {resolution} px cannot be halved {len(mults) - 1} times (channel_mult {tuple(mults)})",
        )
        require(0.0 <= dropout < 1.0, f"dropout: expected a probability in [0, 1), got {dropout}")
        self.config: dict[str, Any] = dict(
            resolution=resolution,
            in_channels=in_channels,
            out_channels=out_channels,
            width=width,
            depth=depth,
            channel_mult=list(mults),
            attention_resolutions=list(attn),
            num_head_channels=num_head_channels,
            num_classes=num_classes,
            scale_shift=bool(scale_shift),
            dropout=float(dropout),
            norm_groups=norm_groups,
        )
        self.width = width
        self.num_classes = num_classes
        emb_ch = 4 * width

        self.time_embed = nn.Sequential(nn.Linear(width, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if num_classes:
            self.label_emb = nn.Embedding(num_classes, emb_ch)

        def res(c_in: int, c_out: int, down: bool = False) -> ResBlock:
            return ResBlock(c_in, emb_ch, c_out, dropout, scale_shift, down=down, norm_groups=norm_groups)

        def att(c: int) -> AttentionBlock:
            return AttentionBlock(c, num_head_channels, norm_groups)

        ch = mults[0] * width
        self.input_blocks = nn.ModuleList([_EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        res_px = resolution
        for level, mult in enumerate(mults):
            for _ in range(depth):
                layers: list[nn.Module] = [res(ch, mult * width)]
                ch = mult * width
                if res_px in attn:
                    layers.append(att(ch))
                self.input_blocks.append(_EmbedSequential(*layers))
            if level != len(mults) - 1:
                # The down-sampling block keeps the channel count; the next level's first block widens it.
                self.input_blocks.append(_EmbedSequential(res(ch, ch, down=True)))
                res_px //= 2
        self.middle_block = _EmbedSequential(res(ch, ch), att(ch), res(ch, ch))
        self.out = nn.Sequential(
            _norm(ch, norm_groups), nn.SiLU(), AttentionPool2d(res_px, ch, num_head_channels, out_channels)
        )
        self.feature_channels = ch
        self.feature_resolution = res_px

    def embedding(self, t: torch.Tensor | float, batch: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Time (+ label) embedding [batch, 4 * width] for VP times ``t`` in [0, 1]."""
        device = next(self.parameters()).device
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
        require(t.ndim <= 1, f"t: expected a scalar or a 1-D tensor of VP times, got shape {tuple(t.shape)}")
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        require(t.shape == (batch,), f"t: expected {batch} times, got {t.numel()}")
        emb = self.time_embed(timestep_embedding(t * ADM_TIME_SCALE, self.width))
        if self.num_classes:
            require(labels is not None, f"labels: this head is class-conditional ({self.num_classes} classes)")
            assert labels is not None
            emb = emb + self.label_emb(self._class_index(labels, batch).to(device))
        else:
            require(labels is None, "labels: this network is unconditional (num_classes=0) and takes no labels")
        return emb

    def _class_index(self, labels: torch.Tensor, batch: int) -> torch.Tensor:
        """Class indices [batch] from int labels [batch] or one-hot rows [batch, K] (argmax, as DG does)."""
        if labels.ndim == 2:
            require(
                labels.shape == (batch, self.num_classes),
                f"labels: expected one-hot [{batch}, {self.num_classes}], got {list(labels.shape)}",
            )
            return labels.argmax(dim=1)
        require(
            labels.shape == (batch,) and not labels.is_floating_point(),
            f"labels: expected int class indices [{batch}] or one-hot [{batch}, K], got {labels.dtype} "
            f"{list(labels.shape)}",
        )
        idx = labels.long()
        require(
            bool(((idx >= 0) & (idx < self.num_classes)).all()),
            f"labels: class indices must lie in [0, {self.num_classes})",
        )
        return idx

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        labels: torch.Tensor | None = None,
        features: bool = False,
    ) -> torch.Tensor:
        require(
            x.ndim == 4 and x.shape[1] == self.config["in_channels"],
            f"x: expected [B, {self.config['in_channels']}, H, W], got {list(x.shape)}",
        )
        emb = self.embedding(t, x.shape[0], labels)
        h = x.to(next(self.parameters()).dtype)  # float32 weights: the input follows them
        for block in self.input_blocks:
            h = block(h, emb)
        h = self.middle_block(h, emb)
        if features:
            return h
        return self.out(h)


def adm_classifier_32(out_channels: int = 1000) -> EncoderUNet:
    """DG's CIFAR-10 feature extractor: ADM's 32 px ImageNet classifier (47,771,112 parameters, 255 keys).

    Width 128, 4 res-blocks per level, channel_mult (1, 2, 4), attention at 32, 16 and 8 px with 64 channels per
    head, scale-shift norm, res-block down-sampling, attention pool to 1000 classes. Features: 512 x 8 x 8.
    """
    return EncoderUNet(
        resolution=32,
        in_channels=3,
        out_channels=out_channels,
        width=128,
        depth=4,
        channel_mult=(1, 2, 4),
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
    )


def dg_head(conditional: bool = False, num_classes: int = 1000) -> EncoderUNet:
    """DG's discriminator head on the 512 x 8 x 8 classifier features: one logit of "real".

    Image 8, in 512, width 128, depth 2, channel_mult (1,), attention at 8 px: 2,883,841 parameters (71 keys);
    ``conditional`` adds ``label_emb`` = Embedding(num_classes, 512) (DG: 1000 rows, 3,395,841 parameters, 72 keys).
    """
    return EncoderUNet(
        resolution=8,
        in_channels=512,
        out_channels=1,
        width=128,
        depth=2,
        channel_mult=(1,),
        attention_resolutions=(8,),
        num_head_channels=64,
        num_classes=num_classes if conditional else 0,
    )


_WHERE = (
    "ADM / DG weights are the DG authors' published files (32x32_classifier.pt for the 32 px extractor, "
    "discriminator_60.pt / discriminator_250.pt for the uncond / cond heads; see the DG repository's README); "
    "download the file yourself and pass its path: aotdiff never downloads"
)


def _names(keys: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def require_classifier_file(path: str | Path) -> Path:
    """``path`` if it is a file, else the one-line error that says where DG's classifier comes from."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file. {_WHERE}")
    return path


def load_adm_weights(model: EncoderUNet, path: str | Path) -> EncoderUNet:
    """Load a guided-diffusion state dict (e.g. ``32x32_classifier.pt``) into ``model`` strictly; returns ``model``.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, no code runs. A
    uniform ``module.`` prefix (a state dict saved from ``DataParallel``) is removed. Every failure is a one-line
    ``CheckpointError`` naming the file: missing, not a state dict, wrong keys, wrong shapes.
    """
    path = require_classifier_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} is not a plain state dict (not a torch file, or it holds objects other than tensors and plain "
            "values); it was refused without running anything"
        ) from None
    except Exception as err:  # e.g. a truncated download
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable torch file ({first})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        what = type(state).__name__ if not isinstance(state, Mapping) else "a dict with non-tensor values"
        raise CheckpointError(f"{path} holds {what}, not a state dict of tensors")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_names(unexpected)}")
        raise CheckpointError(
            f"{path} does not match this network's keys ({'; '.join(parts)}); it was written for another "
            f"architecture (network config {model.config})"
        )
    shapes = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if shapes:
        raise CheckpointError(
            f"{path} has {len(shapes)} tensors of the wrong shape (file vs network): {_names(shapes, 3)}"
        )
    model.load_state_dict(state, strict=True)
    return model
