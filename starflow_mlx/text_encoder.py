"""Prompts -> T5 text features, prepared as STARFlow prepares them, from a folder written by ``convert_t5``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from starflow_mlx.config import ConfigError
from starflow_mlx.loading import DTYPES, ModelLoadError, auto_dtype, load_weights_strict, parse_dtype
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
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds (OSError, ValueError, KeyError) for broken files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"tokenizer in {folder} cannot be loaded ({reason})") from None


def load_text_encoder(path: str | Path, dtype: str | None = None) -> TextEncoder:
    """Load a folder written by ``convert_t5``; ``dtype`` casts the stored weights (norms stay float32)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"text encoder folder {folder} not found")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"text encoder folder {folder} has no config.json: convert the T5 model with convert_t5")
    try:
        config = T5Config.load(folder / "config.json")
    except ConfigError as exc:
        raise ModelLoadError(str(exc)) from None
    if not (folder / "tokenizer").is_dir():
        raise ModelLoadError(f"text encoder folder {folder} has no tokenizer/: it is incomplete (re-run convert_t5)")
    # By default, as load_flow: float32 scales for an 8-bit encoder on a CPU, where float16 ones are slow.
    target = parse_dtype(dtype) if dtype is not None else auto_dtype(bool(config.quantization))
    model = T5Encoder(config)
    if config.quantization:
        apply_quantization(model, config.quantization)
    load_weights_strict(model, folder / "model.safetensors")
    tokenizer = load_tokenizer(folder / "tokenizer")
    if len(tokenizer) > config.vocab_size:
        raise ModelLoadError(f"tokenizer in {folder / 'tokenizer'} has {len(tokenizer)} tokens but the model only "
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
