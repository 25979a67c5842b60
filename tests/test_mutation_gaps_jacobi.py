"""Jacobi's chunk and window sizes on videos, from upstream's rule (gaps found by mutation testing).

upstream-format.md 4: a chunk is ``jacobi_block_size`` tokens, times 4 once its start is past the first video
frame. Every other Jacobi test compares the result with sequential decoding, which any chunk size reaches, so a
chunk that never grows, grows 5x, or grows only on videos of 3 frames or more passed them all. Here the chunks
are listed by hand. A threshold of 1e9 stops every chunk after its first iteration (and makes the window schedule
commit whole windows), so the list is the schedule alone.
"""

import mlx.core as mx
import numpy as np
import pytest

from flow_factory import VIDEO, flow_inputs, random_flow
from starflow_mlx.models.starflow import Layout
from starflow_mlx.sampling.jacobi import JacobiStats, invert_jacobi

FRAME = VIDEO["latent_size"] ** 2  # 4 tokens a latent frame


@pytest.fixture(scope="module")
def flow():
    return random_flow(**VIDEO)


def deep_chunks(flow, frames, schedule, block_size, threshold=1e9):
    z, y, y_u = flow_inputs(flow, batch=1, frames=frames)
    stats = JacobiStats()
    flow.reverse(z, y, y_uncond=y_u, cfg=1.0, jacobi=True, jacobi_block_size=block_size, jacobi_threshold=threshold,
                 jacobi_max_iter=8, jacobi_schedule=schedule, stats=stats)
    deep = flow.config.num_blocks - 1
    return [(c.start, c.size) for c in stats.chunks if c.block == deep], stats


@pytest.mark.parametrize("frames,expected", [
    # 12 tokens: starts 0..4 are not past the first frame (token 4 starts frame 1, but the chunk's first input is
    # token 3); from 5 on, chunks of 4 x 1.
    (3, [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 4), (9, 3)]),
    (2, [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 3)]),  # two frames are a video too
])
def test_chunks_grow_4x_past_the_first_frame(flow, frames, expected):
    chunks, stats = deep_chunks(flow, frames, "chunk", 1)
    assert chunks == expected
    # The frame-local shallow blocks solve every frame at once (frames are rows of the batch), each one frame long:
    # never past their first frame, chunks of 1.
    shallow = [(c.start, c.size) for c in stats.chunks if c.block == 0]
    assert shallow == [(0, 1), (1, 1), (2, 1), (3, 1)]


def test_windows_grow_4x_past_the_first_frame(flow):
    # Windows of 2 while they start in or at the end of the first frame (0, 2, 4), then of 8 (6 tokens left).
    chunks, _ = deep_chunks(flow, 3, "window", 2)
    assert chunks == [(0, 2), (2, 2), (4, 2), (6, 6)]


def reference_window(block, rope, z, y, block_size, max_iter, frame, init, prefix=None, threshold=0.0):
    """Upstream-style sliding window (jacobi.py's notes) on a video's deep block, threshold 0: a window commits its
    leading tokens that have taken part in ``max_iter`` iterations (at least its first), so which tokens are
    committed never depends on a residual (with ``threshold``, also those whose own residual is below it). (a, b) come from the block's full-sequence forward pass; as in
    test_ground_truth.reference_jacobi, positions before the window see the input they were last fed.
    ``xf`` is x_full = [sos; tokens]: position t is fed xf[t]. ``prefix``: known first tokens, kept as they are."""
    zz = np.array(z, np.float64)
    b_, n, c = zz.shape
    xf = np.concatenate([np.zeros((b_, 1, c)), zz], axis=1)  # row 0 stands for sos: never fed to forward
    start = 0 if prefix is None else prefix.shape[1]
    xf[:, 1:start + 1] = np.array(prefix, np.float64) if start else 0.0
    fed = xf.copy()
    rounds, guessed, windows = np.zeros(n, int), start + 1, []
    big = min(4 * block_size, n)
    while start < n:
        valid = min(block_size if start <= frame else big, n - start)
        end = start + valid
        lo = max(guessed, start + 1, frame + 1)  # tokens entering the window past the first frame get a first guess
        if lo <= end:
            xf[:, lo:end + 1] = xf[:, lo - frame:end + 1 - frame] if init == "previous" else 0.0
        guessed = max(guessed, end + 1)
        fed[:, start:end] = xf[:, start:end]
        seq = np.concatenate([fed[:, 1:end + 1], np.zeros((b_, n - end, c))], axis=1)  # seq[t - 1] feeds position t
        z_of, ld = block.forward(mx.array(seq.astype(np.float32)), y, rope, elementwise=True)
        a = np.exp(-np.array(ld, np.float64))
        b = seq - np.array(z_of, np.float64) * a
        new = b[:, start:end] + a[:, start:end] * zz[:, start:end]
        res = np.sum((new - xf[:, start + 1:end + 1]) ** 2, axis=(0, 2)) / np.sum(new**2, axis=(0, 2))  # each token's
        xf[:, start + 1:end + 1] = new
        rounds[start:end] += 1
        commit = next((i for i in range(1, valid) if res[i] >= threshold and rounds[start + i] < max_iter), valid)
        # A window reports its committed tokens' worst residual; each token's own residual is kept to show margins.
        windows.append((start, valid, res[:commit].max(), res))
        start += commit
    return xf[:, 1:], windows


