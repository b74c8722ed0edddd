"""Run untrusted, model-written Python programs with hard limits, many at a time.

Each run is a fresh ``python -I`` process in its own session (process group) with a scrubbed environment,
a private temporary work directory and stdin/stdout/stderr on files the host owns. Inside, the trusted runner
(:mod:`dultra_jax.rewards._sandbox_runner`) adds kernel isolation where available (user/mount/net/PID
namespaces: no network, read-only filesystem except the work directory, no view of or signals to other
processes), resource limits (CPU seconds, address space, file size, open files, processes) and an audit hook
that refuses process creation, sockets, ``ctypes``, writes outside the work directory and signals. The host
enforces the wall clock and, on timeout or when done, kills the whole process tree.

Three modes: ``script`` (success = the program, including its appended tests, ran to completion; HumanEval,
MBPP), ``stdio`` (feed stdin, capture stdout; APPS standard I/O, compared by the caller) and ``call`` (call
``fn_name`` once per input in a freshly executed module and return the outputs; APPS call-based, compared by
the caller outside the sandbox).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

RUNNER = Path(__file__).with_name("_sandbox_runner.py")
Mode = Literal["script", "stdio", "call"]
Status = Literal["ok", "error", "exit", "timeout", "killed", "output_limit", "no_result", "sandbox_error"]

# Only these reach the program; nothing from the host's environment (tokens, keys, paths) is inherited.
_BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


class SandboxError(RuntimeError):
    """The sandbox itself could not run (bad configuration, missing interpreter), not the program's failure."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``timeout_s`` is the wall clock of a script/stdio run and of *each* call-mode input."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    output_bytes: int = 1 << 20
    max_open_files: int = 256
    max_processes: int = 64
    cpu_s: float | None = None  # default: the run's total wall clock + 1 s

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.output_bytes < 1024:
            raise SandboxError(
                f"invalid sandbox limits {self}: need timeout_s > 0, memory_mb >= 64, output_bytes >= 1024"
            )


@dataclass
class RunResult:
    """What one sandboxed run did. ``passed`` is the verdict for script mode; others are judged by the caller."""

    status: Status
    returncode: int | None = None
    error: str | None = None
    stdout: str = ""
    stderr: str = ""
    outputs: list[dict[str, Any]] | None = None
    duration_s: float = 0.0
    isolation: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Job:
    """One program to run: ``code`` plus, per mode, ``stdin`` (stdio) or ``fn_name`` and ``inputs`` (call)."""

    code: str
    mode: Mode = "script"
    stdin: str = ""
    fn_name: str | None = None
    inputs: Sequence[Any] = ()


