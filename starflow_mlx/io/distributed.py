"""Generation over several processes or Macs with MLX's own distributed engine (``mlx.launch``, ``mx.distributed``).

``mlx.launch -n N -- starflow generate ...`` starts N ranks of the same command. Two ways to share a job:

- **data parallel**: the images (or videos) of one job are cut into batches, each rank samples
  its own batches exactly as a single process with that batch size would (image i still uses
  seed + i), and rank 0 gathers every rank's pixels and writes the files once;
- **pipeline parallel**: the deep block's transformer layers are split into contiguous runs,
  one per rank, each rank holding only its layers' weights and their KV cache. Every step
  passes the hidden state from rank to rank and the last rank's output is gathered back to
  all of them (:class:`PipelineStage`), so every rank computes the same ``(a, b)`` and the
  samplers stay in lockstep without any other message.

A rank that dies makes the ring backend fail the next collective on the others, which is
turned into one line. A rank that hangs or never connects is caught by :class:`Watchdog`:
no answer within the timeout (``STARFLOW_DISTRIBUTED_TIMEOUT`` seconds, plus, for the
final gather, the time the waiting rank itself worked) prints one line and kills the rank.
The same watchdog kills its own rank when that rank has been stopped (SIGSTOP) for longer
than the timeout, so a frozen rank never holds the job forever. Data parallel writes no file
before the last gather; pipeline parallel writes each finished batch, and the line then says
how many files are whole and that ``--resume`` finishes the job.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from starflow_mlx.io.launcher import FAILED_ENV

TIMEOUT_ENV = "STARFLOW_DISTRIBUTED_TIMEOUT"
SIGN = 0x5F10  # ends each rank's row of a checked gather (World.verify)
DEFAULT_TIMEOUT = 120.0
# Set by mlx.launch (ring, JACCL) or by MPI: without them the process is alone and never touches the engine.
LAUNCH_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class DistributedError(OSError):
    """Another rank died, hung, or could not be reached."""


# The watchdog runs as a small separate process: a rank blocked inside MLX (connecting, or a
# collective) may hold the GIL, so no thread or signal handler of its own would ever run. It also
# looks at its rank's state once a second: a rank stopped by SIGSTOP answers nobody, and neither
# mlx.launch (which only sends SIGTERM, held while a process is stopped) nor the other ranks end it.
# Under ``starflow launch`` it also ends a wait at once when the launcher marks the job failed (a file
# named by FAILED_ENV): MLX's ring may block forever on a peer that died mid-exchange.
WATCHER = r"""
import json, os, select, signal, subprocess, sys, time
parent, rank, limit, flag = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
deadline, message, lost, pending, stopped_since = None, "", "", b"", None

def stopped():
    try:
        with open(f"/proc/{parent}/stat") as stat:  # Linux; state T is SIGSTOP (t, a debugger's stop, is left alone)
            return stat.read().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        pass
    except (OSError, IndexError):
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(parent)], capture_output=True, text=True).stdout
    return state.strip().startswith("T")

def end(line):
    os.write(2, (line + "\n").encode())  # one write: lines from several processes never run together
    os.kill(parent, signal.SIGKILL)
    sys.exit(0)

while True:
    wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
    if select.select([0], [], [], wait)[0]:
        data = os.read(0, 65536)
        if not data:
            sys.exit(0)  # the rank has exited
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            armed = json.loads(line)
            deadline = None if armed is None else time.monotonic() + armed[0]
            message, lost = ("", "") if armed is None else armed[1:]
        continue
    now = time.monotonic()
    if stopped():
        stopped_since = stopped_since or now
        if now - stopped_since >= limit:
            end(f"error: rank {rank}: stopped (SIGSTOP) and made no progress for {limit:.0f} s: killed it "
                "(STARFLOW_DISTRIBUTED_TIMEOUT sets the limit)")
        continue
    stopped_since = None
    if deadline is not None and flag and os.path.exists(flag):
        end(lost)  # the launcher saw another rank fail: this wait can never be answered
    if deadline is not None and now >= deadline:
        end(message)
