"""How much do the approximate KV caches change what a trained model decodes? (the caching issue's quality check)

    python benchmarks/cache_agreement.py --model runs/demo/grpo/model [--num 256]
    python benchmarks/cache_agreement.py --model cpu --num 16 --gen-length 128 --block-length 32 \
        --out benchmarks/results/cache_agreement_cpu.json

On the demo's trained tiny model and the built-in addition task (held-out problems): for each strategy and
cache setting (none, prefix, dual, and each cached mode with every cheaper refresh policy), accuracy, token
agreement of the generated region with exact decoding (and, for a cheaper refresh, with the same cache refreshed
in full), NFE, FLOP-equivalent full forwards and the median wall
time of the whole batch. ``--model cpu`` uses the decoding benchmark's random-weight CPU config and random
prompts instead (agreement, NFE and time only: no accuracy). Table + JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

import dultra_jax
from dultra_jax.data import render_chat, synthetic
from dultra_jax.decoding import generate

RESULTS = Path(__file__).parent / "results"
STRATEGIES = {"planner": dict(strategy="planner"), "threshold": dict(strategy="threshold", threshold=0.9),
              "factor": dict(strategy="factor", factor=1.0)}


# (cache, refresh policy): the exact reference first
SETTINGS = (("none", "full"), ("prefix", "full"), ("dual", "full"), ("prefix", "suffix"), ("dual", "suffix"))


def _timed(fn, repeats: int):
    """(last result, median wall seconds over ``repeats`` runs after one compile run)."""
    res = fn()
    jax.block_until_ready(res.tokens)
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        jax.block_until_ready(res.tokens)
        walls.append(time.perf_counter() - t0)
    return res, float(np.median(walls))


def addition_inputs(examples) -> tuple[list[list[int]], object]:
    """(prompt ids, ``score(generated ids) -> accuracy``) of the built-in addition task's ``examples``, as the demo's
    trained model reads them (the char tokenizer, chat template)."""
    tok = synthetic.build_tokenizer()
    prompts = [tok(render_chat(tok, list(e.messages)), add_special_tokens=False)["input_ids"] for e in examples]

    def score(gen):
        texts = tok.batch_decode([r[r < len(tok)] for r in gen], skip_special_tokens=True)
        return float(np.mean(synthetic.exact_answer(texts, examples)))

    return prompts, score


def measure(model, prompts, gen_length: int, block_length: int, score=None, repeats: int = 3,
            strategies=tuple(STRATEGIES)) -> list[dict]:
    """Rows per strategy x setting; ``score(generated ids) -> accuracy`` (None: no accuracy)."""
    rows = []
    for name in strategies:
        kw = STRATEGIES[name]
        exact, full = None, {}
        for cache, refresh in SETTINGS:
            call = dict(gen_length=gen_length, block_length=block_length, rng=0, cache=cache, refresh=refresh, **kw)
            res, wall = _timed(lambda call=call: generate(model, prompts, **call), repeats)
            gen = np.asarray(res.generated)
            acc = score(gen) if score is not None else None
            if cache == "none":
                exact = (gen, acc, wall)
            if refresh == "full":
                full[cache] = gen
            rows.append({"strategy": name, "cache": cache, "refresh": refresh, "accuracy": acc,
                         "accuracy_change": None if acc is None else acc - exact[1],
                         "token_agreement": float(np.mean(gen == exact[0])),
                         # a cheaper refresh against the same cache refreshed in full (the approximation it adds)
                         "agreement_with_full_refresh": (None if refresh == "full"
                                                         else float(np.mean(gen == full[cache]))),
                         "nfe": float(np.mean(np.asarray(res.nfe))),
                         "equivalent_forwards": float(np.mean(np.asarray(res.equivalent_forwards))),
                         "wall_s": wall, "speedup_vs_exact": exact[2] / wall})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="a trained demo model (e.g. runs/demo/grpo/model), or cpu: random weights, random prompts")
    ap.add_argument("--prompt-length", type=int, default=64, help="--model cpu: prompt tokens")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, of {list(STRATEGIES)}")
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--max-operand", type=int, default=20)
    ap.add_argument("--gen-length", type=int, default=16)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS / "cache_agreement.json"))
    ap.add_argument("--summary", default=None,
                    help="the demo's summary.json (default: beside the model's run, e.g. runs/demo/summary.json): "
                         "its baseline sweeps are drawn with these points in <out>.png")
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    if args.model == "cpu":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from benchmarks._common import model_config, random_model, random_prompts

        cfg = model_config("cpu")
        model = random_model(cfg, jax.numpy.float32)
        prompts, score = random_prompts(cfg, args.num, args.prompt_length), None
    else:
        model = dultra_jax.load(args.model, dtype="fp32")
        examples = synthetic.addition_examples(args.num, seed=1, max_operand=args.max_operand)
        prompts, score = addition_inputs(examples)

    strategies = [s for s in args.strategies.split(",") if s]
    if unknown := [s for s in strategies if s not in STRATEGIES]:
        raise SystemExit(f"unknown strategies {unknown}: choose from {list(STRATEGIES)}")
    rows = measure(model, prompts, args.gen_length, args.block_length, score, args.repeats, strategies)
    pct = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    print(f"{'strategy':>10} {'cache':>7} {'refresh':>7} {'accuracy':>9} {'vs exact':>9} {'agreement':>10} "
          f"{'vs full':>8} {'NFE':>6} {'eq.fwd':>7} {'wall s':>7} {'speedup':>7}")
    for r in rows:
        print(f"{r['strategy']:>10} {r['cache']:>7} {r['refresh']:>7} {pct(r['accuracy'], '9.1%'):>9} "
              f"{pct(r['accuracy_change'], '+9.1%'):>9} {r['token_agreement']:10.1%} "
              f"{pct(r['agreement_with_full_refresh'], '8.1%'):>8} {r['nfe']:6.2f} "
              f"{r['equivalent_forwards']:7.2f} {r['wall_s']:7.3f} {r['speedup_vs_exact']:7.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    from dultra_jax.eval.env import git_commit

    tmp.write_text(json.dumps({"benchmark": "cache_agreement", "model": args.model, "num": args.num,
                               "commit": git_commit(),
                               "gen_length": args.gen_length, "block_length": args.block_length,
                               "machine": {"platform": platform.platform(), "jax": jax.__version__,
                                           "cpus": os.cpu_count(),
                                           "load_average_at_start": round(load_at_start, 2)},
                               "rows": rows},
                              indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    if args.model != "cpu":
        summary = Path(args.summary) if args.summary else Path(args.model).parent.parent / "summary.json"
        png = plot(rows, summary if summary.is_file() else None, out.with_suffix(".png"))
        if png:
            print(f"wrote {png}")


def plot(rows: list[dict], summary: Path | None, png: Path) -> Path | None:
    """Accuracy against FLOP-equivalent full forwards: each strategy's cache settings next to the demo's baseline
    sweeps (no cache: one forward per NFE), the demo's trade-off plot with the caches' points added."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    if summary is not None:
        sweep = json.loads(summary.read_text()).get("sweep", [])
        for strategy in ("threshold", "factor"):
            pts = sorted((r["nfe"], r["accuracy"]) for r in sweep if r["strategy"] == strategy)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", alpha=0.5, label=f"{strategy} sweep (no cache)")
    markers = {("none", "full"): "o", ("prefix", "full"): "s", ("dual", "full"): "D", ("prefix", "suffix"): "v",
               ("dual", "suffix"): "^"}
    for i, name in enumerate(dict.fromkeys(r["strategy"] for r in rows)):
        for r in (r for r in rows if r["strategy"] == name):
            label = f"{name}: {r['cache']}" + ("" if r["refresh"] == "full" else f" ({r['refresh']} refresh)")
            ax.scatter(r["equivalent_forwards"], r["accuracy"], marker=markers[(r["cache"], r["refresh"])],
                       color=f"C{i + 2}", label=label)
    ax.set_xlabel("FLOP-equivalent full forwards per problem")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("KV caches and refresh policies on the demo's model")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return png


if __name__ == "__main__":
    main()
