"""Does a run fit? Per-device memory of the trainer's own programs, compiled ahead of time on fake devices.

    python benchmarks/memory_plan.py --config configs/grpo_gsm8k_b32.yaml --json
    python benchmarks/memory_plan.py --config configs/grpo_gsm8k_b32.yaml --search --json   # largest that fit

From a run config (``training.config.RunConfig``) this builds, with no weights allocated anywhere:
- ``train_step``: the trainer's jitted step, :func:`dultra_jax.training.step.make_train_step` over
  the loss of the trainer's mode table (``training.trainer.MODES``; GRPO: the replayed trajectory loss), AdamW as
  :func:`~dultra_jax.training.step.make_optimizer` builds it from ``optim``, fp32 (``model.param_dtype``)
  master weights split into trainable / frozen as ``train.trainable`` says, parameters and optimiser state
  donated, micro-batches stacked as the trainer stacks them (``train.micro_batches``), and the recorded
  iterations S = the rollout's iteration cap (G for the planner: the worst case; the trainer trims S to
  buckets on the host, :func:`~dultra_jax.training.grpo.bucket_for`).
- ``rollout``: the decoding loop :func:`dultra_jax.decoding.generate` runs on the plan with
  ``return_trajectory=True`` (``decoding.loop.mesh_decoder``, the program ``generate(plan=...)`` runs), over
  the rows the trainer feeds it (``train.batch_size`` prompts x ``grpo.num_generations``, left-padded to
  ``task.max_prompt_length``, with the padding mask). Two weight placements: ``sharded`` (the training
  weights as they are) and ``replicated_bf16`` (a bf16 copy replicated over ``fsdp``: no all-gather per
  iteration), each also counted beside the training state that stays resident while the rollout runs.

Each program is lowered with abstract inputs (``jax.ShapeDtypeStruct`` with their shardings) and compiled for
N fake CPU devices; XLA's ``memory_analysis()`` gives per-device argument, output, alias and temporary bytes.
Per-device bytes = arguments + outputs - aliased (donated) + temporaries. Arguments and outputs are exact; the
temporaries come from XLA:CPU's buffer assignment (benchmarks/gpu_memory_check.py measures the same programs'
peak on a GPU). "Fits" means within the budget minus the margin (default 10%).

``--layers N`` compiles with N layers; ``--extrapolate N1,N2`` compiles at two layer counts and extrapolates
every byte count linearly to the config's layer count (the JSON says so and gives both measurements).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
GB = 1e9
GIB = 1024**3
BUDGETS = {"h200": 141 * GB, "h100": 80 * GB}  # HBM per GPU as sold (141 GB, 80 GB)
DEFAULT_MARGIN = 0.10
ROLLOUT_WEIGHTS = ("sharded", "replicated_bf16")


def _jax():
    import jax

    return jax


# ------------------------------------------------------------------------------------------- the setup
@dataclass
class Setup:
    """What the trainer would build from the run config, as abstract shapes on a mesh."""

    run: Any  # RunConfig
    model_cfg: Any  # ModelConfig
    model_source: str
    plan: Any  # ShardingPlan

    @property
    def grpo(self) -> bool:
        return self.run.train.mode == "grpo"

    @property
    def rows(self) -> int:
        """Rows per step: rollout rows (prompts x generations) for GRPO, sequences otherwise."""
        return self.run.train.batch_size * (self.run.grpo.num_generations if self.grpo else 1)

    @property
    def gen_len(self) -> int:
        return self.run.grpo.gen_length if self.grpo else self.run.sequence.gen_length

    @property
    def prompt_len(self) -> int:
        """The longest prompt the pipeline passes (``task.max_prompt_length``), within the model's context."""
        return min(self.run.task.max_prompt_length, self.model_cfg.max_sequence_length - self.gen_len)

    @property
    def recorded_steps(self) -> int:
        """The rollout's iteration cap: how many iterations it records (and the replay scans at most)."""
        return self.decode_config().iteration_cap

    def decode_config(self):
        from dultra_jax.decoding.loop import DecodeConfig

        g = self.run.grpo
        return DecodeConfig(gen_length=g.gen_length, block_length=g.block_length, strategy="planner",
                            temperature=float(g.temperature), return_trajectory=True)


