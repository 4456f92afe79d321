"""The training loop: EDM training with the noise supplied by a coupler (independent or AOT).

One optimizer step = ``batch`` images over all devices = ``accum`` forward/backward passes of ``batch_gpu`` images per
device. Time is counted in images (kimg). Per pass: a slice of the current pool (images already augmented and paired
with their noise by :class:`aotdiff.coupling.PairedBatchStream`) -> sigma ~ logN(P_mean, P_std) -> EDM loss ->
backward. Then: linear learning-rate warm-up, non-finite gradients zeroed (EDM's nan_to_num; counted), Adam, EMA.

Reproducibility: all randomness except dropout is counter-based (:mod:`aotdiff.train.randomness`), dropout uses the
global torch generators whose states are checkpointed, so an interrupted-and-resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from aotdiff.coupling import (
    GATE_PURPOSE,
    PairedBatchStream,
    PoolDraw,
    SigmaGate,
    make_coupler,
    validate_pool_size,
)
from aotdiff.data import AugmentPipe, ImageDataset, ToyDataset, load_dataset
from aotdiff.diffusion import Precond, edm_loss, sample_sigma
from aotdiff.generate import SamplerSettings, generate, resolve_precision
from aotdiff.nets import build_network, count_parameters
from aotdiff.train import checkpoint as ckpt_io
from aotdiff.train.config import (
    PAPER_DEVICES,
    PRESET_CLASSES,
    PRESET_SHAPES,
    TrainConfig,
    validate,
)
from aotdiff.train.ema import EMA, ema_beta
from aotdiff.train.randomness import EpochOrder, global_unit, keyed_generator
from aotdiff.train.runloop import (  # noqa: F401 - re-exported: the trainer's public errors and result
    CheckpointWriteError,
    ConfigMismatchError,
    RunLoop,
    TrainResult,
    gather_object,
)
from aotdiff.viz import save_image_grid, save_points_plot

MAX_CLASSES = 100_000  # one-hot class conditioning: a label of 10^12 would mean a 10^12-wide input layer


# ------------------------------------------------------------------------------------------------ building blocks
def load_training_data(cfg: TrainConfig) -> ImageDataset | ToyDataset:
    """The dataset, checked against what the preset and the network need."""
    return check_training_data(cfg, load_dataset(cfg.data, toy_size=cfg.data_size, toy_seed=cfg.seed))


def check_training_data(cfg: TrainConfig, data: ImageDataset | ToyDataset) -> ImageDataset | ToyDataset:
    """``data`` if it fits the preset and the network (one clear error otherwise)."""
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
        how = (
            "the toy distributions are unlabelled: drop --cond"
            if is_toy
            else "give an image folder / .zip with dataset.json labels, or an .npz with a 'labels' array"
        )
        raise ValueError(f"--cond needs class labels, but --data {cfg.data} has none; {how}")
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


# A dataset up to this size is copied to the GPU once (uint8; CIFAR-10 is 150 MB) instead of per step.
RESIDENT_MAX_BYTES = 4 << 30


def resident_images(data: ImageDataset | ToyDataset, device: torch.device) -> torch.Tensor | None:
    """The dataset's uint8 images on ``device`` when it is a GPU and they fit (at most RESIDENT_MAX_BYTES and a
    quarter of the free memory), else None (the CPU path gathers each batch on the host). Same values either way:
    the conversion x / 127.5 - 1 is the one :meth:`ImageDataset.batch` does."""
    if device.type != "cuda" or not isinstance(data, ImageDataset):
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if data.images.nbytes > min(RESIDENT_MAX_BYTES, free // 4):
        return None
    return torch.from_numpy(data.images).to(device)


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
        self.resident = resident_images(data, device)

    def draw(self, n: int) -> PoolDraw:
        g = global_unit(self.draws, self.rank, self.world_size, self.accum)
        self.draws += 1
        index = self.order.indices(g * n, n)
        if self.resident is not None:  # gathered on the GPU: no host work and no copy per step
            images = self.resident[torch.as_tensor(index, device=self.device)].to(torch.float32) / 127.5 - 1.0
            labels = None if self.data.labels is None else torch.from_numpy(self.data.labels[index].copy())
        else:
            images, labels = self.data.batch(index)
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


def check_layout(cfg: TrainConfig, world_size: int) -> tuple[int, int, int, str]:
    """(batch per device per pass, accumulation rounds, AOT pools per device, a note on the pools), with every rule
    on how batches and pools divide checked at once. Needs no data, no network and no run directory: the command
    line calls it before creating anything (and for --dry-run), so a layout that cannot train is refused up front."""
    batch_gpu, accum = resolve_batch(cfg, world_size)
    pools, note = resolve_pools(cfg, world_size)
    if cfg.coupling == "aot":
        validate_pool_size(cfg.aot_pool, batch_gpu, pools, per_device=cfg.batch // world_size)
    return batch_gpu, accum, pools, note


def sanitize_gradients(module: nn.Module) -> torch.Tensor:
    """EDM's guard: NaN -> 0, +-inf -> +-1e5 in every gradient, applied unconditionally as EDM does (it is the
    identity on finite values), so the step never asks the device whether it was needed.

    Returns a 0-dim bool tensor on the gradients' device: whether any gradient held a non-finite value, read by the
    caller once per tick. The check is one fused multi-tensor norm (a norm is non-finite iff an entry is, barring an
    overflow of the fp32 norm itself at |g| ~ 1e19, which would only miscount: the rewrite is still exact).
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    norms = torch._foreach_norm(grads)
    bad = ~torch.stack(norms).isfinite().all()
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
    return bad


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
    *_, note = check_layout(cfg, world)
    if note:
        text += f"\n{note}"
    return text, n_params


