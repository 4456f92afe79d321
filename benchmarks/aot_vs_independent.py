"""AOT versus independent noise coupling, trained identically: did the baseline learn, how straight are the
trajectories, and how does sample quality fall with the number of network evaluations?

    python benchmarks/aot_vs_independent.py                 # the study; writes docs/results.md + docs/results/*
    python benchmarks/aot_vs_independent.py --quick         # a smoke run of a minute or two (temporary output folder)
    python benchmarks/aot_vs_independent.py --out DIR       # DIR/results.md and DIR/results/*
    python benchmarks/aot_vs_independent.py --render-only   # redraw docs/results.md + figures from results.json

Two presets, each trained twice with the same seed (so the same data, noise levels and initial weights: training
randomness is counter-based) and differing only in ``--coupling aot`` / ``independent``:

* toy2d: the residual MLP on 8 Gaussians. Quality = sliced W2 to a fresh exact sample of the true distribution
  (and exact W2 at the converged setting); the data's own floor is W2 between two independent exact samples of the
  same size. The exact denoiser of the mixture is known in closed form, so the study also shows the Bayes-optimal
  loss and the curvature / quality of the true probability-flow ODE.
* digits: the small SongUNet on the 8x8 digits. Quality = FD-digits (proxy CNN features), against the statistics of
  one random half of the 1,797 digits; the floor is FD between N real digits of the other half and that half.

For each trained model: the training loss, the EDM loss on held-out draws with independent noise (with the exact
linear and Bayes / empirical optima as yardsticks), the pooled and median curvature, 1 - cos, truncation errors,
and quality against NFE for Heun (and Euler at the smallest budgets) with rho 7 and the AOT paper's 72 / 90.

This file computes: it trains with :func:`aotdiff.train.loop.train`, scores with :func:`aotdiff.sweep.run_sweep`,
and takes the EDM loss, the exact denoisers and the metrics from the library. It writes every number to
``OUT/results/results.json`` and the samples shown in the figures to ``OUT/results/samples.npz``; the report
(``OUT/results.md`` and the PNGs) is drawn from those files by ``aot_vs_independent_report.py``.

Each coupling trains and evaluates in its own process with one thread (two processes on two cores). One process
per core avoids the thread oversubscription that makes PyTorch on a shared 2-core machine up to 50x slower.
"""

# ruff: noqa: E402  (the thread-count variables must be set before numpy and torch are imported)
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy / torch load: one thread per worker process

