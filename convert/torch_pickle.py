"""A safe, lazy reader for PyTorch checkpoints (``torch.save`` zip archives), without torch.

Pickle can run arbitrary code, so the unpickler resolves only the few globals
that rebuild tensors and plain containers, each to a harmless stand-in, and
refuses every other name. Tensors come back as handles: nothing is read until
``TensorRef.read()``, which reads just that tensor's bytes, so a checkpoint
larger than memory can be converted one tensor at a time.

Work and memory are bounded by the file's real size: the entries torch.save never
compresses must be stored, names and views are counted against the bytes that back
them, and every message formats file content only through :func:`shown`. Where torch
would refuse a file (duplicated entries, an unknown byte order, a storage read as two
dtypes, a bad checksum) this reader refuses it too.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from starflow_mlx.safe_text import printable, shown


class CheckpointError(ValueError):
    """The file is not a checkpoint this reader can load safely."""


# dtype name -> numpy dtype holding its values. Formats numpy lacks come back as same-size unsigned bit patterns.
NUMPY = {name: np.dtype(dt) for name, dt in {
    "float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16,
    "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8, "complex64": np.complex64, "complex128": np.complex128,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
    "uint64": np.uint64, "uint32": np.uint32, "uint16": np.uint16, "uint8": np.uint8, "bool": np.bool_,
}.items()}

# Typed storage classes, as torch pickles them for the classic dtypes.
STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128", "LongStorage": "int64",
    "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


# The stand-ins are tuples: pickle's BUILD opcode cannot mutate them, so a hostile pickle cannot retarget one.
class TorchType(NamedTuple):
    """A torch storage class or dtype referenced by the pickle; ``dtype`` is None for untyped (byte) storage."""

    kind: str  # "storage" or "dtype"
    dtype: str | None


class Storage(NamedTuple):
    key: str
    dtype: str | None
    nbytes: int


class _Tensor(NamedTuple):
    storage: Storage
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, tuple) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise CheckpointError(f"checkpoint rebuilds a tensor with a bad {what}: {shown(values)}")
    return tuple(int(v) for v in values)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None) -> _Tensor:
    if not isinstance(storage, Storage):
        raise CheckpointError("checkpoint rebuilds a tensor from something that is not a storage")
    dtype = dtype or storage.dtype
    if dtype is None or (storage.dtype is not None and storage.dtype != dtype):
        raise CheckpointError(f"checkpoint rebuilds a {dtype} tensor from a {storage.dtype or 'untyped'} storage")
    shape, stride = _ints(size, "shape"), _ints(stride, "stride")
    if len(shape) != len(stride):
        raise CheckpointError(f"checkpoint rebuilds a tensor whose shape {shape} and stride {stride} disagree")
    return _Tensor(storage, dtype, _ints((offset,), "storage offset")[0], shape, stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _tensor(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_ignored):
    if not (isinstance(dtype, TorchType) and dtype.kind == "dtype"):
        raise CheckpointError(f"checkpoint rebuilds a tensor with an unknown dtype {shown(dtype)}")
    return _tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, *_ignored):
    return data


def _size(values):
    """``torch.Size``, which holds only ints: no other tuple can be made from a list's items (see _nesting)."""
    if not isinstance(values, tuple) or not all(isinstance(v, int) for v in values):
        raise CheckpointError(f"checkpoint makes a torch.Size of {shown(values)}, which is not a tuple of integers")
    return values


