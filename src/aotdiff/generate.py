"""Batched generation from a trained denoiser: seeds in, uint8 images out, one batch at a time.

A thin layer over :mod:`aotdiff.sampling` that the `sample`, `fid` and `sweep` commands share: it shards seeds into
batches, draws per-seed latents and class labels (so image k is the same whatever the batch size), runs the sampler,
and yields uint8 NCHW images, so 50,000 samples can be streamed into metrics without touching the disk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from aotdiff.sampling import SeedRNG, StepInfo, karras_sigmas, sample, to_uint8


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


def parse_seeds(text: str) -> list[int]:
    """'0-63' -> [0..63]; '1,5,9-11' -> [1, 5, 9, 10, 11]. Ranges are inclusive, like EDM's generate.py."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"seed range '{part}' is empty: write LOW-HIGH with LOW <= HIGH")
            seeds.extend(range(lo, hi + 1))
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise ValueError(f"cannot read seeds '{text}': use a range like 0-63 or a list like 1,5,9-11")
    if not seeds:
        raise ValueError("no seeds given: use a range like 0-63")
    return seeds


def seed_labels(rng: SeedRNG, num_classes: int, class_label: int | None) -> torch.Tensor | None:
    """Class labels per seed: a fixed class, or one drawn uniformly from that seed's own generator (as EDM does)."""
    if num_classes == 0:
        if class_label is not None:
            raise ValueError("this model is unconditional: drop --class")
        return None
    if class_label is not None:
        if not 0 <= class_label < num_classes:
            raise ValueError(f"--class must lie in [0, {num_classes - 1}], got {class_label}")
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
    sigmas = settings.sigmas()
    is_image = len(shape) == 3
    for start in range(0, len(seeds), batch_size):
        chunk = [int(s) for s in seeds[start : start + batch_size]]
        rng = SeedRNG(chunk)
        latents = rng.randn(shape, device=device)
        labels = seed_labels(rng, num_classes, class_label)
        labels = None if labels is None else labels.to(device)
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
        )
        if progress is not None:
            progress(len(chunk))