@pytest.mark.parametrize("init", ["previous", "zero"])
@pytest.mark.parametrize("max_iter", [1, 2])
def test_window_schedule_matches_a_forward_pass_reference(init, max_iter):
    """With max_iter 1 or 2 the tokens are committed before they converge, so the output shows every first guess
    (the previous frame's token, or zero), every window size and every commit; sequential decoding reaches the
    same video from any of them, so comparing with it cannot."""
    flow = random_flow(seed=4, scale=0.1, **VIDEO)  # larger weights: one or two iterations are far from exact
    block = flow.blocks[-1]
    z, y, _ = flow_inputs(flow, batch=2, frames=3)
    layout = Layout(2, 3, 2, 2, VIDEO["in_channels"], False)
    seq = layout.to_sequence(z)
    stats = JacobiStats()
    out = invert_jacobi(flow, block, layout, seq, y, 0.0, block_size=2, threshold=0.0, max_iter=max_iter,
                        schedule="window", init=init, stats=stats, compile=False)
    expected, windows = reference_window(block, flow.rope(layout, VIDEO["txt_size"]), seq, y, 2, max_iter, FRAME, init)
    assert [(c.start, c.size) for c in stats.chunks] == [w[:2] for w in windows]
    # A residual is a ratio of squared changes: float32 rounding moves it by about 1e-5 relative, or 1e-7 absolute
    # where the change is below rounding.
    assert [c.residual for c in stats.chunks] == pytest.approx([w[2] for w in windows], rel=1e-3, abs=1e-6)
    # Cached steps against full forward passes: float32 roundings of values of order 1 (measured below 1e-6);
    # a wrong guess, window or commit moves tokens by 1e-2 or more.
    np.testing.assert_allclose(np.array(out), expected, rtol=0, atol=1e-5)
    exact = invert_jacobi(flow, block, layout, seq, y, 0.0, block_size=2, threshold=0.0, max_iter=64,
                          schedule="window", init=init, compile=False)
    assert np.abs(np.array(exact) - expected).max() > 1e-2  # the early commits are visible


def reference_chunks(block, rope, z, y, block_size, max_iter, check_every, threshold, frame, init):
    """upstream-format.md 4's chunks on a video's deep block, with this solver's cap (a chunk of k is exact after k
    iterations, k + 1 when its first iteration reads the previous frame) and ``check_every``. Same forward-pass
    model as reference_window. Returns the tokens and (start, size, iterations, residual) per chunk."""
    zz = np.array(z, np.float64)
    b_, n, c = zz.shape
    xf = np.concatenate([np.zeros((b_, 1, c)), zz], axis=1)
    fed = xf.copy()
    start, chunks = 0, []
    while start < n:
        valid = min(block_size if start <= frame else min(4 * block_size, n), n - start)
        end = start + valid
        shifted = start > frame and init == "previous"
        if start > frame and init == "zero":
            xf[:, start + 1:end] = 0.0  # the chunk's own inputs; its first token's input is final
        cap = min(max_iter, valid + shifted)
        for it in range(cap):
            lo = start - frame if it == 0 and shifted else start  # warm start: the same span one frame earlier
            fed[:, start:end] = xf[:, lo:lo + valid]
            seq = np.concatenate([fed[:, 1:end + 1], np.zeros((b_, n - end, c))], axis=1)
            z_of, ld = block.forward(mx.array(seq.astype(np.float32)), y, rope, elementwise=True)
            a = np.exp(-np.array(ld, np.float64))
            b = seq - np.array(z_of, np.float64) * a
            new = b[:, start:end] + a[:, start:end] * zz[:, start:end]
            residual = np.mean((new - xf[:, start + 1:end + 1]) ** 2) / np.mean(new**2)
            xf[:, start + 1:end + 1] = new
            if (it == cap - 1 or (it + 1) % check_every == 0) and residual < threshold:
                break
        chunks.append((start, valid, it + 1, residual))
        start = end
    return xf[:, 1:], chunks


