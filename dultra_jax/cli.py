"""``dultra`` command line: ``convert`` and ``demo`` (the embedded default run)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

from dultra_jax.checkpoints import CheckpointError
from dultra_jax.checkpoints.hub import resolve_model_path
from dultra_jax.config import ConfigError
from dultra_jax.outputs import require_directory_path

TINY_CHECKPOINT = "lladou-tiny"
DEBUG_ENV = "DULTRA_DEBUG"  # set to 1 for the traceback of an error (= --debug)
WANDB_HELP = "also log to Weights & Biases (pip install 'dultra-jax[wandb]'; WANDB_MODE=offline works offline)"
MODEL_HELP = ("HF checkpoint directory, converted directory, or hub id org/name[@revision] (HF_HOME / HF_HUB_CACHE / "
              "HF_HUB_OFFLINE honoured; a local directory wins)")


def embedded_checkpoint() -> Path:
    """The tiny random checkpoint shipped inside the package (the original's exact on-disk format)."""
    return Path(str(resources.files("dultra_jax") / "assets" / TINY_CHECKPOINT))


def _cmd_convert(args: argparse.Namespace) -> int:
    from dultra_jax.checkpoints import convert

    t0 = time.perf_counter()
    out = convert(
        args.src, args.out, to_hf=args.to_hf, dtype=args.dtype, overwrite=args.overwrite, seed=args.seed,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
    )
    kind = "HF safetensors" if args.to_hf else "converted (orbax)"
    print(f"wrote {kind} checkpoint to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """SFT -> planner pre-training -> GRPO on the built-in task; accuracy/NFE/TPF table, plot, summary.json."""
    from dultra_jax.demo import run_demo

    require_directory_path(args.out)
    run_demo(args.out, seed=args.seed, size=args.size, progress=True)
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Convert the embedded tiny checkpoint, reload it, and show what the model computes on a canvas."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import dultra_jax
    from dultra_jax.checkpoints import convert

    src = embedded_checkpoint()
    out = require_directory_path(args.out)
    converted = out / "model"
    print(f"[1/3] converting the embedded tiny checkpoint {src.name} -> {converted}")
    convert(src, converted, overwrite=True)
    print("[2/3] loading it back (converted) and straight from the HF files")
    model = dultra_jax.load(converted, dtype="fp32")
    direct = dultra_jax.load(src, dtype="fp32")
    cfg = model.cfg
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))

    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, cfg.vocab_size - 2, size=(1, args.prompt_len))
    canvas = np.concatenate([prompt, np.full((1, args.gen_len), cfg.mask_token_id)], axis=1)
    ids = jnp.asarray(canvas, jnp.int32)
    graphdef, state = nnx.split(model)
    logits, hidden = dultra_jax.forward(graphdef, state, ids)
    logits_direct, _ = dultra_jax.forward(*nnx.split(direct), ids)
    mask_index = ids == cfg.mask_token_id
    timestep = 1.0 - mask_index.mean(axis=1)
    plan = dultra_jax.planner_forward(graphdef, state, hidden, timestep, mask_index)
    p = np.asarray(jax.nn.sigmoid(plan))[0]
    proposal = np.asarray(jnp.argmax(logits.at[..., cfg.mask_token_id].set(-jnp.inf), axis=-1))[0]

    print("[3/3] one forward over [prompt | MASK x gen]:")
    print(f"  model: d_model={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} vocab={cfg.vocab_size} "
          f"params={n_params:,}")
    print(f"  canvas: {args.prompt_len} prompt + {args.gen_len} MASK tokens; timestep={float(timestep[0]):.3f}")
    print(f"  logits {tuple(logits.shape)}  hidden {tuple(hidden.shape)}  planner {tuple(plan.shape)}")
    diff = float(jnp.max(jnp.abs(logits - logits_direct)))
    print(f"  converted vs HF-direct logits: max |diff| = {diff:.2e}")
    gen = slice(args.prompt_len, args.prompt_len + args.gen_len)
    print("  position | proposal | p(reveal)")
    for j in range(gen.start, gen.stop):
        print(f"  {j:8d} | {int(proposal[j]):8d} | {p[j]:.3f}")
    summary = {
        "checkpoint": str(converted), "params": n_params, "canvas": canvas.tolist(),
        "proposals": proposal[gen].tolist(), "reveal_prob": [float(x) for x in p[gen]],
        "converted_vs_hf_max_abs_logit_diff": diff,
    }
    from dultra_jax.atomic import write_atomic

    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'}")
    return 0


def _load_tokenizer(path: Path):
    """The checkpoint's own tokenizer (offline), or None when the directory has no tokenizer files."""
    from transformers.utils import logging as hf_logging

    from dultra_jax.checkpoints.tokenizer import has_tokenizer, load_tokenizer

    if os.environ.get("TRANSFORMERS_VERBOSITY") == "error":  # main() sets it unless the user did
        hf_logging.set_verbosity_error()
    return load_tokenizer(path) if has_tokenizer(path) else None


def _cmd_generate(args: argparse.Namespace) -> int:
    """Decode one prompt (chat-templated user turn) and report the answer, NFE, TPF and wall time."""
    import jax

    import dultra_jax
    from dultra_jax.accounting import account, model_excluded_ids
    from dultra_jax.decoding import DecodeConfig, generate
    from dultra_jax.decoding.flags import decode_flag_values
    from dultra_jax.text import TextModel

    try:  # the settings first: a bad one is reported before the model is loaded
        DecodeConfig(**decode_flag_values(args))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    path = resolve_model_path(args.model)
    plan = None
    if args.mesh:
        from dultra_jax.multihost import initialize_distributed
        from dultra_jax.parallel import ShardingPlan

        initialize_distributed()
        plan = ShardingPlan.create(args.mesh)
    model = dultra_jax.load(path, dtype=args.dtype, **({"mesh": plan} if plan is not None else {}))
    tok = _load_tokenizer(path)
    text = TextModel(model, tok) if tok is not None else None  # encodes the prompt and cuts the answer
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError as e:
            raise ConfigError(f"--prompt-ids must be integers separated by commas or spaces: {e}") from e
    elif args.prompt is not None:
        if text is None:
            raise ConfigError(f"{path} has no tokenizer files; pass --prompt-ids instead of --prompt")
        ids = text.encode(args.prompt, chat=True)
    else:
        raise ConfigError("give --prompt TEXT or --prompt-ids IDS")
    printer = _BlockPrinter(tok, args.block_length, sys.stderr if args.json else sys.stdout) if args.stream else None
    kw = dict(decode_flag_values(args), rng=args.seed, plan=plan, on_block=printer)
    try:
        result = generate(model, [ids], **kw)  # compile + run (the printer stays quiet)
        jax.block_until_ready(result.tokens)
        if printer is not None:
            printer.active = True
        t0 = time.perf_counter()
        result = generate(model, [ids], **kw)
        jax.block_until_ready(result.tokens)
        wall = time.perf_counter() - t0
    except ValueError as e:
        raise ConfigError(str(e)) from e
    gen = np.asarray(result.generated[0])
    cfg = model.cfg
    counted = account(gen[None], result.nfe, model_excluded_ids(cfg, tok), cfg.mask_token_id)
    eff, nfe = int(counted.effective_tokens[0]), int(counted.nfe[0])
    out = {
        # ids the tokenizer does not know (e.g. padded embedding rows) carry no text
        "answer": text.finish(gen, nfe).text if text is not None else None,
        "generated_ids": gen.tolist(), "nfe": nfe, "effective_tokens": eff,
        "tpf": counted.tpf, "wall_s": wall, "strategy": args.strategy, "cache": args.cache,
        "equivalent_forwards": float(result.equivalent_forwards[0]), "iterations": int(result.iterations),
        "gen_length": args.gen_length, "block_length": args.block_length,
    }
    if args.json:
        print(json.dumps(out))
    else:
        if printer is None:
            print(out["answer"] if out["answer"] is not None else " ".join(map(str, out["generated_ids"])))
        else:
            print()
        print(f"NFE {nfe}  effective tokens {eff}  TPF {out['tpf']:.2f}  iterations {out['iterations']}  "
              f"equivalent forwards {out['equivalent_forwards']:.2f}  wall {wall:.3f}s ({args.strategy})")
    return 0


class _BlockPrinter:
    """``--stream``: prints row 0's blocks as the compiled loop finalises them (a ``jax.debug.callback``).

    One object per command, so the warm-up run compiles the loop with it and stays quiet (``active``)."""

    def __init__(self, tok, block_length: int, stream):
        self.tok, self.bl, self.stream, self.active = tok, block_length, stream, False
        self.blocks: list[list[int]] = []

    def __call__(self, finished, first, end, generated) -> None:
        if not (self.active and bool(finished[0])):
            return
        for b in range(int(first[0]), int(end[0])):
            ids = [int(t) for t in generated[0, b * self.bl:(b + 1) * self.bl]]
            self.blocks.append(ids)
            if self.tok is not None:
                text = self.tok.decode([t for t in ids if t < len(self.tok)], skip_special_tokens=True)
            else:
                text = " ".join(map(str, ids)) + " "
            print(text, end="", file=self.stream, flush=True)


def _cmd_serve(args: argparse.Namespace) -> int:
    """OpenAI-compatible server: continuous batching over the model, until SIGTERM (docs/serving.md)."""
    try:
        from dultra_jax.serve import serve
    except ImportError as e:
        raise ConfigError(f"dultra serve needs the serve extra: pip install 'dultra-jax[serve]' ({e})") from e
    from dultra_jax.serve.worker import Worker

    text, plan = _text_model(args, slots=args.slots)
    try:
        Worker.check(text.defaults)
    except ValueError as e:
        raise ConfigError(f"the server cannot decode with these defaults: {e}") from e
    name = args.served_model_name or str(args.model)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({args.slots} slots, {args.strategy}, gen_length "
          f"{args.gen_length}, block_length {args.block_length})", flush=True)
    serve(text, model_name=name, host=args.host, port=args.port, slots=args.slots, max_queue=args.max_queue,
          plan=plan, drain_s=args.drain_s, log_level=args.log_level)
    return 0


def _text_model(args: argparse.Namespace, *, slots: int = 1):
    """A TextModel of ``--model`` (its tokenizer, or ``--tokenizer``) with the decoding flags as defaults."""
    from dultra_jax.decoding.flags import decode_flag_values
    from dultra_jax.text import TextModel

    plan = None
    if args.mesh:
        from dultra_jax.multihost import initialize_distributed
        from dultra_jax.parallel import ShardingPlan

        initialize_distributed()
        plan = ShardingPlan.create(args.mesh)
    try:
        text = TextModel.load(args.model, dtype=args.dtype, tokenizer=getattr(args, "tokenizer", None), slots=slots,
                              seed=args.seed, mesh=plan, **decode_flag_values(args))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return text, plan


def _cmd_score(args: argparse.Namespace) -> int:
    """Score completions produced elsewhere with the training rewards' extraction, verifier and sandbox."""
    from dultra_jax.data.tasks import DataError
    from dultra_jax.eval.score_file import score_completions

    out = Path(args.out or f"runs/score-{args.task}")
    try:
        summary = score_completions(
            args.task, args.completions_file, data_file=args.data_file, split=args.split, out_dir=out,
            math_mode=args.math_mode, workers=args.workers, code_timeout_s=args.timeout, overwrite=args.overwrite,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{summary['task']}: accuracy {summary['accuracy']:.4f} ({summary['n_correct']}/{summary['n']}) "
          f"{summary['counts']}; wrote {out / 'samples.jsonl'} and {out / 'summary.json'}")
    return 0


def _cmd_train(args: argparse.Namespace, mode: str | None = None) -> int:
    """Run (or resume) SFT, planner pre-training or GRPO from a YAML config; export the model at the end."""
    from dultra_jax.training.config import load_run_config
    from dultra_jax.training.trainer import Trainer, TrainingAborted, TrainingInterrupted

    overrides = list(args.overrides)
    if mode is not None:
        overrides.append(f"train.mode={mode}")
    if args.wandb:
        overrides.append("logging.wandb=true")
    cfg = load_run_config(args.config, overrides)
    if args.print_config:  # the resolved config (YAML + overrides + defaults), as a YAML the --config flag reads
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    trainer = Trainer(cfg, args.output_dir)
    try:
        last = trainer.run()
    except TrainingAborted as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    target = trainer.export()
    if trainer.primary:
        shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float) and not k.startswith("reward/")}
        print(f"finished {cfg.train.mode} at step {trainer.step}: {shown}")
        print(f"metrics: {trainer.metrics.path}  model: {target}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """Decode a task with the original's eval prompts, score it, write samples.jsonl + summary.json per run."""
    from dultra_jax.data.tasks import DataError
    from dultra_jax.decoding.flags import decode_flag_values
    from dultra_jax.eval import EvalSettings, format_table, run_eval
    from dultra_jax.multihost import initialize_distributed

    initialize_distributed()  # several processes (JAX_COORDINATOR_ADDRESS, ...) split the problems
    settings = EvalSettings.create(**decode_flag_values(args), batch_size=args.batch_size,
                                   pad_multiple=args.pad_multiple, batching=args.batching)
    out = Path(args.out or f"runs/eval-{args.task}")
    if args.wandb:
        from dultra_jax.wandb_sink import wandb_available

        if not wandb_available():  # fail before decoding, not after
            raise ConfigError("--wandb needs wandb: pip install 'dultra-jax[wandb]'")
    try:
        summaries = run_eval(args.model, args.task, settings, seeds=args.seeds, data_file=args.data_file,
                             split=args.split, limit=args.limit, out_dir=out, dtype=args.dtype,
                             factor_sweep=args.factor_sweep, factors=args.factors, workers=args.workers,
                             resume=args.resume, mesh=args.mesh, max_operand=args.max_operand,
                             overwrite=args.overwrite)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.wandb:
        from dultra_jax.wandb_sink import log_eval_summaries

        config = {k: v for k, v in vars(args).items() if k != "func"}
        log_eval_summaries(summaries, out, name=f"eval-{args.task}", config={**config, "model": str(args.model)})
    s0 = summaries[0]
    procs = f", {s0['processes']} processes" if s0.get("processes", 1) > 1 else ""
    print(f"{args.task}: {s0['n_problems']} problems x {len(s0['seeds'])} seed(s) on {s0['device']}{procs}"
          + (f" (resumed {s0['resumed_samples']} samples)" if s0.get("resumed_samples") else ""))
    print(format_table(summaries))
    print(f"wrote {out}" + (" (one directory per run, sweep.json)" if args.factor_sweep else
                            " (summary.json, samples.jsonl)"))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    """Accuracy against NFE, one labelled point per evaluation summary (PNG + SVG)."""
    from dultra_jax.eval.plot import load_points, plot_accuracy_vs_nfe

    require_directory_path(args.out)
    written = plot_accuracy_vs_nfe(load_points(args.summaries), args.out, title=args.title)
    print("wrote " + " and ".join(str(p) for p in written))
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    """lm-evaluation-harness's own CLI with the in-process ``dultra`` model registered (docs/lm-eval.md)."""
    from importlib.util import find_spec

    if find_spec("lm_eval") is None:
        raise ConfigError("dultra lm-eval needs lm-eval: pip install 'dultra-jax[lm-eval]'")
    from dultra_jax.lm_eval_model import main as lm_eval_main

    return lm_eval_main(args.lm_eval_args)


def _decode_flags(p: argparse.ArgumentParser) -> None:
    """Decoding defaults shared by generate and serve (a request may override them): DecodeConfig's flags plus
    the seed, the compute dtype and the mesh."""
    from dultra_jax.decoding.flags import add_decode_flags

    add_decode_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the planner's reveals and of sampling")
    p.add_argument("--dtype", default="bf16", help="compute dtype: bf16 | fp32")
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "data=1,fsdp=8,tensor=1" (default: one device)')


def build_parser() -> argparse.ArgumentParser:
    from dultra_jax.decoding.flags import add_decode_flags
    from dultra_jax.tasks import task_names

    parser = argparse.ArgumentParser(prog="dultra", description="dUltra in JAX: convert, decode, train, evaluate.")
    from dultra_jax import __version__

    parser.add_argument("--version", action="version", version=f"dultra {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert an original HF checkpoint to ours, or ours back to HF (--to-hf)")
    c.add_argument("src", help="HF checkpoint directory (config.json + safetensors), a converted directory, or a "
                   "hub id org/name[@revision]")
    c.add_argument("out", help="output directory (must not exist unless --overwrite)")
    c.add_argument("--to-hf", action="store_true", help="write the original's safetensors format instead")
    c.add_argument("--dtype", default=None, help="bf16|fp16|fp32 (default: keep the stored dtype)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint directory (never another directory, nor one containing SRC)")
    c.add_argument("--seed", type=int, default=0, help="seed for a fresh planner head (plain LLaDA input)")
    c.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size for --to-hf")
    c.set_defaults(func=_cmd_convert)

    g = sub.add_parser("generate", help="decode one prompt and report the answer, NFE, TPF and wall time")
    g.add_argument("--model", required=True, help=MODEL_HELP)
    g.add_argument("--prompt", help="user message (chat template of the checkpoint's tokenizer applied)")
    g.add_argument("--prompt-ids", help="prompt token ids, comma or space separated (no tokenizer needed)")
    _decode_flags(g)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--stream", action="store_true",
                   help="print each block as it is finalised (to stderr with --json)")
    g.set_defaults(func=_cmd_generate)

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)")
    v.add_argument("--model", required=True, help=MODEL_HELP)
    v.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's own)")
    v.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--slots", type=int, default=8, help="rows decoded at once per settings group")
    v.add_argument("--max-queue", type=int, default=256, help="prompts that may wait for a slot; more get 429")
    v.add_argument("--drain-s", type=float, default=30.0,
                   help="on SIGTERM: seconds in-flight requests may finish in before they are cancelled")
    _decode_flags(v)
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    v.set_defaults(func=_cmd_serve)

    s = sub.add_parser("score", help="score completions (JSONL: id or index + completion) against a task")
    s.add_argument("--task", required=True, choices=task_names("score"))
    s.add_argument("--completions-file", required=True, help="JSONL: {\"id\" or \"index\", \"completion\"} per line")
    s.add_argument("--data-file", default=None, help="local JSONL/parquet with the hub's columns (default: the hub)")
    s.add_argument("--split", default=None, help="hub split (default: the evaluation split)")
    s.add_argument("--out", default=None, help="output directory (default: runs/score-TASK)")
    s.add_argument("--math-mode", default="eval", choices=["eval", "faithful"], help="math equivalence rule")
    s.add_argument("--workers", type=int, default=None, help="parallel verifier/sandbox processes (default: cores)")
    s.add_argument("--timeout", type=float, default=None, help="seconds per program (code) or per APPS test")
    s.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    s.set_defaults(func=_cmd_score)

    e = sub.add_parser("eval", help="evaluate a checkpoint on a task: accuracy, NFE, TPF, throughput per run")
    e.add_argument("--model", required=True, help=MODEL_HELP + " (its tokenizer is used)")
    e.add_argument("--task", required=True, choices=task_names("eval"))
    e.add_argument("--data-file", default=None, help="local JSONL/parquet with the hub's columns (default: the hub)")
    e.add_argument("--split", default=None, help="hub split (default: the evaluation split)")
    add_decode_flags(e)
    e.add_argument("--limit", type=int, default=None, help="first N problems (synthetic task: its size, default 64)")
    e.add_argument("--batch-size", type=int, default=8,
                   help="rows decoded at once: the slots of continuous batching (results do not depend on it)")
    e.add_argument("--batching", choices=["continuous", "batched"], default="continuous",
                   help="continuous: refill a row as soon as its prompt is done (decoding.generate_many); batched: "
                        "sync batches of generate (what a --mesh run uses)")
    e.add_argument("--pad-multiple", type=int, default=64, help="pad prompt widths to this multiple (fewer compiles)")
    e.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full evaluation per seed")
    e.add_argument("--dtype", default="bf16", help="compute dtype: bf16 | fp32")
    e.add_argument("--factor-sweep", action="store_true",
                   help="run the factor baseline and the planner at each of --factors (one summary per run)")
    e.add_argument("--factors", type=float, nargs="+", default=[0.5, 0.8, 1.0, 1.2, 1.5])
    e.add_argument("--workers", type=int, default=None, help="parallel verifier/sandbox processes (default: cores)")
    e.add_argument("--out", default=None, help="output directory (default: runs/eval-TASK)")
    e.add_argument("--wandb", action="store_true", help=WANDB_HELP)
    e.add_argument("--max-operand", type=int, default=None,
                   help="synthetic-addition only: operands in [0, N] (default: the task.max_operand a trained "
                        "model recorded, else 20)")
    e.add_argument("--resume", action="store_true",
                   help="keep the (seed, problem) rows already in OUT/samples.jsonl and decode only the rest")
    e.add_argument("--overwrite", action="store_true",
                   help="replace the results already in --out (without it, and without --resume, they are refused)")
    e.add_argument("--mesh", default=None,
                   help='split each batch over this process\'s devices, e.g. "data=8" (default: one device)')
    e.set_defaults(func=_cmd_eval)

    le = sub.add_parser("lm-eval", add_help=False,
                        help="lm-eval-harness with the in-process `dultra` model: dultra lm-eval --model dultra "
                             "--model_args pretrained=PATH --tasks ... (every lm-eval option; -h for lm-eval's help)")
    le.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    le.set_defaults(func=_cmd_lm_eval)

    pl = sub.add_parser("plot", help="accuracy-vs-NFE chart (PNG + SVG) from evaluation summaries")
    pl.add_argument("--summaries", nargs="+", required=True, help="summary.json files and/or directories")
    pl.add_argument("--out", required=True, help="output directory")
    pl.add_argument("--title", default=None)
    pl.set_defaults(func=_cmd_plot)

    for name, mode, text in (("train", None, "GRPO (or the mode in the config)"),
                             ("sft", "sft", "masked-diffusion SFT"),
                             ("pretrain-planner", "planner", "planner pre-training (backbone frozen)")):
        t = sub.add_parser(name, help=f"{text} from a YAML config; resumes from the output dir's checkpoints")
        t.add_argument("--config", help="YAML under configs/ (e.g. configs/tiny_cpu.yaml)")
        t.add_argument("--output-dir", required=True, help="checkpoints, metrics.jsonl and the final model go here")
        t.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=6")
        t.add_argument("--wandb", action="store_true", help=WANDB_HELP + " (= logging.wandb=true)")
        t.add_argument("--print-config", action="store_true",
                       help="print the resolved config (file + overrides + defaults) as YAML and exit")
        t.set_defaults(func=lambda a, mode=mode: _cmd_train(a, mode))

    d = sub.add_parser("demo", help="the method end to end on the CPU (tens of minutes on 2 cores): SFT, planner "
                                    "pre-training, GRPO")
    d.add_argument("--out", default="runs/demo", help="output directory (stages, metrics, summary.json, plot)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", default="full", choices=["full", "small"], help="small: the test suite's reduced run")
    d.set_defaults(func=_cmd_demo)

    i = sub.add_parser("inspect", help="convert the embedded tiny checkpoint and show what the model computes")
    i.add_argument("--out", default="runs/inspect", help="output directory")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--prompt-len", type=int, default=12)
    i.add_argument("--gen-len", type=int, default=8)
    i.set_defaults(func=_cmd_inspect)
    return parser


