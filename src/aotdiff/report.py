"""Rendering of sweep results: CSV and Markdown tables, and PNG plots (matplotlib, a dependency of aotdiff).

Nothing here samples or scores: every function takes the rows and curvature reports that :func:`aotdiff.sweep.run_sweep`
computed (or that were read back from a saved ``sweep.json``), so a report can be redrawn without rerunning a sweep.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # only for annotations: aotdiff.sweep re-exports this module's names, so no import at run time
    from aotdiff.sweep import SweepResult, SweepRow

__all__ = [
    "CSV_COLUMNS",
    "CURVATURE_COLUMNS",
    "curvature_table",
    "fmt",
    "plot_curvature_vs_sigma",
    "plot_quality_vs_nfe",
    "pyplot",
    "quality_table",
    "write_csv",
    "write_markdown",
]

# nfe counts score-network evaluations only; discriminator_evals the discriminator gradients per sample beside it
CSV_COLUMNS = ("run", "metric", "solver", "steps", "rho", "dg_weight", "nfe", "discriminator_evals", "value", "num")
CURVATURE_COLUMNS = ("curvature", "curvature_median", "one_minus_cos")


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display is needed or opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(value: float | None, digits: int = 4) -> str:
    """Numbers for tables: ``digits`` significant digits, no exponent for ordinary magnitudes."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return f"{value:.{digits - 1}e}"


# ------------------------------------------------------------------------------------------------ tables
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
                [r.run, r.metric, r.solver, r.steps, f"{r.rho:g}", f"{r.dg_weight:g}", r.nfe, r.discriminator_evals,
                 repr(r.value), r.num,
                 *(r.info.get(k, "") for k in info_keys), *(report.get(k, "") for k in CURVATURE_COLUMNS)]
            )  # fmt: skip
    return path


def quality_table(rows: Sequence[SweepRow], *, floor: dict[str, float] | None = None) -> str:
    """Markdown: one line per (run, solver, rho[, DG weight]), one column per NFE; ``floor`` adds a reference line per
    metric. The DG weight column, and the discriminator gradients beside the steps, appear when a cell was guided."""
    nfes = sorted({r.nfe for r in rows})
    guided = any(r.dg_weight > 0 for r in rows)
    groups: dict[tuple[str, str, str, float, float], dict[int, SweepRow]] = {}
    for r in rows:
        groups.setdefault((r.run, r.metric, r.solver, r.rho, r.dg_weight), {})[r.nfe] = r
    steps_of: dict[int, dict[str, int]] = {r.nfe: {} for r in rows}
    grads_of: dict[tuple[int, str], set[int]] = {}  # discriminator gradients per sample of the guided cells
    for r in rows:
        steps_of[r.nfe][r.solver] = r.steps
        if r.dg_weight > 0:
            grads_of.setdefault((r.nfe, r.solver), set()).add(r.discriminator_evals)
    dg_head, dg_rule = (" DG w |", "---|") if guided else ("", "")
    header = f"| run | metric | solver | ρ |{dg_head} " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    lines = [header, "|" + "---|" * (4 + len(nfes)) + dg_rule]
    for (run, metric, solver, rho, weight), cells in groups.items():
        values = [fmt(cells[n].value) if n in cells else "" for n in nfes]
        dg_cell = f" {weight:g} |" if guided else ""
        lines.append(f"| {run} | {metric} | {solver} | {rho:g} |{dg_cell} " + " | ".join(values) + " |")
    for metric, value in (floor or {}).items():
        lines.append(f"| *data floor* | {metric} | | |{' |' if guided else ''} "
                     + " | ".join(fmt(value) for _ in nfes) + " |")  # fmt: skip

    def steps(n: int, solver: str, k: int) -> str:
        grads = sorted(grads_of.get((n, solver), ()))
        plural = "" if grads == [1] else "s"
        extra = f" (+ {'/'.join(map(str, grads))} discriminator gradient{plural} where DG w > 0)" if grads else ""
        return f"{solver} {k} steps{extra}"

    steps_line = "; ".join(
        f"NFE {n} = " + ", ".join(steps(n, s, k) for s, k in sorted(steps_of[n].items())) for n in nfes
    )
    note = " NFE counts score-network evaluations only; DG w 0 is the unguided sampler." if guided else ""
    return "\n".join(lines) + f"\n\nSteps: {steps_line}.{note}\n"


def curvature_table(reports: dict[str, dict[str, Any]]) -> str:
    """Markdown: pooled / median curvature, 1 - cos and truncation errors per run."""
    counts = sorted({int(k) for rep in reports.values() for k in rep["truncation_error"]})
    head = "| run | κ pooled | κ median | 1 − cos | " + " | ".join(f"trunc. err. {n} steps" for n in counts) + " |"
    lines = [head, "|" + "---|" * (4 + len(counts))]
    for label, rep in reports.items():
        errors = [fmt(rep["truncation_error"].get(str(n))) for n in counts]
        lines.append(
            f"| {label} | {fmt(rep['curvature'])} | {fmt(rep['curvature_median'])} | "
            f"{fmt(rep['one_minus_cos'])} | " + " | ".join(errors) + " |"
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
def _save(fig: Any, plt: Any, path: str | os.PathLike[str]) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)  # figures are not garbage-collected while pyplot tracks them
    return out


