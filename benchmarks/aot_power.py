"""AOT versus independent coupling with statistical power: several training seeds per arm, 2,000 samples per cell,
and every quality number reported with its uncertainty (issue 12, items 1 and 3).

    python benchmarks/aot_power.py                          # digits: default arms x seeds 0,1,2; docs/results-power.md
    python benchmarks/aot_power.py --jobs 2 --stop-after 15:45   # two worker processes; start nothing after 15:45 UTC
    python benchmarks/aot_power.py --arms independent,aot-paper --seeds 0,1,2,3
    python benchmarks/aot_power.py --arm "gate1=--coupling aot --aot-gate-sigma 1 --aot-gate-width 0.5"
    python benchmarks/aot_power.py --datasets digits,mnist5k      # the 28x28 MNIST preset too (~25 min training + ~30 min evaluation per model)
    python benchmarks/aot_power.py --quick                  # a smoke run of a few minutes (temporary folders)
    python benchmarks/aot_power.py --render-only            # redraw docs/results-power.md from docs/results/power.json

Design. An *arm* is a named set of `aotdiff train` flags (``--arms`` picks from :data:`ARMS`, ``--arm NAME=FLAGS``
adds one). Each (dataset, arm, seed) is trained with the dataset's preset at its default length and evaluated once:

* Quality: FD with the dataset's proxy CNN (FD-digits, FD-mnist5k) against the statistics of the whole dataset, at
  Euler 3/5/9 and Heun 3/5/8/14/18 steps (5/9/15/27/35 NFE), rho 7, from ``--num`` samples (default 2,000). The
  latents of training seed s are the sampling seeds [s * 10^6, s * 10^6 + num): the same for every arm at one
  training seed (so the arms of one seed are paired in data order, sigma draws, initial weights *and* latents) and
  disjoint between training seeds (so the spread over seeds contains the sampling noise as well as training noise).
* Sampling noise of each value: a bootstrap over the samples (``--boot`` resamples); the resampled index sets are the
  same for every model, so the bootstrap of a paired difference resamples the same latents in both arms.
* Curvature and truncation error: :func:`aotdiff.metrics.curvature_report` on the first ``--curvature-num``
  latents (fine Heun grid, rho 7, truncation at 3/5/9/18 Heun steps).

Every finished (dataset, arm, seed) is written at once to ``WORK/<dataset>/<arm>/seed<s>/result.json`` (the training
run sits next to it in ``run/``), so an interrupted study continues where it stopped: rerun the same command.
Workers claim a task with a lock file, so ``--jobs 2`` and separately started copies of the command share the work
without doing anything twice. At the end (or with ``--collect-only``) every finished result under WORK is gathered
into ``OUT/results/power.json``, from which ``OUT/results-power.md`` is rendered (``--render-only`` redraws it).

Uncertainties (rendered from the JSON; see the report's "Statistics" section): an arm's value at one sampler setting
is the mean over its training seeds ± the standard error over seeds; a paired difference arm - independent is the
mean over seeds of the per-seed difference ± its standard error over seeds. With few seeds the spread over seeds is
itself uncertain, so the standard error used is never taken below the sampling-only one (bootstrap); with one seed
it is the sampling-only one and marked as such. A difference is called resolved when it exceeds two such standard
errors.
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
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The report helpers sit next to this script (the script's folder is on sys.path, also in spawned workers).
from aot_vs_independent import mean_ot_cost_ratio, training_log
from aot_vs_independent_report import fmt
from aotdiff.generate import SamplerSettings, generate
from aotdiff.metrics import curvature_report
from aotdiff.metrics.fid import FeatureStats, fid_from_stats
from aotdiff.metrics.quality import FrechetQuality, make_quality
from aotdiff.train.config import AOT_KNOBS, AOT_PAPER, PRESETS, TrainConfig, preset_config

POWER_FORMAT = "aotdiff.aot_power/1"
SEED_STRIDE = 1_000_000  # sampling seeds of training seed s: [s * SEED_STRIDE, s * SEED_STRIDE + num)
BOOT_SEED = 20_261_130  # the bootstrap index sets (shared by every model, so paired differences resample pairs)
FLOOR_SEED = 777  # real-data draws of the FD floor

# (solver, steps): Euler 3/5/9 NFE and Heun 5/9/15/27/35 NFE (Heun N steps = 2N - 1 evaluations).
SETTINGS: tuple[tuple[str, int], ...] = (
    ("euler", 3), ("euler", 5), ("euler", 9),
    ("heun", 3), ("heun", 5), ("heun", 8), ("heun", 14), ("heun", 18),
)  # fmt: skip
TRUNCATION_STEPS = (3, 5, 9, 18)

# Named arms: `aotdiff train` flags on top of the dataset's preset. A variant is the paper's AOT with one knob changed:
# knobs it does not name are pinned to the paper's values (see arm_overrides), whatever the shipped recipe says.
ARMS: dict[str, str] = {
    "independent": "--coupling independent",
    "aot-paper": "--coupling aot --aot-recipe paper",
    "aot-gate0.5-w0.5": "--coupling aot --aot-gate-sigma 0.5 --aot-gate-width 0.5",
    "aot-gumbel0.3": "--coupling aot --aot-temperature 0.3",
    "aot-hardgate0.5": "--coupling aot --aot-gate-sigma 0.5 --aot-gate-width 0",
    "aot-hardgate2": "--coupling aot --aot-gate-sigma 2 --aot-gate-width 0",
    "aot-gate1-w0.5": "--coupling aot --aot-gate-sigma 1 --aot-gate-width 0.5",
    "aot-gumbel1": "--coupling aot --aot-temperature 1",
    "aot-sqeuclidean": "--coupling aot --aot-cost sqeuclidean",
    "aot-pool1792": "--coupling aot --aot-pool 1792",
    "aot-shipped": "--coupling aot --aot-recipe shipped",
}
DEFAULT_ARMS = ("independent", "aot-paper", "aot-gate0.5-w0.5", "aot-gumbel0.3")
BASELINE = "independent"


def nfe_of(solver: str, steps: int) -> int:
    return 2 * steps - 1 if solver == "heun" else steps


def setting_name(solver: str, steps: int) -> str:
    return f"{solver}-{steps}"


def setting_title(solver: str, steps: int) -> str:
    return f"{'Heun' if solver == 'heun' else 'Euler'} {nfe_of(solver, steps)}"


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class PowerConfig:
    """What every model of the study shares (recorded in power.json)."""

    datasets: list[str]
    arms: dict[str, str]  # name -> flags
    seeds: list[int]
    num: int = 2000  # samples per cell
    boot: int = 200  # bootstrap resamples per cell
    curvature_num: int = 128
    curvature_fine_steps: int = 128
    # Samples per network call. Speed only: samples are per seed, whatever the batch (checked bit for bit on mnist5k).
    # 100 keeps a small network's activations in the CPU's caches: 1.5x the img/s of 500 on one thread (mnist5k).
    batch_size: int = 100
    overrides: dict[str, Any] = field(default_factory=dict)  # applied to every preset (quick mode)
    quick: bool = False


def quick_overrides() -> dict[str, Any]:
    return dict(duration_kimg=1.0, model_channels=16, num_blocks=1, snapshot_kimg=1.0, tick_kimg=0.25,
                lr_rampup_kimg=0.2, ema_halflife_kimg=0.2, grid_seeds=16, grid_steps=4)  # fmt: skip


def _flag_parser() -> argparse.ArgumentParser:
    """A parser with one flag per TrainConfig field (that of `aotdiff train`), unset flags left out."""
    from aotdiff.cli.train import add_config_flags

    parser = argparse.ArgumentParser(prog="arm", argument_default=argparse.SUPPRESS, add_help=False)
    add_config_flags(parser)
    return parser


def arm_overrides(flags: str) -> dict[str, Any]:
    """``aotdiff train`` flags -> TrainConfig overrides. For an AOT arm that does not ask for a recipe, the AOT knobs
    it does not set are pinned to the paper's values, so the arm is 'the paper's AOT with these changes' even when
    the shipped recipe differs."""
    try:
        parsed = vars(_flag_parser().parse_args(shlex.split(flags)))
    except SystemExit:
        raise ValueError(f"arm flags {flags!r}: not valid `aotdiff train` flags") from None
    if parsed.get("coupling") == "aot" and "aot_recipe" not in parsed:
        parsed = {"aot_recipe": "shipped", **{k: AOT_PAPER[k] for k in AOT_KNOBS}, **parsed}
    return parsed


def model_config(dataset: str, flags: str, seed: int, overrides: dict[str, Any]) -> TrainConfig:
    from aotdiff.train.config import validate

    cfg = preset_config(dataset, **{**overrides, **arm_overrides(flags), "seed": seed, "device": "cpu", "threads": 1})
    validate(cfg, need_data=False)
    return cfg


# ------------------------------------------------------------------------------------------------ files
def task_dir(work: Path, dataset: str, arm: str, seed: int) -> Path:
    return work / dataset / arm / f"seed{seed}"


def power_json(out: Path) -> Path:
    return out / "results" / "power.json"


def report_path(out: Path) -> Path:
    return out / "results-power.md"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(folder: Path) -> bool:
    """Take the task in ``folder`` (a lock file holding host and pid); a lock of a dead process on this host is taken
    over. False if the task is done or another live process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "result.json").is_file():
        return False
    lock = folder / "lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                return False  # being written right now
            if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
                lock.unlink(missing_ok=True)  # its process died: take the task over (training resumes)
                continue
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
        if (folder / "result.json").is_file():  # finished between the check above and the lock
            lock.unlink(missing_ok=True)
            return False
        return True
    return False


