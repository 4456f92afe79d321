"""aotdiff.cpu: the thread count chosen from the load, and passive OpenMP waiting set before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from aotdiff import cpu


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [
        (2, 0.0, 2),
        (2, 0.4, 2),
        (2, 0.6, 2),
        (2, 1.2, 1),
        (2, 1.0, 1),
        (2, 2.0, 1),
        (2, 7.5, 1),
        (16, 3.2, 13),
        (16, 0.0, 16),
        (1, 0.0, 1),
    ],
)
def test_auto_threads_takes_the_free_cores_and_at_least_one(cores, load, expected):
    assert cpu.auto_threads(cores, load) == expected


def test_configure_threads_explicit_then_environment_then_load(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert cpu.configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(cpu, "machine_load", lambda: 0.0)
        monkeypatch.setattr(cpu, "available_cores", lambda: 2)
        assert cpu.configure_threads(0) == 2 and torch.get_num_threads() == 2
        monkeypatch.setattr(cpu, "machine_load", lambda: 1.8)
        assert cpu.configure_threads(0) == 1
        assert "other jobs keep about 1 busy" in cpu.threads_note(0, 1) and cpu.threads_note(2, 2) == ""
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert cpu.configure_threads(0) == 2  # the user's environment beats the load rule
    finally:
        torch.set_num_threads(before)


def _policy_seen_by_the_cli(env: dict[str, str]) -> str:
    code = "import os, aotdiff.cli, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_the_cli_asks_for_passive_waiting_before_torch_loads_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy_seen_by_the_cli(env).strip() == "PASSIVE"
    assert _policy_seen_by_the_cli({**env, "OMP_WAIT_POLICY": "ACTIVE"}).strip() == "ACTIVE"
    # The policy is set while torch is still unloaded (OpenMP reads it when torch loads it).
    code = (
        "import sys, aotdiff.cpu as c\n"
        "orig = c.prefer_passive_waiting\n"
        "def spy():\n"
        "    print('torch loaded:', 'torch' in sys.modules)\n"
        "    return orig()\n"
        "c.prefer_passive_waiting = spy\n"
        "import aotdiff.cli\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "torch loaded: False"
    assert cpu.prefer_passive_waiting() is False  # torch is loaded in this process: too late, nothing is changed


def test_machine_load_counts_busy_cores_now():
    """A busy process beside us shows as about one busy core (the sample is current, not a 1-minute average)."""
    if cpu._cpu_times() is None:
        pytest.skip("no /proc/stat on this platform")
    code = "import time\nt = time.time()\nwhile time.time() - t < 3: pass\n"
    busy = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.5)
        loaded = cpu.machine_load(0.5)
    finally:
        busy.kill()
        busy.wait()
    assert loaded >= 0.6  # at least most of one core (other test workers may add more)


@pytest.mark.parametrize(("cores", "load", "expected"), [(2, 0.7, 2), (2, 0.8, 1), (4, 1.74, 3), (4, 1.76, 2)])
def test_a_partly_free_core_counts_only_from_a_quarter(cores, load, expected):
    """threads = max(1, ceil(free - 1/4)), free = cores - load: a fraction of a free core below 1/4 is dropped
    (2 - 0.8 = 1.2 -> 1), from 1/4 on it counts as a core (2 - 0.7 = 1.3 -> 2; 4 - 1.74 = 2.26 -> 3)."""
    assert cpu.auto_threads(cores, load) == expected


def test_cpu_times_count_idle_and_iowait_as_not_busy(monkeypatch):
    """/proc/stat 'cpu user nice system idle iowait irq softirq steal ...': busy = total - idle - iowait (a process
    waiting for the disk leaves its core free), and machine_load = busy share of the window x CPU count."""
    import io

    lines = iter(["cpu  100 20 30 400 50 6 7 8 0 0\n", "cpu  160 20 50 420 100 6 7 8 0 0\n"])
    monkeypatch.setattr(cpu, "open", lambda *a, **k: io.StringIO(next(lines)), raising=False)
    assert cpu._cpu_times() == (621.0 - 450.0, 621.0)
    # Next sample: +80 busy (user 60, system 20), +20 idle, +50 iowait -> 80 / 150 of the time busy.
    assert cpu._cpu_times() == (171.0 + 80.0, 771.0)
    samples = iter([(171.0, 621.0), (251.0, 771.0)])
    monkeypatch.setattr(cpu, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(cpu.time, "sleep", lambda s: None)
    monkeypatch.setattr(cpu.os, "cpu_count", lambda: 6)
    assert cpu.machine_load(0.5) == pytest.approx(80.0 / 150.0 * 6)


@pytest.mark.parametrize(
    "argv",
    [["sample", "RUN"], ["fid", "ref", "--data", "DATA", "--out", "r.npz"], ["fid", "calc", "RUN", "--ref", "r.npz"],
     ["curvature", "RUN"], ["sweep", "RUN"], ["convert", "IN.pkl", "--out", "o.safetensors"],
     ["bench", "sample"], ["bench", "train"]],
)  # fmt: skip
def test_every_command_that_runs_a_network_takes_threads_and_main_applies_it(argv, monkeypatch):
    """`--threads N` sets torch's intra-op threads before the command runs (0 = the automatic choice)."""
    from aotdiff.cli import build_parser, main

    parser = build_parser(argv)
    assert parser.parse_args([*argv, "--threads", "3"]).threads == 3
    assert parser.parse_args(argv).threads == 0
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--threads", "-1"])
    if argv[0] == "bench":
        return  # it applies --threads in its own setup, with the config (tests/test_cli.py, test_benchmarks.py)
    asked = []
    monkeypatch.setattr(cpu, "configure_threads", lambda n=0: asked.append(n) or max(n, 1))
    for n in (0, 1, 2):
        main([*argv, "--threads", str(n)])  # the inputs do not exist: the command fails after the threads are set
    assert asked == [0, 1, 2]