def quality_series(rows: Sequence[SweepRow]) -> dict[str, dict[tuple[str, str, float, float], list[SweepRow]]]:
    """The plot's panels and lines: metric -> (run, solver, rho, DG weight) -> its rows in NFE order. Each metric
    gets its own panel (sliced W2 and FD-digits on one axis would compare numbers of different kinds)."""
    panels: dict[str, dict[tuple[str, str, float, float], list[SweepRow]]] = {}
    for r in rows:
        panels.setdefault(r.metric, {}).setdefault((r.run, r.solver, r.rho, r.dg_weight), []).append(r)
    for lines in panels.values():
        for cells in lines.values():
            cells.sort(key=lambda r: r.nfe)
    return panels


def series_colours(rows: Sequence[SweepRow]) -> dict[tuple[str, float, float], str]:
    """A colour per (run, rho, DG weight): the solver is told by the line style (Heun solid, Euler dotted), so
    every other setting needs its own colour (one colour per run made its rho = 7 and rho = 90 lines alike)."""
    keys = list(dict.fromkeys((r.run, r.rho, r.dg_weight) for r in rows))
    return {key: f"C{k % 10}" for k, key in enumerate(keys)}


def plot_quality_vs_nfe(
    rows: Sequence[SweepRow],
    path: str | os.PathLike[str],
    *,
    floor: dict[str, float] | None = None,
    title: str = "",
) -> Path:
    """Quality (log scale) against NFE: a panel per metric, one line per (run, solver, rho, DG weight), a colour per
    (run, rho, DG weight) and a line style per solver; dashed grey lines for ``floor`` values (on the panel of the
    metric they are named after, or on every panel when no panel has that name)."""
    plt = pyplot()
    panels = quality_series(rows)
    metrics = sorted(panels) or [""]
    fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 4.5), dpi=110, squeeze=False)
    guided = any(r.dg_weight > 0 for r in rows)
    colours = series_colours(rows)
    rhos = sorted({r.rho for r in rows})
    markers = "os^vD<>p*h"
    styles = {"heun": "-", "euler": ":"}
    for ax, metric in zip(axes[0], metrics, strict=True):
        for (run, solver, rho, weight), cells in panels.get(metric, {}).items():
            values = [max(r.value, 1e-12) for r in cells]  # a log axis cannot show 0
            label = f"{run}, {solver}, ρ={rho:g}" + (f", DG w={weight:g}" if guided else "")
            ax.plot(
                [r.nfe for r in cells], values, styles.get(solver, "--"), marker=markers[rhos.index(rho) % len(markers)],
                color=colours[(run, rho, weight)], label=label, markersize=4,
            )  # fmt: skip
        for name, value in (floor or {}).items():
            if name == metric or not set(floor or {}) & set(metrics):
                ax.axhline(value, color="grey", linestyle="--", linewidth=1, label=f"data floor ({name})")
        ax.set_yscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(f"{metric} (lower is better)")
        nfes = sorted({r.nfe for r in rows if r.metric == metric})
        if len(nfes) <= 12:
            ax.set_xticks(nfes)  # the NFEs measured, not fractional ticks between them
        ax.set_title(title or ("Sample quality against NFE" + (f": {metric}" if len(metrics) > 1 else "")))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, plt, path)


def plot_curvature_vs_sigma(
    reports: dict[str, dict[str, Any]], path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Curvature restricted to each sigma band (``curvature_per_sigma``) against sigma, one line per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    positive = True
    for k, (label, rep) in enumerate(reports.items()):
        profile = np.asarray(rep["curvature_per_sigma"], dtype=np.float64).reshape(-1, 2)
        positive &= bool((profile[:, 1] > 0).all())
        ax.plot(profile[:, 0], profile[:, 1], "-o", color=f"C{k % 10}", markersize=4,
                label=f"{label} (pooled κ = {fmt(rep['curvature'], 3)})")  # fmt: skip
    ax.set_xscale("log")
    if positive and reports:
        ax.set_yscale("log")
    # A band's κ near 1 at small sigma beside a pooled κ of 0.003 looks like a contradiction until one knows the
    # weights: w = the step's width in sigma, so the pooled value is dominated by the wide, large-sigma bands.
    ax.set_xlabel("σ (band centre)\npooled κ weighs each band by its width in σ: the large-σ bands dominate it")
    ax.set_ylabel("κ in band: Σw‖d − v‖² / Σw‖v‖²")
    ax.set_title(title or "Trajectory curvature against noise level")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)
