"""Sampler sweeps: sample quality against the number of network evaluations, and trajectory curvature, per run.

The AOT paper's claim is about few-step sampling: straighter probability-flow trajectories let a coarse sampler
(27 / 29 NFE with rho 90 / 72, aot-method.md section 3) reach the quality the baseline needs 35 NFE for. A sweep makes
that measurable for any set of runs: for every run x solver x rho x steps it generates ``num`` samples from fixed
seeds, scores them with a quality metric, and records the exact NFE; once per run it adds the curvature report of
:func:`aotdiff.metrics.curvature_report` on a fine grid.

Quality metrics (all "lower is better", in the metric's own units):

* :class:`FrechetQuality` -- Fréchet distance on detector features: FID (Inception-v3 + reference statistics) or
  FD-digits (the proxy CNN of :mod:`aotdiff.metrics.proxy`) for the built-in digits.
* :class:`W2Quality` -- for 2-D toy runs: sliced (or exact) 2-Wasserstein distance to a fresh sample of the exact
  data distribution (the toy classes have exact samplers), in the data's units.

Outputs: ``write_csv`` / ``write_markdown`` tables, and PNG plots (``plot_quality_vs_nfe``,
``plot_curvature_vs_sigma``) drawn with matplotlib, an optional extra (``pip install aotdiff[plots]``) imported only
when a plot is made.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from aotdiff.generate import GeneratedBatch, SamplerSettings, generate
from aotdiff.metrics import (
    Detector,
    FeatureStats,
    ReferenceStats,
    compute_stats,
    curvature_report,
    fid_from_stats,
    sliced_wasserstein2,
    wasserstein2_exact,
)
from aotdiff.sampling import expected_nfe

__all__ = [
    "DEFAULT_CURVATURE",
    "DEFAULT_NUM",
    "DIGITS_SPECS",
    "METRICS",
    "CurvatureSettings",
    "FrechetQuality",
    "PlotsUnavailableError",
    "QualityMetric",
    "SweepResult",
    "SweepRow",
    "SweepRun",
    "W2Quality",
    "dataset_reference",
    "default_metric",
    "digits_input_size",
    "import_pyplot",
    "make_quality",
    "model_data",
    "parse_float_list",
    "parse_int_list",
    "plot_curvature_vs_sigma",
    "plot_quality_vs_nfe",
    "run_label",
    "run_sweep",
    "sweep_cells",
    "sweep_cost",
    "toy_reference",
    "write_csv",
    "write_markdown",
]

METRICS = ("fd", "fid", "w2")
# Samples per cell when --num is not given: enough for a stable ranking, far fewer than a 50k FID evaluation.
DEFAULT_NUM = {"w2": 10_000, "fd": 2_000, "fid": 10_000}
DIGITS_SPECS = ("digits", "digits16")


class PlotsUnavailableError(ImportError):
    """matplotlib (the ``plots`` extra) is not installed."""


def import_pyplot() -> Any:
    """matplotlib.pyplot with the file-only Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotsUnavailableError(
            "plots need matplotlib, which is not installed: pip install 'aotdiff[plots]'"
        ) from e
    return plt


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
    """'7,72,90' -> [7.0, 72.0, 90.0] (positive numbers), with an error naming the flag ``what``."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers like 7,72,90; got '{text}'") from None
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"{what} must list positive numbers like 7,72,90; got '{text}'")
    return values


# ------------------------------------------------------------------------------------------------ models
def model_data(config: dict[str, Any]) -> str:
    """The ``--data`` a run was trained on ('' if its configuration does not say)."""
    return str(config.get("data", ""))


def default_metric(shape: Sequence[int], config: dict[str, Any]) -> str:
    """'w2' for 2-D point runs, 'fd' (FD-digits) for the built-in digits, 'fid' for any other image data."""
    if len(shape) == 1:
        return "w2"
    return "fd" if model_data(config) in DIGITS_SPECS else "fid"


def digits_input_size(shape: Sequence[int], where: str) -> int:
    """Input size of the digits proxy for images of ``shape`` (1 channel, 8 or 16 px), else a clear error."""
    if len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2] or shape[1] not in (8, 16):
        raise ValueError(
            f"{where}: the FD-digits proxy takes 1-channel 8x8 or 16x16 images, got shape {tuple(shape)}; "
            "use FID with an Inception detector (--detector FILE) for other images"
        )
    return int(shape[1])


def run_label(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Short unique names for runs: the directory name, or the whole path where names repeat."""
    names = [Path(p).name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths, strict=True)]


