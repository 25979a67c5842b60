"""The one output-folder rule (starflow_mlx.io.staging): never destroy what the project did not write."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from starflow_mlx.advice import cli_message
from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.io.staging import MARKER, OutputFolderError, staged_folder

register(app)
runner = CliRunner()


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def user_folder(path):
    path.mkdir()
    (path / "thesis.tex").write_text("four years of work")
    (path / "photos").mkdir()
    (path / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    return path


def intact(path):
    return (path / "thesis.tex").read_text() == "four years of work" and (path / "photos" / "a.jpg").is_file()


def test_new_folder_gets_marker_and_normal_permissions(tmp_path):
    with staged_folder(tmp_path / "out") as staging:
        (staging / "config.json").write_text("{}")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out" / MARKER).is_file()
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask
    assert leftovers(tmp_path) == []


def test_unrelated_folder_is_refused_even_with_force(tmp_path):
    out = user_folder(tmp_path / "mine")
    for force in (False, True):
        with pytest.raises(OutputFolderError, match="starflow-mlx did not write it"):
            with staged_folder(out, force=force):
                pytest.fail("must refuse before the block runs")
    assert intact(out) and leftovers(tmp_path) == []


def test_own_folder_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "model"
    with staged_folder(out) as staging:
        (staging / "v").write_text("1")
    with pytest.raises(OutputFolderError, match="pass force=True") as refused:  # Python's words; the CLI's below
        with staged_folder(out):
            pass
    assert "pass --force to replace it" in cli_message(refused.value)
    with staged_folder(out, force=True) as staging:
        (staging / "v").write_text("2")
    assert (out / "v").read_text() == "2" and leftovers(tmp_path) == []


def test_files_appearing_in_the_output_meanwhile_are_kept(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputFolderError, match="filled while"):
        with staged_folder(out) as staging:
            (staging / "model.safetensors").write_bytes(b"x")
            user_folder(out)  # the user (or another program) writes there while we run
    assert intact(out) and not (out / "model.safetensors").exists() and leftovers(tmp_path) == []


def test_second_writer_fails_clearly_and_first_wins(tmp_path):
    out = tmp_path / "out"
    with staged_folder(out) as staging:
        with pytest.raises(OutputFolderError, match="another starflow-mlx process"):
            with staged_folder(out):
                pass
        (staging / "v").write_text("first")
    assert (out / "v").read_text() == "first" and leftovers(tmp_path) == []


def test_failure_removes_staging_and_created_parents(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "a" / "b" / "out") as staging:
            (staging / "part").write_bytes(b"x" * 100)
            raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []


# A shell starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt; the writer
# stands for a command in the foreground, where Ctrl-C arrives, so it restores Python's own SIGINT handler.
WRITER = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from starflow_mlx.io.staging import staged_folder
    with staged_folder(sys.argv[1]) as staging:
        (staging / "model.safetensors").write_bytes(b"x" * 4096)
        print("ready", flush=True)
        time.sleep(60)
""")


def start_writer(out):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_termination_signals_remove_the_staging(tmp_path, signum):
    proc = start_writer(tmp_path / "out")
    proc.send_signal(signum)
    assert proc.wait(timeout=30) != 0
    assert list(tmp_path.iterdir()) == []


def test_a_second_process_writing_the_same_folder_fails_clearly(tmp_path):
    proc = start_writer(tmp_path / "out")
    try:
        with pytest.raises(OutputFolderError, match=f"another starflow-mlx process \\(pid {proc.pid}\\) is writing"):
            with staged_folder(tmp_path / "out"):
                pytest.fail("must refuse before the block runs")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert list(tmp_path.iterdir()) == []


def test_staging_of_a_killed_writer_is_swept_by_the_next_run(tmp_path):
    proc = start_writer(tmp_path / "out")
    proc.kill()
    proc.wait(timeout=30)
    assert leftovers(tmp_path)  # SIGKILL cannot be caught: the staging stays ...
    with staged_folder(tmp_path / "other") as staging:  # ... until the next run in that folder
        (staging / "v").write_text("ok")
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_train_refuses_an_unrelated_folder_before_training(tmp_path):
    out = user_folder(tmp_path / "thesis")
    res = runner.invoke(app, ["train", "-o", str(out), "--steps", "1"])
    assert res.exit_code == 1 and "starflow-mlx did not write it" in res.output
    assert len(res.output.strip().splitlines()) == 1 and intact(out)


def test_failed_convert_leaves_no_folder_it_created(tmp_path):
    (tmp_path / "c.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "c.yaml").write_text("arguments:\n- rope: 1\n")
    res = runner.invoke(app, ["convert", str(tmp_path / "c.pth"), "-c", str(tmp_path / "c.yaml"),
                              "-o", str(tmp_path / "new" / "deeper" / "out")])
    assert res.exit_code == 1 and "not a PyTorch checkpoint" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth", "c.yaml"]
