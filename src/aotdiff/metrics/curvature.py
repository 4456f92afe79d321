"""Trajectory curvature and truncation error of the probability-flow ODE (our definitions; see docs/metrics.md).

The AOT paper (Kim et al. 2024) claims lower-curvature trajectories and smaller truncation errors, without giving a
formula. We follow Lee et al. 2023 ("Minimizing Trajectory Curvature of ODE-based Generative Models") in EDM's
sigma-time, as set out in the method reference (aot-method.md section 5):

* Trajectories: Heun on a fine Karras grid (default 256 steps, rho 7) from x_T = sigma_max * latent, fixed seeds.
* Tangent at step i: d_i = dx/dsigma = (x_i - D(x_i; sigma_i)) / sigma_i, the slope of the step's first ('euler')
  evaluation. Chord: v = (x_T - x_0) / (sigma_max - 0), with x_0 the final sample. A straight trajectory has d_i = v.
* Pooled curvature: kappa = sum_j sum_i w_i |d_ij - v_j|^2 / sum_j sum_i w_i |v_j|^2, with w_i = |sigma_i - sigma_i+1|
  (a Riemann sum of the integral over sigma, so the grid's non-uniform spacing does not bias it).
* Companions: the median over trajectories of the per-trajectory ratio; the w-weighted mean of 1 - cos(d_i, v); the
  profile of kappa restricted to log-spaced sigma bands.
* Truncation error of an N-step sampler: mean over trajectories of |x_0^(N) - x_0^(ref)| / sqrt(dim), from the same
  latents, where ref is the fine solution.

Nothing is stored per step: v is only known at the end, so each trajectory accumulates sum w, sum w |d|^2 and the
vector sum w d (and sum w d / |d| for the cosine), and |d - v|^2 is expanded once v is known. Memory is O(batch x dim
x bands), whatever the number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from aotdiff.generate import seed_labels
from aotdiff.sampling import SIGMA_MAX, SIGMA_MIN, Denoiser, SeedRNG, StepInfo, karras_sigmas, sample

__all__ = ["TrajectoryAccumulator", "curvature_report", "format_seeds", "sigma_bands"]


def sigma_bands(sigma_min: float, sigma_max: float, num_bands: int) -> np.ndarray:
    """``num_bands + 1`` log-spaced band edges covering [sigma_min, sigma_max]."""
    if num_bands < 1:
        raise ValueError(f"num_bands must be at least 1, got {num_bands}")
    return np.geomspace(sigma_min, sigma_max, num_bands + 1)


def _band_of(sigma: float, edges: np.ndarray) -> int:
    """Index of the band holding sigma (levels outside the edges go to the nearest end band)."""
    return int(np.clip(np.searchsorted(edges, sigma, side="right") - 1, 0, len(edges) - 2))


class TrajectoryAccumulator:
    """Per-trajectory sums over the steps of one batch, fed by the sampler's callback.

    For trajectory j and band b it keeps: W_b = sum w_i, Q_jb = sum w_i |d_ij|^2, S_jb = sum w_i d_ij (a vector) and
    U_j = sum w_i d_ij / |d_ij| (all bands together). After the solve, with v_j known:
    sum_i w_i |d_ij - v_j|^2 = Q_j - 2 v_j . S_j + |v_j|^2 W  and  sum_i w_i cos(d_ij, v_j) = v_j . U_j / |v_j|.
    """

    def __init__(self, batch: int, dim: int, edges: np.ndarray, device: torch.device | str):
        nb = len(edges) - 1
        self.edges = edges
        self.weight = torch.zeros(nb, dtype=torch.float64)
        self.sq = torch.zeros(batch, nb, dtype=torch.float64, device=device)
        self.vec = torch.zeros(batch, nb, dim, dtype=torch.float64, device=device)
        self.unit = torch.zeros(batch, dim, dtype=torch.float64, device=device)

    def __call__(self, info: StepInfo) -> None:
        if info.stage != "euler":
            return  # the tangent of step i is the slope at its start; Heun corrections are not tangents at grid points
        # Per-sample levels only arise with DG's boosting churn, which curvature runs do not use: take the largest.
        sigma = info.sigma if isinstance(info.sigma, float) else float(info.sigma.max())
        w = abs(sigma - info.sigma_next)
        b = _band_of(sigma, self.edges)
        d = info.slope.reshape(info.slope.shape[0], -1).to(torch.float64)
        norm = d.norm(dim=1, keepdim=True)
        self.weight[b] += w
        self.sq[:, b] += w * (d * d).sum(dim=1)
        self.vec[:, b] += w * d
        self.unit += w * torch.where(norm > 0, d / norm.clamp_min(1e-300), torch.zeros_like(d))

    def finish(self, chord: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per trajectory and band: numerator sum w |d - v|^2, denominator sum w |v|^2; and sum w cos per trajectory."""
        v = chord.reshape(chord.shape[0], -1).to(torch.float64)
        v2 = (v * v).sum(dim=1, keepdim=True)  # [B, 1]
        w = self.weight.to(v.device)[None, :]  # [1, nb]
        num = self.sq - 2 * torch.einsum("bkd,bd->bk", self.vec, v) + v2 * w
        den = v2 * w
        vnorm = v2.squeeze(1).sqrt()
        cos_sum = torch.where(vnorm > 0, (self.unit * v).sum(dim=1) / vnorm.clamp_min(1e-300), torch.zeros_like(vnorm))
        return {"num": num.clamp_min(0.0), "den": den, "cos_sum": cos_sum, "weight": self.weight.clone()}