"""


class Watchdog:
    """Kills this rank with one line on stderr when an armed wait outlives its deadline.

    A blocked collective cannot be interrupted from Python, and MLX's ring backend waits for
    a silent peer forever. Nothing is half-written when it fires: files are written only
    after the last collective.
    """

    def __init__(self, rank: int, timeout: float):
        import subprocess

        self.rank = rank
        flag = os.environ.get(FAILED_ENV, "")
        self.process = subprocess.Popen([sys.executable, "-c", WATCHER, str(os.getpid()), str(rank), str(timeout),
                                         flag], stdin=subprocess.PIPE)

    def _send(self, line: str) -> None:
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def arm(self, seconds: float, line: str, lost: str) -> None:
        """Kill this rank after ``seconds`` unless disarmed or re-armed first, printing ``error: rank R: line``;
        at once, printing ``lost`` instead, when the launcher says another rank failed."""
        said = [f"error: rank {self.rank}: {text}" for text in (line, lost)]
        self._send(json.dumps([seconds, *said]))  # JSON: a folder's name in a line may hold any character

    def disarm(self) -> None:
        self._send("null")

    @contextmanager
    def watching(self, seconds: float, line: str, lost: str):
        self.arm(seconds, line, lost)
        try:
            yield
        finally:
            self.disarm()


def timeout_seconds() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds above 0, got {text!r}")
    return value


@dataclass
class World:
    """This process's place among the ranks of one job."""

    rank: int = 0
    size: int = 1
    group: object = None
    timeout: float = DEFAULT_TIMEOUT
    watchdog: Watchdog | None = None
    steps_wait: bool = False  # inside :meth:`sampling`: progress reports are the ranks' heartbeat
    written: tuple | None = None  # (files whole on disk, files of the job, folder): rank 0 of a pipelined --output-dir

    def wrote(self, count: int, total: int, folder) -> None:
        """``count`` of the job's ``total`` files are whole in ``folder`` (written through a temporary name)."""
        self.written = (count, total, folder)

    def outcome(self) -> str:
        """What a failure leaves behind, in the words of the line that reports it."""
        if not self.is_main:
            return "stopped (rank 0 says what was written)"
        if self.written is None or self.written[0] == 0:
            return "stopped, nothing written"
        count, total, folder = self.written
        return f"stopped: {count} of {total} written to {folder}; rerun with --resume to finish"

    def silence(self, seconds: float, what: str) -> str:
        return (f"no answer from the other ranks {what} within {seconds:.0f} s (a rank died, hangs or cannot "
                f"connect; {TIMEOUT_ENV} sets the limit): {self.outcome()}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batches(self, items: range, batch: int) -> list[range]:
        """``items`` per rank, in whole batches cut at multiples of ``batch`` (where one process cuts
        them, so every image is computed exactly as there), contiguous, the first ranks taking one
        more batch when they do not divide evenly."""
        cuts = sorted({items.start, items.stop, *range(items.start - items.start % batch + batch, items.stop, batch)})
        per, extra = divmod(len(cuts) - 1, self.size)
        shares, first = [], 0
        for rank in range(self.size):
            taken = per + (rank < extra)
            shares.append(range(cuts[first], cuts[first + taken]))
            first += taken
        return shares

    def gather(self, mine: np.ndarray | None, counts: list[int], worked: float) -> np.ndarray | None:
        """Every rank's items (uint8, ``counts[r]`` from rank r; ``None`` from a rank with none) in rank
        order, on rank 0 only.

        A rank that finished early waits for the others; it gives them the timeout plus as long
        as it worked itself (they do as much work) before it calls them lost.
        """
        header = np.zeros(8, np.int32)  # an item's rank and shape, so that a rank with no items learns them
        if mine is not None:
            header[0] = mine.ndim - 1
            header[1 : mine.ndim] = mine.shape[1:]
        header[-2:] = SIGN, self.rank
        with self.collective(self.timeout + worked, "while gathering the results"):
            headers = np.array(mx.distributed.all_gather(mx.array(header), group=self.group)).reshape(self.size, -1)
            self._signed(headers)
            headers = headers[:, :-2]
            widest = headers.max(axis=0)
            item = tuple(int(d) for d in widest[1 : 1 + widest[0]])
            most = max(counts)
            padded = np.zeros((most, *item), np.uint8)
            if mine is not None:
                padded[: len(mine)] = mine
            every = np.array(mx.distributed.all_gather(mx.array(padded), group=self.group))
            self.verify()
        if not self.is_main:
            return None
        return np.concatenate([every[r * most : r * most + n] for r, n in enumerate(counts)])

    def verify(self) -> None:
        """Every rank was there to the end of the exchanges before this one. MLX's ring may hand back a
        collective's buffer unfilled, without an error, when a peer dies during it: a dead peer cannot sign."""
        if self.size == 1:
            return
        with self.collective(self.timeout, "while checking the exchanges"):
            mine = mx.array([SIGN, self.rank], dtype=mx.int32)
            self._signed(np.array(mx.distributed.all_gather(mine, group=self.group)).reshape(self.size, -1))

    def _signed(self, rows: np.ndarray) -> None:
        """Each rank's row of a gather ends with the sign and its rank: otherwise the connection was lost."""
        if not (np.all(rows[:, -2] == SIGN) and np.array_equal(rows[:, -1], np.arange(self.size))):
            raise DistributedError(f"lost the connection to another rank during an exchange (it died or its "
                                   f"network went down): {self.outcome()}")

    def from_main(self, value: int | None) -> int | None:
        """Rank 0's ``value`` on every rank: what only rank 0 can read (the files it wrote)."""
        sent = self._from_main(np.array([value is not None, value or 0], np.int32))
        return int(sent[1]) if sent[0] else None

    def indices_from_main(self, indices, count: int) -> set[int]:
        """Rank 0's set of ``indices`` (each below ``count``) on every rank."""
        mask = np.zeros(count, np.int32)
        mask[list(indices)] = 1
        return {int(i) for i in np.flatnonzero(self._from_main(mask))}

    def _from_main(self, values: np.ndarray) -> np.ndarray:
        if self.size == 1:
            return values
        mine = values if self.is_main else np.zeros_like(values)
        with self.collective(self.timeout, "while agreeing on the job"):
            return np.array(mx.distributed.all_sum(mx.array(mine), group=self.group))

    def smallest(self, value: int) -> int:
        """The smallest of every rank's ``value``: choices that depend on a machine's memory must agree."""
        if self.size == 1:
            return value
        with self.collective(self.timeout, "while agreeing on the job"):
            return int(mx.distributed.all_min(mx.array(value, dtype=mx.int32), group=self.group).item())

    @contextmanager
    def collective(self, seconds: float, what: str):
        """Work that waits on other ranks: bounded by the watchdog, a lost peer turned into one line. Inside
        pipeline sampling (an exchange checked between batches), sampling is watched again afterwards."""
        try:
            with self.watchdog.watching(seconds, self.silence(seconds, what), lost_line(self.outcome())), \
                    peer_errors(self.outcome):
                yield
        finally:
            if self.steps_wait:
                self._beat()

    @contextmanager
    def sampling(self):
        """Pipeline-parallel sampling: every step waits on the other ranks, so the reports of
        :meth:`beating` must keep coming within the timeout."""
        if self.watchdog is None:
            yield
            return
        self.steps_wait = True
        try:
            with peer_errors(self.outcome):
                self._beat()
                yield
        finally:
            self.steps_wait = False
            self.watchdog.disarm()

    @contextmanager
    def writing(self):
        """Files being written between exchanges: this rank waits on nobody, so a failure elsewhere cannot end it
        halfway (its line then tells how many files are whole); sampling is watched again afterwards."""
        if not self.steps_wait:
            yield
            return
        self.watchdog.disarm()
        try:
            yield
        finally:
            self._beat()

    def _beat(self) -> None:
        """Sampling is watched for the next ``timeout`` seconds; a failure then says what is written by now."""
        self.watchdog.arm(self.timeout, self.silence(self.timeout, "during sampling"), lost_line(self.outcome()))

    def beating(self, progress):
        """``progress`` that re-arms the watchdog on every report."""
        if self.watchdog is None:
            return progress

        def report(*args, **kwargs):
            if self.steps_wait:
                self._beat()
            return progress(*args, **kwargs)

        return report


@contextmanager
def peer_errors(outcome=lambda: "stopped, nothing written"):
    """MLX's ring backend raises RuntimeError when a peer's connection drops: a one-line DistributedError,
    ending with ``outcome()``, what the failure leaves behind."""
    try:
        yield
    except RuntimeError as exc:
        if not is_backend_error(exc):
            raise
        raise DistributedError(lost_line(outcome())) from None


def lost_line(outcome: str) -> str:
    return f"lost the connection to another rank (it died or its network went down): {outcome}"


def is_backend_error(exc: BaseException) -> bool:
    return any(tag in str(exc) for tag in ("[ring]", "[jaccl]", "[mpi]"))


_WORLD: World | None = None


def launched() -> bool:
    return any(name in os.environ for name in LAUNCH_VARIABLES)


def ring_hosts() -> list | None:
    """The ring backend's ranks, one list of ``ip:port`` addresses each, from ``MLX_HOSTFILE``; None for
    another backend (JACCL, MPI). Checked here because MLX reports a bad hostfile as an internal error."""
    others = ("MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR", "MLX_WORLD_SIZE", *LAUNCH_VARIABLES[1:])  # JACCL, NCCL, MPI
    if "MLX_RANK" not in os.environ or any(name in os.environ for name in others):
        return None
    import json

    name = os.environ.get("MLX_HOSTFILE")
    if not name:
        raise DistributedError("MLX_RANK is set but MLX_HOSTFILE is not: start the ranks with starflow launch or "
                               "mlx.launch, which write the hostfile that says where every rank listens")
    try:
        text = open(name, encoding="utf-8").read(1 << 20)
    except (OSError, UnicodeDecodeError) as exc:
        raise DistributedError(f"cannot read MLX_HOSTFILE {name} ({getattr(exc, 'strerror', None) or exc}): "
                               "start the ranks with starflow launch or mlx.launch") from None
    if not text.strip():
        return []  # mlx.launch -n 1 writes an empty hostfile: one rank
    expected = 'a JSON list with one list of "ip:port" addresses per rank, as mlx.launch writes'
    try:
        hosts = json.loads(text)
    except ValueError:
        raise DistributedError(f"MLX_HOSTFILE {name} is not JSON: expected {expected}") from None
    if not (isinstance(hosts, list) and hosts and all(isinstance(h, list) and h for h in hosts)
            and all(isinstance(a, str) and a.rpartition(":")[2].isdigit() for h in hosts for a in h)):
        raise DistributedError(f"MLX_HOSTFILE {name} is not a ring hostfile: expected {expected}")
    return hosts


def connect_line(rank: int, size: int, seconds: float) -> str:
    """What it means when the ranks are not all connected after ``seconds``."""
    waited = f"rank {1 - rank} did not connect" if size == 2 else "not every rank connected"
    return (f"{waited} within {seconds:.0f} s (not started, still starting, or unreachable at the address in "
            f"MLX_HOSTFILE; {TIMEOUT_ENV} sets the limit): stopped, nothing written")


def connect(watchdog: Watchdog, rank: int, size: int, timeout: float):
    """``mx.distributed.init`` within ``timeout``. MLX's ring gives up connecting to a peer that is not listening
    yet after about 15 s, whatever the timeout: trying again until the deadline lets a slow rank start.
    (The first connection of a ring is the last rank's, to rank 0, so nothing is half-connected then.)"""
    import time

    deadline = time.monotonic() + timeout
    with watchdog.watching(timeout, connect_line(rank, size, timeout), lost_line("stopped, nothing written")):
        while True:
            try:
                group = mx.distributed.init(strict=True)
                # One exchange before any work: every rank is there and answering.
                mx.eval(mx.distributed.all_sum(mx.ones(1), group=group))
                return group
            except RuntimeError as exc:
                if "Can't parse address" in str(exc):  # an address of MLX_HOSTFILE that does not resolve
                    raise DistributedError(f"MLX_HOSTFILE: {exc}: give each rank an ip:port") from None
                if not is_backend_error(exc):
                    raise
                if "connect" not in str(exc) or time.monotonic() >= deadline:
                    raise DistributedError(connect_line(rank, size, timeout)) from None
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def current() -> World:
    """The job's world, connected once: a single rank unless the process was started by ``mlx.launch``."""
    global _WORLD
    if _WORLD is None:
        hosts = ring_hosts() if launched() else []
        if not launched() or hosts == []:
            _WORLD = World()
        else:
            timeout = timeout_seconds()
            text = os.environ.get("MLX_RANK", "0")
            rank = int(text) if text.isdigit() else -1
            size = len(hosts) if hosts is not None else 0
            if rank < 0 or (hosts is not None and rank >= size):
                raise DistributedError(f"MLX_RANK is {text!r} but MLX_HOSTFILE lists {size} ranks: a rank is "
                                       f"0 to {size - 1} (start the ranks with starflow launch or mlx.launch)")
            watchdog = Watchdog(rank, timeout)
            group = connect(watchdog, rank, size, timeout)
            watchdog.rank = group.rank()
            _WORLD = World(group.rank(), group.size(), group, timeout, watchdog)
    return _WORLD


# -- pipeline parallel -------------------------------------------------------------------------
def layer_share(layers: int, size: int, rank: int) -> range:
    """Contiguous layers of rank ``rank`` of ``size``; the first ranks take one more when they do not divide."""
    if layers < size:
        raise ValueError(f"the deep block has {layers} layers: it cannot be split over {size} ranks "
                         "(use fewer processes, or data parallel without --pipeline)")
    per, extra = divmod(layers, size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


class PipelineStage:
    """One rank's place in the deep block's layer pipeline (set as ``MetaBlock.stage``).

    Every rank computes the block's input the same way; rank 0's is the real one. The hidden
    state crosses from rank b to rank b + 1 by an ``all_gather`` in which rank b + 1 takes
    rank b's rows, and after the last rank's layers a final gather gives every rank its rows,
    so all compute the same scales and shifts. Collectives rather than ``send``/``recv_like``:
    a received array has no inputs in MLX's graph, so nothing would order it after the
    previous step's exchanges; a gather's input can be made to wait on them.

    Each crossing is a ``custom_function`` whose gradient runs the exchange backwards, so
    ``mx.grad`` through the split block (the score step that denoises images) gives every rank
    the gradient one process would compute.
    """

    def __init__(self, world: World):
        self.world = world
        self.crossings = [self._crossing(boundary) for boundary in range(world.size - 1)]
        self.start, self.final = self._start(), self._final()

    def _gather(self, h: mx.array) -> tuple[mx.array, int]:
        return mx.distributed.all_gather(h, group=self.world.group), h.shape[0]

    def _crossing(self, boundary: int):
        rank = self.world.rank

        @mx.custom_function
        def cross(h):
            every, rows = self._gather(h)
            if rank == boundary + 1:
                return every[boundary * rows : (boundary + 1) * rows]
            return mx.depends(h, every)  # this rank's rows are already past the boundary, or not yet there

        @cross.vjp
        def cross_vjp(primals, cotangent, output):
            every, rows = self._gather(cotangent)
            if rank == boundary:
                return cotangent + every[(boundary + 1) * rows : (boundary + 2) * rows]
            if rank == boundary + 1:
                return mx.depends(mx.zeros_like(cotangent), every)
            return mx.depends(cotangent, every)

        return cross

    def _start(self):
        @mx.custom_function
        def start(h):
            return h

        @start.vjp
        def start_vjp(primals, cotangent, output):
            # Only rank 0's copy of the input reaches the layers: every rank needs its gradient.
            return mx.distributed.all_sum(cotangent, group=self.world.group)

        return start

    def _final(self):
        last = self.world.rank == self.world.size - 1

        @mx.custom_function
        def final(h):
            every, rows = self._gather(h)
            return every[(self.world.size - 1) * rows :]

        @final.vjp
        def final_vjp(primals, cotangent, output):
            # Every rank computes the same loss from these rows: the last rank's own copy carries it back.
            return cotangent if last else mx.depends(mx.zeros_like(cotangent), output)

        return final

    def enter(self, h: mx.array, cache=None) -> mx.array:
        """The block's input -> this rank's layers' input; after the exchanges that wrote ``cache`` so far."""
        if cache is not None:
            h = mx.depends(h, cache.layers[-1].keys[0])
        h = self.start(h)
        for cross in self.crossings[: self.world.rank]:
            h = cross(h)
        return h

    def leave(self, h: mx.array, cache=None) -> mx.array:
        """This rank's layers' output -> the block's output, the same on every rank."""
        for cross in self.crossings[self.world.rank :]:
            h = cross(h)
        h = self.final(h)
        if cache is not None:
            # Writing the text or known frames into the cache discards the output: the cache must
            # still wait for the exchanges, or the other ranks would wait forever.
            last = cache.layers[-1]
            last.keys = [mx.depends(last.keys[0], h), *last.keys[1:]]
        return h


def keep_deep_layers(flow, layers: range) -> tuple[dict[str, str], set[str]]:
    """Keep only ``layers`` of the deep block, which then runs as this rank's pipeline stage.

    Returns each kept parameter's name in the model file where it differs (local layer j is
    file layer ``layers.start + j``) and the file's tensors this rank leaves unread.
    """
    from mlx.utils import tree_flatten

    deep = flow.blocks[-1]
    prefix = f"blocks.{deep.index}.attn_blocks."
    before = {name for name, _ in tree_flatten(flow.parameters())}
    deep.attn_blocks = deep.attn_blocks[layers.start : layers.stop]
    deep.stage = PipelineStage(current())
    file_names = {}
    for name, _ in tree_flatten(flow.parameters()):
        if name.startswith(prefix):
            layer, rest = name[len(prefix) :].split(".", 1)
            file_names[name] = f"{prefix}{int(layer) + layers.start}.{rest}"
    kept = {file_names.get(name, name) for name, _ in tree_flatten(flow.parameters())}
    return file_names, before - kept


def unread_bytes(folder, layers: range) -> int:
    """Bytes of the deep block's layers outside ``layers`` in a model folder's flow weights (another rank's)."""
    import math
    from pathlib import Path

    from starflow_mlx.config import FlowConfig
    from starflow_mlx.convert.safetensors_stream import DTYPES, read_header

    config = FlowConfig.load(Path(folder, "config.json"))
    prefix = f"blocks.{config.num_blocks - 1}.attn_blocks."
    total = 0
    for name, (dtype, shape) in read_header(Path(folder, "model.safetensors")).items():
        if name.startswith(prefix) and int(name[len(prefix) :].split(".", 1)[0]) not in layers:
            total += math.prod(shape) * np.dtype(DTYPES[dtype][1]).itemsize
    return total
