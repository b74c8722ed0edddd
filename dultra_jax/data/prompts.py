"""The original's prompts, verbatim (docs/original.md §8), and chat templating with a tokenizer.

Two prompt styles:

- ``train`` (GRPO rollouts, ``diffu_grpo/data_utils.py``): a system turn (math or code, thinking or
  non-thinking) and a user turn; rendered with the generation prompt, tokenised without special tokens.
- ``eval`` (the original's evaluation): one user turn. Math: the non-thinking math rules + a blank line + the
  question (``eval_math/gsm8k.py``); code: the lm-eval-harness instruct text of the original's fork. Tokenised
  with the tokenizer's default special tokens, as the evaluation does.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

PROMPT_MODES = ("thinking", "non-thinking")
STYLES = ("train", "eval")
Messages = list[dict[str, str]]

MATH_SYSTEM_PROMPT_NON_THINKING = r"""
You are a math expert.
Follow these rules:
1) Carefully read the question and identify what is being asked.
2) Solve the problem step by step, showing the intermediate reasoning.
3) Present the final answer inside \boxed{}.
"""

MATH_SYSTEM_PROMPT_THINKING = r"""
You are a math expert. To answer the user's question, first write your full reasoning inside <think></think>. After thinking, provide only the final result inside an <answer></answer> block, wrapping the answer in \boxed{}.
"""  # noqa: E501 - one line in the original

# "tests,and" (no space) is the original's text.
CODE_SYSTEM_PROMPT_THINKING = r"""
You are an expert Python programmer. Carefully read the task description and unit tests,and write a correct and efficient python implementation. To answer the user's question, you first think about the reasoning process and then provide the user with the answer. The reasoning process and answer are enclosed within <think> </think> and a ```python``` code block, respectively, i.e., <think> reasoning process here </think>
```python
answer code here
```.
"""  # noqa: E501

CODE_SYSTEM_PROMPT_NON_THINKING = r"""
You are an expert Python programmer. Carefully read and think about the task provided and write correct, efficient Python code that solves the problem and passes the hidden tests. Wrap the final code inside a ```python``` code block.
"""  # noqa: E501

# The evaluation's math rules: the same four lines, no leading newline, a trailing one (eval_math/gsm8k.py).
MATH_EVAL_RULES = MATH_SYSTEM_PROMPT_NON_THINKING.lstrip("\n")


def _check_mode(prompt_mode: str) -> str:
    mode = prompt_mode.lower()
    if mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt mode {prompt_mode!r}; expected one of {PROMPT_MODES}")
    return mode


def math_system_prompt(prompt_mode: str = "thinking") -> str:
    mode = _check_mode(prompt_mode)
    return MATH_SYSTEM_PROMPT_THINKING if mode == "thinking" else MATH_SYSTEM_PROMPT_NON_THINKING


def code_system_prompt(prompt_mode: str = "thinking") -> str:
    mode = _check_mode(prompt_mode)
    return CODE_SYSTEM_PROMPT_THINKING if mode == "thinking" else CODE_SYSTEM_PROMPT_NON_THINKING


def conversation(system_prompt: str, user_content: str) -> Messages:
    """[system, user] as the original builds it: dedented/stripped system text, stripped user text."""
    return [
        {"role": "system", "content": textwrap.dedent(system_prompt).strip()},
        {"role": "user", "content": user_content.strip()},
    ]


def math_user_prompt(problem: str) -> str:
    """MATH500 / DAPO user turn (dedented, stripped); GSM8K uses the question as is."""
    return textwrap.dedent(str(problem)).strip()


def apps_user_prompt(question: str, starter_code: str | None, prompt_mode: str = "thinking") -> str:
    """"Write a solution to the following problem:\\n{question}[\\n\\nStarter code:\\n{code}]. {suffix}".

    The sample input/output is deliberately not shown (the original hides it).
    """
    mode = _check_mode(prompt_mode)
    sections = [textwrap.dedent(str(question)).strip()]
    if starter_code:
        sections.append(f"Starter code:\n{starter_code.strip()}")
    body = "\n\n".join(s for s in sections if s)
    suffix = "Make sure to include all your thinking steps." if mode == "thinking" else ""
    return textwrap.dedent(f"Write a solution to the following problem:\n{body}. {suffix}").strip()


def math_eval_user_prompt(question: str) -> str:
    """The evaluation's single user turn: the four math rules, a blank line, the question."""
    return MATH_EVAL_RULES + "\n\n" + question


def humaneval_instruct_prompt(prompt: str) -> str:
    """The original's ``humaneval_instruct`` text (its lm-eval fork; no assistant prefix)."""
    return "Write a solution to the following problem and make sure that it passes the tests:\n" + prompt


def mbpp_instruct_prompt(text: str, test_list: Sequence[str]) -> str:
    """The original's ``mbpp_instruct`` text (its lm-eval fork, 0-shot)."""
    tests = "\n".join(list(test_list)[:3])
    return (f"You are an expert Python programmer, and here is your task: {text} Your code should pass these "
            f"tests:\n\n{tests}. Respond with the completed solution inside a ```python``` code block.")


def render_chat(tokenizer, messages: Messages, *, add_generation_prompt: bool = True) -> str:
    """The chat-templated prompt text (the tokenizer's own template, e.g. LLaDA's)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template; load the "
            "model's tokenizer (its directory has chat_template.jinja or tokenizer_config.json with one)"
        )
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                         tokenize=False)
