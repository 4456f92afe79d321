"""The skeleton every aotdiff trainer shares: run directory, resume, steps counted in images, ticks, checkpoints, stop.

:class:`RunLoop` owns what makes a run safe and observable, whatever is being trained:

* setup of the run directory (:mod:`aotdiff.train.rundir`): one writer (lock), leftovers of killed saves removed, a
  changed configuration refused unless forced, ``--restart`` moving an earlier run aside;
* resume from the newest usable checkpoint, or a refusal when checkpoints exist but none is usable;
* the loop: ``step()`` until ``duration_kimg``, a ``tick()`` (one ``log.jsonl`` line, TensorBoard scalars, the progress
  bar) every ``tick_kimg``, a ``snapshot()`` (checkpoint + pictures) every ``snapshot_kimg``, SIGINT / SIGTERM turned
  into "finish the step, save, exit";
* checkpoint writing that stops the run when the disk refuses, so no unsaved work is ever reported done.

A subclass says what is trained: :meth:`build` (networks, optimizer, data), :meth:`step` (one optimizer step,
returns its mean loss on this rank, a device tensor or a float; hand it to :meth:`record_loss`), :meth:`weights` (the state dicts to save), :meth:`extra_state` / :meth:`load_extra_state`
(optimizer, data streams, RNGs), and optionally :meth:`tick_fields` and :meth:`pictures`. The diffusion trainer
(:class:`aotdiff.train.loop.Trainer`) and the discriminator trainer of Discriminator Guidance are the two subclasses.

The configuration object needs ``to_dict()`` / ``to_json()`` and the fields ``tick_kimg``, ``snapshot_kimg``,
``keep_checkpoints``, ``batch`` (images per optimizer step, all devices), ``device``, ``threads``, and
``duration_kimg`` unless the subclass overrides :meth:`duration_nimg`.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from aotdiff.cpu import configure_threads, threads_note
from aotdiff.train import checkpoint as ckpt_io
from aotdiff.train import distributed as dist_util
from aotdiff.train import rundir
from aotdiff.train.config import RESUMABLE_CHANGES, config_diff

# Under DDP, how often the ranks agree on a stop request (SIGINT / SIGTERM): a collective every step would make every
# step wait for the device; every 16 steps delays a stop by at most 16 steps (a second or so), ticks check as well.
STOP_CHECK_STEPS = 16


class ConfigMismatchError(rundir.RunDirectoryError):
    """The run directory holds a run with a different configuration."""


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


class StopRequest:
    """Turns SIGINT / SIGTERM into a polite request: finish the step, save a checkpoint, exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> StopRequest:
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


def gather_object(state: Any, info: dist_util.DistInfo) -> list[Any]:
    """Every rank's copy of a per-rank state (dropout generators, pool streams), gathered for the checkpoint."""
    if not info.enabled:
        return [state]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, state)
    return out


