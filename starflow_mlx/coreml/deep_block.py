"""The deep (last) block as one stateful, multifunction Core ML package for the GPU.

The KV cache is Core ML state: one ``keys_j``/``values_j`` pair per layer,
(rows, kv_heads, cache_length, head_dim) float16, written in place with
``slice_update`` at the position the host passes. Two functions share the
weights (saved once by ``save_multifunction``) and declare the same states:

* ``encode_text(text)`` writes the text prefix at positions 0 .. L-1;
* ``step(tokens, position[, guidance])`` runs a fixed chunk of ``k`` tokens at
  ``position`` and returns float32 ``(a, b)``, guided when the model has text
  and guidance (the rows are then [cond; uncond] inside, the outputs per image).

Chunk 1 is the sequential sampler; larger chunks are Jacobi iterations that
rerun a chunk at the same position (overwriting its cache rows). A position
mask hides cache rows ahead of each query, so stale rows never leak.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from starflow_mlx.coreml.builder import (Emitter, coremltools, convert, linear_params, make_program, mil,
                                        quiet, rotation_matrix, set_metadata)
from starflow_mlx.coreml.manifest import COMPUTE_UNITS_KEY, ROLE_KEY, FunctionInfo, TensorInfo

COMPUTE_UNITS = "CPU_AND_GPU"


@dataclass(frozen=True)
class DeepShapes:
    batch: int  # images
    guided: bool
    text_len: int
    text_dim: int
    tokens: int
    chunk: int
    token_channels: int
    layers: int
    kv_heads: int
    head_dim: int
    channels: int  # block width (the encode_text output)
    pad: int = 0  # extra positions: a video window restarts at any offset, so its last chunk may overhang

    @property
    def rows(self) -> int:
        return self.batch * (2 if self.guided else 1)

    @property
    def cache_length(self) -> int:
        """Text plus the tokens rounded up to whole chunks (the last chunk is padded), plus ``pad``."""
        return self.text_len + math.ceil(self.tokens / self.chunk) * self.chunk + self.pad

    def state_infos(self) -> list[TensorInfo]:
        shape = [self.rows, self.kv_heads, self.cache_length, self.head_dim]
        return [TensorInfo(f"{kind}_{j}", shape, "float16") for j in range(self.layers) for kind in ("keys", "values")]

    def functions(self) -> dict[str, FunctionInfo]:
        states = self.state_infos()
        c = self.token_channels
        step_inputs = [TensorInfo("tokens", [self.batch, self.chunk, c], "float32"),
                       TensorInfo("position", [1], "int32")]
        if self.guided:
            step_inputs.append(TensorInfo("guidance", [1], "float32"))
        outs = [TensorInfo("a", [self.batch, self.chunk, c], "float32"),
                TensorInfo("b", [self.batch, self.chunk, c], "float32")]
        functions = {"step": FunctionInfo(step_inputs, outs, states)}
        if self.text_len:
            functions["encode_text"] = FunctionInfo(
                [TensorInfo("text", [self.rows, self.text_len, self.text_dim], "float32")],
                [TensorInfo("hidden", [self.rows, self.text_len, self.channels], "float16")], states)
        return functions


class DeepBlockBuilder:
    def __init__(self, block, shapes: DeepShapes, cos: np.ndarray, sin: np.ndarray):
        """``cos``/``sin``: (cache_length, head_dim) rotary tables for [text; tokens; padding]."""
        self.block, self.shapes = block, shapes
        self.cos, self.sin = cos.astype(np.float32), sin.astype(np.float32)
        self.quantized_layers = 0

    # -- shared pieces --------------------------------------------------------------------
    def _specs(self, mb, types, inputs: list[TensorInfo]) -> dict:
        dtypes = {"float32": types.fp32, "float16": types.fp16, "int32": types.int32}
        specs = {t.name: mb.TensorSpec(tuple(t.shape), dtype=dtypes[t.dtype]) for t in inputs}
        for s in self.shapes.state_infos():
            specs[s.name] = mb.StateTensorSpec(tuple(s.shape), dtype=types.fp16)
        return specs

    def _layers(self, em: Emitter, h, rows, count: int, states: dict):
        """Run all layers on ``h`` (R, count, C) at cache rows ``rows`` (count,) int32, writing the cache."""
        mb = em.mb
        sh = self.shapes
        cos = mb.expand_dims(x=mb.gather(x=self.cos, indices=rows, axis=0), axes=[0, 1])  # (1, 1, count, D)
        sin = mb.expand_dims(x=mb.gather(x=self.sin, indices=rows, axis=0), axes=[0, 1])
        keys_pos = np.arange(sh.cache_length, dtype=np.int32)
        mask = mb.less_equal(x=keys_pos[None, :], y=mb.expand_dims(x=rows, axes=[1]))  # (count, T)
        begin = mb.concat(values=[np.zeros(2, np.int32), mb.slice_by_size(x=rows, begin=[0], size=[1]),
                                  np.zeros(1, np.int32)], axis=0)
        end = mb.add(x=begin, y=np.array([sh.rows, sh.kv_heads, count, sh.head_dim], np.int32))
        rotation = rotation_matrix(sh.head_dim).T.copy()
        for j, layer in enumerate(self.block.attn_blocks):
            h = mb.add(x=h, y=self._attention(em, h, layer.attention, count, cos, sin, rotation, mask,
                                              states[f"keys_{j}"], states[f"values_{j}"], begin, end))
            h = mb.add(x=h, y=em.mlp(h, layer.mlp))
        return h

    def _attention(self, em, x, attn, count, cos, sin, rotation, mask, key_state, value_state, begin, end):
        mb = em.mb
        sh = self.shapes
        R, H, KV, D = sh.rows, attn.num_heads, attn.num_kv_heads, attn.head_dim
        qkv = em.linear(em.norm(x, attn.norm), linear_params(attn.qkv))
        q, k, v = mb.split(x=qkv, split_sizes=[H * D, KV * D, KV * D], axis=-1)

        def heads(t, n):
            return mb.transpose(x=mb.reshape(x=t, shape=[R, count, n, D]), perm=[0, 2, 1, 3])

        q, k, v = heads(q, H), heads(k, KV), heads(v, KV)
        if "query_norm" in attn:
            q = em.rms_norm(q, attn.query_norm)
            k = em.rms_norm(k, attn.key_norm)
        # RoPE in float32, as MLX does, then back to float16 for the cache.
        q = em.cast(em.rope(em.cast(q, "fp32"), cos, sin, rotation), "fp16")
        k = em.cast(em.rope(em.cast(k, "fp32"), cos, sin, rotation), "fp16")
        keys = mb.slice_update(x=mb.read_state(input=key_state), update=k, begin=begin, end=end)
        mb.coreml_update_state(state=key_state, value=keys)
        values = mb.slice_update(x=mb.read_state(input=value_state), update=v, begin=begin, end=end)
        mb.coreml_update_state(state=value_state, value=values)
        # Grouped queries: the rep heads sharing one kv head become rep*count query rows.
        rep = H // KV
        q = mb.reshape(x=q, shape=[R, KV, rep * count, D])
        group_mask = mb.tile(x=mask, reps=[rep, 1]) if rep > 1 else mask
        out = mb.scaled_dot_product_attention(query=q, key=keys, value=values, attn_mask=group_mask)
        out = mb.transpose(x=mb.reshape(x=out, shape=[R, H, count, D]), perm=[0, 2, 1, 3])
        out = em.linear(mb.reshape(x=out, shape=[R, count, H * D]), linear_params(attn.proj))
        if "post_norm" in attn:
            out = em.rms_norm(out, attn.post_norm)
        return out

    # -- functions ------------------------------------------------------------------------
    def step_program(self, opset):
        sh, block = self.shapes, self.block
        info = sh.functions()["step"]

        def body(v):
            em = Emitter(channels_first=False, head_dtype="fp32")
            mb = em.mb
            tokens = v["tokens"]
            if sh.guided:
                tokens = mb.concat(values=[tokens, tokens], axis=0)
            h = em.linear(em.cast(tokens, "fp16"), linear_params(block.proj_in))
            rows = mb.add(x=v["position"], y=np.arange(sh.chunk, dtype=np.int32))
            h = self._layers(em, h, rows, sh.chunk, v)
            a, b = em.head(h, block)
            if sh.guided:
                a, b = em.guide(a, b, v["guidance"], sh.batch, ("a", "b"))
            else:
                a, b = mb.identity(x=a, name="a"), mb.identity(x=b, name="b")
            self.quantized_layers = em.quantized_layers
            return [a, b]

        mb, types = mil()
        return make_program(self._specs(mb, types, info.inputs), body, opset)

    def encode_program(self, opset):
        sh, block = self.shapes, self.block

        def body(v):
            em = Emitter(channels_first=False, head_dtype="fp32")
            mb = em.mb
            h = em.linear(em.cast(v["text"], "fp16"), linear_params(block.proj_txt))
            rows = np.arange(sh.text_len, dtype=np.int32)
            h = self._layers(em, h, rows, sh.text_len, v)
            return [mb.identity(x=h, name="hidden")]

        mb, types = mil()
        return make_program(self._specs(mb, types, sh.functions()["encode_text"].inputs), body, opset)

    def functions(self) -> dict[str, FunctionInfo]:
        return self.shapes.functions()

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        """Write the package with its functions under their manifest names, sharing one copy of the weights."""
        ct = coremltools()
        opset = ct.target.macOS15
        programs = {"step": self.step_program(opset)}
        if self.shapes.text_len:
            programs["encode_text"] = self.encode_program(opset)
        with tempfile.TemporaryDirectory(prefix=".deep-", dir=path.parent) as tmp:
            desc = ct.utils.MultiFunctionDescriptor()
            for name, program in programs.items():
                part = Path(tmp, f"{name}.mlpackage")
                convert(program, opset, COMPUTE_UNITS).save(str(part))
                desc.add_function(str(part), src_function_name="main", target_function_name=name)
            desc.default_function_name = "step"
            with quiet():
                ct.utils.save_multifunction(desc, str(path))
        set_metadata(path, {COMPUTE_UNITS_KEY: COMPUTE_UNITS, ROLE_KEY: "deep_block", **metadata})