@pytest.mark.parametrize("init,threshold,max_iter,check_every,frames", [
    ("previous", 0.0, 2, 1, 3),  # two iterations a chunk, far from exact: shows the warm start
    ("zero", 0.0, 2, 1, 3),
    ("zero", 0.0, 2, 1, 2),  # the last chunk is 2 tokens: its second token's input is zeroed too
    ("previous", 1e9, 8, 3, 3),  # stops at the first check, after 3 iterations (2 where the cap comes first)
    ("zero", 0.0, 8, 1, 3),  # stopped by the cap alone: exact
])
def test_chunk_schedule_matches_a_forward_pass_reference(init, threshold, max_iter, check_every, frames):
    flow = random_flow(seed=4, scale=0.1, **VIDEO)
    block = flow.blocks[-1]
    z, y, _ = flow_inputs(flow, batch=2, frames=frames)
    layout = Layout(2, frames, 2, 2, VIDEO["in_channels"], False)
    seq = layout.to_sequence(z)
    stats = JacobiStats()
    out = invert_jacobi(flow, block, layout, seq, y, 0.0, block_size=2, threshold=threshold, max_iter=max_iter,
                        check_every=check_every, init=init, stats=stats, compile=False)
    expected, chunks = reference_chunks(block, flow.rope(layout, VIDEO["txt_size"]), seq, y, 2, max_iter, check_every,
                                        threshold, FRAME, init)
    assert [(c.start, c.size, c.iterations) for c in stats.chunks] == [ch[:3] for ch in chunks]
    assert [c.residual for c in stats.chunks] == pytest.approx([ch[3] for ch in chunks], rel=1e-3, abs=1e-6)
    np.testing.assert_allclose(np.array(out), expected, rtol=0, atol=1e-5)  # as in the window test


@pytest.mark.parametrize("schedule", ["chunk", "window"])
def test_a_context_longer_than_the_window_keeps_only_its_last_context_frames(schedule):
    """Frames 0-2 given, 5 in all, a window of 3 (the training length): the cache cannot hold the context and a
    new frame, so it starts from the last ``context_frames`` given frame, at position 0. Frames 3 and 4 are then
    those of a fresh 3-frame video whose given frame is frame 2."""
    flow = random_flow(seed=4, scale=0.1, **VIDEO)
    assert flow.config.num_frames == 3
    block = flow.blocks[-1]
    z, y, _ = flow_inputs(flow, batch=1, frames=5)
    long_layout, short_layout = Layout(1, 5, 2, 2, VIDEO["in_channels"], False), Layout(1, 3, 2, 2, VIDEO["in_channels"], False)
    seq = long_layout.to_sequence(z)
    given = seq[:, :3 * FRAME] * 0.5
    options = dict(block_size=2, threshold=1e-12, max_iter=64, schedule=schedule, compile=False)
    stats = JacobiStats()
    long = invert_jacobi(flow, block, long_layout, seq, y, 0.0, prefix=given, context_frames=1, stats=stats, **options)
    short = invert_jacobi(flow, block, short_layout, seq[:, 2 * FRAME:], y, 0.0, prefix=given[:, 2 * FRAME:], **options)
    np.testing.assert_array_equal(np.array(long[:, :3 * FRAME]), np.array(given))  # given frames come back as given
    # Both converge to the same fixed point from the same inputs; float32 roundings (measured below 1e-6).
    np.testing.assert_allclose(np.array(long[:, 3 * FRAME:]), np.array(short[:, FRAME:]), rtol=0, atol=1e-5)
    assert stats.reencodes == 0  # the context was encoded that way from the start: no restart


