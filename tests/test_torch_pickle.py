"""The safe .pth reader and the streaming safetensors writer.

Tensors of every layout come back exactly, the writer's files load in safetensors and MLX, and code in a
pickle never runs: hostile checkpoints are refused by the name of what they reference.
"""

import collections
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from starflow_mlx.convert.safetensors_stream import bf16_to_f32, to_dtype, write_safetensors
from starflow_mlx.convert.torch_pickle import CheckpointError, TensorRef, open_checkpoint

torch = pytest.importorskip("torch")


def torch_zip(path, payload: bytes, storages: dict[str, bytes] | None = None) -> None:
    """A zip laid out as torch.save lays it out, around a hand-made data.pkl."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)


class StorageRef:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class FakeTensor:
    """Pickles exactly as torch pickles a float32 tensor, with whatever storage reference and layout we give."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel) if isinstance(obj, StorageRef) else None


def fake_checkpoint(path, state, storages):
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(state)
    torch_zip(path, buf.getvalue(), storages)


# ---------------------------------------------------------------- reading


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.register_buffer("steps", torch.tensor(7))


def test_layouts_and_dtypes_round_trip(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tied = torch.randn(5)
    module = Tiny().state_dict()
    assert isinstance(module, collections.OrderedDict)
    state = collections.OrderedDict({
        **module,
        "f32": torch.randn(3, 5), "f64": torch.randn(2).double(), "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).bfloat16(), "i64": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32),
        "u8": torch.arange(4, dtype=torch.uint8), "flags": torch.tensor([True, False]),
        "u16": torch.tensor([1, 2, 60000], dtype=torch.uint16),  # newer dtypes pickle through _rebuild_tensor_v3
        "transposed": base.t(), "view_with_offset": base[1:, 2:4], "base": base,
        "expanded": torch.ones(3, 1).expand(3, 4), "empty": torch.zeros(0, 3), "scalar": torch.tensor(3.5),
        "tied_a": tied, "tied_b": tied,
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "nested": {"inner": torch.ones(2), "deeper": {"x": torch.zeros(1)}},
    })
    torch.save({"model": state, "epoch": 3, "note": "hello"}, tmp_path / "c.pth")
    with open_checkpoint(tmp_path / "c.pth") as ck:
        got = {name: ref.read() for name, ref in ck.tensors.items()}
        refs = dict(ck.tensors)
        assert ck.extras == {"epoch": 3, "note": "hello"}
    flat = {k: v for k, v in state.items() if k != "nested"}
    flat.update({"nested.inner": torch.ones(2), "nested.deeper.x": torch.zeros(1)})
    assert set(got) == set(flat)
    for name, tensor in flat.items():
        if tensor.dtype == torch.bfloat16:
            assert refs[name].dtype == "bfloat16" and got[name].dtype == np.uint16
            assert np.array_equal(bf16_to_f32(got[name]), tensor.float().numpy()), name
        else:
            expected = tensor.detach().numpy()
            assert got[name].dtype == expected.dtype and np.array_equal(got[name], expected), name
        assert got[name].flags.c_contiguous and got[name].flags.writeable
        assert refs[name].shape == tuple(tensor.shape) and refs[name].nbytes == got[name].nbytes
    assert refs["view_with_offset"].storage_offset == 8 and refs["transposed"].stride == (1, 6)
    assert refs["view_with_offset"].storage_key == refs["base"].storage_key  # one shared storage
    assert refs["tied_a"].name == "tied_a" and refs["tied_b"].name == "tied_b"
    assert refs["u16"].dtype == "uint16" and refs["flags"].dtype == "bool"


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "module", "ema"])
def test_single_wrapped_state_dict_is_unwrapped(tmp_path, wrapper):
    torch.save({wrapper: {"w": torch.ones(2)}, "step": 10}, tmp_path / "c.pth")
    with open_checkpoint(tmp_path / "c.pth") as ck:
        assert list(ck.tensors) == ["w"] and ck.extras == {"step": 10}


