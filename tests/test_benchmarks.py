"""The benchmark scripts stay runnable.

They are not on any import path of the library, so nothing else would notice if a refactor broke one: every script
must import (its ``main`` guarded; siblings import each other as when run from ``benchmarks/``), and the GPU script of issue 11, which waits for a lent GPU, must run its items on a
CPU with tiny sizes and report each as a result (not as an error).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_every_benchmark_script_imports_without_running(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # as when run as a script: siblings import each other
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in a script look their module up here
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    if '__name__ == "__main__"' in path.read_text():  # a script, not a helper module of the others
        assert callable(getattr(module, "main", None)), f"{path.name} has no main()"


@pytest.mark.slow
def test_gpu_script_runs_its_sampling_checks_and_frechet_items_on_a_cpu(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    only = "check_resident_data,frechet,sample_heun35_fp32,train_ddpmpp_fp32"
    cmd = [sys.executable, str(BENCH / "gpu_perf.py"), "--smoke", "--device", "cpu", "--out", str(out), "--only", only]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    assert set(report["results"]) == {
        "check_resident_data", "frechet_2048", "sample_heun35_fp32", "train_ddpmpp_fp32_independent"
    }  # fmt: skip
    assert report["results"]["check_resident_data"]["identical_images_and_labels"] is True
    assert report["results"]["sample_heun35_fp32"]["img_per_s"] > 0
    train = report["results"]["train_ddpmpp_fp32_independent"]
    assert train["trainer_efficiency"] == pytest.approx(train["img_per_s"] / train["bare_img_per_s"])


def test_every_mutant_of_the_catalogue_still_applies() -> None:
    """tools/mutants.py lists wrong implementations the suite must catch; each entry's text must still occur exactly
    once in its file, or the runner would silently test nothing (update the entry together with the code)."""
    path = BENCH.parent / "tools" / "mutants.py"
    spec = importlib.util.spec_from_file_location("_tools_mutants", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(module.MUTANTS) >= 40
    for file, old, new, tests in module.MUTANTS:
        assert (BENCH.parent / file).read_text().count(old) == 1, f"{file}: {old!r}"
        assert old != new and tests.startswith("tests/")


def test_the_powered_study_refuses_to_mix_fds_of_different_proxy_files(monkeypatch, capsys) -> None:
    """The proxies are retrained per machine and differ between CPUs (mnist5k: 96.2 % held-out on AVX2 AMD, 95.9 %
    on AVX-512 Intel), so results scored by two recorded detector hashes are refused; unrecorded ones are warned."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("_bench_aot_power_mix", BENCH / "aot_power.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)

        def result(dataset: str, arm: str, seed: int, sha: str | None) -> dict:
            return {"dataset": dataset, "arm": arm, "seed": seed, "detector_sha256": sha}

        a, b = "a" * 64, "b" * 64
        module.check_one_detector([result("m", "i", 0, a), result("m", "h", 1, a), result("d", "i", 0, b)])
        assert capsys.readouterr().err == ""  # one file per dataset: fine
        module.check_one_detector([result("m", "i", 0, None), result("m", "h", 1, a)])
        assert "m: i/seed0 do not record their detector" in capsys.readouterr().err
        with pytest.raises(SystemExit, match=r"m: results scored by different detector files \(aaaaaaaaaaaa: i/seed0; "
                                             r"bbbbbbbbbbbb: h/seed1\)"):  # fmt: skip
            module.check_one_detector([result("m", "i", 0, a), result("m", "h", 1, b)])
    finally:
        del sys.modules[spec.name]
