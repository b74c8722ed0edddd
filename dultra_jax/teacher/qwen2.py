"""A Qwen2-family causal LM in Flax NNX: the distillation teacher (Qwen2.5-Math/Coder-7B-Instruct).

Architecture as transformers' ``Qwen2ForCausalLM``: token embedding; per layer pre-norm grouped-query causal
attention with q/k/v biases (no output bias) and rotate-half RoPE, then a pre-norm SiLU-gated MLP; final RMSNorm;
an untied (or tied) LM head. Layers are stacked and run under ``nnx.scan`` (one compiled block for all 28).

Padding: with an ``attention_mask`` (1 = token), positions count real tokens and pads are masked as keys, so
every row of a padded batch (left or right padding) computes exactly what it computes unpadded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dultra_jax.config import ConfigError, UnsupportedConfigError
from dultra_jax.model.layers import RMSNorm, apply_rope, positions_and_mask, rope_tables


@dataclass(frozen=True)
class Qwen2Config:
    """The fields of a Qwen2 ``config.json`` that change what the model computes."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    hf: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> Qwen2Config:
        """Build from a Qwen2 ``config.json``; raise on features we do not compute (sliding window, RoPE scaling)."""
        if raw.get("model_type") not in (None, "qwen2"):
            raise UnsupportedConfigError(f"{source}: model_type {raw.get('model_type')!r} is not 'qwen2'")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {missing}; is this a Qwen2 config.json?")
        problems = []
        if raw.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={raw['hidden_act']!r} (only 'silu' is implemented)")
        if raw.get("rope_scaling"):
            problems.append(f"rope_scaling={raw['rope_scaling']!r} (only plain RoPE is implemented)")
        if raw.get("use_sliding_window"):
            problems.append("use_sliding_window=true (sliding-window attention is not implemented)")
        if raw.get("head_dim") not in (None, raw["hidden_size"] // raw["num_attention_heads"]):
            problems.append(f"head_dim={raw['head_dim']} differs from hidden_size/num_attention_heads")
        if problems:
            raise UnsupportedConfigError(f"unsupported Qwen2 config in {source}: " + "; ".join(problems))
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            num_key_value_heads=int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            hf=dict(raw),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> Qwen2Config:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"teacher config not found: {path}")
        try:
            return cls.from_hf_dict(json.loads(path.read_text()), source=str(path))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e


class Qwen2Block(nnx.Module):
    """Pre-norm GQA causal attention (q/k/v biases) + pre-norm SiLU-gated MLP."""

    def __init__(self, cfg: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def lin(i, o, bias):
            return nnx.Linear(i, o, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.input_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.q, self.k, self.v = lin(d, d, True), lin(d, cfg.kv_dim, True), lin(d, cfg.kv_dim, True)
        self.o = lin(d, d, False)
        self.post_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.gate, self.up, self.down = lin(d, f, False), lin(d, f, False), lin(f, d, False)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, length, _ = x.shape
        a = self.input_norm(x)
        q = self.q(a).reshape(b, length, self.n_heads, self.head_dim)
        k = self.k(a).reshape(b, length, self.n_kv, self.head_dim)
        v = self.v(a).reshape(b, length, self.n_kv, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")
        x = x + self.o(att.reshape(b, length, -1))
        m = self.post_norm(x)
        return x + self.down(jax.nn.silu(self.gate(m)) * self.up(m))


class Qwen2ForCausalLM(nnx.Module):
    """Logits [B, L, V] = f(input_ids [B, L], attention_mask [B, L] or None)."""

    def __init__(self, cfg: Qwen2Config, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        param_dtype = dtype if param_dtype is None else param_dtype
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Qwen2Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = make(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Linear(
            cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states [B, L, D]."""
        b, length = input_ids.shape
        positions, mask = positions_and_mask(b, length, attention_mask)
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed(input_ids)

        def body(block: Qwen2Block, h: jax.Array) -> jax.Array:
            return block(h, cos, sin, mask)

        x = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.layers, x)
        return self.final_norm(x)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        return self.embed.attend(hidden) if self.lm_head is None else self.lm_head(hidden)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.logits_from_hidden(self.hidden_states(input_ids, attention_mask))


def _token_logprobs(model: Qwen2ForCausalLM, hidden: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """log p(targets) [B, T] from hidden [B, T, D], materialising logits only ``chunk`` positions at a time."""
    b, t, d = hidden.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).transpose(1, 0, 2, 3)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).transpose(1, 0, 2)

    def one(args):
        hc, yc = args
        logits = model.logits_from_hidden(hc).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, yc[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    out = jax.lax.map(one, (h, y))  # [n, B, chunk]
    return out.transpose(1, 0, 2).reshape(b, n * chunk)[:, :t]


@partial(jax.jit, static_argnums=(0,), static_argnames=("chunk",))
def next_token_logprobs(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
                        attention_mask: jax.Array, *, chunk: int = 128) -> jax.Array:
    """float32 [B, L-1]: entry t is log p(input_ids[:, t+1] | input_ids[:, :t+1]) (pure, jitted)."""
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(input_ids, attention_mask)
    return _token_logprobs(model, hidden[:, :-1], input_ids[:, 1:], chunk)


@partial(jax.jit, static_argnums=(0,))
def forward(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
            attention_mask: jax.Array | None = None) -> jax.Array:
    """Pure jitted logits [B, L, V]."""
    return nnx.merge(graphdef, state)(input_ids, attention_mask)
