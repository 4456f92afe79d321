"""Sampler sweeps: sample quality against the number of network evaluations, and trajectory curvature, per run.

The AOT paper's claim is about few-step sampling: straighter probability-flow trajectories let a coarse sampler
(27 / 29 NFE with rho 90 / 72, aot-method.md section 3) reach the quality the baseline needs 35 NFE for. A sweep makes
that measurable for any set of runs: for every run x solver x rho x steps it generates samples from the same fixed
seeds, scores them with a quality metric, and records the network evaluations the sampler actually made; once per run
it adds the curvature report of :func:`aotdiff.metrics.curvature_report` on a fine grid. With Discriminator Guidance
(a run's ``guidance``), the guidance weight is one more axis: every cell is sampled once per weight, weight 0 being
the unguided sampler, and the discriminator gradients per sample are counted beside the score network's NFE. The
curvature report stays that of the unguided ODE.

This module computes; it does not render. The pieces around it live in:

* :mod:`aotdiff.metrics.quality` -- the quality metrics (``FrechetQuality``, ``W2Quality``, ``make_quality``) and
  their references;
* :mod:`aotdiff.report` -- CSV / Markdown tables and PNG plots of a :class:`SweepResult`.

Their names are re-exported here so that ``from aotdiff.sweep import ...`` keeps working for existing callers.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from aotdiff.generate import GeneratedBatch, PreparedDenoiser, SamplerSettings, generate
from aotdiff.metrics import curvature_report
from aotdiff.metrics.quality import (
    DEFAULT_NUM,
    DIGITS_SPECS,
    METRICS,
    FrechetQuality,
    QualityMetric,
    W2Quality,
    dataset_reference,
    default_metric,
    digits_input_size,
    make_quality,
    model_data,
    toy_reference,
)
from aotdiff.report import (
    curvature_table,
    plot_curvature_vs_sigma,
    plot_quality_vs_nfe,
    quality_table,
    write_csv,
    write_markdown,
)
from aotdiff.sampling import expected_nfe

__all__ = [
    # the sweep (defined here)
    "DEFAULT_CURVATURE",
    "CurvatureSettings",
    "SweepResult",
    "SweepRow",
    "SweepRun",
    "parse_float_list",
    "parse_int_list",
    "parse_weight_list",
    "run_label",
    "run_sweep",
    "sweep_cells",
    "sweep_cost",
    # re-exported from aotdiff.metrics.quality
    "DEFAULT_NUM",
    "DIGITS_SPECS",
    "METRICS",
    "FrechetQuality",
    "QualityMetric",
    "W2Quality",
    "dataset_reference",
    "default_metric",
    "digits_input_size",
    "make_quality",
    "model_data",
    "toy_reference",
    # re-exported from aotdiff.report
    "curvature_table",
    "plot_curvature_vs_sigma",
    "plot_quality_vs_nfe",
    "quality_table",
    "write_csv",
    "write_markdown",
]


# ------------------------------------------------------------------------------------------------ parsing
def parse_int_list(text: str, what: str) -> list[int]:
    """'3,5,8' -> [3, 5, 8] (positive integers), with an error naming the flag ``what``."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers like 3,5,8; got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must list positive integers like 3,5,8; got '{text}'")
    return values


def parse_float_list(text: str, what: str) -> list[float]:
    """'7,72,90' -> [7.0, 72.0, 90.0] (positive finite numbers), with an error naming the flag ``what``."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers like 7,72,90; got '{text}'") from None
    # `0 < v < inf` is False for NaN too: a NaN rho once slipped through `v > 0` and gave black images
    if not values or any(not 0 < v < float("inf") for v in values):
        raise ValueError(f"{what} must list positive numbers like 7,72,90; got '{text}'")
    return values


def parse_weight_list(text: str, what: str) -> list[float]:
    """'0,1,2' -> [0.0, 1.0, 2.0] (finite numbers >= 0, 0 allowed, repeats dropped), with an error naming ``what``."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers like 0,1,2; got '{text}'") from None
    if not values or any(not (math.isfinite(v) and v >= 0) for v in values):
        raise ValueError(f"{what} must list finite numbers >= 0 like 0,1,2; got '{text}'")
    return list(dict.fromkeys(values))


