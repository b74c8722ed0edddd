"""Training: hand-computed GRPO pieces, gradients, accumulation, planner pre-training, SFT, resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dultra_jax
from dultra_jax.decoding.rules import factor_count
from dultra_jax.training import (
    GRPOLossConfig,
    Rollout,
    clipped_objective,
    factor_targets,
    group_advantages,
    grpo_loss,
    make_train_step,
    noise_batch,
    planner_loss,
    sft_loss,
    split_trainable,
    weighted_bce,
)
from dultra_jax.training.config import load_run_config
from dultra_jax.training.grpo import k3_kl
from dultra_jax.training.trainer import Trainer


# ------------------------------------------------------------------------------------------ hand-computed
def test_group_advantages():
    r = jnp.array([3.0, 1.0, 1.0, 3.0])
    np.testing.assert_allclose(group_advantages(r, 4), [1, -1, -1, 1])
    np.testing.assert_allclose(group_advantages(r, 4, "group"), np.array([1, -1, -1, 1]) / (np.sqrt(4 / 3) + 1e-4),
                               rtol=1e-6)
    np.testing.assert_allclose(group_advantages(jnp.array([2.0, 2, 2]), 3, "group"), [0, 0, 0])
    np.testing.assert_allclose(group_advantages(jnp.array([1.0, 3, 5, 9]), 2), [-1, 1, -2, 2])
    np.testing.assert_allclose(group_advantages(jnp.array([1.0, 3, 5, 9]), 2, "batch"),
                               np.array([-1, 1, -2, 2]) / (np.std([1, 3, 5, 9], ddof=1) + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(group_advantages(jnp.array([1.0, jnp.nan]), 2), [0.5, -0.5])
    with pytest.raises(ValueError, match="groups"):
        group_advantages(jnp.ones(3), 2)


def test_clipped_objective_cases():
    cfg = GRPOLossConfig(epsilon_low=0.2, epsilon_high=1.0, advantage_min_clip=None)
    loss, clipped = clipped_objective(jnp.log(jnp.array([2.5, 0.5])), jnp.array([1.0, -0.5]), cfg)
    np.testing.assert_allclose(loss, [-2.0, 0.4], rtol=1e-6)
    assert clipped.tolist() == [True, True]
    # the original's normalisation: (-2.0 + 0.4) / B_c / L with B_c = 2, L = 256
    assert float(loss.sum() / 2 / 256) == pytest.approx(-0.003125)
    cfg_c = GRPOLossConfig(epsilon_low=0.2, epsilon_high=1.0, advantage_min_clip=0.1)
    loss_c, _ = clipped_objective(jnp.log(jnp.array([2.5, 0.5])), jnp.array([1.0, -0.5]), cfg_c)
    assert float(loss_c.sum() / 2 / 256) == pytest.approx(-0.00390625)
    # inside the clip range and below it, positive and negative advantages
    loss_in, clipped_in = clipped_objective(jnp.log(jnp.array([1.1, 0.7, 0.7])), jnp.array([1.0, 1.0, -1.0]), cfg)
    np.testing.assert_allclose(loss_in, [-1.1, -0.7, 0.8], rtol=1e-6)
    assert clipped_in.tolist() == [False, False, True]
    # delta caps the unclipped ratio
    loss_d, _ = clipped_objective(jnp.log(jnp.array([3.0])), jnp.array([-1.0]), GRPOLossConfig(
        epsilon_low=0.2, epsilon_high=1.0, delta=1.5, advantage_min_clip=None))
    np.testing.assert_allclose(loss_d, [2.0], rtol=1e-6)  # -min(1.5 * -1, 2.0 * -1) = 2.0
    # on-policy gradient: d loss / d lambda = -A
    g = jax.grad(lambda lr: clipped_objective(lr, jnp.array([1.0]), cfg)[0].sum())(jnp.zeros(1))
    np.testing.assert_allclose(g, [-1.0])


def test_k3_kl_and_step_logps():
    new = jnp.array([[-1.0, -2.0, 0.0]])
    ref = jnp.array([[-1.5, -2.0, 0.0]])
    where = jnp.array([[True, True, False]])
    d = -0.5
    np.testing.assert_allclose(k3_kl(new, ref, where), [np.exp(d) - d - 1], rtol=1e-6)
    from dultra_jax.decoding.rules import planner_step_logps

    p = jnp.array([[0.8, 0.1]])
    ell = planner_step_logps(p, jnp.array([[True, True]]), jnp.array([[True, False]]), jnp.array([[-0.2, 0.0]]))
    np.testing.assert_allclose(ell, [[np.log(0.8) - 0.2, np.log(0.9)]], rtol=1e-5)
    assert float(ell.sum()) == pytest.approx(-0.52850, abs=1e-5)


def test_length_normalisation(tiny_model, golden):
    """The loss divides by max_completion_length: doubling it halves the loss."""
    gd, st = nnx.split(tiny_model)
    ro = _golden_rollout(golden, jnp.array([1.0, -0.5]))
    a = grpo_loss(gd, (st,), ro, GRPOLossConfig(block_length=8, max_completion_length=32, advantage_min_clip=None))[0]
    b = grpo_loss(gd, (st,), ro, GRPOLossConfig(block_length=8, max_completion_length=64, advantage_min_clip=None))[0]
    assert float(a) == pytest.approx(2 * float(b), rel=1e-6)


# ------------------------------------------------------------------------------------------ replay + gradients
def _golden_rollout(golden, adv):
    return Rollout(prompt_ids=jnp.asarray(golden["dec_prompt"]), reveal=jnp.asarray(golden["roll_reveal"]),
                   proposals=jnp.asarray(golden["roll_x0"].transpose(1, 0, 2)),
                   old_logps=jnp.asarray(golden["roll_logps"].transpose(1, 0, 2)), advantages=adv)


def test_on_policy_replay_of_the_golden_rollout(tiny_model, golden):
    gd, st = nnx.split(tiny_model)
    cfg = GRPOLossConfig(block_length=8, max_completion_length=32, advantage_min_clip=None)
    loss, metrics = grpo_loss(gd, (st,), _golden_rollout(golden, jnp.array([1.0, 1.0])), cfg)
    assert float(metrics["max_abs_log_ratio"]) < 1e-4  # replayed log-probs equal the recorded ones
    assert float(metrics["clip_fraction"]) == 0.0
    steps_with_reveal = golden["roll_reveal"].any(-1).sum()  # row-steps that revealed something
    assert float(loss) == pytest.approx(-steps_with_reveal / 2 / 32, rel=1e-4)


def test_grpo_gradient_matches_finite_differences(tiny_model, golden):
    gd, st = nnx.split(tiny_model)
    cfg = GRPOLossConfig(block_length=8, max_completion_length=32, advantage_min_clip=None)
    ro = _golden_rollout(golden, jnp.array([1.0, -0.5]))
    loss_fn = jax.jit(lambda s: grpo_loss(gd, (s,), ro, cfg)[0])
    grads = jax.jit(jax.grad(lambda s: grpo_loss(gd, (s,), ro, cfg)[0]))(st)
    flat_g = dict(nnx.to_flat_state(grads))
    h = 1e-2
    for path, idx in ((("planner", "out", "bias"), (0,)), (("backbone", "final_norm", "scale"), (3,)),
                      (("backbone", "blocks", "layers", "up", "kernel"), (1, 5, 7))):
        def shifted(sign, path=path, idx=idx):
            s2 = jax.tree.map(lambda a: a, st)
            var = dict(nnx.to_flat_state(s2))[path]
            var[...] = var[...].at[idx].add(sign * h)
            return float(loss_fn(s2))
        fd = (shifted(1) - shifted(-1)) / (2 * h)
        g = float(flat_g[path][...][idx])
        assert g == pytest.approx(fd, rel=2e-2, abs=1e-4), (path, g, fd)


def test_accumulated_gradient_equals_full_batch(tiny_model, golden):
    """Two micro-batches of one row each give the same update as one micro-batch of two rows (SGD, lr 1)."""
    gd, tr, fr = split_trainable(tiny_model, "all")
    cfg = GRPOLossConfig(block_length=8, max_completion_length=32, advantage_min_clip=None)
    ro = _golden_rollout(golden, jnp.array([1.0, -0.5]))

    def loss(g, states, batch, rng):
        return grpo_loss(g, states, batch, cfg)

    tx = optax.sgd(1.0)
    step = make_train_step(gd, loss, tx)
    one = jax.tree.map(lambda a: a[None], ro)
    two = Rollout(prompt_ids=ro.prompt_ids[:, None], reveal=jnp.moveaxis(ro.reveal[:, :, None], 1, 0),
                  proposals=jnp.moveaxis(ro.proposals[:, :, None], 1, 0),
                  old_logps=jnp.moveaxis(ro.old_logps[:, :, None], 1, 0), advantages=ro.advantages[:, None])
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731  (the step donates its inputs)
    old = [np.asarray(a, np.float64) for a in jax.tree.leaves(tr)]
    new1, _, m1 = step(copy(tr), fr, tx.init(tr), one, jax.random.key(0))
    new2, _, m2 = step(copy(tr), fr, tx.init(tr), two, jax.random.key(0))
    g1 = [o - np.asarray(a, np.float64) for o, a in zip(old, jax.tree.leaves(new1), strict=True)]  # lr 1: p - g
    g2 = [o - np.asarray(a, np.float64) for o, a in zip(old, jax.tree.leaves(new2), strict=True)]
    scale = max(1.0, max(float(np.abs(g).max()) for g in g1))
    err = max(float(np.abs(a - b).max()) for a, b in zip(g1, g2, strict=True))
    assert err <= 1e-5 * scale, (err, scale)
    assert scale > 1e-3  # a real gradient
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)


# ------------------------------------------------------------------------------------------ planner pre-training
def test_factor_targets_equal_the_rule(golden):
    logits = jnp.asarray(golden["fwd_logits"])
    block = np.zeros((2, 37), bool)
    block[:, 20:30] = True
    targets = np.asarray(factor_targets(logits, jnp.asarray(block)))
    probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float64) if jax.config.jax_enable_x64 else logits, -1))
    for b in range(2):
        conf = probs[b, np.arange(37), probs[b].argmax(-1)][20:30]
        order = np.argsort(-conf, kind="stable")
        k = int(factor_count(jnp.asarray(conf[order][None]), jnp.asarray([10]), 1.0)[0])
        want = np.zeros(37)
        want[20 + order[:k]] = 1
        np.testing.assert_array_equal(targets[b], want)
    assert targets[:, :20].sum() == 0 and targets[:, 30:].sum() == 0


def test_weighted_bce():
    z = jnp.zeros(4)
    y = jnp.array([1.0, 0, 0, 0])
    where = jnp.ones(4, bool)
    # pos_weight 3: (3 * ln 2 + 3 * ln 2) / 4
    assert float(weighted_bce(z, y, where)) == pytest.approx(6 * np.log(2) / 4, rel=1e-6)
    assert float(weighted_bce(z, jnp.ones(4), where)) == pytest.approx(np.log(2), rel=1e-6)
    assert float(weighted_bce(z, y, jnp.zeros(4, bool))) == 0.0


def test_noise_collator():
    rng = np.random.default_rng(0)
    ids = np.arange(2 * 64).reshape(2, 64) % 200
    noisy, block = noise_batch(ids, np.array([10, 62]), 299, rng, min_block=8)
    assert block[1].sum() == 0 and np.array_equal(noisy[1], ids[1])  # N - P <= 2: skipped
    masked = np.nonzero(noisy[0] == 299)[0]
    chosen = np.nonzero(block[0])[0]
    assert chosen.size >= 1 and set(chosen) <= set(masked)
    assert chosen.min() >= 10 and np.array_equal(noisy[0, :10], ids[0, :10])  # the prompt is never noised
    assert chosen.max() - chosen.min() < 64 - 10 and len(chosen) <= 64 - 10
    tail = masked[masked > chosen.max()]
    assert np.array_equal(tail, np.arange(tail.min(), 64))  # everything after the block is masked


def test_planner_pretraining_freezes_the_backbone_and_learns(tiny_dir):
    model = dultra_jax.load(tiny_dir)
    gd, tr, fr = split_trainable(model, "planner")
    assert {p[0] for p, _ in nnx.to_flat_state(tr)} == {"planner"}
    backbone_before = [np.asarray(a).copy() for a in jax.tree.leaves(fr)]
    tx = optax.adam(3e-3)
    opt = tx.init(tr)
    assert {p[0] for p, _ in nnx.to_flat_state(nnx.state(opt)) if p and p[0] in ("backbone", "planner")} <= {
        "planner"}
    step = make_train_step(gd, planner_loss, tx)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 290, size=(8, 48))
    noisy, block = noise_batch(ids, np.full(8, 12), 299, rng, min_block=8)
    batch = {"input_ids": jnp.asarray(noisy[None]), "block_index": jnp.asarray(block[None])}
    losses = []
    for i in range(50):
        tr, opt, m = step(tr, fr, opt, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    for a, b in zip(backbone_before, jax.tree.leaves(fr), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert np.mean(losses[-5:]) < 0.7 * losses[0]


# ------------------------------------------------------------------------------------------ SFT + trainer
def _cfg(tmp_path, *over):
    return load_run_config(None, [
        "model.preset=tiny", "model.overrides={d_model: 64, n_layers: 2, mlp_hidden_size: 128}",
        "task.num_train=64", "task.num_eval=16", "task.max_operand=4", "train.save_every=2", "train.seed=0",
        "sequence.gen_length=8", "eval.decode.gen_length=8", "eval.decode.block_length=8", "eval.num_examples=16",
        *over])


def test_sft_loss_decreases_and_learns_a_toy_task(tmp_path):
    cfg = _cfg(tmp_path, "train.mode=sft", "train.batch_size=32", "train.max_steps=250", "optim.learning_rate=3e-3",
               "optim.weight_decay=0.0", "train.save_every=1000", "eval.decode.strategy=fixed")
    trainer = Trainer(cfg, tmp_path / "sft", progress=False)
    trainer.run()
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([r["loss"] for r in rows[-20:]]) < 0.3 * np.mean([r["loss"] for r in rows[:5]])
    assert trainer.evaluate()["eval_accuracy"] >= 0.5  # 25 possible problems, operands 0..4


@pytest.mark.parametrize("mode, extra", [
    ("sft", ["train.batch_size=8"]),
    ("grpo", ["train.batch_size=2", "grpo.num_generations=2", "grpo.gen_length=8", "grpo.block_length=4",
              "grpo.temperature=1.0", "grpo.scale_rewards=group", "grpo.advantage_min_clip=null",
              "optim.learning_rate=1e-3"]),
])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, mode, extra):
    full = Trainer(_cfg(tmp_path, f"train.mode={mode}", "train.max_steps=4", *extra), tmp_path / "full",
                   progress=False)
    full.run()
    first = Trainer(_cfg(tmp_path, f"train.mode={mode}", "train.max_steps=2", *extra), tmp_path / "cut",
                    progress=False)
    first.run()
    resumed = Trainer(_cfg(tmp_path, f"train.mode={mode}", "train.max_steps=4", *extra), tmp_path / "cut",
                      progress=False)
    resumed.run()
    for a, b in zip(jax.tree.leaves(full.trainable), jax.tree.leaves(resumed.trainable), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("step", "loss", "grad_norm"):
        assert key in rows[-1]
    if mode == "grpo":
        for key in ("reward_mean", "nfe_mean", "tpf", "clip_fraction", "advantage_std"):
            assert key in rows[-1]


def test_nan_guard_skips_and_aborts(tmp_path):
    from dultra_jax.training.trainer import TrainingAborted

    cfg = _cfg(tmp_path, "train.mode=sft", "train.batch_size=8", "train.max_steps=10", "train.max_bad_steps=3",
               "optim.learning_rate=1e-3")
    trainer = Trainer(cfg, tmp_path / "nan", progress=False)
    before = [np.asarray(a).copy() for a in jax.tree.leaves(trainer.trainable)]
    trainer.sequences = trainer.sequences.copy()
    # poison the model: a NaN embedding row makes every loss NaN
    emb = dict(nnx.to_flat_state(trainer.trainable))[("backbone", "embed", "embedding")]
    emb[...] = emb[...].at[:].set(jnp.nan)
    before = [np.asarray(a).copy() for a in jax.tree.leaves(trainer.trainable)]
    with pytest.raises(TrainingAborted, match="3 non-finite steps"):
        trainer.run()
    for a, b in zip(before, jax.tree.leaves(trainer.trainable), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    rows = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped"] == 1.0 for r in rows)


def test_bad_config_values(tmp_path):
    from dultra_jax.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        load_run_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="train.mode"):
        load_run_config(None, ["train.mode=dpo"])
    with pytest.raises(ConfigError, match="multiple of train.micro_batches"):
        load_run_config(None, ["train.batch_size=3", "train.micro_batches=2"])
    with pytest.raises(ConfigError, match="cannot read"):
        load_run_config(None, ["optim.learning_rate=fast"])
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="rollout_weights"):
        load_run_config(None, ["train.rollout_weights=fp8"])
    with pytest.raises(ConfigError, match="num_iterations"):
        load_run_config(None, ["grpo.num_iterations=0"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_run_config(None, ["grpo.max_completion_lenght=3"])
    cfg = load_run_config(None, ["grpo.gen_length=64", "grpo.epsilon_high=0.5"])
    assert isinstance(cfg.grpo, GRPOLossConfig) and cfg.grpo.max_completion_length == 64  # the loss config itself
    assert cfg.grpo.epsilon_high == 0.5 and cfg.task.pad_to_multiple == 64


@pytest.mark.parametrize("mesh", ["data=2,fsdp=2,tensor=2"])
def test_sharded_train_step_equals_single_device(tiny_dir, mesh):
    from dultra_jax.parallel import ShardingPlan
    from dultra_jax.training.step import init_optimizer

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py sets them up")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 290, size=(2, 8, 24))
    answer = np.zeros_like(ids)
    answer[..., 10:] = 1
    batch = {"input_ids": ids, "answer_mask": answer}
    tx = optax.adamw(1e-3)

    def run(plan):
        model = dultra_jax.load(tiny_dir)
        if plan is not None:
            model = plan.shard_model(model)
        gd, tr, fr = split_trainable(model, "all")
        opt = init_optimizer(tx, tr, plan)
        if plan is None:
            step = make_train_step(gd, sft_loss, tx)
            b = jax.tree.map(jnp.asarray, batch)
        else:
            step = make_train_step(gd, sft_loss, tx, plan=plan, trainable=tr, frozen=fr, opt_state=opt)
            b = {k: plan.shard_batch(v, [None, "activation_batch", None]) for k, v in batch.items()}
        tr, opt, metrics = step(tr, fr, opt, b, jax.random.key(3))
        return tr, metrics

    plan = ShardingPlan.create(mesh)
    single, m1 = run(None)
    sharded, m2 = run(plan)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    q = dict(nnx.to_flat_state(sharded))[("backbone", "blocks", "layers", "q", "kernel")][...]
    assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated


# ------------------------------------------------------------------------------------------ what the config says
_GRPO_SMALL = ["train.mode=grpo", "train.batch_size=2", "grpo.num_generations=2", "grpo.gen_length=8",
               "grpo.block_length=4", "grpo.temperature=1.0", "grpo.scale_rewards=group",
               "grpo.advantage_min_clip=null", "optim.learning_rate=1e-3"]


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_recorded_step_buckets_and_trim(golden):
    from dultra_jax.training.grpo import bucket_for, recorded_step_buckets, trim_rollout

    assert recorded_step_buckets(256) == (8, 16, 32, 64, 128, 256)
    assert recorded_step_buckets(16) == (8, 16) and recorded_step_buckets(5) == (5,)
    assert [bucket_for(n, 256) for n in (0, 8, 9, 50, 256)] == [8, 8, 16, 64, 256]
    with pytest.raises(ValueError):
        bucket_for(257, 256)
    ro = _golden_rollout(golden, jnp.array([1.0, -0.5]))
    with pytest.raises(ValueError, match="revealed tokens"):  # the golden rollout reveals at all 14 steps
        trim_rollout(ro, 3)
    t = trim_rollout(ro, 3, check=False)
    assert t.reveal.shape[0] == t.proposals.shape[0] == t.old_logps.shape[0] == 3
    np.testing.assert_array_equal(t.reveal, ro.reveal[:3])


def test_grpo_compiles_once_per_padded_length_and_bucket(tmp_path):
    """Prompts of different lengths (26-28 tokens, one prompt per step, padded to a multiple of 2): the train
    step and the rollout loop compile once per (padded length, recorded-step bucket), not once per step."""
    compiles = {"train_step": 0, "_decode": 0}

    def listen(event, duration, **kw):
        name = str(kw.get("fun_name", "")).removeprefix("jit(").removesuffix(")")
        if event == "/jax/core/compile/backend_compile_duration" and name in compiles:
            compiles[name] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        cfg = _cfg(tmp_path, *_GRPO_SMALL, "train.batch_size=1", "train.max_steps=6", "train.save_every=100",
                   "task.pad_to_multiple=2", "task.max_operand=20")
        trainer = Trainer(cfg, tmp_path / "compiles", progress=False)
        trainer.run()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    rows = _rows(tmp_path / "compiles")
    shapes = {(r["prompt_length"], r["recorded_steps"]) for r in rows}
    lengths = {r["prompt_length"] for r in rows}
    assert all(p % 2 == 0 for p in lengths)
    assert len(rows) == 6 > len(shapes)  # shapes repeat, so a per-step recompile would show
    assert len(lengths) > 1  # and several padded lengths occur
    print("compilations", compiles, "shapes (padded length, recorded steps)", sorted(shapes))
    assert 1 <= compiles["train_step"] <= len(shapes), (compiles, shapes)
    assert 1 <= compiles["_decode"] <= len(lengths), (compiles, lengths)


def test_num_iterations_counts_updates_and_reference_stays_at_step_0(tmp_path):
    """mu = 2: three optimiser updates are three steps (rows, schedule, max_steps), the second update reuses
    the first's rollout, checkpoints land on rollout boundaries (train.keep = 1 keeps the last); beta > 0 without a
    sync interval keeps the step-0 policy as the reference (checkpointed)."""
    cfg = _cfg(tmp_path, *_GRPO_SMALL, "train.max_steps=3", "train.save_every=2", "train.keep=1",
               "grpo.num_iterations=2", "grpo.beta=0.05", "optim.schedule=linear", "optim.total_steps=4",
               "optim.min_learning_rate=1e-4", "logging.samples_every=2", "logging.samples_per_step=4")
    trainer = Trainer(cfg, tmp_path / "mu", progress=False)
    start = [np.asarray(a).copy() for a in jax.tree.leaves(trainer.trainable)]
    trainer.run()
    rows = _rows(tmp_path / "mu")
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["iteration"] for r in rows] == [0, 1, 0]
    assert rows[0]["reward_mean"] == rows[1]["reward_mean"] and rows[0]["rollout_s"] == rows[1]["rollout_s"]
    assert rows[1]["loss"] != rows[0]["loss"]  # every iteration's own metrics
    for r in rows:
        assert r["lr"] == pytest.approx(float(trainer.schedule(r["step"] - 1)))
    assert rows[0]["lr"] > rows[1]["lr"] > rows[2]["lr"]
    count = [a for p, a in jax.tree_util.tree_leaves_with_path(trainer.opt_state) if "count" in str(p)]
    assert count and all(int(c) == 3 for c in count)
    trainer.ckpt.wait_until_finished()  # rollout boundaries 2 and 3 were saved; train.keep = 1 pruned step 2
    assert trainer.ckpt.all_steps() == [3]
    assert sorted(p.name for p in (tmp_path / "mu" / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    for a, b in zip(start, jax.tree.leaves(trainer.ref_trainable), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(start, jax.tree.leaves(trainer.trainable),
                                                                    strict=True))
    _check_watchable(tmp_path / "mu", rows, groups=2, generations=2)


def test_reference_resyncs_every_k_updates(tmp_path):
    """grpo.ref_sync_every = 2: after 3 updates the reference is the policy after update 2 (not step 0, not the
    latest). (train.keep: test_num_iterations_counts_updates_and_reference_stays_at_step_0.)"""
    cfg = _cfg(tmp_path, *_GRPO_SMALL, "train.max_steps=3", "train.save_every=1000", "grpo.beta=0.05",
               "grpo.ref_sync_every=2")
    trainer = Trainer(cfg, tmp_path / "sync", progress=False)
    start = [np.asarray(a).copy() for a in jax.tree.leaves(trainer.trainable)]
    after = {}  # step -> the policy's leaves after that update (metrics are written every update)
    write = trainer.metrics.write

    def snapshot(row):
        after[row["step"]] = [np.asarray(a).copy() for a in jax.tree.leaves(trainer.trainable)]
        write(row)

    trainer.metrics.write = snapshot
    trainer.run()
    ref = [np.asarray(a) for a in jax.tree.leaves(trainer.ref_trainable)]
    assert sorted(after) == [1, 2, 3]
    for a, b in zip(after[2], ref, strict=True):
        np.testing.assert_array_equal(a, b)
    for other in (start, after[1], after[3]):
        assert any(not np.array_equal(a, b) for a, b in zip(other, ref, strict=True))


def _check_watchable(out, rows, *, groups: int, generations: int):
    """The rollout statistics of each metrics row, recomputed from the rollout's logged samples (all its rows)."""
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    by_step: dict[int, list] = {}
    for s in samples:
        by_step.setdefault(s["step"], []).append(s)
    # rollouts feed steps (1, 2) and (3, 4): each contains a multiple of samples_every=2, logged at its first
    assert sorted(by_step) == [1, 3] and all(len(v) == groups * generations for v in by_step.values())
    metrics = {r["step"]: r for r in rows}
    for step, got in by_step.items():
        m = metrics[step]
        reward = np.array([s["reward"] for s in got]).reshape(groups, generations)
        assert m["reward_mean"] == pytest.approx(reward.mean())
        assert m["frac_reward_zero_std"] == pytest.approx(np.mean(reward.std(-1) < 1e-8))
        lengths = np.array([s["length"] for s in got])
        assert m["completion_length_mean"] == pytest.approx(lengths.mean())
        assert (m["completion_length_min"], m["completion_length_max"]) == (lengths.min(), lengths.max())
        assert m["eos_terminated_ratio"] == pytest.approx(np.mean([not s["truncated"] for s in got]))
        assert all((s["length"] == 8) == s["truncated"] for s in got)  # gen_length 8: untruncated end earlier
        for name in got[0]["rewards"]:
            values = np.array([np.nan if s["rewards"][name] is None else s["rewards"][name] for s in got])
            assert m[f"reward_std/{name}"] == pytest.approx(np.nanstd(values))
            assert m[f"reward/{name}"] == pytest.approx(np.nanmean(values))
        assert m["nfe_mean"] == pytest.approx(np.mean([s["nfe"] for s in got]))
        assert all(s["prompt"].endswith("=") or "=" in s["prompt"] for s in got)
    for m in rows:
        assert 0.0 < m["planner_reveal_prob"] < 1.0 and 0.0 < m["planner_entropy"] <= np.log(2) + 1e-6
        assert m["rollout_tokens_per_s"] > 0 and m["replay_tokens_per_s"] > 0


