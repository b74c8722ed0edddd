"""The original's planner decoder in PyTorch: the baseline our speed is measured against (benchmark only).

Written from docs/original.md (§1 architecture, §3 decoding), not copied: LLaDA's bidirectional blocks
(RMSNorm, rotate-half RoPE, SDPA without a mask, SiLU-gated MLP), the AdaLN planner head over the whole
canvas, and the original's per-iteration work, which is what makes it slow: a full forward with logits at
every position [B, L, V], the head over every position, Bernoulli ("training") or top-floor(sum p)
("inference") reveals, at least one per row, rows in lock step within a block. fp32 on the CPU, as the
original's parity runs.

Before it is timed it must reproduce the original's golden outputs (tests/fixtures/lladou-tiny): forward
logits, planner logits, the deterministic decode and the recorded Bernoulli rollout. Run it in an
environment that has torch (never a dependency of the package):

    python benchmarks/original_torch.py --check-golden tests/fixtures/lladou-tiny
    python benchmarks/original_torch.py --worker        # JSON commands on stdin (original_side_by_side.py)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file


class OriginalModel:
    """LLaDA backbone + planner head on plain tensors in the original's layout ([out, in] Linear weights)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.cfg = json.loads((directory / "config.json").read_text())
        files = sorted(directory.glob("*.safetensors"))
        raw: dict[str, np.ndarray] = {}
        for f in files:
            raw.update(load_file(str(f)))
        self.w = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in raw.items()}
        c = self.cfg
        self.d = c["d_model"]
        self.n_heads = c["n_heads"]
        self.head_dim = self.d // self.n_heads
        self.eps = c.get("rms_norm_eps", 1e-5)
        self.mask_id = c["mask_token_id"]
        self.n_layers = c["n_layers"]
        self.n_head_layers = c.get("num_head_layers", 1)
        half = self.head_dim // 2
        self.inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(half, dtype=torch.float32) * 2 / self.head_dim))
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------- pieces
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        r = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * r.to(x.dtype)

    def _cos_sin(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if length not in self._rope:
            theta = torch.outer(torch.arange(length, dtype=torch.float32), self.inv_freq)
            theta = torch.cat([theta, theta], dim=-1)  # [L, h]: pairs (d, d + h/2)
            self._rope[length] = (theta.cos(), theta.sin())
        return self._rope[length]

    @staticmethod
    def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = t.shape[-1] // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        return t * cos + rotated * sin

    def _block(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w = self.w
        b, length, _ = x.shape
        a = self._rms(x, w[prefix + "attn_norm.weight"])
        heads = lambda t: t.view(b, length, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q = heads(F.linear(a, w[prefix + "q_proj.weight"]))
        k = heads(F.linear(a, w[prefix + "k_proj.weight"]))
        v = heads(F.linear(a, w[prefix + "v_proj.weight"]))
        cos, sin = self._cos_sin(length)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False)  # bidirectional
        x = x + F.linear(att.transpose(1, 2).reshape(b, length, self.d), w[prefix + "attn_out.weight"])
        m = self._rms(x, w[prefix + "ff_norm.weight"])
        gate = F.silu(F.linear(m, w[prefix + "ff_proj.weight"]))  # ff_proj is the gate
        return x + F.linear(gate * F.linear(m, w[prefix + "up_proj.weight"]), w[prefix + "ff_out.weight"])

    # ---------------------------------------------------------------------------------- forwards
    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, L, V], post-final-norm hidden states [B, L, D]) of the whole canvas."""
        x = self.w["model.transformer.wte.weight"][ids]
        for i in range(self.n_layers):
            x = self._block(x, f"model.transformer.blocks.{i}.")
        h = self._rms(x, self.w["model.transformer.ln_f.weight"])
        return F.linear(h, self.w["model.transformer.ff_out.weight"]), h

    def planner_logits(self, h: torch.Tensor, t: torch.Tensor, mask_index: torch.Tensor) -> torch.Tensor:
        """The head's per-position logit [B, L] (fp32) from hidden states, timestep [B], candidates [B, L]."""
        w = self.w
        half = 128
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freq[None]
        phi = torch.cat([angles.cos(), angles.sin()], dim=-1)  # cos first
        temb = F.linear(F.silu(F.linear(phi, w["time_embedding.mlp.0.weight"], w["time_embedding.mlp.0.bias"])),
                        w["time_embedding.mlp.2.weight"], w["time_embedding.mlp.2.bias"])[:, None]
        if self.cfg.get("use_mask_embeddings", True):
            temb = temb + w["mask_embedding.weight"][mask_index.long()]

        def adaln(x, name):
            scale, shift = F.linear(temb, w[name + ".modulation.weight"], w[name + ".modulation.bias"]).chunk(2, -1)
            return F.layer_norm(x, (x.shape[-1],), eps=1e-4) * (1 + scale) + shift

        f = adaln(h, "norm_out_1")
        for i in range(self.n_head_layers):
            f = self._block(f, f"mask_head.{i}.")
        f = adaln(f, "norm_out_2")
        return F.linear(f, w["mask_linear.weight"], w["mask_linear.bias"]).squeeze(-1).float()


