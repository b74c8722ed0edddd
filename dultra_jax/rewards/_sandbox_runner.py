"""The trusted half of the code sandbox: runs *inside* the sandboxed interpreter, before and around untrusted code.

Started by :mod:`dultra_jax.rewards.sandbox` as ``python -I _sandbox_runner.py SPEC_FD RESULT_FD`` in a new
session. Standard library only (it must not import the package). In order, it:

1. reads the job spec from an anonymous file (no path the program could read back later);
2. isolates itself where the kernel allows: user + mount + network + PID + IPC namespaces, then forks so the
   program runs as PID 1 of its own PID namespace (all its descendants die with it); inside, every mount is
   remounted read-only except the private work directory, and a fresh ``/proc`` shows only the sandbox;
3. sets resource limits (CPU, address space, file size, open files, processes) and a ``PR_SET_PDEATHSIG`` so
   the program dies with its supervisor;
4. installs a PEP 578 audit hook (cannot be removed from Python) that refuses process creation, signals to
   other processes, sockets, ``ctypes``, writes outside the work directory, reads of other processes'
   ``/proc`` entries, and the introspection calls that reach other threads' frames;
5. runs the program in a worker thread (so its frames cannot reach this thread's, and per-test timeouts need
   no signals) and reports the outcome on the result fd, prefixed by a nonce the program never sees.

Residual risk (as in human-eval and the original's harness): assert-style tests run in the program's own
interpreter, so a program written to subvert them (e.g. objects whose ``__eq__`` is always true) can pass.
Call-based and stdin/stdout tests are compared by the host, outside the sandbox.
"""

import builtins
import contextlib
import json
import os
import resource
import sys
import threading

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
SIGKILL = 9