def test_two_state_dicts_are_both_kept_under_their_names(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "ema": {"w": torch.zeros(2)}}, tmp_path / "c.pth")
    with open_checkpoint(tmp_path / "c.pth") as ck:
        assert sorted(ck.tensors) == ["ema.w", "model.w"]
        assert ck.tensors["ema.w"].read().tolist() == [0, 0]


def test_plain_values_beside_tensors_are_extras(tmp_path):
    torch.save({"w": torch.ones(1), "cfg": {"size": torch.Size([2, 3]), "tags": {"a"}, "raw": b"\x00\xff",
                                            "dtype": "float32"}}, tmp_path / "c.pth")
    with open_checkpoint(tmp_path / "c.pth") as ck:
        assert ck.extras == {"cfg.size": (2, 3), "cfg.tags": {"a"}, "cfg.raw": b"\x00\xff", "cfg.dtype": "float32"}


def test_opening_reads_no_tensor_data_and_truncated_storage_names_the_tensor(tmp_path):
    torch.save({"good": torch.ones(4), "bad": torch.arange(1000, dtype=torch.float32)}, tmp_path / "ok.pth")
    with zipfile.ZipFile(tmp_path / "ok.pth") as src, zipfile.ZipFile(tmp_path / "cut.pth", "w") as dst:
        with open_checkpoint(tmp_path / "ok.pth") as ck:
            bad_key = ck.tensors["bad"].storage_key
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:100] if info.filename.endswith(f"/data/{bad_key}") else data)
    with open_checkpoint(tmp_path / "cut.pth") as ck:  # opens fine: nothing is read yet
        assert ck.tensors["good"].read().tolist() == [1, 1, 1, 1]
        with pytest.raises(CheckpointError, match="tensor bad .*truncated"):
            ck.tensors["bad"].read()
    with pytest.raises(CheckpointError, match="closed"):
        ck.tensors["good"].read()


def test_bad_storage_references_are_refused(tmp_path):
    storage = {"0": np.arange(6, dtype=np.float32).tobytes()}
    fake_checkpoint(tmp_path / "ok.pth", {"w": FakeTensor(StorageRef("0", 6), 2, (2, 2), (2, 1))}, storage)
    with open_checkpoint(tmp_path / "ok.pth") as ck:
        assert ck.tensors["w"].read().tolist() == [[2, 3], [4, 5]]
    cases = {
        "missing.pth": ({"w": FakeTensor(StorageRef("9", 6), 0, (6,), (1,))}, "does not contain"),
        "negative.pth": ({"w": FakeTensor(StorageRef("0", 6), 0, (3,), (-1,))}, "bad stride"),
        "rank.pth": ({"w": FakeTensor(StorageRef("0", 6), 0, (3, 2), (1,))}, "disagree"),
        "size.pth": ({"w": FakeTensor(StorageRef("0", -1), 0, (3,), (1,))}, "bad size"),
    }
    for name, (state, message) in cases.items():
        fake_checkpoint(tmp_path / name, state, storage)
        with pytest.raises(CheckpointError, match=message):
            open_checkpoint(tmp_path / name)
    fake_checkpoint(tmp_path / "beyond.pth", {"w": FakeTensor(StorageRef("0", 6), 4, (3,), (1,))}, storage)
    with open_checkpoint(tmp_path / "beyond.pth") as ck, pytest.raises(CheckpointError, match="tensor w needs"):
        ck.tensors["w"].read()


# ---------------------------------------------------------------- hostile pickles


def placeholder(*args):
    """Stands in for the dangerous callable while pickling; its name is swapped in the bytes afterwards."""


class Exploit:
    def __init__(self, args):
        self.args = args

    def __reduce__(self):
        return placeholder, self.args


def exploit_pickle(target: str, args: tuple) -> bytes:
    module, name = target.rsplit(".", 1)
    raw = pickle.dumps({"w": Exploit(args)}, protocol=2)
    ours = f"c{placeholder.__module__}\nplaceholder\n".encode()
    assert ours in raw
    return raw.replace(ours, f"c{module}\n{name}\n".encode())


