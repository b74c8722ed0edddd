"""The shipped configs: every YAML is a valid RunConfig, and the 8xH200 ones set their mesh and fit there.

The fit is checked with the memory plan's real programs (benchmarks/memory_plan.py: the trainer's train step
and the rollout loop, AOT-compiled on 8 fake CPU devices) at the 8B widths with two and three layers, every byte
count extrapolated linearly per layer to the model's 32 (memory_plan.py --extrapolate 2,3), so it runs in about two
minutes instead of compiling 32 layers; the full-depth numbers are in benchmarks/results/memory_plan_*.json.
"""

import sys
from pathlib import Path

import pytest

from dultra_jax.config import ConfigError
from dultra_jax.parallel import MeshConfig
from dultra_jax.training.config import RunConfig, load_run_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
sys.path.insert(0, str(REPO / "benchmarks"))
import memory_plan as mp  # noqa: E402

USE_COMPILATION_CACHE = False  # compile-only programs at 8B widths, each built once (tests/conftest.py)

NOT_RUN_CONFIGS = {"rewards.yaml"}  # the reward table (dultra_jax.rewards), not a run
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in NOT_RUN_CONFIGS)


def targets_8xh200(path: Path) -> bool:
    """The configs written for one 8xH200 node say so in their header comment."""
    header = [ln for ln in path.read_text().splitlines() if ln.startswith("#")]
    return any("8xH200" in ln for ln in header)


H200_CONFIGS = [p for p in RUN_CONFIGS if targets_8xh200(p)]


def test_the_config_directory_is_covered():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {p.name for p in RUN_CONFIGS} | NOT_RUN_CONFIGS
    assert len(H200_CONFIGS) >= 4


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_rejects_unknown_keys(path):
    assert isinstance(load_run_config(path), RunConfig)
    with pytest.raises(ConfigError, match="unknown key"):
        load_run_config(path, ["train.no_such_key=1"])


@pytest.mark.parametrize("path", H200_CONFIGS, ids=lambda p: p.name)
def test_8xh200_configs_set_an_8_device_mesh(path):
    run = load_run_config(path)
    assert run.train.mesh, f"{path.name} targets 8xH200 but sets no train.mesh"
    sizes = MeshConfig.parse(run.train.mesh).resolve(8)
    assert sizes["data"] * sizes["fsdp"] * sizes["tensor"] == 8


def _program_key(run):
    """Configs whose programs have the same shapes compile once (GSM8K and APPS differ only in data)."""
    g, t, m = run.grpo, run.train, run.model
    shape = (g.gen_length, g.block_length, g.num_generations, g.beta > 0) if t.mode == "grpo" else (
        run.sequence.gen_length,)
    return (t.mode, t.batch_size, t.micro_batches, t.trainable, t.mesh, run.task.max_prompt_length, m.dtype,
            m.param_dtype, m.remat, shape)


def test_8xh200_configs_fit_with_the_margin(cpu8):
    devices = cpu8
    planned: dict = {}
    for path in H200_CONFIGS:
        run = load_run_config(path)
        key = _program_key(run)
        if key not in planned:
            planned[key] = mp.run_plan(run, devices[:8], extrapolate_from=(2, 3), weights=("sharded",))
        res = planned[key]
        assert res["layers"]["compiled"] == [2, 3] and res["layers"]["reported"] == 32
        at = {int(n): v for n, v in res["layers"]["at"].items()}
        limit = (1 - mp.DEFAULT_MARGIN) * mp.BUDGETS["h200"]
        checks = [("train_step", "per_device_bytes")]
        if run.train.mode == "grpo":
            checks.append(("rollout", "per_device_bytes_with_training_state"))
            assert res["train_step"]["recorded_steps"] == res["rollout"]["recorded_steps"] == run.grpo.gen_length
        for prog, k in checks:
            two, three, full = at[2][prog][k], at[3][prog][k], res[prog][k]
            assert full == two + 30 * (three - two), (path.name, prog, two, three, full)
            # a layer adds weights, gradients and optimiser state to the train step; the rollout's temporaries are
            # XLA's scheduling (measured for grpo_gsm8k_b128: 10.69 GB at 1 layer, 10.47 GB at 2; a 1-layer scan
            # is laid out differently: planner_pretrain's train step was 8.27 GB at 1 layer, 7.50 GB at 2)
            assert prog != "train_step" or three > two, (path.name, "a layer must add bytes", two, three)
            assert full <= limit, (path.name, prog, f"{full / 1e9:.1f} GB at 32 layers > {limit / 1e9:.1f} GB")
