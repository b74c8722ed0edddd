"""Math answer extraction and equivalence, as the original extracts and compares (docs/original.md §7, §9).

This module is imported two ways: as ``dultra_jax.rewards.math`` and, by the verification worker processes, as a
standalone file (see :mod:`dultra_jax.rewards.procpool`). It therefore imports nothing from the package.

Extraction: the answer is ``remove_boxed(last_boxed_only_string(text))`` (the last ``\\boxed{}``; the whole text
when there is none; the whole text when a ``\\boxed{`` is never closed). Equivalence, two modes:

- ``"eval"`` (default): math-verify on ``$...$``-wrapped answers, as the original's evaluation does, so ``72``,
  ``72.0`` and ``\\frac{144}{2}`` agree; the Hendrycks ``strip_string`` comparison when either side does not parse.
- ``"faithful"``: the original's GRPO reward: math-verify on the *bare* strings with anchors required, so bare
  numbers usually do not parse and the ``strip_string`` comparison decides (``72.0`` != ``72``).

GSM8K evaluation accuracy (numeric, |pred - gt| < 1e-5 with the original's parse chain) is
:func:`gsm8k_eval_correct`.
"""

from __future__ import annotations

import re

CORRECT_REWARD = 2.0

# ------------------------------------------------------------------------------------------- extraction


def last_boxed_only_string(string: str) -> str | None:
    """The last ``\\boxed{...}``/``\\fbox{...}`` with its braces; ``"\\boxed "`` anywhere switches rules.

    No box at all returns the whole string; an unclosed box returns None (the original's behaviour).
    """
    idx = string.rfind("\\boxed")
    if "\\boxed " in string:
        return "\\boxed " + string.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return string
    depth = 0
    for i in range(idx, len(string)):
        if string[i] == "{":
            depth += 1
        elif string[i] == "}":
            depth -= 1
            if depth == 0:
                return string[idx: i + 1]
    return None


def remove_boxed(s: str) -> str:
    """Strip the ``\\boxed{...}`` / ``\\boxed `` wrapper; anything else is returned unchanged.

    Raises (as the original does) when ``"\\boxed "`` occurs but is not a prefix, or ``s`` is None; callers
    fall back to the unextracted text.
    """
    if "\\boxed " in s:
        left = "\\boxed "
        if not s.startswith(left):
            raise ValueError("'\\boxed ' occurs but is not a prefix")
        return s[len(left):]
    left = "\\boxed{"
    if s.startswith(left) and s.endswith("}"):
        return s[len(left): -1]
    return s


def extract_boxed_answer(text: str) -> str:
    """The answer the reward compares: the last box's content, or the whole text when extraction fails."""
    try:
        return remove_boxed(last_boxed_only_string(text))  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return text


# ------------------------------------------------------------------------------------------- Hendrycks MATH normaliser
def _fix_fracs(string: str) -> str:
    substrs = string.split("\\frac")
    new_str = substrs[0]
    for substr in substrs[1:]:
        new_str += "\\frac"
        if substr[0] == "{":  # IndexError on a bare trailing \frac: is_equiv then compares raw strings
            new_str += substr
            continue
        if len(substr) < 2:
            return string
        a, b = substr[0], substr[1]
        if b != "{":
            new_str += "{" + a + "}{" + b + "}" + substr[2:]
        else:
            new_str += "{" + a + "}" + b + substr[2:]
    return new_str


def _fix_a_slash_b(string: str) -> str:
    parts = string.split("/")
    if len(parts) != 2:
        return string
    a, b = int(parts[0]), int(parts[1])  # ValueError propagates: is_equiv then compares the raw strings
    if string != f"{a}/{b}":
        return string
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(string: str) -> str:
    if "\\text{ " in string:
        splits = string.split("\\text{ ")
        if len(splits) != 2:
            raise ValueError("more than one '\\text{ '")
        return splits[0]
    return string


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        if split[:1] != "{":
            new_string += "\\sqrt{" + split[0] + "}" + split[1:]  # IndexError on a bare trailing \sqrt
        else:
            new_string += "\\sqrt" + split
    return new_string


