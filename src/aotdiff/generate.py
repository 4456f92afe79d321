"""Batched generation from a trained denoiser: seeds in, uint8 images out, one batch at a time.

A thin layer over :mod:`aotdiff.sampling` that the `sample`, `fid` and `sweep` commands share: it shards seeds into
batches, draws per-seed latents and class labels (so image k is the same whatever the batch size), runs the sampler,
and yields uint8 NCHW images, so 50,000 samples can be streamed into metrics without touching the disk.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from aotdiff.sampling import SOLVERS, SeedRNG, StepInfo, karras_sigmas, sample, to_uint8

# More samples than one command should ever be asked for: the seed list alone would take gigabytes, so a typo such as
# 0-999999999999 is refused at once instead of exhausting memory. Larger jobs are split into seed ranges.
MAX_SEEDS = 10_000_000
# Seeds are stored as int64 in every .npz and JSON record (and torch generators take 64-bit seeds).
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplerSettings:
    """Everything that decides a sample besides the model and the seed (saved next to every result)."""

    steps: int = 18
    rho: float = 7.0
    solver: str = "heun"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    churn: float = 0.0
    s_min: float = 0.0
    s_max: float = float("inf")
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings that would sample garbage (NaN passes ``rho > 0``; it gave black images) before any work.

        Messages name the field and the `aotdiff` flag, so the library and the command line say the same thing.
        """
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 1:
            raise ValueError(f"steps (--steps) must be an integer >= 1, got {self.steps!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver (--solver) must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        _check_number("rho", self.rho, low=0.0, low_ok=False)
        _check_number("sigma_min", self.sigma_min, low=0.0, low_ok=False)
        _check_number("sigma_max", self.sigma_max, low=0.0, low_ok=False)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(
                f"sigma_min (--sigma-min) must be below sigma_max (--sigma-max), got {self.sigma_min:g} >= "
                f"{self.sigma_max:g}"
            )
        for name in ("churn", "s_min", "s_noise"):
            _check_number(name, getattr(self, name), low=0.0, low_ok=True)
        _check_number("s_max", self.s_max, low=0.0, low_ok=False, inf_ok=True)  # inf: churn at every level

    def sigmas(self, device: torch.device | str | None = None) -> torch.Tensor:
        return karras_sigmas(self.steps, self.sigma_min, self.sigma_max, self.rho, device=device)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["s_max"] = None if d["s_max"] == float("inf") else d["s_max"]  # JSON has no infinity
        return d


@dataclass
class GeneratedBatch:
    seeds: torch.Tensor  # int64 [B]
    images: torch.Tensor  # uint8 [B, C, H, W] for image data; float64 [B, D] for point data (``raw``)
    labels: torch.Tensor | None  # int64 [B] or None
    raw: torch.Tensor  # float64 model-space samples
    nfe: int  # network evaluations for this batch (same for every batch)
    guidance_evals: int = 0  # discriminator gradients (Discriminator Guidance), not counted in nfe


def _check_number(name: str, value: float, *, low: float, low_ok: bool, inf_ok: bool = False) -> None:
    """``value`` is a real number, finite (or +inf where ``inf_ok``), and above ``low`` (or equal where ``low_ok``)."""
    flag = "--" + name.replace("_", "-")
    bound = f">= {low:g}" if low_ok else f"> {low:g}"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (math.isfinite(value) or (inf_ok and value > 0)) and (value >= low if low_ok else value > low)
    if not ok:
        what = f"a number {bound} (inf allowed)" if inf_ok else f"a finite number {bound}"
        raise ValueError(f"{name} ({flag}) must be {what}, got {value!r}")


def check_count(count: int, what: str) -> None:
    """A number of samples/trajectories: at least 1 and at most :data:`MAX_SEEDS`."""
    if count < 1:
        raise ValueError(f"{what} must be at least 1, got {count}")
    if count > MAX_SEEDS:
        raise ValueError(
            f"{what} asks for {count:,} samples; one command makes at most {MAX_SEEDS:,}: split the job into seed "
            "ranges (e.g. --seeds 0-9999999, then 10000000-19999999)"
        )


def parse_seeds(text: str, *, limit: int = MAX_SEEDS) -> list[int]:
    """'0-63' -> [0..63]; '1,5,9-11' -> [1, 5, 9, 10, 11]. Ranges are inclusive, like EDM's generate.py.

    Seeds lie in [0, 2^63 - 1] (they are stored as int64); more than ``limit`` seeds are refused before any list is
    built, so a mistyped range cannot exhaust memory.
    """
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part, flags=re.ASCII)
        if not m:
            raise ValueError(f"cannot read seeds '{text}': use a range like 0-63 or a list like 1,5,9-11")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi > MAX_SEED:
            raise ValueError(f"seed {hi} in '{part}' is too large: seeds lie in 0..{MAX_SEED} (64-bit integers)")
        if hi < lo:
            raise ValueError(f"seed range '{part}' is empty: write LOW-HIGH with LOW <= HIGH")
        if len(seeds) + (hi - lo + 1) > limit:
            raise ValueError(
                f"--seeds {text} asks for at least {len(seeds) + hi - lo + 1:,} samples; one command makes at most "
                f"{limit:,}: split the job into seed ranges"
            )
        seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise ValueError("no seeds given: use a range like 0-63")
    return seeds