def _encode(text, encoding="utf-8"):
    """Protocol 2 pickles bytes as ``_codecs.encode(text, "latin1")``; no other codec is needed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"refusing to load checkpoint: it encodes data with the {shown(encoding)} codec")
    return text.encode("latin1")


class _Frozen:
    """A stand-in function the pickle can call but not change: BUILD on it is refused, so a file
    cannot rewrite the reader (e.g. a function's ``__defaults__``) for later checkpoints."""

    __slots__ = ("_function",)

    def __init__(self, function):
        object.__setattr__(self, "_function", function)

    def __call__(self, *args):
        return self._function(*args)

    def __setattr__(self, name, value):
        raise CheckpointError("refusing to load checkpoint: it tries to modify the reader")

    def __setstate__(self, state):
        raise CheckpointError("refusing to load checkpoint: it tries to modify the reader")


class _StateDict(collections.OrderedDict):
    """What the pickle gets for ``collections.OrderedDict``. torch pickles a state dict's ``_metadata`` with BUILD;
    any other attribute BUILD would set (``items``, ``keys``...) would shadow the dict's own methods and let the
    file choose what the reader later calls, so it is refused; ``_metadata`` is not needed and is dropped."""

    def __setstate__(self, state):
        for part in state if isinstance(state, tuple) else (state,):  # (instance dict, slot state) or the dict
            extra = sorted(map(str, set(part) - {"_metadata"})) if isinstance(part, dict) else [type(part).__name__]
            if part is not None and extra:
                raise CheckpointError(f"refusing to load checkpoint: it sets {shown(extra[0])} on a dictionary, "
                                      "which a state dict never holds")


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _Frozen(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Frozen(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v3"): _Frozen(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Frozen(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Frozen(_rebuild_parameter),
    ("torch.storage", "UntypedStorage"): TorchType("storage", None),
    ("torch", "UntypedStorage"): TorchType("storage", None),
    ("torch", "Size"): _Frozen(_size),
    ("collections", "OrderedDict"): _StateDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _Frozen(_encode),
    **{("torch", name): TorchType("storage", dtype) for name, dtype in STORAGES.items()},
    **{("torch", name): TorchType("dtype", name) for name in NUMPY},
}


# Hashing a tuple (a dict key, a set member) recurses in C, past Python's recursion limit: a crafted index of a
# million nested tuples crashes the process. Tuples in a checkpoint nest a few levels; this bound keeps C's stack
# far from its end, even in a thread.
MAX_NESTING = 1000
_TUPLES = {"EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"}
_CALLS = {"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BUILD"}  # results made from (or being) their operands


def _nesting(index: bytes) -> bytes:
    """``index`` up to the first operation this scan cannot follow, checked to nest no tuple past MAX_NESTING.

    The scan plays the pickle's stack with, for each value, how deep tuples nest through it: a tuple one more
    than its deepest item, a call's result as deep as its operands (``_rebuild_parameter`` returns one), all else
    0 (hashing stops at a list, dict or set, and no allowed callable makes a tuple of their items). Where the scan
    stops, at a malformed operation, the unpickler gets only the bytes read so far: it refuses there too, with
    its own message, and runs nothing unchecked."""
    stream = io.BytesIO(index)
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[Any, int] = {}
    try:
        for op, arg, _position in pickletools.genops(stream):
            if op.name == "MARK":
                marks.append(len(stack))
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if op.name == "MEMOIZE" else arg] = stack[-1]
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif op.name == "DUP":
                stack.append(stack[-1])
            elif op.name == "POP" and marks and marks[-1] == len(stack):  # as the unpickler: POP drops a bare mark
                marks.pop()
            else:
                before = op.stack_before
                start = (marks.pop() - before.index(pickletools.markobject) if pickletools.markobject in before
                         else len(stack) - len(before))
                if start < 0:
                    raise IndexError("stack underflow")
                taken, stack[start:] = stack[start:], []
                if op.name in _TUPLES:
                    stack.append(1 + max(taken, default=0))
                    if stack[-1] > MAX_NESTING:
                        raise RecursionError  # refused by _load_index as an index nested too deeply
                elif op.name in _CALLS:
                    stack.append(max(taken, default=0))
                else:
                    stack.extend(0 for _ in op.stack_after)
    except (ValueError, IndexError, KeyError):
        return index[: stream.tell()]
    return index


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, stream, storages: dict[str, zipfile.ZipInfo]):
        super().__init__(stream)
        self._storages = storages
        self._seen: dict[str, Storage] = {}

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocol 2, which torch.save uses, writes Python 2's module name
            module = "builtins"
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(f"refusing to load checkpoint: it references {printable(module, 60)}.{printable(name, 60)}, "
                                  "which is not a tensor or plain container") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], TorchType) and pid[1].kind == "storage"):
            raise CheckpointError(f"refusing to load checkpoint: unexpected persistent reference {shown(pid)}")
        _, kind, key, _location, numel = pid
        if not isinstance(key, (str, int)) or str(key) not in self._storages:
            raise CheckpointError(f"checkpoint references storage {shown(key)}, which the archive does not contain")
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"checkpoint gives storage {shown(key)} a bad size {shown(numel)}")
        itemsize = NUMPY[kind.dtype].itemsize if kind.dtype else 1
        storage = Storage(str(key), kind.dtype, numel * itemsize)
        # torch keeps the first view of a storage; one storage seen as two dtypes or sizes is a damaged file.
        if self._seen.setdefault(storage.key, storage) != storage:
            raise CheckpointError(f"checkpoint uses storage {shown(key)} as both {self._seen[storage.key].dtype} "
                                  f"and {storage.dtype} (or with two sizes): the file is damaged")
        return storage


@dataclass
class TensorRef:
    """A tensor in a checkpoint, read on demand. ``stride`` and ``storage_offset`` count elements."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_key: str
    storage_offset: int
    storage_nbytes: int = field(repr=False)
    archive: TorchCheckpoint = field(repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * NUMPY[self.dtype].itemsize

    def read(self) -> np.ndarray:
        """The tensor's values as a new contiguous array (bfloat16 and float8 as unsigned bit patterns)."""
        return self.archive.read_tensor(self)


