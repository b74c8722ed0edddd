"""The in-process lm-eval model ``dultra`` and LLaDA's Monte Carlo likelihood, on the tiny checkpoint with the tiny
LLaDA tokenizer, through lm-eval's own evaluator, filters and metrics (offline task YAMLs reading local JSONL)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from dultra_jax.config import ConfigError  # noqa: E402
from dultra_jax.eval.likelihood import (  # noqa: E402
    LikelihoodSettings,
    loglikelihood,
    mask_counts,
    request_rng,
    sample_masks,
)

FIX = Path(__file__).parent / "fixtures"
TASKS = FIX / "lm_eval_tasks"
# decoding and likelihood settings small enough for seconds on a CPU
MODEL_ARGS = dict(dtype="fp32", strategy="threshold", gen_length=16, block_length=8, slots=2, mc_num=4, mc_batch=4,
                  greedy=False)


@pytest.fixture(scope="module")
def model_dir(tiny_text_dir) -> Path:
    """The tiny checkpoint with the tiny LLaDA tokenizer beside its weights (tests/conftest.py)."""
    return tiny_text_dir


@pytest.fixture(scope="module")
def lm(model_dir):
    from dultra_jax.lm_eval_model import DultraLM

    return DultraLM(pretrained=str(model_dir), **MODEL_ARGS)


def _task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False)  # skip indexing lm-eval's own tasks


@pytest.fixture(scope="module")
def evaluated(lm):
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=["gsm8k_tiny", "choice_tiny"], task_manager=_task_manager(),
                                   log_samples=True)


# ------------------------------------------------------------------------------------ the estimator
def test_mask_counts_are_stratified():
    rng = np.random.default_rng(0)
    for length in (1, 3, 7):
        assert sorted(mask_counts(rng, length, length)) == list(range(1, length + 1))  # n = L: each l once
        masks, counts = sample_masks(rng, 5, length)
        assert ((counts >= 1) & (counts <= length)).all() and (masks.sum(1) == counts).all()


def _reference(model, ctx, tgt, n, seed):
    """An independent estimate: one unpadded forward per sample, -log p summed in numpy with weight L/l."""
    from flax import nnx

    import dultra_jax

    graphdef, state = nnx.split(model)
    masks, counts = sample_masks(request_rng(seed, ctx, tgt), n, len(tgt))
    total = 0.0
    for m, cnt in zip(masks, counts, strict=True):
        x = np.asarray(ctx + tgt)
        x[len(ctx):][m] = model.cfg.mask_token_id
        logits, _ = dultra_jax.forward(graphdef, state, jax.numpy.asarray(x[None]))
        logp = np.asarray(jax.nn.log_softmax(logits[0].astype(np.float32), -1), np.float64)
        total += sum(-logp[len(ctx) + j, t] * len(tgt) / cnt for j, t in enumerate(tgt) if m[j])
    return -total / n


def test_mc_estimate_matches_a_hand_computation(tiny_model):
    pairs = [([5, 17, 42, 7], [9]), ([3, 4], [10, 11, 12])]
    s = LikelihoodSettings(mc_num=6, mc_batch=4, greedy=False)
    res = loglikelihood(tiny_model, pairs, s)
    # one continuation token: always masked alone, weight 1 -> exactly log p(token | context, MASK)
    assert res.logprob[0] == pytest.approx(_reference(tiny_model, *pairs[0], 1, 0), abs=1e-4)
    # the batched, padded, packed estimate equals one unpadded forward per sample
    assert res.logprob[1] == pytest.approx(_reference(tiny_model, *pairs[1], 6, 0), abs=1e-4)
    assert res.mc_rows == 12 and res.forwards == 3  # 12 rows in batches of 4
    # deterministic under a seed, whatever the other requests; another seed draws other masks
    alone = loglikelihood(tiny_model, pairs[1:], s)
    assert alone.logprob[0] == pytest.approx(res.logprob[1], abs=1e-4)
    other = loglikelihood(tiny_model, pairs[1:], LikelihoodSettings(mc_num=6, mc_batch=4, greedy=False, seed=1))
    assert other.logprob[0] != pytest.approx(res.logprob[1], abs=1e-3)
    assert loglikelihood(tiny_model, [([5], [])], s).logprob[0] == 0.0


def _llada_greedy(model, ctx, n):
    """LLaDA's suffix greedy decode, one full unpadded forward per step: fill the most confident masked slot."""
    from flax import nnx

    import dultra_jax

    graphdef, state = nnx.split(model)
    x = np.asarray(ctx + [model.cfg.mask_token_id] * n)
    for _ in range(n):
        logits, _ = dultra_jax.forward(graphdef, state, jax.numpy.asarray(x[None]))
        p = np.asarray(jax.nn.softmax(logits[0].astype(np.float32), -1))
        masked = np.flatnonzero(x == model.cfg.mask_token_id)
        best = masked[np.argmax(p[masked].max(-1))]
        x[best] = int(np.argmax(p[best]))
    return x[len(ctx):].tolist()


def test_greedy_flag_is_lladas_suffix_greedy_decode(tiny_model):
    ctx = [3, 4]
    decoded = _llada_greedy(tiny_model, ctx, 3)
    wrong = decoded[:2] + [(decoded[2] + 1) % 290]
    res = loglikelihood(tiny_model, [(ctx, decoded), (ctx, wrong)], LikelihoodSettings(mc_num=2, mc_batch=4))
    assert res.greedy.tolist() == [True, False]


