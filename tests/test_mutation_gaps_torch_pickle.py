"""The ``.pth`` reader's size bounds at their edges (gaps found by mutation testing).

A checkpoint's names and view sizes are bounded by its file size (shared sub-dictionaries and stride-0 views
could otherwise make a few bytes ask for gigabytes); the tests elsewhere check far past the bounds, so a bound off
by a little, or twice as loose, passed them.
"""

import numpy as np
import pytest
import torch

from starflow_mlx.convert.torch_pickle import CheckpointError, open_checkpoint


def shared_names(tmp_path, keys, values):
    """``keys`` top-level names each holding one shared dict of ``values`` short names: ``keys * (values + 1)``
    names of under 16 characters, one unit each of the name budget, in a file of a few kB (budget 4096)."""
    shared = {f"v{j}": j for j in range(values)}
    path = tmp_path / f"s{keys}x{values}.pth"
    torch.save({f"k{i}": shared for i in range(keys)}, path)
    assert path.stat().st_size < 4 * 4096  # so the budget is its floor, 4096
    return path


def test_the_name_budget_of_a_small_file_is_4096(tmp_path):
    with open_checkpoint(shared_names(tmp_path, 16, 255)) as ck:  # 4096 names: at the budget
        assert len(ck.extras) == 16 * 255
    with pytest.raises(CheckpointError, match="expands to more names than a .*-byte file can hold"):
        open_checkpoint(shared_names(tmp_path, 17, 240))  # 4097 names


def expanded(tmp_path, elements):
    path = tmp_path / str(elements) / "m.pth"  # one file name: torch.save writes it into the archive
    path.parent.mkdir()
    torch.save({"w": torch.zeros(1).expand(elements)}, path)  # 4 stored bytes, a view of 4 * elements
    return path


def test_views_may_expand_to_the_file_size_plus_one_mib(tmp_path):
    size = expanded(tmp_path, 200_000).stat().st_size  # counts past 65535 take the same 4 pickle bytes
    fits = (size + (1 << 20)) // 4
    path = expanded(tmp_path, fits)
    assert path.stat().st_size == size  # the element count does not change the file's size here
    with open_checkpoint(path) as ck:
        assert ck.tensors["w"].shape == (fits,)
    with pytest.raises(CheckpointError, match=r"tensor w \(.*\) is a view far larger than its storage"):
        open_checkpoint(expanded(tmp_path, fits + 1))


def test_a_root_that_is_not_a_dict_is_named(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match=r"does not hold a state dict \(found list\)$"):
        open_checkpoint(path)



def rewritten(src, dst, change):
    """A copy of the archive ``src`` with each entry passed through ``change(name, data) -> [(name, data, method)]``."""
    import zipfile
    import warnings

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point of one test
        for info in zin.infolist():
            for name, data, method in change(info.filename, zin.read(info)):
                zout.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return dst


def saved(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, path)
    return path


def test_a_big_endian_checkpoint_is_read_byte_swapped(tmp_path):
    import zipfile

    def to_big(name, data):
        if name.endswith("/byteorder"):
            data = b"big"
        elif "/data/" in name:
            data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
        return [(name, data, zipfile.ZIP_STORED)]

    path = rewritten(saved(tmp_path), tmp_path / "big.pth", to_big)
    with open_checkpoint(path) as ck:
        assert ck.tensors["w"].read().tolist() == [[0, 1, 2], [3, 4, 5]]


def test_a_compressed_index_is_refused(tmp_path):
    import zipfile

    def deflate(name, data):
        return [(name, data, zipfile.ZIP_DEFLATED if name.endswith("data.pkl") else zipfile.ZIP_STORED)]

    path = rewritten(saved(tmp_path), tmp_path / "z.pth", deflate)
    with pytest.raises(CheckpointError, match=r"data\.pkl is compressed or encrypted, which torch\.save never does$"):
        open_checkpoint(path)


