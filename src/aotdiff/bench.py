"""Speed benchmarks (numbers, not assertions): training and sampling throughput of a preset on a device.

Synthetic data of the preset's shape is used, so the CIFAR-10 configurations can be measured without the dataset.
Numbers are only comparable within one run on one machine: report ratios, and absolute numbers with the machine.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

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
    preset: str
    device: str
    device_name: str
    batch: int
    precision: str
    params: int
    img_per_s: float
    ms_per_step: float
    steps: int
    torch: str = torch.__version__

    def row(self) -> str:
        return (
            f"| {self.preset} | {self.device_name} | {self.batch} | {self.precision} | {self.params:,} | "
            f"{self.img_per_s:,.1f} | {self.ms_per_step:,.1f} |"
        )


TABLE_HEADER = "| preset | device | batch | precision | parameters | img/s | ms/step |\n|---|---|---|---|---|---|---|"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def item_shape(cfg: TrainConfig) -> tuple[int, ...]:
    return PRESET_SHAPES.get(cfg.preset) or _DEFAULT_SHAPES.get(cfg.preset, (3, 32, 32))


def train_speed(
    cfg: TrainConfig, device: torch.device, *, steps: int = 10, warmup: int = 3, num_classes: int = 10
) -> SpeedResult:
    """img/s of full optimizer steps (forward, backward, Adam) at ``cfg.batch`` on one device, synthetic data."""
    shape = item_shape(cfg)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = cfg.precision == "tf32"
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    raw = build_raw_network(cfg, shape, num_classes)
    label_dim = num_classes if cfg.cond else 0
    net = Precond(raw, label_dim=label_dim).to(device).train()
    model = torch.compile(net) if cfg.compile else net
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    batch = cfg.batch_gpu or cfg.batch
    accum = max(cfg.batch // batch, 1)
    y = torch.rand((batch, *shape), device=device) * 2 - 1
    labels = torch.randint(num_classes, (batch,), device=device) if label_dim else None
    aug = torch.zeros(batch, AugmentPipe.label_dim, device=device) if cfg.augment > 0 else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for _ in range(accum):
            with autocast:
                loss = edm_loss(model, y, torch.randn_like(y), sample_sigma(batch, device=device), labels, aug)
                (loss.sum() / (batch * accum)).backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    return SpeedResult(
        cfg.preset, str(device), device_name(device), batch * accum, cfg.precision, count_parameters(raw),
        batch * accum / dt, 1e3 * dt, steps,
    )  # fmt: skip


@torch.no_grad()
def sample_speed(cfg: TrainConfig, device: torch.device, *, batch: int = 64, num_steps: int = 18) -> dict[str, Any]:
    """Images per second of Heun sampling (2N-1 evaluations) with an untrained network of the preset."""
    shape = item_shape(cfg)
    torch.manual_seed(0)
    net = Precond(build_raw_network(cfg, shape, 0)).to(device).eval()
    latents = torch.randn((batch, *shape), device=device)
    sample(net, latents, karras_sigmas(2))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    _, nfe = sample(net, latents, karras_sigmas(num_steps))
    _sync(device)
    dt = time.perf_counter() - t0
    return {"preset": cfg.preset, "device": device_name(device), "batch": batch, "nfe": nfe, "img_per_s": batch / dt,
            "ms_per_eval": 1e3 * dt / nfe}  # fmt: skip


def as_dict(r: SpeedResult) -> dict[str, Any]:
    return asdict(r)
