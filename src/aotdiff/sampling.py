"""Deterministic and stochastic samplers for the EDM probability-flow ODE (Karras et al. 2022, Algorithm 2).

The ODE in EDM's sigma-time is dx/dsigma = (x - D(x; sigma)) / sigma, integrated from sigma_max down to 0.

* :func:`karras_sigmas` — the rho-schedule of EDM eq. (5): large rho (72, 90 in the AOT paper) is almost log-uniform.
* :func:`sample` — Euler or Heun steps with optional stochastic churn, float64 state, exact NFE count, per-step callback.
* :class:`SeedRNG` / :func:`latents_from_seeds` — one random generator per seed, so image k is identical whatever the
  batch size, device count or position in the batch.

NFE accounting: with N steps (N sigmas followed by a final 0), Heun evaluates the network twice per step except on the
last step into sigma = 0, where the second-order correction is skipped (it would divide by 0): 2N - 1 evaluations.
Euler evaluates N times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

SIGMA_MIN = 0.002  # EDM defaults for CIFAR-10-like data in [-1, 1].
SIGMA_MAX = 80.0
SOLVERS = ("heun", "euler")


class Denoiser(Protocol):
    """Anything called as ``denoiser(x, sigma, labels) -> denoised`` (e.g. :class:`aotdiff.diffusion.Precond`)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor: ...


@dataclass
class StepInfo:
    """What the sampler knows after each network evaluation; handed to the per-step callback.

    ``stage`` is 'euler' for the first evaluation of a step and 'heun' for the correction; ``x`` and ``sigma`` are
    where the network was evaluated (for 'heun': the Euler prediction at the step's target level). ``slope`` is dx/dsigma = (x - denoised) / sigma.
    ``x_next`` is the state after the step so far (Euler prediction, then the corrected value).
    """

    step: int
    num_steps: int
    stage: str
    sigma: float | torch.Tensor  # a float64 tensor [B] when samples were churned individually (DG boosting)
    sigma_next: float
    x: torch.Tensor
    denoised: torch.Tensor
    slope: torch.Tensor
    x_next: torch.Tensor


class SampleResult(NamedTuple):
    """Samples (in the data's units, float64) and the exact number of network evaluations made for the batch."""

    images: torch.Tensor
    nfe: int


# guidance(x, sigma, denoised, labels, stage) -> denoised; sigma is a float64 tensor [B] (one level per sample: with
# per-sample churn the levels differ). A guidance object may also define ``step_churn(step, num_steps)`` returning a
# bool mask [B] of samples to re-noise at this step and the S_churn to use for them (DG's boosting), or None.
Guidance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", str], torch.Tensor]