def test_frac_reward_zero_std_and_completion_lengths():
    from dultra_jax.training.samples import completion_lengths, frac_reward_zero_std

    assert frac_reward_zero_std(np.array([1.0, 1.0, 0.0, 2.0, 0.5, 0.5 + 1e-12]), 2) == pytest.approx(2 / 3)
    gen = np.array([[5, 9, 7, 9], [5, 5, 5, 5], [3, 5, 5, 7]])
    lengths, done = completion_lengths(gen, [7, 9])  # up to and including the first stop id
    assert lengths.tolist() == [2, 4, 4] and done.tolist() == [True, False, True]


def test_rewards_follow_the_run(tmp_path):
    from dultra_jax.training.config import load_run_config as load

    def weights(*over):
        t = Trainer.__new__(Trainer)
        t.cfg, t.plan, t.num_processes = load(None, ["task.name=gsm8k", *over]), None, 1
        t._build_rewards()
        return t.rewards.weights

    assert "think_format" in weights("task.prompt_mode=thinking")
    assert "think_format" not in weights("task.prompt_mode=non-thinking")
    assert weights("train.trainable=all")["step_penalty"] > 0
    assert weights("train.trainable=backbone")["step_penalty"] == 0.0
    t = Trainer.__new__(Trainer)
    t.cfg, t.plan, t.num_processes = load(None, ["train.trainable=backbone"]), None, 1  # synthetic task too
    t._build_rewards()
    assert t.rewards.weights["step_penalty"] == 0.0


