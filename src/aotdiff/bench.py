"""Speed benchmarks (numbers, not assertions): training and sampling throughput of a preset on a device.

Synthetic data of the preset's shape is used, so the CIFAR-10 configurations can be measured without the dataset.
Numbers are only comparable within one run on one machine: report ratios, and absolute numbers with the machine.
"""

from __future__ import annotations

import dataclasses
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from aotdiff.data import AugmentPipe
from aotdiff.diffusion import Precond, edm_loss, sample_sigma
from aotdiff.nets import count_parameters
from aotdiff.sampling import karras_sigmas, sample
from aotdiff.train.config import PRESET_SHAPES, TrainConfig
from aotdiff.train.loop import build_raw_network

# Shapes of the built-in data, for presets that adapt to their data.
_DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {"digits": (1, 8, 8), "toy2d": (2,), "small": (3, 32, 32)}


@dataclass
class SpeedResult:
    """One ``aotdiff bench train`` measurement: the trainer's img/s and a bare loop's, measured in one run."""

    preset: str
    device: str
    device_name: str
    batch: int
    precision: str
    params: int
    img_per_s: float  # aotdiff's Trainer.step: data, augmentation, coupling, loss, backward, guard, Adam, EMA
    bare_img_per_s: float  # the same network, batch and precision: forward + backward + Adam, nothing else
    trainer_efficiency: float  # img_per_s / bare_img_per_s
    ms_per_step: float
    steps: int
    coupling: str = "independent"
    compile: bool = False
    threads: int = 0
    torch: str = torch.__version__
    # forward + backward FLOPs of one image (torch.utils.flop_counter: convolutions and matmuls, 2 per multiply-add)
    gflop_per_img: float = 0.0
    bare_gflop_per_s: float = 0.0  # bare_img_per_s * gflop_per_img: compare with the device's matmul throughput

    def row(self) -> str:
        return (
            f"| {self.preset} | {self.device_name} | {self.batch} | {self.precision} | {self.coupling} | "
            f"{self.params:,} | {self.img_per_s:,.1f} | {self.bare_img_per_s:,.1f} | {self.trainer_efficiency:.3f} |"
        )