def _non_utf8_argument(argv: list[str]) -> str | None:
    """The first argument that is not valid UTF-8 (the OS hands those over with surrogate escapes)."""
    for a in argv:
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            return a.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return None


# Errors raised with a message written for the user (the modules are imported lazily, so matched by name).
OUR_ERRORS = ("DataError", "EvalError", "MeshError", "MissingAxesError", "RewardConfigError", "ShardingRuleError",
              "TrainingAborted")


def _one_line(e: BaseException) -> str:
    """An error as the one line a user sees: what is wrong (and, where we know it, how to fix it)."""
    if isinstance(e, (CheckpointError, ConfigError)) or type(e).__name__ in OUR_ERRORS:
        return f"error: {e}"
    if isinstance(e, UnicodeDecodeError):
        return (f"error: input is not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8 "
                "(run with --debug to see which read failed)")
    if isinstance(e, (IsADirectoryError, NotADirectoryError, FileExistsError, FileNotFoundError, PermissionError)):
        name = e.filename if e.filename is not None else ""
        return f"error: {name}: {e.strerror}; check the path (a file where a directory is needed, or vice versa)"
    if isinstance(e, OSError):
        return f"error: {e.filename or ''}: {e.strerror or e}"
    return (f"error: internal error {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback, and report it)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # transformers' advice ("PyTorch was not found", "a model of type llada ...") does not apply to a tokenizer-only
    # use; errors still show. Set TRANSFORMERS_VERBOSITY to see its warnings.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    bad = _non_utf8_argument(argv)
    if bad is not None:
        print(f"error: argument {bad!r} is not valid UTF-8; pass text in UTF-8 (check the terminal's locale)",
              file=sys.stderr)
        return 2
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's (argparse cannot pass options through)
        args = argparse.Namespace(func=_cmd_lm_eval, lm_eval_args=argv[1:], command="lm-eval", debug=False)
    else:
        args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        where = getattr(args, "out", None) or getattr(args, "output_dir", None)
        kept = f"; what was written to {where} is kept" if where else ""
        resume = " (continue with --resume)" if args.command == "eval" else ""
        print(f"interrupted{kept}{resume}", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(_one_line(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
