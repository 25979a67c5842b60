"""A shallow block as a stateless Core ML package shaped for the Neural Engine.

Float16 throughout, fixed shapes, channels-first (B, C, 1, S) activations,
1x1 convolutions for every linear and attention split per head (the layout the
Neural Engine runs natively). The single function is the causal forward over
the whole sequence: given ``x`` it returns ``(a, b)`` with ``z = (x - b) / a``
for every token. The host inverts the block by Jacobi iteration over the whole
sequence, ``x <- b(x) + a(x) * z``, which is exact after at most one
iteration per token and usually converges far sooner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from starflow_mlx.coreml.builder import (Emitter, coremltools, convert, linear_params, make_program, mil,
                                        rotation_matrix, set_metadata, to_numpy)
from starflow_mlx.coreml.manifest import COMPUTE_UNITS_KEY, ROLE_KEY, FunctionInfo, TensorInfo

COMPUTE_UNITS = "CPU_AND_NE"
MASK_FILL = -1.0e4  # additive causal mask: exp(-1e4) is 0 in float16 and the scores stay finite


@dataclass(frozen=True)
class ShallowShapes:
    batch: int
    guided: bool  # only when the block sees text and guidance is exported
    text_len: int  # 0 when the block does not see text
    text_dim: int
    tokens: int
    token_channels: int

    @property
    def rows(self) -> int:
        return self.batch * (2 if self.guided else 1)

    def functions(self) -> dict[str, FunctionInfo]:
        c, n = self.token_channels, self.tokens
        inputs = [TensorInfo("x", [self.batch, c, 1, n], "float16")]
        if self.text_len:
            inputs.append(TensorInfo("text", [self.rows, self.text_dim, 1, self.text_len], "float16"))
        if self.guided:
            inputs.append(TensorInfo("guidance", [1], "float16"))
        outputs = [TensorInfo("a", [self.batch, c, 1, n], "float16"), TensorInfo("b", [self.batch, c, 1, n], "float16")]
        return {"main": FunctionInfo(inputs, outputs)}


class ShallowBlockBuilder:
    role = "shallow_block"
    compute_units = COMPUTE_UNITS

    def __init__(self, block, shapes: ShallowShapes, cos: np.ndarray, sin: np.ndarray):
        """``cos``/``sin``: (text_len + tokens, head_dim) rotary tables of [text; tokens]."""
        self.block, self.shapes = block, shapes
        # (1, D, 1, S): broadcast over rows, along the sequence axis.
        self.cos = cos.T[None, :, None, :].astype(np.float16)
        self.sin = sin.T[None, :, None, :].astype(np.float16)
        self.quantized_layers = 0

    def _attention(self, em: Emitter, x, attn, mask):
        mb = em.mb
        R, S = self.shapes.rows, x.shape[3]
        H, KV, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
        qkv = em.linear(em.norm(x, attn.norm), linear_params(attn.qkv))
        parts = mb.split(x=qkv, num_splits=H + 2 * KV, axis=1)
        rotation = rotation_matrix(D)[:, :, None, None].astype(np.float16)
        scale = np.float16(D ** -0.5)

        def prepare(t, norm):
            if norm is not None:
                t = em.rms_norm(t, norm)
            return em.rope(t, self.cos, self.sin, rotation)

        has_qk_norm = "query_norm" in attn
        keys = [mb.reshape(x=prepare(t, attn.key_norm if has_qk_norm else None), shape=[R, D, S])
                for t in parts[H:H + KV]]
        values = [mb.reshape(x=t, shape=[R, D, S]) for t in parts[H + KV:]]
        rep = H // KV
        heads = []
        for h in range(H):
            q = mb.mul(x=prepare(parts[h], attn.query_norm if has_qk_norm else None), y=scale)
            scores = mb.matmul(x=mb.reshape(x=q, shape=[R, D, S]), y=keys[h // rep], transpose_x=True)
            probs = mb.softmax(x=mb.add(x=scores, y=mask), axis=-1)
            out = mb.matmul(x=values[h // rep], y=probs, transpose_y=True)  # (R, D, S)
            heads.append(mb.reshape(x=out, shape=[R, D, 1, S]))
        out = em.linear(mb.concat(values=heads, axis=1), linear_params(attn.proj))
        if "post_norm" in attn:
            out = em.rms_norm(out, attn.post_norm)
        return out

    def program(self, opset):
        sh, block = self.shapes, self.block
        info = sh.functions()["main"]
        mb, types = mil()
        specs = {t.name: mb.TensorSpec(tuple(t.shape), dtype=types.fp16) for t in info.inputs}

        def body(v):
            em = Emitter(channels_first=True, head_dtype="fp16")
            c, n, R = sh.token_channels, sh.tokens, sh.rows
            x = v["x"]
            if sh.guided:
                x = mb.concat(values=[x, x], axis=0)
            if block.use_sos:
                sos = np.broadcast_to(to_numpy(block.sos_embed).reshape(1, c, 1, 1), (R, c, 1, 1)).astype(np.float16)
                inputs = mb.concat(values=[sos, mb.slice_by_index(x=x, begin=[0, 0, 0, 0], end=[R, c, 1, n - 1])],
                                   axis=3)
            else:
                inputs = x
            h = em.linear(inputs, linear_params(block.proj_in))
            if sh.text_len:
                h = mb.concat(values=[em.linear(v["text"], linear_params(block.proj_txt)), h], axis=3)
            total = sh.text_len + n
            mask = np.triu(np.full((total, total), MASK_FILL, np.float16), 1)
            for layer in block.attn_blocks:
                h = mb.add(x=h, y=self._attention(em, h, layer.attention, mask))
                h = mb.add(x=h, y=em.mlp(h, layer.mlp))
            if sh.text_len:
                h = mb.slice_by_index(x=h, begin=[0, 0, 0, sh.text_len], end=[R, block.channels, 1, total])
            a, b = em.head(h, block)
            if sh.guided:
                a, b = em.guide(a, b, v["guidance"], sh.batch, ("a_guided", "b_guided"))
            rows = sh.batch
            if not block.use_sos:
                # Without SOS token t is predicted from token t-1 and token 0 passes through (a=1, b=0).
                a = mb.concat(values=[np.ones((rows, c, 1, 1), np.float16),
                                      mb.slice_by_index(x=a, begin=[0, 0, 0, 0], end=[rows, c, 1, n - 1])], axis=3)
                b = mb.concat(values=[np.zeros((rows, c, 1, 1), np.float16),
                                      mb.slice_by_index(x=b, begin=[0, 0, 0, 0], end=[rows, c, 1, n - 1])], axis=3)
            self.quantized_layers = em.quantized_layers
            return [mb.identity(x=a, name="a"), mb.identity(x=b, name="b")]

        return make_program(specs, body, opset)

    def functions(self) -> dict[str, FunctionInfo]:
        return self.shapes.functions()

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        ct = coremltools()
        opset = ct.target.macOS15
        convert(self.program(opset), opset, self.compute_units).save(str(path))
        set_metadata(path, {COMPUTE_UNITS_KEY: self.compute_units, ROLE_KEY: self.role, **metadata})
