"""The training loop: EDM training with the noise supplied by a coupler (independent or AOT).

One optimizer step = ``batch`` images over all devices = ``accum`` forward/backward passes of ``batch_gpu`` images per
device. Time is counted in images (kimg). Per pass: a slice of the current pool (images already augmented and paired
with their noise by :class:`aotdiff.coupling.PairedBatchStream`) -> sigma ~ logN(P_mean, P_std) -> EDM loss ->
backward. Then: linear learning-rate warm-up, non-finite gradients zeroed (EDM's nan_to_num; counted), Adam, EMA.

Reproducibility: all randomness except dropout is counter-based (:mod:`aotdiff.train.randomness`), dropout uses the
global torch generators whose states are checkpointed, so an interrupted-and-resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from aotdiff.coupling import PairedBatchStream, PoolDraw, make_coupler
from aotdiff.data import AugmentPipe, ImageDataset, ToyDataset, load_dataset
from aotdiff.diffusion import Precond, edm_loss, sample_sigma
from aotdiff.generate import SamplerSettings, generate
from aotdiff.nets import build_network, count_parameters
from aotdiff.train import checkpoint as ckpt_io
from aotdiff.train import distributed as dist_util
from aotdiff.train.config import PRESET_SHAPES, TrainConfig, config_diff, validate
from aotdiff.train.ema import EMA, ema_beta
from aotdiff.train.randomness import EpochOrder, global_unit, keyed_generator
from aotdiff.viz import save_image_grid, save_points_plot

CHECKPOINT_FORMAT = "aotdiff/1"


class ConfigMismatchError(ValueError):
    """The run directory holds a run with a different configuration."""


# ------------------------------------------------------------------------------------------------ building blocks
def load_training_data(cfg: TrainConfig) -> ImageDataset | ToyDataset:
    """The dataset, checked against what the preset and the network need."""
    data = load_dataset(cfg.data, toy_size=cfg.data_size, toy_seed=cfg.seed)
    is_toy = isinstance(data, ToyDataset)
    if cfg.arch == "mlp" and not is_toy:
        raise ValueError(f"--arch mlp is for 2-D point data (toy:...), but --data {cfg.data} holds images")
    if cfg.arch != "mlp" and is_toy:
        raise ValueError(f"--data {cfg.data} is 2-D point data: use --preset toy2d (or --arch mlp)")
    expected = PRESET_SHAPES.get(cfg.preset)
    if expected is not None and tuple(data.shape) != expected:
        c, h, w = (*data.shape, 0, 0)[:3]
        raise ValueError(
            f"--data {cfg.data}: preset '{cfg.preset}' expects {expected[1]}x{expected[2]} images with "
            f"{expected[0]} channels, got {h}x{w} with {c}; convert the data or use --preset small"
        )
    if isinstance(data, ImageDataset) and cfg.arch == "small" and not 8 <= data.resolution <= 64:
        raise ValueError(f"--data {cfg.data}: the 'small' network handles 8 to 64 pixels, got {data.resolution}")
    if cfg.cond and data.num_classes == 0:
        raise ValueError(f"--cond needs class labels, but --data {cfg.data} has none (add dataset.json labels)")
    return data


def build_raw_network(cfg: TrainConfig, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    label_dim = num_classes if cfg.cond else 0
    augment_dim = AugmentPipe.label_dim if cfg.augment > 0 else 0
    if cfg.arch == "mlp":
        return build_network(
            "mlp", in_dim=shape[0], label_dim=label_dim, hidden_dim=cfg.model_channels,
            num_blocks=cfg.num_blocks, dropout=cfg.dropout,
        )  # fmt: skip
    common: dict[str, Any] = dict(
        img_resolution=shape[1], in_channels=shape[0], out_channels=shape[0], label_dim=label_dim,
        augment_dim=augment_dim, model_channels=cfg.model_channels, num_blocks=cfg.num_blocks, dropout=cfg.dropout,
    )  # fmt: skip
    if cfg.arch == "small":
        if cfg.channel_mult:  # empty = adapt the levels and attention to the data's resolution
            common.update(channel_mult=tuple(cfg.channel_mult), attn_resolutions=tuple(cfg.attn_resolutions))
        return build_network("small", **common)
    return build_network(
        cfg.arch, channel_mult=tuple(cfg.channel_mult), attn_resolutions=tuple(cfg.attn_resolutions), **common
    )


class TrainingSource:
    """Draws units of training data for the pool stream: images, labels, augmentation and noise.

    Draw number d of this rank is global unit g = global_unit(d); it holds data-stream positions [g n, (g+1) n) and
    takes its augmentation and noise from generators keyed by g, so every rank draws its own shard and a one-process
    run with accumulation draws exactly what a multi-process run draws.
    """

    def __init__(
        self,
        data: ImageDataset | ToyDataset,
        *,
        seed: int,
        rank: int,
        world_size: int,
        accum: int,
        device: torch.device,
        use_labels: bool,
        augment: AugmentPipe | None,
    ):
        self.data, self.seed, self.device = data, seed, device
        self.rank, self.world_size, self.accum = rank, world_size, accum
        self.use_labels, self.augment = use_labels, augment
        self.order = EpochOrder(len(data), seed)
        self.draws = 0

    def draw(self, n: int) -> PoolDraw:
        g = global_unit(self.draws, self.rank, self.world_size, self.accum)
        self.draws += 1
        images, labels = self.data.batch(self.order.indices(g * n, n))
        images = images.to(self.device)
        augment_labels = None
        if self.augment is not None:
            images, augment_labels = self.augment(images, keyed_generator(self.seed, "augment", g, self.device))
        noise = torch.randn(
            images.shape, generator=keyed_generator(self.seed, "noise", g, self.device), device=self.device
        )
        labels = labels.to(self.device) if (self.use_labels and labels is not None) else None
        return PoolDraw(images=images, noise=noise, labels=labels, augment_labels=augment_labels)

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])


def resolve_batch(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(batch per device per pass, accumulation rounds), refusing combinations that do not divide."""
    if cfg.batch % world_size:
        raise ValueError(
            f"--batch {cfg.batch} is not divisible by the {world_size} devices; use a multiple of {world_size}"
        )
    per_device = cfg.batch // world_size
    batch_gpu = cfg.batch_gpu or per_device
    if batch_gpu > per_device or per_device % batch_gpu:
        raise ValueError(
            f"--batch-gpu {batch_gpu} must divide the per-device batch {per_device} (= --batch {cfg.batch} / "
            f"{world_size} devices)"
        )
    return batch_gpu, per_device // batch_gpu