def test_sft_and_planner_ignore_padding(tiny_model):
    """Left padding is masked: its token ids do not change the SFT or planner loss (nor the timestep)."""
    gd, st = nnx.split(tiny_model)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 290, size=(2, 24)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    other = ids.copy()
    other[0, :5] = rng.integers(0, 290, size=5)
    answer = np.zeros_like(ids)
    answer[:, 12:] = 1
    key = jax.random.key(0)

    def sft(x, m):
        return float(sft_loss(gd, (st,), {"input_ids": jnp.asarray(x), "answer_mask": jnp.asarray(answer),
                                          **({} if m is None else {"attention_mask": jnp.asarray(m)})}, key)[0])

    assert sft(ids, mask) == pytest.approx(sft(other, mask), rel=1e-5)
    assert sft(ids, None) != pytest.approx(sft(other, None), rel=1e-5)  # without the mask the pads matter
    noisy, block = noise_batch(ids, np.full(2, 12), 299, np.random.default_rng(1), min_block=4)
    noisy_other = noisy.copy()
    noisy_other[0, :5] = other[0, :5]

    def planner(x):
        return float(planner_loss(gd, (st,), {"input_ids": jnp.asarray(x), "block_index": jnp.asarray(block),
                                              "attention_mask": jnp.asarray(mask)}, key)[0])

    assert planner(noisy) == pytest.approx(planner(noisy_other), rel=1e-5)