def exploit_args(target, sentinel):
    return {"os.system": (f"touch {sentinel}",), "posix.system": (f"touch {sentinel}",),
            "builtins.eval": (f"open({str(sentinel)!r}, 'w').close()",),
            "subprocess.Popen": (["touch", str(sentinel)],)}[target]


@pytest.mark.parametrize("target", ["os.system", "posix.system", "builtins.eval", "subprocess.Popen"])
def test_hostile_pickles_are_refused_by_name_and_never_run(tmp_path, target):
    # Control: the same payload under a plain pickle.loads really does run.
    control = tmp_path / "control"
    loaded = pickle.loads(exploit_pickle(target, exploit_args(target, control)))
    if isinstance(loaded["w"], subprocess.Popen):
        loaded["w"].wait()
    assert control.exists()

    sentinel = tmp_path / "pwned"
    torch_zip(tmp_path / "evil.pth", exploit_pickle(target, exploit_args(target, sentinel)))
    with pytest.raises(CheckpointError, match=f"refusing to load checkpoint: it references {target}, "
                                              "which is not a tensor or plain container"):
        open_checkpoint(tmp_path / "evil.pth")
    assert not sentinel.exists()


def test_whole_module_pickles_are_refused_by_class_name(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(CheckpointError, match="torch.nn.modules.linear.Linear"):
        open_checkpoint(tmp_path / "module.pth")


@pytest.mark.parametrize("state", [b"", b"N"], ids=["dict-state", "slot-state"])
def test_pickle_cannot_tamper_with_the_stand_ins(tmp_path, state):
    # GLOBAL torch.FloatStorage, then BUILD it with {"dtype": "evil"} (as __dict__ or as slot state): were the
    # stand-in mutable, that would retarget every later checkpoint in the process.
    payload = (b"\x80\x02}X\x01\x00\x00\x00kctorch\nFloatStorage\n" + state
               + b"}X\x05\x00\x00\x00dtypeX\x04\x00\x00\x00evils" + (b"\x86" if state else b"") + b"bs.")
    torch_zip(tmp_path / "tamper.pth", payload)
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path / "tamper.pth")
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    with open_checkpoint(tmp_path / "ok.pth") as ck:
        assert ck.tensors["w"].dtype == "float32" and ck.tensors["w"].read().tolist() == [1, 1]


def test_only_latin1_bytes_are_decoded(tmp_path):
    payload = b"\x80\x02}X\x01\x00\x00\x00bc_codecs\nencode\nX\x01\x00\x00\x00xX\x06\x00\x00\x00rot_13\x86Rs."
    torch_zip(tmp_path / "codec.pth", payload)
    with pytest.raises(CheckpointError, match="rot_13"):
        open_checkpoint(tmp_path / "codec.pth")


# ---------------------------------------------------------------- broken files


