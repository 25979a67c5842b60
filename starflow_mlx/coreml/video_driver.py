"""Host-side text-to-video over a STARFlow-V export: the deep block's sliding window, shallow blocks per frame.

The deep block solves the clip in chunks; as soon as a frame's last token is
final, its shallow blocks start on a second thread, so on Core ML the Neural
Engine works on frame t while the GPU works on frame t+1 (the interpreter runs
the same schedule, just slowly). Image-to-video encodes the known pixels with
the VAE encoder package, maps them through the shallow packages forward and
writes them into the deep block's cache as a prefix before sampling the rest.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from starflow_mlx.coreml.driver import (DriverError, Sampler, SampleStats, _Request, channels_first, channels_last,
                                        patchify, unpatchify)


class VideoSampler(Sampler):
    """``sample_video(z, text, text_uncond, cfg)``: latents (batch, T, H, W, C) from Gaussian ``z`` of that shape."""

    _noise_axes = "batch, frames, H, W, C"

    def __init__(self, folder, backend=None, **options):
        super().__init__(folder, backend, **options)
        if self.manifest.video is None:
            raise DriverError(f"{folder} is an image export: use Sampler")

    def _noise_shape(self, z: np.ndarray) -> tuple[int, ...]:
        m = self.manifest
        frames = z.shape[1] if z.ndim == 5 and z.shape[1] > 0 else 1
        return (m.batch, frames, *m.latent_shape)

    def _flip_frames(self, seq: np.ndarray) -> np.ndarray:
        """Reverse the tokens inside every frame (the deep block's in-frame order)."""
        b, total, c = seq.shape
        n = self.manifest.video.frame_tokens
        return np.ascontiguousarray(seq.reshape(b, total // n, n, c)[:, :, ::-1].reshape(b, total, c))

    def _invert_window(self, pkg, z: np.ndarray, req: _Request, context_frames: int, on_frame,
                       known: np.ndarray | None = None) -> np.ndarray:
        """The deep block over the whole clip ``z`` (B, T*n, c), sliding its window past the training length.

        ``known`` (B, P*n, c): the first frames' tokens, already known (image-to-video); they enter the cache as
        a prefix, sampling starts after them, and ``on_frame`` is called for the sampled frames only.
        """
        m, v = self.manifest, self.manifest.video
        total, n, k = z.shape[1], v.frame_tokens, m.chunk
        text_len = m.text_length if pkg.sees_text else 0
        span = v.window_frames * n
        step = self._open_deep(pkg, req)
        x_full = self._with_start_token(z)
        start = 0
        if known is not None:
            start = known.shape[1]
            x_full[:, 1:start + 1] = known
        # As the MLX sampler: all known tokens stay in the cache while a frame still fits after them.
        keep = start if start + n <= span else context_frames * n
        self._encode_known(step, x_full, start, keep, text_len)
        base = start - keep
        target = min(base + span, total)
        while True:
            while start < target:
                valid = min(k, target - start)
                self._solve_chunk(step, x_full, z, start, valid, text_len + start - base, req)
                done = (start + valid) // n
                for t in range(start // n, done):  # frames whose last token is now final
                    on_frame(t, x_full[:, 1 + t * n:1 + (t + 1) * n])
                start += valid
            if target >= total:
                return x_full[:, 1:]
            # Window full: the text rows stay valid; re-encode the last context frames from position text_len.
            keep = context_frames * n
            self._encode_known(step, x_full, start, keep, text_len)
            base = start - keep
            target = min(base + span, total)
            req.stats.reencodes += 1

    def _encode_known(self, step, x_full: np.ndarray, start: int, keep: int, text_len: int) -> None:
        """Tokens start-keep .. start-1 into the cache after the text, as a fresh sequence: ``step`` on the start
        token and all of them but the last, in chunks from position ``text_len`` (the outputs are not needed)."""
        k = self.manifest.chunk
        context = np.concatenate([x_full[:, :1], x_full[:, start + 1 - keep:start]], axis=1)
        tokens = np.zeros((x_full.shape[0], k, x_full.shape[2]), np.float32)
        for j in range(0, keep, k):
            tokens[:] = 0
            part = context[:, j:j + k]
            tokens[:, :part.shape[1]] = part
            step(tokens, text_len + j)

    def sample_video(self, z, text=None, text_uncond=None, cfg: float | None = None, *, context=None,
                     context_frames: int | None = None, stats: SampleStats | None = None) -> np.ndarray:
        """Flow-space latents (batch, T, H, W, C) from Gaussian ``z`` of that shape; ``text`` (and ``text_uncond``
        when guided) are text-encoder features. ``context`` (batch, P, H, W, C), P < T: known first frames in
        flow space (noised, as :meth:`known_frames` makes them); the result starts with them."""
        req = self._request(z, text, text_uncond, cfg, stats)
        out = np.empty_like(req.z)
        self._sample(req, out, lambda t: None, context_frames, context)
        return out

    def _sample(self, req: _Request, out: np.ndarray, frame_done, context_frames: int | None = None,
                context=None, deep_done=None) -> None:
        """Latent frames into ``out``; each frame's shallow blocks run on a second thread as soon as the deep block
        has finished it, then ``frame_done(t)`` (on that thread, frames in order; known frames first).
        ``deep_done(frames)`` is called on this thread with how many frames the deep block has finished."""
        m, v = self.manifest, self.manifest.video
        batch, frames, h, w, _ = req.z.shape
        context_frames = v.context_frames if context_frames is None else int(context_frames)
        if frames > v.window_frames and not 0 < context_frames < v.window_frames:
            raise DriverError(f"context frames must be between 1 and {v.window_frames - 1}, got {context_frames}")
        pkg = m.package(m.order[0])
        seq = patchify(req.z.reshape(batch * frames, h, w, -1), m.patch_size).reshape(batch, frames * v.frame_tokens,
                                                                                         -1)
        known = None
        if context is not None:
            context = self._checked_context(context, req.z.shape)
            known = self._context_tokens(context, req)

        def copy_known(t: int) -> None:
            out[:, t] = context[:, t]
            frame_done(t)

        def shallow(t: int, tokens: np.ndarray) -> None:
            out[:, t] = self._shallow(tokens[:, ::-1] if pkg.flip else tokens, req)
            frame_done(t)

        def deep_frame(t: int, tokens: np.ndarray) -> None:
            pending.append(pool.submit(shallow, t, tokens.copy()))
            if deep_done is not None:
                deep_done(t + 1)

        with ThreadPoolExecutor(1, thread_name_prefix="shallow") as pool:
            pending = [pool.submit(copy_known, t) for t in range(0 if context is None else context.shape[1])]
            if deep_done is not None and pending:  # known frames are finished already
                deep_done(len(pending))
            self._invert_window(pkg, self._flip_frames(seq) if pkg.flip else seq, req, context_frames, deep_frame,
                                known)
            for job in pending:
                job.result()

    # -- known frames (image-to-video) ---------------------------------------------------
    def _checked_context(self, context, shape: tuple[int, ...]) -> np.ndarray:
        m = self.manifest
        if sorted(m.video.context_order) != sorted(m.order[1:]):
            raise DriverError(f"{self.folder}'s manifest does not say how known frames reach the deep block "
                              "(video.context_order): re-export it for image-to-video")
        x = np.asarray(context, np.float32)
        batch, frames, h, w, c = shape
        if x.ndim != 5 or x.shape[0] != batch or x.shape[2:] != (h, w, c) or not 0 < x.shape[1] < frames:
            raise DriverError(f"context must be ({batch}, P, {h}, {w}, {c}) known frames with 0 < P < {frames} "
                              f"(the noise's frames), got {x.shape}")
        return x

    def _context_tokens(self, context: np.ndarray, req: _Request) -> np.ndarray:
        """Known frames (batch, P, H, W, C) -> the deep block's known tokens (batch, P*n, c) in its token order:
        each frame through the shallow packages forward, ``z = (x - b(x)) / a(x)``, in ``video.context_order``
        (block order; unguided, as the MLX model's context pass)."""
        m = self.manifest
        batch, frames, h, w, c = context.shape
        seq = patchify(context.reshape(batch * frames, h, w, c), m.patch_size).reshape(batch, frames, m.tokens, -1)
        out = []
        for t in range(frames):
            tokens = seq[:, t]
            for name in m.video.context_order:
                pkg = m.package(name)
                x = np.ascontiguousarray(tokens[:, ::-1] if pkg.flip else tokens)
                res = self.backend.predict(pkg.name, {"x": channels_first(x).astype(np.float16),
                                                      **self._shallow_inputs(pkg, req, 0.0)})
                z = (x - channels_last(res["b"]).astype(np.float32)) / channels_last(res["a"]).astype(np.float32)
                tokens = z[:, ::-1] if pkg.flip else z
            out.append(tokens)
        known = np.ascontiguousarray(np.concatenate(out, axis=1))
        return self._flip_frames(known) if m.package(m.order[0]).flip else known

    def _package(self, role: str, missing: str):
        pkg = next((p for p in self.manifest.packages if p.role == role), None)
        if pkg is None:
            raise DriverError(missing)
        return pkg

    @property
    def _pixels(self):
        """A pixel-space export's codec (no VAE packages): the MLX pipeline's own."""
        from starflow_mlx.io.pixel_video import PixelVideo

        return PixelVideo(self.manifest.latent_shape[2], self.manifest.pixel_scale)

    def encode_frames(self, pixels) -> np.ndarray:
        """Pixel frames (batch, 1 + 4k, H', W', 3) in [-1, 1] -> flow-space latents (batch, 1 + k, H, W, C) with
        the VAE encoder package: frame 0 by ``first``, then 4 frames per ``step``, the caches threaded; latent
        frames 1.. multiplied by the temporal scale (what ``VideoPipeline.encode`` returns). A pixel-space
        export takes any number of frames at the latent size."""
        m = self.manifest
        if m.video.pixel_space:
            x = np.asarray(pixels, np.float32)
            if x.ndim != 5 or x.shape[0] != m.batch or x.shape[2:] != (*m.latent_shape[:2], 3):
                raise DriverError(f"pixels must be ({m.batch}, frames, {m.latent_shape[0]}, {m.latent_shape[1]}, 3) "
                                  f"frames in [-1, 1], got {x.shape}")
            return np.array(self._pixels.encode(x))
        pkg = self._package("video_vae_encoder", "this export has no video VAE encoder: export a full model folder "
                                                 "whose VAE was converted with its encoder")
        first = pkg.functions["first"].inputs[0].shape  # (batch, 1, H', W', 3)
        per_step = pkg.functions["step"].inputs[0].shape[1]
        x = np.asarray(pixels, np.float32)
        if x.ndim != 5 or x.shape[0] != first[0] or x.shape[2:] != tuple(first[2:]) or (x.shape[1] - 1) % per_step:
            raise DriverError(f"pixels must be ({first[0]}, 1 + {per_step}k, {first[2]}, {first[3]}, 3) frames in "
                              f"[-1, 1], got {x.shape}")
        caches: dict = {}
        latents = []
        for start in [0, *range(1, x.shape[1], per_step)]:
            chunk = x[:, start:start + (per_step if start else 1)]
            out, caches = self._vae_call(pkg.name, start == 0, {"pixels": np.ascontiguousarray(chunk)}, caches)
            latents.append(out["latents"].astype(np.float32))
        out = np.stack(latents, axis=1)
        out[:, 1:] *= self.manifest.video.temporal_scale
        return out

    def known_frames(self, pixels, noise) -> np.ndarray:
        """The ``context`` of image-to-video: ``encode_frames(pixels)`` plus ``video.noise_std`` times ``noise``
        (Gaussian, of the encoded latents' shape), the training noise the flow saw on every frame."""
        return self._noised(self.encode_frames(pixels), noise)

    def _noised(self, latents: np.ndarray, noise) -> np.ndarray:
        noise = np.asarray(noise, np.float32)
        if noise.shape != latents.shape:
            raise DriverError(f"noise must be {latents.shape} (the encoded frames' latents), got {noise.shape}")
        return latents + self.manifest.video.noise_std * noise

    @staticmethod
    def _keep_given(x: np.ndarray, clean: np.ndarray | None) -> np.ndarray:
        """The given frames come back as given (their clean latents), as ``VideoPipeline.sample`` returns them; the
        flow and the denoiser still saw their noised copy."""
        if clean is None:
            return x
        x = x.copy()
        x[:, :clean.shape[1]] = clean
        return x

    def prompt_features(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray | None]:
        """Features of the tokenized [prompts; empty prompts] (as the text encoder is exported): (cond, uncond or
        None), the ``conditioning`` of :meth:`text_to_video` and :meth:`stream`; a class model's is
        :meth:`label_features`."""
        b = self.manifest.batch
        features = self.text_features(input_ids, attention_mask)
        return features[:b], features[b:] if self.manifest.guided else None

    def text_to_video(self, conditioning: tuple, z: np.ndarray, cfg: float | None = None, *, frames=None,
                      noise=None, context_frames: int | None = None, stats: SampleStats | None = None) -> np.ndarray:
        """``conditioning`` (cond, uncond) features and Gaussian ``z`` (batch, T, H, W, C) -> flow-space latents,
        denoised when the export has the denoiser (what ``VideoPipeline.sample`` returns).

        Image-to-video: ``frames`` (batch, 1 + 4k, H', W', 3) in [-1, 1] are pixels to start from (an image is
        one frame), encoded and noised with Gaussian ``noise`` by :meth:`known_frames`; the video starts with them.
        """
        cond, uncond = conditioning
        clean = None if frames is None else self.encode_frames(frames)
        context = None if clean is None else self._noised(clean, noise)
        x = self.sample_video(z, cond, uncond, cfg, context=context, context_frames=context_frames, stats=stats)
        return self._keep_given(self.denoise(x, cond) if self.manifest.video.denoiser_frames else x, clean)

    def stream(self, conditioning: tuple, z: np.ndarray, cfg: float | None = None,
               *, frames=None, noise=None, context_frames: int | None = None,
               stats: SampleStats | None = None, progress=None) -> tuple[np.ndarray, list[np.ndarray]]:
        """``text_to_video`` (``frames``/``noise`` as there) and ``decode_frames`` as one pipeline: (latents, pixel
        chunks). ``progress(label, done, total)``, on this thread: latent frames the deep block has finished
        ("deep block"), then pixel frames out of the pipeline ("frames").

        Behind the deep block, one thread runs each finished frame's shallow blocks and then every denoiser
        chunk whose frames are all there; a third decodes the frames each chunk finalised. On Core ML the
        shallow blocks (Neural Engine) and the VAE decoder overlap the deep block's next frames.
        """
        self._check_decoder()
        cond, uncond = conditioning
        clean = None if frames is None else self.encode_frames(frames)
        context = None if clean is None else self._noised(clean, noise)
        req = self._request(z, cond, uncond, cfg, stats)
        count = req.z.shape[1]
        latents = np.empty_like(req.z)
        if self.manifest.video.denoiser_frames:
            chunks, extra = self._denoise_plan(count), self._denoiser_inputs(cond)
        else:
            chunks, extra = [(t, t + 1, t) for t in range(count)], None
        ready = {"shallow": 0, "chunk": 0}
        caches: dict = {}
        with ThreadPoolExecutor(1, thread_name_prefix="vae") as vae:
            decoded = []

            def decode(t: int, frame: np.ndarray) -> np.ndarray:
                pixels, new = self._decode_frame(t, frame, caches)
                caches.clear()
                caches.update(new)
                return pixels

            def frame_done(t: int) -> None:  # on the shallow thread, frames in order
                ready["shallow"] = t + 1
                while ready["chunk"] < len(chunks) and chunks[ready["chunk"]][1] <= ready["shallow"]:
                    start, stop, first = chunks[ready["chunk"]]
                    if extra is not None:
                        self._denoise_chunk(latents, start, stop, first, extra)
                    shown = self._keep_given(latents[:, first:stop], None if clean is None else clean[:, first:stop])
                    decoded.extend(vae.submit(decode, k, shown[:, k - first].copy()) for k in range(first, stop))
                    ready["chunk"] += 1

            report = progress or (lambda *a: None)
            report("deep block", 0, count)
            self._sample(req, latents, frame_done, context_frames, context,
                         lambda done: report("deep block", done, count))
            pixels, done, total = [], 0, self.manifest.video.pixel_frames(count)
            report("frames", 0, total)
            for job in decoded:
                pixels.append(job.result())
                done += pixels[-1].shape[1]
                report("frames", done, total)
            return self._keep_given(latents, clean), pixels

    # -- VAE decoder ---------------------------------------------------------------------
    def _check_decoder(self) -> None:
        if not self.manifest.video.pixel_space:
            self._package("video_vae_decoder", "this export has no video VAE decoder (export a full model folder)")

    def _vae_call(self, name: str, first: bool, inputs: dict, caches: dict) -> tuple[dict, dict]:
        """One call of a VAE package (``first``, else ``step`` with ``caches``): its outputs, and the caches for
        the next call (its ``new_cache_j`` outputs renamed ``cache_j``)."""
        out = self.backend.predict(f"{name}.{'first' if first else 'step'}", {**inputs, **caches})
        return out, {key[len("new_"):]: value for key, value in out.items() if key.startswith("new_")}

    def _decode_frame(self, t: int, frame: np.ndarray, caches: dict) -> tuple[np.ndarray, dict]:
        """Latent frame ``t`` (flow space) -> (its pixel frames, the caches for frame t + 1)."""
        if self.manifest.video.pixel_space:
            # Enlarged to watch, as the MLX pipeline writes its mp4s; in numpy, as this runs on the decoding thread.
            k = self._pixels.enlargement(*frame.shape[1:3])
            x = np.repeat(np.repeat(frame[:, None] / self.manifest.pixel_scale, k, axis=2), k, axis=3)
            return np.ascontiguousarray(np.broadcast_to(x, (*x.shape[:-1], 3))), caches
        x = frame if t == 0 else frame / self.manifest.video.temporal_scale
        out, caches = self._vae_call("vae_decoder", t == 0, {"latents": np.ascontiguousarray(x, np.float32)}, caches)
        return out["frames"], caches

    def decode_frames(self, latents: np.ndarray):
        """Flow-space latents (batch, T, H, W, C) -> pixel frames, yielded per latent frame (1, then 4 each) as
        float32 (batch, n, H', W', 3) in about [-1, 1]: the temporal scale undone, the caches threaded."""
        self._check_decoder()
        x = self._checked(latents)
        caches: dict = {}
        for t in range(x.shape[1]):
            pixels, caches = self._decode_frame(t, x[:, t], caches)
            yield pixels

    def _checked(self, latents: np.ndarray) -> np.ndarray:
        x = np.array(latents, np.float32)
        if x.shape != self._noise_shape(x):
            raise DriverError(f"latents must be {self._noise_shape(x)} ({self._noise_axes}), got {x.shape}")
        return x

    # -- denoiser ------------------------------------------------------------------------
    def _denoise_plan(self, frames: int) -> list[tuple[int, int, int]]:
        """(start, stop, first written frame) of each denoiser chunk, as the MLX pipeline walks them."""
        from starflow_mlx.sampling.denoise import denoiser_chunks

        v = self.manifest.video
        steps = min(v.denoiser_frames, frames)
        overlap = steps - 1 if v.denoiser_window is None else min(v.denoiser_window, steps - 1)
        return denoiser_chunks(frames, steps, overlap)

    def _denoiser_inputs(self, text: np.ndarray | None) -> dict[str, np.ndarray]:
        m = self.manifest
        if not m.package("denoiser").sees_text:
            return {}
        if text is None:
            raise DriverError(f"the denoiser needs text features (batch, {m.text_length}, {m.text_dim})")
        return {"text": channels_first(np.asarray(text, np.float32)).astype(np.float16)}

    def _denoise_chunk(self, x: np.ndarray, start: int, stop: int, first: int, extra: dict) -> None:
        """One chunk in place: frames first .. stop-1 of ``x`` become ``x - step * delta``."""
        m, v = self.manifest, self.manifest.video
        batch, _, h, w, c = x.shape
        n, p, count = v.frame_tokens, m.patch_size, stop - start
        part = patchify(x[:, start:stop].reshape(batch * count, h, w, c), p).reshape(batch, count * n, -1)
        seq = np.zeros((batch, v.denoiser_frames * n, part.shape[2]), np.float32)
        seq[:, :count * n] = part
        out = self.backend.predict("denoiser", {"x": channels_first(seq).astype(np.float16),
                                                "frames": np.array([count], np.int32), **extra})
        delta = channels_last(out["delta"])[:, :count * n].reshape(batch * count, n, -1)
        delta = unpatchify(delta, p, h, w).reshape(batch, count, h, w, c)
        x[:, first:stop] -= v.denoiser_step * delta[:, first - start:]

    def denoise(self, latents: np.ndarray, text: np.ndarray | None = None) -> np.ndarray:
        """The learnable denoiser over ``latents`` (batch, T, H, W, C) in chunks, as the MLX pipeline walks them.

        ``text``: the conditional features (batch, text_length, text_dim), no unconditional rows.
        """
        if not self.manifest.video.denoiser_frames:
            raise DriverError("this export has no denoiser package (the model has no learnable denoiser)")
        x = self._checked(latents)
        extra = self._denoiser_inputs(text)
        for start, stop, first in self._denoise_plan(x.shape[1]):
            self._denoise_chunk(x, start, stop, first, extra)
        return x
