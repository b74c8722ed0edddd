"""Code correctness: turn a completion into a program, run it against the task's tests in the sandbox, judge.

Extraction and scoring follow the original (docs/original.md §7, §9): APPS call-based tests score
{1.0 all pass, 0.0 a wrong output, -0.05 an execution failure (exception or timeout), 0.0 if that failure is a
syntax/indentation error}; HumanEval and MBPP pass iff the program with its tests runs to completion (the
lm-eval-harness programs of the original's evaluation: HumanEval ``prompt + "\\n" + code`` sanitised, then
``test`` and ``check(entry_point)``; MBPP ``code + "\\n" + test_list``). APPS standard-input problems (absent
from the original's training set) are run once per test and judged by their stdout.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dultra_jax.answers import parse_apps_io
from dultra_jax.rewards.sandbox import Job, RunResult, Sandbox, SandboxLimits

APPS_TIMEOUT_S = 10.0  # the original's APPS_TIMEOUT, per test
HARNESS_TIMEOUT_S = 3.0  # code_eval's default in the lm-eval-harness evaluation
APPS_PASS, APPS_WRONG, APPS_EXEC_FAIL = 1.0, 0.0, -0.05


@dataclass
class CodeResult:
    """Verdict for one completion: ``reward`` as the original scores it, ``passed`` = all tests passed."""

    reward: float
    passed: bool
    status: str
    error: str | None = None
    tests_passed: int = 0
    tests_total: int = 0
    program: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "runs"}


# ------------------------------------------------------------------------------------------- extraction
def extract_code(text: str) -> str:
    """The original's APPS extraction: inside the first ``<answer>``, the first fenced block, dedented."""
    body = text
    if "<answer>" in body:
        body = body.split("<answer>", 1)[-1].split("</answer>", 1)[0]
    for fence in ("```python\n", "```python", "```"):
        if fence in body:
            body = body.split(fence, 1)[-1]
            break
    body = body.split("```", 1)[0]
    return textwrap.dedent(body).strip()


SANITIZE_SCAN_LINES = 100  # the original's sanitiser looks for code in the first 100 lines only


def _parseable(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):  # ValueError: NUL bytes
        return False
    return True


def longest_parseable_range(code: str, max_lines: int = SANITIZE_SCAN_LINES) -> str:
    """Of the first ``max_lines`` lines, the contiguous range that parses and has the most non-blank lines
    (the earliest start on ties; "" when no line parses).

    Searched from the widest range down with pruning, so a program that parses whole costs one parse: a range
    is tried only while its non-blank count can still beat the best found.
    """
    lines = code.split("\n")[:max_lines]
    n = len(lines)
    filled = [0]
    for line in lines:
        filled.append(filled[-1] + bool(line.strip()))
    best, best_range = 0, (0, 0)
    for i in range(n):
        if filled[n] - filled[i] <= best:
            break  # no range starting here or later can beat it
        for j in range(n, i, -1):
            count = filled[j] - filled[i]
            if count <= best:
                break
            if _parseable("\n".join(lines[i:j])):
                best, best_range = count, (i, j)
                break
    return "\n".join(lines[best_range[0]:best_range[1]])


def _defined_name(node: ast.stmt) -> str | None:
    """The name a kept top-level definition binds: classes, functions containing a ``return``, ``name = ...``."""
    if isinstance(node, ast.ClassDef):
        return node.name
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.name if any(isinstance(n, ast.Return) for n in ast.walk(node)) else None
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
        return node.target.id
    return None


