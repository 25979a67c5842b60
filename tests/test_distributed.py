"""`starflow generate` over two processes on this machine (`mlx.launch -n 2`, MLX's ring backend over localhost).

Data parallel must give the bytes one process gives; pipeline parallel the same arrays within
float32 tolerance; a rank that dies or never connects must stop the others in bounded time
with one line and no output file.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from starflow_mlx.io.distributed import World, layer_share
from starflow_mlx.io.launcher import free_port_run

BIN = Path(sys.executable).parent
TIMEOUT = 240  # seconds for one launched job on a loaded 2-core machine; a hang fails instead of blocking CI


def launch(*command, ranks: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """``mlx.launch -n ranks --backend ring -- command`` on localhost."""
    args = [str(BIN / "mlx.launch"), "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_port_run(ranks)),
            "--", *map(str, command)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, **(env or {})})
    assert "error" not in res.stderr.lower() and "Traceback" not in res.stderr, res.stderr
    return res


def single(*command) -> subprocess.CompletedProcess:
    res = subprocess.run([str(BIN / "starflow"), *map(str, command)], capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    return res


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shares_cut_at_batch_boundaries_and_layers_split_evenly():
    two = World(size=2)
    assert two.batches(range(5), 2) == [range(0, 4), range(4, 5)]  # batches [0,2) [2,4) [4,5): 2 then 1
    assert two.batches(range(3), 1) == [range(0, 2), range(2, 3)]
    assert two.batches(range(2, 3), 16) == [range(2, 3), range(3, 3)]  # one image from metadata: rank 1 idles
    assert [layer_share(5, 2, r) for r in range(2)] == [range(0, 3), range(3, 5)]
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        layer_share(2, 3, 0)


def test_pipeline_is_chosen_when_the_model_does_not_fit_one_machine(monkeypatch):
    from starflow_mlx.apps.generate_distributed import deep_layers

    monkeypatch.setattr(World, "smallest", lambda world, value: value)  # the ranks' agreement, as if all said so
    two = World(rank=1, size=2)
    assert deep_layers(two, "demo", pipeline=False) is None  # the demo fits: data parallel
    assert deep_layers(two, "demo", pipeline=True) == range(2, 4)
    monkeypatch.setattr("starflow_mlx.io.memory.memory_limit", lambda: 1 << 20)
    assert deep_layers(two, "demo", pipeline=False) == range(2, 4)
    assert deep_layers(World(), "demo", pipeline=False) is None  # one process never pipelines


def test_data_parallel_images_are_the_single_process_bytes_and_rank_0_writes_once(tmp_path):
    res = launch(BIN / "starflow", "generate", "3", "--model", "demo", "-n", 3, "--output-dir", tmp_path / "two")
    single("generate", "3", "--model", "demo", "-n", 3, "--batch-size", 2, "--output-dir", tmp_path / "one")
    made = files(tmp_path / "two")
    assert made == files(tmp_path / "one") and len(made) == 3  # the default batch under 2 ranks is 2 (ceil(3 / 2))
    assert res.stdout.count("wrote") == 3  # rank 0 names the three files; rank 1 stays silent


def test_pipeline_images_match_one_process_and_each_rank_holds_half_the_deep_block(tmp_path):
    launch(BIN / "starflow", "generate", "7", "--model", "demo", "-n", 2, "--pipeline", "-o", tmp_path / "two.png")
    single("generate", "7", "--model", "demo", "-n", 2, "-o", tmp_path / "one.png")
    from PIL import Image

    two, one = (np.asarray(Image.open(tmp_path / name), np.int16) for name in ("two.png", "one.png"))
    assert np.abs(two - one).max() <= 1  # float32 sums in another order may move a pixel by one level

    from starflow_mlx.io.model_folder import DEMO_DIR
    from starflow_mlx.io.memory import weight_bytes

    halves = [weight_bytes(DEMO_DIR, layer_share(4, 2, r)) for r in range(2)]
    assert halves[0] == halves[1] < weight_bytes(DEMO_DIR)


PIPELINE_VIDEO = """
import sys
import numpy as np
from starflow_mlx.io.distributed import current, layer_share
from starflow_mlx.pipelines.video import VideoPipeline
world = current()
layers = layer_share(2, world.size, world.rank) if world.size > 1 else None
pipe = VideoPipeline.from_pretrained(sys.argv[1], layers=layers)
held = len(pipe.flow.blocks[-1].attn_blocks)
# 13 frames = 4 latent frames past the model's 3: Jacobi with a sliding window and re-encoded context.
latents = pipe.sample("a fox", frames=13, seed=3, num_videos=1, jacobi_block_size=4)
if world.rank == 0:
    np.save(sys.argv[2], np.array(latents))
