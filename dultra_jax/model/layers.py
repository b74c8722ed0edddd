"""LLaDA building blocks: RMSNorm, rotate-half RoPE, bidirectional attention, gated MLP, transformer block.

Numerics follow the original (docs/original.md §1): norm statistics and RoPE in float32 and cast back
before the weight multiply, softmax in float32, everything else in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from dultra_jax.config import ModelConfig
from dultra_jax.model import axes

AttentionImpl = Literal["xla", "cudnn", "auto"]


# ----------------------------------------------------------------------------------------- initialisers
def trunc_normal(std: float | jax.Array, cutoff: float | None = None):
    """Truncated normal N(0, std^2) cut at +-cutoff (absolute; default 3 std), the original's ``trunc_normal_``.

    ``std`` may be a traced array so per-layer scales work under ``nnx.vmap``.
    """

    def init(key, shape, dtype=jnp.float32):
        bound = 3.0 if cutoff is None else cutoff / std
        return (jax.random.truncated_normal(key, -bound, bound, shape, jnp.float32) * std).astype(dtype)

    return init


def mitchell(d_in: int, layer_id: jax.Array | int | None = None):
    """The original's ``init_fn="mitchell"``: std 1/sqrt(d_in), divided by sqrt(2 (layer_id+1)) for outputs."""
    std = 1.0 / (d_in**0.5)
    if layer_id is not None:
        std = std / jnp.sqrt(2.0 * (jnp.asarray(layer_id, jnp.float32) + 1.0))

    return trunc_normal(std)