def sanitize_gradients(module: nn.Module) -> bool:
    """EDM's guard: NaN -> 0, +-inf -> +-1e5 in every gradient. Returns whether any gradient was non-finite.

    One device synchronisation for the whole check (not one per parameter), and no rewriting when all is finite.
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all()):
        return False
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
    return True


def classwise(cfg: TrainConfig) -> bool:
    return cfg.aot_classwise == "yes" or (cfg.aot_classwise == "auto" and cfg.cond)


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class TrainResult:
    run_dir: Path
    nimg: int
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss of each step run in this invocation
    interrupted: bool = False


class _StopRequest:
    """Turns SIGINT / SIGTERM into a polite request: finish the step, save a checkpoint, exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if sys.platform != "win32" and _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint, then exiting", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def describe(cfg: TrainConfig) -> tuple[str, int]:
    """The resolved configuration as text, and the network's parameter count (builds the network, no training)."""
    data = load_training_data(cfg)
    net = build_raw_network(cfg, tuple(data.shape), data.num_classes)
    n_params = count_parameters(net)
    text = cfg.to_json() + f"\n\nnetwork: {type(net).__name__} {json.dumps(getattr(net, 'config', {}))}"
    text += f"\nparameters: {n_params:,}\ndataset: {cfg.data} ({len(data)} items, shape {tuple(data.shape)}"
    text += f", {data.num_classes} classes)"
    return text, n_params


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    max_steps: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train (or resume) the run in ``run_dir``. Rerunning with the same configuration resumes.

    ``max_steps`` stops after that many optimizer steps of this invocation, with a checkpoint (used by tests to
    emulate an interruption). SIGINT / SIGTERM do the same.
    """
    validate(cfg)
    if cfg.threads:
        # Spinning OpenMP threads that share cores with other jobs can slow small models down tens of times.
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    info, device = dist_util.init(cfg.device)
    say = log or (lambda s: tqdm.write(s, file=sys.stderr))
    if not info.is_main:
        say = lambda s: None  # noqa: E731
    try:
        return _train(cfg, run_dir, info, device, force, progress and info.is_main, max_steps, say)
    finally:
        dist_util.shutdown(info)


def _check_run_dir(cfg: TrainConfig, run_dir: Path, force: bool) -> None:
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return
    try:
        old = json.loads(config_path.read_text())
    except ValueError as e:
        raise ConfigMismatchError(f"{config_path} is unreadable ({e}); use another --out or fix the file") from e
    diff = config_diff(old, cfg.to_dict())
    if diff and not force:
        raise ConfigMismatchError(
            f"{run_dir} holds a run with a different configuration:\n  " + "\n  ".join(diff) + "\nUse another "
            "--out for a new run, or --force to resume it with the new settings."
        )


def _write_json_atomic(path: Path, payload: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(payload)
    os.replace(tmp, path)


def _precision_context(cfg: TrainConfig, device: torch.device) -> Any:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = cfg.precision == "tf32"
        torch.backends.cudnn.benchmark = True
    if cfg.precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    info: dist_util.DistInfo,
    device: torch.device,
    force: bool,
    progress: bool,
    max_steps: int | None,
    say: Callable[[str], None],
) -> TrainResult:
    batch_gpu, accum = resolve_batch(cfg, info.world_size)
    _check_run_dir(cfg, run_dir, force)
    data = load_training_data(cfg)
    shape = tuple(data.shape)
    torch.manual_seed(cfg.seed + info.rank)  # weights are broadcast from rank 0 by DDP; this seeds dropout

    # Network, EMA, optimizer. Weights are initialised from the run seed, identically on every rank.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        raw = build_raw_network(cfg, shape, data.num_classes)
    label_dim = data.num_classes if cfg.cond else 0
    net = Precond(raw, label_dim=label_dim).to(device).train()
    ema = EMA(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_json(),
        "network": json.dumps(getattr(raw, "config", {})),
        "shape": json.dumps(list(shape)),
        "label_dim": str(label_dim),
        "dataset": data.name if isinstance(data, ImageDataset) else cfg.data,
    }

    # Data -> augmentation -> pools paired by the coupler.
    augment = AugmentPipe(p=cfg.augment) if cfg.augment > 0 else None
    source = TrainingSource(
        data, seed=cfg.seed, rank=info.rank, world_size=info.world_size, accum=accum, device=device,
        use_labels=cfg.cond, augment=augment,
    )  # fmt: skip
    coupler = make_coupler(
        cfg.coupling, cost=cfg.aot_cost, backend=None if cfg.aot_backend == "auto" else cfg.aot_backend,
        classwise=classwise(cfg),
    )  # fmt: skip
    stream = PairedBatchStream(
        source, coupler, batch_gpu, cfg.aot_pool if cfg.coupling == "aot" else None,
        pools=cfg.aot_pools, scope=cfg.aot_scope, worker=cfg.aot_prefetch,
    )  # fmt: skip

    # Resume.
    nimg, step, nonfinite_steps, elapsed = 0, 0, 0, 0.0
    latest = ckpt_io.load_latest(run_dir, device="cpu")
    if latest is not None:
        net.load_state_dict(latest.model)
        ema.module.load_state_dict(latest.ema)
        st = latest.state
        optimizer.load_state_dict(st["optimizer"])
        nimg, step = int(st["nimg"]), int(st["step"])
        nonfinite_steps, elapsed = int(st["nonfinite_steps"]), float(st["elapsed_s"])
        streams = st["stream"]  # one state per rank (each rank consumes its own pools)
        if len(streams) != info.world_size:
            raise ValueError(
                f"{latest.path} was written by {len(streams)} process(es) but this run has {info.world_size}; "
                "resume with the same number of processes"
            )
        stream.load_state_dict(streams[info.rank])
        torch.set_rng_state(st["rng_cpu"][info.rank])
        if device.type == "cuda" and st.get("rng_cuda"):
            torch.cuda.set_rng_state(st["rng_cuda"][info.rank], device)
        say(f"resuming {run_dir} from {latest.path.name} ({nimg / 1000:.1f} kimg)")
    ddp_net: nn.Module = net
    if info.enabled:
        ddp_net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    forward_net = torch.compile(ddp_net) if cfg.compile else ddp_net
    autocast = _precision_context(cfg, device)

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(run_dir / "config.json", cfg.to_json() + "\n")
    writer = _tensorboard(run_dir) if info.is_main else None

    total_nimg = int(round(cfg.duration_kimg * 1000))
    tick_nimg = max(int(round(cfg.tick_kimg * 1000)), 1)
    snap_nimg = max(int(round(cfg.snapshot_kimg * 1000)), 1)
    result = TrainResult(run_dir, nimg, step)

    def save(reason: str) -> None:
        state = {
            "nimg": nimg, "step": step, "nonfinite_steps": nonfinite_steps, "elapsed_s": elapsed,
            "optimizer": optimizer.state_dict(), "stream": _gather_object(stream.state_dict(), info),
            "rng_cpu": _gather_object(torch.get_rng_state(), info),
            "rng_cuda": _gather_object(torch.cuda.get_rng_state(device), info) if device.type == "cuda" else [],
        }  # fmt: skip
        if info.is_main:
            try:
                path = ckpt_io.save_checkpoint(
                    run_dir, nimg, model=net.state_dict(), ema=ema.module.state_dict(), state=state,
                    metadata={**metadata, "nimg": str(nimg)}, keep=cfg.keep_checkpoints,
                )  # fmt: skip
                say(f"{reason}: checkpoint {path}")
            except ckpt_io.CheckpointError as e:
                warnings.warn(str(e), stacklevel=2)
        dist_util.barrier(info)

    bar = tqdm(
        total=round(cfg.duration_kimg, 3), initial=round(nimg / 1000, 3), unit="kimg", disable=not progress,
        dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} kimg [{elapsed}<{remaining}{postfix}]",
    )  # fmt: skip
    tick_losses: list[float] = []
    tick_start_nimg, tick_start_time = nimg, time.perf_counter()
    tick_wait_ms = 0.0
    tick_ot: list[Any] = []
    steps_this_run = 0
    stopper = _StopRequest()
    with stopper:
        while nimg < total_nimg:
            # ---- one optimizer step: accum passes of batch_gpu images on every device
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device, dtype=torch.float64)
            for round_ in range(accum):
                t_wait = time.perf_counter()
                b = stream.next()
                tick_wait_ms += 1e3 * (time.perf_counter() - t_wait) if b.step_in_pool == 0 else 0.0
                if b.step_in_pool == 0:
                    tick_ot.append(b.stats)
                unit = global_unit(step * accum + round_, info.rank, info.world_size, accum)
                sigma = sample_sigma(
                    batch_gpu, generator=keyed_generator(cfg.seed, "sigma", unit, device), device=device
                )
                sync = nullcontext() if (round_ == accum - 1 or not info.enabled) else ddp_net.no_sync()  # type: ignore[operator]
                with sync, autocast():
                    loss = edm_loss(forward_net, b.images, b.noise, sigma, b.labels, b.augment_labels)
                    # EDM/AOT reduction: sum over pixels, mean over the per-device batch of the whole step.
                    (loss.sum() / (batch_gpu * accum)).backward()
                step_loss += loss.detach().double().mean() / accum
            # ---- learning-rate warm-up, non-finite gradients, Adam, EMA
            lr = cfg.lr * min(nimg / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            nonfinite_steps += int(sanitize_gradients(net))
            optimizer.step()
            nimg += cfg.batch
            step += 1
            steps_this_run += 1
            ema.update(net, ema_beta(cfg.batch, nimg, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio))
            mean_loss = float(dist_util.all_reduce_mean(step_loss, info))
            if not math.isfinite(mean_loss):
                say(f"warning: non-finite loss at step {step} ({nimg / 1000:.1f} kimg)")
            tick_losses.append(mean_loss)
            result.losses.append(mean_loss)
            bar.update(round(nimg / 1000 - bar.n, 3))

            # ---- ticks, snapshots, stop requests
            done = nimg >= total_nimg
            stop = dist_util.any_true(stopper.requested or (max_steps is not None and steps_this_run >= max_steps),
                                      info, device)  # fmt: skip
            if nimg // tick_nimg != (nimg - cfg.batch) // tick_nimg or done or stop:
                now = time.perf_counter()
                dt = now - tick_start_time
                elapsed += dt
                img_per_s = (nimg - tick_start_nimg) / max(dt, 1e-9)
                line = {
                    "kimg": round(nimg / 1000, 3), "step": step, "loss": sum(tick_losses) / len(tick_losses), "lr": lr,
                    "img_per_s": round(img_per_s, 2), "sec_per_kimg": round(1000 / max(img_per_s, 1e-9), 3),
                    "nonfinite_grad_steps": nonfinite_steps, "time_s": round(elapsed, 2),
                }  # fmt: skip
                line.update(_ot_fields(tick_ot, tick_wait_ms, cfg))
                if info.is_main:
                    with open(run_dir / "log.jsonl", "a") as f:
                        f.write(json.dumps(line) + "\n")
                    if writer is not None:
                        for k, v in line.items():
                            if k != "kimg" and isinstance(v, int | float):
                                writer.add_scalar(k, v, nimg)
                bar.set_postfix_str(f"loss {line['loss']:.4f}, {img_per_s:.0f} img/s", refresh=True)
                tick_losses, tick_ot, tick_wait_ms = [], [], 0.0
                tick_start_nimg, tick_start_time = nimg, time.perf_counter()
            if nimg // snap_nimg != (nimg - cfg.batch) // snap_nimg or done or stop:
                save("finished" if done else "stopped" if stop else "snapshot")
                if info.is_main:
                    _snapshot_grid(ema.module, cfg, shape, label_dim, run_dir / "samples" / f"{nimg:010d}.png", device)
                tick_start_time = time.perf_counter()  # do not count saving and sampling as training time
            if stop:
                result.interrupted = not done
                break
    bar.close()
    stream.close()
    if writer is not None:
        writer.close()
    result.nimg, result.steps = nimg, step
    return result


def _gather_object(state: Any, info: dist_util.DistInfo) -> list[Any]:
    """Every rank's copy of a per-rank state (dropout generators, pool streams), gathered for the checkpoint."""
    if not info.enabled:
        return [state]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, state)
    return out