import argparse
import datetime
import json
import math
import multiprocessing
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The report module sits next to this script (the script's folder is on sys.path, also in spawned workers).
from aot_vs_independent_report import (
    PICTURE_SETTINGS,
    RESULTS_FORMAT,
    RHOS,
    render,
    results_path,
    samples_path,
)
from aotdiff.diffusion import edm_loss, gaussian_denoiser, mixture_denoiser, sample_sigma
from aotdiff.generate import SamplerSettings, generate
from aotdiff.metrics import (
    FeatureStats,
    ReferenceStats,
    curvature_report,
    fid_from_stats,
    load_proxy_detector,
    sliced_wasserstein2,
    wasserstein2_exact,
)
from aotdiff.metrics.quality import FrechetQuality, W2Quality
from aotdiff.sampling import SeedRNG, karras_sigmas, sample
from aotdiff.sweep import CurvatureSettings, SweepRow, SweepRun, run_sweep

REFERENCE_SEED = 1_000_003  # fresh exact samples of the toy distribution (not the training points)
HALF_SEED = 2024  # the random split of the digits into two halves


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class PresetStudy:
    """How one preset is trained and evaluated (identical for both couplings)."""

    preset: str
    overrides: dict[str, Any]
    num: int  # samples per sweep cell
    heun_steps: list[int]
    euler_steps: list[int]
    converged_steps: int  # Heun steps of the 'converged' quality check
    curvature: CurvatureSettings
    loss_draws: int  # held-out (image, noise, sigma) draws for the loss check
    floor_repeats: int = 5
    exact_w2_num: int = 2000  # toy only: exact W2 by assignment at the converged setting


@dataclass
class StudyConfig:
    toy: PresetStudy
    digits: PresetStudy
    seed: int = 0


def full_config() -> StudyConfig:
    """The study's settings: about 15 minutes of two busy cores (see the wall time in the report)."""
    return StudyConfig(
        toy=PresetStudy(
            preset="toy2d",
            overrides=dict(duration_kimg=600.0, snapshot_kimg=600.0, tick_kimg=20.0),
            num=5000,
            heun_steps=[2, 3, 5, 8, 14, 18],
            euler_steps=[3, 5, 9],
            converged_steps=64,
            curvature=CurvatureSettings(num=1000, fine_steps=256, rho=7.0, truncation_steps=(3, 5, 9, 18)),
            loss_draws=20000,
            floor_repeats=20,
        ),
        digits=PresetStudy(
            preset="digits",
            overrides=dict(duration_kimg=120.0, model_channels=32, snapshot_kimg=120.0, tick_kimg=4.0),
            num=500,
            heun_steps=[2, 3, 5, 8, 14, 18],
            euler_steps=[3, 5, 9],
            converged_steps=32,
            curvature=CurvatureSettings(num=128, fine_steps=128, rho=7.0, truncation_steps=(3, 5, 9, 18)),
            loss_draws=4 * 1797,
            floor_repeats=10,
        ),
    )


def quick_config() -> StudyConfig:
    """A smoke run: every code path, tiny sizes (the numbers mean nothing)."""
    full = full_config()
    tiny_curvature = CurvatureSettings(num=16, fine_steps=16, rho=7.0, truncation_steps=(3, 5))
    return StudyConfig(
        toy=replace(
            full.toy,
            overrides=dict(duration_kimg=5.12, snapshot_kimg=5.12, tick_kimg=1.28, model_channels=64),
            num=300,
            heun_steps=[2, 5],
            euler_steps=[3],
            converged_steps=12,
            curvature=tiny_curvature,
            loss_draws=1000,
            floor_repeats=2,
            exact_w2_num=200,
        ),  # fmt: skip
        digits=replace(
            full.digits,
            overrides=dict(
                duration_kimg=0.512,
                model_channels=16,
                num_blocks=1,
                snapshot_kimg=0.512,
                tick_kimg=0.128,
                grid_seeds=16,
                grid_steps=4,
            ),
            num=64,
            heun_steps=[2, 5],
            euler_steps=[3],
            converged_steps=8,
            curvature=tiny_curvature,
            loss_draws=256,
            floor_repeats=2,
        ),  # fmt: skip
    )


# ------------------------------------------------------------------------------------------------ exact denoisers
Denoiser = Callable[..., torch.Tensor]


def gaussian_mixture_denoiser(means: torch.Tensor, std: float) -> Denoiser:
    """E[y | y + sigma n = x] for y from the equal-weight mixture of N(m_k, std^2 I) (std = 0: the points m_k).

    Built on the library's finite-point-set denoiser: with x = y + sigma n, component k is N(m_k, (std^2 + sigma^2) I)
    around m_k, so the posterior weights are those of the point set {m_k} at noise level sqrt(std^2 + sigma^2), and
    within a component E[y | x, k] = m_k + shrink (x - m_k) with shrink = std^2 / (std^2 + sigma^2). For std = 0 and
    m = the training set this is the denoiser that minimises the training loss exactly (the 'memorising' optimum).
    """
    points = means.to(torch.float64)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, labels: Any = None, augment_labels: Any = None) -> torch.Tensor:
        x64 = x.to(torch.float64)  # float64: the posterior weights of nearby points differ in the last float32 bits
        var = std**2 + torch.as_tensor(sigma, dtype=torch.float64).reshape(-1) ** 2
        shrink = (std**2 / var).reshape(-1, *([1] * (x.ndim - 1)))
        mean = mixture_denoiser(x64, var.sqrt(), points)
        return (shrink * x64 + (1 - shrink) * mean).to(x.dtype)

    return denoise


