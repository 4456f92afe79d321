"""Read EDM-format network pickles (EDM's and EDM-AOT's ``network-snapshot-*.pkl``) without running anything in them.

Such a file is a Python pickle. Unpickled the normal way it imports modules and executes the source code that EDM's
``torch_utils.persistence`` embeds in every network object, so a file from the internet could run anything. Here a
restricted unpickler resolves only an allowlist of inert globals and refuses every other one, naming it:

* ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` becomes a :class:`PersistentObject` holding the class
  name and the object's state; the embedded ``module_src`` is hashed for provenance and never executed;
* tensors and parameters are rebuilt by our own functions from storages that are read with
  ``torch.load(..., weights_only=True)`` from the bytes embedded in the pickle;
* ``collections.OrderedDict``, ``set``, NumPy scalars and dtypes, latin-1 bytes (pickle protocol 2's spelling of
  ``bytes``), and the torch container modules (``ModuleDict`` and friends, as inert stand-ins) are the only other
  globals allowed.

Everything the allowlist hands to the unpickler is frozen (no attribute can be set on it), so a crafted file cannot
patch our functions or classes through pickle's BUILD opcode either.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from aotdiff.train.checkpoint import CheckpointError

PICKLE_SUFFIXES = (".pkl", ".pickle")
_MAX_DEPTH = 64  # module nesting; EDM's deepest path is 4 levels (model.enc.16x16_block0.conv0)


class EdmPickleError(CheckpointError):
    """An EDM-format pickle was refused or could not be read; the message is one line and names the cause."""


# ------------------------------------------------------------------------------------------------ stand-ins
@dataclass
class PersistentObject:
    """What EDM's persistence meta dict describes: a class name and the instance state (``__dict__``).

    ``module_sha256`` identifies the embedded source code (which is never executed).
    """

    class_name: str
    state: dict[str, Any]
    module_sha256: str = ""

    @property
    def modules(self) -> dict[str, Any]:
        return _mapping(self.state.get("_modules"))


class _FrozenClass(type):
    """Metaclass of the stand-in classes: a pickle may instantiate them but never set attributes on the class."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise EdmPickleError(f"refused: the file tries to set attribute {name!r} on {cls.__name__}")


class InertModule(metaclass=_FrozenClass):
    """Stand-in for a torch container module (ModuleDict, ...): keeps the pickled state, has no behaviour."""

    torch_name = "Module"
    state: Mapping[str, Any] = MappingProxyType({})  # until pickle's BUILD gives the instance its own

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state) form
            state = state[0]
        if not isinstance(state, dict):
            raise EdmPickleError(f"refused: {self.torch_name} state is a {type(state).__name__}, not a dict")
        self.state = dict(state)

    @property
    def modules(self) -> dict[str, Any]:
        return _mapping(self.state.get("_modules"))


def _inert_module(name: str) -> type:
    return _FrozenClass(name, (InertModule,), {"torch_name": name})


class _EasyDict(dict, metaclass=_FrozenClass):
    """Stand-in for ``dnnlib.util.EasyDict`` (a dict with attribute access): a plain dict here."""


class _Allowed:
    """An allowlisted callable handed to the unpickler; frozen, so the file cannot replace its code or defaults."""

    __slots__ = ("_fn", "_name")
    _fn: Callable[..., Any]
    _name: str

    def __init__(self, name: str, fn: Callable[..., Any]):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, name: str, value: Any) -> None:
        raise EdmPickleError(f"refused: the file tries to set attribute {name!r} on {self._name}")

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


