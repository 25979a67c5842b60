"""Deep and shallow blocks pipelined over video frames give the sample of one block after another.

The flow is the tiny STARFlow-V of ``fixtures_video`` (48 latent channels, two frame-local
shallow blocks, trained on 3 latent frames) with random weights. The two paths differ only
in the row count of the shallow blocks' matrix products (one frame against all frames at
once), so they agree to float32 rounding. Jacobi is compared where it has converged: its
shallow blocks stop on each frame's own residual when pipelined, on all frames' together
when not.
"""

import mlx.core as mx
import numpy as np
import pytest

from fixtures_video import FLOW
from flow_factory import IMAGE, VIDEO, random_flow
from starflow_mlx.sampling import auto, pipelined
from starflow_mlx.sampling.jacobi import JacobiStats, invert_jacobi
from starflow_mlx.sampling.sequential import invert_sequential

# Threshold 0: every chunk runs all its iterations, which solve the shallow blocks' 2-token chunks exactly.
EXACT_JACOBI = dict(jacobi=True, jacobi_block_size=2, jacobi_threshold=0.0, jacobi_max_iter=5)


@pytest.fixture(scope="module")
def flow():
    return random_flow(0, scale=0.03, **FLOW)


def inputs(frames: int, batch: int = 2, seed: int = 3):
    z = mx.random.normal((batch, frames, 2, 2, 48), key=mx.random.key(seed))
    y = mx.random.normal((batch, 64, 32), key=mx.random.key(seed + 1))
    return z, y, mx.zeros_like(y)


def both(flow, z, y, **options):
    plain = np.array(flow.reverse(z, y, pipeline=False, **options))
    piped = np.array(flow.reverse(z, y, pipeline=True, **options))
    return plain, piped


def assert_same(plain, piped):
    np.testing.assert_allclose(piped, plain, rtol=1e-6, atol=1e-6)


SAMPLERS = {"sequential": dict(jacobi=False), "jacobi": EXACT_JACOBI,
            "jacobi-window": {**EXACT_JACOBI, "jacobi_schedule": "window"}}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_pipelined_equals_unpipelined(flow, sampler, cfg):
    z, y, y_u = inputs(3)
    assert_same(*both(flow, z, y, y_uncond=y_u, cfg=cfg, **SAMPLERS[sampler]))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_past_the_training_length(flow, sampler):
    """6 frames of a model trained on 3: Jacobi's deep block slides its window (re-encoding one frame)."""
    z, y, y_u = inputs(6, batch=1)
    stats = JacobiStats()
    assert_same(*both(flow, z, y, y_uncond=y_u, cfg=2.5, context_frames=1, stats=stats, **SAMPLERS[sampler]))
    assert stats.reencodes == (0 if sampler == "sequential" else 4)  # two re-encodes in each of the two calls


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_with_known_first_frames(flow, sampler):
    z, y, y_u = inputs(5, batch=1)
    known = flow.reverse(z[:, :2], y, pipeline=False)
    plain, piped = both(flow, z, y, y_uncond=y_u, cfg=2.5, context=known, context_frames=1, **SAMPLERS[sampler])
    assert_same(plain, piped)
    np.testing.assert_allclose(piped[:, :2], np.array(known), atol=2e-4)


def test_loose_jacobi_threshold_stays_close(flow):
    z, y, y_u = inputs(4)
    plain, piped = both(flow, z, y, y_uncond=y_u, cfg=2.5, jacobi=True)
    np.testing.assert_allclose(piped, plain, atol=1e-3)


def deep_block_and_sequence(flow, z):
    x = z.astype(mx.float32)
    deep = flow.blocks[-1]
    layout = flow._layout(x, deep.index)
    return deep, layout, layout.permute(layout.to_sequence(x), deep.flips, True)


def recorder():
    calls = []
    return calls, lambda t, tokens: calls.append((t, np.array(tokens)))


@pytest.mark.parametrize("known_frames", [0, 2])
def test_sequential_hook_fires_once_per_frame_in_order(flow, known_frames):
    z, y, _ = inputs(5)
    deep, layout, seq = deep_block_and_sequence(flow, z)
    cos, sin = flow.rope(layout, y.shape[1])
    prefix = seq[:, : known_frames * layout.frame_size] if known_frames else None
    calls, on_frame = recorder()
    out = np.array(invert_sequential(deep, seq, y, cos, sin, prefix=prefix, on_frame=on_frame,
                                     frame_size=layout.frame_size))
    assert [t for t, _ in calls] == list(range(5))
    np.testing.assert_array_equal(np.concatenate([tokens for _, tokens in calls], axis=1), out)


@pytest.mark.parametrize("schedule", ["chunk", "window"])
@pytest.mark.parametrize("known_frames", [0, 2])
def test_jacobi_hook_fires_once_per_frame_in_order(flow, schedule, known_frames):
    """Past the window (6 frames, trained on 3), with guidance: the hook gets the conditional half."""
    z, y, y_u = inputs(6)
    deep, layout, seq = deep_block_and_sequence(flow, z)
    prefix = seq[:, : known_frames * layout.frame_size] if known_frames else None
    calls, on_frame = recorder()
    out = np.array(invert_jacobi(flow, deep, layout, seq, mx.concatenate([y, y_u]), 2.5, block_size=3,
                                 context_frames=1, prefix=prefix, schedule=schedule, on_frame=on_frame))
    assert [t for t, _ in calls] == list(range(6))
    assert all(tokens.shape == (2, layout.frame_size, 48) for _, tokens in calls)
    np.testing.assert_array_equal(np.concatenate([tokens for _, tokens in calls], axis=1), out)


