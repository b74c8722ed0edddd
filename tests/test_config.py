import json

import pytest

from dultra_jax.config import PRESETS, ConfigError, ModelConfig, UnsupportedConfigError, preset


def test_reads_the_original_config(tiny_dir):
    cfg = ModelConfig.from_json_file(tiny_dir / "config.json")
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.mlp_hidden_size) == (64, 4, 4, 2, 96)
    assert (cfg.vocab_size, cfg.embedding_size, cfg.mask_token_id, cfg.eos_token_id) == (300, 300, 299, 298)
    assert cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5 and cfg.head_dim == 16
    assert (cfg.num_head_layers, cfg.use_adaln, cfg.use_mask_embeddings, cfg.use_block_embeddings) == (
        1, True, True, False)


def test_presets():
    big = preset("llada-8b")
    assert (big.d_model, big.n_layers, big.mlp_hidden_size, big.vocab_size) == (4096, 32, 12288, 126464)
    assert (big.mask_token_id, big.eos_token_id, big.rope_theta) == (126336, 126081, 500000.0)
    assert preset("tiny").d_model == 64
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("llada-70b")


def test_round_trips_through_hf_dict(tiny_dir):
    cfg = ModelConfig.from_json_file(tiny_dir / "config.json")
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_plain_llada_config_gets_duLtra_planner_defaults():
    raw = {k: v for k, v in PRESETS["llada-8b"].items()
           if k not in ("num_head_layers", "use_adaln", "use_mask_embeddings", "use_block_embeddings")}
    cfg = ModelConfig.from_hf_dict(raw)
    assert (cfg.num_head_layers, cfg.use_mask_embeddings, cfg.use_block_embeddings) == (1, True, False)


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"alibi": True}, "ALiBi"),
        ({"attention_layer_norm": True}, "QK-norm"),
        ({"weight_tying": True}, "tied"),
        ({"activation_type": "gelu"}, "activation_type"),
        ({"block_type": "sequential"}, "block_type"),
        ({"layer_norm_type": "default"}, "RMSNorm"),
        ({"include_qkv_bias": True}, "q/k/v biases"),
        ({"scale_logits": True}, "logit scaling"),
        ({"use_adaln": False}, "AdaLN"),
        ({"multi_query_attention": True}, "multi_query"),
    ],
)
def test_unsupported_values_are_rejected(override, needle):
    with pytest.raises(UnsupportedConfigError, match=needle):
        ModelConfig.from_hf_dict({**PRESETS["tiny"], **override})


def test_absent_weight_tying_is_rejected_because_the_original_defaults_to_tied():
    raw = {k: v for k, v in PRESETS["tiny"].items() if k != "weight_tying"}
    with pytest.raises(UnsupportedConfigError, match="weight_tying"):
        ModelConfig.from_hf_dict(raw)


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"d_model": 63}, "divisible"),
        ({"n_kv_heads": 3}, "multiple of n_kv_heads"),
        ({"mask_token_id": 5000}, "outside the vocabulary"),
        ({"n_layers": 0}, "positive"),
        ({"d_model": "wide"}, "malformed"),
    ],
)
def test_bad_values(override, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_hf_dict({**PRESETS["tiny"], **override})


def test_missing_required_and_bad_json(tmp_path):
    raw = {k: v for k, v in PRESETS["tiny"].items() if k != "rope_theta"}
    with pytest.raises(ConfigError, match="rope_theta"):
        ModelConfig.from_hf_dict(raw)
    p = tmp_path / "config.json"
    p.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json_file(p)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_json_file(tmp_path / "missing.json")
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_json_file(p)