def test_the_adaptive_stop_reads_each_chunks_previous_residual(monkeypatch):
    """The adaptive schedule stops a chunk by :func:`converged` on its last two residuals (the contraction between
    them estimates the error still to go); the chunk schedule by upstream's rule alone, never calling it."""
    import starflow_mlx.sampling.jacobi as jacobi

    calls = []

    def recording(residual, previous, threshold):
        calls.append((residual, previous))
        return jacobi_converged(residual, previous, threshold)

    jacobi_converged = jacobi.converged
    monkeypatch.setattr(jacobi, "converged", recording)
    flow = random_flow(seed=4, scale=0.1, **VIDEO)
    z, y, y_u = flow_inputs(flow, batch=1, frames=3)
    options = dict(y_uncond=y_u, cfg=1.0, jacobi=True, jacobi_block_size=4, jacobi_threshold=1e-6, jacobi_max_iter=32)
    flow.reverse(z, y, jacobi_schedule="chunk", **options)
    assert calls == []
    flow.reverse(z, y, jacobi_schedule="adaptive", **options)
    firsts = [i for i, (_, previous) in enumerate(calls) if previous is None]  # a chunk's first check
    assert firsts and firsts[0] == 0 and len(firsts) < len(calls)
    for i, (_, previous) in enumerate(calls):
        if previous is not None:
            assert previous == calls[i - 1][0]  # the same chunk's check just before


@pytest.mark.parametrize("index,frames,local_window,num_frames,expected", [
    (2, 5, None, 3, 3),  # the deep block of a video past its training length: a window of the training length
    (2, 3, None, 3, None),  # at the training length: attends to every frame
    (2, 2, None, 3, None),
    (1, 5, None, 3, None),  # shallow blocks are frame-local: never a window
    (0, 5, 4, 3, None),
    (2, 0, None, 3, None),  # an image
    (2, 0, 4, None, None),
    (2, 5, 4, 3, 4),  # the config's own local window comes first
    (2, 4, 4, 3, None),  # ... once the video is longer than it
    (2, 9, None, None, None),  # no training length known: no window
])
def test_attention_window_rule(index, frames, local_window, num_frames, expected):
    from types import SimpleNamespace

    from starflow_mlx.sampling.jacobi import attention_window

    model = SimpleNamespace(config=SimpleNamespace(num_blocks=3, local_attn_window=local_window, num_frames=num_frames))
    assert attention_window(model, SimpleNamespace(index=index), SimpleNamespace(frames=frames)) == expected


