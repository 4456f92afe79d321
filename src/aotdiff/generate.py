"""Batched generation from a trained denoiser: seeds in, uint8 images out, one batch at a time.

A thin layer over :mod:`aotdiff.sampling` that the `sample`, `fid` and `sweep` commands share: it shards seeds into
batches, draws per-seed latents and class labels (so image k is the same whatever the batch size), runs the sampler,
and yields uint8 NCHW images, so 50,000 samples can be streamed into metrics without touching the disk.

How fast the network runs is a property of the denoiser, not of the sampler settings: :class:`PreparedDenoiser` wraps
a denoiser to evaluate its network in bf16 (autocast) or with TF32, and optionally compiled, while the sampler's state
and ODE arithmetic stay float64 (:func:`aotdiff.sampling.sample`). A seed means the same sample whatever the
precision; what precision changes is the rounding inside the network, which the results record
(:meth:`PreparedDenoiser.describe`). :func:`auto_max_batch` sizes batches to a GPU's free memory.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from aotdiff.sampling import SOLVERS, Denoiser, SeedRNG, StepInfo, karras_sigmas, sample, to_uint8

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
        if not self.s_min < self.s_max:  # churn only where s_min <= sigma <= s_max: this window would be empty
            raise ValueError(
                f"s_min (--s-min) must be below s_max (--s-max), got {self.s_min:g} >= {self.s_max:g}: no noise level "
                "would get churn; swap them or widen the window"
            )

    def sigmas(self, device: torch.device | str | None = None) -> torch.Tensor:
        return karras_sigmas(self.steps, self.sigma_min, self.sigma_max, self.rho, device=device)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["s_max"] = None if d["s_max"] == float("inf") else d["s_max"]  # JSON has no infinity
        return d


# ------------------------------------------------------------------------------------------------ network numerics
# The words of `aotdiff train --precision`, with the same meanings (one flag name, one meaning in every command).
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
# auto_max_batch: at most this many images per network call (the issue-11 sampling figures use batch 1024; beyond it
# a GPU is saturated and only the memory grows), and at most this fraction of the free memory (cuDNN workspaces,
# the allocator's fragmentation and the detector's own batch need the rest).
AUTO_BATCH_CAP = 1024
AUTO_BATCH_MEMORY_FRACTION = 0.5


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """'auto' (or None) -> 'bf16' on a CUDA device with native bf16 (Ampere and newer), else 'fp32'.

    The same rule as training's default: on a CPU without bf16 matrix units bf16 is slower than fp32, and the
    sampler state never depends on it (see :class:`PreparedDenoiser`). Explicit choices are returned as given after
    checking them; 'bf16' on a CUDA device without native bf16 is refused rather than emulated slowly.
    """
    device = torch.device(device)
    chosen = "auto" if precision is None else precision
    if chosen not in PRECISIONS:
        raise ValueError(f"precision (--precision) must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if chosen == "auto":
        return "bf16" if native_bf16 else "fp32"
    if chosen == "bf16" and device.type == "cuda" and not native_bf16:
        raise ValueError("precision (--precision) bf16: this GPU has no native bfloat16; use fp32 or tf32")
    return chosen


@contextlib.contextmanager
def network_numerics(precision: str, device_type: str) -> Iterator[None]:
    """The numerics a network evaluation runs under, restored afterwards (sampling leaves no global state behind).

    * 'fp32': true fp32 matmuls and convolutions; on CUDA, TF32 is turned off for both (PyTorch leaves it on for
      cuDNN convolutions by default), as EDM and `aotdiff train --precision fp32` do.
    * 'tf32': on CUDA, TF32 matmuls and convolutions (10-bit mantissa products, fp32 accumulation); elsewhere fp32.
    * 'bf16': ``torch.autocast(bfloat16)``: matmuls, convolutions and attention in bf16 (8-bit mantissa) with fp32
      accumulation; the network's group norms normalise in fp32; float64 tensors are never cast by autocast.
    On CUDA, cuDNN's autotuner is on while sampling (the shapes repeat every step).
    """
    saved = None
    if device_type == "cuda":
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.benchmark = True
    try:
        if precision == "bf16":
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        if saved is not None:
            matmul_tf32, cudnn_tf32, benchmark = saved
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
            torch.backends.cudnn.benchmark = benchmark


def _device_of(denoiser: Any) -> torch.device:
    """The device of a module's first parameter (CPU for anything without parameters)."""
    params = getattr(denoiser, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


class PreparedDenoiser:
    """A denoiser whose network is evaluated at a chosen precision, and optionally compiled, for generation.

    Called like the denoiser it wraps: ``prepared(x, sigma, labels) -> denoised``. What stays in which precision:

    * the sampler (latents x sigma_max, every Euler / Heun update, churn): float64, untouched by this class;
    * EDM's preconditioning in :class:`aotdiff.diffusion.Precond` (c_skip, c_out, c_in, c_noise, and the skip
      connection c_skip x + c_out F): in the input's float64, which autocast never casts;
    * the raw network F: fp32, TF32 or bf16 (see :func:`network_numerics`); its output is cast back to the input's
      dtype before the sampler sees it.

    ``precision`` is one of :data:`PRECISIONS`; 'auto' (the default, as on the command line) is bf16 on a GPU with
    native bf16 and fp32 elsewhere (:func:`resolve_precision`). ``compile=True`` wraps the denoiser in
    ``torch.compile`` (the wrapped module is not changed). The first call, and the first call at a new batch size,
    compile: minutes on a CPU, worth it only for long runs on a GPU. The compiled network computes what the eager one
    computes up to float32 rounding order (fused kernels). Wrapping a PreparedDenoiser wraps the denoiser inside it.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        *,
        precision: str | None = "auto",
        compile: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        inner: Denoiser = denoiser.denoiser if isinstance(denoiser, PreparedDenoiser) else denoiser
        self.denoiser: Denoiser = inner
        self.device = torch.device(device) if device is not None else _device_of(inner)
        self.precision = resolve_precision(precision, self.device)
        self.compiled = bool(compile)
        self._network: Callable[..., torch.Tensor] = torch.compile(inner) if compile else inner

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with network_numerics(self.precision, x.device.type):
            out = self._network(x, sigma, labels)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def describe(self) -> dict[str, Any]:
        """What to record next to results: ``{"precision": 'fp32' | 'tf32' | 'bf16', "compile": bool}``."""
        return {"precision": self.precision, "compile": self.compiled}


def batch_for_memory(
    free_bytes: int,
    bytes_per_image: float,
    *,
    fraction: float = AUTO_BATCH_MEMORY_FRACTION,
    cap: int = AUTO_BATCH_CAP,
) -> int:
    """Images per network call that fit in ``fraction`` of ``free_bytes``: at least 1, at most ``cap``, and a
    multiple of 8 from 8 up (tensor-core tiles)."""
    if bytes_per_image <= 0 or not math.isfinite(bytes_per_image):
        raise ValueError(f"bytes_per_image must be a positive number, got {bytes_per_image!r}")
    fits = int(max(free_bytes, 0) * fraction // bytes_per_image)
    batch = min(cap, fits)
    return max(1, batch - batch % 8 if batch >= 8 else batch)


def auto_max_batch(
    denoiser: Denoiser,
    shape: Sequence[int],
    device: torch.device | str,
    *,
    num_classes: int = 0,
    default: int = 256,
    probe: int = 8,
) -> int:
    """Images per network call for generation on ``device``: sized to free GPU memory on CUDA, ``default`` elsewhere.

    On CUDA the denoiser is run once on ``probe`` images at sigma_max; its peak memory above what was allocated
    before, per image, plus the sampler's float64 state (about 10 tensors the size of an image: x, denoised, slopes,
    the Euler and Heun states, and the detector's input), is what one more image costs. The batch is
    :func:`batch_for_memory` of the free memory. Results do not depend on the batch (one generator per seed).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return default
    network = denoiser.denoiser if isinstance(denoiser, PreparedDenoiser) else denoiser
    # Probe eagerly (a compiled network would compile for the probe's batch size, then again for the real one),
    # at the precision that will be used: bf16 activations take half the memory.
    precision = denoiser.precision if isinstance(denoiser, PreparedDenoiser) else "fp32"
    eager = PreparedDenoiser(network, precision=precision, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    x = torch.randn((probe, *shape), dtype=torch.float64, device=device) * 80.0
    sigma = torch.full((probe,), 80.0, dtype=torch.float64, device=device)
    labels = torch.zeros(probe, dtype=torch.int64, device=device) if num_classes else None
    with torch.no_grad():
        eager(x, sigma, labels)
    torch.cuda.synchronize(device)
    network_bytes = (torch.cuda.max_memory_allocated(device) - before) / probe
    state_bytes = 10 * 8 * math.prod(shape)  # float64 sampler state per image
    del x, sigma, labels
    free, _ = torch.cuda.mem_get_info(device)
    return batch_for_memory(free, network_bytes + state_bytes)


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
    built, so a mistyped range cannot exhaust memory. A seed given twice is refused: it names the same sample, which
    would then count twice (in an FID, a bias towards it).
    """
    seeds: list[int] = []
    ranges: list[tuple[int, int]] = []
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
        ranges.append((lo, hi))
    if not seeds:
        raise ValueError("no seeds given: use a range like 0-63")
    repeated = _first_repeated_seed(ranges)
    if repeated is not None:
        raise ValueError(f"seed {repeated} is given twice in '{text}': one seed is one sample, so it would be counted "
                         "twice; list each seed once")  # fmt: skip
    return seeds


def _first_repeated_seed(ranges: list[tuple[int, int]]) -> int | None:
    """The smallest seed that lies in two of the inclusive ranges, or None.

    Sorted by start, a range overlaps an earlier one exactly when it starts at or below the highest end so far, and
    the first such start is the smallest shared seed. Works on the ranges, not a set of up to 10^7 seeds.
    """
    highest = -1
    for lo, hi in sorted(ranges):
        if lo <= highest:
            return lo
        highest = max(highest, hi)
    return None


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
    To run the network in bf16 or compiled, pass a :class:`PreparedDenoiser`; the sampler state stays float64.
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