def run_label(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Short unique names for runs: the directory name, or the whole path where names repeat."""
    names = [Path(p).name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths, strict=True)]


# ------------------------------------------------------------------------------------------------ the sweep
@dataclass
class SweepRun:
    """One model in a sweep: a label for tables, the denoiser and what is needed to sample and score it."""

    label: str
    denoiser: Any
    shape: tuple[int, ...]
    quality: QualityMetric
    num_classes: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # e.g. coupling, data, nimg: copied into every row
    # Discriminator Guidance for this run (an aotdiff.guidance.DiscriminatorGuidance, or None): each guided cell uses
    # a copy of it with the cell's weight, so the object itself is never changed.
    guidance: Any = None
    # The denoiser of the curvature report (None: ``denoiser``). `aotdiff sweep` passes the fp32 network here when the
    # cells run in bf16 / TF32: the report differences slopes between neighbouring levels of a 256-step grid, and
    # reduced-precision rounding in every slope would be measured as curvature.
    curvature_denoiser: Any = None


@dataclass(frozen=True)
class CurvatureSettings:
    """Arguments of :func:`aotdiff.metrics.curvature_report` used once per run."""

    num: int = 256
    fine_steps: int = 256
    rho: float = 7.0
    truncation_steps: tuple[int, ...] = (3, 5, 9, 18)

    def cost(self) -> int:
        """Network evaluations per trajectory: the fine Heun solve plus one coarse solve per truncation count."""
        return expected_nfe(self.fine_steps) + sum(expected_nfe(n) for n in self.truncation_steps)


DEFAULT_CURVATURE = CurvatureSettings()


@dataclass
class SweepRow:
    """One cell: a run sampled with (solver, steps, rho, DG weight) and scored. ``nfe`` is counted, not predicted.

    ``nfe`` counts score-network evaluations only; ``discriminator_evals`` counts the discriminator gradients per
    sample beside it (0 in unguided cells, ``dg_weight`` 0). When the run's denoiser is a
    :class:`aotdiff.generate.PreparedDenoiser`, ``info`` also holds its ``precision`` and ``compile``.
    """

    run: str
    metric: str
    solver: str
    steps: int
    rho: float
    nfe: int
    value: float
    num: int
    info: dict[str, Any] = field(default_factory=dict)
    dg_weight: float = 0.0
    discriminator_evals: int = 0


@dataclass
class SweepResult:
    rows: list[SweepRow]
    curvature: dict[str, dict[str, Any]]  # run label -> curvature report
    settings: dict[str, Any] = field(default_factory=dict)  # what every cell shared (sampler, seeds, class)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "curvature": self.curvature, "settings": self.settings}


def sweep_cells(steps: Sequence[int], rhos: Sequence[float], solvers: Sequence[str]) -> list[tuple[str, int, float]]:
    """(solver, steps, rho) triples in table order: solver, then rho, then steps."""
    return [(s, n, r) for s in solvers for r in rhos for n in steps]


def _scaled(progress: Callable[[int], None] | None, factor: int) -> Callable[[int], None] | None:
    """A progress callback in samples turned into one in network evaluations (samples x ``factor``)."""
    if progress is None:
        return None
    return lambda k: progress(k * factor)


def _counting(
    batches: Iterable[GeneratedBatch],
    nfes: list[int],
    progress: Callable[[int], None] | None,
    dg_evals: list[int] | None = None,
) -> Iterator[GeneratedBatch]:
    """Pass ``batches`` through, noting each batch's counted network evaluations (and reporting them as progress),
    and its discriminator gradients in ``dg_evals``.

    The table's NFE is what the sampler did, so a schedule or solver that evaluates the network a different number of
    times than a formula predicts shows up as such instead of being hidden by it.
    """
    for b in batches:
        nfes.append(int(b.nfe))
        if dg_evals is not None:
            dg_evals.append(int(b.guidance_evals))
        if progress is not None:
            progress(len(b.seeds) * int(b.nfe))
        yield b


def _guided(guidance: Any, weight: float | None) -> tuple[Any, float]:
    """The guidance of one cell and its weight: None at weight 0 (the unguided sampler), else a fresh copy of the
    run's guidance with that weight (``None``: the run's own weight) and its own counters."""
    if guidance is None:
        return None, 0.0
    w = float(guidance.weight if weight is None else weight)
    if w == 0:
        return None, 0.0
    cell = copy.copy(guidance)  # shares the discriminator; weight, counters and per-batch state are the cell's own
    cell.weight = w
    cell.evaluations = 0
    if hasattr(cell, "reset"):
        cell.reset()
    return cell, w


def _network(denoiser: Any) -> dict[str, Any]:
    """``{"precision", "compile"}`` of a :class:`PreparedDenoiser`; nothing for a plain denoiser."""
    return denoiser.describe() if isinstance(denoiser, PreparedDenoiser) else {}


def _seeds_of(seeds: Sequence[int] | Mapping[str, Sequence[int]], label: str) -> list[int]:
    chosen = seeds[label] if isinstance(seeds, Mapping) else seeds
    out = [int(s) for s in chosen]
    if not out:
        raise ValueError(f"{label}: no seeds to sample")
    return out


def run_sweep(
    runs: Sequence[SweepRun],
    steps: Sequence[int],
    rhos: Sequence[float],
    *,
    solvers: Sequence[str] = ("heun",),
    seeds: Sequence[int] | Mapping[str, Sequence[int]] = range(1000),
    sampler: SamplerSettings | None = None,
    class_label: int | None = None,
    curvature: CurvatureSettings | None = DEFAULT_CURVATURE,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    on_cell: Callable[[str], None] | None = None,
    dg_weights: Sequence[float] | None = None,
) -> SweepResult:
    """Score every run x DG weight x solver x rho x steps, and (optionally) the curvature of every run.

    Every cell samples the same ``seeds`` (one list for all runs, or a dict per run label), so cells differ only by
    the sampler. ``sampler`` holds what the cells share (sigma range, churn); its steps, rho and solver are replaced
    per cell. ``class_label`` fixes the class of a conditional model (default: one drawn per seed). The curvature
    report (deterministic ODE, no churn) uses ``curvature.num`` consecutive seeds from the run's first seed.
    ``progress(k)`` is called with the network evaluations just done, the unit in which sweep cells cost time;
    ``on_cell(text)`` with a description of the cell being started.

    Discriminator Guidance: a run with a ``guidance`` is sampled once per weight in ``dg_weights`` (default: the
    guidance's own weight); weight 0 is the unguided sampler, exactly (no discriminator is called). Runs without
    guidance get one unguided pass whatever ``dg_weights`` says. The curvature report is always unguided.
    """
    base = sampler or SamplerSettings()
    if dg_weights is not None:
        dg_weights = [float(w) for w in dg_weights]
        if not dg_weights or any(not (math.isfinite(w) and w >= 0) for w in dg_weights):
            raise ValueError(f"dg_weights must be finite numbers >= 0, got {dg_weights}")
    cells = sweep_cells(steps, rhos, solvers)
    rows: list[SweepRow] = []
    reports: dict[str, dict[str, Any]] = {}
    for run in runs:
        run_seeds = _seeds_of(seeds, run.label)
        # Every number is recorded with the numerics of the network that made it.
        info = {**run.info, **_network(run.denoiser)}
        weights: Sequence[float | None] = [None] if run.guidance is None or dg_weights is None else dg_weights
        for weight in weights:
            for solver, n_steps, rho in cells:
                guidance, w = _guided(run.guidance, weight)
                settings = replace(base, steps=n_steps, rho=rho, solver=solver)
                what = f"{run.label}: {solver} {n_steps} steps, rho {rho:g}" + (f", DG weight {w:g}" if w else "")
                if on_cell is not None:
                    on_cell(what)
                nfes: list[int] = []
                dg_evals: list[int] = []
                batches = generate(
                    run.denoiser, run_seeds, run.shape, settings=settings, num_classes=run.num_classes,
                    class_label=class_label, batch_size=batch_size, device=device, guidance=guidance,
                )  # fmt: skip
                value = run.quality.score(_counting(batches, nfes, progress, dg_evals))
                if not nfes or len(set(nfes)) != 1:
                    raise RuntimeError(
                        f"{what}: expected one network-evaluation count for every batch, got {sorted(set(nfes))} "
                        "(did the quality metric read the samples?)"
                    )
                # Per sample, as `aotdiff sample` reports it: one gradient call serves the whole batch. (With boosting
                # a batch whose flagged samples sit higher may need one more near the window's edge: the largest.)
                rows.append(
                    SweepRow(run.label, run.quality.name, solver, n_steps, rho, nfes[0], value, len(run_seeds),
                             dict(info), dg_weight=w, discriminator_evals=max(dg_evals))
                )  # fmt: skip
        if curvature is not None:
            if on_cell is not None:
                on_cell(f"{run.label}: curvature ({curvature.num} trajectories)")
            first = run_seeds[0]
            curvature_net = run.curvature_denoiser if run.curvature_denoiser is not None else run.denoiser
            reports[run.label] = curvature_report(
                curvature_net, run.shape, range(first, first + curvature.num), num_classes=run.num_classes,
                class_label=class_label, fine_steps=curvature.fine_steps, rho=curvature.rho,
                truncation_steps=curvature.truncation_steps, sigma_min=base.sigma_min, sigma_max=base.sigma_max,
                batch_size=batch_size, device=device, progress=_scaled(progress, curvature.cost()),
            )  # fmt: skip
            reports[run.label].update(_network(curvature_net))
    # JSON has no infinity (s_max defaults to inf): written as the string "inf", as on the command line
    shared = {
        k: "inf" if v == float("inf") else v for k, v in asdict(base).items() if k not in ("steps", "rho", "solver")
    }
    common: dict[str, Any] = {"sampler": shared, "class_label": class_label}
    if any(run.guidance is not None for run in runs):
        common["dg_weights"] = None if dg_weights is None else list(dg_weights)  # None: each guidance's own weight
    return SweepResult(rows, reports, common)


def sweep_cost(
    nums: Sequence[int], steps: Sequence[int], rhos: Sequence[float], solvers: Sequence[str],
    curvature: CurvatureSettings | None, num_weights: int = 1,
) -> int:  # fmt: skip
    """Expected network evaluations of :func:`run_sweep` (for a progress bar's total): one entry of ``nums`` per run,
    each sampled at ``num_weights`` DG weights."""
    per_sample = sum(expected_nfe(n, s) for s, n, _ in sweep_cells(steps, rhos, solvers))
    total = sum(per_sample * n * num_weights for n in nums)
    if curvature is not None:
        total += len(nums) * curvature.num * curvature.cost()
    return total
