"""Read PyTorch `.pt`/`.pth`/`.bin`/`.ckpt` files (TorchScript, `torch.save` zip or legacy) without torch.

A torch file is a pickle whose tensors point at raw storages kept beside it. We unpickle with a
restricted `Unpickler` that only knows the handful of globals such files use (tensor rebuild,
storage types, OrderedDict, TorchScript module classes) and refuses everything else, so reading a
weights file can never run code from it.

    tree = load_torch_file("default_1.pt")   # nested dicts, leaves are numpy arrays
    flat = flatten_tree(tree)                # {"net.layers.conv.weight": (32, 3, 3, 3) float32}

TorchScript modules come back as `ScriptObject` (a dict of their attributes, with the class name
in `.class_name`); `torch.save(state_dict)` comes back as the OrderedDict it was.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from fitv2_jax.utils.errors import UserError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

# torch.save's legacy (pre-1.6) format starts with this pickled magic number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class ScriptObject(dict):
    """A TorchScript module or object: its attributes as a dict, its class in `class_name`."""

    class_name = ""

    def __setstate__(self, state):
        # TorchScript pickles a module as NEWOBJ + BUILD(dict of attributes).
        self.update(state)


class _StorageType:
    def __init__(self, name: str):
        if name not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported tensor storage type torch.{name}")
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _TensorRef:
    """A tensor not yet read: its storage key and dtype, offset, size and stride (in elements)."""

    def __init__(self, storage, offset, size, stride):
        self.key, self.dtype = storage
        self.offset, self.size, self.stride = offset, tuple(size), tuple(stride)

    def materialize(self, storages: dict[str, np.ndarray]) -> np.ndarray:
        flat = storages[self.key]
        if len(self.size) == 0:
            return np.array(flat[self.offset])
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * flat.dtype.itemsize for s in self.stride),
        )
        return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    return data


class _Unpickler(pickle.Unpickler):
    """Knows only tensors, storages, OrderedDict and TorchScript classes; refuses the rest."""

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
            # TorchScript's typed lists (build_intlist, build_doublelist, ...) are plain lists.
            return list
        if module.startswith("__torch__"):
            return type(name, (ScriptObject,), {"class_name": f"{module}.{name}"})
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: only tensors, dicts and TorchScript "
            "modules are read from weights files"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (torch < 0.4 files) are not supported")
        return str(pid[2]), pid[1].dtype


def _materialize(obj, storages):
    """Replace every _TensorRef in a tree of dicts/lists/tuples by its numpy array."""
    if isinstance(obj, _TensorRef):
        return obj.materialize(storages)
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _materialize(v, storages)
        return obj
    if isinstance(obj, list):
        return [_materialize(v, storages) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v, storages) for v in obj)
    return obj


def _storage_keys(obj, out):
    if isinstance(obj, _TensorRef):
        out[obj.key] = obj.dtype
    elif isinstance(obj, dict):
        for v in obj.values():
            _storage_keys(v, out)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _storage_keys(v, out)
    return out


def _load_zip(path: str):
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise ValueError(f"{path}: zip archive without <dir>/data.pkl, not a torch file")
        prefix = pkl[0][: -len("data.pkl")]
        tree = _Unpickler(io.BytesIO(zf.read(pkl[0]))).load()
        storages = {
            key: np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=dtype)
            for key, dtype in _storage_keys(tree, {}).items()
        }
    return _materialize(tree, storages)


def _load_legacy(path: str):
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
        except Exception as e:
            raise ValueError(f"{path}: neither a zip nor a legacy torch file ({e})") from e
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch file (bad magic number)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # sys info
        tree = _Unpickler(f).load()
        dtypes = _storage_keys(tree, {})
        storages = {}
        # The raw storages follow the pickles, in the order of this key list, each as an int64
        # element count and then its bytes.
        for key in pickle.load(f):
            (numel,) = struct.unpack("<q", f.read(8))
            dtype = np.dtype(dtypes[key])
            storages[key] = np.frombuffer(f.read(numel * dtype.itemsize), dtype=dtype)
    return _materialize(tree, storages)


def load_torch_file(path: str):
    """The object saved in a torch file, tensors as numpy arrays (never runs code from it).

    A file that is not a torch file, or holds anything but tensors, dicts and TorchScript
    modules, is a UserError naming it."""
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except (pickle.UnpicklingError, ValueError, KeyError, EOFError, struct.error) as e:
        raise UserError(f"{path}: not a readable torch weights file ({e})") from e


def flatten_tree(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """{"a.b.c": array} for every array leaf of nested dicts (TorchScript modules included)."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_tree(v, name + "."))
        elif isinstance(v, np.ndarray):
            out[name] = v
    return out
