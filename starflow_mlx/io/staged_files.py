"""The one rule for every command that writes files (images, mp4s): staged, published without replacing.

* Each file is written beside its destination under a recognisable temporary name,
  ``.NAME.starflow-tmp-HOST-PID-XXXXXXXX.EXT`` (HOST: 8 hex digits of the host name's sha256), and appears
  under its own name only when it is complete.
* Publishing never replaces a file unless asked (``overwrite``): the temporary file is hard-linked to the
  final name, which fails when that name exists, so of two writers to one name one wins and the other fails
  with one line. Without hard links (some network or FAT file systems) the name is claimed with an exclusive
  create first, then replaced by the finished file.
* Temporary files are removed on any failure; the ``starflow`` command turns SIGTERM and SIGHUP into the
  same interrupt as Ctrl-C (:mod:`starflow_mlx.io.termination`). One left by SIGKILL names its writer's host and
  pid: the next file written to that folder removes it once that process is gone.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import stat
import tempfile
from pathlib import Path

from starflow_mlx.advice import with_cli_message

TEMP_MARK = ".starflow-tmp-"
NAME_CHARS = 100  # of the destination's name kept in the temporary one: the whole must fit 255 bytes
_swept: set[Path] = set()  # folders this process has swept
_TEMP = re.compile(r"^\..*" + re.escape(TEMP_MARK) + r"([0-9a-f]{8})-(\d+)-")


class OutputExistsError(FileExistsError):
    """The output file exists (or appeared while the command ran) and may not be replaced."""


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _file_mode() -> int:
    """Permissions a newly created file gets here (mkstemp's are owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this host (one that belongs to another user still runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but belongs to someone else
        return False
    return False


def sweep(folder: Path) -> None:
    """Remove the temporary files that writers on this host left in ``folder`` when they were killed."""
    try:
        names = [entry.name for entry in os.scandir(folder) if TEMP_MARK in entry.name]
    except OSError:
        return
    host = _host()
    for name in names:
        match = _TEMP.match(name)
        if match is None or match.group(1) != host or not process_gone(int(match.group(2))):
            continue
        path = folder / name
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):  # never a link or a folder that only looks like ours
                path.unlink()
        except OSError:
            pass


def temp_file(path: Path) -> Path:
    """A new empty temporary file beside ``path`` (its folder created), after sweeping stale ones there (once a
    process: a folder job of many files would otherwise list its folder once per file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    if folder not in _swept:
        sweep(folder)
        _swept.add(folder)
    prefix = f".{path.name[:NAME_CHARS]}{TEMP_MARK}{_host()}-{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _exists(path: Path) -> OutputExistsError:
    message = "{} appeared while this command ran (another process wrote it): left it untouched; pass {} to " \
              "replace it, or choose another name"
    return with_cli_message(OutputExistsError(message.format(path, "overwrite=True")),
                            message.format(path, "--overwrite"))


def publish(tmp: Path, path: Path, overwrite: bool = False) -> None:
    """Give the finished ``tmp`` its final name; without ``overwrite`` an existing ``path`` is an error."""
    os.chmod(tmp, _file_mode())
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists(path) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        try:  # no hard links here: claim the name, then put the file on it
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise _exists(path) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


class StagedFiles:
    """``with StagedFiles(overwrite) as staged: write(staged.add(path))``: all files appear at the end, or none.

    On any failure, in the block or while publishing, every temporary file is removed, and the files this
    block had already published are removed again (they are new: nothing is replaced without ``overwrite``).
    """

    def __init__(self, overwrite: bool = False):
        self.overwrite, self.items = overwrite, []

    def add(self, path: str | Path) -> Path:
        tmp = temp_file(Path(path))
        self.items.append((tmp, Path(path)))
        return tmp

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        published = []
        try:
            if kind is None:
                for tmp, path in self.items:
                    publish(tmp, path, self.overwrite)
                    published.append(path)
        except BaseException:
            if not self.overwrite:
                for path in published:
                    path.unlink(missing_ok=True)
            raise
        finally:
            for tmp, _ in self.items:
                tmp.unlink(missing_ok=True)