def model_config(run, *, preset_name: str = "llada-8b", layers: int | None = None):
    """(ModelConfig, where it came from): ``model.path``'s config.json when it exists; otherwise the preset
    (with ``model.overrides``; for a missing ``model.path``, ``preset_name``: the shipped configs point at
    8B checkpoints that exist only on the training node)."""
    from dultra_jax.config import ModelConfig, preset
    from dultra_jax.tasks import get_task

    m = run.model
    overrides = dict(m.overrides)
    if m.path and (Path(m.path) / "config.json").is_file():
        cfg, source = ModelConfig.from_json_file(Path(m.path) / "config.json"), f"{m.path}/config.json"
    elif m.path:
        cfg, source = preset(preset_name, **overrides), f"preset {preset_name} ({m.path} not found here)"
    else:
        overrides = {**get_task(run.task.name).model_overrides, **overrides}
        cfg, source = preset(m.preset, **overrides), f"preset {m.preset}"
    if layers is not None and layers != cfg.n_layers:
        cfg = dataclasses.replace(cfg, n_layers=layers)
        source += f", {layers} of its layers"
    return cfg, source


def make_setup(run, devices, *, mesh: str | None = None, preset_name: str = "llada-8b",
               layers: int | None = None) -> Setup:
    from dultra_jax.parallel import ShardingPlan, make_mesh

    spec = mesh or run.train.mesh
    if spec is None:
        spec = f"data=1,fsdp={len(devices)},tensor=1"
    cfg, source = model_config(run, preset_name=preset_name, layers=layers)
    return Setup(run, cfg, source, ShardingPlan(make_mesh(spec, devices=devices)))


def _sds(shape, dtype, sharding):
    return _jax().ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _attach(plan, state, *, dtype=None):
    """Abstract state -> ShapeDtypeStructs with the plan's parameter shardings (as ``shard_model`` places)."""
    jax = _jax()
    shardings = plan.param_shardings(state, on_uneven="replicate")
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), state, shardings)


def _abstract_model(setup: Setup, *, param_dtype=None):
    import jax.numpy as jnp
    from flax import nnx

    from dultra_jax.checkpoints.hf import parse_dtype
    from dultra_jax.model.dultra import DUltra

    m = setup.run.model
    dtype = parse_dtype(m.dtype)
    pdt = param_dtype if param_dtype is not None else parse_dtype(m.param_dtype) if m.param_dtype else dtype
    cfg = setup.model_cfg
    return nnx.eval_shape(lambda: DUltra(cfg, dtype=dtype, param_dtype=pdt, remat=m.remat, rngs=nnx.Rngs(0))), jnp


def shard_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree (by each leaf's sharding)."""
    jax = _jax()
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * leaf.dtype.itemsize
    return total


@dataclass
class Program:
    """A jitted program and the abstract arguments to lower it with."""

    fn: Any  # parallel.MeshJit
    args: tuple
    info: dict


def training_state(setup: Setup):
    """(graphdef, trainable, frozen, opt_state, tx) abstract and sharded, as the trainer creates them."""
    import optax
    from flax import nnx

    from dultra_jax.training.step import make_optimizer, split_trainable

    jax = _jax()
    run, plan = setup.run, setup.plan
    abstract, _ = _abstract_model(setup)
    which = "planner" if run.train.mode == "planner" else run.train.trainable
    graphdef, trainable, frozen = split_trainable(abstract, which)
    trainable, frozen = _attach(plan, trainable), _attach(plan, frozen)
    tx = make_optimizer(run.optim)
    opt_abs = jax.eval_shape(tx.init, trainable)
    # moments inherit the parameters' shardings, the rest (step counters) is replicated (init_optimizer)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, jax.tree.map(lambda a: a.sharding, trainable),
                                   transform_non_params=lambda _: plan.replicated,
                                   is_leaf=lambda x: isinstance(x, nnx.Variable))
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abs, opt_sh)
    return graphdef, trainable, frozen, opt_state, tx


