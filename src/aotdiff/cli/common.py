"""Flags and checks that several commands share, defined once so that one flag name has one meaning everywhere.

A flag added through these builders has the same name, type and help in every command that takes it
(tests/test_eval_cli.py walks every sub-parser to keep it so). Meanings:

* ``--device``     where to run: auto | cpu | cuda | cuda:N (validated by :func:`aotdiff.train.distributed.pick_device`).
* ``--no-progress`` no progress bar; nothing else changes.
* ``--max-batch``  images per network call when sampling or scoring: a memory knob, results do not depend on it.
  ``--batch`` stays the *training* batch (`train`, `bench train`); on the sampling commands it is a hidden flag
  that stops with a one-line pointer to ``--max-batch`` instead of meaning something else.
* ``--steps``      sampler steps N (Heun makes 2N - 1 network evaluations, Euler N).
* ``--precision``  the network's numerics, auto | fp32 | tf32 | bf16, with `aotdiff train`'s meanings (generating
  commands: the sampler's state stays float64); ``--compile``: torch.compile the network.

The output checks run before any model is loaded or any sample drawn, so a typo in ``--out`` or a read-only folder
costs a second, not an hour of sampling.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import torch
from tqdm import tqdm

from aotdiff.cli import UserError, command_name
from aotdiff.generate import PRECISIONS, SamplerSettings

DEVICE_HELP = "where to run: auto (the GPU if there is one, else the CPU), cpu, cuda or cuda:N"
DEVICE_METAVAR = "{auto,cpu,cuda,cuda:N}"
PROGRESS_HELP = "do not show a progress bar (for logs and scripts); nothing else changes"
MAX_BATCH_HELP = "images per network call; lower it if memory runs out: results do not depend on it"
STEPS_HELP = "sampler steps N: Heun makes 2N-1 network evaluations per image, Euler N"
DEFAULT_MAX_BATCH = 256
SAMPLER_DEFAULTS = SamplerSettings()  # the sampler flags default to these (and default output names omit them)


# ------------------------------------------------------------------------------------------------ flag builders
def add_device_flag(p: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda|cuda:N`` (default auto)."""
    p.add_argument("--device", type=str, default="auto", metavar=DEVICE_METAVAR, help=f"{DEVICE_HELP} (default: auto)")


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a thread count: give 0 (automatic) or a positive number")
    return value


THREADS_HELP = ("CPU threads for torch (0 = chosen from the cores and the load at start: all cores of an idle machine, "
                "fewer beside other busy jobs; OMP_NUM_THREADS also chooses) (default: 0)")  # fmt: skip


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    """``--threads N`` (0 = :func:`aotdiff.cpu.configure_threads`' automatic choice); ``aotdiff.cli.main`` applies it
    before the command runs."""
    p.add_argument("--threads", type=_threads, default=0, metavar="N", help=THREADS_HELP)


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    """``--no-progress``: read by :func:`progress_bar`."""
    p.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)


def add_max_batch_flag(p: argparse.ArgumentParser, default: int | None = DEFAULT_MAX_BATCH) -> None:
    """``--max-batch N`` (images per network call), plus a hidden ``--batch`` that says to use it instead.

    ``default=None`` (the generating commands): sized to the free memory on a GPU, DEFAULT_MAX_BATCH on a CPU; the
    command resolves it with :func:`aotdiff.generate.auto_max_batch`.
    """
    shown = default if default is not None else f"{DEFAULT_MAX_BATCH} on a CPU, sized to the free memory on a GPU"
    p.add_argument("--max-batch", type=int, default=default, metavar="N", help=f"{MAX_BATCH_HELP} (default: {shown})")
    add_renamed_flag(
        p, "--batch", "--max-batch N (images per network call)", "--batch is the training batch of `aotdiff train`"
    )


def add_renamed_flag(p: argparse.ArgumentParser, old: str, new: str, why: str) -> None:
    """A hidden flag that stops parsing with one line naming its replacement (not argparse's usage dump).

    Used where a name used to mean something else on this command, so old scripts fail loudly rather than being
    read with another meaning.
    """
    p.add_argument(old, nargs="?", action=_RenamedFlag, help=argparse.SUPPRESS, new=new, why=why)


