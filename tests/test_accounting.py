"""One accounting (effective tokens, NFE, TPF) and a package graph without cycles."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dultra_jax import accounting
from dultra_jax.data import synthetic

PKG = Path(__file__).parents[1] / "dultra_jax"


def test_effective_tokens_exclude_eos_pad_eot_and_mask():
    tok = synthetic.build_tokenizer()
    cfg = type("Cfg", (), {"eos_token_id": synthetic.EOS_ID, "pad_token_id": synthetic.EOS_ID,
                           "mask_token_id": synthetic.MASK_ID})()
    ex = accounting.model_excluded_ids(cfg, tok)
    assert ex == sorted({synthetic.EOT_ID, synthetic.EOS_ID, synthetic.MASK_ID})
    gen = np.array([[49, 50, synthetic.EOT_ID, synthetic.EOS_ID, synthetic.EOS_ID],
                    [synthetic.MASK_ID, 51, 52, 53, 54]])
    assert accounting.effective_tokens(gen, ex).tolist() == [2, 4]


def test_leftover_masks_are_not_effective_tokens():
    """Iteration cap hit: the undecoded MASKs count neither with the full list nor with one lacking the mask."""
    mask, eos = 7, 3
    gen = np.array([[10, 11, mask, mask], [12, eos, eos, eos], [mask, mask, mask, mask]])
    for exclude in ([eos], [eos, mask]):  # account() adds the mask id whatever the caller passes
        acc = accounting.account(gen, [2, 1, 2], exclude, mask)
        assert acc.effective_tokens.tolist() == [2, 1, 0]
        assert acc.masks_left.tolist() == [2, 0, 4]
        assert acc.nfe.tolist() == [2, 1, 2]
        assert acc.mean_nfe == pytest.approx(5 / 3)
        assert acc.tpf == pytest.approx((3 / 3) / (5 / 3))  # ratio of means, not mean of ratios


def test_tpf_is_a_ratio_of_means_and_zero_without_forwards():
    assert accounting.tpf([4, 0], [1, 3]) == pytest.approx(2 / 2)
    assert accounting.tpf([], []) == 0.0 and accounting.tpf([3], [0]) == 0.0
    with pytest.raises(ValueError, match="rows"):
        accounting.account(np.zeros((2, 3), int), [1], [], 0)


def test_accounting_matches_a_real_decode_at_the_iteration_cap(tiny_model):
    """A decode stopped early leaves MASKs; the CLI, eval and trainer all count them through account()."""
    from dultra_jax.decoding import generate

    cfg = tiny_model.cfg
    # one reveal per iteration, stopped after two: six positions never decoded
    res = generate(tiny_model, [[5, 6, 7, 8]], gen_length=8, block_length=8, strategy="fixed", steps=8,
                   exclude_mask=True, rng=0, max_iterations=2)
    gen = np.asarray(res.generated)
    acc = accounting.account(gen, res.nfe, accounting.model_excluded_ids(cfg), cfg.mask_token_id)
    masks = int((gen == cfg.mask_token_id).sum())
    assert masks == 6 and acc.masks_left.tolist() == [masks]
    others = int(np.isin(gen, [i for i in (cfg.eos_token_id, cfg.pad_token_id) if i is not None]).sum())
    assert acc.effective_tokens.tolist() == [8 - masks - others]
    assert acc.nfe.tolist() == [2] and acc.tpf == pytest.approx((8 - masks - others) / 2)


# ------------------------------------------------------------------------------------------- package graph
def _subpackage_graph() -> dict[str, set[str]]:
    """Edges between the top-level units of dultra_jax (subpackages and top-level modules), from every import
    statement, lazy ones included."""
    units = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    graph: dict[str, set[str]] = {u: set() for u in units}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).parts
        src = rel[0].removesuffix(".py") if rel[0] != "__init__.py" else None
        for node in ast.walk(ast.parse(f.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = ([f"{node.module}.{a.name}" for a in node.names] if node.module == "dultra_jax"
                           else [node.module])
            for t in targets:
                parts = t.split(".")
                if parts[0] == "dultra_jax" and len(parts) > 1 and parts[1] in units and src and parts[1] != src:
                    graph[src].add(parts[1])
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        state[u] = 2
        stack.pop()
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_package_graph_has_no_cycle():
    graph = _subpackage_graph()
    assert "rewards" not in graph["data"] and "data" not in graph["answers"] and "rewards" not in graph["answers"]
    assert _cycle(graph) is None, f"import cycle between packages: {' -> '.join(_cycle(graph))}"
    # the graph check sees a real cycle
    assert _cycle({**graph, "answers": graph["answers"] | {"rewards"}}) is not None


def test_each_package_imports_alone():
    """In a fresh interpreter, each package imports first (with every dultra_jax module purged before the next)."""
    names = ["dultra_jax.answers", "dultra_jax.accounting", "dultra_jax.data", "dultra_jax.rewards",
             "dultra_jax.eval.score_file", "dultra_jax.rewards.code", "dultra_jax.data.tasks", "dultra_jax.eval",
             "dultra_jax.decoding", "dultra_jax.training", "dultra_jax.checkpoints", "dultra_jax.cli"]
    code = (
        "import importlib, json, sys\n"
        "import jax, numpy\n"  # third-party imports stay cached; only the package is re-imported each time
        "failed = {}\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'dultra_jax' or m.startswith('dultra_jax.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed[name] = repr(e)\n"
        "print(json.dumps(failed))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PKG.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}
