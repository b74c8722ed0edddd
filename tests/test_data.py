"""Task loaders (local files in the hub schema), the original's prompts, chat templating and the grain pipeline."""

import json
from pathlib import Path

import numpy as np
import pytest

from dultra_jax.data import (
    DataError,
    PromptPipeline,
    find_example,
    load_iterator_state,
    render_chat,
    save_iterator_state,
    tokenize_prompts,
)
from dultra_jax.data import prompts as P
from dultra_jax.tasks import load_task

FIX = Path(__file__).parent / "fixtures"
FILES = {
    "gsm8k": FIX / "gsm8k" / "test_sample.jsonl",
    "math500": FIX / "tasks" / "math500_sample.jsonl",
    "mbpp": FIX / "tasks" / "mbpp_sample.jsonl",
    "apps": FIX / "tasks" / "apps_sample.jsonl",
    "humaneval": FIX / "humaneval" / "HumanEval.jsonl.gz",
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets-cache")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIX / "llada-tokenizer-tiny"))


def test_prompts_are_the_originals_verbatim():
    assert P.math_system_prompt("thinking").strip().startswith("You are a math expert. To answer the user's question")
    assert "unit tests,and write" in P.code_system_prompt("thinking")  # the original's missing space
    conv = P.conversation(P.math_system_prompt("non-thinking"), "  Q?  ")
    assert conv[0]["content"].splitlines() == [
        "You are a math expert.", "Follow these rules:",
        "1) Carefully read the question and identify what is being asked.",
        "2) Solve the problem step by step, showing the intermediate reasoning.",
        "3) Present the final answer inside \\boxed{}."]
    assert conv[1] == {"role": "user", "content": "Q?"}
    assert P.apps_user_prompt("Do it.", "def f():\n\t", "thinking") == (
        "Write a solution to the following problem:\nDo it.\n\nStarter code:\ndef f():. "
        "Make sure to include all your thinking steps.")
    assert P.apps_user_prompt("Do it.", None, "non-thinking") == "Write a solution to the following problem:\nDo it.."
    assert P.math_eval_user_prompt("Q").endswith("inside \\boxed{}.\n\n\nQ")
    with pytest.raises(ValueError, match="prompt mode"):
        P.math_system_prompt("chatty")


@pytest.mark.parametrize("task", sorted(FILES))
def test_tasks_load_from_local_files_in_the_hub_schema(task, cache):
    train = load_task(task, data_file=FILES[task], cache_dir=cache)
    ev = load_task(task, data_file=FILES[task], style="eval", apps_difficulties=None, cache_dir=cache)
    assert train and ev
    assert [m["role"] for m in train[0].messages] == ["system", "user"]
    assert [m["role"] for m in ev[0].messages] == ["user"]
    if train[0].kind == "math":
        assert train[0].answer and train[0].tests is None
    else:
        assert train[0].tests["kind"] in ("apps", "humaneval", "mbpp") and train[0].answer is None


def test_record_contents(cache):
    g = load_task("gsm8k", data_file=FILES["gsm8k"], cache_dir=cache)
    assert g[0].answer == "18" and g[0].id == "gsm8k/0" and "Janet" in g[0].messages[1]["content"]
    assert g[0].metadata["answer"].endswith("#### 18")
    he = load_task("humaneval", data_file=FILES["humaneval"], cache_dir=cache)
    assert len(he) == 164 and he[0].id == "HumanEval/0" and he[0].tests["entry_point"] == "has_close_elements"
    assert he[0].messages[-1]["content"].startswith("Write a solution to the following problem and make sure")
    mb = load_task("mbpp", data_file=FILES["mbpp"], style="eval", cache_dir=cache)
    assert mb[0].id == "2" and mb[0].messages[0]["content"].endswith("inside a ```python``` code block.")
    m5 = load_task("math500", data_file=FILES["math500"], cache_dir=cache)
    assert m5[0].answer == "\\frac{3}{4}" and m5[0].id == "test/prealgebra/0001.json"
    assert find_example(he, id="HumanEval/3").index == 3 and find_example(mb, index=1).id == "3"
    with pytest.raises(DataError, match="no problem with id"):
        find_example(he, id="HumanEval/999")


def test_apps_filters_like_the_original(cache):
    train = load_task("apps", data_file=FILES["apps"], cache_dir=cache)  # introductory + call-based only
    assert [e.id for e in train] == ["9001", "9002"]
    assert [e.id for e in load_task("apps", data_file=FILES["apps"], style="eval", apps_difficulties=None,
                                    cache_dir=cache)] == ["9001", "9002", "9003", "9004"]
    assert train[0].tests["fn_name"] == "sum_even"


def test_data_errors(tmp_path, cache):
    with pytest.raises(DataError, match="unknown task"):
        load_task("imagenet", data_file=FILES["gsm8k"])
    with pytest.raises(DataError, match="not found"):
        load_task("gsm8k", data_file=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['answer'\]"):
        load_task("gsm8k", data_file=bad, cache_dir=cache)
    with pytest.raises(DataError, match="unsupported data file"):
        load_task("gsm8k", data_file=FIX / "tasks" / "README.md")


def test_chat_template_and_tokenisation(tokenizer, cache):
    ex = load_task("gsm8k", data_file=FILES["gsm8k"], cache_dir=cache)[0]
    text = render_chat(tokenizer, list(ex.messages))
    assert text.startswith("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nYou are a math expert.")
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids, mask = tokenize_prompts(tokenizer, [text, "short"], max_prompt_length=None)
    assert ids.shape == mask.shape and mask[1].sum() < mask[0].sum()
    assert (ids[1, : ids.shape[1] - mask[1].sum()] == tokenizer.eos_token_id).all()  # left pads = EOS
    cut, _ = tokenize_prompts(tokenizer, [text], max_prompt_length=10)
    assert cut.shape == (1, 10) and cut[0].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"][-10:]


def test_pipeline_groups_padding_and_epochs(tokenizer, cache):
    examples = load_task("gsm8k", data_file=FILES["gsm8k"], cache_dir=cache)[:5]
    pipe = PromptPipeline(examples, tokenizer, prompts_per_batch=2, num_generations=3, seed=42, num_epochs=2,
                          pad_to_multiple=16, max_prompt_length=None)  # the tiny BPE makes long prompts
    batches = list(pipe)
    assert len(batches) == 5  # 10 prompts over two epochs, 2 per batch
    for b in batches:
        assert b["input_ids"].shape[0] == 6 and b["input_ids"].shape[1] % 16 == 0
        assert b["group"].tolist() == [0, 0, 0, 1, 1, 1]
        idx = b["example_index"]
        assert idx[0] == idx[1] == idx[2] and idx[3] == idx[4] == idx[5]
        assert (b["input_ids"][:3] == b["input_ids"][0]).all()  # the G copies of a prompt are identical
        first = pipe.examples_for(b)[0]
        want = tokenizer(render_chat(tokenizer, list(first.messages)), add_special_tokens=False)["input_ids"]
        assert b["input_ids"][0, -len(want):].tolist() == want and b["attention_mask"][0].sum() == len(want)
    order = np.concatenate([b["example_index"][::3] for b in batches])
    assert sorted(order[:5]) == sorted(order[5:]) == list(range(5))  # each epoch sees every prompt once
    assert order[:5].tolist() != order[5:].tolist()  # reshuffled per epoch


def test_iterator_state_round_trips_through_a_file(tokenizer, tmp_path, cache):
    examples = load_task("gsm8k", data_file=FILES["gsm8k"], cache_dir=cache)
    pipe = PromptPipeline(examples, tokenizer, prompts_per_batch=1, num_generations=2)
    it = iter(pipe)
    for _ in range(3):
        next(it)
    path = save_iterator_state(it, tmp_path / "state" / "data.json")
    expected = [next(it)["example_index"].tolist() for _ in range(4)]
    resumed = iter(pipe)
    load_iterator_state(resumed, path)
    assert [next(resumed)["example_index"].tolist() for _ in range(4)] == expected
    with pytest.raises(DataError, match="not found"):
        load_iterator_state(resumed, tmp_path / "missing.json")