def _rows_check(setup: Setup, rows: int, what: str) -> None:
    q = setup.plan.batch_shards
    if rows <= 0 or rows % q:
        raise ValueError(f"{what}: {rows} rows cannot be split {q} ways over the batch axes of mesh "
                         f"{dict(setup.plan.mesh.shape)}; use a multiple of {q} rows")


def _loss(run):
    """The loss the trainer's step takes for ``train.mode``: the trainer's own mode table."""
    from dultra_jax.training.trainer import MODES

    return MODES[run.train.mode].loss(run)


def train_step_program(setup: Setup, *, micro_rows: int | None = None, recorded_steps: int | None = None,
                       state=None) -> Program:
    """The trainer's step over ``train.micro_batches`` micro-batches of ``micro_rows`` rows each, with the
    batch the trainer builds for ``train.mode`` (GRPO: the recorded rollout; SFT / planner: sequences of
    ``task.max_prompt_length + sequence.gen_length``)."""
    from dultra_jax.model import axes
    from dultra_jax.training.grpo import Rollout
    from dultra_jax.training.step import make_train_step
    from dultra_jax.training.trainer import sequence_batch_like

    jax = _jax()
    run, plan = setup.run, setup.plan
    n = run.train.micro_batches
    if micro_rows is None:
        if setup.rows % n:
            raise ValueError(f"{setup.rows} rows per step do not split into train.micro_batches={n}")
        micro_rows = setup.rows // n
    _rows_check(setup, micro_rows, f"train.micro_batches={n} of the {setup.rows} rows per step")
    graphdef, trainable, frozen, opt_state, tx = state or training_state(setup)
    step = make_train_step(graphdef, _loss(run), tx, plan=plan, trainable=trainable, frozen=frozen,
                           opt_state=opt_state)
    b = axes.ACT_BATCH
    rows3, hist = plan.sharding([None, b, None]), plan.sharding([None, None, b, None])
    s = None
    if setup.grpo:
        s = recorded_steps or setup.recorded_steps
        p, length = setup.prompt_len, setup.prompt_len + run.grpo.gen_length
        beta = run.grpo.beta
        batch = Rollout(
            prompt_ids=_sds((n, micro_rows, p), np.int32, rows3),
            reveal=_sds((n, s, micro_rows, length), np.bool_, hist),
            proposals=_sds((n, s, micro_rows, length), np.int32, hist),
            old_logps=_sds((n, s, micro_rows, length), np.float32, hist),
            advantages=_sds((n, micro_rows), np.float32, plan.sharding([None, b])),
            attention_mask=_sds((n, micro_rows, length), np.int32, rows3),
            ref_logps=_sds((n, s, micro_rows, length), np.float32, hist) if beta > 0 else None,
        )
    else:
        # a streamed conversation source (data.source != task) cuts/pads every sequence to data.max_length; a
        # task's worked solutions are the longest prompt plus sequence.gen_length
        streamed = run.data.source != "task"
        length = run.data.max_length if streamed else setup.prompt_len + run.sequence.gen_length
        # the trainer's own batch (keys, dtypes), stacked into micro-batches as _split_micro stacks it
        like = sequence_batch_like(run.train.mode, micro_rows, length)
        batch = {k: _sds((n, *a.shape), a.dtype, rows3 if a.ndim == 2 else plan.sharding([None, b]))
                 for k, a in like.items()}
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=plan.replicated)
    info = {"rows_per_device": micro_rows // plan.batch_shards, "micro_batch_rows": micro_rows,
            "micro_batches": n, "recorded_steps": s, "sequence_length": length,
            "training_state_bytes": shard_bytes((trainable, frozen, opt_state))}
    return Program(step, (trainable, frozen, opt_state, batch, rng), info)


