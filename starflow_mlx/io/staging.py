"""The one rule for every command that writes a folder (convert, quantize, train, export-coreml).

* The output must be new (or an empty folder), or a folder this project wrote, replaced only with ``force``.
  What the project writes carries a small marker file; nothing without it is ever deleted.
* The folder is built beside its destination under a fixed hidden name, ``.NAME.starflow-tmp``.
  Creating that name is atomic, so it is also the lock: of two writers to one folder one wins and
  the other fails at once. The staging records its writer's pid, so staging left behind by a
  killed writer is provably ours and stale, and the next run in that parent folder sweeps it.
* The finished folder is renamed into place; it never replaces files that appeared meanwhile.
* SIGTERM and SIGHUP (``timeout``, ``kill``, a closed terminal) clean up like Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from starflow_mlx.advice import with_cli_message
from starflow_mlx.io.staged_files import process_gone

MARKER = ".starflow-mlx"  # in every folder this project writes; holds the writer's pid while staging
STAGING_SUFFIX = ".starflow-tmp"
OLD_SUFFIX = ".starflow-old"
MAX_MARKER_BYTES = 4096


class OutputFolderError(FileExistsError):
    """The output folder cannot be written without touching what is not ours."""


def _marker(folder: Path) -> dict | None:
    """The marker's content when ``folder`` is a folder this project wrote (or is writing), else None."""
    path = folder / MARKER
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_MARKER_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "starflow-mlx" else None


def is_ours(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and _marker(folder) is not None


def _write_marker(folder: Path) -> None:
    data = {"written_by": "starflow-mlx", "pid": os.getpid(), "host": socket.gethostname()}
    (folder / MARKER).write_text(json.dumps(data) + "\n", encoding="utf-8")


def _writer_alive(info: dict) -> bool:
    """Whether the process that recorded ``info`` may still run (unknown counts as alive)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("host") != socket.gethostname():
        return True
    return not process_gone(pid)


def _sweep(parent: Path) -> None:
    """Remove staging this project left in ``parent`` when its writer was killed (SIGKILL, power loss)."""
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(".") and STAGING_SUFFIX in p.name]
    except OSError:
        return
    for staging in entries:
        info = _marker(staging) if staging.is_dir() and not staging.is_symlink() else None
        if info is None or "pid" not in info or _writer_alive(info):
            continue
        base = staging.name[: staging.name.index(STAGING_SUFFIX)]
        output, old = parent / base[1:], parent / (base + OLD_SUFFIX)
        # Killed between moving the old folder aside and moving the new one in: put the old one back.
        if is_ours(old) and not output.exists():
            old.rename(output)
        elif is_ours(old):
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def check_output(output: str | Path, force: bool = False, error: type[Exception] = OutputFolderError) -> None:
    """Refuse, before any work, an output that exists and may not be replaced."""
    output = Path(output)
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise error(f"output {output} exists and is not a folder: choose a new folder")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not is_ours(output):
        raise error(f"output {output} already exists and is not empty, and starflow-mlx did not write it: "
                    "choose a new folder (nothing in it was touched)")
    if not force:
        message = "output {} already exists and is not empty: pass {} to replace it (starflow-mlx wrote it), or " \
            "choose a new folder"
        raise with_cli_message(error(message.format(output, "force=True")), message.format(output, "--force"))


def _missing_parents(folder: Path) -> list[Path]:
    """The ancestors of ``folder`` that do not exist yet, outermost first."""
    missing = []
    for parent in folder.absolute().parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing[::-1]


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while a folder was being written."""


def _raise_terminated(signum, _frame):
    raise _Terminated(signum)


@contextmanager
def _cleanup_on_termination() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception inside the block (so the staging is removed), then exit 128+signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, _raise_terminated) for s in signals}
    try:
        yield
    except _Terminated as exc:  # the staging is gone by now; exit with the shell's status for the signal
        raise SystemExit(128 + exc.args[0]) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def staged_folder(output: str | Path, force: bool = False,
                  error: type[Exception] = OutputFolderError) -> Iterator[Path]:
    """Yield an empty staging folder that becomes ``output`` when the block ends without an exception.

    The rule is the module's: a new or empty ``output``, or one this project wrote with ``force``.
    On any failure (or SIGINT/SIGTERM/SIGHUP) the staging and the parent folders created for it
    are removed, and ``output`` is left as it was.
    """
    output = Path(output)
    check_output(output, force, error)
    created = _missing_parents(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _sweep(output.parent)
    staging = output.with_name(f".{output.name}{STAGING_SUFFIX}")
    claim = output.with_name(f".{output.name}{STAGING_SUFFIX}.{os.getpid()}")
    locked = False
    with _cleanup_on_termination():
        try:
            shutil.rmtree(claim, ignore_errors=True)
            claim.mkdir()  # mode from the umask, unlike mkdtemp's 0700
            _write_marker(claim)
            try:
                # Renaming onto an existing (never empty) staging fails: another writer holds this output.
                os.rename(claim, staging)
            except OSError:
                info = _marker(staging) or {}
                who = f" (pid {info['pid']})" if "pid" in info else ""
                raise error(f"another starflow-mlx process{who} is writing {output}: wait for it, "
                            f"or delete {staging} if no such process runs") from None
            locked = True
            yield staging
            _finish(staging, output, force, error)
        except BaseException:
            if locked:
                shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(claim, ignore_errors=True)
            for parent in reversed(created):
                try:
                    parent.rmdir()
                except OSError:
                    break
            raise


def _finish(staging: Path, output: Path, force: bool, error: type[Exception]) -> None:
    try:
        os.rename(staging, output)  # succeeds onto a missing or empty folder only
        return
    except OSError:
        pass
    # The output is not empty now: replace it only if it is ours and the caller may.
    if not (force and is_ours(output)):
        raise error(f"output {output} was filled while this command ran: left it untouched, "
                    "choose a new folder")
    old = output.with_name(f".{output.name}{OLD_SUFFIX}")
    shutil.rmtree(old, ignore_errors=True)
    output.rename(old)
    try:
        staging.rename(output)
    except BaseException:
        old.rename(output)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_file(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``output`` (:mod:`starflow_mlx.io.staged_files`: swept if its writer is killed)
    that becomes ``output`` when the block ends without an exception; on any failure (or SIGINT/SIGTERM/SIGHUP)
    it is removed and ``output`` is left as it was. An existing ``output`` is replaced only with ``overwrite``
    (callers refuse it up front too, so that no work is lost to the refusal)."""
    from starflow_mlx.io.staged_files import StagedFiles

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with _cleanup_on_termination(), StagedFiles(overwrite=overwrite) as staged:
        yield staged.add(output)


def write_file(path: str | Path, data: bytes, overwrite: bool = False) -> None:
    """One file, whole or not at all (:func:`staged_file`). A folder at ``path``, or a missing parent, is refused."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder: give a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    with staged_file(path, overwrite) as staging:
        staging.write_bytes(data)
