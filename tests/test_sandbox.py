"""The code sandbox: real HumanEval/MBPP/APPS tests pass and fail as they should; hostile programs are contained,
scored 0, and stopped within their limits."""

import gzip
import json
import os
import socket
import time
from pathlib import Path

import pytest

from dultra_jax.rewards.code import (
    CodeVerifier,
    extract_code,
    humaneval_program,
    mbpp_program,
    sanitize_lenient,
    stdout_matches,
)
from dultra_jax.rewards.sandbox import Sandbox, SandboxError, SandboxLimits, namespaces_available

FIX = Path(__file__).parent / "fixtures"
LIMIT_S = 2.0
SECRET = "dultra-test-secret-0xC0FFEE"


@pytest.fixture(scope="module")
def humaneval():
    with gzip.open(FIX / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(Sandbox(SandboxLimits(timeout_s=LIMIT_S, memory_mb=1024), workers=2), apps_timeout_s=LIMIT_S)


# ------------------------------------------------------------------------------------------- real tests
def test_humaneval_canonical_solutions_pass_as_in_the_original(humaneval, verifier):
    """All but HumanEval/50 pass under the original's sanitiser: it drops ``encode_shift``, which the test calls
    but the entry point never names; the lenient rule keeps it."""
    results = verifier.score_humaneval(humaneval, [p["canonical_solution"] for p in humaneval])
    failed = [p["task_id"] for p, r in zip(humaneval, results, strict=True) if not r.passed]
    assert failed == ["HumanEval/50"]
    assert "NameError" in (results[50].error or "") and "encode_shift" in results[50].error
    assert all(r.reward == 1.0 for r in results if r.passed)
    [lenient] = verifier.score_humaneval([humaneval[50]], [humaneval[50]["canonical_solution"]], sanitizer="lenient")
    assert lenient.passed


def test_humaneval_prose_inside_the_fence(humaneval, verifier):
    """A fenced whole function followed by a line of prose inside the fence: the original's sanitiser keeps the
    longest parseable range (passes); the lenient rule returns the unparseable text (a syntax error)."""
    p = humaneval[2]
    completion = f"```python\n{p['prompt']}{p['canonical_solution']}\nThis returns the decimal part.\n```"
    original = verifier.score_humaneval([p], [completion])[0]
    lenient = verifier.score_humaneval([p], [completion], sanitizer="lenient")[0]
    assert original.passed and not lenient.passed and "SyntaxError" in (lenient.error or "")


def test_humaneval_with_body_replaced_by_pass_all_fail(humaneval, verifier):
    results = verifier.score_humaneval(humaneval, ["    pass\n"] * len(humaneval))
    assert [p["task_id"] for p, r in zip(humaneval, results, strict=True) if r.passed] == []


def test_humaneval_completion_forms(humaneval, verifier):
    p = humaneval[2]  # truncate_number
    whole = p["prompt"] + p["canonical_solution"]
    forms = [
        p["canonical_solution"],  # body continuation
        f"Sure!\n```python\n{whole}\nprint(truncate_number(3.5))\n```\nDone.",  # fenced whole function + demo
        whole + "\nif __name__ == '__main__':\n    raise SystemExit(1)\n",  # main block dropped by sanitising
    ]
    assert [r.passed for r in verifier.score_humaneval([p] * 3, forms)] == [True, True, True]


def test_mbpp_reference_code_passes_and_wrong_code_fails(verifier):
    rows = [json.loads(line) for line in (FIX / "tasks" / "mbpp_sample.jsonl").open()]
    good = verifier.score_mbpp(rows, [f"```python\n{r['code']}\n```" for r in rows])
    assert [r.passed for r in good] == [True, True, True]
    bad = verifier.score_mbpp(rows, ["def similar_elements(a, b):\n    return ()", "", "x = 1"])
    assert [r.passed for r in bad] == [False, False, False]


# ------------------------------------------------------------------------------------------- APPS semantics
def _apps(fn_name, inputs, outputs):
    return {"input_output": json.dumps({"fn_name": fn_name, "inputs": inputs, "outputs": outputs})}


@pytest.mark.parametrize("code, reward", [
    ("def f(x):\n    return x * 2", 1.0),
    ("class Solution:\n    def f(self, x):\n        return x * 2", 1.0),  # LeetCode style, wrapped
    ("def f(x):\n    return (x * 2, 0)[0] if x else 0", 1.0),
    ("def f(x):\n    return x + 1", 0.0),  # wrong output
    ("def f(x):\n    return undefined_name", -0.05),  # NameError
    ("def f(x):\n    while True:\n        pass", -0.05),  # timeout
    ("def f(x)\n    return x", 0.0),  # SyntaxError
    ("def f(x):\n  return x\n    return x", 0.0),  # IndentationError
    ("def g(x):\n    return x", -0.05),  # fn_name missing
    ("", 0.0),  # nothing extracted
])
def test_apps_call_based_rewards(verifier, code, reward):
    problem = _apps("f", [[1], [2], [0]], [[2], [4], [0]])
    [r] = verifier.score_apps([problem], [f"<think>t</think>\n```python\n{code}\n```"])
    assert r.reward == pytest.approx(reward), (r.status, r.error)


def test_apps_outputs_compared_like_the_original(verifier):
    p = _apps("pair", [[[3, 1, 2]]], [[[1, 3]]])
    codes = ["def pair(xs):\n    return (min(xs), max(xs))",  # tuple -> list
             "def pair(xs):\n    return {1: 3}",  # non-JSON key: never equal to a JSON value
             "import numpy as np\ndef pair(xs):\n    return np.array([min(xs), max(xs)])"]
    assert [r.reward for r in verifier.score_apps([p] * 3, codes)] == [1.0, 0.0, 1.0]


def test_apps_fixture_solutions_and_stdio(verifier):
    rows = [json.loads(line) for line in (FIX / "tasks" / "apps_sample.jsonl").open()]
    sols = [json.loads(r["solutions"])[0] for r in rows]
    assert [r.reward for r in verifier.score_apps(rows, sols)] == [1.0, 1.0, 1.0, 1.0]
    stdio = rows[2]
    assert verifier.score_apps([stdio], ["print(sum(map(int, input().split())))\nexit()"])[0].passed
    assert verifier.score_apps([stdio], ["print(3)"])[0].reward == 0.0


def test_extraction_helpers():
    assert extract_code("<answer>```python\n  x = 1\n```</answer>") == "x = 1"
    assert extract_code("text\n```\ny = 2\n```") == "y = 2"
    assert extract_code("plain = 3") == "plain = 3"
    kept = sanitize_lenient("import os\nprint(1)\ndef f():\n    return 1\nf()\n")
    assert kept == "import os\ndef f():\n    return 1\n"
    assert sanitize_lenient("def (") == "def ("
    assert stdout_matches("3 \n\n", "3\n") and stdout_matches("1 2\n3", "1 2 3") and not stdout_matches("3", "4")
    assert mbpp_program({"test_list": ["assert f()"]}, "no fences") == "no fences\nassert f()\n"
    he = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    assert humaneval_program(he, "    return 1\n").endswith("check(f)\n")


# ------------------------------------------------------------------------------------------- adversarial
def _attacks(tmp_path, port):
    """HumanEval-style candidates that pass their test only if the attack works."""
    outside = tmp_path / "escaped.txt"
    return outside, {
        "infinite_loop": "def f():\n    while True:\n        pass\n",
        "fork_bomb": "import os\ndef f():\n    while True:\n        try:\n            os.fork()\n"
                     "        except Exception:\n            pass\n",
        "allocate_10gb": "def f():\n    x = bytearray(10 * 2**30)\n    return len(x) > 0\n",
        "write_outside": f"def f():\n    open({str(outside)!r}, 'w').write('pwned')\n    return True\n",
        "read_env_secret": f"import os\ndef f():\n    return os.environ.get('DULTRA_TEST_SECRET') == {SECRET!r}\n",
        "read_parent_environ": "import os\ndef f():\n    found = False\n    for p in os.listdir('/proc'):\n"
                               "        try:\n            found |= b'DULTRA_TEST_SECRET' in "
                               "open(f'/proc/{p}/environ', 'rb').read()\n        except Exception:\n"
                               "            pass\n    return found\n",
        "open_socket": f"import socket\ndef f():\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                       "    s.sendall(b'pwned')\n    return True\n",
        "print_100mb": "import sys\ndef f():\n    sys.stdout.write('x' * (100 * 2**20))\n    return True\n",
        "kill_parent": "import os, signal\ndef f():\n    os.kill(os.getppid(), signal.SIGKILL)\n    return True\n",
        "exit_before_tests": "import sys\nsys.exit(0)\ndef f():\n    return True\n",
        "os_exit_before_tests": "import os\nos._exit(0)\ndef f():\n    return True\n",
    }


TEST = "def check(candidate):\n    assert candidate() is True\n"


def _require_full_namespaces():
    """Skip unless this machine gives the sandbox every kernel layer (the namespaces-only case relies on them)."""
    if not namespaces_available():
        pytest.skip("this kernel/container does not allow namespaces")
    iso = Sandbox(SandboxLimits(timeout_s=5), audit_hook=False).run_script("pass").isolation
    if not {"user", "mount", "net", "pid"} <= set(iso.get("namespaces", [])) or iso.get("proc") != "private" \
            or not str(iso.get("mounts", "")).startswith("read-only"):
        pytest.skip(f"only partial kernel isolation here: {iso}")


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    yield srv
    srv.close()


def _contained(tmp_path, listener, outside):
    with pytest.raises(socket.timeout):
        listener.accept()  # nobody connected
    assert not outside.exists()


@pytest.mark.parametrize("isolation", ["default", "audit_hook_only", "namespaces_only"])
def test_adversarial_programs_are_contained(tmp_path, listener, monkeypatch, isolation):
    if isolation == "namespaces_only":
        _require_full_namespaces()
    kw = {"default": {}, "audit_hook_only": {"namespaces": False}, "namespaces_only": {"audit_hook": False}}[isolation]
    monkeypatch.setenv("DULTRA_TEST_SECRET", SECRET)
    outside, attacks = _attacks(tmp_path, listener.getsockname()[1])
    v = CodeVerifier(Sandbox(SandboxLimits(timeout_s=LIMIT_S, memory_mb=512), workers=2, **kw))
    t0 = time.perf_counter()
    # Raw programs (not sanitised: that would drop the top-level exits), tests appended as HumanEval does.
    results = v.score_programs([f"{code}\n{TEST}\ncheck(f)\n" for code in attacks.values()])
    elapsed = time.perf_counter() - t0
    scores = dict(zip(attacks, results, strict=True))
    for name, r in scores.items():
        # Each run is bounded by its wall clock (limit + start-up slack) plus the kill.
        assert r.runs[0]["duration_s"] < LIMIT_S + 2.0 + 3.0, (name, r.runs[0]["duration_s"])
        assert len(r.runs[0]["stdout"]) <= v.harness.limits.output_bytes
    _contained(tmp_path, listener, outside)
    assert os.getppid() > 1  # we (the parent) are alive, obviously, and so is ours
    if isolation == "namespaces_only":
        # Without the audit hook a kill of the "parent" reaches nothing outside the PID namespace (it may
        # even return normally), so only containment is asserted for it; everything else still scores 0.
        scores.pop("kill_parent")
    assert {n: r.reward for n, r in scores.items()} == {n: 0.0 for n in scores}
    assert scores["infinite_loop"].status == "timeout"
    assert scores["exit_before_tests"].status in ("exit", "no_result")
    # the whole batch is bounded by the configured limit: every program cut at its wall clock (+ the kill), in
    # rounds of the sandbox's 2 workers
    assert elapsed < -(-len(attacks) // 2) * (LIMIT_S + 2.0 + 3.0)


def test_output_cap_and_memory_limit():
    sb = Sandbox(SandboxLimits(timeout_s=5, memory_mb=2048, output_bytes=64 * 1024))
    r = sb.run_script("import sys\nfor _ in range(100):\n    sys.stdout.write('y' * 2**20)\n")
    assert r.status in ("output_limit", "error", "killed") and not r.passed
    assert len(r.stdout) <= 64 * 1024
    assert sb.run_script("x = bytearray(10 * 2**30)").error.startswith("MemoryError")


def test_environment_is_scrubbed_and_workdir_private(monkeypatch):
    monkeypatch.setenv("DULTRA_TEST_SECRET", SECRET)
    sb = Sandbox(SandboxLimits(timeout_s=5))
    r = sb.run_script("import os, json\nprint(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))\n"
                      "open('scratch.txt', 'w').write('ok')\n")
    assert r.passed, r.error
    seen = json.loads(r.stdout)
    assert SECRET not in r.stdout and set(seen["env"]) <= {
        "PATH", "LANG", "LC_ALL", "PYTHONHASHSEED", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
        "HOME", "TMPDIR", "LC_CTYPE"}
    assert seen["env"]["HOME"] == seen["cwd"] and "dultra-sandbox-" in seen["cwd"]
    assert not Path(seen["cwd"]).exists()  # removed after the run


def test_blocked_capabilities_report_clearly():
    sb = Sandbox(SandboxLimits(timeout_s=5), namespaces=False)
    for code, needle in [("import subprocess", "_posixsubprocess"), ("import ctypes", "ctypes"),
                         ("import os\nos.fork()", "os.fork"), ("import socket\nsocket.socket()", "socket")]:
        r = sb.run_script(code)
        assert not r.passed and needle in r.error, (code, r.error)


def test_sandbox_configuration_errors():
    with pytest.raises(SandboxError, match="neither"):
        Sandbox(namespaces=False, audit_hook=False)
    with pytest.raises(SandboxError, match="invalid sandbox limits"):
        SandboxLimits(timeout_s=0)
