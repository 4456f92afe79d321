"""Inception-v3 (the 2015-12-05 TensorFlow graph used by every FID paper) as a :class:`~aotdiff.metrics.fid.Detector`.

Two weight files are accepted; aotdiff never downloads either, the user places one on disk:

* ``pt_inception-2015-12-05-6726825d.pth`` — the state dict published by pytorch-fid (also used by torch-fidelity as
  ``weights-inception-2015-12-05-6726825d.pth``). It is loaded with ``torch.load(weights_only=True)`` into
  :class:`InceptionV3`, our own implementation of the FID variant of the network: torchvision-style layer names,
  1008-way classifier, average pooling that ignores padded zeros in the A / C / first E blocks and max pooling in the
  last E block (these are properties of the TF graph). Preprocessing as pytorch-fid: pixels / 255, bilinear resize to
  299 x 299 (align_corners=False, no antialiasing), then scale to [-1, 1].
* ``inception-2015-12-05.pkl`` — the file EDM's ``fid.py`` uses (NVIDIA's TorchScript port of the TF graph, wrapped in
  a pickle). It is opened with a restricted unpickler that admits no callable at all: every global it names becomes an
  inert placeholder, the source code a pickle may carry is never executed, and the embedded TorchScript archive (a
  zip with a ``code/`` folder) is loaded with ``torch.jit.load`` from bytes. A plain TorchScript archive
  (``inception-2015-12-05.pt`` from stylegan2-ada-pytorch) is loaded directly. The network is called as EDM calls it:
  ``net(images, return_features=True)`` on 0..255 float pixels; it resizes internally.

FID values from the two files differ slightly (their resizing and input scaling differ); the published CIFAR-10
reference statistics (``cifar10-32x32.npz``) were made with the ``.pkl``, so use that file for paper-comparable numbers.
Every result records the weight file's SHA-256 (:meth:`InceptionDetector.describe`).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .fid import Detector, check_uint8_images

__all__ = [
    "DETECTOR_ENV",
    "CACHE_ENV",
    "EDM_DETECTOR_NAME",
    "PYTORCH_FID_DETECTOR_NAME",
    "DetectorFileError",
    "InceptionDetector",
    "InceptionV3",
    "cache_dir",
    "file_sha256",
    "find_detector_file",
    "load_inception_detector",
    "load_torchscript_from_pickle",
]

DETECTOR_ENV = "AOTDIFF_DETECTOR"
CACHE_ENV = "AOTDIFF_CACHE"
EDM_DETECTOR_NAME = "inception-2015-12-05.pkl"
PYTORCH_FID_DETECTOR_NAME = "pt_inception-2015-12-05-6726825d.pth"
ACCEPTED_NAMES = (EDM_DETECTOR_NAME, PYTORCH_FID_DETECTOR_NAME)
FEATURE_DIM = 2048
INPUT_SIZE = 299


class DetectorFileError(FileNotFoundError):
    """The Inception weight file is missing, unreadable, or not the expected file."""


# ----------------------------------------------------------------------------------------------------------------
# The network (FID variant of Inception-v3). Layer names follow torchvision, which is what the pytorch-fid file uses.


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as in the TF graph), ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, padding: Any = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pooling whose border averages only real pixels (TF's 'SAME' average pooling)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (64 + 64 + 96 + pool_features channels)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_same(x))
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1), 4 x 192 output channels."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        c = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(c))))
        d = self.branch_pool(_avg_pool_same(x))
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches. ``max_pool``: the graph's last block pools with max, not average."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_same(x)
        d = self.branch_pool(pooled)
        return torch.cat([a, b, c, d], 1)


class InceptionV3(nn.Module):
    """Inception-v3 as in the 2015-12-05 TF graph; :meth:`forward` returns the 2048-d pool3 features.

    Input: float [N, 3, 299, 299] already scaled to [-1, 1] (see :meth:`preprocess`). The 1008-way classifier ``fc``
    is kept only so that the published state dict loads strictly; FID never uses it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """0..255 pixels [N, 3, H, W] -> [-1, 1] at 299 x 299, bilinear without antialiasing (pytorch-fid)."""
        x = images.to(torch.float32) / 255.0
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# ----------------------------------------------------------------------------------------------------------------
# Locating and identifying the weight file.