def linear_denoiser(data: torch.Tensor) -> Denoiser:
    """The best denoiser that is affine in x (exact for Gaussian data): mu + C (C + sigma^2 I)^-1 (x - mu).

    In the eigenbasis of C = U diag(lam) U^T every coordinate is an independent Gaussian of variance lam_i, so the
    map is the library's Gaussian denoiser applied per coordinate there. Its EDM loss is the value a network that
    learned only the data's mean and covariance would reach.
    """
    flat = data.to(torch.float64).reshape(data.shape[0], -1)
    mu = flat.mean(0)
    lam, u = torch.linalg.eigh(torch.cov(flat.T, correction=0))
    std = lam.clamp_min(0).sqrt()

    def denoise(x: torch.Tensor, sigma: torch.Tensor, labels: Any = None, augment_labels: Any = None) -> torch.Tensor:
        z = (x.to(torch.float64).reshape(x.shape[0], -1) - mu) @ u  # coordinates in the eigenbasis
        sigma64 = torch.as_tensor(sigma, dtype=torch.float64)
        return (mu + gaussian_denoiser(z, sigma64, std) @ u.T).reshape(x.shape).to(x.dtype)  # type: ignore[arg-type]

    return denoise


def heldout_loss(denoiser: Denoiser, images: torch.Tensor, seed: int) -> tuple[float, float]:
    """The EDM loss (:func:`aotdiff.diffusion.edm_loss`, per element) with independent noise: (mean, std. error).

    The draws (noise n and ln sigma ~ N(-1.2, 1.2^2)) come from a generator seeded by ``seed``, so every denoiser is
    scored on the same draws and differences between them are paired.
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g)
    sigma = sample_sigma(images.shape[0], generator=g)
    per_item = []
    with torch.no_grad():
        for start in range(0, images.shape[0], 500):
            part = slice(start, start + 500)
            err = edm_loss(denoiser, images[part], noise[part], sigma[part])
            per_item.append(err.reshape(err.shape[0], -1).mean(1).double())
    values = torch.cat(per_item)
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def fine_slopes(
    denoiser: Any, latents: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Heun solve from ``latents``: (final samples, tangents d_i [steps, batch, dim] at each step's start, sigma_i)."""
    slopes: list[torch.Tensor] = []
    levels: list[float] = []

    def keep(info: Any) -> None:
        if info.stage == "euler":
            slopes.append(info.slope.reshape(latents.shape[0], -1).to(torch.float64))
            levels.append(info.sigma)

    with torch.no_grad():
        x0 = sample(denoiser, latents, sigmas, callback=keep).images
    return x0, torch.stack(slopes), levels


