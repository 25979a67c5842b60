"""Progress that tells the truth: bars exist before their work, move during it, and time it after a sync."""

import io
import time

import mlx.core as mx
from rich.console import Console

from starflow_mlx import progress as progress_module
from starflow_mlx.io.loading import load_flow
from starflow_mlx.progress import StageProgress


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, label, done, total, **info):
        self.calls.append((label, done, total))


def demo_inputs(flow, count=2):
    y = mx.zeros((count, 1, 11)).at[:, 0, 7].add(1.0)
    y_u = mx.zeros((count, 1, 11)).at[:, 0, 10].add(1.0)
    return mx.random.normal((count, 8, 8, 1), key=mx.random.key(0)), y, y_u


def test_every_block_reports_zero_before_its_first_chunk_and_moves_per_chunk():
    flow = load_flow("demo")
    z, y, y_u = demo_inputs(flow)
    for jacobi in (True, False):
        calls = Recorder()
        flow.reverse(z, y, y_uncond=y_u, cfg=2.0, jacobi=jacobi, jacobi_block_size=16, progress=calls)
        labels = list(dict.fromkeys(label for label, _, _ in calls.calls))
        assert labels == ["block 2 (deep)", "block 1", "block 0"]
        for label in labels:
            done = [d for name, d, _ in calls.calls if name == label]
            assert done[0] == 0 and done[-1] == 64 and done == sorted(done)
            if jacobi:
                assert done == [0, 16, 32, 48, 64]  # one step per chunk of 16 tokens


def test_a_stage_is_timed_after_its_queued_work_is_finished(monkeypatch):
    events = []
    clock = iter(range(100))
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: events.append("clock") or next(clock))
    monkeypatch.setattr(progress_module.mx, "synchronize", lambda: events.append("sync"))
    stages = StageProgress(Console(file=io.StringIO()), live=False)
    stages("block 2", 0, 4)
    stages("block 2", 2, 4)
    events.clear()
    stages("block 2", 4, 4)
    assert events[-2:] == ["sync", "clock"]  # MLX is lazy: the clock is read only once the work is done
    stages("block 2", 0, 4)  # the next batch's run of the same stage adds to its time
    stages("block 2", 4, 4)
    assert stages.seconds["block 2"] > 0 and list(stages.seconds) == ["block 2"]


def test_a_stage_first_heard_of_when_done_began_when_the_previous_one_ended():
    out = io.StringIO()
    stages = StageProgress(Console(file=out, width=200), live=False)
    with stages.stage("text"):
        pass
    stages("decode", 1, 1)
    assert set(stages.seconds) == {"text", "decode"}
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["text", "decode"]


def test_on_a_terminal_bars_are_drawn_and_no_log_lines_are_printed():
    out = io.StringIO()
    with StageProgress(Console(file=out, force_terminal=True, width=100)) as stages:
        stages("block 2 (deep)", 0, 64)
        stages("block 2 (deep)", 64, 64, iterations=3, residual=1e-3)
    text = out.getvalue()
    assert "block 2 (deep)" in text and "3 it, residual 1.0e-03" in text and "64/64 in" not in text


def test_quantize_report_reports_each_variants_parts(tmp_path):
    from starflow_mlx.benchmarks.quantization import measure_variants
    from starflow_mlx.io.resolve import resolve_model

    flow_only = tmp_path / "flow"  # the demo's flow without its manifest: no digit-classifier pass
    flow_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (flow_only / name).write_bytes((resolve_model("demo") / name).read_bytes())
    calls = Recorder()
    rows = measure_variants(flow_only, samples=2, progress=calls, log=lambda line: calls("estimate", line, None))
    assert len(rows) == 4
    # The time estimate comes once the float16 variant is done, before any quantized one starts.
    labels = [label for label, *_ in calls.calls]
    assert labels.count("estimate") == 1
    last_float16 = len(labels) - 1 - labels[::-1].index("float16")
    assert labels.index("estimate") == last_float16 + 1 == labels.index("int8") - 1
    assert "for the 3 quantized variants left (estimated from the float16 one)" in calls.calls[labels.index("estimate")][1]
    for name in ("float32 reference", "float16", "int8", "int4", "mixed (deep 4 / shallow 8)"):
        steps = [(d, t) for label, d, t in calls.calls if label == name]
        assert steps[0][0] == 0 and steps[-1][0] == steps[-1][1] and len(steps) == steps[-1][1] + 1, (name, steps)


def test_export_counts_its_packages(tmp_path):
    from starflow_mlx.coreml.export import export_coreml

    calls = Recorder()
    export_coreml("demo", tmp_path / "out", progress=calls)
    assert calls.calls == [("packages", 0, 3), ("packages", 1, 3), ("packages", 2, 3), ("packages", 3, 3)]


def test_a_long_stage_is_logged_while_it_runs_when_not_on_a_terminal(monkeypatch):
    clock = iter([0.0, 0.0, 10.0, 40.0, 50.0, 90.0, 95.0])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    stages = StageProgress(Console(file=out, width=200), live=False)
    for done in (0, 1, 2, 3, 4):
        stages("training", done, 10, note=f"loss {done}")
    assert out.getvalue().splitlines() == ["training: 2/10 (loss 2)", "training: 4/10 (loss 4)"]  # 30 s apart


def test_a_stage_that_reports_nothing_for_long_is_still_logged(monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_EVERY", 0.05)
    out = io.StringIO()
    with StageProgress(Console(file=out, width=200), live=False) as stages:
        stages("training", 0, 10)
        time.sleep(0.3)  # a first step compiling kernels: no report meanwhile
        stages("training", 10, 10)
    lines = out.getvalue().splitlines()
    assert any(line.startswith("training: 0/10, ") and line.endswith("s so far") for line in lines), lines
    assert lines[-1].startswith("training: 10/10 in ")