def open_tensorboard(run_dir: Path, purge_step: int) -> Any:
    """TensorBoard writer, if installed. ``purge_step`` hides events logged after the checkpoint being resumed, so
    TensorBoard's view matches log.jsonl."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional dependency: pip install aotdiff[tensorboard]
        return None
    return SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)


class RunLoop:
    """Setup, resume, loop, ticks, checkpoints and stop requests of one run in one run directory (see module doc)."""

    checkpoint_format = "aotdiff/1"
    resumable_changes: frozenset[str] = RESUMABLE_CHANGES  # config fields that may change when a run is resumed

    def __init__(
        self,
        cfg: Any,
        run_dir: str | Path,
        *,
        force: bool = False,
        restart: bool = False,
        progress: bool = True,
        keep_going: bool = False,
        log: Callable[[str], None] | None = None,
    ):
        self.cfg, self.run_dir, self.keep_going = cfg, Path(run_dir), keep_going
        self.info, self.device = dist_util.init(cfg.device)
        self.say: Callable[[str], None] = log or (lambda s: tqdm.write(s, file=sys.stderr))
        if not self.info.is_main:
            self.say = lambda s: None
        if self.device.type == "cpu":
            # Too many (spinning) threads beside other jobs can slow small models tens of times: see aotdiff.cpu.
            note = threads_note(cfg.threads, configure_threads(cfg.threads))
            if note:
                self.say(note)
        self.progress = progress and self.info.is_main
        self._lock: rundir.RunLock | None = None
        self._writer: Any = None
        self.nimg, self.steps, self.elapsed = 0, 0, 0.0
        self.losses: list[float] = []  # mean loss of each step of this invocation
        self.metadata: dict[str, str] = {}
        try:
            self._setup(force, restart)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------------ subclass API
    def build(self) -> None:
        """Create networks, optimizer and data (after the run directory is secured, before the resume)."""
        raise NotImplementedError

    def step(self) -> torch.Tensor | float:
        """One optimizer step of ``cfg.batch`` images over all devices; advances ``nimg`` and ``steps``.

        Returns this rank's mean loss; a device tensor is not read until the tick (no host synchronisation)."""
        raise NotImplementedError

    def weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The (model, ema) state dicts to save as safetensors (ema may be empty)."""
        raise NotImplementedError

    def load_weights(self, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Optimizer, streams, RNG states: whatever else an exact resume needs (tensors and plain values only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def init_from(self, path: str) -> None:
        """Start from saved weights when there is no checkpoint to resume (``--init-from``)."""
        raise ValueError(f"--init-from is not supported by {type(self).__name__}")

    def duration_nimg(self) -> int:
        """Images to train on in total (called after :meth:`build`): ``cfg.duration_kimg`` unless overridden."""
        return int(round(self.cfg.duration_kimg * 1000))

    def planned_nimg(self) -> int:
        """The images seen when the run ends: whole steps of ``cfg.batch`` images, so the duration rounded up to
        a multiple of the batch (0.3 kimg at batch 128 ends at 384 images)."""
        batch = int(self.cfg.batch)
        return -(-self.total_nimg // batch) * batch if self.total_nimg > self.nimg else self.nimg

    def tick_fields(self) -> dict[str, Any]:
        """Extra fields of this tick's log line (e.g. coupling statistics); called once per tick."""
        return {}

    def pictures(self) -> None:
        """Sample grids or plots written at each snapshot (rank 0); OSError is reported as a warning."""

    def on_resume(self) -> None:
        """Called after a checkpoint was loaded (e.g. to say what was resumed)."""

    # ------------------------------------------------------------------------------------------------ setup
    def _setup(self, force: bool, restart: bool) -> None:
        created = self.info.is_main and not self.run_dir.exists()
        try:
            self._open(force, restart)
        except BaseException:
            # Refused input (no such data, a shape that does not fit, ...) found while building: a directory this
            # call created and that holds nothing but the lock is removed, so a typo leaves no empty run behind.
            if created:
                self._remove_untouched_run_dir()
            raise

    def _remove_untouched_run_dir(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        try:
            if {p.name for p in self.run_dir.iterdir()} <= {rundir.LOCK_FILE}:
                (self.run_dir / rundir.LOCK_FILE).unlink(missing_ok=True)
                self.run_dir.rmdir()
        except OSError:
            pass  # best effort: the error being raised is what the user needs to see

    def _open(self, force: bool, restart: bool) -> None:
        info, run_dir = self.info, self.run_dir
        if info.is_main:
            rundir.prepare(run_dir)
            self._lock = rundir.RunLock(run_dir).acquire()
            ckpt_io.remove_temporary(run_dir)  # debris of a killed save; safe now that we hold the lock
            if not restart:
                self._check_config(force)
        self.build()
        if restart and info.is_main:
            self._set_aside_previous_run()
        dist_util.barrier(info)
        latest = self._find_checkpoint()
        if latest is not None:
            self._load(latest)
            self.say(f"resuming {run_dir} from {latest.path.name} ({self.nimg / 1000:.1f} kimg)")
            self.on_resume()
        elif getattr(self.cfg, "init_from", ""):
            self.init_from(self.cfg.init_from)
        if info.is_main:
            rundir.write_json_atomic(run_dir / rundir.CONFIG_FILE, self.cfg.to_json() + "\n")
            self.log = rundir.JsonlLog(run_dir / rundir.LOG_FILE)
            dropped = self.log.truncate(self.nimg / 1000)
            if dropped:
                self.say(f"log.jsonl: dropped {dropped} line(s) written after the checkpoint being resumed")
            self._writer = open_tensorboard(run_dir, purge_step=self.nimg + 1)
        cfg = self.cfg
        self.total_nimg = self.duration_nimg()
        self.tick_nimg = max(int(round(cfg.tick_kimg * 1000)), 1)
        self.snap_nimg = max(int(round(cfg.snapshot_kimg * 1000)), 1)
        self._tick_losses: list[torch.Tensor | float] = []
        self._tick_start_nimg, self._tick_start_time = self.nimg, time.perf_counter()

    def _check_config(self, force: bool) -> None:
        old = rundir.read_config(self.run_dir)
        if old is None:
            return
        diff = config_diff(old, self.cfg.to_dict(), self.resumable_changes)
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
        st = ckpt.state
        try:
            self.load_weights(ckpt.model, ckpt.ema)
        except (ckpt_io.WeightsMismatchError, RuntimeError) as e:
            if isinstance(e, ckpt_io.CheckpointError):  # a checkpoint problem of its own, already said plainly
                raise
            # Reached with --force (otherwise the config check refuses first): new settings that change the network.
            detail = str(e) if isinstance(e, ckpt_io.WeightsMismatchError) else str(e).splitlines()[0]
            raise ConfigMismatchError(
                f"{ckpt.path}: {detail}. --force resumes a run with changed settings, but not with another network "
                "(architecture, width, depth, classes or data shape): use another --out for a new run"
            ) from None
        self.nimg, self.steps, self.elapsed = int(st["nimg"]), int(st["step"]), float(st["elapsed_s"])
        self.load_extra_state(st)

    # ------------------------------------------------------------------------------------------------ ticks
    def _crossed(self, interval: int) -> bool:
        return self.nimg // interval != (self.nimg - self.cfg.batch) // interval

    def tick(self) -> dict[str, Any]:
        """The log record of the steps since the last tick, written to log.jsonl and TensorBoard (rank 0)."""
        now = time.perf_counter()
        dt = now - self._tick_start_time
        self.elapsed += dt
        img_per_s = (self.nimg - self._tick_start_nimg) / max(dt, 1e-9)
        losses = self._flush_losses() or [float("nan")]
        line: dict[str, Any] = {
            "kimg": round(self.nimg / 1000, 3), "step": self.steps, "loss": sum(losses) / len(losses),
            "img_per_s": round(img_per_s, 2), "sec_per_kimg": round(1000 / max(img_per_s, 1e-9), 3),
            "time_s": round(self.elapsed, 2),
        }  # fmt: skip
        if self.device.type == "cpu":  # img/s on a CPU depends on it, and --threads 0 chooses it from the load
            line["cpu_threads"] = torch.get_num_threads()
        line.update(self.tick_fields())
        if self.info.is_main:
            self.log.append(line)
            if self._writer is not None:
                for k, v in line.items():
                    if k != "kimg" and isinstance(v, int | float):
                        self._writer.add_scalar(k, v, self.nimg)
        self._tick_losses = []
        self._tick_start_nimg, self._tick_start_time = self.nimg, time.perf_counter()
        return line

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Counters plus the subclass's extra state (every rank's share gathered by the subclass)."""
        return {"nimg": self.nimg, "step": self.steps, "elapsed_s": self.elapsed, **self.extra_state()}

    def save_checkpoint(self, reason: str, *, final: bool = False) -> Path | None:
        """Write a checkpoint (rank 0). A failure stops the run on every rank, unless ``keep_going`` was asked for
        and this is not the last save: work that is not on disk is never reported as done."""
        state = self.state_dict()
        path, error = None, ""
        if self.info.is_main:
            model, ema = self.weights()
            try:
                path = ckpt_io.save_checkpoint(
                    self.run_dir, self.nimg, model=model, ema=ema, state=state,
                    metadata={"format": self.checkpoint_format, **self.metadata, "nimg": str(self.nimg)},
                    keep=self.cfg.keep_checkpoints,
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
        """A checkpoint, then the subclass's pictures (a picture that cannot be written is only a warning)."""
        path = self.save_checkpoint(reason, final=final)
        if self.info.is_main:
            try:
                self.pictures()
            except OSError as e:
                self.say(f"warning: could not write the snapshot pictures: {e.strerror or e}")
        return path

    # ------------------------------------------------------------------------------------------------ the loop
    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Called by :meth:`step` with this rank's mean loss of the step.

        A device tensor is only kept: the losses of a tick are read, and averaged over the ranks, in one transfer and
        one collective at the tick (:meth:`_flush_losses`), so a step never waits for the device to finish."""
        self._tick_losses.append(loss)

    def _flush_losses(self) -> list[float]:
        """The mean loss over all ranks of each step since the last tick (one host sync, one all-reduce)."""
        if not self._tick_losses:
            return []
        per_step = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in self._tick_losses]
        )
        values: list[float] = dist_util.all_reduce_mean(per_step, self.info).tolist()
        first = self.steps - len(values) + 1
        bad = [first + i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            self.say(f"warning: non-finite loss at {len(bad)} step(s) from step {bad[0]} ({self.nimg / 1000:.1f} kimg)")
        self._tick_losses = []
        self.losses.extend(values)
        return values

    def progress_text(self, line: dict[str, Any]) -> str:
        return f"loss {line['loss']:.4f}, {line['img_per_s']:.0f} img/s"

    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train until the duration is reached (or a stop is requested, or ``max_steps`` steps of this call)."""
        result = TrainResult(self.run_dir, self.nimg, self.steps)
        kimg = self.planned_nimg() / 1000
        spec = ".0f" if kimg >= 100 else ".1f" if kimg >= 1 else ".3f"  # 0.384 kimg must not read "0.4/0 kimg"
        bar = tqdm(
            total=round(kimg, 3), initial=round(self.nimg / 1000, 3), unit="kimg", disable=not self.progress,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:SPEC}/{total:SPEC} kimg [{elapsed}<{remaining}{postfix}]".replace("SPEC", spec),
        )  # fmt: skip
        steps_this_run = 0
        stopper = StopRequest()
        try:
            with stopper:
                while self.nimg < self.total_nimg:
                    self.step()
                    steps_this_run += 1
                    bar.update(round(self.nimg / 1000 - bar.n, 3))
                    done = self.nimg >= self.total_nimg
                    tick_now = self._crossed(self.tick_nimg)
                    # A step count is the same on every rank; a signal may reach one rank only, and agreeing on it
                    # costs a collective (a host sync), so ranks compare signals only every few steps and at ticks.
                    stop = max_steps is not None and steps_this_run >= max_steps
                    if self.steps % STOP_CHECK_STEPS == 0 or tick_now or done or stop or not self.info.enabled:
                        stop = dist_util.any_true(stop or stopper.requested, self.info, self.device)
                    if tick_now or done or stop:
                        bar.set_postfix_str(self.progress_text(self.tick()), refresh=True)
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
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        dist_util.shutdown(self.info)

    def __enter__(self) -> RunLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
