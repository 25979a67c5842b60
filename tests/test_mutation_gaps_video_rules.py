"""The video frame rules and temporal scale against numbers worked out by hand (gaps found by mutation testing).

The Wan2.2 VAE makes 1 pixel frame of its first latent frame and 4 of each later one (video-pipeline.md), so a
video is 1 + 4k frames; flow-space latent frames after the first are the VAE's times 0.6. The pipeline tests go
through a converted model and check one count each; here every rule is a small table, with the edges.
"""

from types import SimpleNamespace

from PIL import Image

import mlx.core as mx
import numpy as np
import pytest

from starflow_mlx.pipelines.video import MAX_FRAMES, VideoPipeline, clip_pixels, frame_count


@pytest.mark.parametrize("frames,expected", [(1, 1), (2, 5), (4, 5), (5, 5), (6, 9), (80, 81), (81, 81), (82, 85)])
def test_frames_round_up_to_1_plus_4k(frames, expected, recwarn):
    assert frame_count(frames) == expected
    messages = [str(w.message) for w in recwarn]
    if expected == frames:
        assert messages == []
    else:
        assert messages == [f"{frames} frames is not 1 + 4k: generating {expected} (the VAE decodes 1 frame, then 4 "
                            "per latent)"]


def test_a_codec_of_one_frame_per_latent_takes_any_count(recwarn):
    assert [frame_count(n, 1) for n in (1, 2, 7)] == [1, 2, 7] and not recwarn
    with pytest.warns(UserWarning, match="^6 frames is not 1 \\+ 2k: generating 7"):
        assert frame_count(6, 2) == 7


@pytest.mark.parametrize("frames", [0, -3, MAX_FRAMES + 1, 2.0, True, "9", None])
def test_a_frame_count_outside_the_range_is_refused(frames):
    with pytest.raises(ValueError, match=f"frames must be a whole number from 1 to {MAX_FRAMES}, got {frames!r}"):
        frame_count(frames)


def test_the_largest_frame_count_is_accepted():
    assert MAX_FRAMES == 2001 and frame_count(MAX_FRAMES) == MAX_FRAMES  # 1 + 4 * 500


def fake(temporal_factor=4, scale=0.6, window=None, num_frames=None):
    """The attributes the size rules read: the VAE's factor and the model's config."""
    return SimpleNamespace(vae=SimpleNamespace(temporal_factor=temporal_factor),
                           config=SimpleNamespace(vae_temporal_scale=scale, local_attn_window=window,
                                                  num_frames=num_frames))


def test_pixel_and_latent_frames():
    pipe = fake()
    assert [VideoPipeline.pixel_frames(pipe, n) for n in (1, 2, 21)] == [1, 5, 81]
    # Upstream's (frames - 1) // 4 + 1, whole numbers, also for counts that are not 1 + 4k.
    latents = [VideoPipeline.latent_frames(pipe, n) for n in (1, 4, 5, 6, 9, 81)]
    assert latents == [1, 1, 2, 2, 3, 21] and all(type(n) is int for n in latents)
    assert [VideoPipeline.pixel_frames(fake(1), n) for n in (1, 3)] == [1, 3]  # pixel space: one frame a latent


def test_the_default_length_is_the_training_length(recwarn):
    for window, frames, latents in ((None, 21, 21), (5, 21, 5), (None, None, 1)):
        pipe = fake(window=window, num_frames=frames)
        pipe.training_latent_frames = VideoPipeline.training_latent_frames.fget(pipe)
        pipe.pixel_frames = lambda n, p=pipe: VideoPipeline.pixel_frames(p, n)
        assert pipe.training_latent_frames == latents
        assert VideoPipeline.frame_count(pipe, None) == 4 * (latents - 1) + 1
    pipe = fake(temporal_factor=2)
    with pytest.warns(UserWarning, match="^4 frames is not 1 \\+ 2k: generating 5"):
        assert VideoPipeline.frame_count(pipe, 4) == 5  # the VAE's own factor, not 4


def test_temporal_scale_is_the_configs_or_none():
    assert VideoPipeline.temporal_scale.fget(fake(scale=0.6)) == 0.6
    assert VideoPipeline.temporal_scale.fget(fake(scale=None)) == 1.0  # a model without one: latents as they are


def test_unscale_divides_frames_after_the_first_by_0_6():
    pipe = fake()
    pipe.temporal_scale = 0.6
    latents = mx.array(np.arange(1, 4, dtype=np.float32).reshape(1, 3, 1, 1, 1) * 0.6)
    out = np.array(VideoPipeline.unscale(pipe, latents))
    assert out.shape == (1, 3, 1, 1, 1)
    np.testing.assert_allclose(out.ravel(), [0.6, 2.0, 3.0], rtol=1e-6)