class _RenamedFlag(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, why: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.why = new, why

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> NoReturn:
        print(f"{parser.prog}: error: {self.option_strings[0]} is not a flag of `{parser.prog}`: use {self.new}; "
              f"{self.why}", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)


def add_network_flags(p: argparse.ArgumentParser) -> None:
    """``--precision`` and ``--compile`` of the generating commands (`sample`, `fid calc`, `sweep`): how the network
    runs, read into :class:`aotdiff.generate.PreparedDenoiser`. The words mean what they mean for `aotdiff train`;
    the sampler's state stays float64 whatever they say, so a seed names the same sample (up to network rounding)."""
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="network precision: 'auto' (bf16 on a "
                   "GPU that supports it, else fp32), 'fp32' (TF32 off: EDM's numerics), 'tf32' (TF32 matmuls on "
                   "CUDA) or 'bf16' (autocast); the sampler's state and ODE steps stay float64 (default: auto)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the network: minutes of compiling first, "
                   "then faster on a GPU; same results up to float32 rounding")  # fmt: skip


def add_steps_flag(p: argparse.ArgumentParser, default: int = 18) -> None:
    p.add_argument("--steps", type=int, default=default, metavar="N", help=f"{STEPS_HELP} (default: {default})")


def add_sigma_range_flags(p: argparse.ArgumentParser) -> None:
    """``--sigma-min`` / ``--sigma-max``: the noise levels the sampler's grid runs between."""
    p.add_argument("--sigma-min", type=float, default=SAMPLER_DEFAULTS.sigma_min, help="smallest noise level of the "
                   f"grid (default: {SAMPLER_DEFAULTS.sigma_min:g})")  # fmt: skip
    p.add_argument("--sigma-max", type=float, default=SAMPLER_DEFAULTS.sigma_max, help="largest noise level of the "
                   f"grid (default: {SAMPLER_DEFAULTS.sigma_max:g})")  # fmt: skip


def add_churn_flags(p: argparse.ArgumentParser) -> None:
    """EDM's stochastic sampler: ``--churn``, ``--s-min``, ``--s-max``, ``--s-noise``."""
    p.add_argument("--churn", type=float, default=SAMPLER_DEFAULTS.churn, help="EDM S_churn: noise re-injected per step; 0 = the "
                   "deterministic ODE that AOT uses (default: 0)")  # fmt: skip
    p.add_argument("--s-min", type=float, default=SAMPLER_DEFAULTS.s_min, help="with --churn: churn only where sigma >= this (EDM "
                   "S_tmin; default: 0)")  # fmt: skip
    p.add_argument("--s-max", type=float, default=SAMPLER_DEFAULTS.s_max, help="with --churn: churn only where sigma <= this "
                   "(EDM S_tmax; default: inf)")  # fmt: skip
    p.add_argument("--s-noise", type=float, default=SAMPLER_DEFAULTS.s_noise, help="with --churn: EDM S_noise, scale of the re-injected "
                   "noise (default: 1)")  # fmt: skip


def add_sampler_flags(p: argparse.ArgumentParser, *, steps: bool = True, rho: bool = True, solver: bool = True) -> None:
    """The flags of :class:`aotdiff.generate.SamplerSettings`; ``settings_from_args`` reads them back.

    A command whose ``--steps`` / ``--rho`` / ``--solver`` take a list (``sweep``) turns those off and adds its own.
    """
    if steps:
        add_steps_flag(p)
    if rho:
        p.add_argument("--rho", type=float, default=7.0, help="Karras schedule exponent: EDM uses 7, the AOT paper 90 "
                       "(unconditional) and 72 (conditional) (default: 7)")  # fmt: skip
    if solver:
        p.add_argument("--solver", choices=("heun", "euler"), default="heun", help="ODE solver: heun (2nd order) or "
                       "euler (1st order) (default: heun)")  # fmt: skip
    add_churn_flags(p)
    add_sigma_range_flags(p)


