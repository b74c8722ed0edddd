"""NFE and tokens-per-forward distributions per strategy and block length on a task.

    python benchmarks/tokens_per_forward.py --model runs/demo/model                     # synthetic task
    python benchmarks/tokens_per_forward.py --model cpu --gen-len 64 --blocks 16,32     # random weights, CPU
    python benchmarks/tokens_per_forward.py --model /ckpt/dUltra-math --task gsm8k --data-file test.jsonl
    PYTHONPATH=. python3 benchmarks/tokens_per_forward.py --model llada-8b --blocks 32,128 --batch-size 8

``--model``: a checkpoint directory (its tokenizer for real tasks), or ``llada-8b | tiny | cpu`` for random
weights of that shape. Default task: the built-in synthetic addition task (char tokenizer, nothing
downloaded); ``--task gsm8k|math500|humaneval|mbpp`` with ``--data-file`` uses the evaluation's prompts.

Per (block length, strategy): the distribution over problems (mean, p50, p90, min, max) of the NFE and of the
per-sample TPF (effective tokens / NFE), the aggregate TPF as the original reports it (mean effective tokens /
mean NFE; effective = generated ids other than end-of-text, pad, MASK, <|eot_id|>), and for the synthetic task the
accuracy. Decoding goes through the evaluation harness (batched, padding-correct). Table + JSON in
benchmarks/results/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
from _common import RANDOM_MODELS, RESULTS, commit, device_name, model_config, random_model, write_json

from dultra_jax import accounting
from dultra_jax.checkpoints.hf import parse_dtype
from dultra_jax.data import synthetic
from dultra_jax.eval import metrics
from dultra_jax.eval.harness import (
    EvalSettings,
    completion_text,
    decode_prompts,
    encode_prompts,
    load_examples,
    load_tokenizer,
    score,
)
from dultra_jax.tasks import get_task, task_names
from dultra_jax.text import TextCodec

# name -> settings overrides (the planner's two decision rules are separate rows)
STRATEGIES = {
    "planner": dict(strategy="planner", reveal="bernoulli"),
    "planner-topk": dict(strategy="planner", reveal="topk"),
    "threshold": dict(strategy="threshold"),
    "factor": dict(strategy="factor"),
    "fixed": dict(strategy="fixed"),
}


def _model_and_tokenizer(args, dtype, max_len: int):
    if args.model in RANDOM_MODELS and not Path(args.model).is_dir():
        overrides = {}
        cfg = model_config(args.model)
        if cfg.max_sequence_length < max_len:
            overrides["max_sequence_length"] = max_len
        task = get_task(args.task)
        if args.model == "tiny":
            overrides.update(task.model_overrides)
        model = random_model(model_config(args.model, **overrides), dtype)
        if task.build_tokenizer is not None:
            tok = task.build_tokenizer()
        elif args.tokenizer:
            tok = load_tokenizer(args.tokenizer, args.task)
        else:
            raise SystemExit(f"--model {args.model} (random weights) with --task {args.task} needs --tokenizer DIR")
        return model, tok
    import dultra_jax

    model = dultra_jax.load(args.model, dtype=dtype)
    return model, load_tokenizer(args.tokenizer or args.model, args.task)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help=f"checkpoint directory, or {list(RANDOM_MODELS)} (random)")
    ap.add_argument("--task", default=synthetic.TASK_NAME, choices=task_names("eval"))
    ap.add_argument("--data-file", default=None, help="local file with the hub's columns (real tasks)")
    ap.add_argument("--score-code", action="store_true", help="run code tasks' programs in the sandbox for accuracy")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    ap.add_argument("--limit", type=int, default=32, help="problems (the synthetic task's size)")
    ap.add_argument("--strategies", default="planner,planner-topk,threshold,factor", help=f"of {list(STRATEGIES)}")
    ap.add_argument("--blocks", default="32,128", help="block lengths, comma-separated")
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--factor", type=float, default=1.0)
    ap.add_argument("--cache", default="none", choices=["none", "prefix", "dual"])
    ap.add_argument("--dtype", default=None, help="default fp32 on CPU, bf16 on GPU")
    ap.add_argument("--max-iterations", type=int, default=None, help="cap the decoding loop")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/tpf_<model>_<task>_<backend>)")
    args = ap.parse_args(argv)

    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise SystemExit(f"--strategies: unknown {unknown}; choose from {list(STRATEGIES)}")
    try:
        blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--blocks must be comma-separated integers, got {args.blocks!r}") from None
    dtype = parse_dtype(args.dtype or ("bf16" if jax.default_backend() == "gpu" else "fp32"))
    examples = load_examples(args.task, data_file=args.data_file, limit=args.limit)
    settings = [(name, bl, EvalSettings.create(**STRATEGIES[name], gen_length=args.gen_len, block_length=bl,
                                        threshold=args.threshold, factor=args.factor, cache=args.cache,
                                        batch_size=args.batch_size))
                for bl in blocks for name in names]  # validated before the model is built
    model, tok = _model_and_tokenizer(args, dtype, 4096)
    cfg = model.cfg
    codec = TextCodec(tok)  # prompts and answers as the server and the harness encode them
    texts, prompts = encode_prompts(codec, examples)
    tok_eos = tok.convert_tokens_to_ids(tok.eos_token) if tok.eos_token else None
    # the tokenizer's <|eot_id|> counts as end-of-text only when the tokenizer is the model's own
    exclude = accounting.model_excluded_ids(cfg, tok if tok_eos == cfg.eos_token_id else None)
    rows = []
    for name, bl, s in settings:
        run = decode_prompts(model, prompts, s, seed=args.seed, row_seeds=[e.index for e in examples],
                             exclude=exclude, max_iterations=args.max_iterations, progress=True,
                             desc=f"{name} b{bl}")
        nfe = [x["nfe"] for x in run.samples]
        eff = [x["effective_tokens"] for x in run.samples]
        row = {"strategy": name, "block": bl, "settings": s.to_dict(), "n": len(nfe),
               "nfe": metrics.distribution(nfe),
               "tpf_per_sample": metrics.distribution(e / n for e, n in zip(eff, nfe, strict=True) if n > 0),
               "tpf": accounting.tpf(eff, nfe), "mean_effective_tokens": float(np.mean(eff)),
               "mean_masks_left": float(np.mean([x["masks_left"] for x in run.samples])),
               "decode_time_s": round(sum(b["time_s"] for b in run.batches), 4)}
        if get_task(args.task).kind != "code" or args.score_code:  # the task's own definition of correct
            completions = [completion_text(codec, x["ids"]) for x in run.samples]
            row["accuracy"] = float(np.mean([v["correct"] for v in score(args.task, examples, completions)]))
        rows.append(row)
    result = {
        "benchmark": "tokens_per_forward", "device": device_name(), "jax": jax.__version__, "commit": commit(),
        "model": args.model, "task": args.task, "data": args.data_file, "n_problems": len(examples),
        "gen_len": args.gen_len, "blocks": blocks, "batch_size": args.batch_size, "seed": args.seed,
        "dtype": str(np.dtype(dtype)), "excluded_ids": exclude,
        "prompt_length_mean": float(np.mean([len(p) for p in prompts])), "rows": rows,
    }
    print(f"{result['device']}  model {args.model}  task {args.task} ({len(examples)} problems)  G={args.gen_len}  "
          f"commit {result['commit']}")
    print(f"{'strategy':>13} {'block':>5} | {'NFE mean':>8} {'p50':>6} {'p90':>6} {'min':>5} {'max':>5} | "
          f"{'TPF':>5} {'p50':>6} {'p90':>6} {'min':>5} {'max':>5} | {'acc':>5}")
    for r in rows:
        d, t = r["nfe"], r["tpf_per_sample"]
        acc = f"{r['accuracy']:5.2f}" if "accuracy" in r else f"{'-':>5}"
        print(f"{r['strategy']:>13} {r['block']:>5} | {d['mean']:8.2f} {d['p50']:6.1f} {d['p90']:6.1f} "
              f"{d['min']:5.0f} {d['max']:5.0f} | {r['tpf']:5.2f} {t['p50']:6.2f} {t['p90']:6.2f} {t['min']:5.2f} "
              f"{t['max']:5.2f} | {acc}")
    tag = Path(args.model).name if Path(args.model).is_dir() else args.model
    out = Path(args.out) if args.out else RESULTS / f"tpf_{tag}_{args.task}_{jax.default_backend()}.json"
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
