"""`aotdiff fid ref | calc` and `aotdiff curvature`: the numbers they print and record are the library's maths on
the right images, the 50,000-sample protocol is enforced unless asked otherwise, and bad input gets a clear error.

The CIFAR-10-shaped path uses a randomly initialised Inception-v3 saved in pytorch-fid's state-dict layout (the real
weights are never needed) and only three images, since Inception at 299 px is slow on a CPU.
"""

import hashlib
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from aotdiff.cli import main
from aotdiff.data import load_digits
from aotdiff.generate import SamplerSettings, generate
from aotdiff.metrics import curvature_report, frechet_distance, load_proxy_detector, save_reference
from aotdiff.metrics.inception import InceptionV3
from aotdiff.train.checkpoint import load_model
from aotdiff.train.config import preset_config
from aotdiff.train.loop import train

TINY = dict(batch=32, duration_kimg=0.064, tick_kimg=0.064, snapshot_kimg=0.064, lr_rampup_kimg=0.1,
            ema_halflife_kimg=0.1, grid_seeds=4, grid_steps=2, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache folder, so the proxy network is trained here (seconds) and nothing touches ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AOTDIFF_CACHE", str(folder))
        mp.delenv("AOTDIFF_DETECTOR", raising=False)
        yield folder


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, cache):
    run = tmp_path_factory.mktemp("runs") / "digits"
    train(preset_config("digits", model_channels=16, num_blocks=1, **TINY), run, progress=False)
    return run


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "toy"
    train(preset_config("toy2d", model_channels=32, num_blocks=1, data_size=256, **TINY), run, progress=False)
    return run