# ----------------------------------------------------------------------------------------- norms, RoPE
class RMSNorm(nnx.Module):
    """RMSNorm with float32 statistics, cast back to the compute dtype *before* the weight multiply."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **axes.param_metadata(axes.NORM))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        r = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * r.astype(self.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, L, head_dim] in float32 for integer positions [B, L] (rotate-half layout)."""
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (jnp.float32(theta) ** exponent)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(t: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate t [B, L, N, h] by the tables [B, L, h] in float32; pairs are (d, d + h/2).

    Written on the two halves and stacked (rather than a rotated copy built by slicing and concatenating), so
    XLA makes it one pass over t."""
    half = t.shape[-1] // 2
    pairs = t.astype(jnp.float32).reshape(t.shape[:-1] + (2, half))
    x1, x2 = pairs[..., 0, :], pairs[..., 1, :]
    c, s = cos[:, :, None, :half], sin[:, :, None, :half]
    return jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-2).reshape(t.shape).astype(t.dtype)


def positions_and_mask(
    batch: int, length: int, attention_mask: jax.Array | None
) -> tuple[jax.Array, jax.Array | None]:
    """RoPE positions [B, L] and key mask [B, 1, 1, L] (or None).

    Without a mask every row uses positions 0..L-1 and attends everywhere (the original ignores padding).
    With a 0/1 key-padding mask, positions count real tokens only, so a left-padded row computes what it
    would compute unpadded.
    """
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)), None
    keep = attention_mask.astype(bool)
    pos = jnp.maximum(jnp.cumsum(keep.astype(jnp.int32), axis=-1) - 1, 0)
    return pos, keep[:, None, None, :]


# ----------------------------------------------------------------------------------------- attention, MLP
@jax.tree_util.register_dataclass
@dataclass
class LayerKV:
    """Keys (RoPE-rotated at their absolute positions) and values of attention layers.

    [B, N_kv, L, h] for one layer (heads before positions: the layout attention's matmuls read in place, so a
    cached iteration reads the cache without a transposed copy); a BlockStack holds them stacked on a leading
    layer axis [n, B, N_kv, L, h].
    """

    keys: jax.Array
    values: jax.Array


@jax.tree_util.register_dataclass
@dataclass
class WindowStart:
    """Where a cached window sits: its first canvas column ``window``, and ``fresh``, the first of its columns
    whose keys/values are the window's own; the columns in between read the cache, as the columns outside the
    window do. One static window width can then serve every block of a row (per-row prefix caching: the window
    always starts at the prompt's end, and a row's finished blocks in it are read from the cache, exactly as a
    window starting at the row's block would read them)."""

    window: jax.Array | int
    fresh: jax.Array | int


Query = jax.Array | int  # per-row indices [B, Q] into the positions, or a static Q: the first Q positions


def take_positions(t: jax.Array, index: Query) -> jax.Array:
    """Rows' own positions of t [B, L, ...] at index [B, Q] -> [B, Q, ...] (a per-row gather); a static int Q
    takes the first Q positions (a slice: no gather when the query is a leading run, e.g. a cached window's
    block)."""
    if isinstance(index, int):
        return t[:, :index]
    return jnp.take_along_axis(t, index.reshape(index.shape + (1,) * (t.ndim - 2)), axis=1)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, impl: AttentionImpl
) -> jax.Array:
    """Bidirectional scaled dot-product attention on [B, L, N, h]; softmax in float32.

    ``auto`` picks the cuDNN flash kernel on GPU for 16-bit inputs and XLA otherwise.
    """
    if impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        impl = "cudnn" if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=False, implementation=impl)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: LayerKV,
                     start: jax.Array | int | WindowStart, mask: jax.Array | None) -> jax.Array:
    """Attention of queries q [B, Q, N, h] over [the cache outside columns [start, start+W)] U [the fresh
    window k, v [B, W, N_kv, h]], one float32 softmax over both: what attending to the cache with the window
    written over it computes, without writing it (the cache [B, N_kv, L, h] is read once, never copied).
    ``mask`` [B, 1, 1, L] is the canvas' key mask (or None). A :class:`WindowStart` ``start`` takes the
    window's columns before its ``fresh`` one from the cache as well.

    The softmax is taken in two parts that share one maximum and one denominator (no concatenation of the two
    score blocks, and the normalisation is applied to the [Q, h] output rather than to the [Q, L] weights), with
    keys before queries in the score layout, the order the cache's matmul produces: each score element is
    written once and read by the reductions and the exponent only (docs/kv-cache.md, bytes per iteration)."""
    b, nq, n, h = q.shape
    width, n_kv = k.shape[1], k.shape[2]
    length = cache.keys.shape[2]
    qg = q.reshape(b, nq, n_kv, n // n_kv, h)  # grouped queries share their key/value head
    scale = jnp.float32(1.0 / h**0.5)

    def scores(spec, keys):
        return jnp.einsum(spec, qg, keys.astype(q.dtype), preferred_element_type=jnp.float32) * scale

    fresh = None
    if isinstance(start, WindowStart):  # a scalar or one column per row
        start, fresh = start.window, jnp.maximum(start.window, jnp.reshape(start.fresh, (-1, 1)))
    col = jnp.arange(length)
    # [B, L] the cache's columns read: all but the window's fresh ones, which come from k, v
    keep_c = jnp.broadcast_to((col < (start if fresh is None else fresh)) | (col >= start + width), (b, length))
    keep_w = (jnp.ones((b, width), bool) if fresh is None
              else jnp.broadcast_to(start + jnp.arange(width) >= fresh, (b, width)))
    if mask is not None:
        kmask = mask.reshape(b, length)
        keep_c = keep_c & kmask
        keep_w = keep_w & jax.lax.dynamic_slice_in_dim(kmask, start, width, axis=1)
    neg = jnp.finfo(jnp.float32).min
    # [B, N_kv, G, keys, Q]
    s_c = jnp.where(keep_c[:, None, None, :, None], scores("bqkgh,bklh->bkglq", cache.keys), neg)
    s_w = jnp.where(keep_w[:, None, None, :, None], scores("bqkgh,blkh->bkglq", k), neg)
    top = jnp.maximum(s_c.max(-2, keepdims=True), s_w.max(-2, keepdims=True))
    p_c, p_w = jnp.exp(s_c - top), jnp.exp(s_w - top)
    total = p_c.sum(-2) + p_w.sum(-2)  # [B, N_kv, G, Q]
    out = (jnp.einsum("bkglq,bklh->bqkgh", p_c.astype(v.dtype), cache.values.astype(v.dtype),
                      preferred_element_type=jnp.float32)
           + jnp.einsum("bkglq,blkh->bqkgh", p_w.astype(v.dtype), v, preferred_element_type=jnp.float32))
    out = out / jnp.moveaxis(total, -1, 1)[..., None]
    return out.astype(v.dtype).reshape(b, nq, n, h)


class Block(nnx.Module):
    """``LLaDALlamaBlock``: pre-norm attention + gated MLP where ``gate`` (orig. ``ff_proj``) goes through SiLU."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_id: jax.Array | int,
        *,
        dtype,
        param_dtype,
        attention_impl: AttentionImpl = "auto",
        rngs: nnx.Rngs,
    ):
        d, f = cfg.d_model, cfg.mlp_hidden_size
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.attention_impl = attention_impl

        def lin(d_in, d_out, init, names):
            return nnx.Linear(
                d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                kernel_init=axes.partitioned(init, *names), rngs=rngs,
            )

        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.q = lin(d, d, mitchell(d), (axes.EMBED, axes.HEADS))
        self.k = lin(d, cfg.kv_dim, mitchell(d), (axes.EMBED, axes.KV_HEADS))
        self.v = lin(d, cfg.kv_dim, mitchell(d), (axes.EMBED, axes.KV_HEADS))
        self.o = lin(d, d, mitchell(d, layer_id), (axes.HEADS, axes.EMBED))
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.gate = lin(d, f, mitchell(d), (axes.EMBED, axes.MLP))
        self.up = lin(d, f, mitchell(d), (axes.EMBED, axes.MLP))
        self.down = lin(f, d, mitchell(f, layer_id), (axes.MLP, axes.EMBED))

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array | None,
        cache: LayerKV | None = None,
        start: jax.Array | int | WindowStart | None = None,
        query: Query | None = None,
    ) -> tuple[jax.Array, LayerKV]:
        """One block over the positions ``x`` [B, W, D] (RoPE tables ``cos``/``sin`` [B, W, h] of them).

        Keys/values are computed for all W positions. With ``cache`` (K/V [B, N_kv, L, h] of the whole canvas)
        attention reads the cache outside columns [start, start+W) and the fresh K/V inside
        (:func:`cached_attention`: the cache itself is not rewritten); without it, the W positions attend to
        each other. ``query`` [B, Q] (indices into the W positions, or a static int: the first Q) restricts
        queries, output projection and MLP to those positions (exact: keys/values still cover everything).
        Returns (states [B, Q or W, D], the fresh K/V of the W positions, [B, N_kv, W, h]).
        """
        b, width, _ = x.shape
        kv_heads = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_KV_HEADS, axes.ACT_HEAD_DIM)
        a = self.attn_norm(x)
        k = axes.constrain(self.k(a).reshape(b, width, self.n_kv_heads, self.head_dim), kv_heads)
        v = axes.constrain(self.v(a).reshape(b, width, self.n_kv_heads, self.head_dim), kv_heads)
        k = apply_rope(k, cos, sin)
        if query is not None:
            x, a, cos, sin = (take_positions(t, query) for t in (x, a, cos, sin))
        q = self.q(a).reshape(b, a.shape[1], self.n_heads, self.head_dim)
        heads = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_HEAD_DIM)
        q = apply_rope(axes.constrain(q, heads), cos, sin)
        if cache is not None:
            att = cached_attention(q, k, v, cache, start, mask)
        else:
            att = attention(q, k, v, mask, self.attention_impl)
        heads_major = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731
        return self.finish(x, att), LayerKV(heads_major(k), heads_major(v))

    def finish(self, x: jax.Array, att: jax.Array) -> jax.Array:
        """Output projection + residual, then the gated MLP + residual, from attention output [B, L, N, h]."""
        b, length, _ = x.shape
        x = axes.constrain(x + self.o(att.reshape(b, length, -1)), axes.BLD)
        m = self.ff_norm(x)
        hid = axes.constrain(jax.nn.silu(self.gate(m)) * self.up(m), (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
        return x + self.down(hid)