def _names_used(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def sanitize(code: str, entry_point: str | None = None) -> str:
    """The HumanEval sanitiser of the original's evaluation (its lm-eval ``humaneval_instruct``), from its rules.

    Tabs become 4 spaces and CRLF LF; the longest parseable range of the first 100 lines
    (:func:`longest_parseable_range`) is kept; of it, every top-level import, and the top-level definitions
    :func:`_defined_name` names (a later definition of a name replaces the earlier one in the earlier one's
    place). With ``entry_point`` only definitions reachable from it through the names and attribute names they
    use are kept. Output: the imports, then the definitions, unparsed. Statements (demo calls, prints,
    ``__main__`` blocks), functions without a ``return`` and helpers the entry point never names are dropped.
    """
    code = code.replace("\r\n", "\n").replace("\t", "    ")
    tree = ast.parse(longest_parseable_range(code))
    imports: list[ast.stmt] = []
    definitions: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        elif (name := _defined_name(node)) is not None:
            definitions[name] = node  # a re-definition replaces the node, the dict keeps the first position
    if entry_point is not None:
        reachable, todo = set(), [entry_point]
        while todo:
            name = todo.pop()
            if name in reachable or name not in definitions:
                continue
            reachable.add(name)
            todo.extend(_names_used(definitions[name]) - reachable)
        definitions = {k: v for k, v in definitions.items() if k in reachable}
    return "\n".join(ast.unparse(node) for node in [*imports, *definitions.values()]) + "\n"


def sanitize_lenient(code: str) -> str:
    """Keep every top-level import, definition and assignment (drop demo calls, prints, ``__main__`` blocks).

    This project's earlier rule, kept as the ``"lenient"`` HumanEval option: unlike :func:`sanitize` it keeps
    helpers the entry point does not name and functions without ``return``, and code that does not parse is
    returned unchanged (it then fails as a syntax error).
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
            ast.AnnAssign)
    lines = code.splitlines()
    out = []
    for node in tree.body:
        if isinstance(node, keep):
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            out.append("\n".join(lines[start - 1: node.end_lineno]))
    return "\n".join(out) + "\n"


HUMANEVAL_SANITIZERS = ("original", "lenient")


def humaneval_program(problem: dict[str, Any], completion: str, sanitizer: str = "original") -> str:
    """The evaluation's HumanEval program: ``sanitize(prompt + "\\n" + code, entry_point)`` + test + check(...).

    ``code`` is the text after the first ```` ```python\\n```` up to the next ```` ``` ```` (the whole completion
    without a fence: a body continuation or a whole function). ``sanitizer="lenient"`` uses
    :func:`sanitize_lenient` instead (no entry-point pruning).
    """
    if sanitizer not in HUMANEVAL_SANITIZERS:
        raise ValueError(f"unknown HumanEval sanitizer {sanitizer!r}; choose one of {list(HUMANEVAL_SANITIZERS)}")
    code = completion.split("```python\n", 1)[-1].split("```")[0]
    source = problem["prompt"] + "\n" + code
    program = sanitize(source, problem["entry_point"]) if sanitizer == "original" else sanitize_lenient(source)
    return f"{program}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def mbpp_program(problem: dict[str, Any], completion: str) -> str:
    """The evaluation's MBPP program: the fenced code (or the whole completion) followed by the asserts."""
    code = completion.split("```python", 1)[-1].split("```")[0].strip() if "```" in completion else completion
    return code + "\n" + "\n".join(problem["test_list"]) + "\n"


def prepare_apps_code(code: str, fn_name: str | None) -> str:
    """Dedent/strip; expose a LeetCode-style ``class Solution`` method as a module-level function."""
    cleaned = textwrap.dedent(code).strip()
    if cleaned and fn_name and "class Solution" in cleaned:
        cleaned += f"\n\n\ndef {fn_name}(*args, **kwargs):\n    return Solution().{fn_name}(*args, **kwargs)\n"
    return cleaned


def _normalize(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    return value


def stdout_matches(actual: str, expected: str | list[str]) -> bool:
    """Line-wise equality ignoring surrounding whitespace and trailing blank lines, else token equality."""
    if isinstance(expected, list):
        expected = "\n".join(str(x) for x in expected)

    def lines(s: str) -> list[str]:
        out = [ln.strip() for ln in s.strip().splitlines()]
        return out

    return lines(actual) == lines(str(expected)) or actual.split() == str(expected).split()


def _exec_failure_reward(error: str | None) -> float:
    msg = (error or "").lower()
    return APPS_WRONG if ("syntax" in msg or "indentation" in msg) else APPS_EXEC_FAIL


# ------------------------------------------------------------------------------------------- verifier
class CodeVerifier:
    """Scores completions for the code tasks, running every program through one :class:`Sandbox`."""

    def __init__(self, sandbox: Sandbox | None = None, *, workers: int | None = None,
                 apps_timeout_s: float = APPS_TIMEOUT_S, harness_timeout_s: float = HARNESS_TIMEOUT_S,
                 memory_mb: int = 1024, humaneval_sanitizer: str = "original"):
        if humaneval_sanitizer not in HUMANEVAL_SANITIZERS:
            raise ValueError(f"unknown HumanEval sanitizer {humaneval_sanitizer!r}; choose one of "
                             f"{list(HUMANEVAL_SANITIZERS)}")
        self.humaneval_sanitizer = humaneval_sanitizer
        base = sandbox or Sandbox(SandboxLimits(timeout_s=harness_timeout_s, memory_mb=memory_mb), workers=workers)
        self.harness = base
        self.apps = Sandbox(
            SandboxLimits(timeout_s=apps_timeout_s, memory_mb=base.limits.memory_mb,
                          output_bytes=base.limits.output_bytes),
            workers=base.workers, namespaces=base.namespaces, audit_hook=base.audit_hook, python=base.python,
        )

    # -- assert-style tasks
    def score_programs(self, programs: Sequence[str]) -> list[CodeResult]:
        """Each program passes iff it runs to completion in the sandbox (its tests are inside it)."""
        runs = self.harness.map([Job(code=p) for p in programs])
        return [
            CodeResult(reward=1.0 if r.passed else 0.0, passed=r.passed, status=r.status, error=r.error,
                       tests_passed=int(r.passed), tests_total=1, program=p, runs=[r.to_dict()])
            for p, r in zip(programs, runs, strict=True)
        ]

    def score_humaneval(self, problems: Sequence[dict[str, Any]], completions: Sequence[str], *,
                        sanitizer: str | None = None) -> list[CodeResult]:
        """``sanitizer`` (default: the verifier's ``humaneval_sanitizer``) is one of :data:`HUMANEVAL_SANITIZERS`."""
        rule = sanitizer or self.humaneval_sanitizer
        return self.score_programs([humaneval_program(p, c, rule) for p, c in zip(problems, completions, strict=True)])

    def score_mbpp(self, problems: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[CodeResult]:
        return self.score_programs([mbpp_program(p, c) for p, c in zip(problems, completions, strict=True)])

    def score_tests(self, problems: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[CodeResult]:
        """Each problem by its own kind (``tests["kind"]``: humaneval | mbpp | apps), through that kind's
        ``score_<kind>``: the one rule the task table's scorers use too."""
        out: list[CodeResult | None] = [None] * len(problems)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(problems):
            groups.setdefault(str(p.get("kind")), []).append(i)
        for kind, idx in groups.items():
            method = getattr(self, f"score_{kind}", None) if kind in ("humaneval", "mbpp", "apps") else None
            if method is None:
                raise ValueError(f"no code tests of kind {kind!r} (humaneval, mbpp or apps)")
            for i, r in zip(idx, method([problems[i] for i in idx], [completions[i] for i in idx]), strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    # -- APPS
    def score_apps(self, problems: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[CodeResult]:
        """``problems`` carry ``input_output`` (JSON). Call-based and stdin/stdout problems both supported."""
        plans: list[tuple[str, dict[str, Any], list[int]]] = []
        jobs: list[Job] = []
        for problem, completion in zip(problems, completions, strict=True):
            io = parse_apps_io(problem.get("input_output"))
            code = prepare_apps_code(extract_code(completion), io["fn_name"])
            ids: list[int] = []
            if code.strip() and io["inputs"]:
                if io["fn_name"]:
                    ids.append(len(jobs))
                    jobs.append(Job(code=code, mode="call", fn_name=io["fn_name"], inputs=io["inputs"]))
                else:
                    for inp in io["inputs"]:
                        ids.append(len(jobs))
                        stdin = "\n".join(map(str, inp)) if isinstance(inp, list) else str(inp)
                        jobs.append(Job(code=code, mode="stdio", stdin=stdin))
            plans.append((code, io, ids))
        runs = self.apps.map(jobs)
        return [self._judge_apps(code, io, [runs[i] for i in ids]) for code, io, ids in plans]

    @staticmethod
    def _judge_apps(code: str, io: dict[str, Any], runs: list[RunResult]) -> CodeResult:
        total = len(io["inputs"])
        if not code.strip() or total == 0:
            return CodeResult(reward=0.0, passed=False, status="no_code" if not code.strip() else "no_tests",
                              tests_total=total, program=code)
        expected = [o[0] if isinstance(o, list) else o for o in io["outputs"]]
        passed, first_error = 0, None
        if io["fn_name"]:
            run = runs[0]
            if run.status != "ok" or run.outputs is None:
                first_error = run.error or f"sandbox run ended with status {run.status}"
            else:
                for j, out in enumerate(run.outputs):
                    if not out.get("ok"):
                        first_error = out.get("error") or "execution failure"
                        break
                    if out.get("value") == _normalize(expected[j]):
                        passed += 1
        else:
            for j, run in enumerate(runs):
                if run.status != "ok":
                    first_error = run.error or f"sandbox run ended with status {run.status}"
                    break
                if stdout_matches(run.stdout, expected[j]):
                    passed += 1
        if first_error is not None:
            reward, status = _exec_failure_reward(first_error), "runtime_error"
        elif passed == total:
            reward, status = APPS_PASS, "pass"
        else:
            reward, status = APPS_WRONG, "wrong_output"
        return CodeResult(reward=reward, passed=passed == total and first_error is None, status=status,
                          error=first_error, tests_passed=passed, tests_total=total, program=code,
                          runs=[r.to_dict() for r in runs])
