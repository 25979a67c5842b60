"""The ``.pth`` reader's bounds at their edges and its refusals word for word (gaps found by mutation testing).

A checkpoint's names and view sizes are bounded by its file size (shared sub-dictionaries and stride-0 views
could otherwise make a few bytes ask for gigabytes), and its tuples by a nesting depth (hashing a deeper one
crashes the process); the tests elsewhere check far past the bounds, so a bound off by a little, or twice as
loose, passed them. Each refusal is pinned whole, so a message that loses its subject or its advice fails here.
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


def test_the_name_budget_of_a_larger_file_is_a_quarter_of_its_size(tmp_path):
    import zipfile

    keys, values = 50, 119
    names = keys * (values + 1)  # 6000 one-unit names: a budget of 6000 needs a file of 24000 to 24003 bytes
    src = shared_names(tmp_path, keys, values)

    def padded(size):
        """``src`` with one more stored entry (outside data/, so never read), grown to make the file ``size`` bytes:
        a stored entry's bytes add to the file one for one."""
        def pad(length):
            def change(name, data):
                extra = [(name.replace("/version", "/pad"), bytes(length))] if name.endswith("/version") else []
                return [(n, d, zipfile.ZIP_STORED) for n, d in [(name, data), *extra]]
            return rewritten(src, tmp_path / f"pad{length}.pth", change)
        path = pad(size - pad(0).stat().st_size)
        assert path.stat().st_size == size
        return path

    with open_checkpoint(padded(4 * names)) as ck:  # exactly at the budget (a fifth of the size would be 4800)
        assert len(ck.extras) == keys * values
    with pytest.raises(CheckpointError, match=r"expands to more names than a 23999-byte file can hold"):
        open_checkpoint(padded(4 * names - 1))  # one short (a third of the size would be 7999)


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


def read_refusal(path, name) -> str:
    """The line reading tensor ``name`` of the checkpoint at ``path`` is refused with."""
    with open_checkpoint(path) as ck, pytest.raises(CheckpointError) as caught:
        ck.tensors[name].read()
    return str(caught.value)


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


def index_file(path, payload: bytes):
    """``payload`` as the data.pkl of an archive laid out as torch.save lays it out."""
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/data.pkl", payload)
        zf.writestr("m/byteorder", "little")
    return path


def refusal(path) -> str:
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)
    return str(caught.value)