def trajectory_geometry(
    denoiser: Any, shape: tuple[int, ...], num: int, fine_steps: int, rho: float, split: float = 0.1
) -> dict[str, float]:
    """A per-step look at the fine Heun trajectories, to compare with the 2-D prototype of the project's method notes.

    * ``kappa_uniform``: pooled curvature with every step of the grid weighted equally instead of by its Delta sigma
      (sum_j sum_i |d_ij - v_j|^2 / sum_j sum_i |v_j|^2). On a rho = 7 grid most steps lie at small sigma, so this
      reading emphasises the end of the trajectories, where they bend; the Delta-sigma weighting of
      ``curvature_report`` emphasises sigma > 1, where every model is nearly straight.
    * ``speed_low``: below sigma = ``split``, the tangent speed relative to the chord's, pooled over trajectories and
      steps (sum |d| / sum |v|: a ratio of sums, so trajectories with |v| near 0 do not dominate).
    * ``cos_low``: below sigma = ``split``, the mean of cos(d, v) over trajectories and steps.
    Slopes are kept for every step (fine for the small sizes of this study).
    """
    sigmas = karras_sigmas(fine_steps, rho=rho)
    top = float(sigmas[0])
    num_sum = den_sum = speed_num = speed_den = 0.0
    cosines = []
    for start in range(0, num, 500):
        seeds = list(range(start, min(start + 500, num)))
        latents = SeedRNG(seeds).randn(shape)
        x0, d, levels = fine_slopes(denoiser, latents, sigmas)
        v = ((latents.to(torch.float64) * top - x0) / top).reshape(len(seeds), -1)
        num_sum += float(((d - v) ** 2).sum())
        den_sum += d.shape[0] * float((v**2).sum())
        low = d[torch.tensor(levels) < split]
        d_norm, v_norm = low.norm(dim=-1), v.norm(dim=-1)
        speed_num += float(d_norm.sum())
        speed_den += low.shape[0] * float(v_norm.sum())
        cosines.append(((low * v).sum(-1) / (d_norm * v_norm).clamp_min(1e-300)).flatten())
    return {
        "kappa_uniform": num_sum / den_sum,
        "speed_low": speed_num / speed_den,
        "cos_low": float(torch.cat(cosines).mean()),
        "split": split,
    }


# ------------------------------------------------------------------------------------------------ data
def toy_distribution() -> Any:
    from aotdiff.data import get_toy

    return get_toy("8gaussians")


def toy_sample(n: int, seed: int) -> np.ndarray:
    return toy_distribution().sample(n, torch.Generator().manual_seed(seed)).numpy().astype(np.float64)


def digits_halves() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits (uint8 [N, 1, 8, 8]) split at random into halves A (899) and B (898), seed HALF_SEED."""
    from aotdiff.data import load_digits

    images = load_digits().images
    order = np.random.default_rng(HALF_SEED).permutation(len(images))
    half = (len(images) + 1) // 2
    return images[np.sort(order[:half])], images[np.sort(order[half:])]


def proxy_stats(images: np.ndarray) -> FeatureStats:
    stats = FeatureStats()
    stats.update(load_proxy_detector("digits", 8).features(torch.from_numpy(images)))
    return stats


def digits_reference() -> ReferenceStats:
    """FD-digits reference: the proxy statistics of half B."""
    stats = proxy_stats(digits_halves()[1])
    mu, sigma = stats.mean_cov()
    return ReferenceStats(mu, sigma, {"data": "digits half B", "num_images": stats.count})


def as_model_space(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).to(torch.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------ one model
def sweep_rows(run: SweepRun, study: PresetStudy, with_curvature: bool) -> tuple[list[SweepRow], dict[str, Any]]:
    """Quality for Heun and Euler at every rho, and the curvature report (once)."""
    rows: list[SweepRow] = []
    report: dict[str, Any] = {}
    for k, (solver, steps) in enumerate([("heun", study.heun_steps), ("euler", study.euler_steps)]):
        curvature = study.curvature if (with_curvature and k == 0) else None
        result = run_sweep(
            [run], steps, RHOS, solvers=[solver], seeds=range(study.num), curvature=curvature, batch_size=1000
        )
        rows += result.rows
        report = report or result.curvature.get(run.label, {})
    return rows, report


def kept_samples(denoiser: Denoiser, shape: tuple[int, ...], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` samples of every PICTURE_SETTINGS sampler (points for 2-D data, uint8 images otherwise)."""
    out = {}
    for name, solver, steps in PICTURE_SETTINGS:
        settings = SamplerSettings(steps=steps, rho=7.0, solver=solver)
        batches = list(generate(denoiser, range(n), shape, settings=settings, batch_size=1000))
        out[name] = torch.cat([b.raw if len(shape) == 1 else b.images for b in batches]).numpy()
    return out