# ------------------------------------------------------------------------------------------------ scoring
def boot_indices(num: int, boot: int) -> np.ndarray:
    """[boot, num] resampled sample indices, the same for every model (seeded by BOOT_SEED)."""
    return np.random.default_rng(BOOT_SEED).integers(0, num, size=(boot, num))


def fd_of(features: np.ndarray, quality: FrechetQuality) -> float:
    stats = FeatureStats()
    stats.update(features)
    return fid_from_stats(stats, quality.reference)


def score_cell(features: np.ndarray, quality: FrechetQuality, indices: np.ndarray) -> dict[str, Any]:
    """FD of all samples, and of each bootstrap resample (the sampling noise)."""
    value = fd_of(features, quality)
    boots = [fd_of(features[idx], quality) for idx in indices]
    return {"value": value, "boot": [float(f"{b:.6g}") for b in boots], "boot_sd": float(np.std(boots, ddof=1))}


def sample_features(model: Any, quality: FrechetQuality, seeds: Sequence[int], solver: str, steps: int,
                    batch_size: int) -> tuple[np.ndarray, int]:  # fmt: skip
    """Proxy features [num, dim] of the samples of ``seeds`` with one sampler setting, and its NFE per sample."""
    settings = SamplerSettings(steps=steps, rho=7.0, solver=solver)
    feats, nfe = [], 0
    for batch in generate(model.denoiser, seeds, tuple(model.shape), settings=settings, batch_size=batch_size,
                          num_classes=model.num_classes):  # fmt: skip
        with torch.no_grad():
            feats.append(quality.detector.features(batch.images).double().numpy())
        nfe = batch.nfe
    return np.concatenate(feats), nfe


def dataset_quality(dataset: str, shape: Sequence[int], config: dict[str, Any], num: int) -> FrechetQuality:
    quality = make_quality("fd", shape, config, where=dataset, num=num)
    assert isinstance(quality, FrechetQuality)
    return quality


