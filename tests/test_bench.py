"""`starflow bench`: the documented report fields, error lines, and the side-by-side run against upstream."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from starflow_mlx.apps.cli import app
from starflow_mlx.apps.commands import register
from starflow_mlx.benchmarks.configs import NAMED, build_flow
from starflow_mlx.benchmarks.matmul_floor import block_floor, step_layers, step_seconds
from starflow_mlx.benchmarks.sampling import step_rows
from starflow_mlx.config import FlowConfig
from starflow_mlx.sampling.jacobi import ChunkRecord, JacobiStats

register(app)
runner = CliRunner()
UPSTREAM = Path("/tmp/upstream")
QUICK = ["--repeats", "1", "--bandwidth-mb", "16", "--json"]
NO_UPSTREAM = {"STARFLOW_UPSTREAM": ""}


def bench(*args, env=NO_UPSTREAM):
    res = runner.invoke(app, ["bench", *args], env=env)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_tiny_report_fields():
    result = bench("--config", "tiny", *QUICK)
    shape = FlowConfig(**NAMED["tiny"])
    assert result["tokens_per_sample"] == shape.latent_size**2
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    assert result["bandwidth"]["gb_per_s"] > 0
    assert result["params_bytes"] == sum(result["block_params_bytes"].values())
    runs = {r["sampler"]: r for r in result["runs"]}
    assert set(runs) == {"sequential", "jacobi"}
    for run in runs.values():
        assert run["seconds"] > 0 and run["first_call_seconds"] > 0 and len(run["all_seconds"]) == 1
        assert run["warm_traces"] == 0  # the first call's compiled steps are reused
        assert run["tokens_per_s"] == pytest.approx(result["tokens_per_sample"] / run["seconds"])
        assert run["peak_memory_bytes"] > 0 and run["rss_peak_bytes"] > run["peak_memory_bytes"]
        assert [b["block"] for b in run["blocks"]] == [1, 0]  # sampling order: deep block first
        assert [b["deep"] for b in run["blocks"]] == [True, False]
        assert sum(b["seconds"] for b in run["blocks"]) <= run["seconds"]
        for row in run["blocks"]:
            assert row["bytes_per_step"] == result["block_params_bytes"][str(row["block"])]
            assert row["bound_seconds"] > 0 and row["bandwidth_fraction"] > 0
            assert row["matmul_seconds"] > 0
        floor = run["matmul_floor"]
        assert floor["seconds"] == pytest.approx(sum(b["matmul_seconds"] for b in run["blocks"]))
        assert floor["fraction"] == pytest.approx(floor["seconds"] / run["seconds"])
        assert "upstream" not in run and "vs_upstream" not in floor
    assert all(b["steps"] == result["tokens_per_sample"] for b in runs["sequential"]["blocks"])
    jac = runs["jacobi"]["jacobi"]
    for row in runs["jacobi"]["blocks"]:
        per_block = jac["per_block"][str(row["block"])]
        assert per_block["chunks"] == 1  # 16 tokens fit in one 64-token chunk
        assert 1 <= per_block["total"] <= 32 and row["steps"] == per_block["total"]
        assert per_block["traces"] == 0  # the last (warm) run traced nothing
    assert runs["sequential"]["first_call_traces"] == 2 and runs["jacobi"]["first_call_traces"] == 2  # one per block
    assert result["auto_sampler"] == "sequential"  # on a CPU
    assert jac["total_iterations"] == sum(v["total"] for v in jac["per_block"].values())
    # One 16-token chunk per block: every iteration evaluates all 16 tokens.
    assert jac["token_evaluations"] == 16 * jac["total_iterations"]


def test_step_rows_count_each_iteration_of_each_chunk():
    config = FlowConfig(**NAMED["tiny"])  # 16 tokens per sample
    stats = JacobiStats(chunks=[ChunkRecord(0, 0, 8, 3, 0.0), ChunkRecord(0, 8, 8, 2, 0.0), ChunkRecord(1, 0, 4, 5, 0.0)])
    guided = {0: 1, 1: 2}  # guidance doubles the batch of the block that sees the text
    assert step_rows(config, {0: 16, 1: 16}, guided, stats) == {0: Counter({8: 5}), 1: Counter({8: 5})}
    assert step_rows(config, {1: 16}, guided, None) == {1: Counter({2: 16})}  # sequential: one token a step
    assert step_rows(config, {1: 4}, guided, None) == {1: Counter({8: 4})}  # a frame-local block: 4 sequences at once


def test_matmul_floor_times_the_step_layers_only():
    flow = build_flow(FlowConfig(**NAMED["tiny"]))
    block = flow.blocks[-1]  # the deep block, the one that sees the text
    assert "proj_txt" in dict(block.named_modules())  # runs once per sample, not per step
    assert all(layer is not block.proj_txt for layer in step_layers(block))
    assert len(step_layers(block)) == 2 + 4 * len(block.attn_blocks)  # in/out projections; qkv, proj, two MLP layers
    assert step_seconds(block, 8) > 0


def test_matmul_floor_counts_each_step_shape_as_often_as_it_runs(monkeypatch):
    from starflow_mlx.benchmarks import matmul_floor

    # Times vary run to run: the composition is checked with a stand-in clock, never with timings.
    monkeypatch.setattr(matmul_floor, "step_seconds", lambda block, rows: 0.5 * rows)
    assert block_floor(None, Counter({8: 3, 2: 5})) == 3 * 4.0 + 5 * 1.0


def test_window_schedule_reports_token_evaluations():
    result = bench("--config", "tiny", "--sampler", "jacobi", "--jacobi-schedule", "window", *QUICK)
    assert result["options"]["schedule"] == "window"
    jac = result["runs"][0]["jacobi"]
    assert 0 < jac["token_evaluations"] <= 16 * jac["total_iterations"]


def test_config_file_and_text_report(tmp_path):
    path = tmp_path / "config.json"
    FlowConfig(**{**NAMED["tiny"], "sos": False}).save(path)
    res = runner.invoke(app, ["bench", "--config", str(path), "--sampler", "sequential", "--repeats", "1",
                              "--bandwidth-mb", "16"], env=NO_UPSTREAM)
    assert res.exit_code == 0, res.output
    assert "sequential:" in res.stdout and "tokens/s" in res.stdout and "jacobi:" not in res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith("upstream: not compared (no upstream sources: pass --upstream")


@pytest.mark.parametrize("args, message", [
    (["--config", "nope"], "unknown config 'nope'"),
    (["--config", "tiny", "--sampler", "fast"], "unknown sampler 'fast'"),
    (["--config", "tiny", "--repeats", "0"], "at least 1"),
    (["--config", "tiny", "--jacobi-schedule", "fast"], "unknown Jacobi schedule 'fast'"),
    (["--config", "tiny", "--upstream", "/nonexistent"], "has no transformer_flow.py"),
    (["--config", "tiny", "--threshold", "nan"], "--threshold must be a number from 1e-12"),
    (["--config", "tiny", "--cfg", "nan"], "--cfg must be a number 0 or more"),
    (["--config", "tiny", "--seed", "-1"], "--seed must be 0 or more"),
    (["--config", "tiny", "--batch", "100000000"], "use --batch"),  # MLX crashed (SIGSEGV) allocating it
    (["--config", "tiny", "--bandwidth-mb", "100000000"], "use --bandwidth-mb"),
])
def test_bad_options_fail_in_one_line(args, message):
    res = runner.invoke(app, ["bench", *args], env=NO_UPSTREAM)
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1].startswith("error: ") and message in res.output


def test_jacobi_needs_sos(tmp_path):
    path = tmp_path / "config.json"
    FlowConfig(**{**NAMED["tiny"], "sos": False}).save(path)
    res = runner.invoke(app, ["bench", "--config", str(path)], env=NO_UPSTREAM)
    assert res.exit_code == 1 and "start-of-sequence" in res.output


@pytest.mark.skipif(not (UPSTREAM / "transformer_flow.py").is_file(),
                    reason="upstream side-by-side not run: no apple/ml-starflow checkout at /tmp/upstream "
                           "(clone it there to compare against upstream's PyTorch sampler)")
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (test extra)")
def test_side_by_side_with_upstream():
    result = bench("--config", "tiny", "--cfg", "1.5", *QUICK, env={"STARFLOW_UPSTREAM": str(UPSTREAM)})
    for run in result["runs"]:
        up = run["upstream"]
        assert up["match"], (run["sampler"], up["max_abs_diff"])
        assert up["max_abs_diff"] < 1e-4
        assert up["seconds"] > 0 and up["ratio"] == pytest.approx(run["seconds"] / up["seconds"])
        assert set(up["block_seconds"]) == {"0", "1"} and up["threads"] >= 1
        if run["mkl_threads"] is not None:  # torch gets the threads this sampler's products got
            assert up["threads"] == run["mkl_threads"]
        assert run["matmul_floor"]["vs_upstream"] == pytest.approx(run["matmul_floor"]["seconds"] / up["seconds"])