def karras_sigmas(
    num_steps: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = 7.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """EDM eq. (5): sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0.

    Returns N + 1 float64 values: the N noise levels from sigma_max to sigma_min, followed by a final 0.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    # Written so that NaN fails every test (NaN compares false): a NaN rho once passed `rho <= 0` and gave black images.
    if not (0 < sigma_min <= sigma_max < math.inf):
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not (0 < rho < math.inf):
        raise ValueError(f"rho must be a finite number > 0, got {rho}")
    n = int(num_steps)
    i = torch.arange(n, dtype=torch.float64, device=device)
    frac = i / (n - 1) if n > 1 else torch.zeros_like(i)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64, device=device)])


def expected_nfe(num_steps: int, solver: str = "heun") -> int:
    """Network evaluations of :func:`sample` on a :func:`karras_sigmas` grid of ``num_steps`` levels."""
    _check_solver(solver)
    return 2 * num_steps - 1 if solver == "heun" else num_steps


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")


class SeedRNG:
    """One ``torch.Generator`` per seed; ``randn`` stacks one draw per seed.

    Draws are made on the CPU and moved to the target device, so a seed gives the same numbers on every machine.
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(
        self, shape: Sequence[int], *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """[len(seeds), *shape] standard normals; row k only depends on seed k and on how often it was drawn."""
        rows = [torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device)

    def randn_rows(
        self, rows: torch.Tensor, shape: Sequence[int], *, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Standard normals for the rows where ``rows`` (bool [len(seeds)]) is true, zeros elsewhere.

        Only the selected seeds' generators advance, so what a sample draws never depends on the other samples of
        its batch (per-sample churn stays reproducible per seed)."""
        out = torch.zeros((len(self.generators), *shape), dtype=torch.float32)
        for k in torch.nonzero(rows.cpu()).flatten().tolist():
            out[k] = torch.randn(tuple(shape), generator=self.generators[k])
        return out.to(device)

    def randint(self, high: int, *, device: torch.device | str | None = None) -> torch.Tensor:
        """One integer in [0, high) per seed (e.g. a class label), int64 [len(seeds)]."""
        vals = [int(torch.randint(high, (1,), generator=g)) for g in self.generators]
        return torch.tensor(vals, dtype=torch.int64, device=device)


def latents_from_seeds(
    seeds: Sequence[int], shape: Sequence[int], device: torch.device | str | None = None
) -> torch.Tensor:
    """Unit-variance latents, one per seed: row k is identical whatever else is in the batch."""
    return SeedRNG(seeds).randn(shape, device=device)


def sample(
    denoiser: Denoiser,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    solver: str = "heun",
    labels: torch.Tensor | None = None,
    churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = math.inf,
    s_noise: float = 1.0,
    rng: SeedRNG | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    guidance: Guidance | None = None,
) -> SampleResult:
    """Integrate the probability-flow ODE from ``sigmas[0]`` down to ``sigmas[-1]`` (EDM Algorithm 2).

    Args:
        denoiser: called as ``denoiser(x, sigma, labels)``; x is float64, sigma a float64 tensor of shape [B].
        latents: unit-variance noise [B, ...]; the sampler scales it by ``sigmas[0]`` itself.
        sigmas: decreasing noise levels, normally :func:`karras_sigmas` (ending in 0).
        solver: 'heun' (2nd order, EDM's default) or 'euler' (1st order).
        labels: class labels passed through to the denoiser (int64 [B] or one-hot).
        churn, s_min, s_max, s_noise: EDM's stochastic sampler (S_churn, S_tmin, S_tmax, S_noise). With churn = 0
            (the default, and what AOT uses) sampling is deterministic. The added noise comes from ``rng``
            (one generator per seed), or from torch's global generator when ``rng`` is None.
        callback: called with a :class:`StepInfo` after every network evaluation (curvature, guidance, progress).
        guidance: optional ``guidance(x, sigma, denoised, labels, stage) -> denoised`` that adjusts the denoiser
            output before the slope is formed (discriminator guidance plugs in here; sigma is a float64 tensor
            [B]); it makes no network evaluation of the score model, so it does not count towards NFE. If it has
            ``step_churn(step, num_steps) -> (mask [B] bool, S_churn) | None``, the masked samples get that churn
            at the step (noise from their own seed's generator when ``rng`` is given).

    Returns:
        ``SampleResult(images, nfe)``: float64 samples and the number of denoiser evaluations made.
    """
    _check_solver(solver)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor of at least 2 noise levels (e.g. karras_sigmas(N))")
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError("sigmas must be finite numbers (a NaN or inf level would make every sample NaN)")
    if bool((sigmas[1:] > sigmas[:-1]).any()) or bool((sigmas < 0).any()):
        raise ValueError("sigmas must be non-negative and non-increasing (from sigma_max down to 0)")
    for name, value in (("churn", churn), ("s_min", s_min), ("s_noise", s_noise)):
        if not (0 <= value < math.inf):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if not s_max > 0:  # inf is allowed (churn at every level); NaN is not
        raise ValueError(f"s_max must be > 0, got {s_max}")
    if rng is not None and len(rng) != latents.shape[0]:
        raise ValueError(f"rng has {len(rng)} seeds but latents hold {latents.shape[0]} samples")
    levels = [float(s) for s in sigmas]
    num_steps = len(levels) - 1
    batch = latents.shape[0]
    device = latents.device
    nfe = 0

    def evaluate(x: torch.Tensor, sigma: float | torch.Tensor, stage: str) -> torch.Tensor:
        nonlocal nfe
        sigma_batch = torch.as_tensor(sigma, dtype=torch.float64, device=device).expand(batch).contiguous()
        denoised = denoiser(x, sigma_batch, labels).to(torch.float64)
        nfe += 1
        if guidance is not None:
            denoised = guidance(x, sigma_batch, denoised, labels, stage).to(torch.float64)
        return denoised

    step_churn = getattr(guidance, "step_churn", None)
    view = (batch,) + (1,) * (latents.ndim - 1)  # per-sample levels broadcast over the sample's dimensions
    x_next = latents.to(torch.float64) * levels[0]
    for i in range(num_steps):
        t_cur, t_next = levels[i], levels[i + 1]
        x_cur = x_next
        # Stochastic churn (EDM eq. 7 / Algorithm 2 lines 4-6): raise the noise level, then add matching fresh noise.
        gamma = min(churn / num_steps, math.sqrt(2.0) - 1.0) if churn > 0 and s_min <= t_cur <= s_max else 0.0
        t_hat: float | torch.Tensor = t_cur + gamma * t_cur
        boosted = step_churn(i, num_steps) if step_churn is not None else None
        if boosted is not None and bool(boosted[0].any()) and t_cur > 0:
            # Per-sample churn (DG's boosting): the selected samples are raised to their own, higher level.
            mask, boost_churn = boosted
            g_boost = min(boost_churn / num_steps, math.sqrt(2.0) - 1.0)
            gammas = torch.where(mask.to(device), torch.full((batch,), max(gamma, g_boost), dtype=torch.float64,
                                 device=device), torch.full((batch,), gamma, dtype=torch.float64, device=device))  # fmt: skip
            t_hat = t_cur * (1 + gammas)
            rows = gammas > 0
            if rng is not None:
                eps = rng.randn_rows(rows, x_cur.shape[1:], device=device)
            else:
                eps = torch.randn_like(x_cur) * rows.view(view)
            x_hat = x_cur + torch.sqrt(t_hat**2 - t_cur**2).view(view) * s_noise * eps.to(torch.float64)
        elif gamma > 0:
            eps = rng.randn(x_cur.shape[1:], device=device) if rng is not None else torch.randn_like(x_cur)
            x_hat = x_cur + math.sqrt(float(t_hat) ** 2 - t_cur**2) * s_noise * eps.to(torch.float64)
        else:
            x_hat = x_cur
        if isinstance(t_hat, float) and t_hat == 0:  # a degenerate grid whose last levels are all 0: nothing to do
            x_next = x_hat
            continue
        t_hat_b = t_hat.view(view) if isinstance(t_hat, torch.Tensor) else t_hat

        denoised = evaluate(x_hat, t_hat, "euler")
        d_cur = (x_hat - denoised) / t_hat_b
        x_next = x_hat + (t_next - t_hat_b) * d_cur
        if callback is not None:
            callback(StepInfo(i, num_steps, "euler", t_hat, t_next, x_hat, denoised, d_cur, x_next))

        # Heun correction (2nd order), skipped when stepping into sigma = 0.
        if solver == "heun" and t_next > 0:
            x_euler = x_next
            denoised_next = evaluate(x_euler, t_next, "heun")
            d_next = (x_euler - denoised_next) / t_next
            x_next = x_hat + (t_next - t_hat_b) * (0.5 * d_cur + 0.5 * d_next)
            if callback is not None:
                callback(StepInfo(i, num_steps, "heun", t_next, t_next, x_euler, denoised_next, d_next, x_next))
    return SampleResult(x_next, nfe)


def sample_from_seeds(
    denoiser: Denoiser,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    num_steps: int = 18,
    rho: float = 7.0,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    device: torch.device | str | None = None,
    **kwargs: object,
) -> SampleResult:
    """Convenience: latents and churn noise from one generator per seed, then :func:`sample` on a Karras grid."""
    rng = SeedRNG(seeds)
    latents = rng.randn(shape, device=device)
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=device)
    return sample(denoiser, latents, sigmas, rng=rng, **kwargs)  # type: ignore[arg-type]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-space images in [-1, 1] -> uint8 [0, 255] with EDM's rounding (x * 127.5 + 128, clipped)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)