def training_log(run_dir: Path) -> list[dict[str, float]]:
    """The run's log.jsonl, reduced to what the report draws and quotes: kimg, loss and (AOT) the pairing ratio."""
    keep = ("kimg", "loss", "ot_cost_ratio")
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [{k: e[k] for k in keep if k in e} for e in lines]


def mean_ot_cost_ratio(log: list[dict[str, float]]) -> float | None:
    """Mean over the second half of training of the logged ratio paired cost / cost of the random pairing."""
    values = [e["ot_cost_ratio"] for e in log if "ot_cost_ratio" in e]
    return float(np.mean(values[len(values) // 2 :])) if values else None


def study_model(
    kind: str, coupling: str, study: PresetStudy, seed: int, work: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train one preset with one coupling (or resume a finished run), then evaluate it. Runs in a worker process.

    Returns the numbers (for results.json) and the samples of the figures (for samples.npz).
    """
    from aotdiff.train.checkpoint import load_model
    from aotdiff.train.config import preset_config
    from aotdiff.train.loop import train

    torch.set_num_threads(1)
    label = f"{kind}/{coupling}"
    run_dir = Path(work) / f"{kind}-{coupling}"
    # This study is the paper's AOT against independent noise: the paper recipe is pinned (what `--coupling aot`
    # ships is compared in benchmarks/aot_power.py).
    recipe = {"aot_recipe": "paper"} if coupling == "aot" else {}
    cfg = preset_config(study.preset, coupling=coupling, seed=seed, device="cpu", **recipe, **study.overrides)
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = train(cfg, run_dir, progress=False, log=lambda s: None)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    log = training_log(run_dir)
    print(f"[{label}] trained {cfg.duration_kimg:g} kimg in {train_s:.0f} s", flush=True)

    model = load_model(run_dir)
    t1 = time.perf_counter()
    if kind == "toy":
        quality: Any = W2Quality(toy_sample(study.num, REFERENCE_SEED), reference_name="8 Gaussians, exact")
        loss_data = torch.from_numpy(toy_sample(study.loss_draws, 7)).to(torch.float32)
    else:
        quality = FrechetQuality(load_proxy_detector("digits", 8), digits_reference(), reference_name="digits half B")
        loss_data = as_model_space(np.concatenate(digits_halves()))
        loss_data = loss_data.repeat(max(study.loss_draws // len(loss_data), 1), 1, 1, 1)
    run = SweepRun(label, model.denoiser, tuple(model.shape), quality, model.num_classes, {"coupling": coupling})
    rows, curvature = sweep_rows(run, study, with_curvature=True)
    converged = run_sweep([run], [study.converged_steps], [7.0], seeds=range(study.num), curvature=None,
                          batch_size=1000)  # fmt: skip
    extra: dict[str, Any] = {}
    if kind == "toy":
        exact_run = replace(run, quality=W2Quality(toy_sample(study.exact_w2_num, REFERENCE_SEED), exact=True))
        exact = run_sweep([exact_run], [study.converged_steps], [7.0], seeds=range(study.exact_w2_num), curvature=None)
        extra["converged_exact_w2"] = exact.rows[0].value
    ot_ratio = mean_ot_cost_ratio(log)
    if ot_ratio is not None:
        extra["ot_cost_ratio"] = ot_ratio
    heldout = heldout_loss(model.denoiser, loss_data, seed=11)
    c = study.curvature
    extra["geometry"] = trajectory_geometry(model.denoiser, tuple(model.shape), c.num, c.fine_steps, c.rho)
    pictures = kept_samples(model.denoiser, tuple(model.shape), 2000 if kind == "toy" else 36)
    eval_s = time.perf_counter() - t1
    print(f"[{label}] evaluated in {eval_s:.0f} s", flush=True)
    numbers = {
        "kind": kind, "coupling": coupling, "label": label, "config": cfg.to_dict(), "nimg": result.nimg,
        "train_s": train_s, "train_cpu_s": train_cpu, "eval_s": eval_s, "cpu_s": time.process_time() - cpu0,
        "trained_now": bool(result.losses), "log": log,
        "final_train_loss": float(np.mean(result.losses[-max(len(result.losses) // 10, 1):])) if result.losses
        else log[-1]["loss"],
        "heldout_loss": heldout, "rows": [asdict(r) for r in rows], "curvature": curvature,
        "converged": asdict(converged.rows[0]), **extra,
    }  # fmt: skip
    return numbers, pictures


# ------------------------------------------------------------------------------------------------ references
def study_toy_reference(study: PresetStudy) -> dict[str, Any]:
    """The exact mixture: Bayes and linear losses, its ODE's curvature and quality, and the W2 sampling floors."""
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    dist = toy_distribution()
    exact = gaussian_mixture_denoiser(dist.means, dist.std)
    data = torch.from_numpy(toy_sample(study.loss_draws, 7)).to(torch.float32)
    losses = {"bayes": heldout_loss(exact, data, seed=11), "linear": heldout_loss(linear_denoiser(data), data, 11)}
    run = SweepRun("exact denoiser", exact, (2,), W2Quality(toy_sample(study.num, REFERENCE_SEED)), 0, {})
    rows, curvature = sweep_rows(run, study, with_curvature=True)
    c = study.curvature
    geometry = trajectory_geometry(exact, (2,), c.num, c.fine_steps, c.rho)
    sliced = [sliced_wasserstein2(toy_sample(study.num, 100 + k), toy_sample(study.num, 200 + k))
              for k in range(study.floor_repeats)]  # fmt: skip
    exact_w2 = [wasserstein2_exact(toy_sample(study.exact_w2_num, 300 + k), toy_sample(study.exact_w2_num, 400 + k))
                for k in range(study.floor_repeats)]  # fmt: skip
    # The reference sample the models are scored against, against fresh samples: the floor of the scores themselves.
    scored = [sliced_wasserstein2(toy_sample(study.num, 500 + k), toy_sample(study.num, REFERENCE_SEED))
              for k in range(study.floor_repeats)]  # fmt: skip
    print(f"[toy/reference] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return {
        "losses": losses, "rows": [asdict(r) for r in rows], "curvature": curvature, "geometry": geometry,
        "floor_sliced": (float(np.mean(sliced)), float(np.std(sliced))),
        "floor_sliced_vs_reference": (float(np.mean(scored)), float(np.std(scored))),
        "floor_exact": (float(np.mean(exact_w2)), float(np.std(exact_w2))), "time_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
    }  # fmt: skip


def study_digits_reference(study: PresetStudy) -> dict[str, Any]:
    """FD-digits floors, and the linear / empirical-optimum losses and curvature on the whole digits set."""
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    half_a, half_b = digits_halves()
    reference = digits_reference()
    n = min(study.num, len(half_a))
    floors = []
    for k in range(study.floor_repeats):
        pick = np.random.default_rng(k).choice(len(half_a), n, replace=False)
        floors.append(fid_from_stats(proxy_stats(half_a[pick]), reference))
    full = fid_from_stats(proxy_stats(half_a), reference)
    data = as_model_space(np.concatenate([half_a, half_b]))
    loss_data = data.repeat(max(study.loss_draws // len(data), 1), 1, 1, 1)
    memorise = gaussian_mixture_denoiser(data, 0.0)
    losses = {
        "empirical_optimum": heldout_loss(memorise, loss_data, seed=11),
        "linear": heldout_loss(linear_denoiser(data), loss_data, seed=11),
    }
    c = study.curvature
    curvature = curvature_report(memorise, (1, 8, 8), range(c.num), fine_steps=c.fine_steps, rho=c.rho,
                                 truncation_steps=c.truncation_steps, batch_size=500)  # fmt: skip
    geometry = trajectory_geometry(memorise, (1, 8, 8), c.num, c.fine_steps, c.rho)
    print(f"[digits/reference] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return {
        "floor": (float(np.mean(floors)), float(np.std(floors))), "floor_n": n, "floor_full_halves": full,
        "half_sizes": (len(half_a), len(half_b)), "losses": losses, "curvature": curvature, "geometry": geometry,
        "time_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
    }  # fmt: skip


def run_task(task: tuple) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """Entry point of a worker process: ('model', kind, coupling, study, seed, work) or ('reference', kind, study).

    Returns (name, numbers, samples of the figures keyed by picture title).
    """
    if task[0] == "model":
        _, kind, coupling, study, seed, work = task
        numbers, pictures = study_model(kind, coupling, study, seed, work)
        return f"{kind}/{coupling}", numbers, pictures
    _, kind, study = task
    fn = study_toy_reference if kind == "toy" else study_digits_reference
    return f"{kind}/reference", fn(study), {}


# ------------------------------------------------------------------------------------------------ main
def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"


def save_results(
    out: Path, results: dict[str, dict[str, Any]], pictures: dict[str, np.ndarray], cfg: StudyConfig,
    meta: dict[str, Any],
) -> None:  # fmt: skip
    """OUT/results/results.json (every number, the settings, the metadata) and OUT/results/samples.npz."""
    path = results_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"format": RESULTS_FORMAT, "meta": meta, "study": asdict(cfg), "results": results}
    path.write_text(json.dumps(saved, indent=1, default=float) + "\n")
    np.savez_compressed(samples_path(out), **pictures)


def compute(cfg: StudyConfig, work: Path, jobs: int) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Every training run and evaluation, ``jobs`` worker processes at a time."""
    tasks: list[tuple] = [
        ("model", "toy", "independent", cfg.toy, cfg.seed, str(work)),
        ("model", "toy", "aot", cfg.toy, cfg.seed, str(work)),
        ("model", "digits", "independent", cfg.digits, cfg.seed, str(work)),
        ("model", "digits", "aot", cfg.digits, cfg.seed, str(work)),
        ("reference", "toy", cfg.toy),
        ("reference", "digits", cfg.digits),
    ]
    results: dict[str, dict[str, Any]] = {}
    pictures: dict[str, np.ndarray] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(jobs, 1), mp_context=context) as pool:
        for name, numbers, samples in pool.map(run_task, tasks):
            results[name] = numbers
            pictures.update({f"{name}/{title}": data for title, data in samples.items()})
    return results, pictures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny settings (numbers mean nothing)")
    parser.add_argument("--out", type=Path, default=None, help="output folder for results.md and results/ "
                        "(default: docs; with --quick a temporary one)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=None, help="folder for the training runs (default: temporary, "
                        "deleted at the end); a finished run found there is reused instead of retrained")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each (default: 2)")
    parser.add_argument("--render-only", action="store_true", help="redraw OUT/results.md and the figures from "
                        "OUT/results/results.json (+ samples.npz) without training or evaluating anything")  # fmt: skip
    args = parser.parse_args(argv)
    if args.render_only:
        out = args.out or Path("docs")
        path = render(out)
        print(f"wrote {path} and the figures in {out / 'results'}/ from {results_path(out)}")
        return 0
    cfg = quick_config() if args.quick else full_config()
    out = args.out or (Path(tempfile.mkdtemp(prefix="aot-study-")) if args.quick else Path("docs"))
    work = args.work or Path(tempfile.mkdtemp(prefix="aot-study-runs-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, pictures = compute(cfg, work, args.jobs)
    wall = time.perf_counter() - start
    meta = {
        "quick": args.quick, "wall_s": wall, "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip
    save_results(out, results, pictures, cfg, meta)
    path = render(out)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {results_path(out)}, {path} and {out / 'results'}/ in {wall / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