# ------------------------------------------------------------------------------------------- safe rebuilders
def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    """EDM's persistence hook, minus the part that executes ``meta['module_src']``."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise EdmPickleError("refused: a persistent object whose meta data is not EDM's {type: 'class', ...} dict")
    class_name, state, src = meta.get("class_name"), meta.get("state"), meta.get("module_src", "")
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise EdmPickleError("refused: a persistent object without a class name or state dict")
    digest = hashlib.sha256(src.encode("utf-8", "replace")).hexdigest() if isinstance(src, str) else ""
    return PersistentObject(class_name, dict(state), digest)


def _load_storage(data: Any) -> Any:
    """``torch.storage._load_from_bytes``: the bytes are a legacy torch.save stream of one storage."""
    if not isinstance(data, bytes | bytearray):
        raise EdmPickleError(f"refused: a tensor storage given as {type(data).__name__}, not bytes")
    try:
        storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise EdmPickleError("refused: a tensor storage holds objects other than tensor data") from None
    if not isinstance(storage, torch.TypedStorage | torch.UntypedStorage):
        raise EdmPickleError(f"refused: a tensor storage decoded to a {type(storage).__name__}")
    return storage


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise EdmPickleError(f"refused: tensor {what} {value!r} is not a tuple of non-negative integers")
    return tuple(value)


def _rebuild_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, *_hooks_and_metadata: Any
) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` without backward hooks or metadata (weights need neither)."""
    if isinstance(storage, torch.TypedStorage):
        dtype, untyped = storage.dtype, storage.untyped()
    elif isinstance(storage, torch.UntypedStorage):
        dtype, untyped = torch.uint8, storage
    else:
        raise EdmPickleError(f"refused: a tensor built on a {type(storage).__name__}, not a storage")
    if not isinstance(offset, int) or offset < 0:
        raise EdmPickleError(f"refused: tensor storage offset {offset!r}")
    size_t, stride_t = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size_t) != len(stride_t):
        raise EdmPickleError(f"refused: tensor size {size_t} and stride {stride_t} differ in length")
    try:  # set_ checks that the view lies inside the storage
        return torch.empty(0, dtype=dtype).set_(untyped, offset, size_t, stride_t)
    except RuntimeError as e:
        raise EdmPickleError(f"refused: a tensor does not fit its storage ({str(e).splitlines()[0]})") from None


