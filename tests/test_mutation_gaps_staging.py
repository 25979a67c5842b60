"""Folder staging's sweep, marker and replace rules, file by file (gaps found by mutation testing).

A writer killed outright (SIGKILL, power loss) leaves ``.NAME.starflow-tmp`` behind, and one killed between its
two renames leaves ``.NAME.starflow-old`` too; the next writer in that parent folder must remove exactly what a
dead writer of ours left, put a moved-aside folder back, and touch nothing else.
"""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from starflow_mlx.advice import cli_message
from starflow_mlx.io.staging import MARKER, OutputFolderError, check_output, is_ours, staged_folder


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped) on this host."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def ours(folder, pid=None, host=None, **extra):
    """A folder this project wrote; with ``pid``, one a writer on ``host`` (this one by default) is staging."""
    folder.mkdir(parents=True)
    data = {"written_by": "starflow-mlx", **extra}
    if pid is not None:
        data.update(pid=pid, host=host or socket.gethostname())
    (folder / MARKER).write_text(json.dumps(data))
    (folder / "weights.bin").write_bytes(b"w")
    return folder


def write(output, **kwargs):
    with staged_folder(output, **kwargs) as staging:
        (staging / "new.txt").write_text("new")


def test_the_staging_marker_names_its_writer(tmp_path):
    with staged_folder(tmp_path / "out") as staging:
        marker = json.loads((staging / MARKER).read_text(encoding="utf-8"))
    assert marker == {"written_by": "starflow-mlx", "pid": os.getpid(), "host": socket.gethostname()}


def test_a_dead_writers_staging_is_swept_and_nothing_else(tmp_path):
    dead = dead_pid()
    stale = ours(tmp_path / ".a.starflow-tmp", pid=dead)
    live = [ours(tmp_path / f".live{i}.starflow-tmp", pid=os.getpid()) for i in range(5)]  # this process: alive
    elsewhere = ours(tmp_path / ".b.starflow-tmp", pid=dead, host="another-host")  # cannot tell: kept
    odd_pid = ours(tmp_path / ".c.starflow-tmp", pid="123")  # not a pid: kept
    no_pid = ours(tmp_path / ".d.starflow-tmp")  # a finished folder's marker, renamed by hand: kept
    visible = ours(tmp_path / "e.starflow-tmp", pid=dead)  # not hidden: not a staging name of ours
    foreign = tmp_path / ".f.starflow-tmp"
    foreign.mkdir()
    (foreign / "x").write_text("x")  # no marker: never ours
    (tmp_path / ".g.starflow-tmp").symlink_to(ours(tmp_path / "target", pid=dead))  # a link is never followed
    write(tmp_path / "out")
    assert not stale.exists()
    for kept in (*live, elsewhere, odd_pid, no_pid, visible, foreign, tmp_path / "target"):
        assert (kept / "weights.bin").exists() or (kept / "x").exists(), kept
    assert (tmp_path / ".g.starflow-tmp").is_symlink()
    assert (tmp_path / "out" / "new.txt").read_text() == "new"


def test_a_folder_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    """Killed between moving ``out`` aside and moving the new one in: ``out`` is missing, its old copy is back."""
    ours(tmp_path / ".out.starflow-tmp", pid=dead_pid())
    ours(tmp_path / ".out.starflow-old", version="old")
    write(tmp_path / "other")
    assert json.loads((tmp_path / "out" / MARKER).read_text())["version"] == "old"
    assert not (tmp_path / ".out.starflow-old").exists() and not (tmp_path / ".out.starflow-tmp").exists()


def test_a_moved_aside_copy_is_dropped_once_the_new_folder_is_in_place(tmp_path):
    ours(tmp_path / ".out.starflow-tmp", pid=dead_pid())
    ours(tmp_path / ".out.starflow-old", version="old")
    ours(tmp_path / "out", version="new")
    write(tmp_path / "other")
    assert json.loads((tmp_path / "out" / MARKER).read_text())["version"] == "new"
    assert not (tmp_path / ".out.starflow-old").exists() and not (tmp_path / ".out.starflow-tmp").exists()


def test_an_oversized_marker_is_not_ours(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / MARKER).write_text(json.dumps({"written_by": "starflow-mlx"}) + " " * 5000)
    (folder / "data").write_text("x")
    with pytest.raises(OutputFolderError, match="starflow-mlx did not write it"):
        check_output(folder, force=True)


def test_a_folder_filled_by_someone_else_meanwhile_is_never_replaced(tmp_path):
    """Even with force: the output appeared during the run and is not ours."""
    out = tmp_path / "out"
    with pytest.raises(OutputFolderError, match=f"^output {out} was filled while this command ran: left it untouched, "
                                                "choose a new folder$"):
        with staged_folder(out, force=True) as staging:
            (staging / "new.txt").write_text("new")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the staging is gone


