"""How much do the approximate KV caches change what a trained model decodes? (the caching issue's quality check)

    python benchmarks/cache_agreement.py --model runs/demo/grpo/model [--num 256]

On the demo's trained tiny model and the built-in addition task (held-out problems): for each strategy and
cache mode, accuracy, token agreement of the generated region with exact decoding, NFE and FLOP-equivalent
full forwards. Table + JSON in benchmarks/results/cache_agreement.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import dultra_jax
from dultra_jax.data import render_chat, synthetic
from dultra_jax.decoding import generate

RESULTS = Path(__file__).parent / "results"
STRATEGIES = {"planner": dict(strategy="planner"), "threshold": dict(strategy="threshold", threshold=0.9),
              "factor": dict(strategy="factor", factor=1.0)}


def measure(model, tok, examples, gen_length: int, block_length: int) -> list[dict]:
    prompts = [tok(render_chat(tok, list(e.messages)), add_special_tokens=False)["input_ids"] for e in examples]
    rows = []
    for name, kw in STRATEGIES.items():
        exact = None
        for cache in ("none", "prefix", "dual"):
            res = generate(model, prompts, gen_length=gen_length, block_length=block_length, rng=0, cache=cache, **kw)
            gen = np.asarray(res.generated)
            texts = tok.batch_decode([r[r < len(tok)] for r in gen], skip_special_tokens=True)
            acc = float(np.mean(synthetic.exact_answer(texts, examples)))
            if cache == "none":
                exact = (gen, acc)
            rows.append({"strategy": name, "cache": cache, "accuracy": acc,
                         "accuracy_change": acc - exact[1], "token_agreement": float(np.mean(gen == exact[0])),
                         "nfe": float(np.mean(np.asarray(res.nfe))),
                         "equivalent_forwards": float(np.mean(np.asarray(res.equivalent_forwards)))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained demo model (e.g. runs/demo/grpo/model)")
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--max-operand", type=int, default=20)
    ap.add_argument("--gen-length", type=int, default=16)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS / "cache_agreement.json"))
    args = ap.parse_args()
    model = dultra_jax.load(args.model, dtype="fp32")
    tok = synthetic.build_tokenizer()
    examples = synthetic.addition_examples(args.num, seed=1, max_operand=args.max_operand)
    rows = measure(model, tok, examples, args.gen_length, args.block_length)
    print(f"{'strategy':>10} {'cache':>7} {'accuracy':>9} {'vs exact':>9} {'agreement':>10} {'NFE':>6} {'eq.fwd':>7}")
    for r in rows:
        print(f"{r['strategy']:>10} {r['cache']:>7} {r['accuracy']:9.1%} {r['accuracy_change']:+9.1%} "
              f"{r['token_agreement']:10.1%} {r['nfe']:6.2f} {r['equivalent_forwards']:7.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": "cache_agreement", "model": args.model, "num": args.num,
                               "gen_length": args.gen_length, "block_length": args.block_length, "rows": rows},
                              indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