class Interrupted(Exception):
    """Training was stopped by SIGINT / SIGTERM (a checkpoint is saved; rerunning the command resumes it)."""


def study_model(dataset: str, arm: str, flags: str, seed: int, pc: PowerConfig, folder: Path,
                say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Train (or resume) one (dataset, arm, seed) and evaluate it; returns the JSON-ready result."""
    from aotdiff.train.checkpoint import load_model
    from aotdiff.train.loop import train

    torch.set_num_threads(1)
    label = f"{dataset}/{arm}/seed{seed}"
    cfg = model_config(dataset, flags, seed, pc.overrides)
    run_dir = folder / "run"
    started = time.time()
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = train(cfg, run_dir, progress=False, log=lambda s: None)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if result.interrupted:
        raise Interrupted(
            f"[{label}] training stopped by signal {result.signal} at {result.nimg} images (checkpoint saved)"
        )
    say(f"[{label}] trained {cfg.duration_kimg:g} kimg in {train_s:.0f} s" + ("" if result.losses else " (resumed)"))

    t1 = time.perf_counter()
    model = load_model(run_dir)
    quality = dataset_quality(dataset, model.shape, cfg.to_dict(), pc.num)
    seeds = range(seed * SEED_STRIDE, seed * SEED_STRIDE + pc.num)
    indices = boot_indices(pc.num, pc.boot)
    cells: dict[str, Any] = {}
    for solver, steps in SETTINGS:  # each cell is kept as it is scored, so an interrupted evaluation continues
        name = setting_name(solver, steps)
        cached = folder / "cells" / f"{name}.json"
        if cached.is_file():
            cells[name] = json.loads(cached.read_text())
            continue
        feats, nfe = sample_features(model, quality, seeds, solver, steps, pc.batch_size)
        cells[name] = {"solver": solver, "steps": steps, "nfe": nfe, **score_cell(feats, quality, indices)}
        cached.parent.mkdir(exist_ok=True)
        cached.write_text(json.dumps(cells[name]))
    t2 = time.perf_counter()
    curvature = curvature_report(
        model.denoiser, tuple(model.shape), seeds[: pc.curvature_num], num_classes=model.num_classes,
        fine_steps=pc.curvature_fine_steps, rho=7.0, truncation_steps=TRUNCATION_STEPS, batch_size=pc.batch_size,
    )  # fmt: skip
    eval_s = time.perf_counter() - t1
    say(f"[{label}] evaluated in {eval_s:.0f} s (quality {t2 - t1:.0f} s, curvature {time.perf_counter() - t2:.0f} s)")
    log = training_log(run_dir)
    return {
        "dataset": dataset, "arm": arm, "flags": flags, "seed": seed, "config": cfg.to_dict(), "nimg": result.nimg,
        "metric": quality.name, "reference": quality.reference_name, "cells": cells, "curvature": curvature,
        "detector_sha256": quality.detector.sha256,  # a proxy retrained on another CPU is another network
        "ot_cost_ratio": mean_ot_cost_ratio(log), "final_loss": log[-1]["loss"] if log else None,
        "train_s": train_s, "train_cpu_s": train_cpu, "trained_now": bool(result.losses), "eval_s": eval_s,
        "cpu_s": time.process_time() - cpu0, "started": started, "finished": time.time(),
        "host": socket.gethostname(), "command": " ".join(sys.argv),
    }  # fmt: skip


def data_floor(dataset: str, pc: PowerConfig, repeats: int = 20) -> dict[str, Any]:
    """FD of ``num`` real images (drawn without replacement when the dataset is large enough, else with) against the
    whole-dataset reference: the value a perfect sampler would get from this many samples."""
    from aotdiff.data import load_dataset

    cfg = preset_config(dataset)
    images = load_dataset(cfg.data).images
    quality = dataset_quality(dataset, images.shape[1:], cfg.to_dict(), pc.num)
    with torch.no_grad():
        feats = np.concatenate([quality.detector.features(torch.from_numpy(images[i : i + 1000])).double().numpy()
                                for i in range(0, len(images), 1000)])  # fmt: skip
    rng = np.random.default_rng(FLOOR_SEED)
    replace = pc.num > len(images)
    values = [fd_of(feats[rng.choice(len(images), pc.num, replace=replace)], quality) for _ in range(repeats)]
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)), "repeats": repeats,
            "with_replacement": replace, "dataset_size": len(images)}  # fmt: skip


# ------------------------------------------------------------------------------------------------ running
def task_list(pc: PowerConfig) -> list[tuple[str, str, int]]:
    """(dataset, arm, seed) in the order of priority: per dataset, the first seeds of the first two arms (the core
    comparison) seed by seed, then the remaining arms seed by seed."""
    arms = list(pc.arms)
    core, rest = arms[:2], arms[2:]
    tasks = []
    for dataset in pc.datasets:
        tasks += [(dataset, a, s) for s in pc.seeds for a in core]
        tasks += [(dataset, a, s) for s in pc.seeds for a in rest]
    return tasks


@dataclass
class Deadlines:
    """``stop_after``: start no model after it; ``finish_by``: start none that is expected to end after it (expected:
    the longest train + evaluation time of the dataset's finished models in WORK, when there is one)."""

    stop_after: datetime.datetime | None = None
    finish_by: datetime.datetime | None = None

    def refuse(self, work: Path, dataset: str, arms: Sequence[str]) -> str:
        now = datetime.datetime.now(datetime.timezone.utc)
        if self.stop_after is not None and now >= self.stop_after:
            return f"it is past {self.stop_after:%H:%M} UTC (--stop-after)"
        if self.finish_by is not None:
            times = [json.loads(p.read_text()) for a in arms for p in (work / dataset / a).glob("seed*/result.json")]
            spans = [r["finished"] - r["started"] for r in times if r.get("trained_now")]
            expected = datetime.timedelta(seconds=max(spans)) if spans else datetime.timedelta(0)
            if now + expected >= self.finish_by:
                return (
                    f"a {dataset} model (~{expected.seconds / 60:.0f} min) would end after {self.finish_by:%H:%M} UTC"
                )
        return ""


def worker(pc: PowerConfig, work: Path, deadlines: Deadlines, name: str) -> int:
    """Claim and run tasks until none is left (or the deadlines stop it); returns the number done here."""
    torch.set_num_threads(1)

    def say(text: str) -> None:
        print(f"{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S} {name} {text}", flush=True)

    done = 0
    for dataset, arm, seed in task_list(pc):
        folder = task_dir(work, dataset, arm, seed)
        if (folder / "result.json").is_file():
            continue
        why = deadlines.refuse(work, dataset, list(pc.arms))
        if why:
            say(f"starting nothing more: {why}")
            break
        if not claim(folder):
            continue
        try:
            try:
                result = study_model(dataset, arm, pc.arms[arm], seed, pc, folder, say)
            except Interrupted as stop:
                say(f"{stop}: stopping")
                break
            tmp = folder / "result.json.tmp"
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            tmp.replace(folder / "result.json")
            done += 1
        finally:
            (folder / "lock").unlink(missing_ok=True)
    return done


def _worker_entry(args: tuple) -> int:
    return worker(*args)


def collect(pc: PowerConfig, work: Path) -> list[dict[str, Any]]:
    """Every finished result under ``work`` for the study's datasets and arms (any seed found); refuses to mix
    results scored by different detector files (see :func:`check_one_detector`)."""
    found = []
    for dataset in pc.datasets:
        for arm in pc.arms:
            for path in sorted((work / dataset / arm).glob("seed*/result.json")):
                found.append(json.loads(path.read_text()))
    check_one_detector(found)
    return found


def check_one_detector(results: Sequence[dict[str, Any]]) -> None:
    """Every result of one dataset must have been scored by the same detector file. The proxy CNNs are retrained
    from a fixed recipe wherever none is cached, but the weights depend on the CPU's kernels: the mnist5k proxy
    trained on an AVX-512 Intel machine (held-out accuracy 95.9 %) is not the one trained on the AVX2 AMD machine of
    the earlier models (96.2 %), and an FD under one is not comparable with an FD under the other. Results from before
    the hash was recorded (None) get a warning; two different recorded hashes are refused."""
    by_dataset: dict[str, dict[str | None, list[str]]] = {}
    for r in results:
        label = f"{r['arm']}/seed{r['seed']}"
        by_dataset.setdefault(r["dataset"], {}).setdefault(r.get("detector_sha256"), []).append(label)
    for dataset, groups in by_dataset.items():
        known = [sha for sha in groups if sha is not None]
        if len(known) > 1:
            listing = "; ".join(f"{sha[:12]}: {', '.join(groups[sha])}" for sha in known)
            raise SystemExit(f"{dataset}: results scored by different detector files ({listing}): their FDs are not "
                             "comparable; rescore them with one proxy file (copy the cache's proxy/ folder)")  # fmt: skip
        if known and None in groups:
            print(f"warning: {dataset}: {', '.join(groups[None])} do not record their detector; they are assumed to "
                  f"be scored with {known[0][:12]} like {', '.join(groups[known[0]])}", file=sys.stderr)  # fmt: skip


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
            f"{torch.__version__}; one torch thread per worker process")  # fmt: skip


def save(
    out: Path, pc: PowerConfig, results: list[dict[str, Any]], floors: dict[str, Any], meta: dict[str, Any]
) -> Path:
    path = power_json(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"format": POWER_FORMAT, "meta": meta, "study": asdict(pc), "floors": floors, "results": results}
    path.write_text(dump_json(saved))
    return path


def dump_json(saved: dict[str, Any]) -> str:
    """Indented JSON, except that each model's result is one line (its bootstrap lists would otherwise take
    thousands)."""
    results = saved["results"]
    head = json.dumps({**saved, "results": ["@RESULTS@"]}, indent=1)
    body = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in results)
    return head.replace('"@RESULTS@"', body) + "\n"