def check_class_label(class_label: int | None, num_classes: int) -> None:
    """A fixed class label must be one of the model's classes, and only a conditional model takes one."""
    if class_label is None:
        return
    if num_classes == 0:
        raise ValueError("this model is unconditional: drop --class")
    if not 0 <= class_label < num_classes:
        raise ValueError(f"--class must lie in [0, {num_classes - 1}], got {class_label}")


def seed_labels(rng: SeedRNG, num_classes: int, class_label: int | None) -> torch.Tensor | None:
    """Class labels per seed: a fixed class, or one drawn uniformly from that seed's own generator (as EDM does)."""
    check_class_label(class_label, num_classes)
    if num_classes == 0:
        return None
    if class_label is not None:
        return torch.full((len(rng),), class_label, dtype=torch.int64)
    return rng.randint(num_classes)


def generate(
    denoiser: Callable[..., torch.Tensor],
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    settings: SamplerSettings | None = None,
    num_classes: int = 0,
    class_label: int | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    callback: Callable[[StepInfo], None] | None = None,
    guidance: Callable[..., torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[GeneratedBatch]:
    """Yield :class:`GeneratedBatch` objects covering ``seeds`` in order, ``batch_size`` at a time.

    For each seed, the latent is drawn first, then (for conditional models without a fixed class) the label, then any
    churn noise, all from that seed's own generator. ``progress(n)`` is called with the number of images finished.
    """
    settings = settings or SamplerSettings()
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    check_class_label(class_label, num_classes)  # before the first batch, not in the middle of a run
    sigmas = settings.sigmas()
    is_image = len(shape) == 3
    for start in range(0, len(seeds), batch_size):
        chunk = [int(s) for s in seeds[start : start + batch_size]]
        rng = SeedRNG(chunk)
        latents = rng.randn(shape, device=device)
        labels = seed_labels(rng, num_classes, class_label)
        labels = None if labels is None else labels.to(device)
        evals_before = getattr(guidance, "evaluations", 0)
        with torch.no_grad():
            result = sample(
                denoiser,
                latents,
                sigmas,
                solver=settings.solver,
                labels=labels,
                churn=settings.churn,
                s_min=settings.s_min,
                s_max=settings.s_max,
                s_noise=settings.s_noise,
                rng=rng,
                callback=callback,
                guidance=guidance,
            )
        raw = result.images
        images = to_uint8(raw).cpu() if is_image else raw.cpu()
        yield GeneratedBatch(
            seeds=torch.tensor(chunk, dtype=torch.int64),
            images=images,
            labels=None if labels is None else labels.cpu(),
            raw=raw.cpu(),
            nfe=result.nfe,
            guidance_evals=getattr(guidance, "evaluations", 0) - evals_before,
        )
        if progress is not None:
            progress(len(chunk))
