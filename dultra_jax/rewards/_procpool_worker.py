"""Worker process of :class:`dultra_jax.rewards.procpool.WorkerPool` (standard library + the loaded module only).

``python -I _procpool_worker.py MODULE_FILE``: loads MODULE_FILE as a standalone module (so the worker never
imports the package, JAX included), then answers one JSON request per stdin line, ``{"id", "fn", "kwargs"}``,
with one JSON line ``{"id", "ok", "result" | "error"}``. Functions run on this process's main thread, where
libraries that time themselves out with SIGALRM (math-verify) work. Stray prints go to stderr, so they cannot
corrupt the protocol.
"""

import importlib.util
import json
import os
import sys


def main():
    path = sys.argv[1]
    spec = importlib.util.spec_from_file_location("_procpool_target", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            fn = getattr(module, req["fn"])
            reply = {"id": req["id"], "ok": True, "result": fn(**req["kwargs"])}
        except Exception as e:  # noqa: BLE001 - reported to the host, which decides
            reply = {"id": req["id"], "ok": False, "error": f"{type(e).__name__}: {e}"[:1000]}
        try:
            text = json.dumps(reply)
        except (TypeError, ValueError) as e:
            text = json.dumps({"id": req["id"], "ok": False, "error": f"unserialisable result: {e}"})
        proto.write(text + "\n")


if __name__ == "__main__":
    main()