_BLOCKED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
    "os.startfile", "pty.spawn",
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
    # Belt and braces: ctypes cannot even be imported (_BLOCKED_MODULES).
    "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata", "ctypes.cdata/buffer",
    "ctypes.string_at", "ctypes.wstring_at", "ctypes.PyObj_FromPtr",
    "os.symlink", "os.link", "os.chown", "os.lchown", "os.fchown", "os.setxattr", "os.removexattr",
    "resource.setrlimit", "resource.prlimit",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
    "mmap.__new__", "winreg.OpenKey", "webbrowser.open", "ftplib.connect", "smtplib.connect", "telnetlib.Telnet.open",
    "urllib.Request", "http.client.connect", "imaplib.open", "poplib.connect", "nntplib.connect",
})
# Events that modify paths: event -> (indices of the modified paths, indices of dir_fd arguments).
_PATH_WRITE_EVENTS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)), "os.chmod": ((0,), (2,)),
    "os.chflags": ((0,), ()), "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)), "os.rename": ((0, 1), (2, 3)),
    "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)), "shutil.rmtree": ((0,), (1,)), "shutil.move": ((0, 1), ()),
    "shutil.copyfile": ((1,), ()), "shutil.copytree": ((1,), ()),
}
# Raw foreign calls and process spawning bypass every check above, so these cannot even be imported.
_BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _within(path, root):
    try:
        real = os.path.realpath(path if isinstance(path, str) else os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == root or real.startswith(root + os.sep)


def _is_foreign_proc(path):
    """True for /proc/<pid>/... of a process other than this one."""
    try:
        p = os.path.normpath(os.path.abspath(path if isinstance(path, str) else os.fsdecode(path)))
    except (TypeError, ValueError):
        return False
    parts = p.split(os.sep)
    return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != os.getpid()


def _make_hook(work):
    own_pid = os.getpid()

    def hook(event, args):
        if event in _BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not permitted")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            if isinstance(path, int):
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            inside = _within(path, work)
            if writing and not inside:
                raise PermissionError(f"sandbox: writing {path!r} outside the work directory is not permitted")
            if not inside and (_is_foreign_proc(path) or os.path.isdir(path)):
                # Directory fds outside would let *at() calls (dir_fd=) write where paths are not checked.
                raise PermissionError(f"sandbox: opening {path!r} is not permitted")
        elif event in _PATH_WRITE_EVENTS:
            paths, dir_fds = _PATH_WRITE_EVENTS[event]
            if any(i < len(args) and isinstance(args[i], int) and args[i] >= 0 for i in dir_fds):
                raise PermissionError(f"sandbox: {event} relative to a directory fd is not permitted")
            for i in paths:
                p = args[i] if i < len(args) else None
                if p is None or isinstance(p, int):
                    continue
                if not _within(p, work):
                    raise PermissionError(f"sandbox: {event} on {p!r} outside the work directory is not permitted")
        elif event in ("os.kill", "os.killpg"):
            target = args[0]
            if event == "os.killpg" or target != own_pid:
                raise PermissionError(f"sandbox: {event}({target}) is not permitted")
        elif event in ("os.listdir", "os.scandir") and args and _is_foreign_proc(args[0]):
            raise PermissionError(f"sandbox: listing {args[0]!r} is not permitted")
        elif event == "import" and args and isinstance(args[0], str) and (
                args[0].split(".")[0] in _BLOCKED_MODULES):
            # ImportError, not PermissionError: libraries such as numpy treat a missing ctypes as optional.
            raise ImportError(f"sandbox: module {args[0]!r} is not available")
        elif event in ("import", "ctypes.dlopen"):
            # Native code written into the work directory would run beyond this hook's reach.
            path = args[1] if event == "import" and len(args) > 1 else args[0] if event == "ctypes.dlopen" else None
            if isinstance(path, (str, bytes)) and os.sep in os.fsdecode(path) and _within(path, work):
                raise PermissionError(f"sandbox: loading native code from {path!r} is not permitted")

    return hook


# ----------------------------------------------------------------------------------------- isolation
def _unshare_and_fork(report, spec_fd):
    """Enter fresh namespaces; fork so the program is PID 1 of its PID namespace. Returns in the child only."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    entered = 0
    for flags in (
        CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC,
        CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC,  # root without user namespaces
        CLONE_NEWUSER | CLONE_NEWNET,
        CLONE_NEWNET,
    ):
        if libc.unshare(flags) == 0:
            entered = flags
            break
    names = [n for n, f in (("user", CLONE_NEWUSER), ("mount", CLONE_NEWNS), ("net", CLONE_NEWNET),
                            ("pid", CLONE_NEWPID), ("ipc", CLONE_NEWIPC)) if entered & f]
    report["namespaces"] = names
    if entered & CLONE_NEWPID:
        pid = os.fork()
        if pid:
            # Supervisor (outside the new PID namespace): wait, then mirror the child's exit. It keeps no
            # copy of the spec (which holds the nonce).
            os.close(spec_fd)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)
        libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    return libc, entered


def _isolate_mounts(libc, work, report):
    """Read-only everything but ``work``; fresh /proc. Mount-namespace private, so the host is unaffected."""
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        report["mounts"] = "failed: make-private"
        return
    w = work.encode()
    if libc.mount(w, w, None, MS_BIND | MS_REC, None) != 0:
        report["mounts"] = "failed: bind work"
        return
    # The work directory stays writable but nothing written there can be executed or mapped executable.
    st = os.statvfs(work)
    keep = MS_NODEV if st.f_flag & os.ST_NODEV else 0
    noexec = libc.mount(None, w, None, MS_BIND | MS_REMOUNT | MS_NOEXEC | MS_NOSUID | keep, None) == 0
    failed = 0
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    for mp in points:
        if mp == work:
            continue
        try:
            st = os.statvfs(mp)
        except OSError:
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for bit, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC)):
            if st.f_flag & bit:
                flags |= ms
        if libc.mount(None, mp.encode(), None, flags, None) != 0:
            failed += 1
    proc_ok = libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0
    report["mounts"] = (f"read-only except work{' (noexec)' if noexec else ''} "
                        f"({failed} of {len(points)} mounts not remounted)")
    report["proc"] = "private" if proc_ok else "host"


def _set_limits(limits, in_userns):
    def lim(which, value):
        if value is None:
            return
        value = int(value)
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            soft, hard = resource.getrlimit(which)
            if hard == resource.RLIM_INFINITY or value <= hard:
                resource.setrlimit(which, (value, hard))

    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_CPU, limits["cpu_s"])
    lim(resource.RLIMIT_AS, limits["memory_bytes"])
    lim(resource.RLIMIT_FSIZE, limits["file_bytes"])
    lim(resource.RLIMIT_NOFILE, limits["max_open_files"])
    if in_userns:  # counted per user namespace there; elsewhere it would count all of the user's processes
        lim(resource.RLIMIT_NPROC, limits["max_processes"])


# ----------------------------------------------------------------------------------------- running
def _normalize(value, seen=None):
    """The original's output normalisation: tuples and arrays -> lists, recursively."""
    seen = set() if seen is None else seen
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        if id(value) in seen:
            return "<recursion>"
        seen.add(id(value))
        out = [_normalize(v, seen) for v in value]
        seen.discard(id(value))
        return out
    if isinstance(value, dict):
        if id(value) in seen:
            return "<recursion>"
        seen.add(id(value))
        out = {k: _normalize(v, seen) for k, v in value.items()}
        seen.discard(id(value))
        return out
    return value


def _exactly_json(value, depth=0):
    """True if JSON round-trips ``value`` to something ``==``-identical (str keys, plain types only)."""
    if depth > 100:
        return False
    if value is None or type(value) in (bool, int, str):
        return True
    if type(value) is float:
        return value == value and value not in (float("inf"), float("-inf"))
    if type(value) is list:
        return all(_exactly_json(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _exactly_json(v, depth + 1) for k, v in value.items())
    return False


def _call_args(test_input):
    """Positional/keyword arguments exactly as the original's APPS worker builds them."""
    if isinstance(test_input, dict) and ("args" in test_input or "kwargs" in test_input):
        raw = test_input.get("args", [])
        args = tuple(raw) if isinstance(raw, (list, tuple)) else () if raw is None else (raw,)
        kwargs = test_input.get("kwargs", {})
        return args, kwargs if isinstance(kwargs, dict) else {}
    if isinstance(test_input, (list, tuple)):
        return tuple(test_input), {}
    if test_input is None:
        return (), {}
    return (test_input,), {}


class _Outcome:
    __slots__ = ("kind", "value", "error")

    def __init__(self):
        self.kind, self.value, self.error = "timeout", None, None


def _in_thread(fn, timeout, stack_bytes):
    """Run ``fn`` in a fresh thread; ``_Outcome`` with kind ok/error/exit/timeout."""
    out = _Outcome()

    def target():
        try:
            out.value = fn()
            out.kind = "ok"
        except SystemExit as e:
            out.kind, out.value = "exit", e.code if isinstance(e.code, (int, type(None))) else str(e.code)
        except BaseException as e:  # noqa: BLE001 - everything the program raises is its failure
            try:
                out.kind, out.error = "error", repr(e)[:2000]
            except BaseException:  # noqa: BLE001 - a repr that raises
                out.kind, out.error = "error", type(e).__name__

    with contextlib.suppress(ValueError, RuntimeError):
        threading.stack_size(stack_bytes)
    t = threading.Thread(target=target, name="program", daemon=True)
    t.start()
    t.join(timeout)
    return out


def _run(spec):
    mode = spec["mode"]
    code = spec["code"]
    timeout = spec["timeout_s"]
    stack = spec.get("thread_stack_bytes", 256 << 20)
    sys.setrecursionlimit(spec.get("recursion_limit", 5000))
    sys.argv = ["main.py"]
    try:
        compiled = compile(code, "main.py", "exec")
    except BaseException as e:  # noqa: BLE001 - a syntax error is the program's failure
        return {"status": "error", "error": repr(e)[:2000]}

    if mode in ("script", "stdio"):
        g = {"__name__": "__main__", "__builtins__": builtins}
        out = _in_thread(lambda: exec(compiled, g), timeout, stack)
        if out.kind == "exit" and mode == "stdio" and out.value in (0, None):
            out.kind = "ok"
        result = {"status": out.kind, "error": out.error}
        if out.kind == "exit":
            result["error"] = f"SystemExit({out.value!r}) before the tests completed"
        return result

    if mode == "call":
        fn_name = spec["fn_name"]
        outputs = []
        for test_input in spec["inputs"]:
            def one(test_input=test_input):
                env = {"__name__": "candidate", "__builtins__": builtins}
                exec(compiled, env)
                fn = env.get(fn_name)
                if fn is None or not callable(fn):
                    raise ValueError(f"Function {fn_name!r} not defined or not callable.")
                args, kwargs = _call_args(test_input)
                value = _normalize(fn(*args, **kwargs))
                return value if _exactly_json(value) else {"__unserialisable__": repr(value)[:500]}

            out = _in_thread(one, timeout, stack)
            if out.kind == "ok":
                outputs.append({"ok": True, "value": out.value})
                continue
            if out.kind == "timeout":
                err = "Timed out while running candidate solution."
            elif out.kind == "exit":
                err = f"SystemExit({out.value!r})"
            else:
                err = out.error
            outputs.append({"ok": False, "error": err, "timeout": out.kind == "timeout"})
            break
        return {"status": "ok", "outputs": outputs}
    raise ValueError(f"unknown sandbox mode {mode!r}")


def _read_spec(fd):
    """The spec from its anonymous file; rewound so the re-executed stage can read it again."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        chunks.append(b)
    return json.loads(b"".join(chunks))


def main():
    spec_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    stage2 = len(sys.argv) > 3
    spec = _read_spec(spec_fd)
    work = os.path.realpath(spec["work"])
    if stage2:
        report = json.loads(sys.argv[3])
    else:
        report = {"namespaces": [], "mounts": "none", "proc": "host", "audit_hook": bool(spec["audit_hook"])}
        if spec["namespaces"]:
            libc, entered = _unshare_and_fork(report, spec_fd)
            if entered & CLONE_NEWNS:
                _isolate_mounts(libc, work, report)
            # Re-exec a clean interpreter inside the namespaces: ctypes, loaded here, must not stay cached.
            os.execv(sys.executable, [sys.executable, "-I", os.path.abspath(__file__), str(spec_fd),
                                      str(result_fd), json.dumps(report)])
    os.close(spec_fd)
    nonce = spec.pop("nonce")
    os.chdir(work)
    _set_limits(spec["limits"], "user" in report["namespaces"])
    if spec["audit_hook"]:
        sys.addaudithook(_make_hook(work))
    try:
        result = _run(spec)
    except BaseException as e:  # noqa: BLE001 - report harness failures too
        result = {"status": "error", "error": f"harness: {e!r}"[:2000]}
    result["isolation"] = report
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - output limit hit while flushing
        result.setdefault("flush_error", True)
    try:
        payload = json.dumps(result)
    except (TypeError, ValueError):
        payload = json.dumps({"status": "error", "error": "harness: unserialisable result", "isolation": report})
    data = ("\n" + nonce + payload + "\n").encode()
    while data:
        data = data[os.write(result_fd, data):]
    os._exit(0)


if __name__ == "__main__":
    main()