def test_force_replaces_our_folder_over_a_leftover_moved_aside_copy(tmp_path):
    ours(tmp_path / ".out.starflow-old", version="older")  # left by a writer that stopped after its first rename
    ours(tmp_path / "out", version="old")
    write(tmp_path / "out", force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_file_writes_whole_files_and_names_a_bad_path(tmp_path):
    from starflow_mlx.io.staging import write_file

    write_file(str(tmp_path / "a.bin"), b"abc")
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    write_file(tmp_path / "a.bin", b"de", overwrite=True)  # replaces only when told to
    assert (tmp_path / "a.bin").read_bytes() == b"de"
    with pytest.raises(IsADirectoryError, match=f"^output {tmp_path} is a folder: give a file name$"):
        write_file(tmp_path, b"x")
    with pytest.raises(FileNotFoundError, match=f"^cannot write {tmp_path / 'no' / 'b.bin'}: folder "
                                                f"{tmp_path / 'no'} does not exist$"):
        write_file(tmp_path / "no" / "b.bin", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # no temporary left beside it


def test_check_output_messages(tmp_path):
    afile, link = tmp_path / "file", tmp_path / "link"
    afile.write_text("x")
    link.symlink_to(tmp_path / "missing")
    for path in (afile, link):
        with pytest.raises(OutputFolderError, match=f"^output {path} exists and is not a folder: choose a new folder$"):
            check_output(path, force=True)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "x").write_text("x")
    with pytest.raises(OutputFolderError, match=f"^output {theirs} already exists and is not empty, and starflow-mlx did "
                                                r"not write it: choose a new folder \(nothing in it was touched\)$"):
        check_output(theirs, force=True)
    mine = ours(tmp_path / "mine")
    with pytest.raises(OutputFolderError) as caught:
        check_output(mine)  # force is off by default
    tail = r" to replace it \(starflow-mlx wrote it\), or choose a new folder$"
    assert caught.match(f"^output {mine} already exists and is not empty: pass force=True" + tail)
    assert re.match(f"^output {mine} already exists and is not empty: pass --force" + tail, cli_message(caught.value))
    check_output(mine, force=True)
    check_output(tmp_path / "new")  # missing: fine


@pytest.mark.parametrize("marker,expected", [
    (json.dumps({"written_by": "starflow-mlx"}).ljust(4096), True),  # exactly the limit
    (json.dumps({"written_by": "another-tool"}), False),
    (json.dumps(["written_by", "starflow-mlx"]), False),
    ("{not json", False),
])
def test_which_markers_make_a_folder_ours(tmp_path, marker, expected):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / MARKER).write_text(marker)
    assert is_ours(folder) is expected


def test_a_marker_that_is_a_link_is_not_ours(tmp_path):
    real = ours(tmp_path / "real")
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / MARKER).symlink_to(real / MARKER)
    assert is_ours(real) and not is_ours(folder)


def test_sigterm_inside_the_block_exits_143_without_the_staging(tmp_path):
    """In process (the signal tests in test_output_folder.py run a child, which mutation testing cannot see)."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as caught:
        with staged_folder(tmp_path / "out") as staging:
            (staging / "part").write_text("x")
            os.kill(os.getpid(), signal.SIGTERM)
    assert caught.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) == before


def test_a_failed_move_into_place_puts_the_old_folder_back(tmp_path, monkeypatch):
    """force over our folder: the old one is moved aside, then the new one moved in; if that fails, the old one
    is back in place and the error is raised."""
    from pathlib import Path

    ours(tmp_path / "out", version="old")
    real_rename = Path.rename

    def failing(self, target):
        if self.name.endswith(".starflow-tmp"):
            raise OSError("disk gone")
        return real_rename(self, target)

    with pytest.raises(OSError, match="disk gone"):
        with staged_folder(tmp_path / "out", force=True) as staging:
            (staging / "new.txt").write_text("new")
            monkeypatch.setattr(Path, "rename", failing)
    monkeypatch.undo()
    assert json.loads((tmp_path / "out" / MARKER).read_text())["version"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_cleanup_that_fails_never_fails_the_command(tmp_path, monkeypatch):
    """Removing leftovers (a dead writer's staging, a moved-aside copy) is best effort: a removal that fails
    (root removes anything here, so it is simulated) leaves the leftover and the write goes on."""
    import shutil

    real = shutil.rmtree

    def rmtree(path, ignore_errors=False, **kwargs):
        if not ignore_errors:
            raise OSError(f"cannot remove {path}")
        return real(path, ignore_errors=True, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    ours(tmp_path / ".a.starflow-tmp", pid=dead_pid())
    ours(tmp_path / ".a.starflow-old")
    ours(tmp_path / "a")  # the sweep drops the moved-aside copy and the staging
    ours(tmp_path / ".out.starflow-old", version="older")
    ours(tmp_path / "out", version="old")
    write(tmp_path / "out", force=True)  # the replace drops the leftover copy and its own
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "out"]
    assert (tmp_path / "out" / "new.txt").exists()