# ------------------------------------------------------------------------------------ lm-eval end to end
def test_generation_task_equals_decoding_each_prompt_alone(lm, evaluated):
    from dultra_jax.decoding import generate
    from dultra_jax.lm_eval_model import cut_at, prompt_seed

    res = evaluated["results"]["gsm8k_tiny"]
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert 0.0 <= res[key] <= 1.0
    samples = evaluated["samples"]["gsm8k_tiny"]
    assert len(samples) == 6  # 3 problems x 2 filters
    prompts = [lm.tok_encode(smp["arguments"][0][0]) for smp in samples]
    width = max(len(p) for p in prompts)  # each prompt alone (batch 1), left-padded to one width: one compile
    for smp, ids in zip(samples, prompts, strict=True):
        (context, gen_kwargs), = smp["arguments"]
        assert gen_kwargs["max_gen_toks"] == 12  # decoded at 16 (two blocks of 8), cut to 12 tokens
        row = np.full((1, width), lm.eot_token_id, np.int32)
        row[0, width - len(ids):] = ids
        out = generate(lm.model, row, attention_mask=(np.arange(width) >= width - len(ids))[None].astype(np.int32),
                       gen_length=16, block_length=8, strategy="threshold", rng=0, row_seeds=[prompt_seed(ids)])
        gen = np.asarray(out.generated[0]).tolist()
        end = [i for i, t in enumerate(gen) if t in (lm.model.cfg.eos_token_id, lm.tokenizer.convert_tokens_to_ids(
            "<|eot_id|>"))]  # the answer ends at end-of-text
        gen = gen[:end[0]] if end else gen
        assert smp["resps"][0][0] == cut_at(lm.tokenizer.decode(gen[:12], skip_special_tokens=True),
                                            gen_kwargs["until"])
        assert smp["filter"] in ("strict-match", "flexible-extract")


def test_choice_task_scores_are_the_estimates(lm, evaluated):
    res = evaluated["results"]["choice_tiny"]
    samples = evaluated["samples"]["choice_tiny"]
    assert len(samples) == 3
    correct = []
    for smp in samples:
        pairs = [lm._encode_pair(context, continuation) for context, continuation in smp["arguments"]]
        want = loglikelihood(lm.model, pairs, lm.mc).logprob
        got = [r[0][0] for r in smp["resps"]]
        np.testing.assert_allclose(got, want, atol=1e-4)
        correct.append(float(np.argmax(want) == smp["target"]))
    assert res["acc,none"] == pytest.approx(np.mean(correct))


def test_nfe_and_tpf_are_reported(lm, evaluated):
    st = lm.stats
    assert st.generate_requests == 3 and st.nfe_total > 0
    assert st.tpf == pytest.approx(st.effective_tokens_total / st.nfe_total)
    assert st.loglikelihood_requests == 8 and st.mc_rows == 8 * 4


def test_loglikelihood_rolling_sums_its_windows(lm, monkeypatch):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = "Tom has 3 apples and buys 2 more."
    ids = lm.tok_encode(text, add_special_tokens=False)
    monkeypatch.setattr(lm, "max_length", 12)  # several windows of <= 12 tokens
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.prefix_token_id, 11, 6)]
    assert len(windows) >= 3 and all(len(c) + len(t) <= 12 for c, t in windows)
    want = loglikelihood(lm.model, windows, lm.mc).logprob.sum()
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    assert lm.loglikelihood_rolling([req]) == [pytest.approx(want, abs=1e-4)]


def test_dultra_lm_eval_command(model_dir, tmp_path, monkeypatch, capsys):
    """``dultra lm-eval``: lm-eval's CLI with the model registered; results and the NFE/TPF JSON side by side."""
    import lm_eval.tasks

    from dultra_jax.cli import main

    real = lm_eval.tasks.TaskManager.__init__
    monkeypatch.setattr(lm_eval.tasks.TaskManager, "__init__",
                        lambda self, *a, **k: real(self, *a, **{**k, "include_defaults": False}))
    margs = ",".join(f"{k}={v}" for k, v in {"pretrained": model_dir, **MODEL_ARGS}.items())
    out = tmp_path / "out"
    rc = main(["lm-eval", "--model", "dultra", "--model_args", margs, "--tasks", "choice_tiny", "--include_path",
               str(TASKS), "--limit", "1", "--output_path", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "dultra: 0 generated" in printed.out and "3 likelihood requests (12 Monte Carlo rows)" in printed.out
    assert "dultra loglikelihood: 3 requests" in printed.err
    stats = json.loads(next(out.glob("dultra_stats_*.json")).read_text())
    assert stats["stats"]["loglikelihood_requests"] == 3 and stats["likelihood"]["mc_num"] == 4
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert "acc,none" in results["results"]["choice_tiny"]


def test_bad_arguments_fail_in_one_line(model_dir, lm):
    from dultra_jax.lm_eval_model import DultraLM

    with pytest.raises(ConfigError, match="unknown"):
        DultraLM(pretrained=str(model_dir), stepz=3)
    with pytest.raises(ConfigError, match="pretrained="):
        DultraLM()
    with pytest.raises(ConfigError, match="block_length"):
        DultraLM(pretrained=str(model_dir), gen_length=12, block_length=8)
    with pytest.raises(ConfigError, match="unsupported generation kwargs"):
        lm._settings({"until": ["x"], "beam_width": 2})
    with pytest.raises(ConfigError, match="mc_num"):
        LikelihoodSettings(mc_num=0)