def parse_deadline(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    hh, mm = (int(v) for v in text.split(":"))
    return now.replace(hour=hh, minute=mm, second=0, microsecond=0)


# ------------------------------------------------------------------------------------------------ statistics
@dataclass
class Estimate:
    """A mean over training seeds with its standard error. ``se_seeds``: from the spread over seeds (None with one
    seed); ``se_sampling``: from the bootstrap sampling noise alone; ``se``: the one used, max of the two."""

    mean: float
    n: int
    se_seeds: float | None
    se_sampling: float

    @property
    def se(self) -> float:
        return self.se_sampling if self.se_seeds is None else max(self.se_seeds, self.se_sampling)

    @property
    def resolved(self) -> bool:
        """|mean| exceeds two standard errors."""
        return abs(self.mean) > 2 * self.se


def estimate(values: Sequence[float], boots: Sequence[Sequence[float]] | None) -> Estimate:
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    se_seeds = float(v.std(ddof=1) / math.sqrt(n)) if n >= 2 else None
    if boots:
        sd = np.asarray([np.std(b, ddof=1) for b in boots])
        se_sampling = float(math.sqrt(np.mean(sd**2)) / math.sqrt(n))
    else:
        se_sampling = 0.0
    return Estimate(float(v.mean()), n, se_seeds, se_sampling)


def by_seed(results: list[dict[str, Any]], dataset: str, arm: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in results if r["dataset"] == dataset and r["arm"] == arm}


def cell_estimate(runs: dict[int, dict[str, Any]], name: str) -> Estimate | None:
    if not runs:
        return None
    cells = [r["cells"][name] for r in runs.values()]
    return estimate([c["value"] for c in cells], [c["boot"] for c in cells])


def paired(runs: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]], name: str) -> Estimate | None:
    """arm - base over the seeds both have; the bootstrap of each seed's difference resamples the same latents."""
    seeds = sorted(set(runs) & set(base))
    if not seeds:
        return None
    values = [runs[s]["cells"][name]["value"] - base[s]["cells"][name]["value"] for s in seeds]
    boots = [np.subtract(runs[s]["cells"][name]["boot"], base[s]["cells"][name]["boot"]) for s in seeds]
    return estimate(values, boots)


