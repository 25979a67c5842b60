"""Block-wise Jacobi inversion: solve a chunk of tokens in parallel by fixed-point iteration.

Follows upstream's rules: the chunk grows 4x once past the first video frame,
the first iteration of such a chunk starts from the previous frame's tokens,
the residual is ``mean((new - old)^2) / mean(new^2)`` over the batch, and the
chunk stops at the threshold or at ``max_iter``. Differences that make it run
well on a GPU: every chunk has one fixed shape (the last one is padded), the
step is compiled once per chunk size, the cache is preallocated and rewound by
position, and the host only reads the residual (every ``check_every`` iterations).
A chunk of ``k`` tokens also stops after ``k`` iterations (``k + 1`` when its
first iteration reads the previous frame): every token is then exact, since its
inputs are, so iterating on only repeats it.

Past the training length of a video, the deep block keeps a window of frames:
when it is full, the cache restarts with the text and the last context frames
re-encoded, and generation goes on.

``schedule="window"`` replaces upstream's chunks by a sliding window: every
iteration evaluates ``block_size`` tokens from the first uncommitted one, the
leading tokens whose own residual is below the threshold (at least the first,
whose inputs are all final, so it is exact) are committed, and the window moves
past them, so no iteration is spent on tokens that have already converged. The
cache is rewound to the window's start every iteration, as for a chunk.

``schedule="adaptive"`` sizes each block's chunks from the iterations its last
chunk took (:class:`ChunkSizer`: doubling where a block converges fast, halving
down to sequential steps where it barely converges) and stops a chunk only when
the error still to go, estimated from the contraction of its residuals, is below
the threshold too (:func:`converged`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from starflow_mlx.models.tarflow import MetaBlock
from starflow_mlx.sampling.frames import FrameHook
from starflow_mlx.sampling.stepper import ChunkStepper, compiled_steps


SCHEDULES = ("chunk", "window", "adaptive")
INITS = ("previous", "zero")  # first guess for tokens past the first video frame


class ChunkSizer:
    """Chunk sizes of one block under the adaptive schedule, from the iterations its chunks took.

    A chunk of ``s`` tokens that took ``k`` iterations finalised ``s / k`` tokens per
    host round-trip at ``k`` evaluations per token. When ``k`` is small (the shallow
    blocks here take 3-4 iterations at any size) the next chunk doubles: fewer
    round-trips at the same evaluations per token. When ``k > s / 2`` Jacobi gains
    little over sequential decoding at ``k`` times its work (the first inverted
    block here): the next chunk halves, down to one token, a sequential step that
    is exact in one iteration. After ``PROBE`` single-token steps a chunk of 4
    checks whether the block has become easier.
    """

    PROBE = 8

    def __init__(self, block_size: int):
        self.largest = block_size
        self.current = max(1, block_size // 4)
        self.singles = 0

    def size(self, limit: int) -> int:
        return min(self.current, limit)

    def update(self, size: int, iterations: int) -> None:
        if size == 1:
            self.singles += 1
            if self.singles >= self.PROBE:
                self.current, self.singles = min(4, self.largest), 0
        elif 2 * iterations > size:
            self.current = max(1, size // 2)
        elif iterations <= max(3, size // 4):
            self.current = min(self.largest, size * 2)


def converged(residual: float, previous: float | None, threshold: float) -> bool:
    """The adaptive schedule's stop: upstream's rule, and the remaining error below the threshold too.

    Residuals are squared relative changes, so successive ones give the contraction
    ``rho = sqrt(r_k / r_(k-1))`` and the distance still to go is about
    ``sqrt(r_k) * rho / (1 - rho)``. Where a block converges slowly (``rho > 1/2``)
    that distance exceeds the last change, and upstream's rule stops with the
    error still far above its threshold; there the iterations go on.
    """
    if residual >= threshold:
        return False
    if previous is None or previous <= 0:
        return True
    rho = min((residual / previous) ** 0.5, 0.99)
    return residual * (rho / (1 - rho)) ** 2 < threshold


@dataclass
class ChunkRecord:
    block: int
    start: int
    size: int
    iterations: int
    residual: float


@dataclass
class JacobiStats:
    """Per-chunk iterations and final residuals of one sampling run."""

    chunks: list[ChunkRecord] = field(default_factory=list)
    traces: dict[int, int] = field(default_factory=dict)  # block index -> compiled-step traces in this run
    reencodes: int = 0

    def iterations(self, block: int | None = None) -> int:
        """Host round-trips (sequential steps of the solver)."""
        return sum(c.iterations for c in self.chunks if block is None or c.block == block)

    def token_evaluations(self, block: int | None = None) -> int:
        """Tokens run through the block, padding rows not counted."""
        return sum(c.size * c.iterations for c in self.chunks if block is None or c.block == block)


def attention_window(model, block: MetaBlock, layout) -> int | None:
    """Frames the deep block may attend to, when sampling must use a local window."""
    cfg = model.config
    if block.index != cfg.num_blocks - 1 or not layout.frames:
        return None
    if cfg.local_attn_window:
        return cfg.local_attn_window if layout.frames > cfg.local_attn_window else None
    if cfg.num_frames and layout.frames > cfg.num_frames:
        return cfg.num_frames
    return None


def window_context(window: int, context_frames: int | None) -> int:
    """Frames re-encoded when the window slides: ``context_frames``, or upstream's default, checked."""
    context_frames = min(16, window - 1) if context_frames is None else context_frames
    if not 0 < context_frames < window:
        raise ValueError(f"context frames must be between 1 and {window - 1}")
    return context_frames


