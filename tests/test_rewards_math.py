"""Math rewards: the original's extraction, equivalence through math-verify in time-bounded workers."""

import json
import time
from pathlib import Path

import pytest

from dultra_jax.answers import extract_hash_answer
from dultra_jax.rewards import math as M
from dultra_jax.rewards.procpool import MathVerifier, WorkerPool

GSM8K = Path(__file__).parent / "fixtures" / "gsm8k" / "test_sample.jsonl"


RESTART_S = 5.0  # slack per killed-and-replaced worker (a fresh interpreter; generous for a loaded machine)


@pytest.fixture(scope="module")
def gsm8k():
    rows = [json.loads(line) for line in GSM8K.open()]
    return [(r["question"], extract_hash_answer(r["answer"])) for r in rows]


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(workers=2, timeout_s=3.0) as v:
        yield v


# ------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("\\boxed{3", "\\boxed{3"),  # unclosed: last_boxed_only_string -> None -> the whole text
    ("\\boxed 5$ end", "5"),
    ("The answer is 7", "The answer is 7"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("nested \\boxed{\\frac{a}{\\sqrt{2}}}", "\\frac{a}{\\sqrt{2}}"),
    ("\\fbox{9}", "\\fbox{9}"),  # remove_boxed only strips \\boxed
    ("x \\boxed 5 and \\boxed{6}", "5 and \\boxed{6}"),  # a "\\boxed " anywhere switches the rule
])
def test_extraction_matches_the_original(text, expected):
    assert M.extract_boxed_answer(text) == expected


def test_last_boxed_only_string_edge_cases():
    assert M.last_boxed_only_string("\\boxed{3") is None
    assert M.last_boxed_only_string("no box") == "no box"
    assert M.last_boxed_only_string("a \\boxed{x} b") == "\\boxed{x}"
    with pytest.raises(ValueError):
        M.remove_boxed("x \\boxed 5")


def test_gsm8k_reference_is_text_after_hashes():
    assert extract_hash_answer("She makes 9 * 2 = $18.\n#### 18") == "18"
    assert extract_hash_answer("no final answer") is None


@pytest.mark.parametrize("text, value", [
    ("… \\boxed{18}", 18.0), ("#### $18", 18.0), ("<answer>18</answer>", 18.0), ("it is 17 then 18.", 18.0),
    ("#### 1,234", 1234.0), ("nothing", None),
])
def test_gsm8k_eval_parse_chain(text, value):
    assert M.gsm8k_prediction(text) == value


def test_gsm8k_eval_cannot_read_negative_ground_truth():
    assert M.gsm8k_eval_correct("\\boxed{18}", "18")
    assert not M.gsm8k_eval_correct("\\boxed{-3}", "-3")  # the original's regex has no sign


@pytest.mark.parametrize("a, b, equal", [
    ("\\dfrac{1}{2}", "\\frac12", True), ("0.5", "\\frac{1}{2}", True), ("50\\%", "50", True),
    ("x = 3", "3", True), ("\\left( 1, 2 \\right)", "(1,2)", True), ("72", "72.0", False), ("3", "4", False),
    ("1/0x", "1/0x", True),  # _fix_a_slash_b raises -> raw comparison
])
def test_strip_string_equivalence(a, b, equal):
    assert M.is_equiv(a, b) is equal


# ------------------------------------------------------------------------------------------- verification
def test_gold_answers_wrapped_as_asked_score_2(gsm8k, verifier):
    answers = [a for _, a in gsm8k]
    completions = [f"<think>Reasoning.</think>\n<answer>\\boxed{{{a}}}</answer>" for a in answers]
    assert verifier.rewards(completions, answers) == [2.0] * len(answers)


def test_answers_of_other_problems_score_0(gsm8k, verifier):
    answers = [a for _, a in gsm8k]
    # Pair each completion with the next problem whose answer differs numerically.
    others = []
    for i, a in enumerate(answers):
        j = next(k for k in range(1, len(answers)) if float(answers[(i + k) % len(answers)]) != float(a))
        others.append(answers[(i + j) % len(answers)])
    completions = [f"<answer>\\boxed{{{o}}}</answer>" for o in others]
    assert verifier.rewards(completions, answers) == [0.0] * len(answers)


def test_malformed_outputs_score_0_without_raising(verifier):
    malformed = [
        "", "\\boxed{", "\\boxed{" * 200, "}}}{{{", "\\boxed{\\frac{}{}}", "<answer></answer>", "\x00\ud800",
        "\\boxed{9^{9^{9^{9^{9^{9}}}}}}", "x" * 50_000, "\\boxed{1/0}", "$$$$", "\\boxed{\\sqrt}",
    ]
    t0 = time.perf_counter()
    assert verifier.rewards(malformed, ["72"] * len(malformed)) == [0.0] * len(malformed)
    # The bound follows from the configured limits, not from this machine's speed: each check is cut at the
    # verifier's timeout (3 s), and worst case every one times out, in rounds of `workers` (2), each round
    # paying a worker restart (RESTART_S of slack for a loaded machine).
    rounds = -(-len(malformed) // 2)
    assert time.perf_counter() - t0 < rounds * (3.0 + RESTART_S)


def test_eval_mode_agrees_on_numeric_forms_faithful_mode_does_not():
    with MathVerifier(workers=1, timeout_s=5.0, mode="faithful") as faithful, MathVerifier(workers=1) as default:
        comps = ["<answer>\\boxed{72.0}</answer>", "<answer>\\boxed{\\frac{1}{2}}</answer>"]
        refs = ["72", "0.5"]
        assert default.rewards(comps, refs) == [2.0, 2.0]
        assert faithful.rewards(comps, refs) == [0.0, 2.0]  # "72.0" != "72" after strip_string
    with pytest.raises(ValueError, match="mode"):
        MathVerifier(mode="bogus")


def test_pool_kills_overrunning_tasks_and_recovers(tmp_path):
    mod = tmp_path / "slow.py"
    mod.write_text("import time\n\ndef nap(s):\n    time.sleep(s)\n    return s\n\n"
                   "def boom():\n    raise KeyError('x')\n")
    with WorkerPool(mod, workers=2, timeout_s=1.0) as pool:
        t0 = time.perf_counter()
        res = pool.map("nap", [{"s": 0.1}, {"s": 30}, {"s": 0.2}])
        # the 30 s nap is cut at the pool's 1 s timeout: one timeout and one restart, far below the nap itself
        assert time.perf_counter() - t0 < pool.timeout_s + RESTART_S < 30
        assert [r.ok for r in res] == [True, False, True] and res[1].timed_out
        assert pool.map("nap", [{"s": 0}])[0].result == 0  # the replaced worker serves new tasks
        err = pool.map("boom", [{}])[0]
        assert not err.ok and "KeyError" in err.error


def test_verifier_works_off_the_main_thread(verifier):
    """math-verify's SIGALRM timeouts fail in threads; through the worker pool they do not."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as ex:
        assert ex.submit(verifier.rewards, ["\\boxed{4}"], ["4"]).result() == [2.0]