print("held", held)
"""


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    pytest.importorskip("torch")
    from fixtures_video import make_video_model

    return make_video_model(tmp_path_factory.mktemp("video"))


def test_pipeline_video_latents_match_one_process_within_float32(video_model, tmp_path):
    script = tmp_path / "sample.py"
    script.write_text(PIPELINE_VIDEO)
    res = launch(sys.executable, script, video_model, tmp_path / "two.npy")
    assert sorted(res.stdout.split()) == ["1", "1", "held", "held"]  # the deep block's 2 layers: one per rank
    subprocess.run([sys.executable, script, video_model, tmp_path / "one.npy"], check=True, timeout=TIMEOUT)
    two, one = np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy")
    np.testing.assert_allclose(two, one, atol=1e-4, rtol=1e-4)


def test_data_parallel_videos_are_each_videos_own_bytes(video_model, tmp_path):
    # Five videos on two ranks (3 + 2): rank 1's first video is video 3, drawn from seed + 3, where a rule
    # by rank (seed + 1) or by position in the rank's share (seed + 0) would differ; two videos could not tell.
    launch(BIN / "starflow", "generate", "a fox", "--model", video_model, "-n", 5, "--frames", 5, "--seed", 4,
           "--output-dir", tmp_path / "two")
    single("generate", "a fox", "--model", video_model, "-n", 5, "--frames", 5, "--seed", 4,
           "--output-dir", tmp_path / "one")
    made = files(tmp_path / "two")
    assert sorted(made) == [f"a-fox-seed4-{i:03d}.mp4" for i in range(5)]
    assert made == files(tmp_path / "one")


def error_lines(stderr: str) -> list[str]:
    """Starflow's own lines, wherever they start: MLX's ring backend logs '[ring] ...' from its threads in
    pieces, which may run into the line starflow writes (in one write, so it is never cut itself)."""
    return [found.group(0) for found in map(re.compile(r"error: .*$").search, stderr.splitlines()) if found]


def one_error_line(stderr: str) -> str:
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("error: rank 0:"), stderr
    return lines[0]


def rank(number: int, hostfile: Path, out: Path, timeout: int, pipeline: bool = True) -> subprocess.Popen:
    """One rank started by hand, as mlx.launch starts it (which would also stop the other when one dies)."""
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(number),
           "STARFLOW_DISTRIBUTED_TIMEOUT": str(timeout)}
    # Four batches of one: the job outlasts the moment the other rank is killed.
    return subprocess.Popen([str(BIN / "starflow"), "generate", "3", "--model", "demo", "-n", "4", "--batch-size", "1",
                             *(["--pipeline"] if pipeline else []), "--output-dir", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_sampling(process: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:  # the ranks are connected once rank 0 has encoded the prompt
        line = process.stderr.readline()
        if line.startswith("text") or not line:
            return


def hostfile(tmp_path: Path) -> Path:
    base = free_port_run(2)
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]))
    return path


def test_a_rank_that_never_connects_stops_the_other_with_one_line_and_no_file(tmp_path):
    started = time.monotonic()
    alone = rank(0, hostfile(tmp_path), tmp_path / "out", timeout=3)
    _, stderr = alone.communicate(timeout=TIMEOUT)
    assert alone.returncode != 0 and time.monotonic() - started < 60
    assert "rank 1 did not connect within 3 s" in one_error_line(stderr)
    assert not (tmp_path / "out").exists()


def test_a_rank_that_dies_mid_job_stops_the_other_with_one_line_and_no_file(tmp_path):
    hosts = hostfile(tmp_path)
    first, second = rank(0, hosts, tmp_path / "out", 20), rank(1, hosts, tmp_path / "out", 20)
    wait_until_sampling(first)
    second.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, rest = first.communicate(timeout=TIMEOUT)
    assert first.returncode != 0 and time.monotonic() - killed < 60
    one_error_line(rest)
    assert not (tmp_path / "out").exists()


def test_a_rank_that_hangs_is_given_up_on_at_the_gather_with_one_line_and_no_file(tmp_path):
    hosts = hostfile(tmp_path)
    # Rank 1 hangs (stopped, with a timeout long enough that its own watchdog does not end it first).
    first, second = (rank(r, hosts, tmp_path / "out", 60 if r else 3, pipeline=False) for r in range(2))
    wait_until_sampling(first)
    second.send_signal(signal.SIGSTOP)
    try:
        _, rest = first.communicate(timeout=TIMEOUT)
    finally:
        second.kill()
        second.communicate()
    assert first.returncode != 0
    assert "while gathering the results" in one_error_line(rest)
    assert not (tmp_path / "out").exists()


def test_a_stopped_rank_is_killed_by_its_own_watchdog(tmp_path):
    hosts = hostfile(tmp_path)
    first, second = (rank(r, hosts, tmp_path / "out", 3, pipeline=False) for r in range(2))
    wait_until_sampling(first)
    second.send_signal(signal.SIGSTOP)
    try:
        _, rest = second.communicate(timeout=60)  # mlx.launch would have waited for it forever
        _, first_rest = first.communicate(timeout=60)
    finally:
        for process in (first, second):
            process.kill()
            process.communicate()
    assert second.returncode == -signal.SIGKILL
    assert error_lines(rest) == ["error: rank 1: stopped (SIGSTOP) and made no progress for 3 s: killed it "
                                 "(STARFLOW_DISTRIBUTED_TIMEOUT sets the limit)"]
    # Rank 0 loses it at the gather, or during it (where MLX may hand back an unfilled buffer without an error);
    # with both ranks on the same 3 s, rank 0's own watchdog may end its wait first: one line either way.
    line = one_error_line(first_rest)
    if "lost the connection to another rank" in line:
        assert first.returncode == 1  # MLX raised: the error line, then exit status 1
    else:  # its watchdog ended the wait: the line, then SIGKILL
        assert "no answer from the other ranks while gathering the results within 3 s" in line, line
        assert first.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()


def test_a_slow_rank_0_is_waited_for_as_long_as_the_timeout_says(tmp_path):
    # MLX's ring gives up connecting after about 15 s; rank 1 keeps trying for the whole timeout.
    hosts = hostfile(tmp_path)
    env = {**os.environ, "MLX_HOSTFILE": str(hosts), "STARFLOW_DISTRIBUTED_TIMEOUT": "90"}
    command = [str(BIN / "starflow"), "generate", "3", "--model", "demo", "-o", str(tmp_path / "x.png")]
    second = subprocess.Popen(command, env={**env, "MLX_RANK": "1"}, stderr=subprocess.PIPE, text=True)
    time.sleep(20)
    first = subprocess.run(command, env={**env, "MLX_RANK": "0"}, capture_output=True, text=True, timeout=TIMEOUT)
    _, rest = second.communicate(timeout=TIMEOUT)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + rest
    assert (tmp_path / "x.png").exists()


def test_a_rank_0_that_never_starts_is_named(tmp_path):
    alone = rank(1, hostfile(tmp_path), tmp_path / "out", timeout=3)
    _, stderr = alone.communicate(timeout=TIMEOUT)
    assert alone.returncode != 0
    assert error_lines(stderr) == ["error: rank 1: rank 0 did not connect within 3 s (not started, still starting, "
                                   "or unreachable at the address in MLX_HOSTFILE; STARFLOW_DISTRIBUTED_TIMEOUT "
                                   "sets the limit): stopped, nothing written"]


KILL_AFTER_FIRST_FILE = """
if [ "$MLX_RANK" = 1 ]; then
  (until ls "$1"/*.png >/dev/null 2>&1; do sleep 0.1; done; kill -9 $$) &
fi
exec "$0" generate 3 --model demo -n 4 --batch-size 1 --pipeline --output-dir "$1" $2
"""


def test_a_pipeline_rank_killed_mid_job_leaves_whole_files_that_resume_finishes(tmp_path):
    out = tmp_path / "out"
    command = [str(BIN / "starflow"), "launch", "-n", 2, "--", "sh", "-c", KILL_AFTER_FIRST_FILE, BIN / "starflow", out]
    res = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=TIMEOUT)
    kept = files(out)
    assert res.returncode == 1 and 1 <= len(kept) < 4  # rank 1 died after rank 0 had written a file
    assert error_lines(res.stderr) == [
        "error: rank 1 was killed by SIGKILL (from outside, or by the system for lack of memory)",
        f"error: rank 0: lost the connection to another rank (it died or its network went down): stopped: "
        f"{len(kept)} of 4 written to {out}; rerun with --resume to finish"], res.stderr

    command = [BIN / "starflow", "launch", "-n", 2, "--", BIN / "starflow", "generate", 3, "--model", "demo", "-n", 4,
               "--batch-size", 1, "--pipeline", "--output-dir", out, "--resume"]
    res = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert f"kept {len(kept)} image(s)" in res.stdout
    finished = files(out)
    assert len(finished) == 4 and all(finished[name] == data for name, data in kept.items())
    single("generate", 3, "--model", "demo", "-n", 4, "--batch-size", 1, "--output-dir", tmp_path / "one")
    from PIL import Image

    for name in finished:
        two, one = (np.asarray(Image.open(folder / name), np.int16) for folder in (out, tmp_path / "one"))
        assert np.abs(two - one).max() <= 1