def test_window_residuals_are_relative_for_tokens_below_one():
    """A token's residual is its squared change over its squared size, also where that size is below 1 (weights and
    noise scaled down: every token's squared norm here is 0.002 to 0.11), not the bare change."""
    flow = random_flow(seed=4, scale=0.01, **VIDEO)
    block = flow.blocks[-1]
    z, y, _ = flow_inputs(flow, batch=1, frames=3)
    layout = Layout(1, 3, 2, 2, VIDEO["in_channels"], False)
    seq = layout.to_sequence(z) * 0.1
    stats = JacobiStats()
    out = invert_jacobi(flow, block, layout, seq, y, 0.0, block_size=2, threshold=0.0, max_iter=2, schedule="window",
                        stats=stats, compile=False)
    expected, windows = reference_window(block, flow.rope(layout, VIDEO["txt_size"]), seq, y, 2, 2, FRAME, "previous")
    assert np.sum(expected**2, axis=(0, 2)).max() < 0.2
    assert [c.residual for c in stats.chunks] == pytest.approx([w[2] for w in windows], rel=1e-3, abs=1e-6)
    np.testing.assert_allclose(np.array(out), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("window,given,expected", [(20, None, 16), (5, None, 4), (2, None, 1), (5, 1, 1), (5, 4, 4),
                                                   (5, 0, None), (5, 5, None), (5, -1, None)])
def test_window_context_default_and_bounds(window, given, expected):
    from starflow_mlx.sampling.jacobi import window_context

    if expected is None:
        with pytest.raises(ValueError, match=f"^context frames must be between 1 and {window - 1}$"):
            window_context(window, given)
    else:
        assert window_context(window, given) == expected  # upstream's default: 16, or all but one frame


@pytest.mark.parametrize("residual,previous,threshold,expected", [
    (1e-3, None, 1e-3, False),  # upstream's rule first: not below the threshold
    (1e-4, None, 1e-3, True),  # a chunk's first check: upstream's rule alone
    (1e-4, 0.0, 1e-3, True),  # no change before: nothing to extrapolate
    # rho = sqrt(1e-4 / 1.6e-4) = 0.79: error still to go 1e-4 * (0.79 / 0.21)^2 = 1.42e-3.
    (1e-4, 1.6e-4, 2e-4, False),
    (1e-4, 1.6e-4, 1.4e-3, False),
    (1e-4, 1.6e-4, 1.5e-3, True),
    # rho = 1 is capped at 0.99: 1e-4 * 99^2 = 0.98.
    (1e-4, 1e-4, 1e-3, False),
    (1e-4, 1e-4, 0.99, True),
])
def test_converged_by_hand(residual, previous, threshold, expected):
    from starflow_mlx.sampling.jacobi import converged

    assert converged(residual, previous, threshold) is expected


def test_chunk_sizer_edges():
    from starflow_mlx.sampling.jacobi import ChunkSizer

    assert ChunkSizer(2).size(16) == 1 and ChunkSizer(6).size(16) == 1 and ChunkSizer(64).size(100) == 16
    sizer = ChunkSizer(64)
    sizer.update(4, 2)  # 2 iterations for 4 tokens: no more than half, and fast: doubles
    assert sizer.size(64) == 8
    sizer.update(8, 4)  # exactly half, but 4 > max(3, 8 // 4): stays
    assert sizer.size(64) == 8
    sizer.update(16, 4)  # 4 <= 16 // 4: doubles
    assert sizer.size(64) == 32
    sizer.update(2, 2)  # more than half: halves from the chunk's own size
    assert sizer.size(64) == 1
    for _ in range(ChunkSizer.PROBE):
        sizer.update(1, 1)
    assert sizer.size(64) == 4  # probes back after PROBE single steps
    sizer.update(4, 4)
    sizer.update(2, 2)
    for _ in range(ChunkSizer.PROBE - 1):
        sizer.update(1, 1)
    assert sizer.size(64) == 1  # the count of single steps started again at zero


def test_stats_totals():
    from starflow_mlx.sampling.jacobi import ChunkRecord

    stats = JacobiStats(chunks=[ChunkRecord(0, 0, 4, 2, 0.1), ChunkRecord(1, 0, 3, 4, 0.1), ChunkRecord(0, 4, 2, 1, 0.1)])
    assert stats.iterations() == 7 and stats.iterations(0) == 3 and stats.iterations(1) == 4
    assert stats.token_evaluations() == 22 and stats.token_evaluations(0) == 10 and stats.token_evaluations(2) == 0


def test_defaults_are_upstreams(monkeypatch):
    """upstream-format.md 4: block size 64, threshold 0.005, 32 iterations; upstream's chunks, warm start, a check
    every iteration, and the step compiled. ``flow.reverse`` passes its own (the same) values, so only direct
    callers see these. 81 tokens: a chunk of 64, then 17."""
    from flow_factory import IMAGE

    from starflow_mlx.sampling import jacobi

    flow = random_flow(**{**IMAGE, "latent_size": 9})
    block = flow.blocks[-1]
    z, y, _ = flow_inputs(flow, batch=1)
    layout = Layout(1, 0, 9, 9, IMAGE["in_channels"], False)
    seq = layout.to_sequence(z)
    defaults, upstream = JacobiStats(), JacobiStats()
    invert_jacobi(flow, block, layout, seq, y, 0.0, stats=defaults)
    invert_jacobi(flow, block, layout, seq, y, 0.0, stats=upstream, block_size=64, threshold=0.005, max_iter=32,
                  check_every=1, schedule="chunk", init="previous")
    chunks = [(c.start, c.size, c.iterations) for c in defaults.chunks]
    assert chunks == [(c.start, c.size, c.iterations) for c in upstream.chunks]
    # Stopped by the threshold (more than one iteration, fewer than the cap) after an odd count, which a check
    # every second iteration would not see.
    assert [c[:2] for c in chunks] == [(0, 64), (64, 17)] and all(1 < c[2] < 17 and c[2] % 2 for c in chunks)
    assert 0 < defaults.traces[block.index] < defaults.iterations()  # compiled: traced once per shape, not per step

    class NeverConverges(jacobi.ChunkStepper):  # a block that contracts too slowly: only the cap stops a chunk
        def __call__(self, *args):
            new, _, per_token = super().__call__(*args)
            return new, mx.array(1.0), per_token

    monkeypatch.setattr(jacobi, "ChunkStepper", NeverConverges)
    capped = JacobiStats()
    invert_jacobi(flow, block, layout, seq, y, 0.0, stats=capped)
    assert [(c.size, c.iterations) for c in capped.chunks] == [(64, 32), (17, 17)]


@pytest.mark.parametrize("sos,options,message", [
    (False, {}, "Jacobi sampling needs a start-of-sequence token"),
    (True, dict(block_size=0), "jacobi block size, max iterations and check interval must be positive"),
    (True, dict(max_iter=0), "jacobi block size, max iterations and check interval must be positive"),
    (True, dict(check_every=0), "jacobi block size, max iterations and check interval must be positive"),
    (True, dict(schedule="fast"), "unknown Jacobi schedule 'fast': use chunk or window or adaptive"),
    (True, dict(init="noise"), "unknown Jacobi first guess 'noise': use previous or zero"),
])
def test_argument_checks_each_alone_with_their_exact_line(sos, options, message):
    """Each bad value alone is refused (not only with another one), before anything is computed, with its line."""
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=f"^{message}$"):
        invert_jacobi(None, SimpleNamespace(use_sos=sos), None, None, None, 0.0, **options)