@pytest.mark.parametrize("count,kept", [(1, 1), (4, 1), (5, 5), (8, 5), (9, 9)])
def test_a_clip_is_trimmed_to_1_plus_4k_frames(count, kept):
    clip = np.stack([np.full((2, 3, 3), 10 * i, np.uint8) for i in range(count)])
    pixels, usable, resized = clip_pixels(clip, 2, 3)
    assert usable == kept and pixels.shape == (kept, 2, 3, 3) and not resized
    # Frame i is grey 10 i: mapped to [-1, 1] as x / 127.5 - 1, in order.
    np.testing.assert_allclose(pixels[:, 0, 0, 0], np.arange(kept) * 10 / 127.5 - 1, rtol=0, atol=1e-6)


def test_a_clip_of_another_size_is_resized_and_said_so():
    clip = np.zeros((5, 4, 6, 3), np.uint8)
    pixels, usable, resized = clip_pixels(clip, 2, 3, temporal_factor=2)
    assert usable == 5 and resized and pixels.shape == (5, 2, 3, 3)


class RecordingVAE:
    """An 'encoder' that returns its input's first channel as latents, so what reached it can be read back."""

    has_encoder = True
    temporal_factor = 4

    def encode(self, frames):
        self.seen = np.array(frames)
        return frames[..., :1]


def test_encode_maps_uint8_to_minus_1_1_and_scales_latents_after_the_first_by_0_6():
    pipe = fake()
    pipe.vae, pipe.temporal_scale = RecordingVAE(), 0.6
    clip = np.stack([np.full((1, 1, 3), v, np.uint8) for v in (0, 255, 51)])[None]
    out = np.array(VideoPipeline.encode(pipe, clip))
    assert out.shape == (1, 3, 1, 1, 1) and pipe.vae.seen.dtype == np.float32
    out = out.ravel()
    np.testing.assert_allclose(pipe.vae.seen[0, :, 0, 0, 0], [-1.0, 1.0, 51 / 127.5 - 1], rtol=0, atol=1e-7)
    np.testing.assert_allclose(out, [-1.0, 0.6, 0.6 * (51 / 127.5 - 1)], rtol=1e-6, atol=0)
    floats = np.array(VideoPipeline.encode(pipe, np.full((1, 2, 1, 1, 3), 0.5, np.float64))).ravel()
    np.testing.assert_allclose(floats, [0.5, 0.3], rtol=1e-6)  # floats in [-1, 1] are taken as they are
    assert pipe.vae.seen.dtype == np.float32  # float64 input reaches the VAE as float32 (flow arithmetic is float32)


def test_encode_without_an_encoder_says_what_to_convert():
    pipe = fake()
    pipe.vae, pipe.folder = RecordingVAE(), "models/v"
    pipe.vae.has_encoder = False
    with pytest.raises(ValueError, match=r"^the video VAE of models/v has no encoder: image and video conditioning need "
                                         r"the full Wan2\.2_VAE\.pth \(convert it with its encoder\)$"):
        VideoPipeline.encode(pipe, np.zeros((1, 1, 1, 1, 3), np.uint8))


def test_the_rounding_warning_points_at_the_callers_line():
    """``stacklevel``: the warning names the line that asked the pipeline for the frames, not the library."""
    with pytest.warns(UserWarning, match="6 frames is not 1") as caught:
        VideoPipeline.frame_count(fake(), 6)
    assert caught[0].filename == __file__


def test_a_clip_is_resized_with_the_pipelines_filter():
    """Pixel-space models resize with BOX (block averages undo their own enlargement exactly); clip_pixels must pass
    the filter on, not fall back to bilinear."""
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (1, 2, 3, 3)).astype(np.uint8)
    big = small.repeat(2, axis=1).repeat(2, axis=2)  # each pixel enlarged to 2x2, then one pixel per block nudged
    big[:, ::2, ::2] = np.clip(big[:, ::2, ::2].astype(int) + 40, 0, 255).astype(np.uint8)
    pixels, _, resized = clip_pixels(big, 2, 3, resample=Image.BOX)
    blocks = big.reshape(1, 2, 2, 3, 2, 3).astype(np.float64).mean(axis=(2, 4))
    assert resized
    # BOX is the 2x2 mean, rounded to uint8 by PIL: within one grey level of it (bilinear weighs the nudged pixels
    # otherwise: several levels off).
    np.testing.assert_allclose((pixels + 1) * 127.5, blocks, rtol=0, atol=1 + 1e-4)