def test_broken_files_give_one_clear_error(tmp_path):
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    cases = {
        "empty.pth": (b"", "is empty"),
        "junk.pth": (b"hello world", "not a PyTorch checkpoint"),
        "trunc.pth": (data[: len(data) - 200], "truncated or corrupt zip"),
        "half.pth": (data[: len(data) // 2], "truncated or corrupt zip"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as err:
            open_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint(tmp_path / "missing.pth")
    torch.save({"w": torch.randn(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy format: re-save it with .*_use_new_zipfile_serialization=True"):
        open_checkpoint(tmp_path / "legacy.pth")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="no data.pkl"):
        open_checkpoint(tmp_path / "other.zip")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        open_checkpoint(tmp_path / "list.pth")
    loop: dict = {"w": torch.ones(1)}
    loop["again"] = loop
    torch.save(loop, tmp_path / "loop.pth")
    with pytest.raises(CheckpointError, match="contains itself"):
        open_checkpoint(tmp_path / "loop.pth")
    torch_zip(tmp_path / "garbled.pth", b"\x80\x02}q\x00(X")
    with pytest.raises(CheckpointError, match="cannot read the checkpoint index"):
        open_checkpoint(tmp_path / "garbled.pth")


# ---------------------------------------------------------------- writing


def test_checkpoint_streams_into_safetensors_that_load_in_safetensors_and_mlx(tmp_path):
    state = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
             "i64": torch.arange(6).reshape(2, 3), "t": torch.randn(4, 3).t(), "u8": torch.arange(3, dtype=torch.uint8)}
    torch.save(state, tmp_path / "c.pth")
    with open_checkpoint(tmp_path / "c.pth") as ck:
        entries = [(name, ref.dtype, ref.shape, ref.read) for name, ref in ck.tensors.items()]
        write_safetensors(tmp_path / "m.safetensors", entries, metadata={"format": "mlx"})
    path = str(tmp_path / "m.safetensors")
    loaded_mx = mx.load(path)
    assert loaded_mx["bf16"].dtype == mx.bfloat16
    assert np.array_equal(np.array(loaded_mx["bf16"].astype(mx.float32)), state["bf16"].float().numpy())
    with safe_open(path, framework="pt") as f:  # numpy has no bfloat16, so safetensors reads it only into torch
        assert torch.equal(f.get_tensor("bf16"), state["bf16"]) and f.metadata() == {"format": "mlx"}
    with safe_open(path, framework="np") as f:
        for name, tensor in state.items():
            if name != "bf16":
                assert np.array_equal(f.get_tensor(name), tensor.numpy()), name
                assert np.array_equal(np.array(loaded_mx[name]), tensor.numpy()), name


def test_writer_output_is_byte_identical_to_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"b": rng.standard_normal((3, 5)).astype(np.float32), "a": rng.integers(0, 9, 7).astype(np.uint8),
              "c": rng.standard_normal(3).astype(np.float16), "d": np.arange(3, dtype=np.int64),
              "flag": np.array([True, False, True])}
    save_file(arrays, str(tmp_path / "lib.safetensors"), metadata={"format": "mlx"})
    entries = [(k, v.dtype.name, v.shape, lambda v=v: v) for k, v in arrays.items()]
    write_safetensors(tmp_path / "ours.safetensors", entries, metadata={"format": "mlx"})
    ours, lib = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "lib.safetensors").read_bytes()
    assert ours == lib
    size = int.from_bytes(ours[:8], "little")
    assert size % 8 == 0 and json.loads(ours[8:8 + size])["__metadata__"] == {"format": "mlx"}


def test_writer_calls_producers_one_at_a_time_and_checks_them(tmp_path):
    calls = []

    def producer(name, array):
        def produce():
            calls.append(name)
            return array
        return produce

    entries = [(n, "float32", (2,), producer(n, np.full(2, i, np.float32))) for i, n in enumerate("xyz")]
    write_safetensors(tmp_path / "m.safetensors", iter(entries))
    assert calls == ["x", "y", "z"] and load_file(str(tmp_path / "m.safetensors"))["z"].tolist() == [2, 2]

    (tmp_path / "keep.safetensors").write_bytes(b"old")
    bad_cases = [
        ([("x", "float32", (2,), lambda: np.zeros(3, np.float32))], "header says"),
        ([("x", "float32", (2,), lambda: np.zeros(2, np.float16))], "header says"),
        ([("x", "float32", (2,), producer("x", np.zeros(2, np.float32))), ("x", "float32", (2,), None)],
         "used twice"),
        ([("x", "complex64", (2,), None)], "cannot store"),
    ]
    for entries, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            write_safetensors(tmp_path / "keep.safetensors", entries)
    assert (tmp_path / "keep.safetensors").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors", "m.safetensors"]  # no temp files left


def test_to_dtype_matches_torch_rounding():
    special = np.array([0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, -np.nan, 3.4e38, -3.4e38, 1e-40, -1e-45,
                        1.00390625, 1.01171875, 1.0 + 2 ** -8 + 2 ** -20], np.float32)
    values = np.concatenate([special, np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 1e3])
    bits = to_dtype(values, "bfloat16")
    expected = torch.from_numpy(values).bfloat16().view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(values)
    assert bits.dtype == np.uint16 and np.array_equal(bits[finite], expected[finite])
    assert np.isnan(bf16_to_f32(bits[~finite])).all()
    assert np.signbit(bf16_to_f32(bits[~finite])).tolist() == np.signbit(values[~finite]).tolist()
    assert np.array_equal(to_dtype(bits, "float32", "bfloat16"), torch.from_numpy(expected.view(np.int16))
                          .view(torch.bfloat16).float().numpy(), equal_nan=True)
    assert np.array_equal(to_dtype(bits, "float16", "bfloat16"), bf16_to_f32(bits).astype(np.float16),
                          equal_nan=True)
    half = np.clip(values, -6e4, 6e4).astype(np.float16)
    assert np.array_equal(to_dtype(half, "bfloat16"), to_dtype(half.astype(np.float32), "bfloat16"))
    assert to_dtype(values, "float32") is values
    with pytest.raises(ValueError, match="float8"):
        to_dtype(np.zeros(2, np.uint8), "float32", "float8_e4m3fn")


# ---------------------------------------------------------------- bounded by the file's real size

CAP_MB = 200  # far below what the unbounded reader took (GBs); enough for Python and numpy


def open_capped(path, timeout=30):
    """Open ``path`` in a child capped at CAP_MB of address space: (exit code, last line of output)."""
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({CAP_MB} << 20, {CAP_MB} << 20))\n"
            "import sys; from starflow_mlx.convert.torch_pickle import CheckpointError, open_checkpoint\n"
            "try:\n    ck = open_checkpoint(sys.argv[1]); [t.read() for t in ck.tensors.values()]; print('opened')\n"
            "except CheckpointError as exc:\n    print('refused:', exc)\n")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout,
                         env=env)
    return res.returncode, (res.stdout.strip().splitlines() or [res.stderr.strip()])[-1]


