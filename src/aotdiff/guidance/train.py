"""Training a discriminator for Discriminator Guidance, with independent or AOT-paired perturbation noise.

The recipe of DG (Kim et al. 2023, `train.py` of the reference, facts in docs): real images (label 1) and samples of
the trained diffusion model (label 0), perturbed to a noise level drawn log-uniformly in EDM sigma over
[1e-3, 152] (exactly DG's importance sampling of VP time), binary cross-entropy on the discriminator's logit, Adam
lr 3e-4, weight decay 1e-7, batch 128. With ``dg_coupling='aot'`` the perturbation noise of each pool is paired
with the pool's images by the exact assignment of :mod:`aotdiff.coupling` (class-wise for conditional models): the
AOT-trained discriminator of the AOT paper (Kim et al. 2024, Table 2).

The run directory, resume, log, checkpoints and stop handling are :class:`aotdiff.train.runloop.RunLoop`'s, shared
with the diffusion trainer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from aotdiff.coupling import PairedBatchStream, PoolDraw, make_coupler
from aotdiff.data import ImageDataset, load_dataset
from aotdiff.data.npz import is_npz
from aotdiff.generate import SamplerSettings, generate
from aotdiff.guidance.discriminator import (
    POINT_GUIDE_SIGMA_MAX,
    Discriminator,
    build_discriminator,
    check_extractor,
    default_kind,
)
from aotdiff.guidance.guide import WINDOW_SIGMA_MIN
from aotdiff.guidance.vp import DG_SIGMA_MAX, DG_SIGMA_MIN, sample_dg_sigma
from aotdiff.train import checkpoint as ckpt_io
from aotdiff.train.checkpoint import LoadedModel, load_model
from aotdiff.train.ema import EMA, ema_beta
from aotdiff.train.randomness import EpochOrder, keyed_generator
from aotdiff.train.runloop import RunLoop, gather_object

# Per-sigma view of the log (users of DG ask for it: at large sigma even a perfect discriminator sits at 0.5).
SIGMA_BUCKETS = (DG_SIGMA_MIN, 0.01, 0.1, 1.0, 10.0, DG_SIGMA_MAX)


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class DGConfig:
    """Everything that decides a discriminator training run (saved as DISC/config.json)."""

    base: str = _f("", "the trained diffusion model: run directory, checkpoint folder or .safetensors")
    data: str = _f("", "real data (default: the base run's dataset)")
    fakes: str = _f("", "model samples .npz (aotdiff sample's format); default: generate them into DISC/fakes.npz")
    num_fakes: int = _f(0, "samples to generate (0 = as many as the real data)")
    steps: int = _f(18, "sampler steps N of the generated fakes (Heun: 2N-1 network evaluations)")
    rho: float = _f(7.0, "schedule exponent of the fakes' sampler")
    solver: str = _f("heun", "solver of the fakes' sampler: heun or euler")
    extractor: str = _f("auto", "feature extractor: auto, adm32 (needs --classifier), denoiser (the base model's "
                        "encoder) or mlp (2-D data); auto = mlp for points, adm32 for 32x32 RGB with --classifier, "
                        "else denoiser")  # fmt: skip
    guide_sigma_max: float = _f(0.0, "largest sigma at which sampling applies this discriminator's guidance, recorded "
                                "with it (the same flag of `aotdiff sample` overrides it, also for a finished run); "
                                "0 = auto: 1 for 2-D points (above it the point discriminator is noise that guidance "
                                "multiplies by sigma^2), DG's window (VP time <= 1, sigma <= ~152) for images")  # fmt: skip
    classifier: str = _f("", "ADM 32x32 classifier file (32x32_classifier.pt) for --dg-extractor adm32")
    dg_coupling: str = _f("independent", "perturbation noise: independent (DG) or aot (paired by exact OT, the paper)")
    dg_pool: int = _f(0, "AOT pool size (0 = one batch; a larger pool is consumed in batch-size slices)")
    width: int = _f(128, "head width (DG: 128)")
    depth: int = _f(2, "head residual blocks (DG: 2)")
    batch: int = _f(128, "images per optimizer step, real and fake mixed (DG: 128)")
    lr: float = _f(3e-4, "Adam learning rate (DG: 3e-4)")
    weight_decay: float = _f(1e-7, "Adam weight decay (DG: 1e-7)")
    ema_kimg: float = _f(
        0.0,
        "half-life of an exponential moving average of the head's weights, in kimg, capped at "
        "a tenth of the images seen (0 = none, DG's recipe); guidance uses the average",
    )
    epochs: float = _f(20.0, "passes over real + fake data (used when --kimg is 0)")
    kimg: float = _f(0.0, "training length in thousands of images (0 = --epochs passes)")
    seed: int = _f(0, "random seed of the head's initialisation, data order and noise")
    tick_kimg: float = _f(2.0, "log one line every this many kimg")
    snapshot_kimg: float = _f(20.0, "write a checkpoint every this many kimg")
    keep_checkpoints: int = _f(2, "how many of the newest checkpoints to keep")
    max_batch: int = _f(256, "images per network call when generating the fakes")
    device: str = _f("auto", "where to run: auto (the GPU if there is one, else the CPU), cpu, cuda or cuda:N")
    threads: int = _f(
        0, "CPU threads for torch (0 = the free cores: all of them on an idle machine, fewer beside other busy jobs)"
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DGConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown discriminator configuration field(s): {', '.join(unknown)}")
        return cls(**d)

    def validate(self) -> None:
        if not self.base:
            raise ValueError("give the trained model: aotdiff dg train RUN --out DISC")
        if self.dg_coupling not in ("independent", "aot"):
            raise ValueError(f"--dg-coupling must be independent or aot, got {self.dg_coupling!r}")
        if self.extractor not in ("auto", "adm32", "denoiser", "mlp"):
            raise ValueError(f"--dg-extractor must be auto, adm32, denoiser or mlp, got {self.extractor!r}")
        for name, low in (("batch", 1), ("width", 1), ("depth", 1), ("keep_checkpoints", 1), ("max_batch", 1),
                          ("num_fakes", 0), ("dg_pool", 0), ("threads", 0), ("seed", 0)):  # fmt: skip
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        for name in ("lr", "epochs", "tick_kimg", "snapshot_kimg"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
        for name in ("weight_decay", "kimg", "ema_kimg"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        window_start = WINDOW_SIGMA_MIN
        g = self.guide_sigma_max
        if not (g == 0 or (math.isfinite(g) and g > window_start)):
            raise ValueError(f"--dg-sigma-max must be 0 (auto) or a number > {window_start:.4f} (where DG's window "
                             f"starts), got {g}")  # fmt: skip
        if self.dg_pool and self.dg_pool % self.batch:
            raise ValueError(f"--dg-pool {self.dg_pool} must be a multiple of --batch {self.batch}")
        SamplerSettings(steps=self.steps, rho=self.rho, solver=self.solver)  # validates the fakes' sampler


EMA_RAMPUP = 0.1  # the weight average's half-life is at most this fraction of the images seen

# Settings that may change when a discriminator run is resumed.
DG_RESUMABLE = frozenset(
    {
        "epochs",
        "kimg",
        "tick_kimg",
        "snapshot_kimg",
        "keep_checkpoints",
        "device",
        "threads",
        "max_batch",
        "guide_sigma_max",
    }
)


@dataclass
class RealFake:
    """Real items (target 1) followed by the model's samples (target 0), all in model space ([-1, 1] images)."""

    items: torch.Tensor
    labels: torch.Tensor | None  # class indices of every item, or None
    num_real: int

    def __len__(self) -> int:
        return int(self.items.shape[0])