def _rebuild_parameter(data: Any, requires_grad: Any = False, *_hooks_and_state: Any) -> torch.Tensor:
    """``torch._utils._rebuild_parameter``: the weights as a plain tensor (they are copied into our modules)."""
    if not isinstance(data, torch.Tensor):
        raise EdmPickleError(f"refused: a parameter built from a {type(data).__name__}, not a tensor")
    return data


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy.core.multiarray.scalar``, numeric types only (EDM stores e.g. ``skip_scale = np.sqrt(0.5)``)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise EdmPickleError(f"refused: a NumPy scalar of dtype {dtype!r}; only numeric scalars are read")
    if len(data) != dtype.itemsize:
        raise EdmPickleError(f"refused: a NumPy {dtype} scalar of {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype(name, align, copy)``, always as a copy: pickle then applies the dtype's saved state to it, which
    must never reach NumPy's shared dtype instances."""
    if not args or not isinstance(args[0], str):
        raise EdmPickleError(f"refused: numpy.dtype{args!r}; only dtypes named by a string are read")
    return np.dtype(args[0], bool(args[1]) if len(args) > 1 else False, True)


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode(text, 'latin1')``: how pickle protocols 0-2 spell a bytes object."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise EdmPickleError(f"refused: _codecs.encode of a {type(text).__name__} as {encoding!r}")
    return text.encode("latin1")


_CONTAINERS = ("Module", "ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList")
_container_classes = {name: _inert_module(name) for name in _CONTAINERS}

# (module, name) -> what the unpickler gets instead of the real global. Classes that pickle instantiates with NEWOBJ
# must be types: they are immutable builtins or frozen stand-ins.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _Allowed("torch._utils._rebuild_tensor_v2", _rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Allowed("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Allowed("_rebuild_parameter_with_state", _rebuild_parameter),
    ("torch.storage", "_load_from_bytes"): _Allowed("torch.storage._load_from_bytes", _load_storage),
    ("numpy.core.multiarray", "scalar"): _Allowed("numpy scalar", _numpy_scalar),
    ("numpy._core.multiarray", "scalar"): _Allowed("numpy scalar", _numpy_scalar),
    ("numpy", "dtype"): _Allowed("numpy.dtype", _numpy_dtype),
    ("_codecs", "encode"): _Allowed("_codecs.encode", _latin1_bytes),
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Allowed(
        "_reconstruct_persistent_obj", _reconstruct_persistent_obj
    ),
    ("dnnlib.util", "EasyDict"): _EasyDict,
    **{("torch.nn.modules.container", n): c for n, c in _container_classes.items() if n != "Module"},
    ("torch.nn.modules.module", "Module"): _container_classes["Module"],
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise EdmPickleError(
                f"refused: the file asks for the Python global '{module}.{name}', which is not on the list of inert "
                "objects aotdiff reads (tensors, containers, EDM's network descriptions); nothing was run"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        # EDM's network pickles carry no persistent ids (torch.save's zip files do, and are not EDM snapshots)
        raise EdmPickleError("refused: the file uses pickle persistent ids (a torch.save file, not an EDM snapshot)")


# ----------------------------------------------------------------------------------------------------- reading
@dataclass
class EdmPickle:
    """A safely read EDM-format pickle: its top-level object and the file's identity."""

    path: Path
    sha256: str
    data: Any
    size: int = 0
    notes: list[str] = field(default_factory=list)


def looks_like_pickle(path: str | Path) -> bool:
    """A .pkl / .pickle name, or a file starting with the pickle protocol 2+ marker (never a .safetensors file, whose
    first byte is a length and may happen to look like that marker)."""
    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        return False
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_edm_pickle(path: str | Path) -> EdmPickle:
    """Unpickle ``path`` with the allowlist; any refusal or decoding problem raises a one-line :class:`EdmPickleError`."""
    p = Path(path)
    data = p.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation notes: the legacy format is what EDM wrote
            obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except EdmPickleError as e:
        raise EdmPickleError(f"{p}: {e}") from None
    except RecursionError:
        raise EdmPickleError(f"{p}: refused: nesting too deep for a network snapshot") from None
    except Exception as e:  # EOFError, UnpicklingError, ValueError, ... from a truncated or foreign file
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise EdmPickleError(
            f"{p} is not a readable pickle ({type(e).__name__}{': ' + detail if detail else ''}); it may be truncated "
            "or not an EDM network snapshot"
        ) from None
    return EdmPickle(p, hashlib.sha256(data).hexdigest(), obj, len(data))


def class_name(obj: Any) -> str:
    """EDM class name of a persistent object, torch name of a container stand-in, else the Python type name."""
    if isinstance(obj, PersistentObject):
        return obj.class_name
    if isinstance(obj, InertModule):
        return obj.torch_name
    return type(obj).__name__


def module_tensors(obj: Any, prefix: str = "", _depth: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of a pickled module tree (persistent objects and container stand-ins), in registration order:
    parameters, then persistent buffers, then children, as ``torch.nn.Module.state_dict`` orders them."""
    if _depth > _MAX_DEPTH:
        raise EdmPickleError(f"refused: module nesting deeper than {_MAX_DEPTH} at {prefix!r}")
    if not isinstance(obj, PersistentObject | InertModule):
        raise EdmPickleError(f"{prefix.rstrip('.') or 'the network'} is a {type(obj).__name__}, not a module")
    state = obj.state
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, tensor in _mapping(state.get(group)).items():
            if tensor is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise EdmPickleError(f"{prefix}{name} is a {type(tensor).__name__}, not a tensor")
            out[f"{prefix}{name}"] = tensor
    for name, child in obj.modules.items():
        if child is not None:
            out.update(module_tensors(child, f"{prefix}{name}.", _depth + 1))
    return out
