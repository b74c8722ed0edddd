"""benchmarks/memory_plan.py: AOT memory of the trainer's own train step and rollout, from a run config."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dultra_jax.training.config import load_run_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import memory_plan as mp  # noqa: E402

USE_COMPILATION_CACHE = False  # compile-only programs at 8B widths, each built once (tests/conftest.py)

TINY = REPO / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def tiny_plan(cpu8, tmp_path_factory):
    """The plan of configs/tiny_cpu.yaml on 8 devices, from the command line (one compile of each program)."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "memory_plan.py"), "--config", str(TINY), "--json",
           "--set", "train.mesh=data=1,fsdp=8,tensor=1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc == json.loads(out.read_text())
    run = load_run_config(TINY, ["train.mesh=data=1,fsdp=8,tensor=1"])
    return {"setup": mp.make_setup(run, cpu8), "doc": doc, "train_step": doc["programs"]["train_step"],
            "rollout": doc["programs"]["rollout"], "rollout_variants": doc["rollout_variants"]}


def per_device_elements(setup, *, fsdp: int) -> int:
    """Elements one device holds of the model's parameters: an `embed` axis divisible by fsdp is split."""
    from flax import nnx

    from dultra_jax.parallel import param_logical_axes

    abstract, _ = mp._abstract_model(setup)
    state = nnx.state(abstract)
    shapes = {tuple(p): v.shape for p, v in nnx.to_flat_state(state)}
    total = 0
    for path, names in param_logical_axes(state).items():
        size = math.prod(shapes[path])
        split = any(n == "embed" and d % fsdp == 0 for n, d in zip(names, shapes[path], strict=True))
        total += size // fsdp if split else size
    return total


def test_train_step_is_the_trainers_step_with_exact_arguments(tiny_plan):
    setup, r = tiny_plan["setup"], tiny_plan["train_step"]
    run = setup.run
    n, rows = run.train.micro_batches, run.train.batch_size * run.grpo.num_generations
    s, length, p = run.grpo.gen_length, setup.prompt_len + run.grpo.gen_length, setup.prompt_len
    assert r["recorded_steps"] == s and r["micro_batches"] == n and r["micro_batch_rows"] == rows // n
    shard = rows // n // 8
    assert r["rows_per_device"] == shard
    # prompt ids + attention mask (int32), reveal (bool), proposals (int32), old log-probs (fp32), advantages
    batch = n * shard * (4 * p + 4 * length + s * length * (1 + 4 + 4) + 4)
    params = 4 * per_device_elements(setup, fsdp=8)  # fp32 master weights
    adam = 2 * params + 8  # mu, nu (fp32) + two replicated int32 step counters (Adam's, the schedule's)
    assert r["argument_bytes"] == params + adam + batch  # (the GRPO loss ignores the rng: XLA drops it)
    assert r["training_state_bytes"] == params + adam
    assert r["alias_bytes"] >= params + adam - 4  # parameters and moments donated, updated in place
    assert r["per_device_bytes"] == r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
    assert r["temp_bytes"] > 0


def test_rollout_variants(tiny_plan):
    setup = tiny_plan["setup"]
    sharded, rep = tiny_plan["rollout_variants"]["sharded"], tiny_plan["rollout_variants"]["replicated_bf16"]
    assert tiny_plan["rollout"] == sharded
    rows = setup.rows
    length = setup.prompt_len + setup.run.grpo.gen_length
    ids = (rows // 8) * (setup.prompt_len * 4 + length * 4 + 4)  # prompt ids, padding mask, row seeds
    n_params = per_device_elements(setup, fsdp=1)
    assert sharded["weight_bytes"] == 4 * per_device_elements(setup, fsdp=8)  # the fp32 training weights
    assert rep["weight_bytes"] == 2 * n_params  # a whole bf16 copy on every device
    for r in (sharded, rep):
        assert r["argument_bytes"] == r["weight_bytes"] + ids + 8
        assert r["recorded_steps"] == setup.run.grpo.gen_length and r["rows_per_device"] == rows // 8
    state = tiny_plan["train_step"]["training_state_bytes"]
    assert sharded["per_device_bytes_with_training_state"] == sharded["per_device_bytes"] + state - sharded[
        "weight_bytes"]
    assert rep["per_device_bytes_with_training_state"] == rep["per_device_bytes"] + state


def test_command_line_json(tiny_plan):
    doc = tiny_plan["doc"]
    assert doc["config"] == str(TINY) and doc["mesh"] == "data=1,fsdp=8,tensor=1" and doc["devices"] == 8
    assert doc["param_count"] > 0 and doc["budget_bytes"] == mp.BUDGETS["h200"] and doc["mode"] == "grpo"
    for name in ("train_step", "rollout"):
        r = doc["programs"][name]
        for key in ("per_device_bytes", "argument_bytes", "temp_bytes", "output_bytes", "alias_bytes",
                    "rows_per_device", "recorded_steps", "compile_s"):
            assert key in r, (name, key)
    assert set(doc["rollout_variants"]) == {"sharded", "replicated_bf16"} and all(doc["fits"].values())
    assert doc["layers"]["compiled"] == [2] and doc["machine"]["commit"]


def test_rows_must_divide_over_the_batch_axes(cpu8):
    run = load_run_config(TINY, ["train.mesh=data=1,fsdp=8,tensor=1", "train.micro_batches=4"])
    setup = mp.make_setup(run, cpu8)
    with pytest.raises(ValueError, match="4 rows cannot be split 8 ways"):
        mp.train_step_program(setup)


def test_largest_search_and_extrapolation():
    def bytes_at(b):  # 10 + 3 bytes per row
        return 10 + 3 * b

    assert mp.largest(bytes_at, 8, 900) == (296, 304)
    assert mp.largest(bytes_at, 8, 10) == (None, 8)
    assert mp.largest(bytes_at, 8, 1800, start=296) == (592, 600)
    one = {"train_step": {"per_device_bytes": 10, "temp_bytes": 4, "compile_s": 1.0, "recorded_steps": 5},
           "rollout": None, "rollout_variants": {}}
    two = {"train_step": {"per_device_bytes": 16, "temp_bytes": 5, "compile_s": 2.0, "recorded_steps": 5},
           "rollout": None, "rollout_variants": {}}
    r = mp.extrapolate({2: two, 1: one}, 32)["train_step"]
    assert (r["per_device_bytes"], r["temp_bytes"], r["recorded_steps"]) == (10 + 31 * 6, 4 + 31, 5)