def add_dg_flags(p: argparse.ArgumentParser) -> None:
    """Discriminator Guidance (EDM-G++): a discriminator trained by `aotdiff dg train` steers the sampler."""
    g = p.add_argument_group("discriminator guidance")
    g.add_argument("--dg", type=Path, default=None, metavar="DISC", help="guide with this discriminator: an "
                   "`aotdiff dg train` run directory (or checkpoint / .safetensors), or DG's published head .pt with "
                   "--dg-classifier (default: no guidance)")  # fmt: skip
    g.add_argument("--dg-weight", type=float, default=None, metavar="W", help="guidance weight on the Euler slope "
                   "(default: 2 for unconditional models, 1 for conditional ones, as DG)")  # fmt: skip
    g.add_argument("--dg-weight2", type=float, default=None, metavar="W2", help="guidance weight on the Heun "
                   "correction (default: 0, as DG)")  # fmt: skip
    g.add_argument("--dg-sigma-max", type=float, default=None, metavar="S", help="apply the guidance only while "
                   "sigma <= S (default: what `aotdiff dg train` recorded with the discriminator: 1 for 2-D points; "
                   "DG's window, VP time <= 1 or sigma <= ~152, for images)")  # fmt: skip
    g.add_argument("--dg-boost", action=argparse.BooleanOptionalAction, default=None, help="DG's boosting: samples "
                   "judged fake get churn every 5th step and double guidance every 2nd (default: on for conditional "
                   "models, off otherwise)")  # fmt: skip
    g.add_argument("--dg-classifier", type=Path, default=None, metavar="FILE", help="ADM 32x32 classifier file "
                   "for a discriminator with the adm32 extractor (default: the path it was trained with)")  # fmt: skip


def guidance_from_args(args: argparse.Namespace, num_classes: int, device: torch.device) -> Any:
    """The :class:`aotdiff.guidance.DiscriminatorGuidance` the --dg flags ask for, or None."""
    if getattr(args, "dg", None) is None:
        return None
    from aotdiff.guidance import DiscriminatorGuidance, load_discriminator

    cond = num_classes > 0
    disc = load_discriminator(args.dg, device=device, classifier=args.dg_classifier, conditional=cond)
    if disc.num_classes and not cond:
        raise UserError(f"--dg {args.dg} is class-conditional but the model is not")
    weight = args.dg_weight if args.dg_weight is not None else (1.0 if cond else 2.0)
    boost = args.dg_boost if args.dg_boost is not None else cond
    weight2 = args.dg_weight2 if args.dg_weight2 is not None else 0.0
    return DiscriminatorGuidance(disc, weight=weight, weight2=weight2, boost=boost,
                                 sigma_max=getattr(args, "dg_sigma_max", None))  # fmt: skip


def guidance_meta(guidance: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """What to record next to results: the discriminator and the guidance settings."""
    if guidance is None:
        return None
    # The path given and the exact files read: a run directory resolves to its latest checkpoint, which moves on
    # when the discriminator trains further.
    files = getattr(guidance.discriminator, "source", "") or str(args.dg)
    return {"discriminator": str(args.dg), "discriminator_files": files, "weight": guidance.weight,
            "weight2": guidance.weight2, "boost": guidance.boost, "sigma_max": guidance.sigma_max}  # fmt: skip


def check_dg_flags(args: argparse.Namespace) -> None:
    """Guidance numbers refused before any work, like the sampler's."""
    check_dg_flags_need_dg(args)
    for flag, value in (
        ("--dg-weight", getattr(args, "dg_weight", None)),
        ("--dg-weight2", getattr(args, "dg_weight2", None)),
    ):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"{flag} must be a finite number >= 0, got {value}")
    sigma_max = getattr(args, "dg_sigma_max", None)
    if sigma_max is not None:
        from aotdiff.guidance.guide import WINDOW_SIGMA_MIN as low

        if not (math.isfinite(sigma_max) and sigma_max > low):
            raise UserError(f"--dg-sigma-max must be a number > {low:.4f} (where DG's window starts), got {sigma_max}")
    if getattr(args, "dg", None) is not None and not Path(args.dg).exists():
        raise UserError(f"--dg {args.dg}: no such file or directory (train one with `aotdiff dg train RUN --out DISC`)")