def window_reports(windows, n):
    """What the window schedule reports after each window: (tokens final, n, iterations the last of them took part
    in, the committed tokens' worst residual), from the reference's windows."""
    rounds, reports = np.zeros(n, int), []
    for i, (start, size, worst, _) in enumerate(windows):
        rounds[start:start + size] += 1
        done = windows[i + 1][0] if i + 1 < len(windows) else n
        reports.append((done, n, rounds[done - 1], worst))
    return reports


@pytest.mark.parametrize("hook", [False, True])
@pytest.mark.parametrize("schedule", ["chunk", "window"])
def test_progress_reports_match_a_forward_pass_reference(schedule, hook):
    """``on_chunk(done, total, iterations=, residual=)`` (the progress line's "3 it, residual 1.0e-03") after every
    chunk or window, from the same references as the schedules above; the same with a frame hook (which passes
    them on), whose frames are the reference's."""
    flow = random_flow(seed=4, scale=0.1, **VIDEO)
    block = flow.blocks[-1]
    z, y, _ = flow_inputs(flow, batch=2, frames=3)
    layout = Layout(2, 3, 2, 2, VIDEO["in_channels"], False)
    seq = layout.to_sequence(z)
    n = seq.shape[1]
    calls, frames = [], []
    on_frame = (lambda t, tokens: frames.append((t, np.array(tokens)))) if hook else None
    invert_jacobi(flow, block, layout, seq, y, 0.0, block_size=2, threshold=0.0, max_iter=2, schedule=schedule,
                  compile=False, on_chunk=lambda done, total, **info: calls.append((done, total, info)),
                  on_frame=on_frame)
    rope = flow.rope(layout, VIDEO["txt_size"])
    if schedule == "chunk":
        tokens, chunks = reference_chunks(block, rope, seq, y, 2, 2, 1, 0.0, FRAME, "previous")
        expected = [(start + size, n, its, res) for start, size, its, res in chunks]
    else:
        tokens, windows = reference_window(block, rope, seq, y, 2, 2, FRAME, "previous")
        expected = window_reports(windows, n)
    assert [(d, t, info["iterations"]) for d, t, info in calls] == [e[:3] for e in expected]
    assert [info["residual"] for *_, info in calls] == pytest.approx([e[3] for e in expected], rel=1e-3, abs=1e-6)
    if hook:
        assert [t for t, _ in frames] == [0, 1, 2]
        for t, got in frames:
            np.testing.assert_allclose(got, tokens[:, t * FRAME:(t + 1) * FRAME], rtol=0, atol=1e-5)


def test_window_schedule_after_known_frames_matches_a_forward_pass_reference():
    """Frame 0 known: the window starts at token 4, past the first frame, so its tokens (the first unknown one
    included) start from the previous frame's; two iterations a token keep those guesses visible."""
    flow = random_flow(seed=4, scale=0.1, **VIDEO)
    block = flow.blocks[-1]
    z, y, _ = flow_inputs(flow, batch=2, frames=3)
    layout = Layout(2, 3, 2, 2, VIDEO["in_channels"], False)
    seq = layout.to_sequence(z)
    given = seq[:, :FRAME] * 0.5
    stats = JacobiStats()
    out = invert_jacobi(flow, block, layout, seq, y, 0.0, prefix=given, block_size=2, threshold=0.0, max_iter=2,
                        schedule="window", stats=stats, compile=False)
    expected, windows = reference_window(block, flow.rope(layout, VIDEO["txt_size"]), seq, y, 2, 2, FRAME,
                                         "previous", prefix=given)
    assert [(c.start, c.size) for c in stats.chunks] == [w[:2] for w in windows] and windows[0][0] == FRAME
    np.testing.assert_allclose(np.array(out), expected, rtol=0, atol=1e-5)  # as in the window test


