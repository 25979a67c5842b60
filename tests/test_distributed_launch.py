"""`starflow launch`: ranks started as mlx.launch starts them, an exit status and one line per failure, no rank
left running (a stopped one included); and the mistakes a rank finds before it connects.

The ranks here are small shell commands (fast), except where `starflow generate` itself is the point.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from starflow_mlx.io.launcher import FAILED_ENV, LaunchError, launch, local_hosts, read_hostfile

BIN = Path(sys.executable).parent
TIMEOUT = 120  # one command on a loaded 2-core machine; a hang fails the test instead of blocking CI


def starflow(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "starflow"), *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("from_hostfile", [False, True])
def test_ranks_get_their_rank_and_a_ring_hostfile_and_success_exits_0(capfd, tmp_path, from_hostfile):
    script = ('python -c "import json, os; '
              'print(os.environ[\'MLX_RANK\'], json.load(open(os.environ[\'MLX_HOSTFILE\'])))"')
    hosts = local_hosts(2)
    if from_hostfile:  # mlx.launch's hostfile naming this machine twice: no ssh
        (tmp_path / "hosts.json").write_text('[{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "localhost"}]')
        hosts = read_hostfile(tmp_path / "hosts.json")
    assert launch(["sh", "-c", script.replace("python", sys.executable)], hosts) == 0
    out = sorted(capfd.readouterr().out.splitlines())
    assert [line.split()[0] for line in out] == ["0", "1"]
    hosts = json.loads(out[0].split(" ", 1)[1].replace("'", '"'))
    assert len(hosts) == 2 and all(h[0].startswith("127.0.0.1:") for h in hosts)


WAITING_RANK = """
import sys, time
from starflow_mlx.io.distributed import Watchdog
watchdog = Watchdog(0, 600)
watchdog.arm(600, "no answer", "lost the connection: 1 of 4 written")
if sys.argv[1] == "done":
    watchdog.disarm()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("waiting", [True, False])
