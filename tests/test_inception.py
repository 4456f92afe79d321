"""Inception-v3 detector: both weight formats give the same features, hashes are checked, files are found or explained.

The real weight files are never needed: the tests build our architecture with random weights and save it the two
ways the published files are laid out (a pytorch-fid state dict; a TorchScript archive inside a StyleGAN-style
persistence pickle, as EDM's ``inception-2015-12-05.pkl``).
"""

import hashlib
import io
import os
import pickle
import sys
import types
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aotdiff.metrics.inception import (
    DetectorFileError,
    InceptionDetector,
    InceptionV3,
    _avg_pool_same,
    find_detector_file,
    load_inception_detector,
    load_torchscript_from_pickle,
)

PWNED = "_aotdiff_test_pickle_code_ran"
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # TorchScript is the file format


def _random_inception(seed: int = 0) -> InceptionV3:
    """Our network with He-initialised convolutions and random batch-norm statistics (so features stay O(1))."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # skip the default initialisation: every tensor is overwritten below
        net = InceptionV3()
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.zero_()
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))
                module.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
                module.bias.copy_(0.1 * torch.randn(n, generator=g))
                module.num_batches_tracked.zero_()
    return net.eval()


class EdmStyleDetector(nn.Module):
    """Calling convention of NVIDIA's TorchScript detector: 0..255 pixels in, resize inside, return_features flag."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = img.to(torch.float32) / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.net(2.0 * x - 1.0)
        if return_features:
            return features
        return F.softmax(self.net.fc(features), dim=1)


def _torchscript_bytes(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def _persistence_pickle(archive: bytes, protocol: int = 4) -> bytes:
    """A pickle laid out like StyleGAN's torch_utils.persistence: reconstruct(meta) with the module's source code and
    the object's state. The source would flag that it ran; the loader must never execute it."""
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def reconstruct(meta):
        raise AssertionError("the test's stand-in is only used for writing")

    reconstruct.__module__, reconstruct.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = reconstruct
    meta = {
        "type": "class",
        "version": 6,
        "module_src": f"import builtins\nbuiltins.{PWNED} = True\nclass InceptionWrapper: pass\n",
        "class_name": "InceptionWrapper",
        "state": {"training": False, "_torchscript": archive},
    }

    class Wrapper:
        def __reduce__(self):
            return reconstruct, (meta,)

    with mock.patch.dict(sys.modules, {"torch_utils": package, "torch_utils.persistence": module}):
        return pickle.dumps(Wrapper(), protocol=protocol)


def _write_state_dict(folder, net: nn.Module, prefix: str | None = None, legacy: bool = False):
    """Save like pytorch-fid's file; the name carries the SHA-256 prefix (or a given, possibly wrong, one)."""
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer, _use_new_zipfile_serialization=not legacy)
    data = buffer.getvalue()
    path = folder / f"pt_inception-2015-12-05-{prefix or hashlib.sha256(data).hexdigest()[:8]}.pth"
    path.write_bytes(data)
    return path


def test_state_dict_layout_is_pytorch_fids():
    with torch.device("meta"):  # shapes only
        net = InceptionV3()
    state = net.state_dict()
    convs = [k for k in state if k.endswith("conv.weight")]
    assert len(convs) == 94  # Inception-v3's 94 convolutions, each followed by batch norm
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert all(m.bn.eps == 1e-3 for m in net.modules() if hasattr(m, "bn"))
    assert not net.Mixed_7b.max_pool and net.Mixed_7c.max_pool
    # TF's average pooling ignores padded zeros: a constant image stays constant up to the border.
    torch.testing.assert_close(_avg_pool_same(torch.ones(1, 1, 5, 5)), torch.ones(1, 1, 5, 5))