class Sandbox:
    """Runs :class:`Job`\\ s under :class:`SandboxLimits`, at most ``workers`` at a time.

    ``namespaces``: ``True`` requires kernel namespaces (raises :class:`SandboxError` where unavailable),
    ``None`` uses them when the kernel allows, ``False`` never. ``audit_hook`` toggles the in-interpreter
    guard. At least one of the two must be on; both (the default) is defence in depth.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        workers: int | None = None,
        namespaces: bool | None = None,
        audit_hook: bool = True,
        python: str | None = None,
    ):
        self.limits = limits or SandboxLimits()
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        if namespaces is False and not audit_hook:
            raise SandboxError("refusing to run untrusted code with neither namespaces nor the audit hook")
        if namespaces is True and not namespaces_available():
            raise SandboxError(
                "namespaces=True but this kernel/container does not allow unprivileged user namespaces "
                "(or CAP_SYS_ADMIN); use namespaces=None to fall back to the audit hook"
            )
        self.namespaces = namespaces_available() if namespaces is None else namespaces
        self.audit_hook = audit_hook
        self.python = python or sys.executable
        if not Path(self.python).exists():
            raise SandboxError(f"python interpreter for the sandbox not found: {self.python}")

    # ------------------------------------------------------------------------------------------ public
    def run(self, job: Job) -> RunResult:
        """Run one job (blocking)."""
        try:
            return self._run(job)
        except OSError as e:  # e.g. out of file descriptors / disk: the harness's failure, not the program's
            return RunResult(status="sandbox_error", error=f"{type(e).__name__}: {e}")

    def map(self, jobs: Sequence[Job]) -> list[RunResult]:
        """Run many jobs, ``workers`` at a time; results in input order."""
        if len(jobs) <= 1 or self.workers == 1:
            return [self.run(j) for j in jobs]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(jobs)), thread_name_prefix="sandbox") as pool:
            return list(pool.map(self.run, jobs))

    def run_script(self, code: str) -> RunResult:
        return self.run(Job(code=code, mode="script"))

    def run_stdio(self, code: str, stdin: str) -> RunResult:
        return self.run(Job(code=code, mode="stdio", stdin=stdin))

    def run_call(self, code: str, fn_name: str, inputs: Sequence[Any]) -> RunResult:
        return self.run(Job(code=code, mode="call", fn_name=fn_name, inputs=list(inputs)))

    # ------------------------------------------------------------------------------------------ internals
    def _wall_clock(self, job: Job) -> float:
        n = max(1, len(job.inputs)) if job.mode == "call" else 1
        return self.limits.timeout_s * n + 2.0  # + interpreter start-up

    def _run(self, job: Job) -> RunResult:
        lim = self.limits
        wall = self._wall_clock(job)
        nonce = secrets.token_hex(16)
        root = Path(tempfile.mkdtemp(prefix="dultra-sandbox-"))
        work = root / "work"
        work.mkdir(mode=0o700)
        spec = {
            "mode": job.mode,
            "code": job.code,
            "fn_name": job.fn_name,
            "inputs": list(job.inputs),
            "timeout_s": lim.timeout_s,
            "work": str(work),
            "nonce": nonce,
            "namespaces": self.namespaces,
            "audit_hook": self.audit_hook,
            "limits": {
                "cpu_s": math.ceil(lim.cpu_s if lim.cpu_s is not None else wall + 1.0),
                "memory_bytes": lim.memory_mb << 20,
                "file_bytes": lim.output_bytes,
                "max_open_files": lim.max_open_files,
                "max_processes": lim.max_processes,
            },
        }
        env = dict(_BASE_ENV, HOME=str(work), TMPDIR=str(work))
        r_fd = w_fd = -1
        proc = None
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryFile(dir=root) as spec_f, tempfile.TemporaryFile(dir=root) as stdin_f, \
                    open(root / "stdout", "w+b") as out_f, open(root / "stderr", "w+b") as err_f:
                spec_f.write(json.dumps(spec).encode())
                spec_f.seek(0)
                stdin_f.write(job.stdin.encode())
                stdin_f.seek(0)
                r_fd, w_fd = os.pipe()
                # With namespaces the runner re-executes itself inside them; its first stage needs no site.
                flags = ["-I", "-S"] if self.namespaces else ["-I"]
                proc = subprocess.Popen(
                    [self.python, *flags, str(RUNNER), str(spec_f.fileno()), str(w_fd)],
                    stdin=stdin_f, stdout=out_f, stderr=err_f, pass_fds=(spec_f.fileno(), w_fd),
                    cwd=work, env=env, start_new_session=True,
                )
                os.close(w_fd)
                w_fd = -1
                raw, timed_out = _read_until_eof(r_fd, deadline=t0 + wall, cap=lim.output_bytes + 65536)
                if not timed_out:
                    try:
                        proc.wait(timeout=max(0.1, t0 + wall - time.perf_counter()))
                    except subprocess.TimeoutExpired:
                        timed_out = True
                _kill_tree(proc.pid)
                proc.wait()
                duration = time.perf_counter() - t0
                stdout, out_full = _read_capped(out_f, lim.output_bytes)
                stderr, err_full = _read_capped(err_f, lim.output_bytes)
        finally:
            for fd in (r_fd, w_fd):
                if fd >= 0:
                    os.close(fd)
            if proc is not None and proc.poll() is None:
                _kill_tree(proc.pid)
                proc.wait()
            _rmtree(root)

        result = RunResult(status="no_result", returncode=proc.returncode, stdout=stdout, stderr=stderr,
                           duration_s=duration)
        report = _parse_report(raw, nonce)
        if report is not None:
            result.isolation = report.get("isolation", {})
            result.error = report.get("error")
            result.outputs = report.get("outputs")
        if timed_out:
            result.status, result.error = "timeout", f"wall-clock limit of {wall:.1f}s exceeded"
        elif out_full or err_full or (report is not None and report.get("flush_error")):
            result.status = "output_limit"
            result.error = f"output exceeded {lim.output_bytes} bytes"
        elif report is not None:
            result.status = report["status"]
        elif proc.returncode is not None and proc.returncode != 0:
            result.status = "killed"
            result.error = _describe_exit(proc.returncode)
        else:
            result.error = "the program ended the process before the harness reported a result"
        if job.mode == "stdio" and result.status == "no_result" and proc.returncode == 0:
            result.status = "ok"  # os._exit(0) after printing: stdout is judged by the caller, nothing to forge
        return result


# ------------------------------------------------------------------------------------------------ helpers
_NS_AVAILABLE: bool | None = None


def namespaces_available() -> bool:
    """Whether this process may create a network namespace (probed once in a throwaway child)."""
    global _NS_AVAILABLE
    if _NS_AVAILABLE is None:
        probe = (
            "import ctypes,sys;l=ctypes.CDLL(None,use_errno=True);"
            "sys.exit(0 if l.unshare(0x10000000|0x40000000)==0 or l.unshare(0x40000000)==0 else 1)"
        )
        try:
            r = subprocess.run([sys.executable, "-I", "-S", "-c", probe], env=_BASE_ENV, timeout=30,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _NS_AVAILABLE = r.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _NS_AVAILABLE = False
    return _NS_AVAILABLE


def _read_until_eof(fd: int, *, deadline: float, cap: int) -> tuple[bytes, bool]:
    """Read a pipe until EOF, ``deadline`` (-> timed out) or ``cap`` bytes (rest discarded)."""
    chunks, size = [], 0
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return b"".join(chunks), True
            if not sel.select(timeout=remaining):
                continue
            data = os.read(fd, 65536)
            if not data:
                return b"".join(chunks), False
            if size < cap:
                chunks.append(data[: cap - size])
                size += len(data)
    finally:
        sel.close()


def _parse_report(raw: bytes, nonce: str) -> dict[str, Any] | None:
    """The runner's JSON report: the text after the last nonce (the program never learns the nonce)."""
    text = raw.decode("utf-8", errors="replace")
    i = text.rfind("\n" + nonce)
    if i < 0:
        return None
    try:
        report = json.loads(text[i + 1 + len(nonce):].split("\n", 1)[0])
    except json.JSONDecodeError:
        return None
    return report if isinstance(report, dict) and "status" in report else None


def _read_capped(f, cap: int) -> tuple[str, bool]:
    f.flush()
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    data = f.read(cap)
    return data.decode("utf-8", errors="replace"), size >= cap


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL the run's process group and every descendant (even ones that left the group)."""
    for p in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _rmtree(path: Path) -> None:
    def onexc(func, p, exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onexc=onexc) if sys.version_info >= (3, 12) else shutil.rmtree(path, onerror=onexc)


def _describe_exit(code: int) -> str:
    sig = code - 128 if code > 128 else -code if code < 0 else None
    if sig:
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exited with status {code}"