def curvature_value(r: dict[str, Any], key: str) -> float:
    c = r["curvature"]
    return float(c["truncation_error"][key[len("trunc") :]]) if key.startswith("trunc") else float(c[key])


CURVATURE_KEYS = ("curvature", "curvature_median", *(f"trunc{n}" for n in TRUNCATION_STEPS))
CURVATURE_TITLES = {"curvature": "pooled κ", "curvature_median": "median κ",
                    **{f"trunc{n}": f"trunc. err. Heun {n} steps" for n in TRUNCATION_STEPS}}  # fmt: skip


# ------------------------------------------------------------------------------------------------ report
def show(e: Estimate | None, digits: int = 3, sign: bool = False, bold_resolved: bool = False) -> str:
    if e is None:
        return "–"
    mean = f"{'+' if sign and e.mean > 0 else ''}{fmt(e.mean, digits)}"
    text = f"{mean} ± {fmt(e.se, 2)}" + ("" if e.se_seeds is not None else "†")
    return f"**{text}**" if bold_resolved and e.resolved else text


def setting_names() -> list[str]:
    return [setting_name(s, n) for s, n in SETTINGS]


def setting_header() -> list[str]:
    titles = [setting_title(s, n) for s, n in SETTINGS]
    return ["| arm | seeds | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(titles)]


FEW = ("euler-3", "euler-5", "euler-9", "heun-3", "heun-5")  # 3-9 NFE
MANY = ("heun-14", "heun-18")  # 27 and 35 NFE


def short(x: float) -> str:
    """Two significant digits, but whole numbers from 100 up (no exponent for a difference of -219)."""
    return f"{x:+.0f}" if abs(x) >= 100 else ("+" if x > 0 else "") + fmt(x, 2)


def describe_diffs(diffs: dict[str, Estimate | None], what: str) -> str:
    better = [n for n, e in diffs.items() if e is not None and e.resolved and e.mean < 0]
    worse = [n for n, e in diffs.items() if e is not None and e.resolved and e.mean > 0]
    title = dict(zip(setting_names(), (setting_title(s, n) for s, n in SETTINGS), strict=True))

    def listed(names: list[str]) -> str:
        return ", ".join(f"{title[n]} ({short(diffs[n].mean)} ± {fmt(diffs[n].se, 2)})" for n in names)  # type: ignore[union-attr]

    parts = []
    if better:
        parts.append(f"better than {what} at {listed(better)}")
    if worse:
        parts.append(f"worse than {what} at {listed(worse)}")
    rest = len([e for e in diffs.values() if e is not None]) - len(better) - len(worse)
    if not parts:
        return f"no difference from {what} exceeds two standard errors at any of the {rest} settings"
    return "; ".join(parts) + (f"; within two standard errors of it at the other {rest} settings" if rest else "")


def dataset_section(
    ds: str, results: list[dict[str, Any]], arms: list[str], floor: dict[str, Any] | None
) -> tuple[list[str], list[str]]:
    """The dataset's tables, and its summary lines (computed from the same estimates)."""
    runs = {a: by_seed(results, ds, a) for a in arms}
    arms = [a for a in arms if runs[a]]
    base = runs.get(BASELINE, {})
    paper = runs.get("aot-paper", {})
    metric = next(r["metric"] for r in results if r["dataset"] == ds)
    names = setting_names()
    first = next(r for r in results if r["dataset"] == ds)
    cfg = first["config"]
    lines = [f"## {ds}", ""]
    lines.append(
        f"Preset `{ds}` ({cfg['arch']} U-Net, {cfg['model_channels']} channels, {cfg['num_blocks']} blocks/level, "
        f"{cfg['duration_kimg']:g} kimg, batch {cfg['batch']}, AOT pool {cfg['aot_pool']}); quality {metric} against "
        f"{first['reference']}."
        + (f" Floor: {fmt(floor['mean'])} ± {fmt(floor['sd'], 2)} (sd) for "
           f"real images drawn {'with' if floor['with_replacement'] else 'without'} replacement from the "
           f"{floor['dataset_size']:,} of the dataset, {floor['repeats']} draws of the same size as the samples."
           if floor else "")
    )  # fmt: skip
    lines += ["", f"### {metric}: mean ± standard error over training seeds", ""]
    lines += setting_header()
    for a in arms:
        ests = [cell_estimate(runs[a], n) for n in names]
        lines.append(f"| {a} | {len(runs[a])} | " + " | ".join(show(e) for e in ests) + " |")
    sampling = [
        np.sqrt(np.mean([r["cells"][n]["boot_sd"] ** 2 for a in arms for r in runs[a].values()])) for n in names
    ]
    lines.append("| *sampling sd of one value* | | " + " | ".join(fmt(float(v), 2) for v in sampling) + " |")
    lines.append("")
    comparisons = [(BASELINE, base, [a for a in arms if a != BASELINE])]
    if paper:
        comparisons.append(("aot-paper", paper, [a for a in arms if a not in (BASELINE, "aot-paper")]))
    diffs: dict[tuple[str, str], dict[str, Estimate | None]] = {}
    for ref_name, ref_runs, others in comparisons:
        if not others:
            continue
        lines += [f"### Paired differences arm − {ref_name} (negative = better than {ref_name})", ""]
        lines += setting_header()
        for a in others:
            d = {n: paired(runs[a], ref_runs, n) for n in names}
            diffs[(a, ref_name)] = d
            seeds = len(set(runs[a]) & set(ref_runs))
            lines.append(
                f"| {a} | {seeds} | " + " | ".join(show(d[n], sign=True, bold_resolved=True) for n in names) + " |"
            )
        for a in others:  # relative to the reference's mean over the same seeds
            common = sorted(set(runs[a]) & set(ref_runs))
            cells_rel = []
            for n in names:
                e = diffs[(a, ref_name)][n]
                ref_mean = float(np.mean([ref_runs[s]["cells"][n]["value"] for s in common])) if common else 0.0
                cells_rel.append(f"{100 * e.mean / ref_mean:+.1f} %" if e is not None and ref_mean else "–")
            lines.append(f"| {a} (relative) | | " + " | ".join(cells_rel) + " |")
        lines.append("")
    lines += ["### Curvature and truncation error (mean ± standard error over seeds)", ""]
    lines.append("| arm | seeds | " + " | ".join(CURVATURE_TITLES[k] for k in CURVATURE_KEYS) + " | OT cost ratio |")
    lines.append("|---|---|" + "---|" * (len(CURVATURE_KEYS) + 1))
    for a in arms:
        cells = [estimate([curvature_value(r, k) for r in runs[a].values()], None) for k in CURVATURE_KEYS]
        ratios = [r["ot_cost_ratio"] for r in runs[a].values() if r.get("ot_cost_ratio") is not None]
        lines.append(f"| {a} | {len(runs[a])} | " + " | ".join(show(c) if c.n > 1 else fmt(c.mean) for c in cells)
                     + f" | {fmt(float(np.mean(ratios)), 3) if ratios else '–'} |")  # fmt: skip
    if base:
        lines.append("")
        lines.append("Paired ratio arm / independent (per seed, then mean ± s.e.):")
        lines.append("")
        lines.append("| arm | seeds | " + " | ".join(CURVATURE_TITLES[k] for k in CURVATURE_KEYS) + " |")
        lines.append("|---|---|" + "---|" * len(CURVATURE_KEYS))
        for a in arms:
            if a == BASELINE:
                continue
            common = sorted(set(runs[a]) & set(base))
            if not common:
                continue
            cells = [estimate([curvature_value(runs[a][s], k) / curvature_value(base[s], k) for s in common], None)
                     for k in CURVATURE_KEYS]  # fmt: skip
            lines.append(
                f"| {a} | {len(common)} | "
                + " | ".join(show(c, 2) if c.n > 1 else fmt(c.mean, 2) for c in cells)
                + " |"
            )
    summary = findings(runs, arms, diffs, base)
    lines += ["", "### Time per model (wall, one thread; mean over seeds)", "",
              "| arm | seeds | train | evaluate |", "|---|---|---|---|"]  # fmt: skip
    for a in arms:
        rs = list(runs[a].values())
        fresh = [r["train_s"] for r in rs if r.get("trained_now")]
        lines.append(
            f"| {a} | {len(rs)} | {np.mean(fresh) / 60:.1f} min" if fresh else f"| {a} | {len(rs)} | (resumed)"
        )
        lines[-1] += f" | {np.mean([r['eval_s'] for r in rs]) / 60:.1f} min |"
    return lines + [""], summary


def t_critical(n: int) -> float:
    """Two-sided 95 % Student-t multiplier for a mean of n values (n - 1 degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n >= 2 else float("inf")


def curvature_finding(a: str, runs: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]]) -> str:
    seeds = sorted(set(runs) & set(base))
    if not seeds:
        return ""
    parts = []
    for key, what in (("curvature", "pooled κ"), ("trunc9", "Heun 9-step truncation error")):
        e = estimate([curvature_value(runs[s], key) / curvature_value(base[s], key) for s in seeds], None)
        if e.se_seeds is None:
            parts.append(f"{what} ratio {fmt(e.mean, 2)} (one seed)")
        else:
            resolved = abs(e.mean - 1) > 2 * e.se
            parts.append(f"{what} ratio {fmt(e.mean, 2)} ± {fmt(e.se, 2)}" + ("" if resolved else " (not resolved)"))
    return f" Curvature against independent: {', '.join(parts)}."


def resolved(ests: dict[str, Estimate | None], names: tuple[str, ...], sign: int) -> list[str]:
    """Titles of the settings among ``names`` whose difference is resolved with the sign of ``sign``."""
    title = dict(zip(setting_names(), (setting_title(s, n) for s, n in SETTINGS), strict=True))
    return [title[n] for n, e in ests.items() if n in names and e is not None and e.resolved and sign * e.mean > 0]


def findings(runs: dict[str, dict[int, dict[str, Any]]], arms: list[str],
             diffs: dict[tuple[str, str], dict[str, Estimate | None]],
             base: dict[int, dict[str, Any]]) -> list[str]:  # fmt: skip
    out = []
    for a in arms:
        if a == BASELINE:
            continue
        d = diffs.get((a, BASELINE))
        if d is None:
            continue
        n_seeds = len(runs[a])
        text = f"- **{a}** ({n_seeds} seed{'s' if n_seeds != 1 else ''}) vs independent: {describe_diffs(d, 'independent')}."
        dp = diffs.get((a, "aot-paper"))
        if dp is not None:
            text += f" Against paper AOT: {describe_diffs(dp, 'paper AOT')}."
            lost, many_worse, many_better = resolved(dp, FEW, +1), resolved(d, MANY, +1), resolved(d, MANY, -1)
            gain = resolved(d, FEW, -1)
            text += (
                (f" Verdict: at 3–9 NFE it loses to paper AOT at {', '.join(lost)}" if lost
                 else " Verdict: it keeps paper AOT's few-step quality (no resolved loss against it at 3–9 NFE)")
                + (f"; at 27–35 NFE it is resolved better than independent at {', '.join(many_better)}"
                   if many_better and not many_worse
                   else f"; at 27–35 NFE it is still resolved worse than independent at {', '.join(many_worse)}"
                   if many_worse else "; at 27–35 NFE it is not resolved worse than independent")
                + ("." if gain else "; it has no resolved gain over independent at 3–9 NFE.")
            )  # fmt: skip
        out.append(text + curvature_finding(a, runs[a], base))
    n_min = min(len(r) for r in runs.values() if r)
    out.append(
        f"- Uncertainty: with {n_min} seed(s) for the smallest arm the standard error over seeds is itself uncertain "
        + (f"(a 95 % Student-t interval is ±{t_critical(n_min):.1f} s.e. with {n_min} seeds, not ±2)" if n_min >= 2
           else "(one seed: sampling noise only, no training noise)")
        + ", and 8 settings × several arms are compared, so a single 2-s.e. difference can be chance: what holds "
        "over neighbouring settings and on both datasets is the finding."
    )  # fmt: skip
    return out


def quality_tables(out: Path) -> list[str]:
    """The per-dataset quality, difference and curvature tables of ``OUT/results/power.json``, headings one level
    down (docs/results.md embeds them; the full report with protocol and timings is OUT/results-power.md)."""
    saved = json.loads(power_json(out).read_text())
    study, results, floors = saved["study"], saved["results"], saved["floors"]
    lines: list[str] = []
    for ds in study["datasets"]:
        if any(r["dataset"] == ds for r in results):
            section, _ = dataset_section(ds, results, list(study["arms"]), floors.get(ds))
            cut = next((i for i, line in enumerate(section) if line.startswith("### Time per model")), len(section))
            lines += ["#" + line if line.startswith("#") else line for line in section[:cut]]
    return lines


def render(out: Path) -> Path:
    """``OUT/results-power.md`` from ``OUT/results/power.json`` (nothing recomputed)."""
    saved = json.loads(power_json(out).read_text())
    if saved.get("format") != POWER_FORMAT:
        raise ValueError(f"{power_json(out)}: format {saved.get('format')!r}, expected {POWER_FORMAT!r}")
    meta, study, results, floors = saved["meta"], saved["study"], saved["results"], saved["floors"]
    arms = list(study["arms"])
    started = min(r["started"] for r in results)
    finished = max(r["finished"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    lines = ["# AOT vs independent coupling, with statistical power", ""]
    if meta["quick"]:
        lines += [
            "**`--quick` smoke run: tiny training and sample sizes; the numbers and findings below mean nothing.**",
            "",
        ]
    lines += [
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}); the models were computed by "
        + ", ".join(f"`python {c}`" for c in sorted({r["command"] for r in results}))
        + f". {len(results)} models trained and "
        f"evaluated between {time.strftime('%H:%M', time.gmtime(started))} and "
        f"{time.strftime('%H:%M UTC', time.gmtime(finished))} (**{(finished - started) / 60:.0f} min wall**, "
        f"{cpu / 60:.0f} min CPU in one-thread worker processes, on a 2-core machine shared with other jobs). Raw "
        "values: [results/power.json](results/power.json); per-model results and training runs in "
        f"`{meta['work']}` (rerunning the command continues an interrupted study).",
        "",
        "## Protocol",
        "",
        "- **Arms** (flags on top of the dataset's preset; a variant pins the AOT knobs it does not name to the "
        "paper's values):",
        *(f"  - `{a}`: `{study['arms'][a]}`" for a in arms),
        f"- **Seeds:** training seeds {', '.join(map(str, study['seeds']))} were planned; the tables give how many "
        "finished per arm. One seed fixes the data order, the σ draws and the initial weights (training randomness "
        "is counter-based), so the arms of one seed are paired.",
        f"- **Quality:** {study['num']:,} samples per model and sampler setting, ρ = 7; training seed s samples "
        f"latents with seeds s·10⁶ … s·10⁶ + {study['num'] - 1}: the same latents for every arm of one seed, disjoint "
        "latents between seeds. Euler N steps = N NFE; Heun N steps = 2N − 1 NFE (3, 5, 8, 14, 18 steps).",
        f"- **Sampling noise:** {study['boot']} bootstrap resamples of the {study['num']:,} samples, with the same "
        "index sets for every model, so the bootstrap of a paired difference resamples the same latents in both "
        "arms.",
        f"- **Curvature / truncation error:** `aotdiff.metrics.curvature_report` on the first {study['curvature_num']} "
        f"latents of each seed, fine Heun grid of {study['curvature_fine_steps']} steps (ρ 7), truncation error of "
        f"Heun {', '.join(map(str, TRUNCATION_STEPS))} steps against it.",
        "",
        "## Statistics",
        "",
        "A table entry is the mean over training seeds ± its standard error. The standard error is the spread of the "
        "per-seed values over seeds divided by √n, which contains training and sampling noise (latents differ "
        "between seeds); because that spread is poorly estimated from a few seeds, the standard error shown is never "
        "below the sampling-only one (bootstrap sd of each seed's value, combined over seeds). † marks one-seed "
        "entries, whose ± is sampling noise only (no training noise). Paired differences are formed per seed "
        "(same data order, σ, initial weights and latents) and then averaged the same way. **Bold**: the difference "
        "exceeds two standard errors. FD values from the same number of samples are biased upwards by a similar "
        "amount for every model, so differences and ratios are meaningful; the floor says how far a perfect sampler "
        "would be from 0.",
        "",
    ]
    summary = ["## Summary", "", "Quality columns: solver and NFE (Heun 5/9/15/27/35 NFE = 3/5/8/14/18 steps).", ""]
    body = []
    for ds in study["datasets"]:
        if any(r["dataset"] == ds for r in results):
            section, found = dataset_section(ds, results, arms, floors.get(ds))
            body += section
            summary += [f"**{ds}**", "", *found, ""]
        else:
            body += [f"## {ds}", "", "Not run yet (no finished model).", ""]
            summary += [f"**{ds}**: not run yet.", ""]
    at = lines.index("## Protocol")
    lines[at:at] = summary  # after the title, the quick warning (if any) and the provenance paragraph
    lines += body
    missing = [f"{ds}/{a}/seed{s}" for ds in study["datasets"] for a in arms for s in study["seeds"]
               if not any(r["dataset"] == ds and r["arm"] == a and r["seed"] == s for r in results)]  # fmt: skip
    if missing:
        lines += ["## Not run (time)", "", ", ".join(missing) + ".", ""]
    path = report_path(out)
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--datasets", default="digits", help="comma-separated presets: digits, mnist5k (default: digits)"
    )
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma-separated arm names, the baseline first (default: {','.join(DEFAULT_ARMS)}); "
                        "known: " + ", ".join(ARMS))  # fmt: skip
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=FLAGS",
                        help="add (or redefine) an arm: NAME='aotdiff train flags' (repeatable)")  # fmt: skip
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (default: 0,1,2)")
    parser.add_argument("--num", type=int, default=None, help="samples per cell (default: 2000; --quick 200)")
    parser.add_argument("--boot", type=int, default=None, help="bootstrap resamples per cell (default: 200)")
    parser.add_argument("--curvature-num", type=int, default=None, help="curvature trajectories (default: 128)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny training and sample sizes")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one thread each (default: 1)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder of the training runs and per-model results (default: runs/aot-power; "
                        "--quick: a temporary one)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: docs; --quick: temporary)")
    parser.add_argument(
        "--stop-after",
        default=None,
        metavar="HH:MM",
        help="start no new model after this UTC time today (finished ones are still reported)",
    )
    parser.add_argument(
        "--finish-by",
        default=None,
        metavar="HH:MM",
        help="start no model expected (from the finished ones) to end after this UTC time today",
    )
    parser.add_argument("--collect-only", action="store_true", help="train nothing: gather finished results and render")
    parser.add_argument("--render-only", action="store_true", help="redraw OUT/results-power.md from power.json")
    args = parser.parse_args(argv)

    if args.render_only:
        out = args.out or Path("docs")
        print(f"wrote {render(out)} from {power_json(out)}")
        return 0
    arms = {name: ARMS[name] for name in args.arms.split(",") if name}
    for spec in args.arm:
        name, _, flags = spec.partition("=")
        arms[name.strip()] = flags.strip()
    unknown = [a for a in args.arms.split(",") if a and a not in ARMS and a not in arms]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)} (or define one with --arm NAME=FLAGS)")
    if BASELINE not in arms:
        parser.error(f"the arms must include '{BASELINE}' (the paired baseline)")
    arms = {BASELINE: arms.pop(BASELINE), **arms}
    datasets = [d for d in args.datasets.split(",") if d]
    for d in datasets:
        if d not in PRESETS:
            parser.error(f"unknown dataset preset {d!r}")
    quick = args.quick
    pc = PowerConfig(
        datasets=datasets, arms=arms, seeds=[int(s) for s in args.seeds.split(",") if s],
        num=args.num or (200 if quick else 2000), boot=args.boot or (20 if quick else 200),
        curvature_num=args.curvature_num or (16 if quick else 128), curvature_fine_steps=24 if quick else 128,
        overrides=quick_overrides() if quick else {}, quick=quick,
    )  # fmt: skip
    for flags in arms.values():  # refuse a bad arm before anything trains
        for d in datasets:
            model_config(d, flags, 0, pc.overrides)
    out = args.out or (Path(tempfile.mkdtemp(prefix="aot-power-")) if quick else Path("docs"))
    work = args.work or (Path(tempfile.mkdtemp(prefix="aot-power-runs-")) if quick else Path("runs/aot-power"))
    work.mkdir(parents=True, exist_ok=True)
    # The study settings a WORK folder was started with: results made with other settings must not be mixed in.
    settings_file = work / "study.json"
    speed_only = ("batch_size",)  # changes no result (per-seed samples): neither recorded nor compared
    shared = {k: v for k, v in asdict(pc).items() if k not in ("datasets", "arms", "seeds", *speed_only)}
    if settings_file.is_file():
        before = json.loads(settings_file.read_text())
        if {k: v for k, v in before.items() if k not in speed_only} != shared:
            parser.error(f"{settings_file} records other settings ({before}); use another --work")
    else:
        settings_file.write_text(json.dumps(shared, indent=1) + "\n")

    deadlines = Deadlines(parse_deadline(args.stop_after), parse_deadline(args.finish_by))
    t0 = time.perf_counter()
    if not args.collect_only:
        if args.jobs <= 1:
            worker(pc, work, deadlines, "w0")
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
                list(pool.map(_worker_entry, [(pc, work, deadlines, f"w{k}") for k in range(args.jobs)]))
    results = collect(pc, work)
    if not results:
        print("no finished results to report yet")
        return 1
    floors = {d: data_floor(d, pc) for d in datasets if any(r["dataset"] == d for r in results)}
    meta = {
        "quick": quick, "machine": machine(), "host": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/aot_power.py " + " ".join(shlex.quote(a) for a in argv),
        "this_invocation_s": time.perf_counter() - t0, "work": str(work),
    }  # fmt: skip
    path = save(out, pc, results, floors, meta)
    print(f"wrote {path} ({len(results)} models) and {render(out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