def check_dg_flags_need_dg(args: argparse.Namespace) -> None:
    """A --dg-* setting without --dg would be ignored (there is no guidance to set): refuse it, so a forgotten --dg
    does not pass for a guided result. Every --dg-* flag defaults to None, so "given" means "not None"."""
    if getattr(args, "dg", None) is not None:
        return
    for dest in ("dg_weight", "dg_weight2", "dg_sigma_max", "dg_boost", "dg_classifier"):
        value = getattr(args, dest, None)
        if value is not None:
            flag = "--no-dg-boost" if value is False else "--" + dest.replace("_", "-")
            raise UserError(f"{flag} needs --dg DISC: it sets Discriminator Guidance, which is off without a "
                            f"discriminator; add --dg DISC or drop {flag}")  # fmt: skip


def add_class_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class", dest="class_label", type=int, default=None, metavar="C", help="class label (0 to the "
                   "number of classes - 1) of a class-conditional model (default: one drawn per seed)")  # fmt: skip


def add_raw_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")


def _changed(args: argparse.Namespace, name: str) -> bool:
    """Whether a sampler flag differs from :class:`SamplerSettings`' default (a flag the command lacks has not)."""
    default = getattr(SAMPLER_DEFAULTS, name)
    return bool(getattr(args, name, default) != default)


def note_unused_churn_flags(args: argparse.Namespace) -> str:
    """A note on stderr (returned too) when ``--s-min/--s-max/--s-noise`` were changed but ``--churn`` is 0: they
    shape EDM's stochastic sampler only, so the deterministic ODE the user gets ignores them. A note, not an error:
    a script sweeping --churn down to 0 keeps the other flags on its command line."""
    changed = [f"--{k.replace('_', '-')}" for k in ("s_min", "s_max", "s_noise") if _changed(args, k)]
    if _changed(args, "churn") or not changed:
        return ""
    verb, them = ("shapes", "it") if len(changed) == 1 else ("shape", "them")
    note = (f"{command_name(args)}: note: {', '.join(changed)} only {verb} the stochastic sampler, which --churn 0 "
            f"(the default) turns off; the deterministic ODE ignores {them} (add --churn S to re-inject noise)")  # fmt: skip
    print(note, file=sys.stderr)
    return note


def variant_tag(args: argparse.Namespace) -> str:
    """What a default output name must add to the solver, steps and rho so that samples drawn another way never
    overwrite them: ``-churn40-snoise1.007``, ``-sigma0.01-50``, ``-raw``, ``-class3``, ``-dg`` (``-dg1.5`` with a
    weight); empty for the defaults, so ``samples-heun18-rho7.npz`` keeps its name."""
    parts = []
    if _changed(args, "churn"):
        parts.append(f"churn{args.churn:g}")
        if _changed(args, "s_noise"):
            parts.append(f"snoise{args.s_noise:g}")
        if _changed(args, "s_min") or _changed(args, "s_max"):
            parts.append(f"s{args.s_min:g}-{args.s_max:g}")
    if _changed(args, "sigma_min") or _changed(args, "sigma_max"):
        parts.append(f"sigma{args.sigma_min:g}-{args.sigma_max:g}")
    if getattr(args, "raw", False):
        parts.append("raw")
    if getattr(args, "class_label", None) is not None:
        parts.append(f"class{args.class_label}")
    if getattr(args, "dg", None) is not None:
        weight = getattr(args, "dg_weight", None)
        parts.append("dg" if weight is None else f"dg{weight:g}")
    return "".join(f"-{p}" for p in parts)