class RealFakeSource:
    """Pool source for the coupling stream: items, class labels, targets and noise, keyed by the draw index.

    The stream's ``labels`` are the pairing key (class x 2 + real, or real), and the real/fake target rides in its
    row-aligned ``augment_labels`` slot ([n, 1] float), which the discriminator does not otherwise use, so both stay
    with their item through pooling, slicing and checkpoints.
    """

    def __init__(self, data: RealFake, seed: int, device: torch.device):
        self.data, self.seed, self.device = data, seed, device
        self.order = EpochOrder(len(data), seed)
        self.draws = 0

    def draw(self, n: int) -> PoolDraw:
        g = self.draws
        self.draws += 1
        idx = torch.from_numpy(self.order.indices(g * n, n).astype(np.int64))
        items = self.data.items[idx].to(self.device)
        real = idx < self.data.num_real
        target = real.to(torch.float32).view(-1, 1).to(self.device)
        # The pairing key: real and fake items are paired only among themselves (and, for conditional models, within
        # their class), so each group's perturbation noise stays an exact N(0, I) sample. Pairing across the groups
        # hands the groups noises of different norms (OT gives items near the centre small noises), a shortcut a
        # discriminator learns at large sigma and guidance then amplifies by sigma^2 (measured on 8 Gaussians:
        # sliced W2 at 9 NFE went from 1.2 unguided to 14 guided).
        key = real.to(torch.int64) if self.data.labels is None else self.data.labels[idx] * 2 + real.to(torch.int64)
        noise = torch.randn(
            items.shape, generator=keyed_generator(self.seed, "dg-noise", g, self.device), device=self.device
        )
        return PoolDraw(images=items, noise=noise, labels=key.to(self.device), augment_labels=target)

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])


