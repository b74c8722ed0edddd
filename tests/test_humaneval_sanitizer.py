"""The HumanEval sanitiser's rules (the original evaluation's, from its description), on hand-made programs.

The sandboxed checks on the real 164 problems are in test_sandbox.py.
"""

import ast

import pytest

from dultra_jax.rewards.code import humaneval_program, longest_parseable_range, sanitize


def test_function_without_return_is_dropped():
    code = "def helper():\n    print('side effect')\n\ndef f():\n    return 1\n"
    assert sanitize(code) == "def f():\n    return 1\n"
    assert "helper" not in sanitize(code, "f")


def test_a_later_definition_replaces_the_earlier_in_its_place():
    code = "def f():\n    return 1\n\nX = 5\n\ndef f():\n    return 2\n"
    out = sanitize(code)
    assert out == "def f():\n    return 2\nX = 5\n"
    assert [n.__class__.__name__ for n in ast.parse(out).body] == ["FunctionDef", "Assign"]


def test_entry_point_keeps_only_what_it_reaches_through_names_and_attributes():
    code = (
        "import math\nfrom os import path\n"
        "def unused():\n    return 0\n"
        "def helper(x):\n    return x + OFFSET\n"
        "OFFSET = 3\n"
        "class Box:\n    def get(self):\n        return 1\n"
        "def method_user(b):\n    return b.helper2()\n"
        "def helper2():\n    return 2\n"
        "def f(x):\n    return helper(x) + method_user(Box())\n"
    )
    out = sanitize(code, "f")
    names = [n.name if hasattr(n, "name") else ast.unparse(n) for n in ast.parse(out).body]
    # imports first (all of them), then the reachable definitions in their first positions
    assert names == ["import math", "from os import path", "helper", "OFFSET = 3", "Box", "method_user", "helper2",
                     "f"]
    assert "unused" not in out
    # an entry point that is not defined keeps the imports only
    assert sanitize(code, "missing") == "import math\nfrom os import path\n"


def test_statements_are_dropped_and_tabs_and_crlf_normalised():
    code = "def f():\r\n\treturn 1\r\nprint(f())\r\nif __name__ == '__main__':\r\n\tf()\r\n"
    assert sanitize(code, "f") == "def f():\n    return 1\n"


def test_longest_parseable_range_skips_prose_and_looks_at_100_lines():
    code = "Here is the code:\ndef f():\n    return 1\n\nIt returns one.\n"
    assert longest_parseable_range(code) == "def f():\n    return 1\n"
    assert sanitize(code, "f") == "def f():\n    return 1\n"
    # the range with the most non-blank lines wins, not the first one
    two = "def a():\n    return 1\nprose here\ndef b():\n    x = 1\n    return x\n"
    assert sanitize(two) == "def b():\n    x = 1\n    return x\n"
    # a definition after line 100 is not seen
    late = "\n".join(["x = 0"] * 100) + "\ndef g():\n    return 2\n"
    assert "def g" not in sanitize(late) and sanitize("no code at all here") == "\n"


def test_humaneval_program_builds_the_prediction_as_the_original():
    he = {"prompt": "def f(x):\n    \"\"\"doc\"\"\"\n", "test": "def check(c):\n    assert c(1) == 2\n",
          "entry_point": "f"}
    body = humaneval_program(he, "    return x + 1\n")
    fenced = humaneval_program(he, "Sure:\n```python\ndef f(x):\n    return x + 1\nprint(f(1))\n```\nDone.")
    for program in (body, fenced):
        assert program.endswith("\ncheck(f)\n") and "print(" not in program
        ns: dict = {}
        exec(compile(program, "<he>", "exec"), ns)  # our own literal program: runs check(f)
    with pytest.raises(ValueError, match="sanitizer"):
        humaneval_program(he, "", sanitizer="strict")
