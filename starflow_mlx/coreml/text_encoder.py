"""The T5 text encoder as a Core ML package for the GPU.

Token ids and the 1/0 padding mask in, features out (zero at padding), at the
fixed text length of the flow. Like the MLX encoder, the residual stream,
norms, attention softmax and the feed-forward output projection stay in
float32 (flan-t5's activations outgrow float16, which also keeps this package
off the Neural Engine); the other projections run in float16. The relative
position bias of a fixed length is a constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from starflow_mlx.coreml.builder import (Emitter, Quantized, coremltools, convert, linear_params, make_program,
                                        mil, set_metadata, to_numpy)
from starflow_mlx.coreml.manifest import COMPUTE_UNITS_KEY, ROLE_KEY, FunctionInfo, TensorInfo

COMPUTE_UNITS = "CPU_AND_GPU"
MASKED = -1.0e9  # added to the bias of padding keys (float32: no overflow)


@dataclass(frozen=True)
class TextShapes:
    rows: int
    length: int
    dim: int

    def functions(self) -> dict[str, FunctionInfo]:
        ids = [TensorInfo("input_ids", [self.rows, self.length], "int32"),
               TensorInfo("attention_mask", [self.rows, self.length], "int32")]
        return {"main": FunctionInfo(ids, [TensorInfo("features", [self.rows, self.length, self.dim], "float32")])}


def embedding_table(embed: nn.Module, em: Emitter):
    """The (vocab, dim) float16 table of an MLX embedding, quantized or not."""
    params = linear_params(embed)
    return em.quantized_weight(params) if isinstance(params, Quantized) else params.weight.astype(np.float16)


ACTIVATIONS = {nn.relu: lambda mb, x: mb.relu(x=x), nn.silu: lambda mb, x: mb.silu(x=x),
               nn.gelu: lambda mb, x: mb.gelu(x=x, mode="EXACT"),
               nn.gelu_approx: lambda mb, x: mb.gelu(x=x, mode="TANH_APPROXIMATION")}


class TextEncoderBuilder:
    def __init__(self, encoder, shapes: TextShapes):
        """``encoder``: the MLX ``T5Encoder``."""
        self.model, self.shapes = encoder, shapes
        stack = encoder.encoder
        self.bias = np.array(stack.block[0].layer[0].SelfAttention.compute_bias(shapes.length).astype(mx.float32))
        self.quantized_layers = 0

    def program(self, opset):
        mb, types = mil()
        sh = self.shapes
        specs = {t.name: mb.TensorSpec(tuple(t.shape), dtype=types.int32) for t in sh.functions()["main"].inputs}
        stack = self.model.encoder

        def body(v):
            em = Emitter(channels_first=False)
            x = em.cast(mb.gather(x=embedding_table(stack.embed_tokens, em), indices=v["input_ids"], axis=0), "fp32")
            # Padding keys get MASKED added to their bias: exp() of it is exactly 0 in float32.
            keep = mb.cast(x=mb.reshape(x=v["attention_mask"], shape=[sh.rows, 1, 1, sh.length]), dtype="fp32")
            bias = mb.add(x=self.bias, y=mb.mul(x=mb.sub(x=np.float32(1.0), y=keep), y=np.float32(MASKED)))
            for block in stack.block:
                attn_layer, ff_layer = block.layer
                h = em.cast(self._norm(em, x, attn_layer.layer_norm), "fp16")
                x = mb.add(x=x, y=self._attention(em, h, attn_layer.SelfAttention, bias))
                h = em.cast(self._norm(em, x, ff_layer.layer_norm), "fp16")
                x = mb.add(x=x, y=self._feed_forward(em, h, ff_layer.DenseReluDense))
            x = self._norm(em, x, stack.final_layer_norm)
            mask = mb.cast(x=mb.expand_dims(x=v["attention_mask"], axes=[-1]), dtype="fp32")
            self.quantized_layers = em.quantized_layers
            return [mb.mul(x=x, y=mask, name="features")]

        return make_program(specs, body, opset)

    @staticmethod
    def _norm(em: Emitter, x, norm):
        return em.scaled_rms(x, to_numpy(norm.weight), norm.eps)

    def _attention(self, em: Emitter, h, attn, bias):
        mb = em.mb
        R, L, H = self.shapes.rows, self.shapes.length, attn.num_heads

        def heads(t):
            t = mb.reshape(x=em.cast(t, "fp32"), shape=[R, L, H, -1])
            return mb.transpose(x=t, perm=[0, 2, 1, 3])

        q, k, v = (heads(em.linear(h, linear_params(layer))) for layer in (attn.q, attn.k, attn.v))
        scores = mb.add(x=mb.matmul(x=q, y=k, transpose_y=True), y=bias)  # T5 does not scale the scores
        out = mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v)
        out = mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[R, L, -1])
        return em.cast(em.linear(em.cast(out, "fp16"), linear_params(attn.o)), "fp32")

    @staticmethod
    def _feed_forward(em: Emitter, h, ff):
        mb = em.mb
        act = ACTIVATIONS[ff.act]
        if "wi_0" in ff:
            gated = mb.mul(x=em.cast(act(mb, em.linear(h, linear_params(ff.wi_0))), "fp32"),
                           y=em.cast(em.linear(h, linear_params(ff.wi_1)), "fp32"))
        else:
            gated = em.cast(act(mb, em.linear(h, linear_params(ff.wi))), "fp32")
        return em.linear(gated, linear_params(ff.wo), "fp32")

    def save(self, path: Path) -> None:
        ct = coremltools()
        opset = ct.target.macOS15
        convert(self.program(opset), opset, COMPUTE_UNITS).save(str(path))
        set_metadata(path, {COMPUTE_UNITS_KEY: COMPUTE_UNITS, ROLE_KEY: "text_encoder"})