def test_encode_sequences_masks_prompt_padding(tmp_path):
    from dultra_jax.data import synthetic
    from dultra_jax.training.trainer import encode_sequences

    tok = synthetic.build_tokenizer()
    exs = synthetic.addition_examples(8, seed=0, max_operand=20)
    ids, mask, p = encode_sequences(exs, tok, 8, 0)
    assert mask[:, p:].all() and not mask.all()
    assert (ids[mask == 0] == 0).all()


def test_weight_decay_skips_norms_and_biases(tiny_model):
    from dultra_jax.training.step import OptimConfig, make_optimizer

    gd, tr, fr = split_trainable(tiny_model, "all")
    zeros = jax.tree.map(jnp.zeros_like, tr)

    def changed(**kw):
        tx = make_optimizer(OptimConfig(learning_rate=1.0, weight_decay=0.1, **kw))
        updates, _ = jax.jit(tx.update)(zeros, tx.init(tr), tr)
        return {tuple(map(str, p)): bool(np.any(np.asarray(u[...]) != 0)) for p, u in nnx.to_flat_state(updates)}

    default = changed()
    assert not default[("backbone", "final_norm", "scale")] and not default[("planner", "out", "bias")]
    assert default[("backbone", "blocks", "layers", "q", "kernel")]
    assert changed(decay_norms_and_biases=True)[("backbone", "final_norm", "scale")]


