"""The .pth reader's allow-list, pinned, and the gadget chains it must refuse.

One more name in the allow-list can be enough for a crafted checkpoint to reach arbitrary code, so the list is
compared with a literal here: changing it must be a deliberate edit of this file too. Every gadget is written
opcode by opcode (no pickler decides what goes in the stream), wrapped in a zip laid out as torch.save lays it
out, and where the payload runs code under a plain ``pickle.loads`` that is shown first (the control), so a
refusal is a refusal of a live exploit.
"""

import collections
import re
import pickle
import zipfile

import numpy as np
import pytest

from starflow_mlx.convert import torch_pickle
from starflow_mlx.convert.torch_pickle import SAFE_GLOBALS, CheckpointError, TorchType, open_checkpoint

ALLOWED = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage"), ("torch", "Size"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
    ("_codecs", "encode"),
    *(("torch", name) for name in (
        "FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "ComplexFloatStorage",
        "ComplexDoubleStorage", "LongStorage", "IntStorage", "ShortStorage", "CharStorage", "ByteStorage",
        "BoolStorage")),
    *(("torch", name) for name in (
        "float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "complex64", "complex128",
        "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool")),
}
# The only real Python objects a pickle may reach: immutable types whose call builds plain data. torch.Size is a
# stand-in that takes only ints: ``tuple`` itself would nest a list's tuples one level deeper per call, past the
# reader's scan of tuple nesting (hashing a deep tuple crashes the process).
REAL_OBJECTS = {("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "complex"): complex}
# OrderedDict is a subclass whose BUILD accepts only torch's _metadata (a state dict's only attribute).
STAND_INS = {("collections", "OrderedDict"): torch_pickle._StateDict}


def test_the_allow_list_is_exactly_this():
    assert set(SAFE_GLOBALS) == ALLOWED
    for key, value in SAFE_GLOBALS.items():
        if key in REAL_OBJECTS:
            assert value is REAL_OBJECTS[key]
        elif key in STAND_INS:
            assert value is STAND_INS[key] and issubclass(value, collections.OrderedDict)
        else:  # everything else is a stand-in: an immutable tuple or a function wrapper BUILD cannot touch
            assert isinstance(value, (TorchType, torch_pickle._Frozen)), key


def checkpoint(path, payload: bytes, storages: dict[str, bytes] | None = None):
    """``payload`` as the data.pkl of a zip laid out as torch.save lays it out."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def text(value: str) -> bytes:
    """A protocol-0 unicode string opcode (V) for a value with no newline or backslash."""
    assert "\n" not in value and "\\" not in value
    return b"V" + value.encode() + b"\n"


def short(value: str) -> bytes:
    """A protocol-4 SHORT_BINUNICODE opcode."""
    raw = value.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def gadgets(sentinel) -> dict[str, tuple[bytes, str, bool]]:
    """name -> (pickle, the global the reader must name, whether plain pickle.loads runs it)."""
    touch, py = f"touch {sentinel}", f"open({str(sentinel)!r}, 'w').close()"
    import_os = b"cbuiltins\n__import__\n(" + text("os") + b"tR"
    return {
        "os.system": (b"cos\nsystem\n(" + text(touch) + b"tR.", "os.system", True),
        "posix.system": (b"cposix\nsystem\n(" + text(touch) + b"tR.", "posix.system", True),
        "eval": (b"cbuiltins\neval\n(" + text(py) + b"tR.", "builtins.eval", True),
        "exec": (b"cbuiltins\nexec\n(" + text(py) + b"tR.", "builtins.exec", True),
        # Protocol 2 spells builtins as __builtin__: the reader maps the name, and still refuses eval.
        "__builtin__.eval": (b"c__builtin__\neval\n(" + text(py) + b"tR.", "builtins.eval", True),
        # __import__('os') memoized, then getattr(os, 'system')('touch ...').
        "__import__": (import_os + b"p0\n0cbuiltins\ngetattr\n(g0\n" + text("system") + b"tR("
                       + text(touch) + b"tR.", "builtins.__import__", True),
        "getattr": (b"cbuiltins\ngetattr\n(" + import_os + text("system") + b"tR(" + text(touch) + b"tR.",
                    "builtins.getattr", True),
        "attrgetter": (b"coperator\nattrgetter\n(" + text("system") + b"tR(" + import_os + b"tR("
                       + text(touch) + b"tR.", "operator.attrgetter", True),
        "methodcaller": (b"coperator\nmethodcaller\n(" + text("system") + text(touch) + b"tR(" + import_os
                         + b"tR.", "operator.methodcaller", True),
        "subprocess": (b"csubprocess\ncheck_call\n((" + text("touch") + text(str(sentinel)) + b"ltR.",
                       "subprocess.check_call", True),
        # The same call through the protocol-4 opcodes: STACK_GLOBAL takes its names from the stack.
        "STACK_GLOBAL": (b"\x80\x04" + short("os") + short("system") + b"\x93" + short(touch) + b"\x85R.",
                         "os.system", True),
        # INST and OBJ call the class they name with the marked arguments, as REDUCE does.
        "INST": (b"(" + text(touch) + b"ios\nsystem\n.", "os.system", True),
        "OBJ": (b"(cos\nsystem\n" + text(touch) + b"o.", "os.system", True),
        # NEWOBJ calls cls.__new__, NEWOBJ_EX cls.__new__ with keywords: still only on a class the reader gives.
        "NEWOBJ": (b"\x80\x02csubprocess\nPopen\n(" + text(touch) + b"t\x81.", "subprocess.Popen", False),
        "NEWOBJ_EX": (b"\x80\x04" + short("subprocess") + short("Popen") + b"\x93)}\x92.",
                      "subprocess.Popen", False),
        # A class's __reduce__ is replayed as GLOBAL + REDUCE: pickling an object whose __reduce__ names
        # a dangerous callable gives exactly this stream.
        "__reduce__": (pickle.dumps(_Reduces(touch), protocol=2), "posix.system", True),
    }


class _Reduces:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


GADGETS = sorted(gadgets("x"))


@pytest.mark.parametrize("name", GADGETS)
def test_gadget_chains_are_refused_by_name_before_anything_runs(tmp_path, name):
    payload, target, live = gadgets(tmp_path / "control")[name]
    if live:  # the control: under plain pickle the payload really runs
        pickle.loads(payload)
        assert (tmp_path / "control").exists(), name
    payload, target, _ = gadgets(tmp_path / "pwned")[name]
    with pytest.raises(CheckpointError, match=f"refusing to load checkpoint: it references {target}, "
                                              "which is not a tensor or plain container"):
        open_checkpoint(checkpoint(tmp_path / "evil.pth", payload))
    assert not (tmp_path / "pwned").exists()


def still_reads_a_real_checkpoint(tmp_path):
    """A checkpoint made after a hostile one loads as before: the hostile one changed nothing in the reader."""
    assert set(SAFE_GLOBALS) == ALLOWED
    data = np.arange(4, dtype=np.float32)
    payload = (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
               b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
               b"K\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs.")
    with open_checkpoint(checkpoint(tmp_path / "ok.pth", payload, {"0": data.tobytes()})) as ck:
        ref = ck.tensors["w"]
        assert (ref.dtype, ref.shape) == ("float32", (4,)) and ref.read().tolist() == [0, 1, 2, 3]


# BUILD sets state on the object below it on the stack: through __setstate__ if it has one, else by
# updating __dict__ (dict state) or setattr (the second item of a (dict, slots) pair).
BUILDS = {
    # The allowed classes themselves: would give every OrderedDict (or tuple: torch.Size) a new method.
    "OrderedDict class, dict state": b"ccollections\nOrderedDict\n}" + text("__setstate__") + b"I1\nsb.",
    "OrderedDict class, slot state": b"ccollections\nOrderedDict\n(N}" + text("__reduce__") + b"I1\nstb.",
    "Size class, slot state": b"ctorch\nSize\n(N}" + text("__new__") + b"I1\nstb.",
    "set class, slot state": b"cbuiltins\nset\n(N}" + text("__init__") + b"I1\nstb.",
    # The stand-ins: a storage class retargeted to another dtype, a rebuild function's defaults rewritten.
    "storage stand-in": b"ctorch\nFloatStorage\n(N}" + text("dtype") + text("int8") + b"stb.",
    "dtype stand-in, dict state": b"ctorch\nfloat32\n}" + text("dtype") + text("int8") + b"sb.",
    "rebuild function, dict state": b"ctorch._utils\n_rebuild_tensor_v2\n}" + text("__defaults__") + b"(I1\ntsb.",
    "rebuild function, slot state": b"ctorch._utils\n_rebuild_tensor_v3\n(N}" + text("_function") + b"I1\nstb.",
    "rebuild function, __dict__": b"ctorch._utils\n_rebuild_tensor\n}" + text("__dict__") + b"}sb.",
    # Nested BUILD: the first gives an OrderedDict made by the pickle an instance __setstate__ (the codec
    # stand-in), the second BUILD then calls it with a state of the pickle's choosing.
    "nested BUILD": (b"ccollections\nOrderedDict\n)R}" + text("__setstate__") + b"c_codecs\nencode\nsb"
                     + text("x") + b"b."),
}


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_build_cannot_change_the_readers_objects(tmp_path, name):
    before = {key: (vars(value).copy() if hasattr(value, "__dict__") else None) for key, value in SAFE_GLOBALS.items()}
    # The function stand-ins say why; the rest fail inside pickle (immutable types, tuples without __dict__).
    message = "^refusing to load checkpoint: it tries to modify the reader$" if name.startswith("rebuild") else None
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(checkpoint(tmp_path / "evil.pth", BUILDS[name]))
    assert not hasattr(collections.OrderedDict(), "__setstate__") and torch_pickle._rebuild_tensor.__defaults__ is None
    assert SAFE_GLOBALS[("torch", "FloatStorage")] == TorchType("storage", "float32")
    assert SAFE_GLOBALS[("torch", "float32")] == TorchType("dtype", "float32")
    assert {key: (vars(value).copy() if hasattr(value, "__dict__") else None) for key, value in SAFE_GLOBALS.items()} == before
    still_reads_a_real_checkpoint(tmp_path)


def pid(*items: bytes) -> bytes:
    """BINPERSID on a tuple of the given opcodes, the whole pickle a dict {'w': that}."""
    return b"\x80\x02}X\x01\x00\x00\x00w(" + b"".join(items) + b"tQs."


PERSISTENT = {
    "a bare string": (b"\x80\x02}X\x01\x00\x00\x00w" + text("os.system") + b"Qs.", "unexpected persistent reference"),
    "four items": (pid(text("storage"), b"ctorch\nFloatStorage\n", text("0"), text("cpu")),
                   "unexpected persistent reference"),
    "kind not a stand-in": (pid(text("storage"), text("FloatStorage"), text("0"), text("cpu"), b"I1\n"),
                            "unexpected persistent reference"),
    "a dtype as the kind": (pid(text("storage"), b"ctorch\nfloat32\n", text("0"), text("cpu"), b"I1\n"),
                            "unexpected persistent reference"),
    "not a storage": (pid(text("module"), b"ctorch\nFloatStorage\n", text("0"), text("cpu"), b"I1\n"),
                      "unexpected persistent reference"),
    "a path as the key": (pid(text("storage"), b"ctorch\nFloatStorage\n", text("../../etc/passwd"), text("cpu"),
                              b"I1\n"), "which the archive does not contain"),
    "the index as the key": (pid(text("storage"), b"ctorch\nFloatStorage\n", text("../data.pkl"), text("cpu"),
                                 b"I1\n"), "which the archive does not contain"),
    "a list as the key": (pid(text("storage"), b"ctorch\nFloatStorage\n", b"(" + text("0") + b"l", text("cpu"),
                              b"I1\n"), "which the archive does not contain"),
    "a negative size": (pid(text("storage"), b"ctorch\nFloatStorage\n", text("0"), text("cpu"), b"I-1\n"),
                        "a bad size"),
    "a float size": (pid(text("storage"), b"ctorch\nFloatStorage\n", text("0"), text("cpu"), b"F1.5\n"),
                     "a bad size"),
    # A GLOBAL inside the persistent id is resolved like any other: no way around the allow-list.
    "a gadget inside": (pid(text("storage"), b"cos\nsystem\n", text("0"), text("cpu"), b"I1\n"),
                        "it references os.system"),
}


@pytest.mark.parametrize("name", sorted(PERSISTENT))
def test_persistent_ids_name_only_this_archives_storages(tmp_path, name):
    payload, message = PERSISTENT[name]
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(checkpoint(tmp_path / "evil.pth", payload, {"0": b"\0" * 4}))
    still_reads_a_real_checkpoint(tmp_path)


# ---------------------------------------------------------------- gaps mutation testing found


def v3_tensor(dtype_opcodes: bytes) -> bytes:
    """{'w': _rebuild_tensor_v3(storage, 0, (4,), (1,), False, OrderedDict(), <dtype>)}."""
    return (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v3\n("
            b"(X\x07\x00\x00\x00storagectorch.storage\nUntypedStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x10tQ"
            b"K\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)R" + dtype_opcodes + b"tRs.")


def test_rebuild_v3_takes_only_a_dtype_stand_in(tmp_path):
    data = {"0": np.arange(4, dtype=np.float32).tobytes()}
    with open_checkpoint(checkpoint(tmp_path / "ok.pth", v3_tensor(b"ctorch\nfloat32\n"), data)) as ck:
        assert ck.tensors["w"].read().tolist() == [0, 1, 2, 3]
    # A storage class where the dtype goes, or a plain number: refused, naming what was given.
    for opcodes, shown in ((b"ctorch\nFloatStorage\n", "TorchType('storage', 'float32')"), (b"K\x05", "5")):
        with pytest.raises(CheckpointError, match=f"rebuilds a tensor with an unknown dtype {re.escape(shown)}$"):
            open_checkpoint(checkpoint(tmp_path / "bad.pth", v3_tensor(opcodes), data))


@pytest.mark.parametrize("codec", ["latin1", "latin-1"])
def test_bytes_in_either_latin1_spelling_decode(tmp_path, codec):
    """Protocol 2 pickles bytes as _codecs.encode(text, 'latin1'); Python accepts 'latin-1' as the same codec."""
    value = "\u00e9x".encode()  # BINUNICODE holds UTF-8: the text is 'éx'
    payload = (b"\x80\x02}X\x01\x00\x00\x00bc_codecs\nencode\nX" + len(value).to_bytes(4, "little") + value
               + text(codec) + b"\x86Rs.")
    with open_checkpoint(checkpoint(tmp_path / "codec.pth", payload)) as ck:
        assert ck.extras["b"] == b"\xe9x"


def test_a_view_of_a_storage_larger_than_a_read_chunk_checks_all_of_it(tmp_path):
    """A tensor reading part of its storage checks the whole entry's CRC, streamed 1 MB at a time: every chunk
    counts, in order, and damage in the last one is found."""
    n = 700_000  # 2.8 MB of float32: three chunks
    values = np.arange(n, dtype=np.float32)
    payload = (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
               b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ"
               + n.to_bytes(4, "little") + b"tQK\x05K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs.")
    with open_checkpoint(checkpoint(tmp_path / "big.pth", payload, {"0": values.tobytes()})) as ck:
        assert ck.tensors["w"].read().tolist() == [5, 6, 7, 8]
    # Damage in the third chunk, far from the bytes the view reads; the archive keeps its CRC of the good data,
    # so only the reader's own check can notice.
    damaged = values.copy()
    damaged[-3] = -1
    good = (tmp_path / "big.pth").read_bytes()
    start = good.index(values[:4].tobytes())
    (tmp_path / "damaged.pth").write_bytes(good[:start] + damaged.tobytes() + good[start + 4 * n:])
    with open_checkpoint(tmp_path / "damaged.pth") as ck, pytest.raises(CheckpointError, match="fails its checksum"):
        ck.tensors["w"].read()