def test_both_weight_formats_give_the_same_features(tmp_path):
    net = _random_inception()
    pth = _write_state_dict(tmp_path, net)
    pkl = tmp_path / "inception-2015-12-05.pkl"
    pkl.write_bytes(_persistence_pickle(_torchscript_bytes(EdmStyleDetector(net))))

    from_pth = load_inception_detector(pth)
    from_pkl = load_inception_detector(pkl)
    assert (from_pth.kind, from_pkl.kind) == ("state_dict", "torchscript")
    assert from_pkl.sha256 == hashlib.sha256(pkl.read_bytes()).hexdigest()
    assert from_pth.describe()["sha256"].startswith(pth.name.split("-")[-1][:8])
    assert not hasattr(__import__("builtins"), PWNED)  # the pickle's embedded source never ran

    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a, b = from_pth.features(images), from_pkl.features(images)
    assert a.shape == (2, 2048) and float(a.std()) > 1e-3
    # The TorchScript side applies pytorch-fid's preprocessing written out by hand (EdmStyleDetector), so this also
    # checks InceptionV3.preprocess.
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _Probe(nn.Module):
    """Cheap stand-in for a TorchScript detector: records how it is called."""

    def forward(self, img, return_features=False):
        assert return_features is True and img.dtype == torch.float32
        return img.mean(dim=(2, 3))


def test_detector_calls_torchscript_like_edm_and_repeats_grayscale():
    detector = InceptionDetector(_Probe(), kind="torchscript")
    gray = torch.tensor([[[[0, 255], [255, 255]]]], dtype=torch.uint8)
    out = detector.features(gray)
    torch.testing.assert_close(out, torch.full((1, 3), 191.25))  # 0..255 floats, same plane in R, G and B
    with pytest.raises(ValueError, match="uint8"):
        detector.features(gray.float())


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_wrapping_is_opened_without_running_code(protocol):
    archive = _torchscript_bytes(nn.Linear(2, 3))
    module = load_torchscript_from_pickle(_persistence_pickle(archive, protocol))
    assert isinstance(module, torch.jit.ScriptModule) and module(torch.zeros(1, 2)).shape == (1, 3)
    assert not hasattr(__import__("builtins"), PWNED)


def test_archive_stored_as_a_pickled_uint8_tensor_is_found():
    archive = _torchscript_bytes(nn.Linear(2, 3))
    wrapped = pickle.dumps({"detector": torch.frombuffer(bytearray(archive), dtype=torch.uint8)})
    assert load_torchscript_from_pickle(wrapped)(torch.zeros(1, 2)).shape == (1, 3)


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_pickle_with_arbitrary_code_is_refused_and_not_run(tmp_path):
    target = tmp_path / "pwned"
    evil = tmp_path / "inception-2015-12-05.pkl"
    evil.write_bytes(pickle.dumps(_Exploit(target)))
    with pytest.raises(DetectorFileError, match="no TorchScript archive"):
        load_inception_detector(evil)
    assert not target.exists()


def test_hash_mismatch_is_refused(tmp_path):
    wrong = _write_state_dict(tmp_path, nn.Linear(2, 2), prefix="00000000")
    with pytest.raises(DetectorFileError, match="SHA-256 prefix 00000000"):
        load_inception_detector(wrong)
    right = _write_state_dict(tmp_path, nn.Linear(2, 2), legacy=True)
    with pytest.raises(DetectorFileError, match="but 1234abcd was expected"):
        load_inception_detector(right, expected_sha256="1234abcd")
    # The hash matches, but a state dict (here in torch's pre-1.6 format) of another network is refused by name.
    with pytest.raises(DetectorFileError, match="missing .*Conv2d_1a_3x3"):
        load_inception_detector(right)


def test_missing_file_is_explained_and_cache_is_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("AOTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AOTDIFF_DETECTOR", raising=False)
    with pytest.raises(DetectorFileError) as err:
        find_detector_file()
    message = str(err.value)
    for needed in (
        "inception-2015-12-05.pkl",
        "pt_inception-2015-12-05-6726825d.pth",
        str(tmp_path / "cache"),
        "never downloads",
    ):
        assert needed in message
    monkeypatch.setenv("AOTDIFF_DETECTOR", str(tmp_path / "nope.pkl"))
    with pytest.raises(DetectorFileError, match="AOTDIFF_DETECTOR"):
        find_detector_file()
    monkeypatch.delenv("AOTDIFF_DETECTOR")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "inception-2015-12-05.pkl").write_bytes(b"x")
    assert find_detector_file() == tmp_path / "cache" / "inception-2015-12-05.pkl"
    explicit = tmp_path / "mine.pt"
    explicit.write_bytes(b"x")
    assert find_detector_file(explicit) == explicit


