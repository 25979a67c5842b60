"""``manifest.json`` of a Core ML export: what each package is, its shapes, and how to drive them.

The packages only compute; the host owns the loop. The manifest records
everything the host needs: the sampling order, token order per block, the
start token, the chunk size, and each function's inputs, outputs and states.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from starflow_mlx.jsonconfig import ConfigError, JSONConfig, read_json, write_json

MANIFEST_FILE = "manifest.json"
FORMAT = 1
COMPUTE_UNITS_KEY = "com.starflow.compute_units"  # also stored in each package's metadata
ROLE_KEY = "com.starflow.role"


class ManifestError(ValueError):
    """A Core ML export folder is missing its manifest or the manifest is damaged."""


@dataclass
class TensorInfo(JSONConfig):
    LABEL = "tensor"

    name: str
    shape: list[int] = field(metadata={"min": 0, "max": 1 << 20, "max_len": 8})
    dtype: str = field(metadata={"choices": ("float16", "float32", "int32")})


@dataclass
class FunctionInfo(JSONConfig):
    LABEL = "function"

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    states: list[TensorInfo] = field(default_factory=list)

    def input(self, name: str) -> TensorInfo | None:
        return next((t for t in self.inputs if t.name == name), None)


@dataclass
class PackageInfo(JSONConfig):
    LABEL = "package"

    name: str
    file: str
    # deep_block | shallow_block | denoiser | text_encoder | vae_decoder | video_vae_decoder | video_vae_encoder
    role: str
    compute_units: str  # coremltools ComputeUnit name the package is shaped for
    layout: str  # channels_last (B, S, C) | channels_first (B, C, 1, S) | image
    functions: dict[str, FunctionInfo]
    block: int | None = None
    flip: bool = False  # reverse the token order before the package, and back after
    sees_text: bool = False
    guided: bool = False  # batch doubled internally, [cond; uncond] text, 'guidance' input
    quantized_layers: int = 0  # linears stored as constexpr_blockwise_shift_scale constants


VAE_FRAMES_PER_LATENT = 4  # the Wan2.2 VAE: frame 0 alone, then 4 pixel frames per latent frame


@dataclass
class VideoContract(JSONConfig):
    """What a host needs to drive a STARFlow-V export frame by frame (the flow packages are per frame/window)."""

    LABEL = "video contract"

    aspect_ratio: str = field(metadata={"max_len": 16})
    frame_rule: str  # which pixel-frame counts the VAE produces, and how many latent frames they are
    pixel_factor: int = field(metadata={"min": 1, "max": 64})  # VAE pixels per latent cell
    temporal_scale: float = field(metadata={"min": 1e-3, "max": 1e3})  # flow latents 1.. = VAE latents x this
    frame_tokens: int = field(metadata={"min": 1, "max": 1 << 20})
    window_frames: int = field(metadata={"min": 1, "max": 4096})  # latent frames the deep cache holds
    context_frames: int = field(metadata={"min": 1, "max": 4096})  # re-encoded when a longer video slides
    denoiser_frames: int = field(default=0, metadata={"min": 0, "max": 4096})  # 0: no denoiser exported
    denoiser_window: int | None = field(default=None, metadata={"min": 0, "max": 4096})  # sets chunk overlap
    denoiser_step: float = field(default=0.0, metadata={"min": 0, "max": 10})  # x <- x - denoiser_step * delta
    # Image-to-video: encoded known frames get this much Gaussian noise (the training noise), then go through
    # these shallow packages forward (z = (x - b) / a, block order) to become the deep block's known tokens.
    noise_std: float = field(default=0.0, metadata={"min": 0, "max": 100})
    context_order: list[str] = field(default_factory=list)
    # The text the encoder reads: replace {prompt} and {fps}. Bounded, and {prompt} once, so a hostile manifest
    # cannot make the tokenizer read gigabytes.
    prompt_template: str = field(default="{prompt}", metadata={"max_len": 4096})
    image_prompt_template: str = field(default="{prompt}", metadata={"max_len": 4096})  # for a one-frame video
    pixel_space: bool = False  # no VAE: latents are pixels times the manifest's pixel_scale, any frame count

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prompt_template", "image_prompt_template"):
            for placeholder in ("{prompt}", "{fps}"):
                if getattr(self, name).count(placeholder) > 1:
                    raise ConfigError(f"{self.LABEL}: {name} holds {placeholder} more than once")

    @property
    def frames_per_latent(self) -> int:
        """Pixel frames each latent frame after the first decodes to: 4 for the Wan2.2 VAE, 1 without a VAE."""
        return 1 if self.pixel_space else VAE_FRAMES_PER_LATENT

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.frames_per_latent


@dataclass
class ExportManifest(JSONConfig):
    LABEL = "Core ML manifest"

    source: str
    kind: str | None
    batch: int = field(metadata={"min": 1, "max": 1024})
    latent_shape: list[int] = field(metadata={"min": 1, "max": 1 << 16, "max_len": 3})  # (H, W, C), channels-last
    patch_size: int = field(metadata={"min": 1, "max": 64})
    token_grid: list[int] = field(metadata={"min": 1, "max": 1 << 16, "max_len": 2})  # (h, w) tokens
    token_channels: int = field(metadata={"min": 1, "max": 1 << 16})
    text_length: int = field(metadata={"min": 0, "max": 1 << 16})
    text_dim: int = field(metadata={"min": 0, "max": 1 << 16})
    guided: bool
    default_cfg: float = field(metadata={"min": 0, "max": 1000})
    chunk: int = field(metadata={"min": 1, "max": 1 << 16})
    sos: bool
    start_token: list[float] | None
    order: list[str]  # flow packages in sampling order: deep first
    packages: list[PackageInfo]
    jacobi_threshold: float = field(default=0.005, metadata={"min": 1e-12, "max": 1e3})
    jacobi_max_iter: int = field(default=32, metadata={"min": 1, "max": 10000})
    classes: list[str] = field(default_factory=list)
    words: list[str] = field(default_factory=list)  # a class model whose labels are one-hot words
    pixel_scale: float = field(default=1.0, metadata={"min": 1e-3, "max": 1e3})
    drive: list[str] = field(default_factory=list)
    video: VideoContract | None = None  # STARFlow-V: latent_shape/token_grid are one frame's
    format: int = FORMAT

    def __post_init__(self) -> None:
        super().__post_init__()
        problem = self._inconsistency()
        if problem:
            raise ConfigError(f"{self.LABEL}: {problem}")

    def _inconsistency(self) -> str | None:
        """The first value that disagrees with another (each is within its own bounds already)."""
        if len(self.latent_shape) != 3 or len(self.token_grid) != 2:
            return f"latent_shape must be (H, W, C) and token_grid (h, w), got {self.latent_shape}, {self.token_grid}"
        (h, w, c), p = self.latent_shape, self.patch_size
        names = [pkg.name for pkg in self.packages]
        if h % p or w % p or self.token_grid != [h // p, w // p] or self.token_channels != p * p * c:
            return (f"latent_shape {self.latent_shape} in {p}x{p} patches is not token_grid {self.token_grid} of "
                    f"{self.token_channels} channels")
        if self.chunk > self.tokens or (self.chunk > 1 and not self.sos):
            return f"chunk {self.chunk} does not fit {self.tokens} tokens{'' if self.sos else ' without a start token'}"
        if self.sos != (self.start_token is not None) or self.sos and len(self.start_token) != self.token_channels:
            return f"the start token must hold {self.token_channels} values when sos is set, and be absent otherwise"
        if not self.order or len(set(names)) != len(names) or not set(self.order) <= set(names):
            return f"order {self.order} must name packages of the manifest, each once"
        if self.classes and self.text_dim != len(self.words or self.classes) + 1:
            return f"text_dim {self.text_dim} is not one per class (or word) plus the empty label"
        if self.video is not None and self.video.frame_tokens != self.tokens:
            return f"video frame_tokens {self.video.frame_tokens} is not the {self.tokens} tokens of a frame"
        if self.video is not None and not set(self.video.context_order) <= set(self.order[1:]):
            return f"video context_order {self.video.context_order} must name shallow packages of 'order'"
        return None

    @property
    def tokens(self) -> int:
        return self.token_grid[0] * self.token_grid[1]

    def package(self, name: str) -> PackageInfo:
        for p in self.packages:
            if p.name == name:
                return p
        raise ManifestError(f"manifest has no package {name!r}")

    def save(self, folder: str | Path) -> None:
        write_json(Path(folder, MANIFEST_FILE), asdict(self))

    @classmethod
    def load(cls, folder: str | Path) -> "ExportManifest":
        path = Path(folder, MANIFEST_FILE)
        if not path.is_file():
            raise ManifestError(f"{folder} has no {MANIFEST_FILE}: export it with starflow export-coreml")
        try:
            data = read_json(path, cls.LABEL)
            if isinstance(data, dict) and data.get("format") != FORMAT:
                raise ManifestError(f"{path} has format {str(data.get('format'))[:20]}, this version reads {FORMAT}: "
                                    "re-export")
            if isinstance(data, dict):  # fields added by later versions are ignored
                data = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
            return cls.from_dict(data, str(path))
        except ConfigError as exc:
            raise ManifestError(f"{exc}: re-export the model") from None


def label_steps(m: ExportManifest) -> list[str]:
    """How a class model's prompt becomes the flow's 'text' (no text encoder)."""
    if not m.classes:
        return []
    empty = f"the empty label (guidance) is one-hot at index {m.text_dim - 1}"
    if m.words:
        return [f"Labels: a prompt is one of 'classes'; each of its words found in 'words' is a row one-hot at that "
                f"word's index (length {m.text_dim}), {m.text_length} rows in the prompt's word order -> text "
                f"(1, {m.text_length}, {m.text_dim}); {empty}, in every row."]
    return [f"Labels: class i of 'classes' is one row one-hot at i (length {m.text_dim}) -> text (1, 1, "
            f"{m.text_dim}); {empty}."]


def drive_steps(m: ExportManifest) -> list[str]:
    """The sampling loop in words, written into the manifest for other hosts (Swift, C++)."""
    deep = m.package(m.order[0])
    names = {p.name for p in m.packages}
    steps = label_steps(m)
    if "text_encoder" in names:
        rows = "[prompts; empty prompts]" if m.guided else "prompts"
        steps.append(f"text_encoder: tokenize {rows} with tokenizer/ (pad and truncate to {m.text_length}) -> "
                     "input_ids, attention_mask (int32) -> features, the 'text' of the flow packages.")
    steps += [
        f"z: Gaussian latents (batch {m.batch}, {m.latent_shape[0]}, {m.latent_shape[1]}, {m.latent_shape[2]}), "
        f"channels-last; cut into {m.patch_size}x{m.patch_size} patches -> tokens (batch, {m.tokens}, "
        f"{m.token_channels}) in row-major (h, w) order, patch pixels ordered (p_row, p_col, channel).",
        "For each package in 'order': reverse the token axis first when its 'flip' is true, and back afterwards.",
        f"{deep.name}: state = make_state() (the KV cache, zeros, updated in place by every call).",
    ]
    if deep.sees_text:
        rows = "[cond; uncond] stacked on the batch axis" if deep.guided else "one row per image"
        steps.append(f"{deep.name}.encode_text(text: features ({rows}, {m.text_length}, {m.text_dim}), state) "
                     f"fills cache positions 0..{m.text_length - 1}; its 'hidden' output is not needed.")
    guidance = ", guidance: [cfg]" if deep.guided else ""
    if m.sos:
        steps.append(f"x = [start_token; z] (length {m.tokens + 1}). For chunk starts s = 0, {m.chunk}, ...: "
                     f"repeat {{a, b = {deep.name}.step(tokens: x[:, s:s+{m.chunk}] zero-padded to {m.chunk}, "
                     f"position: [{m.text_length} + s]{guidance}, state); x[:, s+1:s+1+{m.chunk}] = b + a * z[:, s:s+{m.chunk}]}} "
                     "until mean((new-old)^2)/mean(new^2) < jacobi_threshold or jacobi_max_iter calls "
                     "(chunk 1: exactly one call per token, sequential); the result is x[:, 1:].")
    else:
        steps.append(f"x[:, 0] = z[:, 0]; for t = 1..N-1: a, b = {deep.name}.step(tokens: x[:, t-1:t], "
                     f"position: [{m.text_length} + t - 1]{guidance}, state); x[:, t] = b + a * z[:, t].")
    steps.append("Shallow packages (stateless, channels-first x: (batch, channels, 1, tokens) float16; where "
                 "declared also text: (rows, text_dim, 1, text_length) and guidance: [cfg]): x = z; repeat "
                 "{a, b = package(x); x = b + a * z} until the residual is below jacobi_threshold "
                 "(at most 'tokens' iterations give the exact inverse).")
    steps.append("Undo the patching: tokens -> latents (batch, H, W, C).")
    if "vae_decoder" in names:
        steps.append("vae_decoder: latents -> image (batch, H', W', 3) in about [-1, 1]. The MLX pipeline's "
                     "score-based denoising (a gradient of the flow) is not part of the export.")
    else:
        steps.append(f"Pixel space: image = latents / {m.pixel_scale}, in about [-1, 1].")
    return steps