TABLE_HEADER = (
    "| preset | device | batch | precision | coupling | parameters | img/s | bare img/s | efficiency |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def item_shape(cfg: TrainConfig) -> tuple[int, ...]:
    return PRESET_SHAPES.get(cfg.preset) or _DEFAULT_SHAPES.get(cfg.preset, (3, 32, 32))


def synthetic_dataset(shape: tuple[int, ...], num_classes: int, size: int = 4096, seed: int = 0) -> Any:
    """Random data of ``shape`` (uint8 images, or 2-D points) with labels, for speed measurements only."""
    from aotdiff.data import ImageDataset, load_toy

    rng = np.random.default_rng(seed)
    if len(shape) == 1:
        return load_toy("8gaussians", size, seed)
    images = rng.integers(0, 256, size=(size, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=size) if num_classes else None
    return ImageDataset(images, labels, num_classes, "synthetic")


class BareLoop:
    """The yardstick of the trainer's overhead: the same network (same initialisation), batch and precision, with
    fixed tensors already on the device: per step only forward, backward and Adam."""

    def __init__(self, cfg: TrainConfig, shape: tuple[int, ...], num_classes: int, device: torch.device) -> None:
        from aotdiff.train.loop import make_adam, precision_context, resolve_precision, use_channels_last

        torch.manual_seed(cfg.seed)
        raw = build_raw_network(cfg, shape, num_classes)
        self.label_dim = num_classes if cfg.cond else 0
        fmt = torch.channels_last if use_channels_last(cfg, device) else torch.contiguous_format
        net = Precond(raw, label_dim=self.label_dim).to(device).train()
        net.to(memory_format=fmt)  # type: ignore[call-overload]  # (torch's stubs lack the overload)
        self.params = count_parameters(raw)
        self.net = net
        self.model = torch.compile(net) if cfg.compile else net
        self.opt = make_adam(net.parameters(), cfg.lr)
        self.precision = resolve_precision(cfg.precision, device)
        self.autocast = precision_context(self.precision, device)
        self.batch, self.accum = cfg.batch_gpu or cfg.batch, max(cfg.batch // (cfg.batch_gpu or cfg.batch), 1)
        gen = torch.Generator(device=device).manual_seed(0)
        b = self.batch
        self.y = torch.rand((b, *shape), device=device, generator=gen) * 2 - 1
        self.noise = torch.randn((b, *shape), device=device, generator=gen)
        self.sigma = sample_sigma(b, generator=gen, device=device)
        self.labels = torch.randint(num_classes, (b,), device=device, generator=gen) if self.label_dim else None
        self.aug = torch.zeros(b, AugmentPipe.label_dim, device=device) if cfg.augment > 0 else None

    def gflop_per_img(self) -> float:
        """Forward + backward FLOPs per image of one step, counted on the eager network (no optimizer step: the
        parameters are unchanged, and the next step clears the gradients)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter, self.autocast():
            loss = edm_loss(self.net, self.y, self.noise, self.sigma, self.labels, self.aug)
            loss.sum().backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops() / self.batch / 1e9

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        for _ in range(self.accum):
            with self.autocast():
                loss = edm_loss(self.model, self.y, self.noise, self.sigma, self.labels, self.aug)
                (loss.sum() / (self.batch * self.accum)).backward()
        self.opt.step()


def train_speed(
    cfg: TrainConfig,
    device: torch.device,
    *,
    steps: int = 10,
    warmup: int = 3,
    rounds: int = 3,
    num_classes: int = 10,
    dataset: Any = None,
) -> SpeedResult:
    """img/s of ``aotdiff``'s training step and of a bare loop on one device, interleaved in ``rounds`` rounds of
    ``steps`` steps each, so that a change in the machine's load touches both alike.

    The trainer runs in a temporary run directory on ``dataset`` (default: random data of the preset's shape; the
    preset's own data when it is built in, e.g. digits), with everything a real step does: data order and
    augmentation, the noise coupling (AOT pools solved in the background), sigma, loss, backward, non-finite guard,
    Adam and EMA; ticks and checkpoints are left out (they are periodic, not per step).
    """
    from aotdiff.train.loop import Trainer

    shape = item_shape(cfg)
    if dataset is None:
        dataset = synthetic_dataset(shape, num_classes if cfg.cond else 0)
    classes = getattr(dataset, "num_classes", 0)
    bare = BareLoop(cfg, tuple(dataset.shape), classes, device)
    gflop = bare.gflop_per_img()
    run_cfg = dataclasses.replace(cfg, device=str(device), tick_kimg=1e9, snapshot_kimg=1e9, grid_seeds=0)
    with tempfile.TemporaryDirectory(prefix="aotdiff-bench-") as tmp:
        trainer = Trainer(run_cfg, tmp, dataset=dataset, progress=False, log=lambda s: None)
        try:
            for _ in range(warmup):
                trainer.step()
                bare.step()
            _sync(device)
            t_trainer = t_bare = 0.0
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(steps):
                    trainer.step()
                _sync(device)
                t1 = time.perf_counter()
                for _ in range(steps):
                    bare.step()
                _sync(device)
                t_trainer, t_bare = t_trainer + t1 - t0, t_bare + time.perf_counter() - t1
            trainer._flush_losses()
        finally:
            trainer.close()
    n_steps = steps * rounds
    img, img_bare = cfg.batch * n_steps / t_trainer, bare.batch * bare.accum * n_steps / t_bare
    return SpeedResult(
        cfg.preset, str(device), device_name(device), cfg.batch, bare.precision, bare.params, img, img_bare,
        img / img_bare, 1e3 * t_trainer / n_steps, n_steps, cfg.coupling, cfg.compile, torch.get_num_threads(),
        gflop_per_img=gflop, bare_gflop_per_s=img_bare * gflop,
    )  # fmt: skip


@torch.no_grad()
def sample_speed(
    cfg: TrainConfig,
    device: torch.device,
    *,
    batch: int = 64,
    num_steps: int = 18,
    precision: str = "auto",
    compile: bool = False,
) -> dict[str, Any]:
    """Images per second of Heun sampling (2N-1 evaluations) with an untrained network of the preset, the network
    evaluated at ``precision`` (and compiled if asked; see :class:`aotdiff.generate.PreparedDenoiser`)."""
    from aotdiff.generate import PreparedDenoiser

    shape = item_shape(cfg)
    torch.manual_seed(0)
    net = Precond(build_raw_network(cfg, shape, 0)).to(device).eval()
    denoiser = PreparedDenoiser(net, precision=precision, compile=compile, device=device)
    latents = torch.randn((batch, *shape), device=device, dtype=torch.float64)
    t0 = time.perf_counter()
    sample(denoiser, latents, karras_sigmas(2))  # warm-up (and compilation)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, nfe = sample(denoiser, latents, karras_sigmas(num_steps))
    _sync(device)
    dt = time.perf_counter() - t0
    return {"preset": cfg.preset, "device": device_name(device), "batch": batch, "nfe": nfe, "img_per_s": batch / dt,
            "ms_per_eval": 1e3 * dt / nfe, **denoiser.describe(), "warmup_s": warmup_s}  # fmt: skip


def as_dict(r: SpeedResult) -> dict[str, Any]:
    return asdict(r)
