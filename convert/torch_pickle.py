"""A safe, lazy reader for PyTorch checkpoints (``torch.save`` zip archives), without torch.

Pickle can run arbitrary code, so the unpickler resolves only the few globals
that rebuild tensors and plain containers, each to a harmless stand-in, and
refuses every other name. Tensors come back as handles: nothing is read until
``TensorRef.read()``, which reads just that tensor's bytes, so a checkpoint
larger than memory can be converted one tensor at a time.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class CheckpointError(ValueError):
    """The file is not a checkpoint this reader can load safely."""


# Storage classes by name -> (dtype name, numpy dtype). bfloat16 has no numpy dtype: its bits come back as uint16.
STORAGES = {
    "FloatStorage": ("float32", np.float32), "DoubleStorage": ("float64", np.float64),
    "HalfStorage": ("float16", np.float16), "BFloat16Storage": ("bfloat16", np.uint16),
    "LongStorage": ("int64", np.int64), "IntStorage": ("int32", np.int32), "ShortStorage": ("int16", np.int16),
    "CharStorage": ("int8", np.int8), "ByteStorage": ("uint8", np.uint8), "BoolStorage": ("bool", np.bool_),
}
NUMPY = {name: dt for name, dt in STORAGES.values()}


@dataclass(frozen=True)
class StorageType:
    dtype: str


@dataclass
class Storage:
    key: str
    dtype: str
    numel: int


@dataclass
class TensorRef:
    """A tensor in a checkpoint, read on demand."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    storage: Storage
    archive: "TorchCheckpoint" = field(repr=False, default=None)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(NUMPY[self.dtype]).itemsize

    def read(self) -> np.ndarray:
        """The tensor's values (bfloat16 as uint16 bit patterns), contiguous."""
        return self.archive.read_tensor(self)


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    if not isinstance(storage, Storage):
        raise CheckpointError("checkpoint rebuilds a tensor from something that is not a storage")
    return TensorRef("", storage.dtype, tuple(int(s) for s in size), tuple(int(s) for s in stride),
                     int(storage_offset), storage)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_unused):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_unused):
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    **{("torch", name): StorageType(dtype) for name, (dtype, _) in STORAGES.items()},
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, stream, storages: dict[str, int]):
        super().__init__(stream)
        self._storages = storages

    def find_class(self, module: str, name: str):
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(f"refusing to load checkpoint: it references {module}.{name}, "
                                  "which is not a tensor or plain container") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)):
            raise CheckpointError(f"refusing to load checkpoint: unexpected persistent reference {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if str(key) not in self._storages:
            raise CheckpointError(f"checkpoint references storage {key}, which the archive does not contain")
        return Storage(str(key), kind.dtype, int(numel))


def _flatten(obj: Any, prefix: str, tensors: dict, extras: dict) -> None:
    if isinstance(obj, TensorRef):
        obj.name = prefix
        tensors[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors, extras)
    else:
        extras[prefix] = obj


class TorchCheckpoint:
    """Open with a ``with`` block; ``tensors`` maps flat names to :class:`TensorRef`."""

    WRAPPERS = ("model", "state_dict", "module", "ema")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint {self.path} not found")
        with open(self.path, "rb") as f:
            head = f.read(4)
        if not head:
            raise CheckpointError(f"{self.path} is empty")
        if not zipfile.is_zipfile(self.path):
            if head[:1] == b"\x80":
                raise CheckpointError(f"{self.path} uses torch's legacy format: re-save it with "
                                      "torch.save(state, path, _use_new_zipfile_serialization=True)")
            raise CheckpointError(f"{self.path} is not a PyTorch checkpoint (not a zip archive), or it is truncated")
        try:
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"{self.path} is a corrupt zip archive ({exc})") from None
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            self._zip.close()
            raise CheckpointError(f"{self.path} is a zip archive but not a torch.save checkpoint (no data.pkl)")
        self._prefix = pkl[0][: -len("data.pkl")]
        self._members = {n[len(self._prefix) + len("data/"):]: n for n in names
                         if n.startswith(self._prefix + "data/")}
        self._file = open(self.path, "rb")
        try:
            with self._zip.open(pkl[0]) as stream:
                root = _SafeUnpickler(stream, self._members).load()
        except CheckpointError:
            self.close()
            raise
        except Exception as exc:  # truncated or malformed pickles raise many kinds of errors
            self.close()
            raise CheckpointError(f"{self.path}: cannot read data.pkl ({type(exc).__name__}: {exc})") from None
        if isinstance(root, dict):
            inner = [k for k in self.WRAPPERS if isinstance(root.get(k), dict)]
            if len(inner) == 1 and not any(isinstance(v, TensorRef) for v in root.values()):
                root = root[inner[0]]
        if not isinstance(root, dict):
            self.close()
            raise CheckpointError(f"{self.path} does not hold a state dict (found {type(root).__name__})")
        self.tensors: dict[str, TensorRef] = {}
        self.extras: dict[str, Any] = {}
        _flatten(root, "", self.tensors, self.extras)
        for ref in self.tensors.values():
            ref.archive = self

    def _data_offset(self, member: str) -> tuple[int, int]:
        """Byte offset and size of a stored (uncompressed) member's data in the file."""
        info = self._zip.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: storage {member} is compressed, which torch.save never does")
        self._file.seek(info.header_offset)
        header = self._file.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: damaged zip entry for {member}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_len + extra_len, info.file_size

    def read_tensor(self, ref: TensorRef) -> np.ndarray:
        dtype = np.dtype(NUMPY[ref.dtype])
        start, size = self._data_offset(self._members[ref.storage.key])
        if not ref.shape:
            extent = 1
        elif 0 in ref.shape:
            return np.zeros(ref.shape, dtype)
        else:
            extent = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
        first, count = ref.offset * dtype.itemsize, extent * dtype.itemsize
        if first + count > size:
            raise CheckpointError(f"{self.path}: tensor {ref.name} lies outside its storage (file truncated?)")
        self._file.seek(start + first)
        raw = self._file.read(count)
        if len(raw) != count:
            raise CheckpointError(f"{self.path}: tensor {ref.name} is truncated")
        flat = np.frombuffer(raw, dtype=dtype)
        if not ref.shape:
            return flat[0:1].reshape(()).copy()
        strided = np.lib.stride_tricks.as_strided(flat, ref.shape, [s * dtype.itemsize for s in ref.stride])
        return np.ascontiguousarray(strided)

    def close(self) -> None:
        for handle in ("_file", "_zip"):
            if hasattr(self, handle):
                getattr(self, handle).close()

    def __enter__(self) -> "TorchCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(path: str | Path) -> TorchCheckpoint:
    return TorchCheckpoint(path)