def test_sigterm_checkpoints_and_resume_guards(tmp_path):
    """SIGTERM mid-run saves the finished step and stops; a torn last metrics line does not break the resume;
    a resume whose config changes the data order is refused."""
    import os
    import signal

    from dultra_jax.config import ConfigError
    from dultra_jax.training.trainer import MODES, TrainingInterrupted

    over = ["train.mode=sft", "train.batch_size=8", "train.max_steps=5", "train.save_every=100"]
    trainer = Trainer(_cfg(tmp_path, *over), tmp_path / "sig", progress=False)
    make = MODES["sft"].make_batch

    def batch_then_signal(t, rng):
        if t.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return make(t, rng)

    trainer.mode = MODES["sft"].__class__(MODES["sft"].build_data, batch_then_signal, MODES["sft"].loss)
    with pytest.raises(TrainingInterrupted, match="SIGTERM"):
        trainer.run()
    assert trainer.step == 3 and trainer.ckpt.latest_step() == 3
    assert signal.getsignal(signal.SIGTERM) is not trainer._on_signal  # handlers restored
    with open(tmp_path / "sig" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.')  # killed mid-write
    with pytest.raises(ConfigError, match="train.seed"):
        Trainer(_cfg(tmp_path, *over, "train.seed=1"), tmp_path / "sig", progress=False).run()
    resumed = Trainer(_cfg(tmp_path, *over), tmp_path / "sig", progress=False)
    resumed.run()
    assert [r["step"] for r in _rows(tmp_path / "sig")] == [1, 2, 3, 4, 5]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    from dultra_jax.training.trainer import MetricsWriter

    with pytest.raises(ValueError, match="line 2"):
        MetricsWriter(tmp_path / "bad").truncate_after(5)


def test_rollout_weights_replicated_equal_sharded(tiny_dir):
    """train.rollout_weights: the same rollout from fsdp-sharded weights and from a copy replicated over fsdp
    (exactly in fp32; within bf16 rounding for the bf16 copy)."""
    from dultra_jax.decoding import generate
    from dultra_jax.parallel import ShardingPlan
    from dultra_jax.training.trainer import rollout_copy

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py sets them up")
    plan = ShardingPlan.create("data=1,fsdp=8,tensor=1")
    replicated = plan.params_replicated_over("fsdp")
    model = plan.shard_model(dultra_jax.load(tiny_dir))
    ids = np.random.default_rng(0).integers(0, 290, size=(8, 12))

    def roll(m, p):
        r = generate(m, ids, gen_length=16, block_length=8, temperature=0.0, rng=0, return_trajectory=True,
                     plan=p)
        return np.asarray(r.tokens), np.asarray(r.trajectory.logps), int(r.trajectory.num_steps)

    base = roll(model, plan)
    copy32 = rollout_copy(model, replicated, jnp.float32)
    q = dict(nnx.to_flat_state(nnx.state(copy32)))[("backbone", "blocks", "layers", "q", "kernel")][...]
    assert "fsdp" not in str(q.sharding.spec) and "fsdp" in str(
        dict(nnx.to_flat_state(nnx.state(model)))[("backbone", "blocks", "layers", "q", "kernel")][...].sharding.spec)
    fp32 = roll(copy32, replicated)
    np.testing.assert_array_equal(base[0], fp32[0])
    np.testing.assert_allclose(base[1], fp32[1], atol=1e-5)
    copy16 = rollout_copy(model, replicated, jnp.bfloat16)
    assert q.dtype == jnp.float32 and jax.tree.leaves(nnx.state(copy16, nnx.Param))[0].dtype == jnp.bfloat16
    bf16 = roll(copy16, replicated)
    assert np.mean(base[0] == bf16[0]) >= 0.9
    same = (base[0] == bf16[0]).all(-1)  # rows with the same completion: their log-probs agree to bf16 rounding
    diff = np.abs(base[1] - bf16[1])[:, same]
    assert same.any() and diff.max(initial=0.0) < 0.25 and diff.mean() < 0.01


def test_teacher_is_placed_with_the_trainers_plan():
    """The distillation teacher the rewards load is sharded by the trainer's plan (shard_teacher)."""
    from pathlib import Path

    from dultra_jax.parallel import ShardingPlan
    from dultra_jax.rewards.registry import RewardContext

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py sets them up")
    ctx = RewardContext({"teacher_logprob": {"dtype": "fp32"}},
                        {"math": str(Path(__file__).parent / "fixtures" / "qwen2-tiny")})
    ctx.teacher_plan = ShardingPlan.create("data=1,fsdp=8,tensor=1")
    scorer = ctx.teacher("math")
    shardings = [a.sharding for a in jax.tree.leaves(scorer.state)]
    assert all(len(s.device_set) == 8 for s in shardings)
    assert any(not s.is_fully_replicated for s in shardings)


def test_sft_noise_follows_the_row_not_the_micro_batch(tiny_model):
    """With row seeds, one micro-batch of 4 rows and two of 2 give the same SFT loss (so do 1 or 2 processes)."""
    from dultra_jax.training.trainer import _sft_loss

    gd, tr, fr = split_trainable(tiny_model, "all")
    loss = _sft_loss(load_run_config(None, []))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 290, size=(4, 20)).astype(np.int32)
    answer = np.zeros_like(ids)
    answer[:, 8:] = 1
    batch = {"input_ids": ids, "answer_mask": answer, "row_seed": np.arange(4, dtype=np.int32) + 40}
    step = make_train_step(gd, loss, optax.sgd(0.0))
    one = step(jax.tree.map(jnp.array, tr), fr, optax.sgd(0.0).init(tr), jax.tree.map(lambda a: a[None], batch),
               jax.random.key(0))[2]
    two = step(jax.tree.map(jnp.array, tr), fr, optax.sgd(0.0).init(tr),
               jax.tree.map(lambda a: a.reshape(2, 2, *a.shape[1:]), batch), jax.random.key(1))[2]
    assert float(one["loss"]) == pytest.approx(float(two["loss"]), rel=1e-5)
    assert float(one["masked_tokens"]) == pytest.approx(2 * float(two["masked_tokens"]))


@pytest.mark.parametrize("mode", ["sft", "planner"])
def test_memory_plan_lays_out_the_trainers_own_batch(tmp_path, mode):
    """benchmarks/memory_plan.py plans sequence_batch_like's batch: the keys, shapes and dtypes the trainer sends."""
    from dultra_jax.config import preset
    from dultra_jax.tasks import get_task
    from dultra_jax.training.trainer import MODES, build_tokenizer, load_examples, sequence_batch_like

    t = Trainer.__new__(Trainer)  # the data path only: no model to build
    t.cfg = _cfg(tmp_path, f"train.mode={mode}", "train.batch_size=4", "train.micro_batches=2")
    t.plan, t.num_processes, t.step, t.tokenizer = None, 1, 0, build_tokenizer(t.cfg)
    t.streamed = False  # data.source: task (the streamed sources build their batches the same way per row)
    t.mcfg, t.examples = preset("tiny", **get_task(t.cfg.task.name).model_overrides), load_examples(t.cfg, "train")
    MODES[mode].build_data(t)
    batch, _ = MODES[mode].make_batch(t, jax.random.key(0))
    like = sequence_batch_like(mode, 2, t.sequences.shape[1])
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: ((2, *a.shape), a.dtype) for k, a in like.items()}
