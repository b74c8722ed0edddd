"""benchmarks/memory_plan.py (AOT memory of the decode / train programs) and benchmarks/gpu_memory_check.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dultra_jax.model import DUltra
from dultra_jax.parallel import DEFAULT_RULES, param_logical_axes

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import memory_plan as mp  # noqa: E402

MESH = {"data": 1, "fsdp": 8, "tensor": 1}
B, P, G = 16, 32, 32


@pytest.fixture(scope="module")
def cpu8():
    devices = jax.devices("cpu")
    if len(devices) < 8:
        pytest.skip("needs 8 CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts")
    return devices[:8]


def per_device_param_elements() -> int:
    """Elements one device holds of the small model's parameters, from the logical names and the rules alone."""
    state = nnx.state(nnx.eval_shape(lambda: DUltra(mp.MODELS["small"]())))
    shapes = {tuple(p): v.shape for p, v in nnx.to_flat_state(state)}
    rules = dict(DEFAULT_RULES)
    total = 0
    for path, names in param_logical_axes(state).items():
        divisor = 1
        for name in names:
            target = rules[name]
            for mesh_axis in [target] if isinstance(target, str) else (target or ()):
                divisor *= MESH[mesh_axis]
        size = math.prod(shapes[path])
        assert size % divisor == 0, path  # the small config divides everywhere, so the count is exact
        total += size // divisor
    return total


def test_train_plan_argument_bytes_are_exact(cpu8):
    r = mp.plan_memory("small", "data=1,fsdp=8,tensor=1", "train", B, P, G, devices=cpu8)
    shard = B // 8
    batch_bytes = 2 * shard * (P + G) * 4 + shard * (P + G) + 3 * shard * 4  # canvas, tokens, reveal; 3 vectors
    adam_count = 4  # int32 step counter, replicated
    want = 3 * 4 * per_device_param_elements() + adam_count + batch_bytes  # fp32 params, mu, nu
    assert r["argument_bytes"] == want == r["expected_argument_bytes"]
    assert r["param_bytes_per_device"] == 4 * per_device_param_elements()
    assert r["alias_bytes"] >= r["param_bytes_per_device"] + r["optimizer_bytes_per_device"] - adam_count
    assert r["per_device_bytes"] == r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
    assert r["temp_bytes"] > 0 and r["fits_h200"] and r["fits_h100"]
    assert r["param_count"] == sum(math.prod(v.shape) for v in jax.tree.leaves(
        nnx.state(nnx.eval_shape(lambda: DUltra(mp.MODELS["small"]())))))


def test_decode_plan_via_the_command_line(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "memory_plan.py"), "--model", "small", "--mesh",
           "data=1,fsdp=8,tensor=1", "--step", "decode", "--batch", str(B), "--prompt-len", str(P), "--gen-len",
           str(G), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "per_device_bytes", "param_count", "fits_h200",
                "fits_h100"):
        assert key in r
    shard, steps = B // 8, G
    state = shard * (P + G) * 4 + shard * 4 + 2 * steps * shard * (P + G) * 4 + 4 + 2 * 4  # canvas .. key
    assert r["argument_bytes"] == 2 * per_device_param_elements() + state  # bf16 weights
    assert r["alias_bytes"] == state  # the decode state is donated and updated in place
    assert r["devices"] == 8 and r["mesh"] == "data=1,fsdp=8,tensor=1"


def test_batch_must_divide_over_the_batch_axes(cpu8):
    with pytest.raises(ValueError, match="batch 12 must be a positive multiple of 8"):
        mp.plan_memory("small", "data=2,fsdp=4,tensor=1", "decode", 12, P, G, devices=cpu8)


def test_largest_batch_search():
    def evaluate(b):  # 10 + 3 bytes per row
        return {"batch": b, "per_device_bytes": 10 + 3 * b}

    best, over = mp.largest_batch(evaluate, quantum=8, budget=1000, margin=0.1)  # limit 900 -> b <= 296
    assert (best["batch"], over["batch"]) == (296, 304)
    best, over = mp.largest_batch(evaluate, quantum=8, budget=10, margin=0.1)
    assert best is None and over["batch"] == 8
    best, over = mp.largest_batch(evaluate, quantum=8, budget=2000, margin=0.1, start=296)
    assert (best["batch"], over["batch"]) == (592, 600)


def test_gpu_memory_check_runs_with_only_jax_flax_optax_numpy(tmp_path):
    """The GPU image has no pip-installed dultra_jax; block its I/O dependencies to prove the script needs none."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    names = ('safetensors', 'tqdm', 'orbax', 'transformers', 'datasets', 'grain', 'math_verify')\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.names:\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_memory_check.py"), "--out", str(tmp_path / "out"),
           "--model", "small"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "gpu_memory_check.json").read_text())
    results = {r["case"]: r for r in doc["results"]}
    assert set(results) == {"train", "decode"}
    for r in results.values():
        assert r["package_import"].startswith("bare")
        assert r["plan_cpu"]["per_device_bytes"] > 0 and r["xla_estimate_this_device"]["per_device_bytes"] > 0
        assert "peak_bytes_in_use" in r["measured"]
    assert all(math.isfinite(x) for x in results["train"]["check"])
    assert results["decode"]["check"] == [1, 2]


def test_abstract_8b_plan_allocates_nothing(cpu8):
    """The 8B abstract state is pure ShapeDtypeStructs with shardings; nothing of its 33 GB exists."""
    plan = mp.ShardingPlan(mp.make_mesh("fsdp=8", devices=cpu8))
    _, state = plan.abstract_model(mp.MODELS["llada-8b"](), dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                   on_uneven="raise")
    leaves = jax.tree.leaves(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None for x in leaves)
    n = sum(math.prod(x.shape) for x in leaves)
    assert n == 8_318_664_705  # backbone 8,015,581,184 + planner 303,083,521 (REFERENCE_MODEL.md §2)
    replicated = mp.shard_bytes(state) - 4 * n / 8  # norms, biases, the planner's 256 x D time_in (fsdp-free)
    assert 0 < replicated < 8e6
