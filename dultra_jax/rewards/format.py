"""Format rewards exactly as the original defines them (docs/original.md §7); weights live in the registry."""

from __future__ import annotations


def answer_format(text: str) -> float:
    """``<answer>`` tag and ``\\boxed`` inside it: 0.5 * (1[<answer>] + (1 if \\boxed in the tag else 0.5)).

    Inside = between the first ``<answer>`` and the next ``</answer>`` (or the end). Values 0.25/0.5/0.75/1.0.
    """
    score = 0.0
    if "<answer>" in text:
        score += 1.0
        text = text.split("<answer>")[1].split("</answer>")[0]
    score += 1.0 if "\\boxed" in text else 0.5
    return 0.5 * score


def think_format(text: str) -> float:
    """0.5 when both ``<think>`` and ``</think>`` occur anywhere (the original's soft format reward)."""
    return 0.5 if ("<think>" in text and "</think>" in text) else 0.0


def code_fence_format(text: str) -> float:
    """Python code-fence shape, in [0, 1]: +0.25 each for a fence, a ```python fence, a closing fence and no
    trailing text after the last fence (else -0.001 per trailing character, up to 200)."""
    if not text:
        return 0.0
    score = 0.0
    if "```" in text:
        score += 0.25
    if "```python" in text.lower():
        score += 0.25
    if text.count("```") >= 2:
        score += 0.25
    stripped = text.strip()
    last = stripped.rfind("```")
    suffix = stripped[last + 3:].strip() if last != -1 else ""
    score += 0.25 if not suffix else -0.001 * min(len(suffix), 200)
    return max(0.0, min(1.0, score))