def _fsdp_free_rules(rules):
    """The plan's rules with parameters replicated over ``fsdp`` (activations unchanged)."""
    from dultra_jax.model import axes

    out = []
    for name, target in rules:
        if name in axes.PARAM_AXES:
            names = [target] if isinstance(target, str) else list(target or ())
            names = [t for t in names if t != "fsdp"]
            target = None if not names else names[0] if len(names) == 1 else tuple(names)
        out.append((name, target))
    return tuple(out)


def rollout_program(setup: Setup, *, rows: int | None = None, weights: str = "sharded") -> Program:
    """``generate(..., return_trajectory=True, plan=...)``'s jitted loop over ``rows`` left-padded prompts."""
    import jax.numpy as jnp
    from flax import nnx

    from dultra_jax.decoding import loop
    from dultra_jax.parallel import ShardingPlan

    jax = _jax()
    plan = setup.plan
    rows = rows or setup.rows
    _rows_check(setup, rows, f"train.batch_size x grpo.num_generations = {rows} rollout rows")
    if weights == "sharded":  # the training weights themselves: nnx.merge(graphdef, trainable, frozen)
        abstract, _ = _abstract_model(setup)
        wplan = plan
    elif weights == "replicated_bf16":
        abstract, _ = _abstract_model(setup, param_dtype=jnp.bfloat16)
        wplan = ShardingPlan(plan.mesh, _fsdp_free_rules(plan.rules))
    else:
        raise ValueError(f"unknown rollout weights {weights!r}; choose one of {list(ROLLOUT_WEIGHTS)}")
    graphdef, state = nnx.split(abstract)
    state = _attach(wplan, state)
    cfg = setup.decode_config()
    p, length = setup.prompt_len, setup.prompt_len + setup.run.grpo.gen_length
    rows2, rows1 = plan.batch_sharding(2), plan.batch_sharding(1)
    fn = loop.mesh_decoder(plan, graphdef, state, cfg, with_mask=True)  # what generate(plan=...) runs
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (state, _sds((rows, p), np.int32, rows2), _sds((rows, length), np.int32, rows2),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=plan.replicated), _sds((rows,), np.int32, rows1),
            None)
    info = {"rows_per_device": rows // plan.batch_shards, "rows": rows, "weights": weights,
            "recorded_steps": cfg.iteration_cap, "weight_bytes": shard_bytes(state)}
    return Program(fn, args, info)


