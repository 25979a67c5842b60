"""``starflow launch``: start the ranks of a job the way ``mlx.launch`` does (ring backend), and own the outcome.

``mlx.launch`` exits 0 when a rank fails, stops the others before they can say what they left behind,
and waits forever on a rank that was stopped (it only sends SIGTERM, which a stopped process holds).
Here every rank gets ``MLX_RANK`` and a ring hostfile (``MLX_HOSTFILE``) exactly as ``mlx.launch`` gives
them, on this machine or over ssh. When a rank fails, the launcher marks the job failed (a file the ranks
on this machine watch: one waiting on an exchange stops at once and says which files are whole, where
MLX's ring might wait for the dead peer forever). The others get :data:`GRACE` seconds to stop by
themselves, then are killed with SIGKILL, which also ends a stopped one. The ranks' ``error:`` lines are printed once each
(identical ones once) after the job, the failing rank's first, and the exit status is 1.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

FAILED_ENV = "STARFLOW_LAUNCH_FAILED"  # names the file created when a rank has failed (the ranks watch it)
GRACE = 30.0  # seconds the other ranks get to stop by themselves after one failed
ERROR_LINE = re.compile(r"error: rank (\d+): (.*)$")  # anywhere in a line: MLX's threads may have written before it
LOCAL = ("127.0.0.1", "localhost")


class LaunchError(ValueError):
    """A launch that cannot start: bad hostfile, options or ports."""


@dataclass
class Host:
    ssh: str  # where the rank runs ("127.0.0.1": here, without ssh)
    ip: str  # the address the other ranks reach it at


def local_hosts(ranks: int) -> list[Host]:
    if ranks < 1:
        raise LaunchError(f"-n must be at least 1, got {ranks}")
    return [Host("127.0.0.1", "127.0.0.1") for _ in range(ranks)]


def read_hostfile(path: Path) -> list[Host]:
    """The hosts of an ``mlx.launch`` hostfile: a list, or ``{"hosts": [...]}``, of ``{"ssh": ..., "ips": [...]}``."""
    expected = 'expected mlx.launch\'s hostfile: a JSON list of {"ssh": HOST, "ips": [IP, ...]}, one per rank'
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise LaunchError(f"cannot read the hostfile {path} ({exc.strerror or exc})") from None
    except ValueError:
        raise LaunchError(f"the hostfile {path} is not JSON: {expected}") from None
    entries = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise LaunchError(f"the hostfile {path} lists no hosts: {expected}")
    hosts = []
    for rank, entry in enumerate(entries):
        ssh, ips = entry.get("ssh"), entry.get("ips") or []
        if not isinstance(ssh, str) or not ssh or not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
            raise LaunchError(f"the hostfile {path}: host {rank} is not {{\"ssh\": HOST, \"ips\": [IP, ...]}}")
        if not ips and ssh not in LOCAL:
            raise LaunchError(f"the hostfile {path}: host {rank} ({ssh}) has no \"ips\": the ring backend needs the "
                              "address the other ranks reach it at (mlx.distributed_config writes them)")
        hosts.append(Host(ssh, ips[0] if ips else "127.0.0.1"))
    return hosts


def free_port_run(count: int) -> int:
    """A first port such that it and the next ``count - 1`` can be listened on here now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        sockets = []
        try:
            for offset in range(count):
                sockets.append(socket.socket())
                sockets[-1].bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise LaunchError("found no free ports on 127.0.0.1 for the ranks: give --starting-port")


def ring_hostfile(hosts: list[Host], port: int) -> str:
    """The ring backend's hostfile, as mlx.launch writes it: rank r listens at its IP and ``port + r``."""
    return json.dumps([[f"{host.ip}:{port + rank}"] for rank, host in enumerate(hosts)])


def remote_script(rank: int, ring: str, command: list[str]) -> str:
    """What ssh runs on another Mac: the same folder if it exists, the hostfile in a temporary file, the rank."""
    passed = {name: os.environ[name] for name in ("STARFLOW_DISTRIBUTED_TIMEOUT",) if name in os.environ}
    cwd = shlex.quote(os.getcwd())
    return (f"cd {cwd} 2>/dev/null; f=$(mktemp); printf '%s' {shlex.quote(ring)} > \"$f\"; "
            + "".join(f"export {name}={shlex.quote(value)}; " for name, value in passed.items())
            + f"export MLX_HOSTFILE=\"$f\" MLX_RANK={rank}; exec {shlex.join(command)}")