# ------------------------------------------------------------------------------------------------ quality
class QualityMetric(Protocol):
    """Scores generated samples; lower is better. ``name`` labels the numbers (e.g. 'FD-digits', 'sliced W2')."""

    @property
    def name(self) -> str: ...

    def score(self, batches: Iterable[GeneratedBatch]) -> float: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class FrechetQuality:
    """Fréchet distance between detector features of the samples and reference statistics (FID, FD-digits)."""

    detector: Detector
    reference: ReferenceStats | FeatureStats
    reference_name: str = ""

    @property
    def name(self) -> str:
        return self.detector.metric

    def score(self, batches: Iterable[GeneratedBatch]) -> float:
        return fid_from_stats(compute_stats(batches, self.detector), self.reference)

    def describe(self) -> dict[str, Any]:
        return {"metric": self.name, "detector": self.detector.describe(), "reference": self.reference_name}


@dataclass
class W2Quality:
    """2-Wasserstein distance (data units) between generated 2-D points and a fixed sample of the true distribution.

    ``exact=False``: sliced W2 (1000 fixed directions; any sizes). ``exact=True``: exact W2 by optimal assignment
    (equal sizes, O(N^3): keep N to a few thousand).
    """

    reference: np.ndarray
    exact: bool = False
    reference_name: str = ""

    @property
    def name(self) -> str:
        return "W2" if self.exact else "sliced W2"

    def score(self, batches: Iterable[GeneratedBatch]) -> float:
        points = torch.cat([b.raw for b in batches]).numpy()
        if self.exact:
            return wasserstein2_exact(points, self.reference[: len(points)])
        return sliced_wasserstein2(points, self.reference)

    def describe(self) -> dict[str, Any]:
        return {"metric": self.name, "reference": self.reference_name, "reference_size": int(len(self.reference))}


def dataset_reference(spec: str, detector: Detector, batch_size: int = 500) -> ReferenceStats:
    """Reference statistics of a dataset's images (all of them) through ``detector``, in memory."""
    from aotdiff.data import ImageDataset, load_dataset

    data = load_dataset(spec)
    if not isinstance(data, ImageDataset):
        raise ValueError(f"dataset '{spec}' holds 2-D points, not images: use the W2 metric for it")
    batches = (torch.from_numpy(data.images[i : i + batch_size]) for i in range(0, len(data), batch_size))
    stats = compute_stats(batches, detector)
    mu, sigma = stats.mean_cov()
    return ReferenceStats(mu, sigma, {"data": spec, "num_images": stats.count, "detector": detector.describe()})


def toy_reference(spec: str, num: int, seed: int) -> np.ndarray:
    """``num`` fresh points of a toy dataset's exact distribution, drawn with a generator seeded by ``seed``."""
    from aotdiff.data import get_toy

    if not spec.startswith("toy:"):
        raise ValueError(f"'{spec}' is not a 2-D toy dataset (toy:8gaussians, toy:moons, toy:checkerboard)")
    generator = torch.Generator().manual_seed(seed)
    return get_toy(spec[len("toy:") :]).sample(num, generator).numpy().astype(np.float64)