# ------------------------------------------------------------------------------------------- analysis
def measure(prog: Program, *, return_compiled: bool = False):
    """Lower + compile; XLA's per-device bytes (and the compiled program)."""
    t0 = time.perf_counter()
    lowered = prog.fn.lower(*prog.args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    t2 = time.perf_counter()
    arg, out, alias = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes
    temp = mem.temp_size_in_bytes
    r = {"per_device_bytes": int(arg + out - alias + temp), "argument_bytes": int(arg), "output_bytes": int(out),
            "alias_bytes": int(alias), "temp_bytes": int(temp),
            **prog.info, "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}
    return (r, compiled) if return_compiled else r


def _with_training_state(r: dict, state_bytes: int, weights: str) -> dict:
    """A rollout's bytes plus the training state resident beside it (what is not already its argument)."""
    resident = state_bytes - r["weight_bytes"] if weights == "sharded" else state_bytes
    return {**r, "resident_training_state_bytes": int(resident),
            "per_device_bytes_with_training_state": int(r["per_device_bytes"] + resident)}


def plan_programs(setup: Setup, *, micro_rows: int | None = None, rollout_rows: int | None = None,
                  weights: tuple[str, ...] = ROLLOUT_WEIGHTS, with_train: bool = True,
                  log=lambda *_: None) -> dict[str, Any]:
    state = training_state(setup)
    if not with_train:  # only the resident training state, for the rollouts beside it
        train = {"training_state_bytes": shard_bytes(state[1:4])}
    else:
        train = measure(train_step_program(setup, micro_rows=micro_rows, state=state))
        log(f"  train_step {train['micro_batch_rows']} rows x {train['micro_batches']} micro-batches, "
            f"S={train['recorded_steps']}: {train['per_device_bytes'] / GIB:.2f} GiB/device "
            f"(compile {train['compile_s']} s)")
    rollouts = {}
    for w in weights if setup.grpo else ():
        r = _with_training_state(measure(rollout_program(setup, rows=rollout_rows, weights=w)),
                                 train["training_state_bytes"], w)
        rollouts[w] = r
        log(f"  rollout[{w}] {r['rows']} rows: {r['per_device_bytes'] / GIB:.2f} GiB/device, "
            f"{r['per_device_bytes_with_training_state'] / GIB:.2f} with the training state "
            f"(compile {r['compile_s']} s)")
    return {"train_step": train, "rollout": rollouts.get("sharded"),
            "rollout_variants": rollouts}


_BYTE_KEYS = ("per_device_bytes", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
              "training_state_bytes", "weight_bytes", "resident_training_state_bytes",
              "per_device_bytes_with_training_state")


def extrapolate(at: dict[int, dict], layers: int) -> dict:
    """Byte counts linear in the layer count through two measurements (n1, n2) -> value at ``layers``."""
    (n1, a), (n2, b) = sorted(at.items())

    def lin(x, y):
        return int(round(x + (y - x) * (layers - n1) / (n2 - n1)))

    def walk(x, y):
        if isinstance(x, dict):
            return {k: walk(x[k], y[k]) if k in y else x[k] for k in x}
        return x

    out = walk(a, b)
    for prog in ("train_step", "rollout"):
        if out.get(prog) is None:
            continue
        for k in _BYTE_KEYS:
            if k in a[prog]:
                out[prog][k] = lin(a[prog][k], b[prog][k])
        if "compile_s" in a[prog]:
            out[prog]["compile_s"] = round(a[prog]["compile_s"] + b[prog]["compile_s"], 2)
    for w, r in out.get("rollout_variants", {}).items():
        for k in _BYTE_KEYS:
            if k in r:
                r[k] = lin(a["rollout_variants"][w][k], b["rollout_variants"][w][k])
    return out


def fits(nbytes: int, budget: float, margin: float) -> bool:
    return nbytes <= (1 - margin) * budget


def summarize(doc: dict, margin: float, budget: float) -> dict:
    """Per program: fits with the margin (the rollout beside the training state)."""
    p = doc["programs"]
    out = {"train_step": fits(p["train_step"]["per_device_bytes"], budget, margin)}
    for w, r in doc.get("rollout_variants", {}).items():
        out[f"rollout_{w}"] = fits(r["per_device_bytes_with_training_state"], budget, margin)
    return out


def run_plan(run, devices, *, mesh=None, preset_name="llada-8b", layers=None, extrapolate_from=None,
             micro_rows=None, rollout_rows=None, weights=ROLLOUT_WEIGHTS, with_train=True,
             log=lambda *_: None) -> dict[str, Any]:
    """The plan's programs for one run config (optionally extrapolated from two layer counts)."""
    if extrapolate_from:
        at = {}
        for n in extrapolate_from:
            log(f"{n} layers:")
            setup = make_setup(run, devices, mesh=mesh, preset_name=preset_name, layers=n)
            at[n] = plan_programs(setup, micro_rows=micro_rows, rollout_rows=rollout_rows, weights=weights,
                                  with_train=with_train, log=log)
        full = make_setup(run, devices, mesh=mesh, preset_name=preset_name, layers=layers)
        target = full.model_cfg.n_layers
        res = extrapolate(at, target)
        res["layers"] = {"compiled": sorted(at), "reported": target,
                         "method": f"bytes extrapolated linearly per layer from compiles at {sorted(at)} layers",
                         "at": {str(k): v for k, v in at.items()}}
        return {"setup": full, **res}
    setup = make_setup(run, devices, mesh=mesh, preset_name=preset_name, layers=layers)
    res = plan_programs(setup, micro_rows=micro_rows, rollout_rows=rollout_rows, weights=weights,
                        with_train=with_train, log=log)
    res["layers"] = {"compiled": [setup.model_cfg.n_layers], "reported": setup.model_cfg.n_layers,
                     "method": "compiled at this layer count"}
    return {"setup": setup, **res}


def document(run_path: str, res: dict, budget_name: str, margin: float) -> dict[str, Any]:
    from flax import nnx

    setup = res.pop("setup")
    jax = _jax()
    abstract, _ = _abstract_model(setup)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))
    doc = {
        "benchmark": "memory_plan", "config": str(run_path), "model": setup.model_source,
        "mesh": ",".join(f"{k}={v}" for k, v in setup.plan.mesh.shape.items()),
        "devices": int(setup.plan.mesh.size), "backend": jax.devices()[0].platform,
        "param_count": n_params, "budget": budget_name, "budget_bytes": int(BUDGETS[budget_name]), "margin": margin,
        "usable_bytes": int((1 - margin) * BUDGETS[budget_name]),
        "mode": setup.run.train.mode, "rows": setup.rows, "prompt_len": setup.prompt_len,
        "gen_len": setup.run.grpo.gen_length if setup.grpo else setup.run.sequence.gen_length,
        "block_length": setup.run.grpo.block_length if setup.grpo else None, "remat": setup.run.model.remat,
        "programs": {"train_step": res["train_step"], "rollout": res["rollout"]},
        "rollout_variants": res["rollout_variants"], "layers": res["layers"],
    }
    doc["fits"] = summarize(doc, margin, BUDGETS[budget_name])
    return doc


