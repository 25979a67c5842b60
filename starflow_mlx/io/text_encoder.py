"""Prompts -> T5 text features, prepared as STARFlow prepares them.

From a converted folder (the fast path), or straight from a ``transformers`` T5 folder or a
registered repo id, converted in memory as mlx-lm and mflux do.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from starflow_mlx.io.weights import DTYPES, ModelLoadError, auto_dtype, load_weights_strict, parse_dtype, read_config
from starflow_mlx.models.t5 import T5Config, T5Encoder
from starflow_mlx.quantize.policy import apply_quantization, describe, plan_quantization


class TextEncoder:
    """A T5 encoder and its tokenizer."""

    def __init__(self, model: T5Encoder, tokenizer):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer

    @property
    def dim(self) -> int:
        return self.config.d_model

    def tokenize(self, prompts: str | Sequence[str], max_length: int) -> tuple[mx.array, mx.array]:
        """Token ids and 1/0 attention mask, both (B, max_length): padded at the end, truncated to fit."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        batch = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length,
                               return_tensors="np")
        return mx.array(batch["input_ids"], dtype=mx.int32), mx.array(batch["attention_mask"], dtype=mx.int32)

    def encode(self, prompts: str | Sequence[str], max_length: int) -> mx.array:
        """(B, max_length, d_model) float32 last hidden state, zero at padding positions."""
        ids, mask = self.tokenize(prompts, max_length)
        hidden = self.model(ids, mask)
        return hidden * mask[..., None].astype(hidden.dtype)

    def count_tokens(self, prompt: str) -> int:
        """Tokens ``prompt`` needs, end-of-sequence token included: more than max_length means truncation."""
        # verbose=False: no transformers warning about prompts longer than the model's maximum; the caller warns.
        return len(self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"])


def load_tokenizer(folder: Path):
    """The folder's tokenizer, never running code from it: ``auto_map`` entries naming .py files are ignored."""
    from transformers import AutoTokenizer

    try:
        # trust_remote_code=False (not None) also means transformers never stops to ask on a terminal.
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds (OSError, ValueError, KeyError) for broken files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"tokenizer in {folder} cannot be loaded ({reason})") from None


def is_hugging_face_folder(folder: Path) -> bool:
    """A ``transformers`` folder (its config names a model_type) rather than a converted one."""
    try:
        return "model_type" in json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError, TypeError):
        return False


def resolve_folder(path: str | Path, what: str, fetch_role: str) -> Path:
    """A local folder, or the snapshot of a registered Hugging Face repo id (downloaded as needed)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if isinstance(path, str) and path.count("/") == 1 and not path.startswith((".", "/", "~")):
        from starflow_mlx.io.hub import fetch_component

        return fetch_component(path, fetch_role)
    raise ModelLoadError(f"{what} folder {folder} not found")


def hugging_face_t5(folder: Path, dtype: str) -> tuple[T5Config, dict[str, mx.array]]:
    """Config and encoder weights of a ``transformers`` T5 folder, converted in memory."""
    from starflow_mlx.convert import t5_weights as hf
    from starflow_mlx.convert.safetensors_stream import to_dtype
    from starflow_mlx.models.t5 import NORM_SUFFIX

    try:
        config = hf.read_config(folder)
        config.dtype = dtype
        files = hf.weight_files(folder)
        shapes = {name: tuple(arr.shape) for name, arr in tree_flatten(T5Encoder(config).parameters())}
        with contextlib.ExitStack() as stack:
            sources = hf.encoder_sources(files, stack)
            hf.check_sources(sources, shapes, files[0] if len(files) == 1 else folder)
            weights = {}
            for name in shapes:
                source_dtype, _, read = sources[name]
                target = "float32" if name.endswith(NORM_SUFFIX) else dtype  # as convert_t5 stores them
                arr = mx.array(to_dtype(read(), target, source_dtype))
                weights[name] = arr.view(mx.bfloat16) if target == "bfloat16" else arr  # bfloat16 comes as bits
    except hf.T5ConversionError as exc:
        raise ModelLoadError(str(exc)) from None
    return config, weights


def load_text_encoder(path: str | Path, dtype: str | None = None) -> TextEncoder:
    """Load a converted text-encoder folder, a ``transformers`` T5 folder (converted in memory), or a repo id.

    ``dtype`` casts the weights (norms stay float32); a Hugging Face folder loads as float16 by default.
    """
    folder = resolve_folder(path, "text encoder", "text encoder")
    target = parse_dtype(dtype)
    if is_hugging_face_folder(folder):
        config, weights = hugging_face_t5(folder, dtype or "float16")
        model = T5Encoder(config)
        model.load_weights(list(weights.items()), strict=True)
        tokenizer_folder = folder
        target = None  # already in the asked dtype
    else:
        config = read_config(T5Config, folder, "text encoder", "a Hugging Face T5 folder")
        tokenizer_folder = folder / "tokenizer"
        if not tokenizer_folder.is_dir():
            raise ModelLoadError(f"text encoder folder {folder} has no tokenizer/: it is incomplete "
                                 "(convert it again with starflow convert)")
        # By default, as load_flow: float32 scales for an 8-bit encoder on a CPU, where float16 ones are slow.
        target = target if dtype is not None else auto_dtype(bool(config.quantization))
        model = T5Encoder(config)
        if config.quantization:
            apply_quantization(model, config.quantization)
        load_weights_strict(model, folder / "model.safetensors")
    tokenizer = load_tokenizer(tokenizer_folder)
    if len(tokenizer) > config.vocab_size:
        raise ModelLoadError(f"tokenizer in {tokenizer_folder} has {len(tokenizer)} tokens but the model only "
                             f"{config.vocab_size}: they do not belong together")
    if target is not None:
        model.cast(target)
        config.dtype = next(name for name, value in DTYPES.items() if value == target)
    mx.eval(model.parameters())
    model.eval()
    return TextEncoder(model, tokenizer)


def quantize_text_encoder(src: str | Path, dst: str | Path, bits: int = 8, group_size: int = 64) -> str:
    """Write a quantized copy of a converted T5 folder (norms and relative position bias stay float)."""
    src, dst = Path(src), Path(dst)
    encoder = load_text_encoder(src, dtype="float16")
    model = encoder.model
    plan = plan_quantization(model, bits, group_size)
    apply_quantization(model, plan)
    model.config.quantization = plan
    dst.mkdir(parents=True)
    model.config.save(dst / "config.json")
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())))
    shutil.copytree(src / "tokenizer", dst / "tokenizer")
    return describe(plan)
