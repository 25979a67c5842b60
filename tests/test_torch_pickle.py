"""The safe .pth reader: tensors of every layout come back exactly; code in a pickle never runs."""

import pickle
import zipfile

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from starflow_mlx.convert.safetensors_stream import bf16_to_f32, to_dtype, write_safetensors
from starflow_mlx.convert.torch_pickle import CheckpointError, open_checkpoint

torch = pytest.importorskip("torch")


def test_layouts_and_dtypes_round_trip(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(5),
        "transposed": base.t(),
        "view_with_offset": base[1:, 2:4],
        "shared_a": base,
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "scalar": torch.tensor(3.5),
        "nested": {"inner": torch.ones(2)},
    }
    torch.save({"model": state}, tmp_path / "c.pth")
    with open_checkpoint(tmp_path / "c.pth") as ck:
        got = {k: r.read() for k, r in ck.tensors.items()}
        assert ck.tensors["bf16"].dtype == "bfloat16"
    for name in ("f32", "f16", "i64", "transposed", "view_with_offset", "shared_a", "scalar"):
        assert np.array_equal(got[name], state[name].detach().numpy()), name
    assert np.array_equal(got["param"], state["param"].detach().numpy())
    assert np.array_equal(got["nested.inner"], np.ones(2, np.float32))
    assert np.array_equal(bf16_to_f32(got["bf16"]), state["bf16"].float().numpy())


def test_streaming_writer_loads_in_safetensors_and_mlx(tmp_path):
    values = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    entries = [(f"w.{dt}", dt, (3, 4), lambda dt=dt: to_dtype(values, dt, "float32"))
               for dt in ("float32", "float16", "bfloat16")]
    write_safetensors(tmp_path / "m.safetensors", entries, metadata={"format": "mlx"})
    st = safe_open(str(tmp_path / "m.safetensors"), framework="np")
    assert np.array_equal(st.get_tensor("w.float32"), values)
    assert st.metadata() == {"format": "mlx"}
    loaded = mx.load(str(tmp_path / "m.safetensors"))
    assert loaded["w.bfloat16"].dtype == mx.bfloat16
    assert np.allclose(np.array(loaded["w.bfloat16"].astype(mx.float32)), values, rtol=1e-2)
    assert np.array_equal(np.array(loaded["w.float16"]), values.astype(np.float16))
    bad = [("x", "float32", (2,), lambda: np.zeros(3, np.float32))]
    with pytest.raises(ValueError, match="header says"):
        write_safetensors(tmp_path / "bad.safetensors", bad)
    assert not list(tmp_path.glob(".bad.safetensors*")) and not (tmp_path / "bad.safetensors").exists()


def evil_checkpoint(path, func, args):
    class Exploit:
        def __reduce__(self):
            return func, args

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": Exploit()}, protocol=2))


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_hostile_pickles_are_refused_by_name(tmp_path, target):
    import builtins
    import os
    import subprocess

    sentinel = tmp_path / "pwned"
    func = {"os.system": os.system, "builtins.eval": builtins.eval, "subprocess.Popen": subprocess.Popen}[target]
    arg = f"touch {sentinel}" if target != "builtins.eval" else f"open({str(sentinel)!r}, 'w')"
    evil_checkpoint(tmp_path / "evil.pth", func, (arg,))
    with pytest.raises(CheckpointError, match=target.split(".")[1]):
        open_checkpoint(tmp_path / "evil.pth")
    assert not sentinel.exists()


def test_broken_files(tmp_path):
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    cases = {"empty.pth": b"", "junk.pth": b"hello world", "trunc.pth": data[: len(data) - 200]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError):
            with open_checkpoint(tmp_path / name) as ck:
                for ref in ck.tensors.values():
                    ref.read()
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint(tmp_path / "missing.pth")
    torch.save({"w": torch.randn(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy format"):
        open_checkpoint(tmp_path / "legacy.pth")