class Rank:
    """One started rank: its process, and the ``error:`` line it printed (held back until the job ends)."""

    def __init__(self, number: int, process: subprocess.Popen):
        self.number, self.process = number, process
        self.error: str | None = None
        self.readers = [threading.Thread(target=self._forward, args=(stream, out), daemon=True)
                        for stream, out in ((process.stdout, sys.stdout), (process.stderr, sys.stderr))]
        for reader in self.readers:
            reader.start()

    def _forward(self, stream, out) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            found = ERROR_LINE.search(line.rstrip("\n"))
            if found and self.error is None:
                self.error = found.group(2)
                continue
            out.buffer.write(raw)
            out.buffer.flush()

    def kill(self) -> None:
        """SIGKILL to the rank and whatever it started (SIGKILL also ends a rank stopped by SIGSTOP)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def ended(self) -> str:
        """How the rank ended, in words, when it printed no error line of its own."""
        code = self.process.returncode
        if code < 0:
            name = signal.Signals(-code).name
            why = " (from outside, or by the system for lack of memory)" if -code == signal.SIGKILL else ""
            return f"was killed by {name}{why}"
        return f"exited with status {code} without an error line"


def start(hosts: list[Host], command: list[str], port: int, path: str) -> list[Rank]:
    """Every rank, started; ``path``: the ring hostfile for the ranks on this machine, and with ``.failed``
    added, the file that marks the job failed (:func:`wait`)."""
    ring = ring_hostfile(hosts, port)
    Path(path).write_text(ring, encoding="utf-8")
    ranks = []
    try:
        for number, host in enumerate(hosts):
            if host.ssh in LOCAL:
                args = command
                env = {**os.environ, "MLX_RANK": str(number), "MLX_HOSTFILE": path, FAILED_ENV: path + ".failed"}
            else:
                args = ["ssh", "-tt", "-o", "LogLevel=QUIET", host.ssh, remote_script(number, ring, command)]
                env = dict(os.environ)
            # A group of its own: killing the rank ends what it started too (nothing keeps its output open).
            process = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, start_new_session=True)
            ranks.append(Rank(number, process))
    except OSError as exc:
        for rank in ranks:
            rank.kill()
        raise LaunchError(f"cannot start {command[0]}: {exc.strerror or exc}") from None
    return ranks


def wait(ranks: list[Rank], grace: float = GRACE, failed_flag: str | None = None) -> tuple[list[str], int]:
    """Wait for every rank; the error lines to print and the exit status (0: every rank succeeded).
    ``failed_flag`` is created when the first rank fails."""
    ended: queue.SimpleQueue = queue.SimpleQueue()
    for rank in ranks:
        threading.Thread(target=lambda r=rank: (r.process.wait(), ended.put(r)), daemon=True).start()
    order, failed, deadline = [], None, None
    while len(order) < len(ranks):
        try:
            rank = ended.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        order.append(rank)
        if rank.process.returncode != 0 and failed is None:
            failed, deadline = rank, time.monotonic() + grace
            if failed_flag is not None:
                Path(failed_flag).touch()
    killed = [rank for rank in ranks if rank not in order]
    for rank in ranks:
        rank.kill()  # the killed ones, and what the others left running
        for reader in rank.readers:
            reader.join()
    if failed is None:
        return [], 0
    # One line per distinct failure, the first rank's first; the same mistake made by every rank (a bad
    # option) is one line, named for the lowest rank that made it.
    said: dict[str, list[int]] = {}
    for rank in [failed, *(r for r in order if r is not failed)]:
        if rank.error is not None:
            said.setdefault(f": {rank.error}", []).append(rank.number)
        elif rank is failed:
            said[f" {rank.ended()}"] = [rank.number]
    lines = [f"error: rank {min(numbers)}{text}" for text, numbers in said.items()]
    if killed:
        lines.append(f"error: rank {', '.join(str(r.number) for r in killed)} still running {grace:.0f} s after "
                     f"rank {failed.number} failed: killed")
    return lines, 1


def launch(command: list[str], hosts: list[Host], port: int | None = None, grace: float = GRACE) -> int:
    """Run ``command`` once per host as the ranks of one job; print the failure, return the exit status."""
    if not command:
        raise LaunchError("give the command to run after --, e.g. starflow launch -n 2 -- starflow generate ...")
    if port is None:
        port = free_port_run(len(hosts)) if all(host.ssh in LOCAL for host in hosts) else 32323
    handle, path = tempfile.mkstemp(prefix="starflow-ring-", suffix=".json")
    os.close(handle)
    ranks = []
    try:
        ranks = start(hosts, command, port, path)
        lines, status = wait(ranks, grace, path + ".failed")
    except KeyboardInterrupt:
        for rank in ranks:
            rank.kill()
        raise
    finally:
        os.unlink(path)
        Path(path + ".failed").unlink(missing_ok=True)
    for line in lines:
        os.write(2, (line + "\n").encode())
    return status