def strip_string(string: str) -> str:
    """The Hendrycks MATH answer normaliser the original's string fallback uses."""
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def is_equiv(str1: str | None, str2: str | None) -> bool:
    """String equivalence after :func:`strip_string`; raw equality when normalising raises."""
    if str1 is None and str2 is None:
        return True
    if str1 is None or str2 is None:
        return False
    try:
        return strip_string(str1) == strip_string(str2)
    except Exception:  # noqa: BLE001 - the original compares raw strings on any normaliser failure
        return str1 == str2


# ------------------------------------------------------------------------------------------- math-verify
def _faithful_config():
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig

    return [LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=True),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    )]


def math_verify_equal(reference: str, candidate: str, mode: str = "eval", timeout_s: int = 5) -> bool | None:
    """math-verify's verdict, or None when either side is empty or does not parse (caller falls back).

    Must run on a main thread (math-verify's own timeouts, ``timeout_s`` per parse/verify, use SIGALRM): use
    it through :class:`dultra_jax.rewards.procpool.MathVerifier` from anywhere else.
    """
    from math_verify import parse, verify

    if not reference or not candidate:
        return None
    try:
        t = max(1, int(timeout_s))
        if mode == "faithful":
            config = _faithful_config()
            gold = parse(reference, extraction_config=config, extraction_mode="first_match", parsing_timeout=t)
            pred = parse(candidate, extraction_config=config, extraction_mode="first_match",
                         parsing_timeout=t) if gold else None
        elif mode == "eval":
            gold = parse("$" + reference + "$", parsing_timeout=t)
            pred = parse("$" + candidate + "$", parsing_timeout=t) if gold else None
        else:
            raise ValueError(f"unknown math verification mode {mode!r}; use 'eval' or 'faithful'")
        if not gold or not pred:
            return None
        return bool(verify(gold, pred, timeout_seconds=t))
    except ValueError as e:
        if "mode" in str(e):
            raise
        return None
    except Exception:  # noqa: BLE001 - a pathological answer is a wrong answer, never a crash
        return None


def answers_equal(reference: str, candidate: str, mode: str = "eval", timeout_s: int = 5) -> bool:
    """The reward's equivalence: math-verify when both sides parse, else :func:`is_equiv`."""
    verdict = math_verify_equal(reference, candidate, mode, timeout_s)
    return verdict if verdict is not None else is_equiv(candidate, reference)


def check_answer(completion: str, answer: str, mode: str = "eval") -> dict:
    """Extract from both sides and compare; returns {"correct", "extracted", "reference"} (JSON-friendly)."""
    reference = extract_boxed_answer(answer)
    candidate = extract_boxed_answer(completion)
    return {"correct": answers_equal(reference, candidate, mode), "extracted": candidate, "reference": reference}


# ------------------------------------------------------------------------------------------- GSM8K eval parser
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _to_float(value) -> float | None:
    if value is None:
        return None
    cleaned = str(value).strip().replace(",", "")
    if not cleaned:
        return None
    try:
        return float(cleaned)
    except ValueError:
        matches = _NUMBER.findall(cleaned)
        return float(matches[-1]) if matches else None


def gsm8k_hash_number(text: str) -> float | None:
    """The number after the first ``####`` (optional ``$``, commas); cannot read negatives (original quirk)."""
    m = re.search(r"####\s*\$?([\d,]+(?:\.\d+)?)", text)
    return float(m.group(1).replace(",", "")) if m else None


def gsm8k_prediction(text: str) -> float | None:
    """The evaluation's parse chain: last box, ``####``, ``<answer>``, then the last number in the text."""
    if not text:
        return None
    boxed = _to_float(extract_boxed_answer(text))
    if boxed is not None:
        return boxed
    pound = gsm8k_hash_number(text)
    if pound is not None:
        return pound
    tag = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if tag:
        tagged = _to_float(tag.group(1))
        if tagged is not None:
            return tagged
    matches = _NUMBER.findall(text)
    return float(matches[-1]) if matches else None


def gsm8k_eval_correct(completion: str, answer: str) -> bool:
    """The original's GSM8K accuracy: |prediction - ground truth| < 1e-5 (``answer`` = "72" or "... #### 72")."""
    gt = gsm8k_hash_number(answer if "####" in answer else "#### " + answer)
    pred = gsm8k_prediction(completion)
    return gt is not None and pred is not None and abs(pred - gt) < 1e-5