def fd_brute_force(features: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance from all features at once (numpy mean / covariance), not from streamed sums."""
    return frechet_distance(
        features.mean(0), np.cov(features, rowvar=False), reference.mean(0), np.cov(reference, rowvar=False)
    )


def test_fid_ref_and_calc_on_a_digits_run_use_the_proxy_and_the_right_images(digits_run, cache, tmp_path, capsys):
    ref = tmp_path / "digits-ref.npz"
    assert main(["fid", "ref", "--data", "digits", "--out", str(ref), "--device", "cpu"]) == 0
    out = tmp_path / "result.json"
    args = ["fid", "calc", str(digits_run), "--ref", str(ref), "--num", "64", "--steps", "3", "--rho", "90",
            "--batch", "24", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    # The same 64 images, generated directly, and the whole dataset, through the same proxy network.
    proxy = load_proxy_detector("digits", 8)
    model = load_model(digits_run)
    settings = SamplerSettings(steps=3, rho=90.0)
    images = torch.cat([b.images for b in generate(model.denoiser, range(64), model.shape, settings=settings)])
    expected = fd_brute_force(
        proxy.features(images).double().numpy(), proxy.features(torch.from_numpy(load_digits().images)).double().numpy()
    )
    assert result["value"] == pytest.approx(expected, rel=1e-6)
    assert result["metric"] == "FD-digits" and result["num"] == 64 and result["nfe"] == 5
    assert result["detector"]["name"] == "proxy-cnn-digits-8px" and result["detector"]["sha256"] == proxy.sha256
    assert result["sampler"]["steps"] == 3 and result["sampler"]["rho"] == 90.0 and result["seeds"] == "0-63"
    assert result["reference"]["meta"]["num_images"] == 1797
    assert result["reference"]["meta"]["detector"]["sha256"] == proxy.sha256
    assert result["source"]["kind"] == "model" and result["source"]["coupling"] == "independent"
    assert {"time_s", "img_per_s", "aotdiff", "created", "class"} <= result.keys()
    assert f"FD-digits {result['value']:.4f}  (N = 64; detector proxy-cnn-digits-8px, SHA-256 {proxy.sha256};" in (
        printed
    )


def test_fewer_than_50k_samples_are_refused_unless_num_is_given(digits_run, cache, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    save_reference(ref, _stats(np.zeros(128), np.eye(128)))
    assert main(["fid", "calc", str(digits_run), "--ref", str(ref), "--seeds", "0-63", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        "aotdiff fid: error: --seeds 0-63 gives 64 samples, but the FID protocol uses 50,000: with fewer the "
        "distance is biased upwards and not comparable with published numbers. Pass --num 64 explicitly to compute "
        "it on fewer anyway.\n"
    )
    samples = tmp_path / "few.npz"
    np.savez(samples, images=np.zeros((5, 8, 8, 1), np.uint8))
    assert main(["fid", "calc", str(samples), "--ref", str(ref)]) == 2
    assert f"'{samples}' holds 5 samples, but the FID protocol uses 50,000" in capsys.readouterr().err
    assert main(["fid", "calc", str(samples), "--ref", str(ref), "--num", "6"]) == 2
    assert f"--num 6 asks for more samples than '{samples}' holds (5); lower --num" in capsys.readouterr().err


def _stats(mu, sigma, meta=None):
    from aotdiff.metrics import ReferenceStats

    return ReferenceStats(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), meta or {})


def _random_inception() -> InceptionV3:
    """Inception-v3 with He-scaled convolutions and mild random batch-norm statistics, so features stay O(1)."""
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):  # every tensor is overwritten below: skip the default initialisation
        net = InceptionV3()
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            tensor.zero_() if name.startswith("fc.") or name.endswith("num_batches_tracked") else None
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=g) * (2.0 / module.weight[0].numel()) ** 0.5
                )
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.weight.copy_(0.8 + 0.4 * torch.rand(module.num_features, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.num_features, generator=g))
    return net.eval()


def test_cifar_shaped_samples_with_a_pytorch_fid_detector_file(tmp_path, capsys, monkeypatch, cache):
    net = _random_inception()
    detector_file = tmp_path / "inception-random.pth"
    torch.save(net.state_dict(), detector_file)
    sha = hashlib.sha256(detector_file.read_bytes()).hexdigest()
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=images, labels=np.zeros(0, np.int64))

    # Reference N(0, 0): then FD = |mu|^2 + tr(Sigma) exactly. sqrtm of the (zero) 2048 x 2048 product is replaced
    # by its exact value, because scipy's general algorithm takes about a minute at that size on one CPU core.
    ref = tmp_path / "ref.npz"
    save_reference(
        ref, _stats(np.zeros(2048), np.zeros((2048, 2048))), {"detector": {"name": "other", "sha256": "0" * 64}}
    )
    real_sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m, *a, **k: np.zeros_like(m) if not m.any() else real_sqrtm(m))
    out = tmp_path / "fid.json"
    args = ["fid", "calc", str(samples), "--ref", str(ref), "--detector", str(detector_file), "--num", "3", "--out",
            str(out), "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    with torch.no_grad():
        features = net(InceptionV3.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2))).double().numpy()
    expected = (features.mean(0) ** 2).sum() + np.trace(np.cov(features, rowvar=False))
    result = json.loads(out.read_text())
    assert result["value"] == pytest.approx(expected, rel=1e-5) and expected > 0
    assert result["metric"] == "FID" and result["num"] == 3 and result["sampler"] is None and result["nfe"] is None
    assert result["detector"]["sha256"] == sha and result["detector"]["format"] == "state_dict"
    assert result["source"]["kind"] == "npz"
    assert f"warning: '{ref}' was computed with detector other (SHA-256 {'0' * 64}), but this evaluation uses " in (
        captured.err
    )
    assert sha in captured.out

    # Features of another length than the reference's are refused before any image is processed.
    small_ref = tmp_path / "proxy-ref.npz"
    save_reference(small_ref, _stats(np.zeros(128), np.eye(128)))
    assert main(["fid", "calc", str(samples), "--ref", str(small_ref), "--detector", str(detector_file), "--num",
                 "3", "--device", "cpu"]) == 2  # fmt: skip
    assert f"reference statistics '{small_ref}' hold 128-d features but inception-v3-2015-12-05 (pytorch-fid " in (
        capsys.readouterr().err
    )


def test_curvature_command_writes_the_report_and_its_plot(toy_run, tmp_path, capsys):
    out = tmp_path / "curv" / "report.json"
    args = ["curvature", str(toy_run), "--num", "12", "--steps", "12", "--rho", "7", "--truncation-steps", "2,4",
            "--batch", "5", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    model = load_model(toy_run)
    direct = curvature_report(model.denoiser, model.shape, range(12), fine_steps=12, truncation_steps=(2, 4))
    for key in ("curvature", "curvature_median", "one_minus_cos", "truncation_error"):
        assert report[key] == pytest.approx(direct[key], rel=1e-6), key  # float32 network, other batch size
    np.testing.assert_allclose(report["curvature_per_sigma"], direct["curvature_per_sigma"], rtol=1e-6)
    assert list(report["truncation_error"]) == ["2", "4"]
    sigmas = [s for s, _ in report["curvature_per_sigma"]]
    assert sigmas == sorted(sigmas) and sigmas[0] > 0.002 and sigmas[-1] < 80
    assert report["model"]["coupling"] == "independent" and report["num"] == 12
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"curvature: pooled {report['curvature']:.4g}, median" in printed
    assert "truncation error (heun, rho 7): 2 steps" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fid", "calc", "{digits}", "--ref", "{tmp}/missing.npz", "--num", "8"],
         "aotdiff fid: error: reference statistics '{tmp}/missing.npz' not found; create them with `aotdiff fid ref`"),
        (["sweep", "{toy}", "--metric", "kid"],
         "aotdiff sweep: error: unknown --metric 'kid'; choose one of: auto, fd, fid, w2"),
        (["sweep", "{toy}", "--ref", "{tmp}/missing.npz"],
         "aotdiff sweep: error: reference statistics '{tmp}/missing.npz' not found; create them with `aotdiff fid ref`"),
        (["sweep", "{digits}", "--metric", "fid"],
         "aotdiff sweep: error: --metric fid needs reference statistics: pass --ref REF.npz (make them with "
         "`aotdiff fid ref --data DATA --out REF.npz`)"),
        (["sweep", "{digits}", "--metric", "w2"],
         "aotdiff sweep: error: {digits}: --metric w2 is for 2-D toy runs, but it makes images (1, 8, 8)"),
        (["sweep", "{toy}", "--steps", "3,x"],
         "aotdiff sweep: error: --steps must be comma-separated integers like 3,5,8; got '3,x'"),
        (["fid", "ref", "--data", "toy:moons", "--out", "{tmp}/r.npz"],
         "aotdiff fid: error: --data toy:moons holds 2-D points, not images; toy runs are scored with W2 "
         "(aotdiff sweep RUN --metric w2)"),
        (["fid", "calc", "{toy}", "--ref", "{tmp}/ref.npz", "--num", "8"],
         "aotdiff fid: error: '{toy}' is a 2-D point model: score it with W2 (aotdiff sweep {toy} --metric w2)"),
        (["curvature", "{toy}", "--truncation-steps", "3,0"],
         "aotdiff curvature: error: --truncation-steps must list positive integers like 3,5,8; got '3,0'"),
    ],
)  # fmt: skip
def test_bad_input_gets_an_exact_error(args, message, digits_run, toy_run, tmp_path, capsys):
    save_reference(tmp_path / "ref.npz", _stats(np.zeros(128), np.eye(128)))
    names = {"digits": str(digits_run), "toy": str(toy_run), "tmp": str(tmp_path)}
    assert main([a.format(**names) for a in args] + ["--device", "cpu"]) == 2
    assert capsys.readouterr().err == message.format(**names) + "\n"


def test_fid_calc_on_a_cifar_shaped_run_with_a_detector_file(tmp_path, capsys, monkeypatch, cache):
    """A 32x32 RGB run (the CIFAR-10 shape) trained for one step, evaluated with an Inception file + reference stats."""
    rng = np.random.default_rng(1)
    data = tmp_path / "rgb32.npz"
    np.savez(data, images=rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8))
    run = tmp_path / "run"
    assert main(["train", "--preset", "small", "--data", str(data), "--model-channels", "16", "--channel-mult", "1,2",
                 "--attn-resolutions", "16", "--num-blocks", "1", "--batch", "8", "--duration-kimg", "0.008",
                 "--grid-seeds", "1", "--grid-steps", "1", "--device", "cpu", "--no-progress", "--out", str(run)]) == 0  # fmt: skip
    detector_file = tmp_path / "inception-random.pth"
    torch.save(_random_inception().state_dict(), detector_file)
    ref = tmp_path / "ref.npz"
    save_reference(ref, _stats(np.zeros(2048), np.zeros((2048, 2048))))
    real_sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m, *a, **k: np.zeros_like(m) if not m.any() else real_sqrtm(m))
    out = tmp_path / "fid.json"
    assert main(["fid", "calc", str(run), "--ref", str(ref), "--detector", str(detector_file), "--num", "2",
                 "--steps", "2", "--rho", "90", "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["metric"] == "FID" and result["num"] == 2 and result["nfe"] == 3
    assert result["sampler"]["rho"] == 90 and np.isfinite(result["value"]) and result["value"] > 0