def _ot_fields(pools: list[Any], wait_ms: float, cfg: TrainConfig) -> dict[str, float]:
    """Pairing statistics of the pools started during a tick (AOT runs only)."""
    if cfg.coupling != "aot":
        return {}
    if not pools:
        return {"ot_wait_ms": round(wait_ms, 3)}
    n = len(pools)
    return {
        "ot_cost_ratio": round(sum(p.coupling.ratio for p in pools) / n, 5),
        "ot_ms": round(sum(p.coupling.solve_ms + p.coupling.cost_ms for p in pools) / n, 3),
        "ot_wait_ms": round(wait_ms / n, 3),
        "ot_pools": n,
    }


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional dependency: pip install aotdiff[tensorboard]
        return None
    return SummaryWriter(str(run_dir / "tb"))


@torch.no_grad()
def _snapshot_grid(
    model: nn.Module, cfg: TrainConfig, shape: tuple[int, ...], label_dim: int, path: Path, device: torch.device
) -> None:
    """Samples from fixed seeds 0..grid_seeds-1 with the EMA weights: a PNG grid (images) or scatter plot (2-D)."""
    settings = SamplerSettings(steps=cfg.grid_steps)
    batches = list(
        generate(
            model, range(cfg.grid_seeds), shape, settings=settings, num_classes=label_dim, device=device,
            batch_size=min(cfg.grid_seeds, 500),
        )
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(shape) == 3:
        save_image_grid(torch.cat([b.images for b in batches]), path)
    else:
        save_points_plot(torch.cat([b.raw for b in batches]), path, title=f"{cfg.data}: {path.stem} images")