def settings_from_args(args: argparse.Namespace) -> SamplerSettings:
    """The sampler settings of the flags; refuses NaN, inf and out-of-range values (ValueError, one line)."""
    settings = SamplerSettings(
        steps=args.steps, rho=args.rho, solver=args.solver, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
        churn=args.churn, s_min=args.s_min, s_max=args.s_max, s_noise=args.s_noise,
    )  # fmt: skip
    note_unused_churn_flags(args)  # after the checks: a value that is refused gets its error alone
    return settings


# ------------------------------------------------------------------------------------------------ run-time helpers
def progress_bar(args: argparse.Namespace, total: int, unit: str, desc: str) -> tqdm:
    """A tqdm bar on stderr, or a silent one with ``--no-progress`` (its ``update`` still works)."""
    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, disable=bool(getattr(args, "no_progress", 0)))


def check_positive(value: int, flag: str) -> None:
    if value < 1:
        raise UserError(f"{flag} must be at least 1, got {value}")


def check_class_index(label: int | None) -> None:
    """A --class value that cannot be any model's class; the range is checked once the model is loaded."""
    if label is not None and label < 0:
        raise UserError(f"--class must be a class index >= 0, got {label}")


def check_model_path(path: Path) -> None:
    """The model argument exists (the default output folder is derived from it, so this comes first)."""
    if not path.exists():
        raise UserError(
            f"{path} does not exist; give a run directory, a checkpoint folder, a .safetensors file or an EDM .pkl"
        )


def check_output_file(path: Path, suffix: str, flag: str = "--out") -> Path:
    """Refuse an output path that cannot be written as given, before any work: wrong suffix, an existing folder, a
    parent that is a file, or a folder this process cannot write in. Creates missing parent folders."""
    if path.suffix.lower() != suffix:
        raise UserError(f"{flag} {path}: the file name must end in {suffix} (it is written exactly as given)")
    if path.is_dir():
        raise UserError(f"{flag} {path} is an existing folder; give a file name ending in {suffix}")
    check_writable_folder(path.parent, flag, path)
    return path


def check_writable_folder(folder: Path, flag: str, target: Path | None = None) -> None:
    """Create ``folder`` if needed and prove it is writable by creating and removing a file there."""
    what = f"{flag} {target if target is not None else folder}"
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{what}: '{parent}' is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".aotdiff-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what}: cannot write in '{folder}' ({e.strerror or e}); choose another location") from e


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``path`` exactly (no suffix added) via a temporary file in the same folder and a rename, so a crash or a
    full disk never leaves a half-written file under the final name. Returns ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it a normal file's permissions
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot write '{path}': {e.strerror or e}") from e
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------ training runs
def add_run_dir_flags(p: argparse.ArgumentParser) -> None:
    """What a trainer may do with an existing run directory (`train`, `dg train`: both run on RunLoop)."""
    p.add_argument("--force", action="store_true", default=False, help="resume even if the config changed")
    p.add_argument("--restart", action="store_true", default=False, help="train from scratch in an existing run "
                   "directory; its checkpoints, log and pictures are moved aside into RUN/abandoned-DATE (nothing is "
                   "deleted)")  # fmt: skip
    p.add_argument("--keep-going", action="store_true", default=False, help="train on when a periodic checkpoint "
                   "cannot be written (default: stop with an error); the final checkpoint must always be written")  # fmt: skip


def exit_status(result: Any, next_step: str) -> int:
    """Tell how a training run ended; 0 only when it trained its whole duration and saved it.

    A run stopped by a signal returns 128 + the signal (the shell's convention), so `aotdiff train ... && aotdiff
    sample ...` does not go on with an unfinished model.
    """
    where = f"{result.nimg / 1000:.1f} kimg"
    if result.interrupted:
        import signal

        cause = signal.Signals(result.signal).name if result.signal else "a stop request"
        print(f"stopped by {cause} at {where} (checkpoint saved); rerun the same command to resume", file=sys.stderr)
        return 128 + result.signal if result.signal else 1
    print(f"done: {where}; {next_step}", file=sys.stderr)
    return 0