def _window_mean_of_real_pixels(x: torch.Tensor) -> torch.Tensor:
    """TF 'SAME' 3x3 stride-1 average pooling written out: the sum over the in-image part of each window divided by
    the number of in-image pixels in it (9 inside, 6 on an edge, 4 in a corner)."""
    c = x.shape[1]
    ones = torch.ones(c, 1, 3, 3, dtype=x.dtype)
    total = F.conv2d(F.pad(x, (1, 1, 1, 1)), ones, groups=c)
    count = F.conv2d(F.pad(torch.ones_like(x[:, :1]), (1, 1, 1, 1)), ones[:1])
    return total / count


def test_stage_sizes_and_pooling_branches_are_the_tf_graphs():
    """The 2015-12-05 graph's geometry, checked inside a forward pass (a wrong stride or padding still runs to a
    2048-d vector through the adaptive pool, so only the intermediate sizes reveal it):

    299 -conv3/2-> 149 -conv3-> 147 -conv3 pad1-> 147 -maxpool3/2-> 73 -conv1-> 73 -conv3-> 71 -maxpool3/2-> 35
    (Mixed_5b-d, 192/256/288 channels) -Mixed_6a-> 17 (768) -Mixed_7a-> 8 (1280) -Mixed_7b-> 8 (2048) -> Mixed_7c.
    Pool branches: A, C and the first E block average over real pixels only (count_include_pad=False), the last E
    block takes a 3x3 stride-1 max; the reductions B and D pass a 3x3 stride-2 max pool of their input through as the
    last channels. pool3 is the spatial mean of Mixed_7c's 8 x 8 output.
    """
    net = _random_inception(seed=2)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = (inputs[0].detach(), output.detach())

        return hook

    for name, module in net.named_modules():
        if name and name.count(".") <= 1 and (name.count(".") == 0 or name.endswith("branch_pool")):
            module.register_forward_hook(keep(name))
    images = torch.randint(0, 256, (1, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = net(InceptionV3.preprocess(images))
    out_sizes = {
        "Conv2d_1a_3x3": (32, 149),
        "Conv2d_2a_3x3": (32, 147),
        "Conv2d_2b_3x3": (64, 147),
        "Conv2d_3b_1x1": (80, 73),
        "Conv2d_4a_3x3": (192, 71),
        "Mixed_5b": (256, 35),
        "Mixed_5c": (288, 35),
        "Mixed_5d": (288, 35),
        "Mixed_6a": (768, 17),
        "Mixed_6e": (768, 17),
        "Mixed_7a": (1280, 8),
        "Mixed_7b": (2048, 8),
        "Mixed_7c": (2048, 8),
    }
    for name, (channels, size) in out_sizes.items():
        assert tuple(seen[name][1].shape) == (1, channels, size, size), name
    assert tuple(seen["Mixed_5b"][0].shape) == (1, 192, 35, 35)
    for block in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b"):
        block_in, pool_in = seen[block][0], seen[f"{block}.branch_pool"][0]
        torch.testing.assert_close(pool_in, _window_mean_of_real_pixels(block_in), rtol=1e-5, atol=1e-5)
    block_in = seen["Mixed_7c"][0]
    window_max = F.pad(block_in, (1, 1, 1, 1), value=-torch.inf).unfold(2, 3, 1).unfold(3, 3, 1).amax(dim=(-1, -2))
    torch.testing.assert_close(seen["Mixed_7c.branch_pool"][0], window_max, rtol=0, atol=0)
    for block in ("Mixed_6a", "Mixed_7a"):
        block_in, block_out = seen[block]
        cin = block_in.shape[1]
        stride_two_max = block_in.unfold(2, 3, 2).unfold(3, 3, 2).amax(dim=(-1, -2))
        torch.testing.assert_close(block_out[:, -cin:], stride_two_max, rtol=0, atol=0)
    torch.testing.assert_close(features, seen["Mixed_7c"][1].mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