def test_an_entry_twice_or_two_indexes_are_named(tmp_path):
    import zipfile

    def twice(name, data):
        return [(name, data, zipfile.ZIP_STORED)] * (2 if name.endswith("/version") else 1)

    path = rewritten(saved(tmp_path), tmp_path / "t.pth", twice)
    with pytest.raises(CheckpointError, match=r"holds the entry 'm/version' twice: the archive is damaged$"):
        open_checkpoint(path)

    def two_indexes(name, data):
        extra = [("other/data.pkl", data, zipfile.ZIP_STORED)] if name.endswith("/data.pkl") else []
        return [(name, data, zipfile.ZIP_STORED), *extra]

    path = rewritten(saved(tmp_path), tmp_path / "two.pth", two_indexes)
    with pytest.raises(CheckpointError, match=r"is a zip archive but not a torch\.save checkpoint \(more than one "
                                              r"data\.pkl\)$"):
        open_checkpoint(path)


def test_a_checkpoint_without_a_byteorder_entry_is_little_endian(tmp_path):
    import zipfile

    def drop_byteorder(name, data):  # torch before 1.12 wrote none
        return [] if name.endswith("/byteorder") else [(name, data, zipfile.ZIP_STORED)]

    with open_checkpoint(rewritten(saved(tmp_path), tmp_path / "old.pth", drop_byteorder)) as ck:
        assert ck.tensors["w"].read().tolist() == [[0, 1, 2], [3, 4, 5]]


def test_an_index_at_the_top_of_the_archive_is_read(tmp_path):
    import zipfile

    def top_level(name, data):  # no folder prefix: every entry's name as torch.save writes it, less "m/"
        return [(name.split("/", 1)[1], data, zipfile.ZIP_STORED)]

    with open_checkpoint(rewritten(saved(tmp_path), tmp_path / "top.pth", top_level)) as ck:
        assert ck.tensors["w"].read().tolist() == [[0, 1, 2], [3, 4, 5]]


def test_each_refusal_of_the_archive_says_exactly_what_is_wrong(tmp_path):
    import zipfile

    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)
    odd = rewritten(saved(tmp_path), tmp_path / "odd.pth", lambda name, data: [
        (name, b"middle" if name.endswith("/byteorder") else data, zipfile.ZIP_STORED)])
    garbage = rewritten(saved(tmp_path), tmp_path / "garbage.pth", lambda name, data: [
        (name, b"\x80\x02}q\x00(X" if name.endswith("/data.pkl") else data, zipfile.ZIP_STORED)])
    deflated_order = rewritten(saved(tmp_path), tmp_path / "dz.pth", lambda name, data: [
        (name, data, zipfile.ZIP_DEFLATED if name.endswith("/byteorder") else zipfile.ZIP_STORED)])
    expected = {
        legacy: f"{legacy} uses torch's legacy format: re-save it with "
                "torch.save(state, path, _use_new_zipfile_serialization=True)",
        odd: f"{odd} has an unknown byte order b'middle' (torch reads only 'little' or 'big')",
        garbage: f"{garbage}: cannot read the checkpoint index (UnpicklingError: 'pickle data was truncated')",
        deflated_order: f"{deflated_order}: m/byteorder is compressed or encrypted, which torch.save never does",
    }
    for path, line in expected.items():
        with pytest.raises(CheckpointError) as caught:
            open_checkpoint(path)
        assert str(caught.value) == line


def deep_index(levels: int) -> bytes:
    """A pickle of ``{"k": {"k": ... {}}}`` nested ``levels`` deep, built without recursion (as a crafted file
    would be): every dict and key pushed, then every SETITEM."""
    return b"\x80\x02}" + b"X\x01\x00\x00\x00k}" * levels + b"s" * levels + b"."


def test_a_state_dict_nested_too_deeply_is_one_line(tmp_path):
    import zipfile

    def deep(name, data):  # padded to 2 MB, so that the name budget (a quarter of the size) outlasts the stack
        pad = [("m/pad", bytes(2 << 20), zipfile.ZIP_STORED)] if name.endswith("/version") else []
        return [(name, deep_index(3000) if name.endswith("/data.pkl") else data, zipfile.ZIP_STORED), *pad]

    path = rewritten(saved(tmp_path), tmp_path / "deep.pth", deep)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)
    assert str(caught.value) == f"{path}: the state dict is nested too deeply"
