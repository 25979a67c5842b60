"""Tiny random Hugging Face T5 folders with a tokenizer trained on the spot (needs torch and transformers; no network)."""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration, T5Tokenizer

# flan-t5's shape in miniature: gated-gelu, its bucket settings, an embedding larger than the tokenizer.
TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False, decoder_start_token_id=0)
SENTENCES = ["a photo of a cat sitting on a red chair", "an astronaut riding a horse on the moon",
             "a watercolor painting of mountains at sunset", "the quick brown fox jumps over the lazy dog",
             "close-up portrait of an old man with a beard, dramatic lighting",
             "a bowl of fruit on a wooden table in the morning light"]
EXTRA_IDS = 8


def train_spiece() -> bytes:
    """A small unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2, no bos)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_writer=model, vocab_size=100,
                                   model_type="unigram", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
    return model.getvalue()


def save_tokenizer(folder: Path) -> None:
    """spiece.model plus the tokenizer.json and tokenizer_config.json that transformers writes from it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(train_spiece())
    T5Tokenizer.from_pretrained(str(folder), extra_ids=EXTRA_IDS).save_pretrained(str(folder))


def randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm weights away from their initial 1s, so a norm applied wrongly shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))


def tiny_t5(seed: int = 0, encoder_only: bool = False, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = T5Config(**{**TINY, **overrides})
    model = (T5EncoderModel if encoder_only else T5ForConditionalGeneration)(config)
    randomize_norms(model, seed)
    return model.eval()


def make_tiny_t5(folder: str | Path, seed: int = 0, encoder_only: bool = False, safe_serialization: bool = True,
                 **overrides) -> Path:
    """A Hugging Face T5 folder like google/flan-t5-xl's (decoder and LM head included unless ``encoder_only``).

    ``safe_serialization=False`` stores the weights as ``pytorch_model.bin`` instead of ``model.safetensors``.
    """
    folder = Path(folder)
    model = tiny_t5(seed, encoder_only, **overrides)
    model.save_pretrained(str(folder))
    if not safe_serialization:
        # transformers 5 always writes safetensors; older releases wrote this torch.save'd state dict.
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    save_tokenizer(folder)
    return folder


def make_tiny_mlx_t5(folder: str | Path, dtype: str = "float32", seed: int = 0, **overrides) -> Path:
    """A converted text-encoder folder at ``folder/mlx`` (its Hugging Face source at ``folder/hf``)."""
    from starflow_mlx.convert.t5_weights import convert_t5

    folder = Path(folder)
    convert_t5(make_tiny_t5(folder / "hf", seed, **overrides), folder / "mlx", dtype=dtype)
    return folder / "mlx"
