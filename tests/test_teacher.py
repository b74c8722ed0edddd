"""The Qwen2 teacher: golden parity with transformers' implementation, padding invariance, loader errors, and the
distillation reward built on it."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from dultra_jax.checkpoints import CheckpointError
from dultra_jax.config import UnsupportedConfigError
from dultra_jax.rewards.distill import TeacherScorer, render_prompt_completion
from dultra_jax.teacher import LOGICAL_AXES, Qwen2Config, forward, load_qwen2, logical_axes, next_token_logprobs

TINY = Path(__file__).parent / "fixtures" / "qwen2-tiny"


@pytest.fixture(scope="module")
def teacher():
    return load_qwen2(TINY, dtype="fp32")


@pytest.fixture(scope="module")
def golden():
    with np.load(TINY / "golden.npz") as g:
        return {k: g[k] for k in g.files}


def test_golden_parity_with_transformers(teacher, golden):
    logits = forward(*nnx.split(teacher), jnp.asarray(golden["input_ids"], jnp.int32))
    np.testing.assert_allclose(np.asarray(logits), golden["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_rows_equal_unpadded_rows(teacher, golden, side):
    gd, st = nnx.split(teacher)
    lengths = [7, 23, 15]
    rows = [golden["input_ids"][i % 2, :n] for i, n in enumerate(lengths)]
    ids = np.zeros((3, 23), np.int32)
    mask = np.zeros((3, 23), np.int32)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(23 - len(r), 23)
        ids[i, sl], mask[i, sl] = r, 1
    batched = np.asarray(forward(gd, st, jnp.asarray(ids), jnp.asarray(mask)))
    for i, r in enumerate(rows):
        alone = np.asarray(forward(gd, st, jnp.asarray(r[None]), None))[0]
        sl = slice(0, len(r)) if side == "right" else slice(23 - len(r), 23)
        np.testing.assert_allclose(batched[i, sl], alone, atol=1e-5, rtol=0)


def test_next_token_logprobs_match_log_softmax_of_logits(teacher, golden):
    gd, st = nnx.split(teacher)
    ids = jnp.asarray(golden["input_ids"], jnp.int32)
    lp = next_token_logprobs(gd, st, ids, jnp.ones_like(ids), chunk=5)  # chunking with a remainder
    ref = jax.nn.log_softmax(jnp.asarray(golden["logits"]), -1)[:, :-1]
    ref = np.take_along_axis(np.asarray(ref), golden["input_ids"][:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp), ref, atol=1e-4, rtol=0)


def test_every_parameter_has_logical_axes(teacher):
    axes = logical_axes(teacher)
    n_params = len(list(nnx.to_flat_state(nnx.state(teacher, nnx.Param))))
    assert len(axes) == n_params
    assert axes[("layers", "q", "kernel")] == ("layers", "embed", "heads")
    assert axes[("lm_head", "kernel")] == ("embed", "vocab")
    assert set(axes) <= set(LOGICAL_AXES)


# ------------------------------------------------------------------------------------------- loader errors
def _copy(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(TINY, d)
    return d


def test_loader_reports_missing_and_misshapen_tensors(tmp_path):
    d = _copy(tmp_path)
    t = load_file(str(d / "model.safetensors"))
    t.pop("model.layers.1.self_attn.q_proj.bias")
    t["model.norm.weight"] = np.ones(7, np.float32)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_qwen2(d)
    assert "model.layers.1.self_attn.q_proj.bias" in str(e.value)
    assert "shape mismatch for model.norm.weight" in str(e.value)


def test_loader_rejects_unsupported_configs(tmp_path):
    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"type": "yarn", "factor": 4.0}}))
    with pytest.raises(UnsupportedConfigError, match="rope_scaling"):
        load_qwen2(d)
    with pytest.raises(CheckpointError, match="not found"):
        load_qwen2(tmp_path / "nope")


def test_tied_embeddings_use_the_embedding_as_head(tmp_path):
    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    m = load_qwen2(d)  # lm_head.weight present but ignored
    assert m.lm_head is None
    x = jnp.asarray([[1, 2, 3]])
    np.testing.assert_allclose(np.asarray(m(x)), np.asarray(m.hidden_states(x) @ m.embed.embedding[...].T), atol=1e-5)
    assert Qwen2Config.from_json_file(d / "config.json").tie_word_embeddings


# ------------------------------------------------------------------------------------------- distillation reward
@pytest.fixture(scope="module")
def scorer():
    return TeacherScorer.from_pretrained(TINY, dtype="fp32", bucket=128)  # one bucket: few compilations


PROMPT = [{"role": "system", "content": "You are a math expert."}, {"role": "user", "content": "What is 2+2?"}]


def test_completion_includes_the_templates_end_of_turn(scorer):
    prompt, completion = render_prompt_completion(scorer.tokenizer, PROMPT, "It is 4.")
    assert prompt.endswith("<|im_start|>assistant\n") and completion == "It is 4.<|im_end|>\n"


def test_teacher_reward_is_mean_logprob_of_the_completion_tokens(scorer, teacher):
    completions = ["It is 4.", "<think>2+2</think><answer>\\boxed{4}</answer>", "x"]
    batch = scorer.rewards([PROMPT] * 3, completions)
    gd, st = nnx.split(teacher)
    for c, value in zip(completions, batch, strict=True):
        ids, n = scorer.encode(PROMPT, c)
        padded, mask = np.zeros((1, 128), np.int32), np.zeros((1, 128), np.int32)
        padded[0, :len(ids)], mask[0, :len(ids)] = ids, 1  # right padding: rows equal unpadded (tested above)
        logits = np.asarray(forward(gd, st, jnp.asarray(padded), jnp.asarray(mask)))[0, :len(ids)]
        logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[-n - 1:-1]), -1))
        expected = np.take_along_axis(logp, np.asarray(ids[-n:])[:, None], -1).mean()
        assert value == pytest.approx(float(expected), abs=1e-4)
        assert value <= 0
    # Batched (padded to a common bucket) equals one at a time.
    assert [scorer.rewards([PROMPT], [c])[0] for c in completions] == pytest.approx(batch, abs=1e-5)


def test_teacher_reward_minus_student_logprobs(scorer):
    base = scorer.rewards([PROMPT], ["It is 4."])[0]
    _, n = scorer.encode(PROMPT, "It is 4.")
    student = [-0.5] * (n + 3)
    assert scorer.rewards([PROMPT], ["It is 4."], [student])[0] == pytest.approx(base + 0.5, abs=1e-6)
    with pytest.raises(ValueError, match="student_logprobs"):
        scorer.rewards([PROMPT], ["It is 4."], [[-0.5]])


def test_teacher_sharded_by_the_same_rules_equals_one_device(teacher, golden, cpu8):

    from dultra_jax.parallel import ShardingPlan
    from dultra_jax.teacher import shard_teacher

    plan = ShardingPlan.create("data=2,fsdp=2,tensor=2")
    sharded = shard_teacher(load_qwen2(TINY, dtype="fp32"), plan)
    specs = {p: v[...].sharding.spec for p, v in nnx.to_flat_state(nnx.state(sharded, nnx.Param))}
    assert any(any(a is not None for a in s) for s in specs.values())  # something is actually split
    ids = jnp.asarray(golden["input_ids"], jnp.int32)
    with plan.context():
        logits = forward(*nnx.split(sharded), ids)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(forward(*nnx.split(teacher), ids)), atol=1e-5)
