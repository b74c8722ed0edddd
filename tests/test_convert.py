"""Checkpoint conversion both ways: formats, dtypes, plain LLaDA input, bit-exact round trip, bad input."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dultra_jax
from dultra_jax.checkpoints import CheckpointError, convert
from dultra_jax.checkpoints.hf import INDEX_FILE, param_specs
from dultra_jax.cli import main
from dultra_jax.config import ConfigError, UnsupportedConfigError

PLANNER_PREFIXES = ("mask_head.", "time_embedding.", "norm_out_", "mask_linear.", "mask_embedding.")


def _tensors(d: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _make_hf(tmp: Path, tiny_dir: Path, name: str, *, tensors=None, config=None) -> Path:
    d = tmp / name
    d.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    if config:
        cfg.update(config)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(tensors if tensors is not None else load_file(str(tiny_dir / "model.safetensors")),
              str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _assert_no_output(out: Path):
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def _logits(model, golden):
    return np.asarray(model(jnp.asarray(golden["fwd_input_ids"]))[0], np.float32)


def test_key_map_covers_every_parameter(tiny_model):
    from flax import nnx

    ours = {p for p, _ in nnx.to_flat_state(nnx.state(tiny_model, nnx.Param))}
    assert ours == {s.path for s in param_specs(tiny_model.cfg)}
    keys = [k for s in param_specs(tiny_model.cfg) for k in s.keys]
    assert set(keys) == set(load_file(str(Path(__file__).parent / "fixtures/lladou-tiny/model.safetensors")))


def test_round_trip_is_bit_exact_fp32(tmp_path, tiny_dir):
    convert(tiny_dir, tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "back", to_hf=True)
    a, b = _tensors(tiny_dir), _tensors(tmp_path / "back")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["d_model"] == 64 and cfg["torch_dtype"] == "float32" and cfg["weight_tying"] is False


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_input_loads_and_round_trips_bit_exact(tmp_path, tiny_dir, golden, dtype):
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    src = _make_hf(tmp_path, tiny_dir, "half",
                   tensors={k: v.astype(np_dtype) for k, v in _tensors(tiny_dir).items()},
                   config={"torch_dtype": dtype})
    # ours keeps the stored dtype by default; the HF export goes back to it bit for bit
    convert(src, tmp_path / "ours")
    meta = json.loads((tmp_path / "ours" / "dultra_jax.json").read_text())
    assert meta["param_dtype"] == dtype
    convert(tmp_path / "ours", tmp_path / "back", to_hf=True)
    a, b = _tensors(src), _tensors(tmp_path / "back")
    for k in a:
        assert b[k].dtype == a[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    # and an fp32 working copy exported back to the stored dtype is still exact
    m32 = dultra_jax.load(src, dtype="fp32")
    dultra_jax.export_hf(m32, tmp_path / "back32")
    c = _tensors(tmp_path / "back32")
    for k in a:
        assert c[k].dtype == a[k].dtype and a[k].tobytes() == c[k].tobytes(), k
    # the computation is the fp32 one up to the rounding of the weights
    # about twice the measured error of rounding the weights (max |logit| 45.2): bf16 0.44 (0.96%), fp16 0.051 (0.11%)
    ref = golden["fwd_logits"]
    tolerance = {"bfloat16": 0.02, "float16": 0.0025}[dtype]
    assert np.abs(_logits(m32, golden) - ref).max() < tolerance * np.abs(ref).max()


def test_sharded_input_with_index(tmp_path, tiny_dir, golden, tiny_model):
    model = dultra_jax.load(tiny_dir, dtype="fp32")
    out = dultra_jax.export_hf(model, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in _tensors(tiny_dir).values())
    reloaded = dultra_jax.load(out, dtype="fp32")
    np.testing.assert_array_equal(_logits(reloaded, golden), _logits(tiny_model, golden))
    # sharded -> converted works too
    convert(out, tmp_path / "conv")
    np.testing.assert_array_equal(_logits(dultra_jax.load(tmp_path / "conv"), golden), _logits(tiny_model, golden))


def test_plain_llada_gets_fresh_planner_head(tmp_path, tiny_dir, golden, capsys):
    backbone_only = {k: v for k, v in _tensors(tiny_dir).items() if not k.startswith(PLANNER_PREFIXES)}
    src = _make_hf(tmp_path, tiny_dir, "plain", tensors=backbone_only)
    model = dultra_jax.load(src, dtype="fp32", seed=3)
    assert "no planner-head weights" in capsys.readouterr().out
    # backbone is the checkpoint's
    np.testing.assert_allclose(_logits(model, golden), golden["fwd_logits"], atol=1e-4, rtol=0)
    head = model.planner
    d, f = model.cfg.d_model, model.cfg.mlp_hidden_size
    # initialised as the original: zero biases, N(0, 0.02) embeddings, mitchell blocks, xavier AdaLN
    assert np.all(np.asarray(head.out.bias[...]) == 0)
    assert np.all(np.asarray(head.adaln_in.modulation.bias[...]) == 0)
    assert np.all(np.asarray(head.time_in.bias[...]) == 0)
    emb = np.asarray(head.mask_embedding.embedding[...])
    assert 0.01 < emb.std() < 0.03
    q = np.asarray(head.blocks.layers.q.kernel[...])
    assert abs(q.std() - 1 / np.sqrt(d)) < 0.2 / np.sqrt(d) and np.abs(q).max() <= 3 / np.sqrt(d) + 1e-6
    down = np.asarray(head.blocks.layers.down.kernel[...])
    assert abs(down.std() - 1 / np.sqrt(f) / np.sqrt(2)) < 0.2 / np.sqrt(f)
    xav = np.asarray(head.adaln_in.modulation.kernel[...])
    assert np.abs(xav).max() <= np.sqrt(6 / (d + 2 * d)) + 1e-6
    # planner output is finite and deterministic under the seed
    plan = model.planner_logits(jnp.asarray(golden["plan_hidden"]), jnp.asarray(golden["plan_timestep"]),
                                jnp.asarray(golden["plan_mask_index"]))
    again = dultra_jax.load(src, dtype="fp32", seed=3).planner_logits(
        jnp.asarray(golden["plan_hidden"]), jnp.asarray(golden["plan_timestep"]),
        jnp.asarray(golden["plan_mask_index"]),
    )
    assert np.all(np.isfinite(np.asarray(plan)))
    np.testing.assert_array_equal(np.asarray(plan), np.asarray(again))
    # converting it writes the fresh head, exporting writes full dUltra keys
    convert(src, tmp_path / "conv")
    convert(tmp_path / "conv", tmp_path / "hf", to_hf=True)
    assert set(_tensors(tmp_path / "hf")) == set(_tensors(tiny_dir))


def test_block_embedding_key_is_ignored_when_disabled(tmp_path, tiny_dir, golden):
    t = _tensors(tiny_dir)
    t["block_embedding.weight"] = np.ones((2, 64), np.float32)
    src = _make_hf(tmp_path, tiny_dir, "blockemb", tensors=t)
    np.testing.assert_allclose(_logits(dultra_jax.load(src), golden), golden["fwd_logits"], atol=1e-4, rtol=0)


def test_converted_dir_carries_tokenizer_files(tmp_path, tiny_dir):
    src = _make_hf(tmp_path, tiny_dir, "withtok")
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    convert(src, tmp_path / "conv")
    assert (tmp_path / "conv" / "tokenizer.json").is_file()
    convert(tmp_path / "conv", tmp_path / "hf", to_hf=True)
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()


# ------------------------------------------------------------------------------------------- bad input
def _bad_cases(tmp: Path, tiny_dir: Path):
    t = _tensors(tiny_dir)
    yield "missing dir", tmp / "nope", "not found"
    d = tmp / "noconfig"
    d.mkdir()
    shutil.copy(tiny_dir / "model.safetensors", d)
    yield "no config", d, "config"
    d = tmp / "noweights"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    yield "no weights", d, "no weights"
    yield ("missing keys", _make_hf(tmp, tiny_dir, "missing", tensors={
        k: v for k, v in t.items() if k not in ("model.transformer.ln_f.weight", "mask_linear.bias")}),
        "missing keys (2): ['mask_linear.bias', 'model.transformer.ln_f.weight']")
    yield ("unexpected keys", _make_hf(tmp, tiny_dir, "unexpected", tensors={**t, "model.transformer.extra.weight":
                                                                              np.zeros(3, np.float32)}),
           "unexpected keys (1): ['model.transformer.extra.weight']")
    bad = dict(t)
    bad["model.transformer.blocks.1.q_proj.weight"] = np.zeros((64, 32), np.float32)
    yield ("shape mismatch", _make_hf(tmp, tiny_dir, "shape", tensors=bad),
           "shape mismatch for model.transformer.blocks.1.q_proj.weight: expected [64, 64], got [64, 32]")
    yield "unsupported config", _make_hf(tmp, tiny_dir, "alibi", config={"alibi": True}), "ALiBi"
    yield "weight tying", _make_hf(tmp, tiny_dir, "tied", config={"weight_tying": True}), "tied"
    d = _make_hf(tmp, tiny_dir, "corrupt")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    yield "corrupt", d, "corrupt or truncated safetensors"
    d = _make_hf(tmp, tiny_dir, "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    yield "truncated", d, "corrupt or truncated safetensors"
    d = tmp / "missingshard"
    dultra_jax.export_hf(dultra_jax.load(tiny_dir), d, max_shard_bytes=100_000)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    yield "missing shard", d, f"missing: ['{victim.name}']"


def test_every_bad_input_has_a_clear_message_and_leaves_no_output(tmp_path, tiny_dir):
    src_root = tmp_path / "src"
    src_root.mkdir()
    for name, src, message in _bad_cases(src_root, tiny_dir):
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        with pytest.raises((CheckpointError, ConfigError)) as err:
            convert(src, out)
        assert message in str(err.value), (name, str(err.value))
        _assert_no_output(out)
        # the CLI reports the same message and exits 2
        assert main(["convert", str(src), str(out)]) == 2
        _assert_no_output(out)


def test_unsupported_config_error_type(tmp_path, tiny_dir):
    src = _make_hf(tmp_path, tiny_dir, "swiglu", config={"activation_type": "swiglu"})
    with pytest.raises(UnsupportedConfigError, match="activation_type"):
        dultra_jax.load(src)


def test_existing_output_needs_overwrite(tmp_path, tiny_dir, golden):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite"):
        convert(tiny_dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a checkpoint directory: this one is not ours, so it is kept
    assert main(["convert", str(tiny_dir), str(out), "--overwrite"]) == 2
    assert (out / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    convert(tiny_dir, ours)
    (ours / "stale.txt").write_text("left from before")
    assert main(["convert", str(tiny_dir), str(ours), "--overwrite"]) == 0
    assert not (ours / "stale.txt").exists()
    np.testing.assert_allclose(_logits(dultra_jax.load(ours), golden), golden["fwd_logits"], atol=1e-4, rtol=0)


def test_failure_mid_write_leaves_nothing(tmp_path, tiny_dir, monkeypatch):
    import dultra_jax.checkpoints.hf as hf

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", boom)
    out = tmp_path / "hf"
    with pytest.raises(OSError, match="disk full"):
        dultra_jax.export_hf(dultra_jax.load(tiny_dir), out)
    _assert_no_output(out)


def test_cli_convert_and_dtype(tmp_path, tiny_dir, capsys):
    assert main(["convert", str(tiny_dir), str(tmp_path / "bf"), "--dtype", "bf16"]) == 0
    assert "wrote converted" in capsys.readouterr().out
    m = dultra_jax.load(tmp_path / "bf", dtype="bf16")
    assert m.backbone.lm_head.kernel[...].dtype == jnp.bfloat16
    assert main(["convert", str(tmp_path / "bf"), str(tmp_path / "x"), "--dtype", "fp8"]) == 2