@pytest.mark.parametrize("known", [0, 2, 3 * FRAME])
def test_context_must_be_whole_frames_and_shorter_than_the_video(known):
    """No known token, part of a frame, or the whole video: refused with the line that says which."""
    flow = random_flow(**VIDEO)
    z, y, _ = flow_inputs(flow, batch=1, frames=3)
    layout = Layout(1, 3, 2, 2, VIDEO["in_channels"], False)
    seq = layout.to_sequence(z)
    with pytest.raises(ValueError, match=rf"^context must be whole frames and shorter than the video, got {known} of "
                                         rf"{3 * FRAME} tokens$"):
        invert_jacobi(flow, flow.blocks[-1], layout, seq, y, 0.0, prefix=seq[:, :known], compile=False)


@pytest.mark.parametrize("scale,sizes", [(0.01, [4, 8, 4]), (0.03, [4, 2] + [1] * 8 + [2])])
def test_adaptive_chunks_are_sized_from_the_iterations_the_last_one_took(scale, sizes):
    """Each chunk's size is ChunkSizer's answer after the block's previous chunks (their sizes and iterations),
    never past the tokens left: small weights converge in 2 iterations and the chunks double (up to the 4 tokens
    left); larger ones take 3 for 4 tokens, and the chunks halve down to single steps, then probe with 2."""
    from flow_factory import IMAGE

    from starflow_mlx.sampling.jacobi import ChunkSizer

    flow = random_flow(seed=4, scale=scale, **IMAGE)
    z, y, y_u = flow_inputs(flow, batch=1)
    stats = JacobiStats()
    flow.reverse(z, y, y_uncond=y_u, cfg=1.0, jacobi=True, jacobi_schedule="adaptive", jacobi_block_size=16,
                 jacobi_threshold=1e-3, jacobi_max_iter=32, stats=stats)
    n = IMAGE["latent_size"] ** 2
    blocks = sorted({c.block for c in stats.chunks})
    assert len(blocks) == 3
    for b in blocks:
        chunks = [c for c in stats.chunks if c.block == b]
        assert [c.size for c in chunks] == sizes
        sizer, start = ChunkSizer(16), 0
        for c in chunks:
            assert (c.start, c.size) == (start, min(sizer.size(16), n - start))
            sizer.update(c.size, c.iterations)
            start += c.size


def test_one_known_frame_of_one_token_with_guidance_not_above_one():
    """Frames of one token (a 1x1 latent): one known token is a whole frame. With guidance 1.0 and two samples the
    known tokens are doubled for the unguided half as for any positive scale. Jacobi to convergence equals
    sequential decoding from the same known frame (sampling/sequential.py, its own prefix rule)."""
    from starflow_mlx.sampling.sequential import invert_sequential

    flow = random_flow(**{**VIDEO, "latent_size": 1})
    block = flow.blocks[-1]
    z, y, y_u = flow_inputs(flow, batch=2, frames=3)
    layout = Layout(2, 3, 1, 1, VIDEO["in_channels"], False)
    seq, text = layout.to_sequence(z), mx.concatenate([y, y_u])
    given = seq[:, :1] * 0.5
    out = invert_jacobi(flow, block, layout, seq, text, 1.0, prefix=given, block_size=2, threshold=1e-12,
                        max_iter=64, compile=False)
    cos, sin = flow.rope(layout, VIDEO["txt_size"])
    expected = invert_sequential(block, seq, text, cos, sin, 1.0, prefix=given, frame_size=1)
    np.testing.assert_array_equal(np.array(out[:, :1]), np.array(given))
    np.testing.assert_allclose(np.array(out), np.array(expected), rtol=0, atol=1e-5)


def test_window_commits_by_residual_match_a_forward_pass_reference():
    """With a threshold the window commits its leading tokens whose own residual is below it, so every residual
    counts, that of a token entering the window at its last position too (measured against its first guess, the
    previous frame's token, not the noise it stood for: here that changes which tokens the windows commit). Two
    frames are a video too: past the first frame, tokens start from the previous frame."""
    flow = random_flow(seed=4, scale=0.1, **VIDEO)
    block = flow.blocks[-1]
    z, y, _ = flow_inputs(flow, batch=2, frames=2)
    layout = Layout(2, 2, 2, 2, VIDEO["in_channels"], False)
    seq = layout.to_sequence(z)
    threshold = 0.5
    stats = JacobiStats()
    out = invert_jacobi(flow, block, layout, seq, y, 0.0, block_size=2, threshold=threshold, max_iter=4,
                        schedule="window", stats=stats, compile=False)
    expected, windows = reference_window(block, flow.rope(layout, VIDEO["txt_size"]), seq, y, 2, 4, FRAME,
                                         "previous", threshold=threshold)
    residuals = np.concatenate([w[3] for w in windows])
    assert np.abs(np.log(residuals / threshold)).min() > 0.03  # none so close to the threshold that rounding decides
    assert [(c.start, c.size) for c in stats.chunks] == [w[:2] for w in windows]
    assert [c.residual for c in stats.chunks] == pytest.approx([w[2] for w in windows], rel=1e-3, abs=1e-6)
    np.testing.assert_allclose(np.array(out), expected, rtol=0, atol=1e-5)