def make_quality(
    metric: str,
    shape: Sequence[int],
    config: dict[str, Any],
    *,
    where: str,
    num: int,
    ref: str | os.PathLike[str] | None = None,
    detector: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    reference_seed: int = 1_000_003,
) -> QualityMetric:
    """The quality metric ``metric`` ('fd' | 'fid' | 'w2') for a run with item ``shape`` and training ``config``.

    'w2' compares with ``num`` fresh points of the run's toy distribution (seed ``reference_seed``, unrelated to
    the sampling seeds). 'fd' uses the digits proxy and, unless ``ref`` is given, the statistics of the whole digits
    dataset. 'fid' needs ``ref`` (EDM-format statistics) and an Inception file (``detector``, $AOTDIFF_DETECTOR or
    the cache folder). ``where`` names the run in error messages.
    """
    from aotdiff.metrics import load_inception_detector, load_proxy_detector, load_reference

    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}'; choose one of: {', '.join(METRICS)}")
    data = model_data(config)
    if metric == "w2":
        if len(shape) != 1:
            raise ValueError(f"{where}: --metric w2 is for 2-D toy runs, but it makes images {tuple(shape)}")
        return W2Quality(
            toy_reference(data, num, reference_seed), reference_name=f"{data} exact, seed {reference_seed}"
        )
    if len(shape) != 3:
        raise ValueError(f"{where}: makes 2-D points, not images: use --metric w2")
    if metric == "fd":
        if data not in DIGITS_SPECS and ref is None:
            raise ValueError(
                f"{where}: --metric fd (FD-digits) is for runs on the built-in digits, but it was trained on "
                f"'{data}'; use --metric fid with --ref and --detector"
            )
        proxy = load_proxy_detector("digits", digits_input_size(shape, where))
        if ref is None:
            return FrechetQuality(proxy, dataset_reference(data, proxy), reference_name=f"{data} (all images)")
        return FrechetQuality(proxy, load_reference(ref), reference_name=str(ref))
    if ref is None:
        raise ValueError(
            "--metric fid needs reference statistics: pass --ref REF.npz (make them with "
            "`aotdiff fid ref --data DATA --out REF.npz`)"
        )
    reference = load_reference(ref)  # before the detector: a missing file is the cheaper mistake to report
    return FrechetQuality(load_inception_detector(detector, device=device), reference, reference_name=str(ref))


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
    """One cell: a run sampled with (solver, steps, rho) and scored."""

    run: str
    metric: str
    solver: str
    steps: int
    rho: float
    nfe: int
    value: float
    num: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepResult:
    rows: list[SweepRow]
    curvature: dict[str, dict[str, Any]]  # run label -> curvature report

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "curvature": self.curvature}


def sweep_cells(steps: Sequence[int], rhos: Sequence[float], solvers: Sequence[str]) -> list[tuple[str, int, float]]:
    """(solver, steps, rho) triples in table order: solver, then rho, then steps."""
    return [(s, n, r) for s in solvers for r in rhos for n in steps]


def _scaled(progress: Callable[[int], None] | None, factor: int) -> Callable[[int], None] | None:
    """A progress callback in samples turned into one in network evaluations (samples x ``factor``)."""
    if progress is None:
        return None
    return lambda k: progress(k * factor)


def run_sweep(
    runs: Sequence[SweepRun],
    steps: Sequence[int],
    rhos: Sequence[float],
    *,
    solvers: Sequence[str] = ("heun",),
    num: int | dict[str, int] = 1000,
    seed_start: int = 0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    curvature: CurvatureSettings | None = DEFAULT_CURVATURE,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    on_cell: Callable[[str], None] | None = None,
) -> SweepResult:
    """Score every run x solver x rho x steps, and (optionally) the curvature of every run.

    Every cell uses the same seeds ``seed_start .. seed_start + num - 1`` (``num`` may be a dict per run label), so
    cells differ only by the sampler. ``progress(k)`` is called with the network evaluations just done (samples x
    NFE), the unit in which sweep cells cost time; ``on_cell(text)`` with a description of the cell being started.
    """
    cells = sweep_cells(steps, rhos, solvers)
    rows: list[SweepRow] = []
    reports: dict[str, dict[str, Any]] = {}
    for run in runs:
        n = num[run.label] if isinstance(num, dict) else num
        seeds = list(range(seed_start, seed_start + n))
        for solver, n_steps, rho in cells:
            settings = SamplerSettings(steps=n_steps, rho=rho, solver=solver, sigma_min=sigma_min, sigma_max=sigma_max)
            nfe = expected_nfe(n_steps, solver)
            if on_cell is not None:
                on_cell(f"{run.label}: {solver} {n_steps} steps, rho {rho:g}")
            batches = generate(
                run.denoiser, seeds, run.shape, settings=settings, num_classes=run.num_classes,
                batch_size=batch_size, device=device, progress=_scaled(progress, nfe),
            )  # fmt: skip
            value = run.quality.score(batches)
            rows.append(SweepRow(run.label, run.quality.name, solver, n_steps, rho, nfe, value, n, dict(run.info)))
        if curvature is not None:
            if on_cell is not None:
                on_cell(f"{run.label}: curvature ({curvature.num} trajectories)")
            reports[run.label] = curvature_report(
                run.denoiser, run.shape, range(seed_start, seed_start + curvature.num), num_classes=run.num_classes,
                fine_steps=curvature.fine_steps, rho=curvature.rho, truncation_steps=curvature.truncation_steps,
                sigma_min=sigma_min, sigma_max=sigma_max, batch_size=batch_size, device=device,
                progress=_scaled(progress, curvature.cost()),
            )  # fmt: skip
    return SweepResult(rows, reports)