class Trainer(RunLoop):
    """EDM training (independent or AOT noise) in one run directory, as an object.

    Construction does the setup (see :class:`aotdiff.train.runloop.RunLoop`: lock, configuration, resume), then

    * :meth:`step` runs one optimizer step (``accum`` passes of ``batch_gpu`` images per device) and returns its
      mean loss;
    * :meth:`tick` writes one ``log.jsonl`` line (and TensorBoard scalars) for the steps since the last tick;
    * :meth:`snapshot` writes a checkpoint and the EMA's sample grid;
    * :meth:`run` loops until the duration is reached, a stop is requested or ``max_steps`` steps were run.
    """

    cfg: TrainConfig

    def __init__(
        self, cfg: TrainConfig, run_dir: str | Path, *, dataset: ImageDataset | ToyDataset | None = None, **kw: Any
    ):
        """``dataset`` replaces loading ``cfg.data`` (an in-memory :class:`ImageDataset` or :class:`ToyDataset` from
        Python; checked the same way), and its ``name`` is recorded as ``data`` in config.json and the checkpoints,
        so a run never claims the preset's dataset (which `sweep` would score against) and resuming it on other data
        is refused like any changed setting. The other keywords are :class:`RunLoop`'s."""
        if dataset is not None:
            if not isinstance(dataset, ImageDataset | ToyDataset):
                raise TypeError(
                    f"dataset: expected an aotdiff.data.ImageDataset (uint8 images [N, C, H, W]) or ToyDataset "
                    f"(2-D points), got {type(dataset).__name__}; wrap arrays in one of them"
                )
            if dataset.name and dataset.name != cfg.data:
                cfg = dataclasses.replace(cfg, data=dataset.name)
        validate(cfg, need_data=dataset is None)
        self._stream: PairedBatchStream | None = None
        self._dataset = dataset
        super().__init__(cfg, run_dir, **kw)

    # ------------------------------------------------------------------------------------------------ setup
    def build(self) -> None:
        cfg, info, device = self.cfg, self.info, self.device
        self.batch_gpu, self.accum, pools, pools_note = check_layout(cfg, info.world_size)
        data = load_training_data(cfg) if self._dataset is None else check_training_data(cfg, self._dataset)
        self.shape = tuple(data.shape)
        torch.manual_seed(cfg.seed + info.rank)  # weights are broadcast from rank 0 by DDP; this seeds dropout

        # Network, EMA, optimizer. Weights are initialised from the run seed, identically on every rank.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            raw = build_raw_network(cfg, self.shape, data.num_classes)
        self.label_dim = data.num_classes if cfg.cond else 0
        self.channels_last = use_channels_last(cfg, device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.net = Precond(raw, label_dim=self.label_dim).to(device).train()
        self.net.to(memory_format=memory_format)  # type: ignore[call-overload]  # (torch's stubs lack the overload)
        self.ema = EMA(self.net)
        self.optimizer = make_adam(self.net.parameters(), cfg.lr)
        self.metadata = {
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
        knobs = cfg.aot_knobs()
        coupler = make_coupler(
            cfg.coupling, cost=knobs.cost, backend=None if cfg.aot_backend == "auto" else cfg.aot_backend,
            classwise=classwise(cfg), temperature=knobs.temperature, seed=cfg.seed,
        )  # fmt: skip

        def gate_generators(local_pass: int) -> list[torch.Generator]:
            # One per virtual pool, keyed exactly like self._sigma keys the noise levels (see there).
            units = (global_unit(local_pass, info.rank * pools + k, info.world_size * pools, self.accum)
                     for k in range(pools))  # fmt: skip
            return [keyed_generator(cfg.seed, GATE_PURPOSE, u, device) for u in units]

        self._gate = SigmaGate(knobs.gate_sigma, knobs.gate_width, gate_generators)  # identity at gate_sigma 0
        self._stream = PairedBatchStream(
            source, coupler, self.batch_gpu, cfg.aot_pool if cfg.coupling == "aot" else None,
            pools=pools, scope=cfg.aot_scope, worker=cfg.aot_prefetch,
        )  # fmt: skip
        if pools_note:
            self.say(pools_note)
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # steps with non-finite gradients
        self.last_lr = learning_rate(cfg, 0)
        self._tick_ot: list[Any] = []
        self._tick_wait_ms = 0.0
        self._last_ot: Any = None  # the stats of the pool the last step trained on
        self.ddp_net: nn.Module = self.net
        if info.enabled:
            # Gradients as views of DDP's all-reduce buckets: no copy in and out of the buckets each step.
            self.ddp_net = DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
            )
        self.forward_net = torch.compile(self.ddp_net) if cfg.compile else self.ddp_net
        self.precision = resolve_precision(cfg.precision, device)
        self.autocast = precision_context(self.precision, device)
        self.say(f"numerics: {self.precision}" + (", channels-last" if self.channels_last else "")
                 + (", torch.compile" if cfg.compile else "") + f" on {device}")  # fmt: skip

    @property
    def nonfinite_steps(self) -> int:
        """Optimizer steps whose gradients held NaN / inf (zeroed as EDM does); reading it syncs with the device."""
        return int(self._nonfinite.item())

    @property
    def stream(self) -> PairedBatchStream:
        assert self._stream is not None
        return self._stream

    def weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return self.net.state_dict(), self.ema.module.state_dict()

    def load_weights(self, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> None:
        ckpt_io.load_matching(self.net, model, "the checkpoint's model weights")
        ckpt_io.load_matching(self.ema.module, ema, "the checkpoint's EMA weights")

    def extra_state(self) -> dict[str, Any]:
        info, device = self.info, self.device
        return {
            "nonfinite_steps": self.nonfinite_steps, "optimizer": self.optimizer.state_dict(),
            "stream": gather_object(self.stream.state_dict(), info),
            "rng_cpu": gather_object(torch.get_rng_state(), info),
            "rng_cuda": gather_object(torch.cuda.get_rng_state(device), info) if device.type == "cuda" else [],
        }  # fmt: skip

    def load_extra_state(self, st: dict[str, Any]) -> None:
        info = self.info
        self.optimizer.load_state_dict(st["optimizer"])
        self._nonfinite.fill_(int(st["nonfinite_steps"]))
        self.last_lr = learning_rate(self.cfg, self.nimg)
        streams = st["stream"]  # one state per rank (each rank consumes its own pools)
        if len(streams) != info.world_size:
            raise ValueError(
                f"{self.run_dir} was written by {len(streams)} process(es) but this run has {info.world_size}; "
                "resume with the same number of processes"
            )
        self.stream.load_state_dict(streams[info.rank])
        torch.set_rng_state(st["rng_cpu"][info.rank])
        if self.device.type == "cuda" and st.get("rng_cuda"):
            torch.cuda.set_rng_state(st["rng_cuda"][info.rank], self.device)

    def init_from(self, path: str) -> None:
        """Start from saved weights (model -> network, EMA -> EMA; one file -> both), counters and optimizer fresh."""
        source = Path(path)
        model_file = ckpt_io.resolve_weights(source, ema=False)
        ema_file = ckpt_io.resolve_weights(source, ema=True)
        for module, file in ((self.net, model_file), (self.ema.module, ema_file)):
            tensors, _ = ckpt_io.read_weights(file)
            problem = ckpt_io.weights_mismatch(module, tensors)
            if problem:
                raise ckpt_io.WeightsMismatchError(
                    f"--init-from {path}: {file} does not fit this run's network ({problem}); use weights of the "
                    "same preset and network flags"
                )
            module.load_state_dict(tensors)
        self.say(f"initialised the weights from {model_file} and {ema_file} (optimizer and counters fresh)")

    # ------------------------------------------------------------------------------------------------ steps
    def step(self) -> torch.Tensor:
        """One optimizer step: ``accum`` passes of ``batch_gpu`` images on every device, then lr, guard, Adam, EMA.

        Returns this rank's mean loss as a device tensor; nothing in a step waits for the device (the loss and the
        non-finite-gradient count are read once per tick)."""
        cfg, info, device = self.cfg, self.info, self.device
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device, dtype=torch.float64)
        for round_ in range(self.accum):
            t_wait = time.perf_counter()
            b = self.stream.next()
            if b.step_in_pool == 0:
                self._tick_wait_ms += 1e3 * (time.perf_counter() - t_wait)
                self._tick_ot.append(b.stats)
            self._last_ot = b.stats
            sigma = self._sigma(self.steps * self.accum + round_)
            b.noise = self._gate(b.noise, sigma, self.steps * self.accum + round_)  # sigma-gated AOT (coupling/gating)
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
        self._nonfinite += sanitize_gradients(self.net).to(self._nonfinite.device)
        self.optimizer.step()
        self.ema.update(self.net, ema_beta(cfg.batch, self.nimg, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio))
        self.nimg += cfg.batch
        self.steps += 1
        self.record_loss(step_loss)  # read (and averaged over the ranks) at the tick: no host sync here
        return step_loss

    def _sigma(self, local_pass: int) -> torch.Tensor:
        """Noise levels of one pass, keyed like the pools: virtual pool k of K on this rank is virtual rank
        rank * K + k of world * K, so one device emulating K pools draws exactly what K devices draw."""
        info, k_pools = self.info, self.stream.pools
        rows = self.batch_gpu // k_pools
        parts = []
        for k in range(k_pools):
            unit = global_unit(local_pass, info.rank * k_pools + k, info.world_size * k_pools, self.accum)
            gen = keyed_generator(self.cfg.seed, "sigma", unit, self.device)
            parts.append(sample_sigma(rows, generator=gen, device=self.device))
        return torch.cat(parts)

    def tick_fields(self) -> dict[str, Any]:
        fields = {"lr": self.last_lr, "nonfinite_grad_steps": self.nonfinite_steps}
        fields.update(_ot_fields(self._tick_ot, self._tick_wait_ms, self.cfg, self._last_ot))
        self._tick_ot, self._tick_wait_ms = [], 0.0
        return fields

    def pictures(self) -> None:
        if self.cfg.grid_seeds > 0:
            grid = self.run_dir / "samples" / f"{self.nimg:010d}.png"
            _snapshot_grid(self.ema.module, self.cfg, self.shape, self.label_dim, grid, self.device)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        super().close()

    def __enter__(self) -> Trainer:
        return self


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


def precision_context(precision: str, device: torch.device) -> Callable[[], Any]:
    """The context a training pass runs in. bf16 = autocast: parameters, gradients and Adam state stay fp32 (master
    weights); matmuls and convolutions run in bf16; autocast keeps group norm, softmax and the loss's reductions in
    fp32. 'fp32' turns TF32 off, as EDM does, so CUDA matmuls are true fp32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.benchmark = True
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """Channels-last (NHWC) for convolutional networks: cuDNN's tensor-core kernels want it ('auto': on CUDA only;
    on this project's CPUs it measured no faster)."""
    if cfg.arch == "mlp" or cfg.channels_last == "no":
        return False
    return cfg.channels_last == "yes" or device.type == "cuda"


def make_adam(params: Any, lr: float) -> torch.optim.Adam:
    """EDM's Adam (betas 0.9 / 0.999, eps 1e-8), fused into one kernel where torch supports it for the device
    (CPU and CUDA in torch >= 2.4: measured 1.16x the digits preset's whole step on a CPU core); the same update to
    float rounding as the per-parameter implementation (tests/test_train.py)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype the fused kernel does not take
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def _ot_fields(pools: list[Any], wait_ms: float, cfg: TrainConfig, last: Any = None) -> dict[str, float]:
    """Pairing statistics of the pools started during a tick (AOT runs only): means over those pools.

    A tick in which no pool started (a tick shorter than a pool, or the last one of a run) trained on slices of the
    pool started before it: its line repeats that pool's ratio and solve time, with ``ot_pools`` 0 and no wait (a step
    only waits when it starts a pool). So every line of an AOT run carries the three ``ot_`` fields."""
    if cfg.coupling != "aot":
        return {}
    if not pools:
        if last is None:  # no AOT step yet
            return {}
        pools, wait_ms = [last], 0.0
        started = 0
    else:
        started = len(pools)
    n = len(pools)
    return {
        "ot_cost_ratio": round(sum(p.coupling.ratio for p in pools) / n, 5),
        "ot_ms": round(sum(p.coupling.solve_ms + p.coupling.cost_ms for p in pools) / n, 3),
        "ot_wait_ms": round(wait_ms / n, 3),
        "ot_pools": started,
    }


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
        seen = f"{int(path.stem) / 1000:g} kimg" if path.stem.isdigit() else path.stem  # grids are named by nimg
        save_points_plot(torch.cat([b.raw for b in batches]), path, title=f"{cfg.data}: EMA after {seen}, "
                         f"Heun {cfg.grid_steps} steps")  # fmt: skip