def test_a_rank_waiting_on_an_exchange_stops_at_once_with_its_line_when_the_launcher_marks_the_job_failed(
        tmp_path, waiting):
    # MLX's ring may block forever on a peer that died mid-exchange: the launcher's mark ends the wait.
    flag = tmp_path / "failed"
    rank = subprocess.Popen([sys.executable, "-c", WAITING_RANK, "waiting" if waiting else "done"],
                            env={**os.environ, FAILED_ENV: str(flag)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline() == "ready\n"
        time.sleep(1.5)
        assert rank.poll() is None  # not marked: it waits
        flag.touch()
        if waiting:
            _, err = rank.communicate(timeout=10)
            assert rank.returncode == -9 and err == "error: rank 0: lost the connection: 1 of 4 written\n"
        else:
            time.sleep(2.5)
            assert rank.poll() is None  # computing on its own, not waiting: left to stop by itself
    finally:
        rank.kill()
        rank.communicate()


def test_a_killed_rank_fails_the_launch_with_its_line_and_a_survivor_is_killed_after_the_grace(capfd):
    started = time.monotonic()
    status = launch(["sh", "-c", 'if [ "$MLX_RANK" = 1 ]; then kill -9 $$; fi; sleep 60'], local_hosts(2), grace=1)
    assert status == 1 and time.monotonic() - started < 30
    assert capfd.readouterr().err.splitlines() == [
        "error: rank 1 was killed by SIGKILL (from outside, or by the system for lack of memory)",
        "error: rank 0 still running 1 s after rank 1 failed: killed"]


def test_a_stopped_rank_is_killed_and_the_failing_ranks_line_comes_first(capfd):
    # Rank 1 stops itself (mlx.launch would wait for it forever); rank 0 fails with a line of its own.
    command = ('if [ "$MLX_RANK" = 1 ]; then kill -STOP $$; '
               'else sleep 0.5; echo "error: rank 0: gave up" >&2; exit 1; fi')
    started = time.monotonic()
    assert launch(["sh", "-c", command], local_hosts(2), grace=1) == 1
    assert time.monotonic() - started < 30
    assert capfd.readouterr().err.splitlines() == ["error: rank 0: gave up",
                                                  "error: rank 1 still running 1 s after rank 0 failed: killed"]


def test_an_error_line_is_found_after_other_text_on_its_line_and_the_same_line_is_said_once(capfd):
    # MLX's threads write '[ring] ...' in pieces: the rank's line may follow one on the same line.
    command = ('printf "[ring] Receiving from socket 7 failed with errno 104error: rank $MLX_RANK: bad class\\n" >&2; '
               'exit 1')
    assert launch(["sh", "-c", command], local_hosts(3)) == 1
    assert capfd.readouterr().err.splitlines() == ["error: rank 0: bad class"]


def test_the_command_line_exits_non_zero_with_one_line_for_a_users_mistake_and_starts_nothing_else(tmp_path):
    # The unknown class is found before the ranks connect: every rank stops at once, one line in all.
    started = time.monotonic()
    res = starflow("launch", "-n", 2, "--", BIN / "starflow", "generate", "cat", "--model", "demo", "-o",
                   tmp_path / "x.png")
    assert res.returncode == 1 and time.monotonic() - started < 60
    assert res.stderr.splitlines() == ["error: rank 0: unknown class 'cat': this model generates 0, 1, 2, 3, 4, 5, "
                                       "6, 7, 8, 9"], res.stderr
    assert res.stdout == "" and not (tmp_path / "x.png").exists()


def test_resume_under_data_parallel_says_it_needs_pipeline(tmp_path):
    res = starflow("launch", "-n", 2, "--", BIN / "starflow", "generate", "3", "--model", "demo", "-n", 2,
                   "--output-dir", tmp_path / "out", "--resume")
    assert res.returncode == 1 and not (tmp_path / "out").exists()
    assert res.stderr.splitlines() == ["error: rank 0: --resume under several processes continues a --pipeline job "
                                       "(data parallel writes every file at the end, so it leaves none half done): "
                                       "add --pipeline, or run in one process"], res.stderr


def test_launch_options_are_checked(tmp_path):
    assert starflow("launch", "--", "true").stderr == "error: give either -n N (ranks on this machine) or " \
                                                      "--hostfile FILE (one rank per host)\n"
    assert starflow("launch", "-n", 1).stderr.startswith("error: give the command to run after --")
    (tmp_path / "hosts.json").write_text('[{"ssh": "mac2"}]')
    with pytest.raises(LaunchError, match='host 0 \\(mac2\\) has no "ips"'):
        read_hostfile(tmp_path / "hosts.json")
    (tmp_path / "hosts.json").write_text('{"hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"]}, '
                                         '{"ssh": "127.0.0.1"}]}')
    assert [(h.ssh, h.ip) for h in read_hostfile(tmp_path / "hosts.json")] == [("mac1", "10.0.0.1"),
                                                                               ("127.0.0.1", "127.0.0.1")]


@pytest.mark.parametrize("hostfile, rank, words", [
    (None, "1", "MLX_RANK is set but MLX_HOSTFILE is not"),
    ("missing.json", "1", "cannot read MLX_HOSTFILE"),
    ('{"not": "a ring"', "1", "is not JSON"),
    ('{"hosts": []}', "1", "is not a ring hostfile"),
    ('[["127.0.0.1:40001"], ["127.0.0.1:40002"]]', "2", "MLX_RANK is '2' but MLX_HOSTFILE lists 2 ranks"),
])
def test_a_missing_or_malformed_hostfile_or_a_rank_past_the_size_is_one_line(tmp_path, hostfile, rank, words):
    env = {"MLX_RANK": rank}
    if hostfile is not None:
        path = tmp_path / "hosts.json"
        if hostfile != "missing.json":
            path.write_text(hostfile)
        env["MLX_HOSTFILE"] = str(path)
    else:
        env["MLX_HOSTFILE"] = ""
    res = starflow("generate", "3", "--model", "demo", "-o", tmp_path / "x.png", env=env)
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: rank {rank}: ") and words in lines[0], res.stderr


def test_the_script_ssh_runs_on_another_mac_gives_the_rank_its_hostfile_and_timeout(tmp_path, monkeypatch):
    from starflow_mlx.io.launcher import remote_script, ring_hostfile

    (tmp_path / "hosts.json").write_text('[{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]')
    ring = ring_hostfile(read_hostfile(tmp_path / "hosts.json"), 32323)
    show = ("import os; print(os.environ['MLX_RANK'], open(os.environ['MLX_HOSTFILE']).read(), "
            "os.environ['STARFLOW_DISTRIBUTED_TIMEOUT'], os.getcwd(), sep='\\n')")
    monkeypatch.setenv("STARFLOW_DISTRIBUTED_TIMEOUT", "7")
    script = remote_script(1, ring, [sys.executable, "-c", show])
    monkeypatch.delenv("STARFLOW_DISTRIBUTED_TIMEOUT")
    # What ssh would run on the other Mac, run here from another folder and environment.
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=TIMEOUT, cwd="/")
    rank, hostfile, timeout, cwd = res.stdout.splitlines()
    assert (rank, timeout, cwd) == ("1", "7", os.getcwd())
    assert json.loads(hostfile) == [["10.0.0.1:32323"], ["10.0.0.2:32324"]]


class RecordingWatchdog:
    def __init__(self):
        self.calls = []

    def arm(self, seconds, line, lost):
        self.calls.append(("arm", line.split(" within")[0], lost))

    def disarm(self):
        self.calls.append(("disarm",))

    def watching(self, seconds, line, lost):
        from starflow_mlx.io.distributed import Watchdog

        return Watchdog.watching(self, seconds, line, lost)


def test_pipeline_sampling_stays_watched_after_an_exchange_or_a_write_between_batches_and_says_what_is_written():
    from starflow_mlx.io.distributed import World

    watchdog = RecordingWatchdog()
    world = World(rank=0, size=2, watchdog=watchdog)
    with world.sampling():
        world.wrote(1, 4, "out")
        with world.collective(5, "while checking the exchanges"):
            pass
        assert watchdog.calls[-1] == ("arm", "no answer from the other ranks during sampling",
                                      "lost the connection to another rank (it died or its network went down): "
                                      "stopped: 1 of 4 written to out; rerun with --resume to finish")
        with world.writing():  # a failure elsewhere must not end the rank between a file and its count
            assert watchdog.calls[-1] == ("disarm",)
            world.wrote(2, 4, "out")
        assert watchdog.calls[-1][0] == "arm" and "stopped: 2 of 4 written to out" in watchdog.calls[-1][2]
    assert watchdog.calls[-1] == ("disarm",)
