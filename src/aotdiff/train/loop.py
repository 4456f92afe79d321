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
import threading
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
from aotdiff.train import rundir
from aotdiff.train.config import (
    PAPER_DEVICES,
    PRESET_CLASSES,
    PRESET_SHAPES,
    TrainConfig,
    config_diff,
    validate,
)
from aotdiff.train.ema import EMA, ema_beta
from aotdiff.train.randomness import EpochOrder, global_unit, keyed_generator
from aotdiff.viz import save_image_grid, save_points_plot

CHECKPOINT_FORMAT = "aotdiff/1"
MAX_CLASSES = 100_000  # one-hot class conditioning: a label of 10^12 would mean a 10^12-wide input layer


class ConfigMismatchError(rundir.RunDirectoryError):
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
    if cfg.cond and data.num_classes > MAX_CLASSES:
        raise ValueError(
            f"--cond: --data {cfg.data} has labels up to {data.num_classes - 1:,}, i.e. {data.num_classes:,} classes "
            f"for a one-hot conditioning (at most {MAX_CLASSES:,} supported); labels must be class indices 0..K-1: "
            "renumber them"
        )
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


# ------------------------------------------------------------------------------------------------ schedules
def learning_rate(cfg: TrainConfig, nimg: int) -> float:
    """EDM's linear warm-up: lr x min(images seen before this step / ramp images, 1), so the first step has lr 0.

    ``--lr-rampup-kimg 0`` means no warm-up at all (EDM's formula would still give the first step lr 0)."""
    if cfg.lr_rampup_kimg <= 0:
        return cfg.lr
    return cfg.lr * min(nimg / (cfg.lr_rampup_kimg * 1000), 1.0)


