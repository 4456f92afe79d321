"""MLPDenoiser: a residual MLP for low-dimensional toy data (2-D mixtures, moons, checkerboards).

The input point goes through random Fourier features [x, sin(2 pi B x), cos(2 pi B x)], B ~ N(0, s^2)
(Tancik et al. 2020). Without them an MLP is biased towards smooth functions of x and, with independent noise,
fails to learn the sharp low-sigma denoiser of a multimodal 2-D distribution (loss stuck near its Gaussian value,
see reference/aot-method.md section 5 "pitfall"). Measured with this class on 8 Gaussians (EDM loss, 1500 steps of
batch 256): mean |D - D_exact| at sigma = 0.02 / 0.1 was 0.007 / 0.020 with scale-2 features, 0.021 / 0.038 with
the features switched off (scale 1e-4). The noise level enters through a sinusoidal embedding of c_noise,
mapped like SongUNet's (two Dense+SiLU layers) and added inside every residual block.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConditioningMixin, Dense, PositionalEmbedding, check_labels, positive_int, require


def fourier_matrix(in_dim: int, num_features: int, scale: float, seed: int) -> torch.Tensor:
    """[num_features, in_dim] Gaussian frequencies (cycles per unit of input), reproducible from ``seed``.

    Drawn on the CPU with a private generator, so the global RNG is untouched and a rebuilt model has the same
    features even before its checkpoint is loaded.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    freqs = torch.randn(num_features, in_dim, generator=gen, device="cpu").mul_(scale)
    return freqs.to(torch.empty(0).device)  # the default device, like the parameters


class _ResidualMLPBlock(nn.Module):
    """Pre-norm residual block h + W1 dropout(silu(norm1(W0 silu(norm0(h)) + A emb))), W1 starting near zero."""

    def __init__(self, width: int, emb_channels: int, dropout: float):
        super().__init__()
        self.norm0 = nn.LayerNorm(width)
        self.fc0 = Dense(width, width, init_mode="xavier_uniform")
        self.affine = Dense(emb_channels, width, init_mode="xavier_uniform")
        self.norm1 = nn.LayerNorm(width)
        self.fc1 = Dense(width, width, init_mode="xavier_uniform", init_weight=1e-5)
        self.dropout = dropout

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        r = self.fc0(F.silu(self.norm0(h)))
        r = F.silu(self.norm1(r + self.affine(emb)))
        r = self.fc1(F.dropout(r, p=self.dropout, training=self.training))
        return h + r


class MLPDenoiser(ConditioningMixin, nn.Module):
    """Raw denoiser network F(x; c_noise, labels) for [B, in_dim] inputs (EDM preconditioning goes around it).

    forward(x [B, in_dim], noise_labels [B], class_labels [B, label_dim] | None, augment_labels [B, augment_dim]
    | None) -> [B, out_dim]. ``config`` (JSON-serialisable, with ``name='mlp'``) rebuilds it through
    ``aotdiff.nets.build_network``.

    ``fourier_scale`` is the std of the input frequencies in cycles per unit; EDM feeds c_in x, whose std is about
    1 at every sigma when the data std is ``sigma_data``, so frequencies of a few cycles resolve structure at the
    data's scale.
    """

    freqs: torch.Tensor

    def __init__(
        self,
        in_dim: int = 2,
        out_dim: int | None = None,
        label_dim: int = 0,
        augment_dim: int = 0,
        hidden_dim: int = 256,
        num_blocks: int = 4,
        fourier_features: int = 64,
        fourier_scale: float = 2.0,
        fourier_seed: int = 0,
        noise_channels: int = 64,
        dropout: float = 0.0,
        label_dropout: float = 0.0,
    ):
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        for name, value, minimum in [
            ("in_dim", in_dim, 1),
            ("out_dim", out_dim, 1),
            ("label_dim", label_dim, 0),
            ("augment_dim", augment_dim, 0),
            ("hidden_dim", hidden_dim, 1),
            ("num_blocks", num_blocks, 0),
            ("fourier_features", fourier_features, 1),
            ("noise_channels", noise_channels, 4),
        ]:
            positive_int(name, value, minimum)
        require(noise_channels % 2 == 0, f"noise_channels: expected an even number, got {noise_channels}")
        require(fourier_scale > 0, f"fourier_scale: expected a positive frequency scale, got {fourier_scale}")
        require(0 <= dropout < 1, f"dropout: expected a probability in [0, 1), got {dropout}")
        require(0 <= label_dropout <= 1, f"label_dropout: expected a probability in [0, 1], got {label_dropout}")
        self.config: dict[str, Any] = dict(
            name="mlp",
            in_dim=in_dim,
            out_dim=out_dim,
            label_dim=label_dim,
            augment_dim=augment_dim,
            hidden_dim=hidden_dim,
            num_blocks=num_blocks,
            fourier_features=fourier_features,
            fourier_scale=float(fourier_scale),
            fourier_seed=int(fourier_seed),
            noise_channels=noise_channels,
            dropout=float(dropout),
            label_dropout=float(label_dropout),
        )
        self.in_dim, self.out_dim = in_dim, out_dim
        self.label_dim, self.augment_dim = label_dim, augment_dim
        self.label_dropout = float(label_dropout)
        emb_channels = hidden_dim
        # Saved in the state dict too, so a checkpoint stays self-describing.
        self.register_buffer("freqs", fourier_matrix(in_dim, fourier_features, fourier_scale, fourier_seed))
        self.map_noise = PositionalEmbedding(noise_channels, max_positions=100.0, endpoint=True)
        self.map_label = Dense(label_dim, noise_channels) if label_dim else None
        self.map_augment = Dense(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Dense(noise_channels, emb_channels)
        self.map_layer1 = Dense(emb_channels, emb_channels)
        self.input = Dense(in_dim + 2 * fourier_features, hidden_dim)
        self.blocks = nn.ModuleList(_ResidualMLPBlock(hidden_dim, emb_channels, dropout) for _ in range(num_blocks))
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.output = Dense(hidden_dim, out_dim, init_weight=1e-5)

    def input_features(self, x: torch.Tensor) -> torch.Tensor:
        """[x, sin(2 pi x B^T), cos(2 pi x B^T)]: [B, in_dim + 2 * fourier_features]."""
        angles = 2 * math.pi * x @ self.freqs.to(x.dtype).t()
        return torch.cat([x, angles.sin(), angles.cos()], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``class_labels=None`` on a conditional net means "no class" (zeros, as after label dropout)."""
        self._check_inputs(x, noise_labels, class_labels, augment_labels)
        emb = self.embed(noise_labels, class_labels, augment_labels)
        h = self.input(self.input_features(x))
        for block in self.blocks:
            h = block(h, emb)
        return self.output(F.silu(self.out_norm(h)))

    def _check_inputs(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None,
    ) -> None:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x: expected shape [B, {self.in_dim}] for this network, got {list(x.shape)}")
        b = x.shape[0]
        if noise_labels.shape != (b,):
            raise ValueError(f"noise_labels: expected shape [{b}], got {list(noise_labels.shape)}")
        check_labels("class_labels", class_labels, b, self.label_dim, "label_dim")
        check_labels("augment_labels", augment_labels, b, self.augment_dim, "augment_dim")
