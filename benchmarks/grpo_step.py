"""One GRPO step on the CPU for both objectives, and what the replayed gradient costs against its forward.

    python benchmarks/grpo_step.py                  # both parts
    python benchmarks/grpo_step.py --part cost      # only the cost ratio (seconds)

Part 1 (``step``): the trainer's own GRPO step (synthetic task, random weights of the demo's two sizes):
rollout seconds (decode with the trajectory), train seconds (the jitted optimiser step: the replay for
``replay``, one forward + backward for ``diffu_grpo``) and completion tokens per second of each, for
``grpo.loss=replay`` (planner rollouts) and ``diffu_grpo`` (threshold rollouts, as plain LLaDA). Rollout:
median of the steps after the first (which compiles); train step: each step's optimiser update timed on its
second call (the first may compile a new recorded-step bucket), median over the steps.

Part 2 (``cost``): the replayed loss's value_and_grad against its forward at S = 8 recorded iterations:
XLA's FLOP and byte counts of the compiled programs (exact, load-independent) and their CPU time (median of
process time, all threads), for ``trainable=all`` and for ``trainable=planner`` before (grpo_loss
differentiated through its rematerialised scan) and after (planner_grpo_loss: per-iteration VJP in the
forward scan). Timings on a shared machine are noisy: the FLOP ratios are the finding, times are context.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, commit, device_name, write_json  # noqa: E402

from dultra_jax.config import preset  # noqa: E402
from dultra_jax.model import DUltra  # noqa: E402
from dultra_jax.training.grpo import GRPOLossConfig, Rollout, grpo_loss, planner_grpo_loss  # noqa: E402
from dultra_jax.training.step import split_trainable  # noqa: E402

# The demo's two model sizes (dultra_jax/demo.py SIZES), random weights.
SIZES = {"demo-small": "{d_model: 64, n_layers: 2, mlp_hidden_size: 128, max_sequence_length: 128}",
         "demo-full": "{d_model: 128, n_layers: 4, mlp_hidden_size: 256, max_sequence_length: 128}"}
OBJECTIVES = {"replay": ["grpo.loss=replay"],
              "diffu_grpo": ["grpo.loss=diffu_grpo", "grpo.rollout.strategy=threshold",
                             "grpo.rollout.threshold=0.9"]}


# ------------------------------------------------------------------------------------------- part 1
def grpo_step(size: str, loss: str, steps: int, out_dir: Path) -> dict:
    from dultra_jax.training.config import load_run_config
    from dultra_jax.training.trainer import Trainer

    cfg = load_run_config(None, [
        "model.preset=tiny", f"model.overrides={SIZES[size]}", "task.num_train=64", "train.mode=grpo",
        "train.batch_size=4", "grpo.num_generations=4", "grpo.gen_length=32", "grpo.block_length=16",
        "grpo.temperature=0.7", "grpo.scale_rewards=group", "grpo.advantage_min_clip=null", f"train.max_steps={steps}",
        "train.save_every=1000", *OBJECTIVES[loss]])
    trainer = Trainer(cfg, out_dir / f"{size}-{loss}", progress=False)
    rows = cfg.train.batch_size * cfg.grpo.num_generations
    rollout_s, train_s, recorded = [], [], []
    for step in range(steps):
        key = jax.random.fold_in(jax.random.key(0), step)
        batch, stats = trainer._grpo_batch(key)
        times = []
        for _ in range(2):  # the first call may compile (a new recorded-step bucket): time the second
            t0 = time.perf_counter()
            trainer.trainable, trainer.opt_state, m = trainer.step_fn(
                trainer.trainable, trainer.frozen, trainer.opt_state, trainer._iteration_batch(batch, 0), key)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        train_s.append(times[-1])
        rollout_s.append(stats["rollout_s"])
        recorded.append(stats["recorded_steps"])
        trainer.step += 1
    warm_roll, warm_train = float(np.median(rollout_s[1:])), float(np.median(train_s))
    tokens = rows * cfg.grpo.gen_length
    return {"size": size, "loss": loss, "rollout": cfg.grpo.rollout.strategy, "rows": rows,
            "gen_length": cfg.grpo.gen_length, "recorded_steps": float(np.median(recorded[1:])),
            "rollout_s": warm_roll, "train_s": warm_train, "rollout_tokens_per_s": tokens / warm_roll,
            "train_tokens_per_s": tokens / warm_train, "first_step_s": rollout_s[0] + train_s[0],
            "params": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(trainer._current_model())))}


# ------------------------------------------------------------------------------------------- part 2
COST_MODEL = dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=256, vocab_size=512,
                  embedding_size=512, mask_token_id=511, eos_token_id=510, pad_token_id=510, max_sequence_length=256)


def cost_rollout(steps: int = 8, batch: int = 4, prompt: int = 16, gen: int = 32, block: int = 16) -> Rollout:
    """A planner-like recorded rollout: 4 positions of the current block revealed per row and iteration."""
    rng = np.random.default_rng(0)
    length = prompt + gen
    reveal = np.zeros((steps, batch, length), bool)
    per_block = block // 4
    for s in range(steps):
        reveal[s, :, prompt + (s // per_block % (gen // block)) * block + (s % per_block) * 4 + np.arange(4)] = True
    return Rollout(prompt_ids=jnp.asarray(rng.integers(0, 500, (batch, prompt)), jnp.int32),
                   reveal=jnp.asarray(reveal), proposals=jnp.asarray(rng.integers(0, 500, reveal.shape), jnp.int32),
                   old_logps=jnp.zeros(reveal.shape), advantages=jnp.asarray(np.linspace(-1, 1, batch), jnp.float32),
                   attention_mask=jnp.ones((batch, length), jnp.int32))


def _program(fn, *args, reps: int) -> dict:
    compiled = jax.jit(fn).lower(*args).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    ops = collections.Counter(m.group(1) for m in re.finditer(r"^\s*\S+ = \S+ (\w[\w-]*)\(", compiled.as_text(),
                                                                re.M))
    jax.block_until_ready(compiled(*args))
    cpu = []
    for _ in range(reps):
        t0 = time.process_time()
        jax.block_until_ready(compiled(*args))
        cpu.append(time.process_time() - t0)
    return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0)),
            "transcendentals": float(ca.get("transcendentals", 0.0)), "cpu_s": float(np.median(cpu)),
            "transposes": ops["transpose"], "fusions": ops["fusion"]}


def cost_ratios(steps: int = 8, reps: int = 9) -> list[dict]:
    model = DUltra(preset("tiny", **COST_MODEL), rngs=nnx.Rngs(0))
    ro = cost_rollout(steps)
    cfg = GRPOLossConfig(block_length=16, max_completion_length=32, advantage_min_clip=None)
    out = []
    for trainable, variants in (("all", {"current": grpo_loss}),
                                ("planner", {"before": grpo_loss, "after": planner_grpo_loss})):
        gd, tr, fr = split_trainable(model, trainable)
        fwd = _program(lambda t, r, gd=gd, fr=fr: grpo_loss(gd, (t, fr), r, cfg)[0], tr, ro, reps=reps)
        for label, loss in variants.items():
            vag = _program(jax.value_and_grad(lambda t, r, gd=gd, fr=fr, loss=loss: loss(gd, (t, fr), r, cfg)[0]),
                           tr, ro, reps=reps)
            out.append({"trainable": trainable, "variant": label, "steps": steps, "forward": fwd,
                        "value_and_grad": vag, **{f"{k}_ratio": vag[k] / fwd[k] for k in
                                                  ("flops", "bytes", "transcendentals", "cpu_s")}})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["step", "cost", "both"], default="both")
    ap.add_argument("--steps", type=int, default=4, help="GRPO steps per (size, loss); the first compiles")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")
    doc = {"benchmark": "grpo_step", "device": device_name(), "commit": commit(), "jax": jax.__version__,
           "note": "CPU, a machine shared with other jobs (load average far above its 2 cores while measured): "
                   "seconds are noisy and pessimistic; FLOP and byte ratios are exact"}
    if args.part in ("step", "both"):
        import tempfile

        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for size in args.sizes:
                for loss in OBJECTIVES:
                    r = grpo_step(size, loss, args.steps, Path(tmp))
                    rows.append(r)
                    print(f"{size:10s} {loss:10s} rollout({r['rollout']:9s}) {r['rollout_s']:7.3f} s "
                          f"{r['rollout_tokens_per_s']:8.0f} tok/s | train {r['train_s']:7.3f} s "
                          f"{r['train_tokens_per_s']:8.0f} tok/s | S={r['recorded_steps']:.0f}", flush=True)
        doc["grpo_step"] = rows
    if args.part in ("cost", "both"):
        rows = cost_ratios()
        for r in rows:
            print(f"trainable={r['trainable']:8s} {r['variant']:8s} value_and_grad / forward: FLOPs "
                  f"{r['flops_ratio']:.2f}x  bytes {r['bytes_ratio']:.2f}x  CPU time {r['cpu_s_ratio']:.2f}x  "
                  f"(HLO transposes {r['value_and_grad']['transposes']} vs {r['forward']['transposes']})", flush=True)
        doc["cost"] = rows
        doc["cost_model"] = COST_MODEL
    path = Path(args.out) if args.out else RESULTS / f"grpo_step_{args.part}_cpu.json"
    write_json(path, doc)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