class TorchCheckpoint:
    """Open with a ``with`` block; ``tensors`` maps flat names to :class:`TensorRef`, ``extras`` holds the rest."""

    WRAPPERS = ("model", "state_dict", "module", "ema")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None
        root = self._load_index()
        self.tensors: dict[str, TensorRef] = {}
        self.extras: dict[str, Any] = {}
        if isinstance(root, dict) and not any(isinstance(v, _Tensor) for v in root.values()):
            wrapped = [k for k in self.WRAPPERS if isinstance(root.get(k), dict)]
            if len(wrapped) == 1:
                self.extras.update((str(k), v) for k, v in root.items() if k != wrapped[0])
                root = root[wrapped[0]]
        if not isinstance(root, dict):
            self.close()
            raise CheckpointError(f"{self.path} does not hold a state dict (found {type(root).__name__})")
        self._size = self.path.stat().st_size
        self._budget = max(4096, self._size // 4)
        self._expansion = self._size + (1 << 20)
        try:
            self._flatten(root, "", set())
        except RecursionError:
            self.close()
            raise CheckpointError(f"{self.path}: the state dict is nested too deeply") from None
        except CheckpointError:
            self.close()
            raise

    def _load_index(self) -> Any:
        """Check the archive, keep its storage entries, and unpickle data.pkl into stand-ins."""
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint {self.path} not found")
        with open(self.path, "rb") as f:
            head = f.read(4)
        if not head:
            raise CheckpointError(f"{self.path} is empty")
        if not zipfile.is_zipfile(self.path):
            if head[:1] == b"\x80":  # a bare pickle: what torch.save wrote before its zip format
                raise CheckpointError(f"{self.path} uses torch's legacy format: re-save it with "
                                      "torch.save(state, path, _use_new_zipfile_serialization=True)")
            if head == b"PK\x03\x04":
                raise CheckpointError(f"{self.path} is a truncated or corrupt zip archive")
            raise CheckpointError(f"{self.path} is not a PyTorch checkpoint (not a zip archive)")
        try:
            with zipfile.ZipFile(self.path) as archive:
                infos = archive.infolist()
                names = [i.filename for i in infos]
                if len(set(names)) != len(names):  # readers disagree on which copy counts: refuse, as torch does
                    twice = next(n for n in names if names.count(n) > 1)
                    raise CheckpointError(f"{self.path} holds the entry {shown(twice)} twice: the archive is damaged")
                pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
                if len(pkl) != 1:
                    raise CheckpointError(f"{self.path} is a zip archive but not a torch.save checkpoint "
                                          f"({'no' if not pkl else 'more than one'} data.pkl)")
                prefix = pkl[0][: -len("data.pkl")]
                self._members = {i.filename[len(prefix) + 5:]: i for i in infos
                                 if i.filename.startswith(prefix + "data/")}
                order = self._read_small(archive, prefix + "byteorder") if prefix + "byteorder" in names else b"little"
                if order not in (b"little", b"big"):
                    raise CheckpointError(f"{self.path} has an unknown byte order {shown(order)} (torch reads "
                                          "only 'little' or 'big')")
                self._swap = order == b"big"
                index = self._read_small(archive, pkl[0])  # read whole, so zipfile checks its CRC
                root = _SafeUnpickler(io.BytesIO(_nesting(index)), self._members).load()
        except CheckpointError:
            raise
        except RecursionError:
            raise CheckpointError(f"{self.path}: the checkpoint index is nested too deeply") from None
        except Exception as exc:  # damaged archives and malformed pickles raise many kinds of errors
            raise CheckpointError(f"{self.path}: cannot read the checkpoint index "
                                  f"({type(exc).__name__}: {shown(str(exc), 120)})") from None
        self._file = open(self.path, "rb")
        self._starts: dict[str, int] = {}
        self._verified: set[str] = set()
        return root

    def _read_small(self, archive: zipfile.ZipFile, name: str) -> bytes:
        """An index entry, which torch.save stores uncompressed: a compressed one could inflate without bound."""
        info = archive.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
            raise CheckpointError(f"{self.path}: {printable(name, 120)} is compressed or encrypted, which torch.save never does")
        return archive.read(info)

    def _flatten(self, obj: dict, prefix: str, active: set[int]) -> None:
        if id(obj) in active:
            raise CheckpointError(f"{self.path}: the state dict contains itself")
        active.add(id(obj))
        for key, value in obj.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            # Shared sub-dicts are walked once per path: bound names by what the file's bytes can back.
            self._budget -= 1 + len(name) // 16
            if self._budget < 0:
                raise CheckpointError(f"{self.path} expands to more names than a {self._size}-byte file can hold "
                                      "(shared sub-dictionaries?): it is not a real checkpoint")
            if name in self.tensors or name in self.extras:
                raise CheckpointError(f"{self.path} holds two entries named {printable(name, 120)} (as 'a.b' and "
                                      "{'a': {'b': ...}}?): refusing to drop one")
            if isinstance(value, _Tensor):
                self._check_view(name, value)
                # torch memoizes tensors, so tied weights arrive as one object under two names: one handle each.
                self.tensors[name] = TensorRef(name, value.dtype, value.shape, value.stride, value.storage.key,
                                               value.offset, value.storage.nbytes, self)
            elif isinstance(value, dict):
                self._flatten(value, name, active)
            else:
                self.extras[name] = value
        active.discard(id(obj))

    def _check_view(self, name: str, t: _Tensor) -> None:
        """Views larger than their storage (stride 0, overlapping) are copied out when read: all of them
        together may not produce more bytes than the file has, or 16 bytes could ask for gigabytes."""
        nbytes = math.prod(t.shape) * NUMPY[t.dtype].itemsize
        if nbytes > min(self._members[t.storage.key].file_size, t.storage.nbytes):
            self._expansion -= nbytes
            if self._expansion < 0:
                raise CheckpointError(f"{self.path}: tensor {printable(name, 120)} {shown(t.shape)} is a view far larger than "
                                      "its storage (stride 0 or overlapping): save it with .contiguous()")

    def _data_start(self, key: str) -> int:
        """Byte offset of a stored (uncompressed) storage entry's data in the file."""
        if key not in self._starts:
            info = self._members[key]
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
                raise CheckpointError(f"{self.path}: storage {key} is compressed or encrypted, "
                                      "which torch.save never does")
            self._file.seek(info.header_offset)
            header = self._file.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{self.path}: damaged zip entry for storage {key}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])  # the local extra field pads for alignment
            self._starts[key] = info.header_offset + 30 + name_len + extra_len
        return self._starts[key]

    def read_tensor(self, ref: TensorRef) -> np.ndarray:
        if self._file is None or self._file.closed:
            raise CheckpointError(f"{self.path} is closed: read tensors inside the `with` block")
        dtype = NUMPY[ref.dtype]
        if 0 in ref.shape:
            return np.zeros(ref.shape, dtype)
        extent = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))  # elements from first to last
        first, count = ref.storage_offset * dtype.itemsize, extent * dtype.itemsize
        info = self._members[ref.storage_key]
        stored = min(info.file_size, ref.storage_nbytes)
        if first + count > stored:
            raise CheckpointError(f"{self.path}: tensor {printable(ref.name, 120)} needs bytes {first}..{first + count} of "
                                  f"storage {shown(ref.storage_key)}, which holds {stored} (truncated checkpoint?)")
        start = self._data_start(ref.storage_key)
        whole = first == 0 and count == info.file_size
        if not whole:
            self._verify(ref.storage_key, start)
        buf = np.empty(extent, dtype)
        view = memoryview(buf.view(np.uint8))
        self._read_into(view, start + first, ref.name)
        if whole and ref.storage_key not in self._verified:  # the bytes just read are the whole entry
            self._check_crc(ref.storage_key, zlib.crc32(view))
        if self._swap:
            buf.byteswap(inplace=True)
        strided = np.lib.stride_tricks.as_strided(buf, ref.shape, [s * dtype.itemsize for s in ref.stride])
        return strided if strided.flags.c_contiguous else strided.copy()  # copy only non-contiguous views

    def _read_into(self, view: memoryview, position: int, name: str) -> None:
        got = 0
        self._file.seek(position)
        while got < len(view):
            n = self._file.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{self.path}: tensor {printable(name, 120)} is truncated (file ends early)")
            got += n

    def _verify(self, key: str, start: int, chunk: int = 1 << 20) -> None:
        """Check a storage entry's CRC once, streaming it (for tensors that read only part of it)."""
        if key in self._verified:
            return
        crc, left = 0, self._members[key].file_size
        buf = memoryview(bytearray(min(chunk, left)))
        position = start
        while left:
            part = buf[: min(chunk, left)]
            self._read_into(part, position, f"storage {key}")
            crc, left, position = zlib.crc32(part, crc), left - len(part), position + len(part)
        self._check_crc(key, crc)

    def _check_crc(self, key: str, crc: int) -> None:
        if crc != self._members[key].CRC:
            raise CheckpointError(f"{self.path}: storage {shown(key)} fails its checksum: the file is damaged "
                                  "(download or copy it again)")
        self._verified.add(key)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> TorchCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(path: str | Path) -> TorchCheckpoint:
    return TorchCheckpoint(path)