def sweep_cost(
    nums: Sequence[int], steps: Sequence[int], rhos: Sequence[float], solvers: Sequence[str],
    curvature: CurvatureSettings | None,
) -> int:  # fmt: skip
    """Total network evaluations of :func:`run_sweep` (for a progress bar): one entry of ``nums`` per run."""
    per_sample = sum(expected_nfe(n, s) for s, n, _ in sweep_cells(steps, rhos, solvers))
    total = sum(per_sample * n for n in nums)
    if curvature is not None:
        total += len(nums) * curvature.num * curvature.cost()
    return total


# ------------------------------------------------------------------------------------------------ tables
CSV_COLUMNS = ("run", "metric", "solver", "steps", "rho", "nfe", "value", "num")
CURVATURE_COLUMNS = ("curvature", "curvature_median", "one_minus_cos")


def _fmt(value: float | None, digits: int = 4) -> str:
    """Numbers for tables: ``digits`` significant digits, no exponent for ordinary magnitudes."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return f"{value:.{digits - 1}e}"


def write_csv(result: SweepResult, path: str | os.PathLike[str]) -> Path:
    """One line per cell; the run's info (coupling, data, ...) and curvature summary are repeated on each line."""
    info_keys = sorted({k for r in result.rows for k in r.info})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_COLUMNS, *info_keys, *CURVATURE_COLUMNS])
        for r in result.rows:
            report = result.curvature.get(r.run, {})
            writer.writerow(
                [r.run, r.metric, r.solver, r.steps, f"{r.rho:g}", r.nfe, repr(r.value), r.num,
                 *(r.info.get(k, "") for k in info_keys), *(report.get(k, "") for k in CURVATURE_COLUMNS)]
            )  # fmt: skip
    return path


def quality_table(rows: Sequence[SweepRow], *, floor: dict[str, float] | None = None) -> str:
    """Markdown: one line per (run, solver, rho), one column per NFE; ``floor`` adds a reference line per metric."""
    nfes = sorted({r.nfe for r in rows})
    groups: dict[tuple[str, str, str, float], dict[int, SweepRow]] = {}
    for r in rows:
        groups.setdefault((r.run, r.metric, r.solver, r.rho), {})[r.nfe] = r
    steps_of: dict[int, dict[str, int]] = {r.nfe: {} for r in rows}
    for r in rows:
        steps_of[r.nfe][r.solver] = r.steps
    header = "| run | metric | solver | ρ | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    lines = [header, "|" + "---|" * (4 + len(nfes))]
    for (run, metric, solver, rho), cells in groups.items():
        values = [_fmt(cells[n].value) if n in cells else "" for n in nfes]
        lines.append(f"| {run} | {metric} | {solver} | {rho:g} | " + " | ".join(values) + " |")
    for metric, value in (floor or {}).items():
        lines.append(f"| *data floor* | {metric} | | | " + " | ".join(_fmt(value) for _ in nfes) + " |")
    steps_line = "; ".join(
        f"NFE {n} = " + ", ".join(f"{s} {k} steps" for s, k in sorted(steps_of[n].items())) for n in nfes
    )
    return "\n".join(lines) + f"\n\nSteps: {steps_line}.\n"


