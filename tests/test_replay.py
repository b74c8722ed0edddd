"""The replayed GRPO loss: memory independent of the recorded iterations S, and host-side trimming of S."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dultra_jax.config import preset
from dultra_jax.training.grpo import (
    GRPOLossConfig,
    Rollout,
    bucket_for,
    grpo_loss,
    recorded_step_buckets,
    trim_rollout,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from replay_memory import replay_grad_memory  # noqa: E402


def _golden_rollout(golden, adv, pad_steps: int = 0):
    """The fixture's recorded rollout, optionally followed by ``pad_steps`` iterations that reveal nothing
    (what the rollout records after every row finished, up to its cap)."""
    reveal = golden["roll_reveal"]
    proposals = golden["roll_x0"].transpose(1, 0, 2)
    logps = golden["roll_logps"].transpose(1, 0, 2)
    pad = ((0, pad_steps), (0, 0), (0, 0))
    return Rollout(prompt_ids=jnp.asarray(golden["dec_prompt"]), reveal=jnp.asarray(np.pad(reveal, pad)),
                   proposals=jnp.asarray(np.pad(proposals, pad)), old_logps=jnp.asarray(np.pad(logps, pad)),
                   advantages=adv)


def test_buckets():
    assert recorded_step_buckets(256) == (8, 16, 32, 64, 128, 256)
    assert recorded_step_buckets(16) == (8, 16)
    assert recorded_step_buckets(100) == (8, 16, 32, 64, 100)
    assert recorded_step_buckets(4) == (4,)
    assert [bucket_for(n, 256) for n in (0, 1, 8, 9, 50, 129, 256)] == [8, 8, 8, 16, 64, 256, 256]
    with pytest.raises(ValueError, match="outside"):
        bucket_for(257, 256)


def test_trimmed_rollout_has_the_same_loss_and_gradient(tiny_model, golden):
    gd, st = nnx.split(tiny_model)
    cfg = GRPOLossConfig(block_length=8, max_completion_length=32, advantage_min_clip=None)
    steps = golden["roll_reveal"].shape[0]
    full = _golden_rollout(golden, jnp.array([1.0, -0.5]), pad_steps=3)  # the padded steps take the skip branch
    trimmed = trim_rollout(full, steps)
    assert trimmed.reveal.shape[0] == steps < full.reveal.shape[0]
    value_and_grad = jax.jit(jax.value_and_grad(lambda st, ro: grpo_loss(gd, (st,), ro, cfg), has_aux=True))
    (loss_full, m_full), g_full = value_and_grad(st, full)
    (loss_trim, m_trim), g_trim = value_and_grad(st, trimmed)
    assert float(loss_full) == pytest.approx(float(loss_trim), rel=1e-6)
    assert float(m_full["replayed_steps"]) == float(m_trim["replayed_steps"]) == steps
    leaves_full, leaves_trim = jax.tree.leaves(g_full), jax.tree.leaves(g_trim)
    assert all(np.isfinite(np.asarray(a)).all() for a in leaves_full)
    for a, b in zip(leaves_full, leaves_trim, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(a).max()) for a in leaves_full) > 1e-4  # a real gradient


def test_trim_refuses_to_drop_revealing_iterations(golden):
    ro = _golden_rollout(golden, jnp.array([1.0, -0.5]))
    with pytest.raises(ValueError, match="drops iterations that revealed"):
        trim_rollout(ro, 4)
    with pytest.raises(ValueError, match="cannot trim"):
        trim_rollout(ro, 0)
    micro = jax.tree.map(lambda a: a[None], _golden_rollout(golden, jnp.array([1.0, -0.5]), pad_steps=2))
    assert trim_rollout(micro, 14, axis=1).reveal.shape == (1, 14, *ro.reveal.shape[1:])


def test_replay_gradient_memory_does_not_grow_with_recorded_steps():
    """AOT memory of jit(grad(grpo_loss)) at two S: far less than one parameter copy per extra iteration."""
    cfg = preset("tiny", d_model=128, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=256, vocab_size=2048,
                 embedding_size=2048, mask_token_id=2047, eos_token_id=2046, pad_token_id=2046)
    small, large = (replay_grad_memory(cfg, s, batch=2, prompt_len=8, gen_len=16, block_length=8) for s in (4, 20))
    per_step = (large["temp_bytes"] - small["temp_bytes"]) / (large["steps"] - small["steps"])
    assert per_step < 0.05 * small["param_bytes"], (small, large)


def test_planner_only_gradient_equals_the_replayed_one(tiny_model, golden):
    """trainable=planner: the per-iteration VJP in the forward scan gives grpo_loss's value, metrics and
    gradient (float32 summation order aside), off-policy ratios, clipping, KL and skipped iterations included."""
    from dultra_jax.training.grpo import planner_grpo_loss
    from dultra_jax.training.step import split_trainable

    gd, tr, fr = split_trainable(tiny_model, "planner")
    cfg = GRPOLossConfig(block_length=8, max_completion_length=32, advantage_min_clip=None, beta=0.1,
                         epsilon_high=0.2)
    ro = _golden_rollout(golden, jnp.array([1.0, -0.5]), pad_steps=2)
    ro = Rollout(**{**ro.__dict__, "old_logps": ro.old_logps - 0.05, "ref_logps": ro.old_logps + 0.1})

    @jax.jit
    def both(t):
        return tuple(jax.value_and_grad(lambda t, fn=fn: fn(gd, (t, fr), ro, cfg), has_aux=True)(t)
                     for fn in (grpo_loss, planner_grpo_loss))

    ((l1, m1), g1), ((l2, m2), g2) = both(tr)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    for k in m1:
        assert float(m1[k]) == pytest.approx(float(m2[k]), rel=1e-5), k
    assert float(m1["clip_fraction"]) > 0
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g1))
    assert scale > 1e-3
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * scale)