def _to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C -> float32 N x C x H x W in [-1, 1], as the datasets give them."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0


def _kind_of(shape: tuple[int, ...]) -> str:
    return "images" if len(shape) == 3 else "points"


def read_fakes(path: Path, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples from a .npz in aotdiff's sample format: images (uint8 NHWC) or points, and labels."""
    key, other = ("images", "points") if len(shape) == 3 else ("points", "images")
    if Path(path).is_file() and not is_npz(path):
        raise ValueError(f"--fakes {path} is not an .npz archive: give samples written by `aotdiff sample` (.npz)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("not an .npz archive")
        with loaded as f:
            names = set(f.files)
            raw = f[key] if key in names else None
            labels_raw = f["labels"] if "labels" in names else None
    except (OSError, ValueError, KeyError) as e:  # missing, not an .npz, truncated, pickled objects
        raise ValueError(f"--fakes {path}: cannot read it ({e})") from None
    if raw is None:  # one sentence: what is there, what the model needs (not wrapped in "cannot read it")
        found = f"{other} for another kind of model" if other in names else f"no '{key}' array"
        raise ValueError(f"--fakes {path} holds {found}, but the model makes {_kind_of(shape)} of shape "
                         f"{tuple(shape)}: write its fakes with `aotdiff sample`")  # fmt: skip
    items = _to_model_space(raw) if len(shape) == 3 else torch.from_numpy(np.asarray(raw, dtype=np.float32))
    labels = torch.from_numpy(labels_raw.astype(np.int64)) if labels_raw is not None and labels_raw.size else None
    if tuple(items.shape[1:]) != tuple(shape):
        raise ValueError(f"--fakes {path}: items of shape {tuple(items.shape[1:])}, the model makes {tuple(shape)}")
    return items, labels


def load_base(path: str, device: str | torch.device = "cpu") -> LoadedModel:
    """The diffusion model to train a discriminator for, with a plain answer when ``path`` is a discriminator run
    (the loader's own message says how to guide with one, not what `dg train` needs)."""
    try:
        return load_model(path, device=device)
    except ckpt_io.NotADiffusionModelError as e:
        hint = f" (this one was trained for {e.base})" if e.base else ""
        raise ValueError(f"{path} is a discriminator run (`aotdiff dg train`), not a diffusion model: pass the "
                         f"diffusion run to train a discriminator for{hint}") from None  # fmt: skip


def real_dataset(cfg: DGConfig, base: LoadedModel) -> tuple[Any, str]:
    """The real items (``--data``, else the base run's dataset, toy data drawn as the run drew it) and their spec."""
    spec = cfg.data or str(base.config.get("data", ""))
    if not spec:
        raise ValueError("the base model does not name its dataset: pass --data PATH")
    data = load_dataset(
        spec, toy_size=int(base.config.get("data_size", 20000)), toy_seed=int(base.config.get("seed", 0))
    )
    if tuple(data.shape) != tuple(base.shape):
        raise ValueError(f"--data {spec}: items of shape {tuple(data.shape)}, the model makes {tuple(base.shape)}")
    return data, spec


def guide_window(cfg: DGConfig, kind: str) -> float | None:
    """The largest sigma at which sampling applies this discriminator's guidance: --dg-sigma-max, else 1 for 2-D
    points (where a point discriminator helps, docs/dg.md), else None: DG's whole window."""
    return cfg.guide_sigma_max or (POINT_GUIDE_SIGMA_MAX if kind == "mlp" else None)


def resolved_plan(cfg: DGConfig, base: LoadedModel, kind: str) -> dict[str, Any]:
    """What the zeros of the config become (for --dry-run): the number of real items and of fakes, and the sigma
    window that sampling will apply the guidance in (None: DG's whole window)."""
    data, spec = real_dataset(cfg, base)
    if cfg.fakes:
        num_fakes = len(read_fakes(Path(cfg.fakes), tuple(base.shape))[0])
    else:
        num_fakes = cfg.num_fakes or len(data)
    return {"data": spec, "num_real": len(data), "num_fakes": num_fakes, "guide_sigma_max": guide_window(cfg, kind)}


def check_plan(cfg: DGConfig, base: LoadedModel) -> str:
    """Every check that needs only the flags and the base model's shape and config, made before any data is read or
    any fake generated (and by --dry-run): a wrong --dg-extractor used to surface after minutes of sampling.
    Returns the discriminator kind."""
    shape = tuple(base.shape)
    kind = cfg.extractor if cfg.extractor != "auto" else default_kind(shape, cfg.classifier or None)
    check_extractor(kind, shape, classifier=cfg.classifier or None, base=base.denoiser)  # type: ignore[arg-type]
    if not (cfg.data or base.config.get("data")):
        raise ValueError("the base model does not name its dataset: pass --data PATH")
    if cfg.fakes and not Path(cfg.fakes).is_file():
        raise ValueError(f"--fakes {cfg.fakes}: no such file")
    return kind


# Real and fake counts further apart than this make the unweighted loss's accuracy mostly the majority rate.
IMBALANCE = 2.0


def imbalance_warning(num_real: int, num_fake: int, remedy: str) -> str | None:
    """A one-line warning when one class outnumbers the other more than IMBALANCE times (None otherwise). The loss
    stays unweighted (DG's recipe); the warning says why the logged accuracy then means little."""
    small, large = sorted((num_real, num_fake))
    if large <= IMBALANCE * small:
        return None
    majority = "real" if num_real > num_fake else "fake"
    rate = large / max(num_real + num_fake, 1)
    return (
        f"warning: {num_real} real vs {num_fake} fake items: the loss is unweighted (DG's recipe), so the "
        f"accuracy is dominated by the majority class (always answering {majority} scores {rate:.2f}); {remedy}"
    )


def stale_fakes_reason(path: Path, made: dict[str, Any], num: int) -> str | None:
    """Why the cached fakes at ``path`` are not what the configuration asks for now (None: they are). ``made`` is the
    meta that generating them now would record; ``num`` the number of fakes (seeds 0 .. num - 1)."""
    made = json.loads(json.dumps(made))  # compared as read back from the file (JSON's floats and None)
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"])) if "meta" in f.files else None
            seeds = np.asarray(f["seeds"]) if "seeds" in f.files else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"it cannot be read ({e})"
    if not isinstance(meta, dict):
        return "it does not record how it was made"
    reasons = []
    if meta.get("model") != made["model"]:
        reasons.append(f"base model {meta.get('model')} -> {made['model']}")
    sampler = meta.get("sampler")
    was: dict[str, Any] = sampler if isinstance(sampler, dict) else {}
    reasons += [f"{k} {was.get(k)} -> {v}" for k, v in made["sampler"].items() if was.get(k) != v]
    if seeds is None or len(seeds) != num:
        reasons.append(f"number of fakes {'?' if seeds is None else len(seeds)} -> {num}")
    elif not np.array_equal(seeds, np.arange(num)):
        reasons.append(f"seeds -> 0-{num - 1}")
    return f"it was made with other settings ({', '.join(reasons)})" if reasons else None


class DGTrainer(RunLoop):
    """Trains a discriminator head in a run directory (see the module docstring)."""

    cfg: DGConfig
    resumable_changes = DG_RESUMABLE
    checkpoint_format = "aotdiff-dg/1"

    def __init__(self, cfg: DGConfig, run_dir: str | Path, **kw: Any):
        cfg.validate()
        self._stream: PairedBatchStream | None = None
        self._forced = bool(kw.get("force", False))  # only to say why cached fakes are regenerated
        self._restart = bool(kw.get("restart", False))  # a start from scratch: the old checkpoints are set aside
        super().__init__(cfg, run_dir, **kw)

    # ------------------------------------------------------------------------------------------------ setup
    def build(self) -> None:
        cfg, device = self.cfg, self.device
        if self.info.enabled:
            raise ValueError("aotdiff dg train runs on one device; start it without torchrun")
        base = load_base(cfg.base, device=device)
        self.base = base
        self.shape = tuple(base.shape)
        kind = check_plan(cfg, base)  # before reading data or generating fakes
        real_items, real_labels = self._real_data(base)
        fake_items, fake_labels = self._fakes(base, len(real_items))
        cond = base.num_classes > 0
        if cond and (real_labels is None or fake_labels is None):
            raise ValueError("the base model is class-conditional: real data and fakes need labels")
        labels = torch.cat([real_labels, fake_labels]) if cond else None  # type: ignore[list-item]
        self.data = RealFake(torch.cat([real_items, fake_items]), labels, len(real_items))
        self.disc: Discriminator = build_discriminator(
            kind, shape=self.shape, num_classes=base.num_classes, base=base.denoiser,  # type: ignore[arg-type]
            classifier=cfg.classifier or None, width=cfg.width, depth=cfg.depth, seed=cfg.seed,
        ).to(device)  # fmt: skip
        window = guide_window(cfg, kind)
        if window is not None:  # recorded in the saved description; the sampler's default window
            self.disc.spec["guide_sigma_max"] = window
        self.disc.train()
        self.ema = EMA(self.disc.head) if cfg.ema_kimg > 0 else None
        self.optimizer = torch.optim.Adam(self.disc.trainable(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        coupler = make_coupler(cfg.dg_coupling, classwise=True)  # blocks by the source's key: class x real/fake
        pool = (cfg.dg_pool or cfg.batch) if cfg.dg_coupling == "aot" else None
        self._stream = PairedBatchStream(RealFakeSource(self.data, cfg.seed, device), coupler, cfg.batch, pool)
        self.metadata = {**self.disc.metadata(), "config": cfg.to_json(), "base": str(base.source)}
        self._zero_stats()
        self.say(f"discriminator ({kind}): {sum(p.numel() for p in self.disc.trainable()):,} trainable parameters; "
                 f"{self.data.num_real} real + {len(self.data) - self.data.num_real} fake items")  # fmt: skip

    def _real_data(self, base: LoadedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
        data, spec = real_dataset(self.cfg, base)
        items, labels = data.batch(np.arange(len(data)))
        if isinstance(data, ImageDataset) and base.num_classes and labels is None:
            raise ValueError(f"--data {spec} has no labels, but the base model is class-conditional")
        return items.float(), labels

    def _warn_imbalance(self, num_real: int, num_fake: int, remedy: str) -> None:
        warning = imbalance_warning(num_real, num_fake, remedy)
        if warning:
            self.say(warning)

    def _fakes(self, base: LoadedModel, num_real: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.cfg
        if cfg.fakes:
            items, labels = read_fakes(Path(cfg.fakes), self.shape)
            self._warn_imbalance(num_real, len(items), "give as many fakes as real items")
            return items, labels
        n = cfg.num_fakes or num_real
        self._warn_imbalance(num_real, n, "--num-fakes 0 generates as many as the data holds")  # before generating
        settings = SamplerSettings(steps=cfg.steps, rho=cfg.rho, solver=cfg.solver)
        made = {"model": str(base.source), "sampler": settings.to_dict()}
        path = self.run_dir / "fakes.npz"
        if path.is_file():  # generated by an earlier start of this run: reused only if made as asked now
            reason = stale_fakes_reason(path, made, n)
            if reason is None:
                return read_fakes(path, self.shape)
            if not (self._forced or self._restart) and ckpt_io.list_checkpoints(self.run_dir):
                # e.g. the base run saved a newer checkpoint since: resuming on other fakes would not be this run.
                raise ValueError(
                    f"{path}: {reason}, and this run's checkpoints were trained on those fakes: pass --force to "
                    "generate new ones and continue on them, or use another --out"
                )
            forced = " (--force)" if self._forced else ""
            self.say(f"{path}: {reason}; generating the fakes again{forced}")
        return self._generate_fakes(base, path, n, settings, made)

    def _generate_fakes(
        self, base: LoadedModel, path: Path, n: int, settings: SamplerSettings, made: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.cfg
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc="generating fakes", disable=not self.progress, dynamic_ncols=True)
        batches = list(generate(
            base.denoiser, range(n), self.shape, settings=settings, num_classes=base.num_classes,
            batch_size=cfg.max_batch, device=self.device, progress=bar.update,
        ))  # fmt: skip
        bar.close()
        labels = torch.cat([b.labels for b in batches if b.labels is not None]) if base.num_classes else None
        arrays: dict[str, np.ndarray] = {
            "seeds": np.arange(n, dtype=np.int64),
            "labels": labels.numpy() if labels is not None else np.zeros(0, np.int64),
            "meta": np.array(json.dumps(made)),
        }
        if len(self.shape) == 3:
            arrays["images"] = torch.cat([b.images for b in batches]).permute(0, 2, 3, 1).numpy()
        else:
            arrays["points"] = torch.cat([b.raw for b in batches]).numpy()
        tmp = path.with_name(f".fakes-{os.getpid()}.npz")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
        self.say(f"wrote {n} fakes ({settings.solver}, {settings.steps} steps) to {path}")
        return read_fakes(path, self.shape)

    @property
    def stream(self) -> PairedBatchStream:
        assert self._stream is not None
        return self._stream

    def duration_nimg(self) -> int:
        kimg = self.cfg.kimg or self.cfg.epochs * len(self.data) / 1000
        return max(int(round(kimg * 1000)), self.cfg.batch)

    # ------------------------------------------------------------------------------------------------ state
    def weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # The averaged head goes in the checkpoint's ema slot (head tensors only; the extractor is in the model slot).
        ema = {} if self.ema is None else {f"head.{k}": v for k, v in self.ema.module.state_dict().items()}
        return self.disc.head_state(), ema

    def load_weights(self, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> None:
        own = self.disc.head_state()
        missing = sorted(set(own) - set(model))
        if missing:
            raise ckpt_io.CheckpointError(f"{self.run_dir}: the checkpoint lacks {missing[:3]}")
        self.disc.head.load_state_dict({k[5:]: v for k, v in model.items() if k.startswith("head.")})
        if self.ema is not None:
            if ema:
                self.ema.module.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("head.")})
            else:  # --ema-kimg added on resume (--force): the average starts from the loaded head
                self.ema.module.load_state_dict(self.disc.head.state_dict())
                self.say("the checkpoint has no head average: --ema-kimg starts one from the loaded head")
        if self.disc.extractor is not None and any(k.startswith("extractor.") for k in model):
            # the extractor as it was trained with (the base run may have trained on since)
            self.disc.extractor.load_state_dict({k[10:]: v for k, v in model.items() if k.startswith("extractor.")})

    def extra_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(), "stream": gather_object(self.stream.state_dict(), self.info),
            "rng_cpu": torch.get_rng_state(),
        }  # fmt: skip

    def load_extra_state(self, st: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(st["optimizer"])
        self.stream.load_state_dict(st["stream"][0])
        torch.set_rng_state(st["rng_cpu"])

    # ------------------------------------------------------------------------------------------------ steps
    def _zero_stats(self) -> None:
        k = len(SIGMA_BUCKETS) - 1
        self._stats = torch.zeros(3, k + 1, dtype=torch.float64, device=self.device)  # loss, correct, count
        self._edges = torch.tensor(SIGMA_BUCKETS[1:-1], dtype=torch.float64, device=self.device)  # inner edges

    def step(self) -> torch.Tensor:
        cfg, device = self.cfg, self.device
        b = self.stream.next()
        n = b.images.shape[0]
        sigma = sample_dg_sigma(n, generator=keyed_generator(cfg.seed, "dg-sigma", self.steps, device), device=device)
        x = b.images + sigma.view(-1, *([1] * (b.images.ndim - 1))) * b.noise
        assert b.augment_labels is not None
        target = b.augment_labels[:, 0]
        assert b.labels is not None  # the pairing key, class * 2 + real
        classes = None if self.data.labels is None else b.labels // 2
        logit = self.disc(x, sigma, classes)
        losses = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
        loss = losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema is not None:  # half-life capped at a tenth of the images seen, so short runs average recent weights
            self.ema.update(self.disc.head, ema_beta(cfg.batch, self.nimg + n, cfg.ema_kimg, EMA_RAMPUP))
        self.nimg += n
        self.steps += 1
        with torch.no_grad():  # per-sigma-bucket sums, read once per tick
            bucket = torch.bucketize(sigma.double(), self._edges)
            correct = ((logit > 0).float() == target).double()
            for row, values in ((0, losses.double()), (1, correct), (2, torch.ones_like(correct))):
                self._stats[row, :-1].index_add_(0, bucket, values)
                self._stats[row, -1] += values.sum()
        value = loss.detach()  # stays on the device: read once per tick with the bucket sums (no per-step sync)
        self.record_loss(value)
        return value

    def tick_fields(self) -> dict[str, Any]:
        loss, correct, count = self._stats.cpu().tolist()
        fields: dict[str, Any] = {"acc": correct[-1] / max(count[-1], 1)}
        for i in range(len(SIGMA_BUCKETS) - 1):
            name = f"sigma_{SIGMA_BUCKETS[i]:.3g}_{SIGMA_BUCKETS[i + 1]:.3g}"
            if count[i]:
                fields[f"acc_{name}"] = round(correct[i] / count[i], 5)
                fields[f"loss_{name}"] = round(loss[i] / count[i], 5)
        if self.cfg.dg_coupling == "aot" and self.stream.stats is not None:
            fields["ot_cost_ratio"] = round(self.stream.stats.coupling.ratio, 5)
        self._zero_stats()
        return fields

    def progress_text(self, line: dict[str, Any]) -> str:
        return f"loss {line['loss']:.4f}, acc {line['acc']:.3f}, {line['img_per_s']:.0f} img/s"

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        super().close()


def train_discriminator(cfg: DGConfig, run_dir: str | Path, **kw: Any) -> Any:
    """Train (or resume) a discriminator in ``run_dir``; returns the :class:`~aotdiff.train.runloop.TrainResult`."""
    max_steps = kw.pop("max_steps", None)
    with DGTrainer(cfg, run_dir, **kw) as t:
        return t.run(max_steps=max_steps)