# Tuples nested ``levels`` deep (the innermost empty), each written with one kind of tuple operation, around memo
# and stack operations the scan must follow as the unpickler does: each kind must count its level.
LEVELS = {
    "TUPLE1": lambda n: b"K\x00" + b"\x85" * n,  # around an int, which counts 0
    "TUPLE2": lambda n: b")" + b"N\x86" * (n - 1),
    "TUPLE3": lambda n: b")" + b"NN\x87" * (n - 1),
    "TUPLE": lambda n: b"(" * (n - 1) + b")" + b"t" * (n - 1),
    "PUT, GET": lambda n: b")" + b"".join(b"p%d\n0g%d\n\x85" % (i, i) for i in range(n - 1)),
    "BINPUT, BINGET": lambda n: b")" + b"q\x000h\x00\x85" * (n - 1),
    "LONG_BINPUT, LONG_BINGET": lambda n: b")" + b"r\x00\x01\x00\x000j\x00\x01\x00\x00\x85" * (n - 1),
    "MEMOIZE": lambda n: b")" + b"".join(b"\x940h%c\x85" % i for i in range(n - 1)) if n <= 257 else None,
    "DUP": lambda n: b")" + b"2\x85\x86" * ((n - 1) // 2) + b"\x85" * ((n - 1) % 2),  # (x, (x,)): the copy's level
    "POP of a mark": lambda n: b")" + b"(0\x85" * (n - 1),
    "BUILD": lambda n: b")" + b"Nb\x85" * (n - 1),
    # Operations that fill a container below their mark: the container stays, and the tuple below it counts.
    "APPENDS": lambda n: b")" + b"\x85" * (n - 2) + b"](K\x01e\x86",
    "SETITEMS": lambda n: b")" + b"\x85" * (n - 2) + b"}(K\x01K\x02u\x86",
    "ADDITEMS": lambda n: b")" + b"\x85" * (n - 2) + b"\x8f(K\x01\x90\x86",
    # REDUCE's arguments are a tuple around the data _rebuild_parameter returns: the scan counts that level too.
    "REDUCE": lambda n: b"ctorch._utils\n_rebuild_parameter\n)" + b"\x85" * (n // 2 - 1) + b"R"
                        + b"\x85" * (n - n // 2),
    "OBJ": lambda n: b"(ctorch._utils\n_rebuild_parameter\n)" + b"\x85" * (n // 2 - 1) + b"o"
                     + b"\x85" * (n - n // 2),
    "INST": lambda n: b"()" + b"\x85" * (n // 2 - 1) + b"itorch._utils\n_rebuild_parameter\n"
                      + b"\x85" * (n - n // 2),
    "INST of nothing": lambda n: b"(icollections\nOrderedDict\n" + b"\x85" * n,  # a dict, which counts 0
}


def nested(levels: int, kind: str) -> bytes:
    # MEMOIZE numbers its entries itself: past 256 levels its BINGET runs out of indexes, so it nests 200 levels
    # below the first 801 others (its own count is still checked: a MEMOIZE the scan skips loses the memo).
    if kind == "MEMOIZE":
        return b"\x80\x04}X\x01\x00\x00\x00k" + LEVELS[kind](200) + b"\x85" * (levels - 200) + b"s."
    return b"\x80\x02}X\x01\x00\x00\x00k" + LEVELS[kind](levels) + b"s."


def tuple_levels(value) -> int:
    """How deep tuples nest in ``value`` (walked level by level: a recursive walk would hit Python's limit)."""
    levels, current = 0, [value]
    while any(isinstance(v, tuple) for v in current):
        levels += 1
        current = list({id(item): item for v in current if isinstance(v, tuple) for item in v}.values())
    return levels


@pytest.mark.parametrize("kind", sorted(LEVELS))
def test_tuples_nest_up_to_1000_levels_and_no_further(tmp_path, kind):
    from starflow_mlx.convert.torch_pickle import MAX_NESTING

    assert MAX_NESTING == 1000
    with open_checkpoint(index_file(tmp_path / "ok.pth", nested(1000, kind))) as ck:
        assert tuple_levels(ck.extras["k"]) == 1000 - (kind == "REDUCE")
    path = index_file(tmp_path / "deep.pth", nested(1001, kind))
    assert refusal(path) == f"{path}: the checkpoint index is nested too deeply"


def test_a_key_of_a_million_nested_tuples_is_refused_not_a_crash(tmp_path):
    # Hashing it as a dict key recursed in C until the process died (SIGSEGV): run where a crash shows as one.
    import subprocess
    import sys

    path = index_file(tmp_path / "deep.pth", b"\x80\x02}X\x01\x00\x00\x00k" + b"\x85" * 1_000_000 + b"K\x01s.")
    code = ("import sys\nfrom starflow_mlx.convert.torch_pickle import CheckpointError, open_checkpoint\n"
            "try:\n    open_checkpoint(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout) == (0, f"{path}: the checkpoint index is nested too deeply\n"), run.stderr


def test_the_unpickler_recursing_is_refused_in_one_line(tmp_path):
    # A state dict's BUILD names what it sets: naming a frozenset nested 5000 deep recurses past Python's limit.
    path = index_file(tmp_path / "deep.pth", b"\x80\x04}X\x01\x00\x00\x00wccollections\nOrderedDict\n)R}"
                      + b"(" * 5000 + b"\x91" * 5000 + b"K\x01sbs.")
    assert refusal(path) == f"{path}: the checkpoint index is nested too deeply"


def test_torch_size_holds_only_ints(tmp_path):
    # With ``tuple`` as torch.Size, a list of tuples 1000 deep became a tuple 1001 deep, past the scan.
    path = index_file(tmp_path / "s.pth", b"\x80\x02}X\x01\x00\x00\x00kctorch\nSize\n](K\x01\x85e\x85Rs.")
    assert refusal(path) == "checkpoint makes a torch.Size of [(1,)], which is not a tuple of integers"
    path = index_file(tmp_path / "t.pth", b"\x80\x02}X\x01\x00\x00\x00kctorch\nSize\nK\x01K\x01\x85\x86\x85Rs.")
    assert refusal(path) == "checkpoint makes a torch.Size of (1, (1,)), which is not a tuple of integers"
    with open_checkpoint(index_file(tmp_path / "ok.pth", b"\x80\x02}X\x01\x00\x00\x00kctorch\nSize\n"
                                                         b"K\x02K\x03\x86\x85Rs.")) as ck:
        assert ck.extras == {"k": (2, 3)}


def test_a_pickle_the_scan_cannot_follow_gets_the_unpicklers_own_refusal(tmp_path):
    missing = index_file(tmp_path / "memo.pth", b"\x80\x02}X\x01\x00\x00\x00kh\x07s.")
    unmarked = index_file(tmp_path / "mark.pth", b"\x80\x02}X\x01\x00\x00\x00kts.")
    assert refusal(missing) == (f"{missing}: cannot read the checkpoint index "
                                "(UnpicklingError: 'Memo value not found at index 7')")
    assert refusal(unmarked) == f"{unmarked}: cannot read the checkpoint index (UnpicklingError: 'could not find MARK')"


def test_past_what_the_scan_can_parse_the_unpickler_reads_nothing(tmp_path):
    # pickle reads INT's text in any base, the scan (pickletools) only in base 10: had the unpickler read on, the
    # tuples after it would nest unchecked (a dict key 1001 deep here; a million crashes the process).
    path = index_file(tmp_path / "hex.pth", b"\x80\x02}X\x01\x00\x00\x00kI0x10\n0" + b"\x85" * 1001 + b"K\x01s.")
    assert refusal(path) == f"{path}: cannot read the checkpoint index (EOFError: 'Ran out of input')"


def text(s: str) -> bytes:
    return b"X" + len(s).to_bytes(4, "little") + s.encode()


def with_state(state: bytes) -> bytes:
    """A state dict ``{"w": OrderedDict()}`` whose OrderedDict gets ``state`` by BUILD, as torch gives _metadata."""
    return b"\x80\x02}" + text("w") + b"ccollections\nOrderedDict\n)R" + state + b"bs."


def test_a_state_dict_keeps_only_its_metadata_out_of_the_way(tmp_path):
    torch.save(torch.nn.Linear(2, 3).state_dict(), tmp_path / "linear.pth")  # torch's own _metadata BUILD
    with open_checkpoint(tmp_path / "linear.pth") as ck:
        assert sorted(ck.tensors) == ["bias", "weight"] and ck.extras == {}
    metadata = b"}" + text("_metadata") + b"}s"
    for state in (metadata, b"(" + metadata + b"Nt", b"(N" + metadata + b"t"):  # dict, (dict, slots), (None, slots)
        with open_checkpoint(index_file(tmp_path / "ok.pth", with_state(state))) as ck:
            assert ck.tensors == {} and ck.extras == {}


def test_any_other_state_on_a_state_dict_is_named(tmp_path):
    refusals = {
        b"}(" + text("b") + b"K\x01" + text("a") + b"K\x02u": "'a'",  # the first in order of two
        b"(N}" + text("items") + b"K\x01st": "'items'",
        b"K\x05": "'int'",
    }
    for state, named in refusals.items():
        path = index_file(tmp_path / "bad.pth", with_state(state))
        assert refusal(path) == (f"refusing to load checkpoint: it sets {named} on a dictionary, "
                                 "which a state dict never holds")


def test_bytes_in_another_codec_name_it(tmp_path):
    one_argument = index_file(tmp_path / "one.pth", b"\x80\x02}" + text("k") + b"c_codecs\nencode\n" + text("x")
                              + b"\x85Rs.")
    assert refusal(one_argument) == "refusing to load checkpoint: it encodes data with the 'utf-8' codec"


def central_entry(data: bytes, name: bytes) -> int:
    """Where the zip's central directory describes the entry ``name``."""
    entry = data.index(b"PK\x01\x02")
    while data[entry + 46:entry + 46 + len(name)] != name:
        entry = data.index(b"PK\x01\x02", entry + 4)
    return entry


def test_a_compressed_or_encrypted_storage_is_refused_when_read(tmp_path):
    import zipfile

    deflated = rewritten(saved(tmp_path), tmp_path / "z.pth", lambda name, data: [
        (name, data, zipfile.ZIP_DEFLATED if "/data/" in name else zipfile.ZIP_STORED)])
    flagged = tmp_path / "e.pth"  # stored, but flagged encrypted (zipfile writes no flag: set it by hand)
    data = bytearray(saved(tmp_path).read_bytes())
    data[central_entry(data, b"m/data/0") + 8] |= 1
    flagged.write_bytes(bytes(data))
    for path in (deflated, flagged):
        assert read_refusal(path, "w") == f"{path}: storage 0 is compressed or encrypted, which torch.save never does"


def test_a_storage_entry_is_found_past_its_local_header(tmp_path):
    import zipfile

    wide = tmp_path / "wide.pth"  # a local extra field of 40000 bytes: past 32767, read as unsigned
    with zipfile.ZipFile(saved(tmp_path)) as zin, zipfile.ZipFile(wide, "w") as zout:
        for info in zin.infolist():
            out = zipfile.ZipInfo(info.filename)
            if "/data/" in info.filename:
                out.extra = b"\xfe\xca" + (40000 - 4).to_bytes(2, "little") + bytes(40000 - 4)
            zout.writestr(out, zin.read(info))
    with open_checkpoint(wide) as ck:
        assert ck.tensors["w"].read().tolist() == [[0, 1, 2], [3, 4, 5]]

    with open_checkpoint(saved(tmp_path)) as ck:
        offset = ck._members["0"].header_offset
    data = bytearray(saved(tmp_path).read_bytes())
    data[offset:offset + 4] = b"PK\x05\x06"  # the local header's signature damaged, its length whole
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    assert read_refusal(damaged, "w") == f"{damaged}: damaged zip entry for storage 0"


def test_a_storage_running_past_the_end_of_the_file_names_itself(tmp_path):
    import struct

    path = tmp_path / "v.pth"
    torch.save({"row": torch.arange(6, dtype=torch.float32).reshape(2, 3)[1]}, path)  # a view: checked in chunks
    data = bytearray(path.read_bytes())
    entry = central_entry(data, b"v/data/0")
    data[entry + 20:entry + 28] = struct.pack("<II", 10_000_000, 10_000_000)  # it claims 10 MB
    path.write_bytes(bytes(data))
    assert read_refusal(path, "row") == f"{path}: tensor storage 0 is truncated (file ends early)"


def test_tied_weights_are_not_views_larger_than_their_storage(tmp_path):
    tied = torch.zeros(150_000)  # 600 kB under three names: 1.8 MB read, more than the file plus 1 MiB
    torch.save({"a": tied, "b": tied, "c": tied}, tmp_path / "tied.pth")
    with open_checkpoint(tmp_path / "tied.pth") as ck:
        assert sorted(ck.tensors) == ["a", "b", "c"] and ck.tensors["c"].read().shape == (150_000,)


def test_byte_views_may_expand_to_exactly_the_file_size_plus_one_mib(tmp_path):
    def expanded_bytes(elements):  # one stored byte, a view of ``elements`` bytes: the budget is met exactly
        path = tmp_path / str(elements) / "m.pth"
        path.parent.mkdir()
        torch.save({"w": torch.zeros(1, dtype=torch.uint8).expand(elements)}, path)
        return path

    size = expanded_bytes(200_000).stat().st_size
    with open_checkpoint(expanded_bytes(size + (1 << 20))) as ck:
        assert ck.tensors["w"].shape == (size + (1 << 20),)
    with pytest.raises(CheckpointError, match="is a view far larger than its storage"):
        open_checkpoint(expanded_bytes(size + (1 << 20) + 1))


def test_a_dimension_of_one_or_a_view_from_a_storages_start_is_read(tmp_path):
    whole = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    torch.save({"row": whole[:1], "first": whole[0]}, tmp_path / "v.pth")  # both read 12 of the 24 stored bytes
    with open_checkpoint(tmp_path / "v.pth") as ck:
        assert ck.tensors["row"].read().tolist() == [[0, 1, 2]] and ck.tensors["first"].read().tolist() == [0, 1, 2]


LONG = "n" * 200  # a tensor name longer than any message shows: cut to 120 characters
CUT = "n" * 117 + "..."


def tensor_index(name: str, numel: int, shape: int) -> bytes:
    """The index of ``{name: float32 tensor of ``shape`` elements}`` on storage "0" of ``numel`` elements."""
    return (b"\x80\x02}" + text(name) + b"ctorch._utils\n_rebuild_tensor_v2\n((" + text("storage")
            + b"ctorch\nFloatStorage\n" + text("0") + text("cpu") + b"J" + numel.to_bytes(4, "little") + b"tQK\x00J"
            + shape.to_bytes(4, "little") + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs.")


def test_messages_about_a_tensor_cut_its_name(tmp_path):
    import struct
    import zipfile

    view = tmp_path / "view.pth"
    torch.save({LONG: torch.zeros(1).expand(2_000_000)}, view)
    assert refusal(view) == (f"{view}: tensor {CUT} (2000000,) is a view far larger than its storage (stride 0 or "
                             "overlapping): save it with .contiguous()")

    def checkpoint(path, numel, shape, stored):
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("m/data.pkl", tensor_index(LONG, numel, shape))
            zf.writestr("m/data/0", bytes(stored))
        return path

    short = checkpoint(tmp_path / "short.pth", 1000, 1000, 100)  # the entry holds 100 of the 4000 bytes
    assert read_refusal(short, LONG) == (f"{short}: tensor {CUT} needs bytes 0..4000 of storage '0', which holds 100 "
                                 "(truncated checkpoint?)")

    cut = checkpoint(tmp_path / "cut.pth", 2_500_000, 2_500_000, 24)
    data = bytearray(cut.read_bytes())
    entry = central_entry(data, b"m/data/0")
    data[entry + 20:entry + 28] = struct.pack("<II", 10_000_000, 10_000_000)  # 10 MB claimed, the file far shorter
    cut.write_bytes(bytes(data))
    assert read_refusal(cut, LONG) == f"{cut}: tensor {CUT} is truncated (file ends early)"


def test_a_damaged_storage_names_itself(tmp_path):
    data = bytearray(saved(tmp_path).read_bytes())
    at = data.index(np.arange(6, dtype=np.float32).tobytes())
    data[at + 5] ^= 1  # one bit of the stored values: the entry's CRC no longer matches
    path = tmp_path / "flip.pth"
    path.write_bytes(bytes(data))
    assert read_refusal(path, "w") == (f"{path}: storage '0' fails its checksum: the file is damaged "
                                 "(download or copy it again)")


def signed(value: int) -> bytes:
    return b"J" + value.to_bytes(4, "little", signed=True)


def storage_ref(kind: bytes = b"ctorch\nFloatStorage\n", key: str = "0", numel: bytes = b"K\x06") -> bytes:
    return b"(" + text("storage") + kind + text(key) + text("cpu") + numel + b"tQ"


def rebuilt(storage: bytes = storage_ref(), offset: bytes = b"K\x00", size: bytes = b"K\x06\x85",
            stride: bytes = b"K\x01\x85", dtype: bytes | None = None) -> bytes:
    """An index of one tensor ``w`` rebuilt as torch does: by _rebuild_tensor_v2, or by v3 with ``dtype``."""
    version, tail = (b"v2", b"") if dtype is None else (b"v3", b"ccollections\nOrderedDict\n)R" + dtype)
    return (b"\x80\x02}" + text("w") + b"ctorch._utils\n_rebuild_tensor_" + version + b"\n(" + storage + offset
            + size + stride + b"\x89" + (tail if dtype else b"ccollections\nOrderedDict\n)R") + b"tRs.")


def test_each_refusal_of_a_tensor_says_exactly_what_is_wrong(tmp_path):
    import zipfile

    untyped = b"ctorch\nUntypedStorage\n"
    cases = {
        "not a storage": (rebuilt(storage=b"K\x05"),
                          "checkpoint rebuilds a tensor from something that is not a storage"),
        "two dtypes": (rebuilt(dtype=b"ctorch\nint32\n"), "checkpoint rebuilds a int32 tensor from a float32 storage"),
        "no dtype": (rebuilt(storage=storage_ref(untyped, numel=b"K\x18")),
                     "checkpoint rebuilds a None tensor from a untyped storage"),
        "shape": (rebuilt(size=signed(-1) + b"\x85"), "checkpoint rebuilds a tensor with a bad shape: (-1,)"),
        "offset": (rebuilt(offset=signed(-1)), "checkpoint rebuilds a tensor with a bad storage offset: (-1,)"),
        "missing storage": (rebuilt(storage=storage_ref(key="9")),
                            "checkpoint references storage '9', which the archive does not contain"),
        "storage size": (rebuilt(storage=storage_ref(numel=signed(-1))), "checkpoint gives storage '0' a bad size -1"),
        "reference": (rebuilt(storage=text("os.system") + b"Q"),
                      "refusing to load checkpoint: unexpected persistent reference 'os.system'"),
        "class": (b"\x80\x02}" + text("w") + b"c" + b"m" * 100 + b"\n" + b"n" * 100 + b"\ns.",
                  f"refusing to load checkpoint: it references {'m' * 57}....{'n' * 57}..., which is not a tensor "
                  "or plain container"),
    }
    for name, (index, line) in cases.items():
        path = tmp_path / f"{name}.pth"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("m/data.pkl", index)
            zf.writestr("m/data/0", bytes(24))
        assert refusal(path) == line, name


def test_an_untyped_storage_counts_its_size_in_bytes(tmp_path):
    import zipfile

    # 12 bytes of storage under a float32 tensor of 6 (24 bytes): refused when read, though the entry holds 24.
    path = tmp_path / "u.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/data.pkl", rebuilt(storage=storage_ref(b"ctorch\nUntypedStorage\n", numel=b"K\x0c"),
                                          dtype=b"ctorch\nfloat32\n"))
        zf.writestr("m/data/0", np.arange(6, dtype=np.float32).tobytes())
    assert read_refusal(path, "w") == (f"{path}: tensor w needs bytes 0..24 of storage '0', which holds 12 "
                                 "(truncated checkpoint?)")


def test_names_of_16_characters_count_two_units_of_the_budget(tmp_path):
    # 16 keys "k10".."k25" (1 unit each) sharing 127 names of 12 characters: "k10.v00000000001" is 16 long, 2 units.
    shared = {f"v{j:011d}": j for j in range(127)}

    def names(extra):
        path = tmp_path / f"n{extra}.pth"
        torch.save({**{f"k{i}": shared for i in range(10, 26)}, **{f"e{i}": i for i in range(extra)}}, path)
        assert path.stat().st_size < 4 * 4096  # so the budget is its floor, 4096
        return path

    with open_checkpoint(names(16)) as ck:  # 16 + 16 * 127 * 2 + 16 = 4096 units
        assert len(ck.extras) == 16 * 127 + 16
    path = names(17)
    assert refusal(path) == (f"{path} expands to more names than a {path.stat().st_size}-byte file can hold "
                             "(shared sub-dictionaries?): it is not a real checkpoint")


def test_two_entries_of_one_long_name_are_named_cut(tmp_path):
    torch.save({LONG + ".b": 1, LONG: {"b": 2}}, tmp_path / "two.pth")
    assert refusal(tmp_path / "two.pth") == (f"{tmp_path / 'two.pth'} holds two entries named {CUT} (as 'a.b' and "
                                             "{'a': {'b': ...}}?): refusing to drop one")


def test_an_encrypted_index_or_a_long_entry_name_is_refused_in_one_line(tmp_path):
    import zipfile

    data = bytearray(saved(tmp_path).read_bytes())
    data[central_entry(data, b"m/data.pkl") + 8] |= 1  # flagged encrypted: refused before zipfile asks a password
    flagged = tmp_path / "e.pth"
    flagged.write_bytes(bytes(data))
    assert refusal(flagged) == f"{flagged}: m/data.pkl is compressed or encrypted, which torch.save never does"

    folder = "f" * 150  # the archive's folder names every entry: a compressed one is named cut to 120 characters
    deep = rewritten(saved(tmp_path), tmp_path / "long.pth", lambda name, data: [
        (folder + name[1:], data, zipfile.ZIP_DEFLATED if name.endswith("/byteorder") else zipfile.ZIP_STORED)])
    assert refusal(deep) == f"{deep}: {'f' * 117}... is compressed or encrypted, which torch.save never does"


class Meter:
    """A checkpoint's open file that counts the bytes read, and hands them over at most ``piece`` at a time (as a
    pipe or a network file system may)."""

    def __init__(self, file, piece: int):
        self.file, self.piece, self.count = file, piece, 0

    def seek(self, position):
        return self.file.seek(position)

    def read(self, size=-1):
        data = self.file.read(size)
        self.count += len(data)
        return data

    def readinto(self, view):
        n = self.file.readinto(view[: self.piece])
        self.count += n
        return n

    @property
    def closed(self):
        return self.file.closed

    def close(self):
        self.file.close()


def test_a_tensor_read_reads_its_entry_header_and_its_bytes_once(tmp_path):
    whole = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    torch.save({"big": torch.arange(1000, dtype=torch.float32), "row": whole[1], "first": whole[0]}, tmp_path / "m.pth")
    with open_checkpoint(tmp_path / "m.pth") as ck:
        ck._file = meter = Meter(ck._file, piece=7)
        assert ck.tensors["big"].read().tolist() == list(range(1000))
        assert meter.count == 30 + 4000  # the entry's local header, then the tensor (its CRC checked as it is read)
        assert ck.tensors["row"].read().tolist() == [3, 4, 5]
        assert meter.count == 30 + 4000 + 30 + 24 + 12  # a part of a storage: the whole entry checked once first
        assert ck.tensors["first"].read().tolist() == [0, 1, 2]
        assert meter.count == 30 + 4000 + 30 + 24 + 12 + 12  # the same storage again: its bytes only