def test_shallow_progress_is_reported_per_frame(flow):
    z, y, _ = inputs(3)
    seen = []
    flow.reverse(z, y, pipeline=True, progress=lambda label, done, total, **info: seen.append((label, done, total)))
    shallow = [(done, total) for label, done, total in seen if label == "block 0"]
    assert shallow == [(0, 12), (4, 12), (8, 12), (12, 12)]
    assert seen[-1] == ("block 0", 12, 12)


def test_a_failing_frame_is_raised_and_the_next_call_works(flow, monkeypatch):
    z, y, _ = inputs(3)
    good = np.array(flow.reverse(z, y, pipeline=True))
    original = pipelined.ShallowPipeline._run

    def broken(frame):
        raise RuntimeError("shallow blocks failed")

    def failing(self, t, frame):
        if t == 1:
            self.invert = broken
        original(self, t, frame)

    monkeypatch.setattr(pipelined.ShallowPipeline, "_run", failing)
    with pytest.raises(RuntimeError, match="shallow blocks failed"):
        flow.reverse(z, y, pipeline=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.array(flow.reverse(z, y, pipeline=True)), good)


def test_auto_pipelines_off_a_cpu_only():
    cpu, gpu = mx.Device(mx.cpu), mx.Device(mx.gpu)
    assert auto.choose_pipeline(cpu) is False
    assert auto.choose_pipeline(gpu) is False  # until timed on a GPU (auto.py)
    for device in (cpu, gpu):
        assert auto.resolve_pipeline(True, device) is True
        assert auto.resolve_pipeline(False, device) is False


@pytest.mark.parametrize("choice", [False, True])
def test_reverse_default_follows_the_rule(flow, monkeypatch, choice):
    z, y, _ = inputs(3)
    frames = []
    original = pipelined.ShallowPipeline._run
    monkeypatch.setattr(pipelined.ShallowPipeline, "_run",
                        lambda self, t, frame: (frames.append(t), original(self, t, frame)))
    monkeypatch.setattr(auto, "choose_pipeline", lambda device=None: choice)
    flow.reverse(z, y)
    assert frames == ([0, 1, 2] if choice else [])


def test_images_and_whole_sequence_models_are_not_pipelined(monkeypatch):
    """Nothing to pipeline without frame-local shallow blocks: pipeline=True changes nothing there."""
    monkeypatch.setattr(pipelined.ShallowPipeline, "_run", lambda *a: pytest.fail("pipelined"))
    image = random_flow(0, **IMAGE)
    z = mx.random.normal((1, 4, 4, 4), key=mx.random.key(0))
    y = mx.random.normal((1, 6, 24), key=mx.random.key(1))
    assert mx.array_equal(image.reverse(z, y, pipeline=True), image.reverse(z, y, pipeline=False)).item()
    whole = random_flow(0, **{**VIDEO, "shallow_block_local": False, "cond_top_only": False})
    zv = mx.random.normal((1, 3, 2, 2, 4), key=mx.random.key(0))
    assert mx.array_equal(whole.reverse(zv, y, pipeline=True), whole.reverse(zv, y, pipeline=False)).item()


def test_benchmark_reports_both_paths(monkeypatch, capsys):
    """``python -m starflow_mlx.benchmarks.video_pipelining`` at a toy size (its figures are not checked)."""
    import json

    from starflow_mlx.benchmarks import video_pipelining

    monkeypatch.setattr("sys.argv", ["video_pipelining", "--frames", "2", "--size", "2", "--channels", "32",
                                     "--deep-layers", "1", "--repeats", "1", "--json"])
    video_pipelining.main()
    result = json.loads(capsys.readouterr().out)
    assert [run["sampler"] for run in result["runs"]] == ["sequential", "jacobi"]
    assert result["runs"][0]["max_abs_diff"] < 1e-4  # sequential; Jacobi's shallow stop test differs per frame
    for run in result["runs"]:
        assert run["pipelined"]["first_frame"] <= run["pipelined"]["seconds"]


def test_rope_tables_cached_on_this_thread_are_usable_by_the_worker():
    """The worker's Jacobi steps take their padded tables from the cache this thread filled."""
    flow = random_flow(1, scale=0.03, **FLOW)
    z, y, _ = inputs(3)
    layout = flow._layout(z, 0)  # a shallow block's: one frame per sequence
    flow.rope(layout, 0, pad=EXACT_JACOBI["jacobi_block_size"])  # left unevaluated by this thread
    piped = np.array(flow.reverse(z, y, pipeline=True, **EXACT_JACOBI))
    assert_same(np.array(flow.reverse(z, y, pipeline=False, **EXACT_JACOBI)), piped)


def test_a_worker_that_cannot_start_is_an_error_not_a_hang(monkeypatch):
    def no_stream(device):
        raise RuntimeError("no stream here")

    monkeypatch.setattr(pipelined.mx, "new_stream", no_stream)
    with pytest.raises(RuntimeError, match="no stream here"):
        pipelined.StreamWorker(mx.Device(mx.cpu))
