"""EDM diffusion maths (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Only the maths lives here: the training noise-level distribution, the preconditioning that turns any raw network
F_theta into a denoiser D_theta, and the loss. The loss takes the **noise as an explicit argument**: which noise is
paired with which image (independent or optimal-transport coupling) is decided outside, in :mod:`aotdiff.coupling`.

Conventions: images live in [-1, 1] (pixel / 127.5 - 1), noise levels sigma are in the same units (so sigma_data = 0.5
is the data's standard deviation), noisy inputs are ``x = y + sigma * n`` with ``n ~ N(0, I)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SIGMA_DATA = 0.5  # EDM Table 1: standard deviation of the (normalised) data distribution.
P_MEAN = -1.2  # EDM Table 1: ln(sigma) ~ N(P_mean, P_std^2) during training.
P_STD = 1.2


@dataclass(frozen=True)
class EDMCoefficients:
    """The four preconditioning coefficients of EDM Table 1 (each broadcastable against the input)."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> EDMCoefficients:
    """c_skip = sd^2/(s^2+sd^2), c_out = s*sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4.

    These make the network's input and its training target unit-variance at every noise level (EDM appendix B.6).
    """
    s2 = sigma**2
    d2 = sigma_data**2
    denom = (s2 + d2).sqrt()
    return EDMCoefficients(
        c_skip=d2 / (s2 + d2),
        c_out=sigma * sigma_data / denom,
        c_in=1.0 / denom,
        c_noise=sigma.log() / 4,
    )


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 = 1 / c_out^2.

    It makes the effective training target of the raw network unit-weighted at every noise level.
    """
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_sigma(
    n: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
) -> torch.Tensor:
    """Training noise levels: ln(sigma) ~ N(p_mean, p_std^2), one per sample, float32 [n]."""
    z = torch.randn(n, generator=generator, device=device)
    return (p_mean + p_std * z).exp()


def _expand_like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample [B] (or scalar) tensor to broadcast over x's trailing dimensions."""
    v = v.to(dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class Precond(nn.Module):
    """EDM preconditioning around any raw network: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, labels).

    The raw network is called as ``net(x_in, c_noise, class_labels, augment_labels)`` with ``class_labels`` a one-hot
    float [B, label_dim] (or None) and ``c_noise`` = ln(sigma)/4, shape [B]. Labels given to this module may be int64
    class indices [B] (converted to one-hot) or already one-hot / soft float labels.

    The raw network runs in float32 (or under autocast if the caller enables it); the skip connection and output are
    computed in the input's dtype, so a float64 sampler state keeps its precision outside the network.
    """

    def __init__(self, net: nn.Module, *, label_dim: int = 0, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.label_dim = int(label_dim)
        self.sigma_data = float(sigma_data)

    def one_hot(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """Class indices -> one-hot float32; None for unconditional models."""
        if self.label_dim == 0:
            return None
        if labels is None:
            raise ValueError(
                f"this model is class-conditional ({self.label_dim} classes): pass class labels "
                "(e.g. `--class K` on the command line, or labels=... in Python)"
            )
        if labels.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.label_dim):
                raise ValueError(
                    f"class labels must lie in [0, {self.label_dim - 1}], got range "
                    f"[{int(labels.min())}, {int(labels.max())}]"
                )
            return F.one_hot(labels.long().reshape(batch), self.label_dim).to(device, torch.float32)
        return labels.to(device, torch.float32).reshape(batch, self.label_dim)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sigma_t = torch.as_tensor(sigma, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        sigma_t = sigma_t.to(x.device)
        if sigma_t.ndim == 0:
            sigma_t = sigma_t.expand(x.shape[0])
        sigma_t = sigma_t.reshape(x.shape[0])
        c = edm_coefficients(sigma_t, self.sigma_data)
        x_in = (_expand_like(c.c_in, x) * x).to(torch.float32)
        class_labels = self.one_hot(labels, x.shape[0], x.device)
        aug = None if augment_labels is None else augment_labels.to(x.device, torch.float32)
        f = self.net(x_in, c.c_noise.to(torch.float32), class_labels, aug)
        return _expand_like(c.c_skip, x) * x + _expand_like(c.c_out, x) * f.to(x.dtype)


def edm_loss(
    denoiser: Callable[..., torch.Tensor],
    images: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor | float,
    labels: torch.Tensor | None = None,
    augment_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """EDM training loss, per element: lambda(sigma) * (D(y + sigma n; sigma) - y)^2, shape like ``images``.

    ``noise`` is a unit-variance tensor shaped like ``images`` and is **an input**: under AOT it is the noise that the
    optimal-transport assignment paired with each image; under standard training it is i.i.d. Gaussian. ``sigma`` is
    one noise level per sample, [B] (or one for all: a number or a one-element tensor). EDM (and the AOT code) sum
    this over elements and divide by the per-device batch; see :func:`aotdiff.train.loop` for the reduction.

    The denoiser is called as ``denoiser(x, sigma)``, with ``labels`` and then ``augment_labels`` appended only when
    given, so a plain ``D(x, sigma)`` (an analytic denoiser) works as well as :class:`Precond`.
    """
    if noise.shape != images.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal images shape {tuple(images.shape)}")
    sigma = torch.as_tensor(sigma, dtype=images.dtype, device=images.device)
    if sigma.numel() == 1:
        sigma = sigma.reshape(1).expand(images.shape[0])
    elif sigma.numel() != images.shape[0]:
        raise ValueError(f"sigma has {sigma.numel()} values for a batch of {images.shape[0]}: give one per sample "
                         "or one for all")  # fmt: skip
    sigma = sigma.reshape(images.shape[0])
    s = _expand_like(sigma, images)
    extra: tuple[torch.Tensor | None, ...] = ()
    if augment_labels is not None:
        extra = (labels, augment_labels)
    elif labels is not None:
        extra = (labels,)
    denoised = denoiser(images + s * noise, sigma, *extra)
    weight = _expand_like(loss_weight(sigma, getattr(denoiser, "sigma_data", SIGMA_DATA)), images)
    return weight * (denoised - images) ** 2


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor | float, data_std: float) -> torch.Tensor:
    """The exact denoiser E[y | y + sigma n = x] for data y ~ N(0, data_std^2 I): x * s^2 / (s^2 + sigma^2).

    Useful as an analytic reference in tests and studies.
    """
    sigma_t = _expand_like(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x)
    return x * data_std**2 / (data_std**2 + sigma_t**2)


def gaussian_ode_solution(x_T: torch.Tensor, sigma_T: float, data_std: float, sigma: float = 0.0) -> torch.Tensor:
    """Exact probability-flow ODE solution for Gaussian data: x(sigma) = x(T) sqrt((s^2+sigma^2)/(s^2+sigma_T^2)).

    Follows from dx/dsigma = (x - D(x))/sigma = x sigma / (s^2 + sigma^2).
    """
    return x_T * math.sqrt((data_std**2 + sigma**2) / (data_std**2 + sigma_T**2))


def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor | float, points: torch.Tensor) -> torch.Tensor:
    """Exact denoiser for data uniform over a finite set of points [K, *shape] (a sum of Dirac masses).

    D(x; sigma) = sum_k w_k(x) p_k with softmax weights w_k proportional to exp(-|x - p_k|^2 / (2 sigma^2)).
    """
    flat = x.reshape(x.shape[0], -1)
    pts = points.reshape(points.shape[0], -1).to(flat)
    sigma_t = torch.as_tensor(sigma, dtype=flat.dtype, device=flat.device).reshape(-1, 1)
    d2 = torch.cdist(flat, pts) ** 2
    w = torch.softmax(-d2 / (2 * sigma_t**2), dim=1)
    return (w @ pts).reshape(x.shape)