def curvature_table(reports: dict[str, dict[str, Any]]) -> str:
    """Markdown: pooled / median curvature, 1 - cos and truncation errors per run."""
    counts = sorted({int(k) for rep in reports.values() for k in rep["truncation_error"]})
    head = "| run | κ pooled | κ median | 1 − cos | " + " | ".join(f"trunc. err. {n} steps" for n in counts) + " |"
    lines = [head, "|" + "---|" * (4 + len(counts))]
    for label, rep in reports.items():
        errors = [_fmt(rep["truncation_error"].get(str(n))) for n in counts]
        lines.append(
            f"| {label} | {_fmt(rep['curvature'])} | {_fmt(rep['curvature_median'])} | "
            f"{_fmt(rep['one_minus_cos'])} | " + " | ".join(errors) + " |"
        )
    some = next(iter(reports.values()), None)
    if some is not None:
        lines.append(
            f"\nCurvature over {some['num']} trajectories, Heun {some['steps']} steps, ρ = {some['rho']:g}; "
            f"truncation errors of {some['truncation_solver']} samplers with ρ = {some['truncation_rho']:g} against "
            "that fine solution (RMS per coordinate)."
        )
    return "\n".join(lines) + "\n"


def write_markdown(
    result: SweepResult, path: str | os.PathLike[str], *, title: str = "Sweep", plots: Sequence[str] = ()
) -> Path:
    """The quality table, the curvature table and links to the plots (paths relative to the table)."""
    parts = [f"# {title}\n", "## Quality against network evaluations (lower is better)\n", quality_table(result.rows)]
    if result.curvature:
        parts += ["## Curvature and truncation error\n", curvature_table(result.curvature)]
    if plots:
        parts.append("## Plots\n")
        parts += [f"![{Path(p).stem}]({p})\n" for p in plots]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


# ------------------------------------------------------------------------------------------------ plots
def plot_quality_vs_nfe(
    rows: Sequence[SweepRow],
    path: str | os.PathLike[str],
    *,
    floor: dict[str, float] | None = None,
    title: str = "",
) -> Path:
    """Quality (log scale) against NFE: one line per (run, solver, rho); dashed grey lines for ``floor`` values."""
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    groups: dict[tuple[str, str, float], list[SweepRow]] = {}
    for r in rows:
        groups.setdefault((r.run, r.solver, r.rho), []).append(r)
    runs = list(dict.fromkeys(r.run for r in rows))
    rhos = sorted({r.rho for r in rows})
    markers = "os^vD<>p*h"
    styles = {"heun": "-", "euler": ":"}
    for (run, solver, rho), cells in groups.items():
        cells = sorted(cells, key=lambda r: r.nfe)
        values = [max(r.value, 1e-12) for r in cells]  # a log axis cannot show 0
        ax.plot(
            [r.nfe for r in cells], values, styles.get(solver, "--"), marker=markers[rhos.index(rho) % len(markers)],
            color=f"C{runs.index(run) % 10}", label=f"{run}, {solver}, ρ={rho:g}", markersize=4,
        )  # fmt: skip
    for metric, value in (floor or {}).items():
        ax.axhline(value, color="grey", linestyle="--", linewidth=1, label=f"data floor ({metric})")
    metrics = sorted({r.metric for r in rows})
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(" / ".join(metrics) + " (lower is better)")
    ax.set_title(title or "Sample quality against NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curvature_vs_sigma(
    reports: dict[str, dict[str, Any]], path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Curvature restricted to each sigma band (``curvature_per_sigma``) against sigma, one line per run."""
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    positive = True
    for k, (label, rep) in enumerate(reports.items()):
        profile = np.asarray(rep["curvature_per_sigma"], dtype=np.float64).reshape(-1, 2)
        positive &= bool((profile[:, 1] > 0).all())
        ax.plot(profile[:, 0], profile[:, 1], "-o", color=f"C{k % 10}", markersize=4,
                label=f"{label} (pooled κ = {_fmt(rep['curvature'], 3)})")  # fmt: skip
    ax.set_xscale("log")
    if positive and reports:
        ax.set_yscale("log")
    ax.set_xlabel("σ (band centre)")
    ax.set_ylabel("κ in band: Σw‖d − v‖² / Σw‖v‖²")
    ax.set_title(title or "Trajectory curvature against noise level")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