def resolve_pools(cfg: TrainConfig, world_size: int) -> tuple[int, str]:
    """Pools per device (``--aot-pools``; 0 = the preset's recipe) and a sentence saying how they map to the paper.

    The CIFAR-10 recipe is 4 GPUs x one pool of P each, every optimizer step taking 64 rows of each pool. On K devices
    (K dividing 4) every device emulates 4 / K of those pools, so the global step still sees 4 independent pools.
    """
    recipe = PAPER_DEVICES.get(cfg.preset)
    if cfg.aot_pools >= 1 or cfg.coupling != "aot":
        return max(cfg.aot_pools, 1), ""
    if recipe is None:
        return 1, ""
    if recipe % world_size == 0:
        pools = recipe // world_size
        slice_rows = (cfg.batch_gpu or cfg.batch // world_size) // pools
        note = (
            f"AOT pools: the paper's {recipe} pools of {cfg.aot_pool} per step = {world_size} device(s) x {pools} "
            f"(--aot-pools {pools}), each consumed in slices of {slice_rows} rows"
        )
        if slice_rows * recipe != cfg.batch:
            note += f" (the paper's slices hold {cfg.batch // recipe}: --batch-gpu changes that)"
        return pools, note
    return 1, (
        f"AOT pools: {world_size} devices give {world_size} pools of {cfg.aot_pool} per step, the paper used "
        f"{recipe}; the pairing differs from the recipe (use a device count dividing {recipe})"
    )


# ------------------------------------------------------------------------------------------------ the run
class CheckpointWriteError(ckpt_io.CheckpointError):
    """A checkpoint could not be written, so the run stopped rather than go on (or report success) without it."""


@dataclass
class TrainResult:
    run_dir: Path
    nimg: int
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss of each step run in this invocation
    interrupted: bool = False
    signal: int | None = None  # the signal that stopped the run (SIGINT / SIGTERM), if any


class _StopRequest:
    """Turns SIGINT / SIGTERM into a polite request: finish the step, save a checkpoint, exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> _StopRequest:
        if sys.platform != "win32" and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint, then exiting", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def describe(cfg: TrainConfig) -> tuple[str, int]:
    """The resolved configuration as text, and the network's parameter count (builds the network, no training).

    A dataset preset whose data is not given yet is described from the shape the preset expects.
    """
    if cfg.data:
        data = load_training_data(cfg)
        shape, num_classes = tuple(data.shape), data.num_classes
        data_text = f"{cfg.data} ({len(data)} items, shape {shape}, {num_classes} classes)"
    elif PRESET_SHAPES.get(cfg.preset):
        shape, num_classes = PRESET_SHAPES[cfg.preset], PRESET_CLASSES.get(cfg.preset, 0)  # type: ignore[assignment]
        data_text = f"not given yet: pass --data PATH (the preset expects shape {shape}, {num_classes} classes)"
    else:
        raise ValueError(f"preset '{cfg.preset}' needs a dataset: pass --data PATH")
    net = build_raw_network(cfg, shape, num_classes)
    n_params = count_parameters(net)
    text = cfg.to_json() + f"\n\nnetwork: {type(net).__name__} {json.dumps(getattr(net, 'config', {}))}"
    text += f"\nparameters: {n_params:,}\ndataset: {data_text}"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _, note = resolve_pools(cfg, world)
    if note:
        text += f"\n{note}"
    return text, n_params


class Trainer:
    """One training run in one run directory, as an object: build it, then :meth:`run` (or drive it step by step).

    Construction does the setup: the run directory (lock, leftovers, configuration), data, network, EMA, optimizer,
    the pool stream, and the resume from the newest usable checkpoint. Then

    * :meth:`step` runs one optimizer step (``accum`` passes per device) and returns its mean loss;
    * :meth:`tick` writes one ``log.jsonl`` line (and TensorBoard scalars) for the steps since the last tick;
    * :meth:`snapshot` writes a checkpoint and a sample grid;
    * :meth:`run` loops until the duration is reached, a stop is requested or ``max_steps`` steps were run.

    The training-loop skeleton (lock, resume, ticks, checkpoints, stop requests) is meant to be reused by other
    trainers of this package (e.g. the discriminator of Discriminator Guidance).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        force: bool = False,
        restart: bool = False,
        progress: bool = True,
        keep_going: bool = False,
        log: Callable[[str], None] | None = None,
    ):
        validate(cfg)
        self.cfg, self.run_dir, self.keep_going = cfg, Path(run_dir), keep_going
        if cfg.threads:
            # Spinning OpenMP threads that share cores with other jobs can slow small models down tens of times.
            torch.set_num_threads(cfg.threads)
        self.info, self.device = dist_util.init(cfg.device)
        self.say: Callable[[str], None] = log or (lambda s: tqdm.write(s, file=sys.stderr))
        if not self.info.is_main:
            self.say = lambda s: None
        self.progress = progress and self.info.is_main
        self._lock: rundir.RunLock | None = None
        self._stream: PairedBatchStream | None = None
        self._writer: Any = None
        try:
            self._setup(force, restart)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------------ setup
    def _setup(self, force: bool, restart: bool) -> None:
        cfg, info, device, run_dir = self.cfg, self.info, self.device, self.run_dir
        self.batch_gpu, self.accum = resolve_batch(cfg, info.world_size)
        pools, pools_note = resolve_pools(cfg, info.world_size)
        if info.is_main:
            rundir.prepare(run_dir)
            self._lock = rundir.RunLock(run_dir).acquire()
            ckpt_io.remove_temporary(run_dir)  # debris of a killed save; safe now that we hold the lock
            if not restart:
                self._check_config(force)
        data = load_training_data(cfg)
        self.shape = tuple(data.shape)
        torch.manual_seed(cfg.seed + info.rank)  # weights are broadcast from rank 0 by DDP; this seeds dropout

        # Network, EMA, optimizer. Weights are initialised from the run seed, identically on every rank.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            raw = build_raw_network(cfg, self.shape, data.num_classes)
        self.label_dim = data.num_classes if cfg.cond else 0
        self.net = Precond(raw, label_dim=self.label_dim).to(device).train()
        self.ema = EMA(self.net)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        self.metadata = {
            "format": CHECKPOINT_FORMAT,
            "config": cfg.to_json(),
            "network": json.dumps(getattr(raw, "config", {})),
            "shape": json.dumps(list(self.shape)),
            "label_dim": str(self.label_dim),
            "dataset": data.name if isinstance(data, ImageDataset) else cfg.data,
        }

        # Data -> augmentation -> pools paired by the coupler.
        augment = AugmentPipe(p=cfg.augment) if cfg.augment > 0 else None
        source = TrainingSource(
            data, seed=cfg.seed, rank=info.rank, world_size=info.world_size, accum=self.accum, device=device,
            use_labels=cfg.cond, augment=augment,
        )  # fmt: skip
        coupler = make_coupler(
            cfg.coupling, cost=cfg.aot_cost, backend=None if cfg.aot_backend == "auto" else cfg.aot_backend,
            classwise=classwise(cfg),
        )  # fmt: skip
        self._stream = PairedBatchStream(
            source, coupler, self.batch_gpu, cfg.aot_pool if cfg.coupling == "aot" else None,
            pools=pools, scope=cfg.aot_scope, worker=cfg.aot_prefetch,
        )  # fmt: skip
        if pools_note:
            self.say(pools_note)

        # Counters, then resume (or a deliberate fresh start).
        self.nimg, self.steps, self.nonfinite_steps, self.elapsed = 0, 0, 0, 0.0
        self.losses: list[float] = []  # mean loss of each step of this invocation
        if restart and info.is_main:
            self._set_aside_previous_run()
        dist_util.barrier(info)
        latest = self._find_checkpoint()
        if latest is not None:
            self._load(latest)
            self.say(f"resuming {run_dir} from {latest.path.name} ({self.nimg / 1000:.1f} kimg)")
        elif cfg.init_from:
            self._init_from(cfg.init_from)
        self.ddp_net: nn.Module = self.net
        if info.enabled:
            self.ddp_net = DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.forward_net = torch.compile(self.ddp_net) if cfg.compile else self.ddp_net
        self.autocast = _precision_context(cfg, device)

        if info.is_main:
            rundir.write_json_atomic(run_dir / rundir.CONFIG_FILE, cfg.to_json() + "\n")
            self.log = rundir.JsonlLog(run_dir / rundir.LOG_FILE)
            dropped = self.log.truncate(self.nimg / 1000)
            if dropped:
                self.say(f"log.jsonl: dropped {dropped} line(s) written after the checkpoint being resumed")
            self._writer = _tensorboard(run_dir, purge_step=self.nimg + 1)

        self.total_nimg = int(round(cfg.duration_kimg * 1000))
        self.tick_nimg = max(int(round(cfg.tick_kimg * 1000)), 1)
        self.snap_nimg = max(int(round(cfg.snapshot_kimg * 1000)), 1)
        self._tick_losses: list[float] = []
        self._tick_ot: list[Any] = []
        self._tick_wait_ms = 0.0
        self._tick_start_nimg, self._tick_start_time = self.nimg, time.perf_counter()
        self.last_lr = learning_rate(cfg, self.nimg)

    def _check_config(self, force: bool) -> None:
        old = rundir.read_config(self.run_dir)
        if old is None:
            return
        diff = config_diff(old, self.cfg.to_dict())
        if diff and not force:
            raise ConfigMismatchError(
                f"{self.run_dir} holds a run with a different configuration:\n  " + "\n  ".join(diff) + "\nUse "
                "another --out for a new run, or --force to resume it with the new settings."
            )

    def _find_checkpoint(self) -> ckpt_io.Checkpoint | None:
        """The newest usable checkpoint; refuses to start over when checkpoints exist but none can be resumed."""
        latest, problems = ckpt_io.find_resumable(self.run_dir, device="cpu")
        for problem in problems:
            warnings.warn(f"skipping checkpoint {problem}", stacklevel=3)
        if latest is None and problems:
            raise rundir.RunDirectoryError(
                f"{self.run_dir} holds {len(problems)} checkpoint(s) but none can be resumed:\n  "
                + "\n  ".join(problems)
                + "\nNothing was changed. To continue: --init-from CHECKPOINT_FOLDER starts from those weights with "
                "a fresh optimizer (if its .safetensors are intact), or --restart trains from scratch and moves the "
                "old files aside (into RUN/abandoned-*)."
            )
        return latest

    def _set_aside_previous_run(self) -> None:
        names = ("checkpoints", "samples", "tb", rundir.LOG_FILE)
        present = [n for n in names if (self.run_dir / n).exists()]
        if not present:
            return
        aside = self.run_dir / time.strftime("abandoned-%Y%m%d-%H%M%S")
        aside.mkdir()
        for n in present:
            os.replace(self.run_dir / n, aside / n)
        self.say(f"--restart: moved {', '.join(present)} to {aside}; training from scratch")

    def _load(self, ckpt: ckpt_io.Checkpoint) -> None:
        st, info = ckpt.state, self.info
        self.net.load_state_dict(ckpt.model)
        self.ema.module.load_state_dict(ckpt.ema)
        self.optimizer.load_state_dict(st["optimizer"])
        self.nimg, self.steps = int(st["nimg"]), int(st["step"])
        self.nonfinite_steps, self.elapsed = int(st["nonfinite_steps"]), float(st["elapsed_s"])
        streams = st["stream"]  # one state per rank (each rank consumes its own pools)
        if len(streams) != info.world_size:
            raise ValueError(
                f"{ckpt.path} was written by {len(streams)} process(es) but this run has {info.world_size}; "
                "resume with the same number of processes"
            )
        self.stream.load_state_dict(streams[info.rank])
        torch.set_rng_state(st["rng_cpu"][info.rank])
        if self.device.type == "cuda" and st.get("rng_cuda"):
            torch.cuda.set_rng_state(st["rng_cuda"][info.rank], self.device)

    def _init_from(self, path: str) -> None:
        """Start from saved weights (model -> network, EMA -> EMA; one file -> both), counters and optimizer fresh."""
        source = Path(path)
        model_file = ckpt_io.resolve_weights(source, ema=False)
        ema_file = ckpt_io.resolve_weights(source, ema=True)
        for module, file in ((self.net, model_file), (self.ema.module, ema_file)):
            tensors, _ = ckpt_io.read_weights(file)
            try:
                module.load_state_dict(tensors)
            except RuntimeError as e:
                first = str(e).splitlines()[1:2] or [str(e)]
                raise ValueError(
                    f"--init-from {path}: {file} does not fit this run's network ({first[0].strip()}); "
                    "use weights of the same preset and network flags"
                ) from None
        self.say(f"initialised the weights from {model_file} and {ema_file} (optimizer and counters fresh)")

    @property
    def stream(self) -> PairedBatchStream:
        assert self._stream is not None
        return self._stream

    # ------------------------------------------------------------------------------------------------ steps
    def step(self) -> float:
        """One optimizer step: ``accum`` passes of ``batch_gpu`` images on every device, then lr, guard, Adam, EMA."""
        cfg, info, device = self.cfg, self.info, self.device
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device, dtype=torch.float64)
        for round_ in range(self.accum):
            t_wait = time.perf_counter()
            b = self.stream.next()
            if b.step_in_pool == 0:
                self._tick_wait_ms += 1e3 * (time.perf_counter() - t_wait)
                self._tick_ot.append(b.stats)
            unit = global_unit(self.steps * self.accum + round_, info.rank, info.world_size, self.accum)
            sigma = sample_sigma(
                self.batch_gpu, generator=keyed_generator(cfg.seed, "sigma", unit, device), device=device
            )
            last = round_ == self.accum - 1 or not info.enabled
            sync = nullcontext() if last else self.ddp_net.no_sync()  # type: ignore[operator]
            with sync, self.autocast():
                loss = edm_loss(self.forward_net, b.images, b.noise, sigma, b.labels, b.augment_labels)
                # EDM/AOT reduction: sum over pixels, mean over the per-device batch of the whole step.
                (loss.sum() / (self.batch_gpu * self.accum)).backward()
            step_loss += loss.detach().double().mean() / self.accum
        # Learning rate and EMA decay from the images seen *before* this step, as EDM computes them.
        lr = learning_rate(cfg, self.nimg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_lr = lr
        self.nonfinite_steps += int(sanitize_gradients(self.net))
        self.optimizer.step()
        self.ema.update(self.net, ema_beta(cfg.batch, self.nimg, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio))
        self.nimg += cfg.batch
        self.steps += 1
        mean_loss = float(dist_util.all_reduce_mean(step_loss, info))
        if not math.isfinite(mean_loss):
            self.say(f"warning: non-finite loss at step {self.steps} ({self.nimg / 1000:.1f} kimg)")
        self._tick_losses.append(mean_loss)
        self.losses.append(mean_loss)
        return mean_loss

    def _crossed(self, interval: int) -> bool:
        return self.nimg // interval != (self.nimg - self.cfg.batch) // interval

    def tick(self) -> dict[str, Any]:
        """The log record of the steps since the last tick, written to log.jsonl and TensorBoard (rank 0)."""
        now = time.perf_counter()
        dt = now - self._tick_start_time
        self.elapsed += dt
        img_per_s = (self.nimg - self._tick_start_nimg) / max(dt, 1e-9)
        losses = self._tick_losses or [float("nan")]
        line = {
            "kimg": round(self.nimg / 1000, 3), "step": self.steps, "loss": sum(losses) / len(losses),
            "lr": self.last_lr, "img_per_s": round(img_per_s, 2), "sec_per_kimg": round(1000 / max(img_per_s, 1e-9), 3),
            "nonfinite_grad_steps": self.nonfinite_steps, "time_s": round(self.elapsed, 2),
        }  # fmt: skip
        line.update(_ot_fields(self._tick_ot, self._tick_wait_ms, self.cfg))
        if self.info.is_main:
            self.log.append(line)
            if self._writer is not None:
                for k, v in line.items():
                    if k != "kimg" and isinstance(v, int | float):
                        self._writer.add_scalar(k, v, self.nimg)
        self._tick_losses, self._tick_ot, self._tick_wait_ms = [], [], 0.0
        self._tick_start_nimg, self._tick_start_time = self.nimg, time.perf_counter()
        return line

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that an exact resume needs (every rank's share gathered)."""
        info, device = self.info, self.device
        return {
            "nimg": self.nimg, "step": self.steps, "nonfinite_steps": self.nonfinite_steps, "elapsed_s": self.elapsed,
            "optimizer": self.optimizer.state_dict(), "stream": _gather_object(self.stream.state_dict(), info),
            "rng_cpu": _gather_object(torch.get_rng_state(), info),
            "rng_cuda": _gather_object(torch.cuda.get_rng_state(device), info) if device.type == "cuda" else [],
        }  # fmt: skip

    def save_checkpoint(self, reason: str, *, final: bool = False) -> Path | None:
        """Write a checkpoint (rank 0). A failure stops the run on every rank, unless ``keep_going`` was asked for
        and this is not the last save: work that is not on disk is never reported as done."""
        state = self.state_dict()
        path, error = None, ""
        if self.info.is_main:
            try:
                path = ckpt_io.save_checkpoint(
                    self.run_dir, self.nimg, model=self.net.state_dict(), ema=self.ema.module.state_dict(),
                    state=state, metadata={**self.metadata, "nimg": str(self.nimg)}, keep=self.cfg.keep_checkpoints,
                )  # fmt: skip
                self.say(f"{reason}: checkpoint {path}")
            except ckpt_io.CheckpointError as e:
                error = str(e)
        failed = dist_util.any_true(bool(error), self.info, self.device)
        if failed:
            where = f"{self.nimg / 1000:.1f} kimg"
            if self.keep_going and not final:
                self.say(f"warning: {error}; training goes on (--keep-going); the work since the last checkpoint is "
                         "not on disk yet")  # fmt: skip
            else:
                raise CheckpointWriteError(
                    f"{error or 'rank 0 could not write a checkpoint'}. Training stopped at {where} so that no work "
                    "is reported done that is not on disk; rerun the same command to resume from the last "
                    "checkpoint" + ("" if final else " (or add --keep-going to train on through failed saves)")
                )
        dist_util.barrier(self.info)
        return path

    def snapshot(self, reason: str, *, final: bool = False) -> Path | None:
        """A checkpoint, then the EMA's sample grid (a grid that cannot be written is only a warning)."""
        path = self.save_checkpoint(reason, final=final)
        if self.info.is_main and self.cfg.grid_seeds > 0:
            grid = self.run_dir / "samples" / f"{self.nimg:010d}.png"
            try:
                _snapshot_grid(self.ema.module, self.cfg, self.shape, self.label_dim, grid, self.device)
            except OSError as e:
                self.say(f"warning: could not write the sample grid {grid}: {e.strerror or e}")
        return path

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train until the duration is reached (or a stop is requested, or ``max_steps`` steps of this call)."""
        cfg = self.cfg
        result = TrainResult(self.run_dir, self.nimg, self.steps)
        bar = tqdm(
            total=round(cfg.duration_kimg, 3), initial=round(self.nimg / 1000, 3), unit="kimg",
            disable=not self.progress, dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} kimg [{elapsed}<{remaining}{postfix}]",
        )  # fmt: skip
        steps_this_run = 0
        stopper = _StopRequest()
        try:
            with stopper:
                while self.nimg < self.total_nimg:
                    self.step()
                    steps_this_run += 1
                    bar.update(round(self.nimg / 1000 - bar.n, 3))
                    done = self.nimg >= self.total_nimg
                    stop_here = stopper.requested or (max_steps is not None and steps_this_run >= max_steps)
                    stop = dist_util.any_true(stop_here, self.info, self.device)
                    if self._crossed(self.tick_nimg) or done or stop:
                        line = self.tick()
                        bar.set_postfix_str(f"loss {line['loss']:.4f}, {line['img_per_s']:.0f} img/s", refresh=True)
                    if self._crossed(self.snap_nimg) or done or stop:
                        self.snapshot("finished" if done else "stopped" if stop else "snapshot", final=done or stop)
                        self._tick_start_time = time.perf_counter()  # saving and sampling are not training time
                    if stop:
                        result.interrupted = not done
                        break
        finally:
            bar.close()
        result.signal = stopper.signal
        result.nimg, result.steps, result.losses = self.nimg, self.steps, list(self.losses)
        return result

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        dist_util.shutdown(self.info)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    force: bool = False,
    restart: bool = False,
    progress: bool = True,
    keep_going: bool = False,
    max_steps: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train (or resume) the run in ``run_dir``. Rerunning with the same configuration resumes.

    ``max_steps`` stops after that many optimizer steps of this invocation, with a checkpoint (used by tests to
    emulate an interruption). SIGINT / SIGTERM do the same. ``restart`` trains from scratch, moving an earlier run's
    checkpoints and log aside; ``keep_going`` trains on when a periodic checkpoint cannot be written.
    """
    with Trainer(cfg, run_dir, force=force, restart=restart, progress=progress, keep_going=keep_going, log=log) as t:
        return t.run(max_steps=max_steps)


def _precision_context(cfg: TrainConfig, device: torch.device) -> Any:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = cfg.precision == "tf32"
        torch.backends.cudnn.benchmark = True
    if cfg.precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


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


def _tensorboard(run_dir: Path, purge_step: int) -> Any:
    """TensorBoard writer, if installed. ``purge_step`` hides events logged after the checkpoint being resumed, so
    TensorBoard's view matches log.jsonl."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional dependency: pip install aotdiff[tensorboard]
        return None
    return SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)


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
