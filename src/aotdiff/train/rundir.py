"""The run directory is the user's data: one writer at a time, a log that matches the checkpoints, nothing half-done.

* :class:`RunLock` — an advisory ``flock`` on ``RUN/.lock`` held for the whole run. A second ``aotdiff train`` on
  the same directory is refused at once, naming the process that holds it; the kernel drops the lock when that
  process dies (even by ``kill -9``), so a crash never leaves the directory stuck.
* :class:`JsonlLog` — ``RUN/log.jsonl``, one JSON object per line. On resume it is cut back to the checkpoint being
  resumed (lines beyond it, duplicates and a torn last line are dropped), so after any crash and resume the log
  holds strictly increasing ``kimg`` and every line is valid JSON.
* :func:`read_config` / :func:`write_json_atomic` — ``config.json``, refused with a clear message when it is not a
  JSON object.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

LOCK_FILE = ".lock"
LOG_FILE = "log.jsonl"
CONFIG_FILE = "config.json"


class RunDirectoryError(ValueError):
    """The run directory cannot be used as asked; the message says why and what to do."""


class RunInUseError(RunDirectoryError):
    """Another process is training in this run directory."""


def write_json_atomic(path: Path, payload: str) -> None:
    """Write ``payload`` to ``path`` so that a reader sees either the old file or the new one, never a mix."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare(run_dir: Path) -> None:
    """Create the run directory, or explain in one line why it cannot be used (a file, read-only, no permission)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"--out {run_dir} is an existing file, not a directory; choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirectoryError(
            f"cannot write to the run directory {run_dir}: {e.strerror or e}; choose a writable --out"
        ) from e


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The configuration saved in ``RUN/config.json``; None if there is none."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise RunDirectoryError(f"{path} is unreadable ({e}); use another --out or fix the file") from e
    if not isinstance(old, dict):
        raise RunDirectoryError(
            f"{path} holds a JSON {type(old).__name__}, not the object aotdiff writes; use another --out or "
            "remove the file (the checkpoints hold the configuration too)"
        )
    return old


# ------------------------------------------------------------------------------------------------ the lock
class RunLock:
    """Exclusive use of a run directory by one process, released by the kernel when the process ends."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._file: TextIO | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the directory is not protected there
            return self
        f = open(self.path, "a+")  # noqa: SIM115 - held open (and locked) for the whole run
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunInUseError(
                f"{self.path.parent} is in use by {holder}; wait for it to finish (or stop it: it saves a "
                "checkpoint on SIGTERM), or choose another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv[:1] + sys.argv[1:4])})\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def running_holder(run_dir: str | os.PathLike[str]) -> str | None:
    """Who holds ``run_dir``'s lock now ("pid N on HOST (...)"), or None when no live process on this machine does.

    Read from the lock file, without taking the lock (a probe could make a starting run think the directory is in
    use): a process of this host that is still alive, under the pid the file names, and (where /proc shows it) an
    aotdiff process, since the file outlives its run and pids are reused."""
    try:
        text = (Path(run_dir) / LOCK_FILE).read_text().strip()
        pid, host = text.split()[1], text.split()[3]
        if host != socket.gethostname():
            return None
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        cmdline = Path(f"/proc/{int(pid)}/cmdline")
        if cmdline.exists() and b"aotdiff" not in cmdline.read_bytes():
            return None
    except (OSError, IndexError, ValueError):
        return None
    return text


# ------------------------------------------------------------------------------------------------ the log
class JsonlLog:
    """``log.jsonl``: appended one line per tick, cut back to a checkpoint on resume."""

    def __init__(self, path: Path):
        self.path = path

    def _lines(self) -> list[str]:
        return self.path.read_text(errors="replace").splitlines() if self.path.is_file() else []

    def records(self) -> Iterator[dict[str, Any]]:
        """The valid lines (JSON objects with a finite ``kimg``); torn or foreign lines are skipped."""
        yield from _valid_records(self._lines())

    def truncate(self, kimg: float) -> int:
        """Keep the lines up to and including ``kimg`` (strictly increasing), drop the rest; returns lines dropped.

        Called on resume with the checkpoint's kimg: what was logged after that checkpoint is about to be trained
        again and logged anew. A fresh start (``kimg`` 0) empties the log.
        """
        if not self.path.exists():
            return 0
        lines = self._lines()
        kept: list[dict[str, Any]] = []
        for rec in _valid_records(lines):
            if rec["kimg"] <= kimg + 1e-9 and (not kept or rec["kimg"] > kept[-1]["kimg"]):
                kept.append(rec)
        if len(kept) == len(lines) and self.path.read_bytes().endswith(b"\n") == bool(lines):
            return 0  # already clean: leave the file alone
        write_json_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return len(lines) - len(kept)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def _valid_records(lines: list[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("kimg"), int | float) and math.isfinite(rec["kimg"]):
            yield rec
