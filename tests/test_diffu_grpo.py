"""d1's diffu-GRPO: the one-step estimator by hand, the loss by hand, an update's direction, the trainer's
objective table (rollouts with any reveal rule) and exact resume."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dultra_jax.config import ConfigError
from dultra_jax.training import split_trainable
from dultra_jax.training.config import load_run_config
from dultra_jax.training.diffu_grpo import (
    DiffuBatch,
    completion_logps,
    completion_mask,
    diffu_grpo_loss,
    make_loss,
    prompt_noise,
)
from dultra_jax.training.grpo import GRPOLossConfig
from dultra_jax.training.step import make_train_step

P, G = 5, 8


@pytest.fixture(scope="module")
def batch(tiny_model):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tiny_model.cfg.mask_token_id, size=(3, P + G)).astype(np.int32)
    attn = np.ones_like(ids)
    attn[2, :2] = 0  # a left-padded prompt
    noise = np.zeros((3, P), bool)
    noise[0, 1] = noise[1, [0, 3]] = True
    cmask = np.ones((3, G), np.float32)
    cmask[1, 5:] = 0
    return DiffuBatch(input_ids=jnp.asarray(ids), prompt_noise=jnp.asarray(noise), completion_mask=jnp.asarray(cmask),
                      advantages=jnp.asarray([1.0, -0.5, 0.25]), attention_mask=jnp.asarray(attn))


@pytest.fixture(scope="module")
def jitted(tiny_model):
    """(graphdef, state, estimate(state, batch), forward(state, ids, mask) -> logits, loss(state, batch, cfg));
    jitted: op-by-op dispatch of the model costs tens of seconds on a loaded CPU."""
    gd, st = nnx.split(tiny_model)
    estimate = jax.jit(lambda s, b: completion_logps(nnx.merge(gd, s), b.input_ids, b.prompt_noise,
                                                     b.attention_mask))
    forward = jax.jit(lambda s, x, m: nnx.merge(gd, s)(x, m)[0])
    loss = jax.jit(lambda s, b, cfg: diffu_grpo_loss(gd, (s,), b, cfg), static_argnums=2)
    return gd, st, estimate, forward, loss


def _hand_logps(model, b: DiffuBatch, forward, state) -> np.ndarray:
    """d1's estimate written out: MASK the completion and the noised prompt tokens, one full forward (logits of
    every position through the model's __call__), float64 log-softmax, the completion's own tokens."""
    ids = np.asarray(b.input_ids).copy()
    x = ids.copy()
    x[:, P:] = model.cfg.mask_token_id
    x[:, :P][np.asarray(b.prompt_noise)] = model.cfg.mask_token_id
    logits = np.asarray(forward(state, jnp.asarray(x), jnp.asarray(b.attention_mask)), np.float64)[:, P:]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.take_along_axis(logp, ids[:, P:, None], axis=-1)[..., 0]


def test_one_step_estimate_matches_a_hand_computation(tiny_model, batch, jitted):
    gd, st, estimate, forward, _ = jitted
    got = np.asarray(estimate(st, batch))
    np.testing.assert_allclose(got, _hand_logps(tiny_model, batch, forward, st), rtol=1e-5, atol=1e-5)
    clean = np.asarray(estimate(st, DiffuBatch(**{**batch.__dict__,
                                                  "prompt_noise": jnp.zeros_like(batch.prompt_noise)})))
    assert not np.allclose(got[:2], clean[:2])  # the masked prompt tokens change the estimate of rows 0 and 1
    np.testing.assert_allclose(got[2], clean[2], rtol=1e-6)  # row 2: nothing masked


def test_loss_is_the_per_token_clipped_objective(tiny_model, batch, jitted):
    gd, st, estimate, forward, jloss = jitted
    new = _hand_logps(tiny_model, batch, forward, st)
    shift = np.array([[0.5, -0.5, 0.05, -0.05, 0.3, -0.3, 0.0, 1.0]] * 3)  # ratios outside and inside [0.8, 1.2]
    old, ref = new - shift, new - 0.1 * shift[::-1]
    cfg = GRPOLossConfig(epsilon_low=0.2, epsilon_high=0.2, advantage_min_clip=None, beta=0.04)
    b = DiffuBatch(**{**batch.__dict__, "old_logps": jnp.asarray(old, jnp.float32),
                      "ref_logps": jnp.asarray(ref, jnp.float32)})
    loss, metrics = jloss(st, b, cfg)
    a, m = np.asarray(batch.advantages)[:, None], np.asarray(batch.completion_mask)
    r = np.exp(shift)
    per = -np.minimum(r * a, np.clip(r, 0.8, 1.2) * a) + 0.04 * (np.exp(ref - new) - (ref - new) - 1)
    assert float(loss) == pytest.approx((per * m).sum() / m.sum(), rel=1e-4)
    assert float(metrics["clip_fraction"]) > 0

    # mu = 1 (no old estimate): ratio 1, value -mean A over tokens, gradient that of -sum(A l) / tokens
    on = DiffuBatch(**{**batch.__dict__})
    cfg1 = GRPOLossConfig(advantage_min_clip=None)
    assert float(jloss(st, on, cfg1)[0]) == pytest.approx(-(a * m).sum() / m.sum(), rel=1e-6)

    def surrogate(s):
        return -jnp.sum(on.advantages[:, None] * estimate(s, on) * on.completion_mask) / jnp.sum(on.completion_mask)

    got, want = jax.jit(lambda s: (jax.grad(lambda t: diffu_grpo_loss(gd, (t,), on, cfg1)[0])(s),
                                   jax.grad(surrogate)(s)))(st)  # one compile
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_host_pieces():
    gen = np.array([[5, 298, 7, 7], [5, 6, 7, 8], [292, 1, 1, 1]])
    np.testing.assert_array_equal(completion_mask(gen, (298, 292)), [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    a, b = prompt_noise((0, 3, 1), 64, 32, 0.15), prompt_noise((0, 3, 1), 64, 32, 0.15)
    np.testing.assert_array_equal(a, b)
    assert 0.1 < a.mean() < 0.2 and not np.array_equal(a, prompt_noise((0, 3, 2), 64, 32, 0.15))


def test_updates_raise_the_advantage_weighted_likelihood(tiny_model, batch, jitted):
    """Loss decrease on a fixed batch, as the trainer's step applies it: with mu = 1 the loss value is constant
    (-mean A), so what must fall is its surrogate -sum_b A_b sum_t l_bt (SGD steps small enough to be first
    order: the random tiny model's gradient norm is ~200)."""
    _, _, estimate, _, _ = jitted
    # a private copy of the arrays: the train step donates what it updates, and tiny_model is the session's
    graphdef, state = nnx.split(tiny_model)
    gd, tr, fr = split_trainable(nnx.merge(graphdef, jax.tree.map(jnp.copy, state)), "all")
    tx = optax.sgd(1e-5)
    step = make_train_step(gd, make_loss(GRPOLossConfig(advantage_min_clip=None)), tx)
    opt = tx.init(tr)
    micro = jax.tree.map(lambda x: x[None], batch)

    def objective(t):
        lp = np.asarray(estimate(nnx.state(nnx.merge(gd, t, fr)), batch))
        return float((np.asarray(batch.advantages)[:, None] * lp * np.asarray(batch.completion_mask)).sum())

    values = [objective(tr)]
    for i in range(3):
        tr, opt, m = step(tr, fr, opt, micro, jax.random.key(i))
        assert float(m["loss"]) == pytest.approx(-7.5 / 21, rel=1e-6)  # -sum(A m) / sum(m)
        values.append(objective(tr))
    assert values[0] < values[1] < values[2] < values[3], values


# ------------------------------------------------------------------------------------------ trainer
def _cfg(*over):
    return load_run_config(None, [
        "model.preset=tiny", "model.overrides={d_model: 32, n_layers: 1, n_heads: 2, n_kv_heads: 2, "
        "mlp_hidden_size: 64}", "task.num_train=32", "task.max_operand=4", "train.seed=0", "train.mode=grpo",
        "train.batch_size=2", "grpo.num_generations=2", "grpo.gen_length=8", "grpo.block_length=4",
        "grpo.temperature=1.0", "grpo.scale_rewards=group", "grpo.advantage_min_clip=null",
        "optim.learning_rate=1e-3", "grpo.loss=diffu_grpo", *over])


def test_objective_table_and_rollout_settings(monkeypatch):
    with pytest.raises(ConfigError, match="needs grpo.rollout.strategy=planner"):
        _cfg("grpo.loss=replay", "grpo.rollout.strategy=threshold")
    with pytest.raises(ConfigError, match="unknown grpo.loss"):
        _cfg("grpo.loss=ppo")
    with pytest.raises(ConfigError, match="reveal"):
        _cfg("grpo.rollout.reveal=greedy")
    with pytest.raises(ConfigError, match="unknown key"):
        _cfg("grpo.rollout.colour=red")
    from dultra_jax.training import trainer as trainer_mod

    seen = {}

    class Stop(Exception):
        pass

    def spy(model, ids, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(trainer_mod, "generate", spy)
    # the rollout step alone (a whole Trainer costs a model build): what it passes to the decoder
    t = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    t.cfg = _cfg("grpo.loss=replay", "grpo.rollout.reveal=topk", "grpo.planner_temperature=0.5")
    t.mcfg, t.num_processes, t.step, t.rollout_plan = SimpleNamespace(pad_token_id=0), 1, 0, None
    t._rollout_model = lambda: None
    batch = {"input_ids": np.ones((2, 3), np.int32), "attention_mask": np.ones((2, 3), np.int32)}
    with pytest.raises(Stop):
        t._rollout(batch, jax.random.key(0))
    assert (seen["strategy"], seen["reveal"], seen["planner_temperature"]) == ("planner", "topk", 0.5)
    t.cfg = _cfg("grpo.rollout.strategy=fixed", "grpo.rollout.steps=4")
    with pytest.raises(Stop):
        t._rollout(batch, jax.random.key(0))
    assert (seen["strategy"], seen["steps"], seen["return_trajectory"]) == ("fixed", 4, True)


def test_resume_is_exact_with_threshold_rollouts(tmp_path):
    """Plain-LLaDA-style rollouts (threshold rule), mu = 2 with old estimates, beta > 0 with reference ones:
    a run cut after its first rollout and resumed ends with the uninterrupted run's parameters and log."""
    over = ["grpo.rollout.strategy=threshold", "grpo.rollout.threshold=0.5", "grpo.num_iterations=2",
            "grpo.beta=0.04", "train.save_every=2"]
    from dultra_jax.training.trainer import Trainer

    full = Trainer(_cfg("train.max_steps=4", *over), tmp_path / "full", progress=False)
    full.run()
    Trainer(_cfg("train.max_steps=2", *over), tmp_path / "cut", progress=False).run()
    resumed = Trainer(_cfg("train.max_steps=4", *over), tmp_path / "cut", progress=False)
    resumed.run()
    for a, b in zip(jax.tree.leaves(full.trainable), jax.tree.leaves(resumed.trainable), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["iteration"] for r in rows] == [0, 1, 0, 1]
    for r, w in zip(rows, want, strict=True):
        for key in ("loss", "kl", "reward_mean", "grad_norm", "clip_fraction"):
            assert r[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), key
    assert rows[1]["kl"] > 0 and rows[1]["max_abs_log_ratio"] > 0  # the second update is off-policy


def test_a_few_steps_raise_the_mean_reward(tmp_path, monkeypatch):
    """d1's objective moves the policy toward what the reward pays for, end to end through the trainer (rollout,
    rewards, advantages, estimate, update). A random tiny model never answers an addition right (every reward 0,
    zero advantages), so the reward here is one its samples differ on: the fraction of digits in the completion."""
    from dultra_jax.rewards import registry
    from dultra_jax.training.trainer import Trainer

    def digit_fraction(ctx, opts):
        return lambda inp: [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in inp.completions]

    monkeypatch.setitem(registry.REWARDS, "digit_fraction", digit_fraction)
    cfg = _cfg("train.max_steps=8", "train.batch_size=4", "grpo.num_generations=4", "grpo.num_iterations=1",
               "grpo.rollout.strategy=threshold", "grpo.rollout.threshold=0.9", "optim.learning_rate=1e-2",
               "grpo.reward_weights={digit_fraction: 1.0}", "train.save_every=100")
    Trainer(cfg, tmp_path / "run", progress=False).run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward_mean"] for r in rows]
    assert len(rewards) == 8  # measured: 0.04, 0.12, 0.18, 0.47, 0.72, 0.71, 0.85, 0.95
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 0.3, rewards
