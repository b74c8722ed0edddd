"""One program over two processes, for real: two local processes of 2 CPU devices each (gloo collectives,
coordinator on 127.0.0.1) train GRPO exactly as one process of 4 devices does, checkpoint, export and resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
# tiny_cpu.yaml on a 4-device fsdp mesh; 8 generated tokens (one recorded-step bucket: one train-step compile)
OVERRIDES = ["train.mesh=data=1,fsdp=4,tensor=1", "train.save_every=2", "grpo.gen_length=8", "grpo.block_length=8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=str(ROOT),
               JAX_PLATFORMS="cpu", **extra)
    return env


def _train(out: Path, steps: int, processes: int) -> list[str]:
    cmd = [sys.executable, "-m", "dultra_jax.cli", "train", "--config", str(CONFIG), "--output-dir", str(out),
           f"train.max_steps={steps}", *OVERRIDES]
    if processes == 1:
        procs = [subprocess.Popen(cmd, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    else:
        port = _free_port()
        procs = [subprocess.Popen(cmd, env=_env(4 // processes, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(processes)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, text in zip(procs, logs, strict=True):
        assert p.returncode == 0, text[-3000:]
    return logs


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_two_processes_train_like_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, 3, processes=1)
    _train(two, 2, processes=2)  # checkpoint at step 2 and model/ export, by both processes
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    for name in ("config.json", "dultra_jax.json", "params", "tokenizer.json"):
        assert (two / "model" / name).exists(), name
    logs = _train(two, 3, processes=2)  # resumed by both processes from step 2
    assert all("resumed from step 2" in text for text in logs[:1])
    a, b = _losses(one), _losses(two)
    assert sorted(b) == [1, 2, 3] and sorted(a) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-7), (step, a, b)
    assert len({round(v, 6) for v in a.values()}) > 1  # real, changing losses

    from flax import nnx

    import dultra_jax

    m1, m2 = dultra_jax.load(one / "model"), dultra_jax.load(two / "model")
    p1 = jax.tree.leaves(nnx.state(m1, nnx.Param))
    p2 = jax.tree.leaves(nnx.state(m2, nnx.Param))
    assert len(p1) == len(p2) > 0
    for x, y in zip(p1, p2, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    config = json.loads((two / "config.json").read_text())
    assert config["train"]["mesh"] == "data=1,fsdp=4,tensor=1"