def test_shared_sub_dicts_cannot_multiply_names(tmp_path):
    level = {"w": FakeTensor(StorageRef("0", 4), 0, (4,), (1,))}
    for _ in range(40):  # pickled once each (memo), but 2**40 paths when flattened
        level = {"a": level, "b": level}
    fake_checkpoint(tmp_path / "shared.pth", level, {"0": np.zeros(4, np.float32).tobytes()})
    assert (tmp_path / "shared.pth").stat().st_size < 4096
    rc, line = open_capped(tmp_path / "shared.pth")
    assert rc == 0 and line.startswith("refused:") and "more names than" in line


def test_refusal_messages_never_format_huge_values(tmp_path):
    huge = -(10 ** 4000)  # its repr alone is refused by Python; nested, it was gigabytes
    fake_checkpoint(tmp_path / "repr.pth", {"w": FakeTensor(StorageRef("0", 4), 0, ((huge,) * 2000,), (1,))},
                    {"0": np.zeros(4, np.float32).tobytes()})
    rc, line = open_capped(tmp_path / "repr.pth")
    assert rc == 0 and "bad shape" in line and len(line) < 400


def test_compressed_index_entries_are_refused_unread(tmp_path):
    with zipfile.ZipFile(tmp_path / "deflate.pth", "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("archive/data.pkl", "w") as f:  # 256 MB of zeros deflate to 250 KB
            for _ in range(256):
                f.write(bytes(1 << 20))
        zf.writestr("archive/byteorder", "little")
    assert (tmp_path / "deflate.pth").stat().st_size < 1 << 20
    rc, line = open_capped(tmp_path / "deflate.pth")
    assert rc == 0 and "compressed" in line


def test_stride_zero_view_cannot_ask_for_gigabytes(tmp_path):
    fake_checkpoint(tmp_path / "stride0.pth", {"w": FakeTensor(StorageRef("0", 4), 0, (50000, 50000), (0, 0))},
                    {"0": np.zeros(4, np.float32).tobytes()})
    rc, line = open_capped(tmp_path / "stride0.pth")
    assert rc == 0 and "view far larger than its storage" in line


# ---------------------------------------------------------------- refused where torch refuses


def test_duplicated_entries_and_unknown_byte_orders_are_refused(tmp_path):
    torch.save({"w": torch.ones(4)}, tmp_path / "ok.pth")
    with zipfile.ZipFile(tmp_path / "ok.pth") as src:
        entries = [(i.filename, src.read(i)) for i in src.infolist()]
    storage = next(name for name, _ in entries if "/data/" in name)
    with pytest.warns(UserWarning), zipfile.ZipFile(tmp_path / "dup.pth", "w") as dst:
        for name, data in entries + [(storage, np.zeros(4, np.float32).tobytes())]:
            dst.writestr(name, data)
    with pytest.raises(CheckpointError, match="twice"):
        open_checkpoint(tmp_path / "dup.pth")
    for order in (b"BIG", b"middle", b""):
        with zipfile.ZipFile(tmp_path / "order.pth", "w") as dst:
            for name, data in entries:
                dst.writestr(name, order if name.endswith("/byteorder") else data)
        with pytest.raises(CheckpointError, match="unknown byte order"):
            open_checkpoint(tmp_path / "order.pth")


class HalfPickler(TorchPickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef) and obj.numel == 8:
            return "storage", torch.HalfStorage, obj.key, "cpu", obj.numel
        return super().persistent_id(obj)


def test_one_storage_as_two_dtypes_and_colliding_names_are_refused(tmp_path):
    buf = io.BytesIO()
    HalfPickler(buf, protocol=2).dump({"a": FakeTensor(StorageRef("0", 4), 0, (4,), (1,)),
                                       "b": FakeTensor(StorageRef("0", 8), 0, (4,), (1,))})
    torch_zip(tmp_path / "dtypes.pth", buf.getvalue(), {"0": bytes(16)})
    with pytest.raises(CheckpointError, match="uses storage '0' as both"):
        open_checkpoint(tmp_path / "dtypes.pth")
    t = FakeTensor(StorageRef("0", 4), 0, (4,), (1,))
    fake_checkpoint(tmp_path / "names.pth", {"a.b": t, "a": {"b": t}}, {"0": bytes(16)})
    with pytest.raises(CheckpointError, match="two entries named a.b"):
        open_checkpoint(tmp_path / "names.pth")


@pytest.mark.parametrize("view", ["whole", "part"])
def test_bit_flips_fail_the_checksum(tmp_path, view):
    w = torch.arange(64, dtype=torch.float32)
    torch.save({"w": w if view == "whole" else w[8:]}, tmp_path / "ok.pth")
    with open_checkpoint(tmp_path / "ok.pth") as ck:
        ref = ck.tensors["w"]
        start = ck._data_start(ref.storage_key)
    data = bytearray((tmp_path / "ok.pth").read_bytes())
    data[start + 40] ^= 0x40
    (tmp_path / "flip.pth").write_bytes(bytes(data))
    with open_checkpoint(tmp_path / "flip.pth") as ck, pytest.raises(CheckpointError, match="checksum"):
        ck.tensors["w"].read()


def test_build_cannot_rewrite_the_readers_functions(tmp_path):
    from starflow_mlx.convert import torch_pickle

    # GLOBAL torch._utils._rebuild_tensor_v2, BUILD it with slot state {"__defaults__": (1,)}.
    payload = (b"\x80\x02}X\x01\x00\x00\x00kctorch._utils\n_rebuild_tensor_v2\n"
               b"N}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86bs.")
    torch_zip(tmp_path / "tamper.pth", payload)
    with pytest.raises(CheckpointError, match="modify the reader"):
        open_checkpoint(tmp_path / "tamper.pth")
    assert torch_pickle._rebuild_tensor.__defaults__ is None