def test_trace_counts_add_up_over_calls_sharing_the_stats():
    """``stats.traces[block]``: the compiled-step traces of the calls that filled ``stats``, added up (a frame-local
    block is inverted once per frame), not counting those of earlier calls. A new guidance scale traces the guided
    block again."""
    from flow_factory import IMAGE

    from starflow_mlx.sampling.stepper import compiled_steps

    flow = random_flow(**IMAGE)
    z, y, y_u = flow_inputs(flow)
    blocks = [b for b in flow.blocks if not b.is_identity]
    options = dict(y_uncond=y_u, jacobi=True, jacobi_block_size=3)
    flow.reverse(z, y, cfg=1.0, **options)  # traced before: not this run's
    before = {b.index: compiled_steps(b).traces for b in blocks}
    assert all(before.values())
    stats = JacobiStats()
    flow.reverse(z, y, cfg=1.5, stats=stats, **options)
    first = dict(stats.traces)
    flow.reverse(z, y, cfg=2.0, stats=stats, **options)
    assert stats.traces == {b.index: compiled_steps(b).traces - before[b.index] for b in blocks}
    # The deep block is the only guided one (cond_top_only); the others run unguided and reuse the first call's.
    deep = flow.blocks[-1].index
    assert all(first[i] == stats.traces[i] == 0 for i in first if i != deep) and 0 < first[deep] < stats.traces[deep]


def test_every_window_is_padded_to_one_shape():
    """Threshold 0: the window moves one token an iteration and shrinks at the end (3, 2, 1 tokens left); padded
    to the block size, its steps share a trace wherever the keys they may read round up to the same length."""
    from flow_factory import IMAGE

    from starflow_mlx.models.kv_cache import visible_length

    flow = random_flow(**IMAGE)
    block = flow.blocks[-1]
    z, y, _ = flow_inputs(flow, batch=1)
    layout = Layout(1, 0, 4, 4, IMAGE["in_channels"], False)
    stats = JacobiStats()
    invert_jacobi(flow, block, layout, layout.to_sequence(z), y, 0.0, block_size=4, threshold=0.0, max_iter=64,
                  schedule="window", stats=stats)
    assert [(c.start, c.size) for c in stats.chunks][-4:] == [(12, 4), (13, 3), (14, 2), (15, 1)]
    text = IMAGE["txt_size"]
    assert stats.traces[block.index] == len({visible_length(text + c.start + 4, text + 16 + 4) for c in stats.chunks})


def test_without_compile_every_step_runs_the_python_step():
    """``compile=False`` (for debugging the step): nothing is compiled, so every step is a trace of its own."""
    from flow_factory import IMAGE

    flow = random_flow(**IMAGE)
    z, y, _ = flow_inputs(flow, batch=1)
    layout = Layout(1, 0, 4, 4, IMAGE["in_channels"], False)
    stats = JacobiStats()
    invert_jacobi(flow, flow.blocks[-1], layout, layout.to_sequence(z), y, 0.0, block_size=4, stats=stats,
                  compile=False)
    assert stats.traces[flow.blocks[-1].index] == stats.iterations() > len(stats.chunks)


def test_a_block_that_does_not_see_the_text_ignores_it():
    """cond_top_only: the first inverted shallow block has no text. Given text anyway, it solves the same equations
    as sequential decoding without text (no text positions in its cache or RoPE)."""
    from flow_factory import IMAGE

    from starflow_mlx.sampling.sequential import invert_sequential

    flow = random_flow(**IMAGE)
    block = flow.blocks[0]
    assert not block.sees_text
    z, y, _ = flow_inputs(flow, batch=1)
    layout = Layout(1, 0, 4, 4, IMAGE["in_channels"], False)
    seq = layout.to_sequence(z)
    out = invert_jacobi(flow, block, layout, seq, y, 0.0, block_size=4, threshold=1e-12, max_iter=64, compile=False)
    cos, sin = flow.rope(layout, 0)
    np.testing.assert_allclose(np.array(out), np.array(invert_sequential(block, seq, None, cos, sin)), rtol=0,
                               atol=1e-5)