@torch.no_grad()
def decode(model: OriginalModel, prompt: np.ndarray, gen_length: int, block_length: int, *,
           mode: str = "training", uniforms: np.ndarray | None = None, seed: int = 0) -> dict:
    """The original's planner decoding at temperature 0 (its evaluation setting), factor 1.

    ``uniforms`` [S, B, L] replaces the Bernoulli draws (``torch.rand`` otherwise), so two implementations can
    make the same decisions. Returns the canvas, the iteration count and the per-iteration reveal masks.
    """
    torch.manual_seed(seed)
    b, p = prompt.shape
    length = p + gen_length
    mask_id = model.mask_id
    x = torch.full((b, length), mask_id, dtype=torch.long)
    x[:, :p] = torch.from_numpy(np.asarray(prompt, np.int64))
    reveals, steps = [], 0
    for block in range(gen_length // block_length):
        block_end = p + (block + 1) * block_length
        num_masks = block_length * b
        while num_masks > 0:
            logits, h = model.forward(x)
            logits[:, :, mask_id] = -torch.inf
            x0 = logits.argmax(-1)
            mask_index = x == mask_id
            mask_index[:, block_end:] = False
            t = 1.0 - (x == mask_id).sum(-1).float() / length
            prob = torch.sigmoid(model.planner_logits(h, t, mask_index)) * mask_index
            if mode == "training":
                recorded = uniforms is not None and steps < len(uniforms)  # past the record: fresh draws
                u = torch.from_numpy(uniforms[steps]) if recorded else torch.rand(b, length)
                reveal = (u < prob) & mask_index
            else:
                k = prob.sum(-1).floor().long()
                order = prob.argsort(dim=-1, descending=True, stable=True)
                rank = torch.empty_like(order).scatter_(1, order, torch.arange(length).expand(b, length))
                reveal = rank < k[:, None]
            for r in range(b):  # at least one reveal per row that still has a candidate
                if not reveal[r].any() and mask_index[r].any():
                    col = int(prob[r].argmax()) if prob[r].max() > 0 else int(mask_index[r].nonzero()[0])
                    reveal[r, col] = True
            x[reveal] = x0[reveal]
            num_masks -= int(reveal.sum())
            reveals.append(reveal.numpy().copy())
            steps += 1
    return {"tokens": x.numpy(), "steps": steps, "reveal": np.stack(reveals)}


def check_golden(fixture: str | Path) -> dict:
    """Compare this port with the original's recorded outputs; every check must pass before timing."""
    fixture = Path(fixture)
    g = np.load(fixture / "golden.npz")
    model = OriginalModel(fixture)
    checks = {}
    with torch.no_grad():
        logits, h = model.forward(torch.from_numpy(g["fwd_input_ids"]))
        checks["forward_logits_max_abs_err"] = float((logits - torch.from_numpy(g["fwd_logits"])).abs().max())
        checks["hidden_max_abs_err"] = float((h - torch.from_numpy(g["fwd_last_hidden"])).abs().max())
        plan = model.planner_logits(torch.from_numpy(g["plan_hidden"]), torch.from_numpy(g["plan_timestep"]),
                                    torch.from_numpy(g["plan_mask_index"]))
        checks["planner_logits_max_abs_err"] = float((plan - torch.from_numpy(g["plan_logits"])).abs().max())
    gen, bl = int(g["dec_gen_length"]), int(g["dec_block_length"])
    topk = decode(model, g["dec_prompt"], gen, bl, mode="inference")
    checks["topk_tokens_equal"] = bool(np.array_equal(topk["tokens"], g["dec_x"]))
    checks["topk_steps_equal"] = topk["steps"] == int(g["dec_num_steps"])
    checks["topk_reveals_equal"] = bool(np.array_equal(topk["reveal"], g["dec_reveal"]))
    roll = decode(model, g["dec_prompt"], gen, bl, mode="training", uniforms=g["roll_uniforms"])
    checks["rollout_tokens_equal"] = bool(np.array_equal(roll["tokens"], g["roll_x"]))
    checks["rollout_steps_equal"] = roll["steps"] == int(g["roll_num_steps"])
    checks["rollout_reveals_equal"] = bool(np.array_equal(roll["reveal"], g["roll_reveal"]))
    ok = all(v for k, v in checks.items() if isinstance(v, bool)) and all(
        v <= 1e-4 for k, v in checks.items() if k.endswith("_err"))
    return {"ok": ok, "checks": checks}


def worker() -> None:
    """Serve JSON commands on stdin, one reply line each: load, golden, decode (timed), quit."""
    model = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "golden":
            reply = check_golden(cmd["fixture"])
        elif op == "load":
            model = OriginalModel(cmd["dir"])
            reply = {"ok": True, "threads": torch.get_num_threads(), "torch": torch.__version__}
        elif op == "decode":
            prompts = np.load(cmd["prompts"])
            uniforms = np.load(cmd["uniforms"]) if cmd.get("uniforms") else None
            t0 = time.perf_counter()
            out = decode(model, prompts, cmd["gen_length"], cmd["block_length"], mode=cmd.get("mode", "training"),
                         uniforms=uniforms)
            wall = time.perf_counter() - t0
            np.save(cmd["out"], out["tokens"])
            reply = {"ok": True, "wall_s": wall, "iterations": out["steps"]}
        else:
            reply = {"ok": False, "error": f"unknown op {op!r}"}
        print(json.dumps(reply), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-golden", metavar="FIXTURE_DIR", help="compare with the original's golden outputs")
    ap.add_argument("--worker", action="store_true", help="serve JSON commands on stdin")
    args = ap.parse_args()
    if args.worker:
        worker()
    elif args.check_golden:
        if not (Path(args.check_golden) / "golden.npz").is_file():
            sys.exit(f"{args.check_golden}: no golden.npz there; pass the fixture directory "
                     "(tests/fixtures/lladou-tiny)")
        result = check_golden(args.check_golden)
        print(json.dumps(result, indent=2))
        sys.exit(0 if result["ok"] else 1)
    else:
        ap.print_help()


if __name__ == "__main__":
    main()