def format_seeds(seeds: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (the syntax of ``aotdiff.generate.parse_seeds``)."""
    parts: list[str] = []
    ordered = [int(s) for s in seeds]
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def _solve(
    denoiser: Denoiser,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    solver: str,
    labels: torch.Tensor | None,
    callback: Callable[[StepInfo], None] | None = None,
    guidance: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    with torch.no_grad():
        return sample(
            denoiser, latents, sigmas, solver=solver, labels=labels, callback=callback, guidance=guidance
        ).images


# Coarse Heun step counts whose truncation error is reported by default (5 to 35 NFE, where few-step samplers live).
DEFAULT_TRUNCATION_STEPS = (3, 5, 9, 18)


def default_truncation_steps(fine_steps: int) -> list[int]:
    """The default coarse step counts for a fine grid of ``fine_steps``: those of 3, 5, 9, 18 below it (a count at or
    above the fine grid would be measured against a reference no finer than itself), or 1 and 2 for a grid of 2-3."""
    counts = [n for n in DEFAULT_TRUNCATION_STEPS if n < fine_steps]
    return counts or [n for n in (1, 2) if n < fine_steps]


def curvature_report(
    denoiser: Denoiser,
    shape: Sequence[int],
    seeds: Sequence[int],
    *,
    num_classes: int = 0,
    class_label: int | None = None,
    fine_steps: int = 256,
    rho: float = 7.0,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    truncation_steps: Sequence[int] | None = None,
    truncation_rho: float | None = None,
    truncation_solver: str = "heun",
    num_bands: int = 8,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    guidance: Callable[..., torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Curvature of the probability-flow ODE trajectories and truncation error of coarse samplers (JSON-ready dict).

    Args:
        denoiser: ``denoiser(x, sigma, labels) -> denoised`` (e.g. an EMA network wrapped in ``Precond``).
        shape: shape of one sample, e.g. (3, 32, 32) or (2,) for 2-D points.
        seeds: one trajectory per seed; latents (and labels, for conditional models) are drawn per seed exactly as
            ``aotdiff.generate`` draws them, so trajectory k is sample k of ``aotdiff sample`` with the same seeds.
        num_classes, class_label: as in ``aotdiff.generate.generate`` (0 = unconditional).
        fine_steps, rho: the fine Heun grid of the reference trajectories.
        truncation_steps: step counts N of the coarse samplers to compare with the fine solution, each below
            ``fine_steps`` (default: :func:`default_truncation_steps`).
        truncation_rho, truncation_solver: their schedule (default: the same rho) and solver.
        num_bands: number of log-spaced sigma bands in the curvature profile.
        batch_size: trajectories solved at once.
        progress: called with the number of trajectories finished after each batch.
        guidance: the sampler's ``guidance`` hook (e.g. :class:`aotdiff.guidance.DiscriminatorGuidance`), used in the
            fine and the coarse solves alike: the report is then that of the guided ODE. It must be deterministic
            (no boosting churn), or the trajectories would not be ODE solutions.

    Returns:
        ``curvature`` (pooled kappa), ``curvature_median``, ``one_minus_cos``, ``curvature_per_sigma`` (list of
        [band centre sigma, kappa in that band]), ``truncation_error`` ({"N": error}), the trajectories' mean chord
        length, and the settings (num, steps, rho, sigma range, seeds, nfe).
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed (e.g. 0-63)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if truncation_steps is None:
        truncation_steps = default_truncation_steps(fine_steps)
    truncation_steps = sorted({int(n) for n in truncation_steps})
    if any(n < 1 for n in truncation_steps):
        raise ValueError(f"truncation step counts must be positive, got {truncation_steps}")
    if any(n >= fine_steps for n in truncation_steps):  # the error is measured against the fine grid: it must be finer
        raise ValueError(f"truncation step counts {truncation_steps} must be below fine_steps {fine_steps}")
    t_rho = rho if truncation_rho is None else truncation_rho
    fine = karras_sigmas(fine_steps, sigma_min, sigma_max, rho, device=device)
    coarse = {n: karras_sigmas(n, sigma_min, sigma_max, t_rho, device=device) for n in truncation_steps}
    sigma_top = float(fine[0])  # the grid's first level (sigma_max up to the schedule formula's round-off)
    edges = sigma_bands(sigma_min, sigma_max, num_bands)
    dim = math.prod(shape)

    nums, dens, cos_sums, chord_norms = [], [], [], []
    band_weight = torch.zeros(num_bands, dtype=torch.float64)
    errors: dict[int, list[torch.Tensor]] = {n: [] for n in truncation_steps}
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        rng = SeedRNG(chunk)
        latents = rng.randn(shape, device=device)  # float32 draws, exactly as aotdiff.generate makes them
        labels = seed_labels(rng, num_classes, class_label)
        labels = None if labels is None else labels.to(device)
        acc = TrajectoryAccumulator(len(chunk), dim, edges, device)
        x0 = _solve(denoiser, latents, fine, "heun", labels, acc, guidance)
        chord = (latents.to(torch.float64) * sigma_top - x0) / sigma_top
        parts = acc.finish(chord)
        nums.append(parts["num"].cpu())
        dens.append(parts["den"].cpu())
        cos_sums.append(parts["cos_sum"].cpu())
        band_weight = parts["weight"]
        chord_norms.append(chord.reshape(len(chunk), -1).norm(dim=1).cpu())
        for n in truncation_steps:
            xn = _solve(denoiser, latents, coarse[n], truncation_solver, labels, guidance=guidance)
            errors[n].append(((xn - x0).reshape(len(chunk), -1).norm(dim=1) / math.sqrt(dim)).cpu())
        if progress is not None:
            progress(len(chunk))

    num, den = torch.cat(nums), torch.cat(dens)  # [J, bands]
    per_trajectory = num.sum(1) / den.sum(1)
    total_weight = float(band_weight.sum())
    profile = []
    for b in range(num_bands):
        if float(band_weight[b]) > 0:
            centre = float(math.sqrt(edges[b] * edges[b + 1]))
            profile.append([centre, float(num[:, b].sum() / den[:, b].sum())])
    return {
        "curvature": float(num.sum() / den.sum()),
        "curvature_median": float(per_trajectory.median()),
        "one_minus_cos": float(1.0 - torch.cat(cos_sums).mean() / total_weight),
        "curvature_per_sigma": profile,
        "truncation_error": {str(n): float(torch.cat(errors[n]).mean()) for n in truncation_steps},
        "chord_length_mean": float(torch.cat(chord_norms).mean() / math.sqrt(dim)),
        "num": len(seeds),
        "steps": fine_steps,
        "rho": rho,
        "sigma_min": sigma_min,
        "sigma_max": sigma_max,
        "solver": "heun",
        "nfe": 2 * fine_steps - 1,
        "truncation_rho": t_rho,
        "truncation_solver": truncation_solver,
        "num_bands": num_bands,
        "seeds": format_seeds(seeds),
        "shape": list(shape),
    }
