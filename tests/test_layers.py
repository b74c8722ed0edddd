"""Unit checks of the numerics the original specifies (docs/original.md §1)."""

import jax.numpy as jnp
import numpy as np
import pytest

from dultra_jax.config import preset
from dultra_jax.model import DUltra
from dultra_jax.model.layers import RMSNorm, apply_rope, positions_and_mask, rope_tables
from dultra_jax.model.planner_head import timestep_features


def _rope_reference(t, theta):
    """float64 rotate-half RoPE written from the spec: pairs (d, d + h/2), positions = column index."""
    b, length, n, h = t.shape
    inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
    ang = np.arange(length)[:, None] * inv[None]
    ang = np.concatenate([ang, ang], -1)
    rot = np.concatenate([-t[..., h // 2:], t[..., : h // 2]], -1)
    return t * np.cos(ang)[None, :, None] + rot * np.sin(ang)[None, :, None]


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_the_spec(theta):
    t = np.random.default_rng(0).normal(size=(2, 37, 4, 16))
    pos, _ = positions_and_mask(2, 37, None)
    cos, sin = rope_tables(pos, 16, theta)
    out = apply_rope(jnp.asarray(t, jnp.float32), cos, sin)
    np.testing.assert_allclose(np.asarray(out), _rope_reference(t, theta), atol=1e-5)
    other = 500000.0 if theta == 10000.0 else 10000.0  # theta is really used: the other one differs
    assert np.max(np.abs(np.asarray(out) - _rope_reference(t, other))) > 1e-2


def test_rope_theta_matters_at_long_positions():
    cos, sin = rope_tables(jnp.array([[4095]]), 128, 500000.0)
    inv = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    ang = 4095 * np.concatenate([inv, inv])
    np.testing.assert_allclose(np.asarray(cos[0, 0]), np.cos(ang), atol=1e-3)
    np.testing.assert_allclose(np.asarray(sin[0, 0]), np.sin(ang), atol=1e-3)


def test_rmsnorm_casts_before_the_weight_multiply():
    x = np.random.default_rng(1).normal(size=(2, 37, 64)).astype(np.float32)
    norm = RMSNorm(64, 1e-5, dtype=jnp.float32, param_dtype=jnp.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), ref, atol=1e-6)
    nb = RMSNorm(64, 1e-5, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert nb(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("t", [0.0, 0.137, 0.5, 1.0])
def test_timestep_features_cos_first(t):
    feats = np.asarray(timestep_features(jnp.array([t]), 256))[0]
    freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    np.testing.assert_allclose(feats, np.concatenate([np.cos(t * freqs), np.sin(t * freqs)]), atol=1e-6)


def test_positions_count_real_tokens_only():
    pos, mask = positions_and_mask(2, 5, jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(pos), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert mask.shape == (2, 1, 1, 5)


def test_gqa_equals_attention_with_each_kv_head_repeated_for_its_group():
    """Independent reference: grouped-query attention is multi-head attention whose K/V heads are repeated for
    their group (query head h reads kv head h // (n_heads / n_kv_heads), the original's repeat_kv)."""
    from flax import nnx

    gqa = DUltra(preset("tiny", n_kv_heads=2), rngs=nnx.Rngs(3))
    mha = DUltra(preset("tiny"), rngs=nnx.Rngs(4))
    assert gqa.backbone.blocks.layers.k.kernel[...].shape == (2, 64, 32)
    state = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
    for name in ("k", "v"):
        w = np.asarray(state["backbone"]["blocks"]["layers"][name]["kernel"])  # [L, D, n_kv * hd]
        layers, d, _ = w.shape
        state["backbone"]["blocks"]["layers"][name]["kernel"] = jnp.asarray(
            np.repeat(w.reshape(layers, d, 2, 16), 2, axis=2).reshape(layers, d, 64))
    target = nnx.state(mha, nnx.Param)
    nnx.replace_by_pure_dict(target, state)
    nnx.update(mha, target)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 299, size=(2, 9)), jnp.int32)
    logits, hidden = gqa(ids)
    ref_logits, ref_hidden = mha(ids)
    assert logits.shape == (2, 9, 300)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref_hidden), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=1e-5)
    # and the grouping matters: pairing the heads the other way (h % n_kv) computes something else
    other = np.tile(np.asarray(state["backbone"]["blocks"]["layers"]["k"]["kernel"]).reshape(2, 64, 4, 16)[:, :, ::2],
                    (1, 1, 2, 1)).reshape(2, 64, 64)
    target = nnx.state(mha, nnx.Param)
    target["backbone"]["blocks"]["layers"]["k"]["kernel"].value = jnp.asarray(other)
    nnx.update(mha, target)
    assert np.max(np.abs(np.asarray(mha(ids)[1]) - np.asarray(hidden))) > 1e-3


def test_block_embeddings_need_current_block():
    cfg = preset("tiny", use_block_embeddings=True)
    m = DUltra(cfg)
    h = jnp.zeros((1, 6, 64))
    idx = jnp.zeros((1, 6), bool)
    with pytest.raises(ValueError, match="current_block"):
        m.planner_logits(h, jnp.array([0.5]), idx)
    assert m.planner_logits(h, jnp.array([0.5]), idx, current_block=idx).shape == (1, 6)


def test_input_validation():
    m = DUltra(preset("tiny"))
    with pytest.raises(ValueError, match="integer array"):
        m(jnp.zeros((2, 3, 4), jnp.int32))
    with pytest.raises(ValueError, match="hidden must be"):
        m.planner_logits(jnp.zeros((1, 4, 32)), jnp.array([0.1]), jnp.zeros((1, 4), bool))


def test_mitchell_init_scales_per_layer():
    m = DUltra(preset("tiny", n_layers=4, mlp_hidden_size=128), rngs=None)
    o = np.asarray(m.backbone.blocks.layers.o.kernel[...])
    stds = o.reshape(4, -1).std(axis=1)
    expect = (1 / 8.0) / np.sqrt(2 * (np.arange(4) + 1))
    np.testing.assert_allclose(stds, expect, rtol=0.15)
    assert bool(jnp.all(m.backbone.final_norm.scale[...] == 1.0))


def test_block_and_mask_embeddings_match_a_per_token_numpy_reference():
    """Independent reference: each position's conditioning is temb(t) + mask_emb[is_masked] + block_emb[in_block]
    (the original adds them per token); the AdaLN input is LN(h) * (1 + scale) + shift of that vector's
    modulation. The package computes it on a deduplicated table: gathered back, it must equal the per-token sum."""
    from flax import nnx

    m = DUltra(preset("tiny", use_block_embeddings=True), rngs=nnx.Rngs(5))
    head = m.planner
    rng = np.random.default_rng(2)
    t = np.array([0.3, 0.9], np.float32)
    masked = rng.random((2, 7)) < 0.5
    block = np.zeros((2, 7), bool)
    block[0, 2:5], block[1, 4:] = True, True

    def p(mod):
        return {k: np.asarray(v[...], np.float64) for k, v in vars(mod).items() if k in ("kernel", "bias")}

    ti, to, mod = p(head.time_in), p(head.time_out), p(head.adaln_in.modulation)
    mask_e = np.asarray(head.mask_embedding.embedding[...], np.float64)
    block_e = np.asarray(head.block_embedding.embedding[...], np.float64)
    half = 128
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
    feats = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], -1)
    z = feats @ ti["kernel"] + ti["bias"]
    temb = (z / (1 + np.exp(-z))) @ to["kernel"] + to["bias"]  # [B, D]
    cond = temb[:, None] + mask_e[masked.astype(int)] + block_e[block.astype(int)]  # [B, W, D]

    table, index = head.conditioning(jnp.asarray(t), jnp.asarray(masked), jnp.asarray(block))
    got = np.take_along_axis(np.asarray(table), np.asarray(index)[..., None], axis=1)
    np.testing.assert_allclose(got, cond, atol=1e-5)

    h = rng.normal(size=(2, 7, 64))
    scale, shift = np.split(cond @ mod["kernel"] + mod["bias"], 2, -1)
    ln = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + head.adaln_in.eps)
    out = head.adaln_in(jnp.asarray(h, jnp.float32), table, index)
    np.testing.assert_allclose(np.asarray(out), ln * (1 + scale) + shift, atol=1e-4)
    # the block flag matters: the same positions conditioned as outside the block differ
    table0, index0 = head.conditioning(jnp.asarray(t), jnp.asarray(masked), jnp.zeros((2, 7), bool))
    assert np.max(np.abs(np.asarray(head.adaln_in(jnp.asarray(h, jnp.float32), table0, index0)) - out)) > 1e-3