def largest(evaluate: Callable[[int], int], quantum: int, limit: float, start: int | None = None,
            cap: int = 1 << 14) -> tuple[int | None, int | None]:
    """(largest multiple of ``quantum`` whose bytes fit ``limit``, smallest that does not); bytes grow with it.

    Doubles until over the limit, then bisects."""
    lo, hi = None, None
    b = start or quantum
    while b <= cap:
        if evaluate(b) <= limit:
            lo, b = b, b * 2
        else:
            hi = b
            break
    if lo is None or hi is None:
        return lo, hi
    a, z = lo // quantum, hi // quantum
    while z - a > 1:
        m = (a + z) // 2
        if evaluate(m * quantum) <= limit:
            a = m
        else:
            z = m
    return a * quantum, z * quantum


def search(run, devices, *, mesh=None, preset_name="llada-8b", layers=None, extrapolate_from=None,
           budget: float, margin: float, log=print) -> dict[str, Any]:
    """Largest micro-batch (rows per train micro-step) and rollout batch (rows) that fit with the margin."""
    limit = (1 - margin) * budget
    q = make_setup(run, devices, mesh=mesh, preset_name=preset_name, layers=1).plan.batch_shards
    seen: dict[tuple, dict] = {}

    def plan_at(micro_rows=None, rollout_rows=None, weights=("sharded",), with_train=True):
        key = (micro_rows, rollout_rows, weights, with_train)
        if key not in seen:
            seen[key] = run_plan(run, devices, mesh=mesh, preset_name=preset_name, layers=layers,
                                 extrapolate_from=extrapolate_from, micro_rows=micro_rows,
                                 rollout_rows=rollout_rows, weights=weights, with_train=with_train)
        return seen[key]

    def train_bytes(rows):
        r = plan_at(micro_rows=rows, rollout_rows=q, weights=())["train_step"]
        log(f"  train_step micro-batch {rows} rows: {r['per_device_bytes'] / GIB:.2f} GiB/device")
        return r["per_device_bytes"]

    out = {"usable_bytes": int(limit), "quantum_rows": q, "train_step": {}, "rollout": {}}
    best, over = largest(train_bytes, q, limit)
    out["train_step"] = {"largest_micro_batch_rows": best, "next_over_budget": over,
                         "per_device_bytes": best and plan_at(micro_rows=best, rollout_rows=q,
                                                              weights=())["train_step"]["per_device_bytes"]}
    for w in ROLLOUT_WEIGHTS if run.train.mode == "grpo" else ():
        def roll_bytes(rows, w=w):
            r = plan_at(rollout_rows=rows, weights=(w,), with_train=False)["rollout_variants"][w]
            log(f"  rollout[{w}] {rows} rows: {r['per_device_bytes_with_training_state'] / GIB:.2f} GiB/device "
                f"with the training state")
            return r["per_device_bytes_with_training_state"]

        best, over = largest(roll_bytes, q, limit)
        out["rollout"][w] = {"largest_rows": best, "next_over_budget": over}
    return out


