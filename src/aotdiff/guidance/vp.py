"""EDM noise levels <-> the VP-SDE time that Discriminator Guidance's networks are conditioned on.

The DG discriminators (Kim et al. 2023, built on ADM, Dhariwal & Nichol 2021) see VP-SDE inputs
x_vp = alpha(t) y + sigma_vp(t) z with the linear schedule beta(t) = beta0 + t (beta1 - beta0) (Song et al. 2021):

    alpha(t) = exp(-t^2 (beta1 - beta0) / 4 - t beta0 / 2),   sigma_vp(t)^2 = 1 - alpha(t)^2.

An EDM state x = y + sigma n is the same point up to scale: x_vp = alpha x with sigma = sigma_vp / alpha, i.e.
alpha = 1 / sqrt(1 + sigma^2). Solving ln(1 + sigma^2) = t^2 (beta1 - beta0) / 2 + t beta0 for t gives

    tau(sigma) = (-beta0 + sqrt(beta0^2 + 2 (beta1 - beta0) ln(1 + sigma^2))) / (beta1 - beta0).
"""

from __future__ import annotations

import math

import torch

BETA0 = 0.1  # VP-SDE beta_min (Song et al. 2021; DG and ADM use it)
BETA1 = 20.0  # VP-SDE beta_max


def vp_alpha(t: torch.Tensor | float, beta0: float = BETA0, beta1: float = BETA1) -> torch.Tensor:
    """Signal scale alpha(t) of the linear VP-SDE."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.exp(-0.25 * t**2 * (beta1 - beta0) - 0.5 * t * beta0)


def vp_time(sigma: torch.Tensor | float, beta0: float = BETA0, beta1: float = BETA1) -> torch.Tensor:
    """VP time tau of an EDM noise level: alpha(tau(sigma)) = 1 / sqrt(1 + sigma^2). tau(80) ~ 0.934."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    log1p = torch.log1p(sigma**2)
    return (-beta0 + torch.sqrt(beta0**2 + 2 * (beta1 - beta0) * log1p)) / (beta1 - beta0)


def edm_sigma(t: torch.Tensor | float, beta0: float = BETA0, beta1: float = BETA1) -> torch.Tensor:
    """Inverse of :func:`vp_time`: sigma = sqrt(1 / alpha(t)^2 - 1)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.sqrt(torch.expm1(0.5 * t**2 * (beta1 - beta0) + t * beta0))


# DG's training noise: VP times importance-sampled with density prop. to beta(t) / sigma_vp(t)^2 on [1e-5, 1], which is
# exactly log-uniform in EDM sigma between these two levels (d ln(sigma^2) = beta(t) / sigma_vp(t)^2 dt).
DG_SIGMA_MIN = float(edm_sigma(1e-5))  # ~1.0e-3
DG_SIGMA_MAX = float(edm_sigma(1.0))  # ~152.2


def sample_dg_sigma(
    n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Noise levels for discriminator training: log-uniform on [DG_SIGMA_MIN, DG_SIGMA_MAX] (DG's importance sampling)."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    lo, hi = math.log(DG_SIGMA_MIN), math.log(DG_SIGMA_MAX)
    return torch.exp(lo + u * (hi - lo)).float()