def cache_dir() -> Path:
    """The user cache folder: ``$AOTDIFF_CACHE`` if set, else ``~/.cache/aotdiff``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "aotdiff"


def _missing_file_message(looked_at: list[str]) -> str:
    where = cache_dir()
    return (
        "no Inception-v3 weight file found (looked at: " + ", ".join(looked_at) + "). FID needs one of these files:\n"
        f"  {EDM_DETECTOR_NAME}  (the file EDM's fid.py uses; matches the published reference statistics)\n"
        f"  {PYTORCH_FID_DETECTOR_NAME}  (pytorch-fid's state dict)\n"
        f"Put it in {where}/ (or set ${CACHE_ENV}), or point ${DETECTOR_ENV} or --detector at it. "
        "aotdiff never downloads anything."
    )


def find_detector_file(path: str | os.PathLike[str] | None = None) -> Path:
    """The detector file to use: ``path`` if given, else ``$AOTDIFF_DETECTOR``, else a known name in the cache."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DetectorFileError(f"detector file '{p}' does not exist.\n" + _missing_file_message([str(p)]))
        return p
    env = os.environ.get(DETECTOR_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise DetectorFileError(
                f"${DETECTOR_ENV} points at '{p}', which does not exist.\n" + _missing_file_message([str(p)])
            )
        return p
    candidates = [cache_dir() / name for name in ACCEPTED_NAMES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DetectorFileError(_missing_file_message([str(c) for c in candidates]))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


def check_sha256(path: Path, actual: str, expected: str | None = None) -> None:
    """Refuse a file whose SHA-256 contradicts ``expected`` or the hash prefix in its name (torch.hub convention,
    ``name-<first 8+ hex digits of the SHA-256>.ext``, as in ``pt_inception-2015-12-05-6726825d.pth``)."""
    if expected is not None:
        want = expected.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", want):
            raise ValueError(f"expected_sha256 must be 8 to 64 hex digits, got {expected!r}")
        if not actual.startswith(want):
            raise DetectorFileError(
                f"detector file '{path}' has SHA-256 {actual}, but {want} was expected; the file is corrupt or a "
                "different file: replace it"
            )
    match = _HASH_IN_NAME.search(path.name)
    if match and not actual.startswith(match.group(1)):
        raise DetectorFileError(
            f"detector file '{path}' is named for SHA-256 prefix {match.group(1)} but its SHA-256 is {actual}; the file "
            "is corrupt or truncated: replace it with an intact copy"
        )


# ----------------------------------------------------------------------------------------------------------------
# Loading the two formats.

_TORCH_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def _is_torchscript_archive(data: bytes) -> bool:
    """A TorchScript archive is a zip whose entries include ``<root>/code/...`` (a torch.save zip has none)."""
    if not data.startswith(b"PK\x03\x04"):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any("/code/" in name for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


class _Inert:
    """Stand-in for any global a pickle names: records its arguments and state, runs nothing."""

    pickle_global = "?"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        # Capture constructor arguments here: pickle's NEWOBJ opcode calls __new__ without __init__.
        obj = super().__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # pickle may fill dict-like objects item by item
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:  # ... or list-like ones
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Any) -> None:
        for v in values:
            self.append(v)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only plain containers; every other global becomes an :class:`_Inert` placeholder.

    Nothing named by the file is imported or called, so no code in the file (e.g. the module source that StyleGAN's
    ``torch_utils.persistence`` embeds) can run. Persistent ids (torch.save's storage references) are refused.
    """

    # Pure data constructors. ``_codecs.encode`` is how protocol-2 pickles spell a bytes literal in Python 3.
    _ALLOWED: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "bytes"): bytes,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("_codecs", "encode"): codecs.encode,
    }

    def __init__(self, file: io.BufferedIOBase):
        super().__init__(file)
        self.globals_seen: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        self.globals_seen.append(f"{module}.{name}")
        allowed = self._ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        return type(name, (_Inert,), {"pickle_global": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not supported (this is not a pickle aotdiff can read)")


def _collect_bytes(obj: Any, found: list[bytes], seen: set[int], depth: int = 0) -> None:
    """Depth-first search of an unpickled tree for bytes objects (where an embedded archive would be)."""
    if depth > 200 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, bytes | bytearray):
        found.append(bytes(obj))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _collect_bytes(key, found, seen, depth + 1)
            _collect_bytes(value, found, seen, depth + 1)
    elif isinstance(obj, list | tuple | set | frozenset):
        for value in obj:
            _collect_bytes(value, found, seen, depth + 1)
    elif isinstance(obj, _Inert):
        _collect_bytes(obj.__dict__, found, seen, depth + 1)


def _jit_load(data: bytes) -> torch.jit.ScriptModule:
    """torch.jit.load from memory onto the CPU. TorchScript is deprecated in recent torch, but it is the format
    NVIDIA's detector is published in, so the deprecation warning is not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


def _bytes_from_torch_blob(blob: bytes) -> bytes | None:
    """The raw bytes of a uint8 tensor or storage saved by torch (how a pickled tensor carries its data), else None.

    Read with ``torch.load(weights_only=True)``, which admits tensors and storages only.
    """
    if not (blob.startswith(b"PK\x03\x04") or blob.startswith(_TORCH_LEGACY_MAGIC)) or _is_torchscript_archive(blob):
        return None
    try:
        obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a torch blob after all
        return None
    if isinstance(obj, torch.TypedStorage):
        with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what pickled tensors hold
            warnings.simplefilter("ignore", UserWarning)
            obj = obj.untyped()
    if isinstance(obj, torch.UntypedStorage):
        obj = torch.empty(0, dtype=torch.uint8).set_(obj)
    if isinstance(obj, torch.Tensor) and obj.dtype == torch.uint8:
        return obj.contiguous().numpy().tobytes()
    return None


def load_torchscript_from_pickle(data: bytes, where: str = "pickle") -> torch.jit.ScriptModule:
    """Find the TorchScript archive embedded in a pickle and load it, without executing anything from the pickle.

    The archive may be stored as a bytes object anywhere in the pickled tree (e.g. in the state of a StyleGAN
    persistence record) or as the data of a pickled uint8 tensor.
    """
    unpickler = _RestrictedUnpickler(io.BytesIO(data))
    try:
        tree = unpickler.load()
    except Exception as err:  # noqa: BLE001 - any parse failure means the file is not what we expect
        raise DetectorFileError(f"'{where}' is not a pickle aotdiff can read: {err}") from err
    blobs: list[bytes] = []
    _collect_bytes(tree, blobs, set())
    blobs += [inner for inner in map(_bytes_from_torch_blob, blobs) if inner is not None]
    archives = [b for b in blobs if _is_torchscript_archive(b)]
    if not archives:
        named = ", ".join(dict.fromkeys(unpickler.globals_seen)) or "none"
        raise DetectorFileError(
            f"'{where}' holds no TorchScript archive (globals named in it: {named}); expected NVIDIA's "
            f"{EDM_DETECTOR_NAME}. Use that file or {PYTORCH_FID_DETECTOR_NAME}."
        )
    return _jit_load(max(archives, key=len))


def _load_state_dict_file(path: Path) -> InceptionV3:
    """Build :class:`InceptionV3` from a pytorch-fid-style state dict (strict about every parameter)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise DetectorFileError(f"cannot read '{path}' as a PyTorch state dict: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DetectorFileError(f"'{path}' is not a plain state dict of tensors (expected {PYTORCH_FID_DETECTOR_NAME})")
    # Batch-norm step counters and the auxiliary classifier play no part in the pool3 features.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") and not k.startswith("AuxLogits.")}
    net = InceptionV3()
    expected = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise DetectorFileError(
            f"'{path}' does not match the FID Inception-v3 layout: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    own = net.state_dict()
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise DetectorFileError(
                f"'{path}': parameter {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    net.load_state_dict(state, strict=False)
    return net.eval().requires_grad_(False)


class InceptionDetector(Detector):
    """2048-d pool3 features of Inception-v3 from either weight file; FID is the Fréchet distance on them."""

    dim = FEATURE_DIM
    metric = "FID"

    def __init__(
        self,
        network: nn.Module | torch.jit.ScriptModule,
        *,
        kind: str,
        path: str | None = None,
        sha256: str | None = None,
        device: torch.device | str = "cpu",
    ):
        if kind not in ("state_dict", "torchscript"):
            raise ValueError(f"kind must be 'state_dict' or 'torchscript', got {kind!r}")
        self.kind = kind
        self.path = path
        self.sha256 = sha256
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        source = "pytorch-fid weights" if kind == "state_dict" else "NVIDIA TorchScript"
        self.name = f"inception-v3-2015-12-05 ({source})"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        images = check_uint8_images(images, "Inception features")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # grayscale: the same plane in R, G and B (as EDM does)
        if images.shape[1] != 3:
            raise ValueError(f"Inception takes 1- or 3-channel images, got {images.shape[1]} channels")
        x = images.to(self.device)
        with torch.no_grad():
            if self.kind == "torchscript":
                out = self.network(x.to(torch.float32), return_features=True)
            else:
                out = self.network(InceptionV3.preprocess(x))
        return out.to(torch.float32).reshape(images.shape[0], -1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "format": self.kind, "path": self.path}


def load_inception_detector(
    path: str | os.PathLike[str] | None = None,
    *,
    expected_sha256: str | None = None,
    device: torch.device | str = "cpu",
) -> InceptionDetector:
    """Load Inception-v3 from ``path`` / ``$AOTDIFF_DETECTOR`` / the cache folder (see :func:`find_detector_file`).

    The format is recognised from the content: a TorchScript archive, a state dict (zip or legacy torch.save), or a
    pickle wrapping a TorchScript archive. The file's SHA-256 is checked against ``expected_sha256`` and against a hash
    prefix in its name, and recorded in the detector.
    """
    file = find_detector_file(path)
    data = file.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    check_sha256(file, sha, expected_sha256)
    if _is_torchscript_archive(data):
        network: nn.Module = _jit_load(data)
        kind = "torchscript"
    elif data.startswith(b"PK\x03\x04") or data.startswith(_TORCH_LEGACY_MAGIC):
        network = _load_state_dict_file(file)
        kind = "state_dict"
    else:
        network = load_torchscript_from_pickle(data, str(file))
        kind = "torchscript"
    return InceptionDetector(network, kind=kind, path=str(file), sha256=sha, device=device)