def invert_jacobi(
    model,
    block: MetaBlock,
    layout,
    z: mx.array,
    y: mx.array | None,
    cfg: float,
    *,
    block_size: int = 64,
    threshold: float = 0.005,
    max_iter: int = 32,
    check_every: int = 1,
    context_frames: int | None = None,
    prefix: mx.array | None = None,
    stats: JacobiStats | None = None,
    on_chunk: Callable[..., None] | None = None,
    compile: bool = True,
    schedule: str = "chunk",
    kv_bits: int | None = None,
    on_frame: Callable[[int, mx.array], None] | None = None,
    init: str = "previous",
) -> mx.array:
    """Invert ``block`` on ``z`` (B, N, c) in its token order; ``y`` stacks [cond; uncond] when ``cfg > 0``.

    ``schedule``: ``"chunk"`` (upstream's), ``"window"`` (see the module notes; it reads the
    residuals every iteration, so ``check_every`` does not apply, and ``max_iter`` bounds the
    iterations each token takes part in) or ``"adaptive"`` (chunk sizes up to ``block_size``
    from each block's measured convergence). ``prefix`` (B, P, c): tokens already known (the
    conditioning frames of image- or video-to-video); they are encoded into the cache as
    context, kept as they are in the output, and sampling continues after them (the matching
    rows of ``z`` are ignored). ``kv_bits`` (8, 4) stores the KV cache quantized. ``on_frame(t, tokens)``
    is called as each video frame of the deep block becomes final, known ones included (see
    :class:`FrameHook`). ``init``: the first guess for tokens past the first video frame, the same
    tokens of the previous frame (``"previous"``, upstream's) or zeros (``"zero"``).
    """
    if not block.use_sos:
        raise ValueError("Jacobi sampling needs a start-of-sequence token")
    if block_size < 1 or max_iter < 1 or check_every < 1:
        raise ValueError("jacobi block size, max iterations and check interval must be positive")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown Jacobi schedule {schedule!r}: use {' or '.join(SCHEDULES)}")
    if init not in INITS:
        raise ValueError(f"unknown Jacobi first guess {init!r}: use {' or '.join(INITS)}")
    zz = mx.concatenate([z, z], axis=0) if cfg > 0 else z
    batch, n, c = zz.shape
    text_len = y.shape[1] if (block.sees_text and y is not None) else 0
    frame = layout.frame_size if layout.seq_frames > 1 else n
    # A chunk longer than the sequence is the whole sequence: capped, a huge block size cannot size the cache.
    block_size = min(block_size, n)
    big = min(4 * block_size, n) if layout.seq_frames > 1 else block_size
    window = attention_window(model, block, layout)
    span = n if window is None else min(n, window * frame)
    if window is not None:
        context_frames = window_context(window, context_frames)
    pad = big
    cos, sin = model.rope(layout, text_len, pad=pad)
    cache = block.new_cache(batch, text_len + span + pad, kv_bits)
    steppers: dict[int, ChunkStepper] = {}
    traced_before = compiled_steps(block).traces

    def stepper(size: int) -> ChunkStepper:
        if size not in steppers:
            steppers[size] = ChunkStepper(block, cache, cos, sin, cfg, compile=compile)
        return steppers[size]

    def padded(a: mx.array, size: int) -> mx.array:
        short = size - a.shape[1]
        return a if short == 0 else mx.concatenate([a, mx.zeros((a.shape[0], short, c), a.dtype)], axis=1)

    def encode_prefix() -> None:
        if text_len:
            block.encode_text(y, cache, cos, sin)

    def solve_window(start: int, target: int) -> None:
        while start < target:
            size = block_size if start <= frame else big
            valid = min(size, target - start)
            end = start + valid
            if layout.seq_frames > 1:
                # Tokens entering the window past the first frame start from the previous frame (as upstream).
                lo = max(guessed[0], start + 1, frame + 1)
                if lo <= end:
                    x_full[:, lo : end + 1] = (x_full[:, lo - frame : end + 1 - frame] if init == "previous"
                                               else mx.zeros_like(x_full[:, lo : end + 1]))
                guessed[0] = max(guessed[0], end + 1)
            z_chunk = padded(zz[:, start:end], size)
            tokens = padded(x_full[:, start:end], size)
            prev = padded(x_full[:, start + 1 : end + 1], size)
            new, _, per_token = stepper(size)(tokens, z_chunk, prev, text_len + start - base, valid)
            x_full[:, start + 1 : end + 1] = new[:, :valid]
            res = per_token[:valid].tolist()
            for t in range(start, end):
                rounds[t] += 1
            # The first token's inputs were all final, so it is exact; then the leading converged ones.
            commit = next((i for i in range(1, valid) if res[i] >= threshold and rounds[start + i] < max_iter), valid)
            worst = max(res[:commit])
            if stats is not None:
                stats.chunks.append(ChunkRecord(block.index, start, valid, 1, worst))
            start += commit
            if on_chunk is not None:
                on_chunk(start, n, iterations=rounds[start - 1], residual=worst)

    def solve_chunks(start: int, target: int) -> None:
        while start < target:
            limit = block_size if start <= frame else big
            size = sizer.size(limit) if sizer is not None else limit
            valid = min(size, target - start)
            z_chunk = padded(zz[:, start : start + valid], size)
            shifted = start > frame and init == "previous"  # the first iteration reads the previous frame: not exact
            if start > frame and init == "zero" and valid > 1:
                x_full[:, start + 1 : start + valid] = mx.zeros_like(x_full[:, start + 1 : start + valid])
            # Token i of the chunk is exact after i + 1 iterations (its inputs are then final), so
            # ``valid`` iterations (+1 when shifted) finish the chunk whatever its residual.
            cap = min(max_iter, valid + shifted)
            before = None
            for it in range(cap):
                lo = start - frame if (it == 0 and shifted) else start
                tokens = padded(x_full[:, lo : lo + valid], size)
                prev = padded(x_full[:, start + 1 : start + 1 + valid], size)
                new, residual, _ = stepper(size)(tokens, z_chunk, prev, text_len + start - base, valid)
                x_full[:, start + 1 : start + 1 + valid] = new[:, :valid]
                last = it == cap - 1
                if last or (it + 1) % check_every == 0:
                    res = residual.item()
                    done = converged(res, before, threshold) if sizer is not None else res < threshold
                    if done or last:
                        break
                    before = res
                else:
                    mx.async_eval(x_full, *cache.state())
            if sizer is not None:
                sizer.update(valid, it + 1)
            if stats is not None:
                stats.chunks.append(ChunkRecord(block.index, start, valid, it + 1, res))
            start += valid
            if on_chunk is not None:
                on_chunk(start, n, iterations=it + 1, residual=res)

    def encode_context(start: int, keep: int) -> None:
        """Text, then tokens start-keep .. start-1 as a fresh sequence: cache and RoPE restart at 0."""
        encode_prefix()
        if keep:
            block.encode_known(x_full[:, start + 1 - keep : start + 1], cache, text_len, cos, sin)
        mx.eval(*cache.state())

    x_full = mx.concatenate([block.start_token(batch), zz], axis=1)
    start = 0
    if prefix is not None:
        known = prefix.shape[1]
        if known % frame or not 0 < known < n:
            raise ValueError(f"context must be whole frames and shorter than the video, got {known} of {n} tokens")
        x_full[:, 1 : known + 1] = mx.concatenate([prefix, prefix], axis=0) if cfg > 0 else prefix
        start = known
    if on_frame is not None:
        hook, report = FrameHook(on_frame, frame, z.shape[0]), on_chunk

        def on_chunk(done: int, total: int, **info) -> None:  # the solvers report every commit through this name
            hook.add(x_full[:, 1 + hook.done : 1 + done])
            if report is not None:
                report(done, total, **info)

        hook.add(x_full[:, 1 : start + 1])
    rounds = [0] * n  # window schedule: iterations each token has taken part in
    guessed = [start + 1]  # window schedule: x_full columns below this hold a first guess (or are known)
    sizer = ChunkSizer(block_size) if schedule == "adaptive" else None
    solve = solve_window if schedule == "window" else solve_chunks
    # The cache keeps the whole known part while at least a frame still fits after it.
    keep = start if (window is None or start + frame <= span) else context_frames * frame
    encode_context(start, keep)
    base = start - keep
    target = min(base + span, n)
    while True:
        solve(start, target)
        start = target
        if target >= n:
            break
        # Window full: restart the cache from the text and the last context frames.
        ctx = context_frames * frame
        base = start - ctx
        target = min(base + span, n)
        encode_context(start, ctx)
        if stats is not None:
            stats.reencodes += 1
    if stats is not None:
        # Added up: a frame-local block is inverted once per frame when pipelined.
        stats.traces[block.index] = stats.traces.get(block.index, 0) + compiled_steps(block).traces - traced_before
    return x_full[: z.shape[0], 1:]