def machine() -> dict[str, str]:
    jax = _jax()
    import flax

    from dultra_jax.eval.env import git_commit

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "flax": flax.__version__, "commit": git_commit()}


def _print_table(doc: dict) -> None:
    gib = lambda x: f"{x / GIB:8.2f} GiB"  # noqa: E731
    print(f"{doc['config']}: {doc['model']}, {doc['param_count']:,} parameters, mesh {doc['mesh']}; "
          f"{doc['layers']['method']}")
    for name, r in [("train_step", doc["programs"]["train_step"]),
                    *[(f"rollout[{w}]", r) for w, r in doc["rollout_variants"].items()]]:
        extra = (f", with training state {gib(r['per_device_bytes_with_training_state'])}"
                 if "per_device_bytes_with_training_state" in r else "")
        print(f"  {name:26s} {gib(r['per_device_bytes'])} (args {gib(r['argument_bytes'])}, temp "
              f"{gib(r['temp_bytes'])}){extra}; {r['rows_per_device']} rows/device, S={r['recorded_steps']}")
    print(f"  {doc['budget'].upper()} usable {doc['usable_bytes'] / GIB:.1f} GiB ({doc['margin']:.0%} margin): "
          f"{doc['fits']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config YAML (training.config.RunConfig)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--mesh", default=None, help="AXIS=SIZE,... (default: train.mesh, else fsdp over --devices)")
    ap.add_argument("--devices", type=int, default=None, help="fake CPU devices (default: the mesh's size, or 8)")
    ap.add_argument("--preset", default="llada-8b", help="model shape when model.path does not exist here")
    ap.add_argument("--layers", type=int, default=None, help="compile with this many layers")
    ap.add_argument("--extrapolate", default=None, metavar="N1,N2",
                    help="compile at two layer counts and extrapolate linearly to --layers / the model's")
    ap.add_argument("--budget", default="h200", choices=sorted(BUDGETS))
    ap.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    ap.add_argument("--search", action="store_true", help="largest micro-batch / rollout batch that fit")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    from dultra_jax.parallel import MeshConfig
    from dultra_jax.training.config import load_run_config

    run = load_run_config(args.config, args.set)
    spec = args.mesh or run.train.mesh
    if args.devices:
        n = args.devices
    elif spec:
        sizes = MeshConfig.parse(spec).sizes
        n = 8 if -1 in sizes.values() else int(np.prod(list(sizes.values())))
    else:
        n = 8
    jax = _jax()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    devices = jax.devices("cpu")[:n]
    ext = [int(x) for x in args.extrapolate.split(",")] if args.extrapolate else None
    if ext is not None and len(set(ext)) != 2:
        raise SystemExit("--extrapolate takes two different layer counts, e.g. 2,4")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    t0 = time.perf_counter()
    res = run_plan(run, devices, mesh=args.mesh, preset_name=args.preset, layers=args.layers,
                   extrapolate_from=ext, log=log)
    doc = document(args.config, res, args.budget, args.margin)
    if args.search:
        doc["search"] = search(run, devices, mesh=args.mesh, preset_name=args.preset, layers=args.layers,
                               extrapolate_from=ext, budget=BUDGETS[args.budget], margin=args.margin, log=log)
    doc["machine"] = machine()
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.out:
        sys.path.insert(0, str(Path(__file__).parent))
        from _common import write_json

        write_json(Path(args.out), doc)
    if args.json:
        print(json.dumps(doc))
    else:
        _print_table(doc)
        if "search" in doc:
            print(f"  search: {json.dumps(doc['search'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
