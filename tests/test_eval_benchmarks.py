"""benchmarks/tokens_per_forward.py and benchmarks/throughput.py run on the CPU with small configs and write
well-formed JSON whose figures agree with each other."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import throughput  # noqa: E402
import tokens_per_forward  # noqa: E402

from dultra_jax.data import synthetic  # noqa: E402


def test_tokens_per_forward_synthetic_random_tiny(tmp_path, capsys):
    out = tmp_path / "tpf.json"
    r = tokens_per_forward.main(["--model", "tiny", "--gen-len", "16", "--blocks", "8", "--strategies",
                                 "planner,threshold", "--limit", "3", "--batch-size", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert r["task"] == synthetic.TASK_NAME and r["n_problems"] == 3
    assert [(x["strategy"], x["block"]) for x in r["rows"]] == [("planner", 8), ("threshold", 8)]
    for x in r["rows"]:
        d = x["nfe"]
        assert 1 <= d["min"] <= d["p50"] <= d["p90"] <= d["max"] <= 32 and d["min"] <= d["mean"] <= d["max"]
        assert x["tpf"] == pytest.approx(x["mean_effective_tokens"] / d["mean"])
        assert 0.0 <= x["accuracy"] <= 1.0 and x["n"] == 3
    # the planner reveals at least one token per iteration, so 16 positions take at most 16 forwards
    assert all(x["nfe"]["max"] <= 16 for x in r["rows"] if x["strategy"] == "planner")
    assert "threshold" in capsys.readouterr().out


def test_throughput_batch_sweep_with_roofline(tmp_path, capsys):
    out = tmp_path / "tp.json"
    r = throughput.main(["--model", "tiny", "--batches", "1,2", "--prompt-len", "8", "--gen-len", "16", "--block",
                         "8", "--strategies", "planner", "--repeats", "1", "--iters", "2", "--matmul-n", "128",
                         "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "throughput"
    assert r["matmul_tflops"] > 0 and r["params"]["total"] > 0
    assert [f["batch"] for f in r["forward"]] == [1, 2] and [d["batch"] for d in r["decode"]] == [1, 2]
    for f in r["forward"]:
        assert f["forward_ms"] > 0 and f["forward_roofline_ms"] > 0
        assert f["forward_fraction_of_roofline"] == pytest.approx(f["forward_roofline_ms"] / f["forward_ms"], rel=0.01)
    for d in r["decode"]:
        assert d["positions_decoded"] == d["batch"] * 16  # uncapped: every generated position decoded
        assert d["positions_per_s"] == pytest.approx(d["positions_decoded"] / d["wall_s"], rel=0.01)
        assert d["ms_per_iteration"] == pytest.approx(1e3 * d["wall_s"] / d["iterations"], rel=0.01)
        assert d["fraction_of_roofline"] == pytest.approx(d["roofline_ms_per_iteration"] / d["ms_per_iteration"],
                                                          rel=0.01)
        assert d["roofline_positions_per_s"] > 0 and d["effective_tokens"] <= d["positions_decoded"]
    assert "of roof" in capsys.readouterr().out
