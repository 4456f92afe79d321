"""The run directory is the user's data: locks, a log that matches the checkpoints, refusals instead of silent loss.

Each test here failed on the trainer before the hardening issue (8): a full disk reported success, two trainings
shared a directory, the log kept lines from after the resumed checkpoint, unusable checkpoints were silently
replaced by a fresh run, and so on.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aotdiff.cli import main
from aotdiff.train import checkpoint as ckpt_io
from aotdiff.train.config import preset_config, validate
from aotdiff.train.loop import CheckpointWriteError, Trainer, resolve_pools, train
from aotdiff.train.rundir import JsonlLog, RunDirectoryError, RunInUseError, prepare
from test_train import tiny

TINY_CLI = ["--preset", "toy2d", "--model-channels", "32", "--num-blocks", "1", "--batch", "64", "--data-size", "512",
            "--tick-kimg", "0.064", "--grid-seeds", "4", "--grid-steps", "2", "--device", "cpu", "--no-progress",
            "--threads", "1"]  # fmt: skip


def kimgs(run: Path) -> list[float]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [json.loads(line)["kimg"] for line in lines]  # every line must be valid JSON


# ------------------------------------------------------------------------------------------------ 1. full disk
def _disk_full(path, data):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_final_checkpoint_that_cannot_be_written_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_io, "_fsync_write", _disk_full)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*Training stopped at 0.1 kimg"):
        train(tiny(duration_kimg=0.128, snapshot_kimg=10), tmp_path / "run", progress=False)
    assert ckpt_io.list_checkpoints(tmp_path / "run") == []


def test_a_failed_periodic_checkpoint_stops_unless_keep_going(tmp_path, monkeypatch):
    real = ckpt_io._fsync_write
    calls = {"n": 0}

    def first_save_fails(path, data):  # the snapshot at 0.128 kimg fails, later ones succeed
        if Path(path).parent.name.startswith(".tmp-0000000128"):
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt_io, "_fsync_write", first_save_fails)
    cfg = tiny(duration_kimg=0.384, snapshot_kimg=0.128)
    with pytest.raises(CheckpointWriteError, match="--keep-going"):
        train(cfg, tmp_path / "stop", progress=False)
    assert max(kimgs(tmp_path / "stop")) == pytest.approx(0.128)  # stopped at the failed save
    result = train(cfg, tmp_path / "go", progress=False, keep_going=True)
    assert result.nimg == 384 and not result.interrupted
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path / "go")] == ["0000000256", "0000000384"]


def test_cli_exits_non_zero_when_the_checkpoint_cannot_be_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ckpt_io, "_fsync_write", _disk_full)
    code = main(["train", *TINY_CLI, "--kimg", "0.064", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and "done:" not in err  # the machine refused: 1, not 2


def test_log_lines_record_the_cpu_threads_in_use_not_the_flag(tmp_path, monkeypatch):
    """--threads 0 (automatic) with OMP_NUM_THREADS=1: every log line says 1 thread, the number the step ran on."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert TINY_CLI[-2:] == ["--threads", "1"]
    cli = [*TINY_CLI[:-2], "--threads", "0"]
    assert main(["train", *cli, "--kimg", "0.128", "--out", str(tmp_path / "run")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(x["cpu_threads"] == 1 for x in lines)


# ------------------------------------------------------------------------------------------------ 2. the lock
def test_a_second_trainer_on_the_same_directory_is_refused(tmp_path):
    cfg = tiny(duration_kimg=0.128)
    with (
        Trainer(cfg, tmp_path / "run", progress=False),
        pytest.raises(RunInUseError, match=rf"in use by pid {os.getpid()}"),
    ):
        Trainer(cfg, tmp_path / "run", progress=False)
    with Trainer(cfg, tmp_path / "run", progress=False) as t:  # released when the first one closed
        assert t.run().nimg == 128


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and flock")
def test_concurrent_cli_refused_then_kill_9_leaves_no_stuck_lock_and_a_clean_log(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "aotdiff", "train", *TINY_CLI, "--kimg", "1000", "--snapshot-kimg", "0.192",
           "--out", str(run)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 120
        while len(ckpt_io.list_checkpoints(run)) < 1 and time.time() < deadline:  # a checkpoint, then more log
            time.sleep(0.1)
        while len(kimgs(run)) < 5 and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.time()
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        assert second.returncode != 0 and f"in use by pid {first.pid}" in second.stderr
        assert time.time() - t0 < 30
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"kimg": 99.0, "loss": 0.5, "img_p')  # a torn last line, as a kill mid-write leaves it
    resumed_from = ckpt_io.load_latest(run).state["nimg"] / 1000
    short = [*cmd[: cmd.index("--kimg")], "--kimg", f"{resumed_from + 0.128:.3f}", *cmd[cmd.index("--kimg") + 2 :]]
    again = subprocess.run(short, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    k = kimgs(run)
    assert all(b > a for a, b in zip(k, k[1:])), k
    assert k == pytest.approx([round(0.064 * i, 3) for i in range(1, len(k) + 1)])
    assert k[-1] == pytest.approx(resumed_from + 0.128)


# ------------------------------------------------------------------------------------------------ 3. the log
def test_log_is_cut_back_to_the_checkpoint_being_resumed(tmp_path):
    cfg = tiny(duration_kimg=0.384, snapshot_kimg=0.128)
    full = train(cfg, tmp_path / "full", progress=False)
    cut = tmp_path / "cut"
    train(cfg, cut, progress=False, max_steps=3)  # checkpoint at 0.192
    # What a kill -9 leaves: lines logged after the checkpoint, then a torn line.
    with open(cut / "log.jsonl", "a") as f:
        f.write(json.dumps({"kimg": 0.256, "loss": 9.0}) + "\n" + '{"kimg": 0.32, "lo')
    second = train(cfg, cut, progress=False)
    assert kimgs(cut) == kimgs(tmp_path / "full")
    logged = [json.loads(x)["loss"] for x in (cut / "log.jsonl").read_text().splitlines()]
    assert logged[3:] == pytest.approx(second.losses, abs=1e-12)
    assert logged == pytest.approx(full.losses, abs=1e-12)


def test_jsonl_log_truncation_keeps_only_increasing_valid_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"kimg": 1}\n{"kimg": 2}\nnot json\n{"kimg": 2}\n[1, 2]\n{"kimg": 3}\n{"kimg": 4}\n{"kimg": 5')
    log = JsonlLog(path)
    assert log.truncate(3.0) == 5
    assert path.read_text() == '{"kimg": 1}\n{"kimg": 2}\n{"kimg": 3}\n'
    log.append({"kimg": 3.5})
    assert [r["kimg"] for r in log.records()] == [1, 2, 3, 3.5]
    assert log.truncate(0) == 4 and path.read_text() == ""


def test_tensorboard_hides_what_was_logged_after_the_checkpoint(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

    cfg = tiny(duration_kimg=0.384, snapshot_kimg=0.192, tick_kimg=0.064)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    for ckpt in ckpt_io.list_checkpoints(run)[1:]:  # fall back to the checkpoint at 0.192 kimg
        shutil.rmtree(ckpt)
    train(cfg, run, progress=False)
    events = []
    for f in sorted((run / "tb").glob("events.*")):
        acc = accumulator.EventAccumulator(str(f))
        acc.Reload()
        events += [e.step for e in acc.Scalars("loss")]
    # Each run's file holds its own steps; steps logged after 192 images by the first run are purged on resume.
    assert sorted(set(events)) == [64, 128, 192, 256, 320, 384]
    # TensorBoard's view of the folder: the resumed writer's purge marker (purge_step = nimg + 1 = 193) drops the
    # first run's 256..384 (logged after the checkpoint) but keeps its 192 (logged at it, and never logged again), so
    # every step shows exactly once.
    folder = accumulator.EventAccumulator(str(run / "tb"))
    folder.Reload()
    assert [e.step for e in folder.Scalars("loss")] == [64, 128, 192, 256, 320, 384]


# ------------------------------------------------------------------------------------------------ 4. no silent restart
def _make_unresumable(run: Path) -> None:
    for ckpt in ckpt_io.list_checkpoints(run):
        (ckpt / "state.pt").unlink()


def test_unusable_checkpoints_are_refused_not_silently_replaced(tmp_path):
    cfg = tiny(duration_kimg=0.256, snapshot_kimg=0.128)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    _make_unresumable(run)
    weights = (ckpt_io.list_checkpoints(run)[-1] / "ema.safetensors").read_bytes()
    with pytest.warns(UserWarning), pytest.raises(RunDirectoryError, match=r"(?s)none can be resumed.*--restart"):
        train(cfg, run, progress=False)
    assert (ckpt_io.list_checkpoints(run)[-1] / "ema.safetensors").read_bytes() == weights  # untouched

    # --init-from: the saved weights, a fresh optimizer and counters, in a new directory.
    newest = ckpt_io.list_checkpoints(run)[-1]
    with Trainer(tiny(duration_kimg=0.256, init_from=str(newest)), tmp_path / "init", progress=False) as t:
        saved, _ = ckpt_io.read_weights(newest / "model.safetensors")
        assert t.nimg == 0
        for k, v in t.net.state_dict().items():
            torch.testing.assert_close(v, saved[k])
    # --restart: from scratch, the old files moved aside, nothing deleted.
    result = train(cfg, run, progress=False, restart=True)
    assert result.nimg == 256
    aside = list(run.glob("abandoned-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoints").is_dir() and (aside[0] / "log.jsonl").is_file()


def test_sampling_a_run_that_has_no_checkpoint_yet_says_it_is_training(tmp_path):
    """A run directory whose lock names a live process of this host is training: say so (not "train first");
    a lock file left by a process that has ended changes nothing."""
    import socket

    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".lock"
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "aotdiff", "train"])
    try:
        cmdline, deadline = Path(f"/proc/{trainer.pid}/cmdline"), time.monotonic() + 20
        while cmdline.exists() and b"aotdiff" not in cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)  # between fork and exec the child still shows pytest's command line
        lock.write_text(f"pid {trainer.pid} on {socket.gethostname()} (aotdiff train)\n")
        with pytest.raises(ckpt_io.CheckpointError, match=r"holds no checkpoint yet: it is training \(pid \d+ on "):
            ckpt_io.resolve_weights(run)
    finally:
        trainer.kill()
        trainer.wait()
    own = Path(f"/proc/{os.getpid()}/cmdline")
    if own.exists() and b"aotdiff" not in own.read_bytes():  # a live pid reused by another program (here: pytest)
        lock.write_text(f"pid {os.getpid()} on {socket.gethostname()} (aotdiff train)\n")
        with pytest.raises(ckpt_io.CheckpointError, match="holds no usable checkpoint; train first"):
            ckpt_io.resolve_weights(run)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"pid {int(ended.stdout)} on {socket.gethostname()} (aotdiff train)\n")
    with pytest.raises(ckpt_io.CheckpointError, match="holds no usable checkpoint; train first"):
        ckpt_io.resolve_weights(run)


def test_the_progress_bar_total_is_where_the_run_ends(tmp_path, capsys):
    """A duration that is not a whole number of steps ends at the next whole step (0.1 kimg at batch 64: 128 images),
    and the progress bar's total says so, not 0.1 (which read "0.1/0 kimg", 128 %)."""
    with Trainer(tiny(duration_kimg=0.1, tick_kimg=0.064), tmp_path / "run") as t:
        assert t.planned_nimg() == 128
        result = t.run()
    assert result.nimg == 128
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any("100%" in line and "0.128/0.128 kimg" in line for line in bar), bar


def _error_line(err: str) -> str:
    """The one error line of a refused command (the lines before it are the run's usual notes), checked short."""
    errors = [line for line in err.splitlines() if line.startswith("aotdiff train: error: ")]
    assert len(errors) == 1 and len(errors[0]) < 600 and "Traceback" not in err, err
    return errors[0]


def test_force_or_init_from_with_another_network_is_one_short_line_not_a_traceback(tmp_path, capsys):
    """--force may change settings, not the network: a wider U-Net against the saved weights is refused in one line
    that says how they differ (torch's own error lists every key: tens of kB), and so is --init-from."""
    run = tmp_path / "run"
    assert main(["train", *TINY_CLI, "--kimg", "0.064", "--snapshot-kimg", "0.064", "--out", str(run)]) == 0
    capsys.readouterr()
    wide = [*TINY_CLI, "--model-channels", "48", "--kimg", "0.128"]
    assert main(["train", *wide, "--force", "--out", str(run)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "of another shape (e.g. '" in err and "[32, " in err and "[48, " in err  # an example with both shapes
    assert "--force resumes a run with changed settings, but not with another network" in err
    newest = ckpt_io.list_checkpoints(run)[-1]
    assert main(["train", *wide, "--init-from", str(newest), "--out", str(tmp_path / "init")]) == 2
    err = _error_line(capsys.readouterr().err)
    assert f"--init-from {newest}: " in err and "of another shape" in err and "use weights of the same preset" in err


def test_weights_mismatch_names_each_kind_of_difference():
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 4))
    other = torch.nn.Sequential(torch.nn.Linear(2, 3)).state_dict()
    other["2.weight"] = torch.zeros(1)
    problem = ckpt_io.weights_mismatch(net, other)
    assert problem == (
        "2 tensor(s) of the network missing from the file (e.g. '1.weight'); 1 tensor(s) the network does not have "
        "(e.g. '2.weight'); 2 of another shape (e.g. '0.weight': [3, 2] in the file, [4, 2] in the network)"
    )
    assert ckpt_io.weights_mismatch(net, net.state_dict()) == ""
    with pytest.raises(ckpt_io.WeightsMismatchError, match="^the file do not fit this network: 2 tensor"):
        ckpt_io.load_matching(net, other, "the file")


# ------------------------------------------------------------------------------------------------ 5. leftovers, signals
def test_leftover_temporary_folders_are_removed_at_start(tmp_path):
    run = tmp_path / "run"
    debris = run / "checkpoints" / ".tmp-0000000064-999999"
    debris.mkdir(parents=True)
    (debris / "model.safetensors").write_bytes(b"half")
    with Trainer(tiny(duration_kimg=0.128), run, progress=False):
        assert not debris.exists()


# ------------------------------------------------------------------------------------------------ 6-9. contracts
def test_kimg_is_the_documented_training_length(tmp_path):
    assert main(["train", *TINY_CLI, "--kimg", "0.128", "--out", str(tmp_path / "a")]) == 0
    assert kimgs(tmp_path / "a")[-1] == pytest.approx(0.128)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["duration_kimg"] == 0.128
    assert main(["train", *TINY_CLI, "--duration-kimg", "0.064", "--out", str(tmp_path / "b")]) == 0  # alias
    assert kimgs(tmp_path / "b")[-1] == pytest.approx(0.064)


def test_dry_run_of_a_dataset_preset_needs_no_data(capsys, tmp_path):
    assert main(["train", "--preset", "cifar10-uncond", "--dry-run", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    # NCSN++ of the AOT paper (EDM's CIFAR-10 layout with the 9 augmentation labels): 56,397,827 parameters
    assert "parameters: 56,397,827" in out and "pass --data PATH" in out
    assert "4 pools of 512 per step = 1 device(s) x 4 (--aot-pools 4)" in out
    assert not (tmp_path / "r").exists()
    # Without --dry-run the data is still required, before any work.
    assert main(["train", "--preset", "cifar10-uncond", "--out", str(tmp_path / "r")]) == 2
    assert "needs a dataset: pass --data PATH" in capsys.readouterr().err


def test_train_help_shows_the_chosen_presets_values(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--preset", "cifar10-uncond", "--help"])
    text = capsys.readouterr().out
    assert "--kimg" in text and "(cifar10-uncond preset: 200000.0)" in text and "(digits preset:" not in text


def test_classwise_pairing_without_conditioning_is_refused():
    with pytest.raises(ValueError, match="--aot-classwise yes .* add --cond"):
        validate(preset_config("digits", coupling="aot", aot_classwise="yes"))
    validate(preset_config("digits", coupling="aot", aot_classwise="yes", cond=True))


@pytest.mark.parametrize(
    ("preset", "world", "pools", "note"),
    [
        ("cifar10-uncond", 1, 4, "slices of 64 rows"),
        ("cifar10-uncond", 2, 2, "slices of 64 rows"),
        ("cifar10-uncond", 4, 1, "slices of 64 rows"),
        ("cifar10-cond", 1, 4, "4 pools of 2048"),
        ("cifar10-uncond", 8, 1, "the paper used 4"),
        ("digits", 1, 1, ""),
    ],
)
def test_the_paper_pools_are_emulated_on_fewer_devices(preset, world, pools, note):
    cfg = preset_config(preset, data="x", **({"coupling": "aot"} if preset == "digits" else {}))
    got, text = resolve_pools(cfg, world)
    assert got == pools and note in text
    assert resolve_pools(preset_config(preset, data="x", coupling="aot", aot_pools=2), world)[0] == 2  # explicit


# ------------------------------------------------------------------------------------------------ 13-14. bad input
@pytest.mark.parametrize(
    ("flag", "value"),
    [("--ema-halflife-kimg", "-1"), ("--lr", "nan"), ("--kimg", "inf"), ("--grid-seeds", "-1"),
     ("--lr-rampup-kimg", "nan"), ("--dropout", "nan"), ("--grid-steps", "0"), ("--aot-pool", "0")],
)  # fmt: skip
def test_every_number_is_validated_before_any_work(tmp_path, capsys, flag, value):
    assert main(["train", *TINY_CLI, flag, value, "--out", str(tmp_path / "run")]) == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unusable_run_directories_give_one_line_errors(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main(["train", *TINY_CLI, "--out", str(afile)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    (tmp_path / "notobj").mkdir()
    (tmp_path / "notobj" / "config.json").write_text("[1, 2, 3]")
    assert main(["train", *TINY_CLI, "--out", str(tmp_path / "notobj")]) == 2
    assert "holds a JSON list, not the object" in capsys.readouterr().err

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(RunDirectoryError, match="cannot write to the run directory .*Read-only file system"):
        prepare(tmp_path / "ro")


def test_absurd_class_labels_are_refused(tmp_path):
    import numpy as np

    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 2, 10**12]))
    cfg = preset_config("small", data=str(tmp_path / "d.npz"), cond=True, device="cpu")
    with pytest.raises(ValueError, match=r"labels up to 1,000,000,000,000.*renumber"):
        train(cfg, tmp_path / "run", progress=False)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_state_file_with_code_is_skipped_like_a_corrupt_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny(duration_kimg=0.256, snapshot_kimg=0.128)
    train(cfg, tmp_path / "run", progress=False)
    newest = ckpt_io.list_checkpoints(tmp_path / "run")[-1]
    data = pickle.dumps({"nimg": _Payload()})
    (newest / "state.pt").write_bytes(data)
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"bytes": len(data), "sha256": ckpt_io._sha256(data)}  # manifest-valid
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning) as record:
        latest = ckpt_io.load_latest(tmp_path / "run")
    assert latest.state["nimg"] == 128  # fell back to the previous checkpoint
    text = " ".join(str(w.message) for w in record)
    assert "refused without running anything" in text and "weights_only=False" not in text
    assert not (tmp_path / "PWNED").exists()


def test_a_truncated_weights_file_is_a_checkpoint_error(tmp_path):
    train(tiny(duration_kimg=0.064), tmp_path / "run", progress=False)
    weights = ckpt_io.list_checkpoints(tmp_path / "run")[-1] / "ema.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ckpt_io.CheckpointError, match="not a readable .safetensors file"):
        ckpt_io.load_model(cut)


# ------------------------------------------------------------------------------------------------ weights files
def test_checkpoint_files_hold_the_live_and_the_ema_weights_and_loading_picks_the_ema(tmp_path):
    """model.safetensors = the weights being trained, ema.safetensors = their average, and sampling reads the EMA
    (EDM's snapshots sample from the EMA network). A swap of either pair leaves every other test green."""
    run = tmp_path / "run"
    with Trainer(tiny(), run, progress=False, log=lambda s: None) as t:
        for _ in range(6):
            t.step()
        path = t.save_checkpoint("test")
        live = {k: v.detach().clone() for k, v in t.net.state_dict().items()}
        ema = {k: v.detach().clone() for k, v in t.ema.module.state_dict().items()}
    assert path is not None
    assert max(float((live[k] - ema[k]).abs().max()) for k in live) > 1e-6  # the two really differ
    saved = ckpt_io.load_checkpoint(path)
    for which, expected in ((saved.model, live), (saved.ema, ema)):
        assert which.keys() == expected.keys()
        assert all(torch.equal(which[k], expected[k]) for k in expected)
    for use_ema, expected in ((True, ema), (False, live)):
        loaded = ckpt_io.load_model(run, ema=use_ema).denoiser.state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), f"ema={use_ema}"
    assert ckpt_io.resolve_weights(run, ema=False).name == "model.safetensors"
    assert ckpt_io.resolve_weights(path, ema=True).name == "ema.safetensors"


def test_a_weights_file_keeps_its_sigma_data(tmp_path):
    """A converted model (EDM's sigma_data in the metadata) is preconditioned with that sigma_data, not 0.5."""
    from safetensors.torch import save_file

    from aotdiff.diffusion import Precond

    run = tmp_path / "run"
    train(tiny(duration_kimg=0.128, snapshot_kimg=0.128), run, progress=False, log=lambda s: None)
    tensors, meta = ckpt_io.read_weights(ckpt_io.resolve_weights(run))
    save_file(tensors, str(tmp_path / "sd.safetensors"), metadata={**meta, "sigma_data": "0.6"})
    loaded = ckpt_io.load_model(tmp_path / "sd.safetensors").denoiser
    assert loaded.sigma_data == 0.6
    reference = Precond(ckpt_io.load_model(run).denoiser.net, sigma_data=0.6).eval()
    x, sigma = torch.randn(5, 2), torch.tensor([0.01, 0.3, 1.0, 4.0, 50.0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma), reference(x, sigma), rtol=0, atol=0)
        assert not torch.allclose(loaded(x, sigma), ckpt_io.load_model(run).denoiser(x, sigma))


def test_resume_refuses_every_change_to_what_is_trained():
    """Only settings that cannot change the trained model may differ on resume: the resumable set is exactly the
    documented one, and a change to any other field (e.g. the AOT pool size or the seed) is reported by config_diff."""
    import dataclasses

    from aotdiff.train.config import RESUMABLE_CHANGES, TrainConfig, config_diff

    assert {
        "duration_kimg", "tick_kimg", "snapshot_kimg", "keep_checkpoints", "grid_seeds", "grid_steps", "device",
        "aot_prefetch", "aot_backend", "compile", "threads", "init_from", "aot_recipe", "precision", "channels_last",
    } == RESUMABLE_CHANGES  # fmt: skip
    old = preset_config("toy2d", coupling="aot").to_dict()
    trained = {f.name for f in dataclasses.fields(TrainConfig)} - RESUMABLE_CHANGES
    assert {"aot_pool", "aot_pools", "seed", "batch", "lr", "data", "coupling", "cond"} <= trained
    for name in sorted(trained):
        value = old[name]
        changed = (not value) if isinstance(value, bool) else [*value, 1] if isinstance(value, list) else (
            value + 1 if isinstance(value, int | float) else f"{value}-other"
        )  # fmt: skip
        diff = config_diff(old, {**old, name: changed})
        assert len(diff) == 1 and diff[0].startswith(f"{name}: "), (name, diff)
    assert config_diff(old, {**old, "duration_kimg": 5.0, "aot_pool": old["aot_pool"]}) == []


def test_validation_bounds_are_exact_at_the_edges():
    """At the boundary of each range: exclusive bounds refuse the bound itself (lr 0, kimg 0, an EMA half-life of 0,
    tick / snapshot 0, dropout 1), inclusive ones accept it (a warm-up of 0, batch-gpu 0 = auto, no grid, augment 1)."""
    for name in ("lr", "duration_kimg", "ema_halflife_kimg", "tick_kimg", "snapshot_kimg"):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            validate(preset_config("toy2d", **{name: 0.0}))
    for name, value in [("lr_rampup_kimg", 0.0), ("ema_rampup_ratio", 0.0), ("batch_gpu", 0), ("grid_seeds", 0),
                        ("aot_pools", 0), ("seed", 0), ("threads", 0), ("augment", 1.0), ("dropout", 0.99)]:  # fmt: skip
        validate(preset_config("toy2d", **{name: value}))
    for name, value in [("batch", 0), ("keep_checkpoints", 0), ("grid_steps", 0), ("data_size", 0), ("aot_pool", 0)]:
        with pytest.raises(ValueError, match=r"must be a finite number >= 1"):
            validate(preset_config("toy2d", **{name: value}))
    with pytest.raises(ValueError, match=r"--dropout in \[0, 1\)"):
        validate(preset_config("toy2d", dropout=1.0))
    with pytest.raises(ValueError, match=r"--augment must lie in \[0, 1\]"):
        validate(preset_config("toy2d", augment=1.01))


def test_refused_input_leaves_no_run_directory_behind_but_keeps_one_that_existed(tmp_path, capsys):
    """Data that does not exist is found while the trainer builds, after the lock is taken: the directory this call
    created (holding only .lock) is removed; a directory the user had made, and anything with content, stays."""
    new = tmp_path / "typo-run"
    assert main(["train", "--preset", "toy2d", "--data", str(tmp_path / "nope"), "--out", str(new), "--threads", "1",
                 "--no-progress"]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err and not new.exists()
    assert main(["dg", "train", str(tmp_path / "no-base"), "--out", str(tmp_path / "disc"), "--threads", "1"]) == 2
    assert not (tmp_path / "disc").exists()
    kept = tmp_path / "made-by-user"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine\n")
    assert main(["train", "--preset", "toy2d", "--data", str(tmp_path / "nope"), "--out", str(kept), "--threads", "1",
                 "--no-progress"]) == 2  # fmt: skip
    assert (kept / "notes.txt").read_text() == "mine\n"
    empty = tmp_path / "empty-by-user"
    empty.mkdir()
    assert main(["train", "--preset", "toy2d", "--data", str(tmp_path / "nope"), "--out", str(empty), "--threads",
                 "1", "--no-progress"]) == 2  # fmt: skip
    assert empty.is_dir()
