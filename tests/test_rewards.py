"""Format and speed rewards (hand-checkable cases of docs/original.md §7) and the reward registry."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from dultra_jax.rewards import (
    RewardConfigError,
    RewardInputs,
    answer_format,
    build_rewards,
    code_fence_format,
    load_reward_config,
    step_penalty,
    think_format,
)
from dultra_jax.rewards.speed import trajectory_from_reveals
from dultra_jax.tasks import load_task

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.mark.parametrize("text, value", [
    ("<answer>\\boxed{7}</answer>", 1.0), ("\\boxed{7}", 0.5), ("<answer>7</answer>", 0.75), ("7", 0.25),
    ("<answer>7", 0.75), ("<answer>7</answer> \\boxed{7}", 0.75),  # the box must be inside the first tag
])
def test_answer_format(text, value):
    assert answer_format(text) == pytest.approx(value)


@pytest.mark.parametrize("text, value", [
    ("```python\nx=1\n```", 1.0), ("```python\nx=1\n```\nok", 0.748), ("x=1", 0.25), ("", 0.0),
    ("```\nx=1\n```", 0.75), ("```PYTHON\nx=1", 0.49), ("```python\nx=1\n```\n" + "y" * 500, 0.55),
])
def test_code_fence_format(text, value):
    assert code_fence_format(text) == pytest.approx(value)


def test_think_format():
    assert think_format("<think>a</think> b") == 0.5
    assert think_format("<think>a") == 0.0


def test_step_penalty_modes():
    traj = [[3, 4], [], [5], [6, 7, 8]]
    assert step_penalty(traj) == pytest.approx(-0.06)
    assert step_penalty(traj, "sqrt") == pytest.approx(-(2**0.5 + 1 + 3**0.5))
    assert step_penalty(traj, "sqrt_sum") == pytest.approx(-(2**0.5 + 1 + 3**0.5) / 6)
    assert step_penalty([[], []], "sqrt_sum") == 0.0
    with pytest.raises(ValueError, match="mode"):
        step_penalty(traj, "bogus")


def test_trajectory_from_reveal_masks():
    mask = np.zeros((3, 6), bool)
    mask[0, [1, 2]] = True
    mask[2, 5] = True
    traj = trajectory_from_reveals(mask)
    assert traj == [[1, 2], [], [5]]
    assert step_penalty(traj) == pytest.approx(-2 / 50)


# ------------------------------------------------------------------------------------------- registry
def test_registry_has_the_original_weights():
    cfg = load_reward_config()
    assert build_rewards("gsm8k", cfg).weights == {
        "math_correctness": 1.0, "answer_format": 1.0, "think_format": 0.5, "step_penalty": 0.1,
        "teacher_logprob": 1.0}
    assert build_rewards("apps", cfg).weights == {
        "apps_execution": 3.0, "code_fence_format": 1.0, "think_format": 0.5, "step_penalty": 0.1,
        "teacher_logprob": 1.0}
    assert "think_format" not in build_rewards("math500", cfg, prompt_mode="non-thinking").weights
    assert build_rewards("gsm8k", cfg, freeze_unmasking_head=True).weights["step_penalty"] == 0.0


def test_combined_reward_hand_checked():
    """§7.3: correct (2·1) + format (1·1) + think (0.5·0.5) + 40 steps (−0.8·0.1) + teacher −0.6 (·1) = 2.57."""
    examples = load_task("gsm8k", data_file=FIX / "gsm8k" / "test_sample.jsonl")[:2]
    answer = examples[0].answer
    rs = build_rewards("gsm8k", exclude=("teacher_logprob",))
    try:
        rs.terms.append(("teacher_logprob", 1.0, lambda inp: [-0.6, None]))  # a fixed teacher for the hand check
        completion = f"<think>steps</think><answer>\\boxed{{{answer}}}</answer>"
        out = rs(RewardInputs([completion, "no idea"], examples, trajectories=[[[i] for i in range(40)], [[1], []]]))
    finally:
        rs.context.close()
    assert out.total[0] == pytest.approx(2.57)
    # Row 2: wrong, format 0.25 (no tag, no box), no think, one step, teacher None -> NaN -> ignored (nansum).
    assert out.total[1] == pytest.approx(0.25 - 0.1 / 50)
    assert np.isnan(out.per_function["teacher_logprob"][1])


def test_registry_errors(tmp_path):
    with pytest.raises(RewardConfigError, match="no rewards configured"):
        build_rewards("imagenet")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"datasets": {"gsm8k": {"math_corectness": 1.0}}}))
    with pytest.raises(RewardConfigError, match="unknown reward 'math_corectness'"):
        load_reward_config(bad)
    bad.write_text(yaml.safe_dump({"datasets": {"gsm8k": {"answer_format": "high"}}}))
    with pytest.raises(RewardConfigError, match="must be a number"):
        load_reward_config(bad)
    rs = build_rewards("gsm8k", exclude=("teacher_logprob", "math_correctness"))
    with pytest.raises(RewardConfigError, match="trajectories"):
        rs(RewardInputs(["x"], load_task("gsm8k", data_file=FIX / "gsm8k" / "test_sample.jsonl")[:1]))
