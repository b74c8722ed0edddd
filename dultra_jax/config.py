"""Model configuration read from the original's HF ``config.json``.

The original merges its JSON over dataclass defaults that are *not* the 8B values (rope_theta 10000,
weight tying on, ...). Rather than guess those defaults, every field that changes the arithmetic must be
present in the file or have a default that provably matches the published checkpoints; anything we do not
implement (ALiBi, QK-norm, weight tying, other block/activation types) is rejected with a clear message.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModelConfig", "UnsupportedConfigError", "ConfigError", "PRESETS", "preset"]


class ConfigError(ValueError):
    """A config.json that is missing something or is malformed."""


class UnsupportedConfigError(ConfigError):
    """A config value that changes the math in a way this implementation does not support."""


# Fields the original reads that must hold exactly this value for our arithmetic to be the original's.
# key -> (required value, what it would mean otherwise). A missing key takes the value in _ABSENT_OK.
_MUST_EQUAL: dict[str, tuple[Any, str]] = {
    "activation_type": ("silu", "only the LLaDA 'silu' activation with a separate up_proj is implemented"),
    "block_type": ("llama", "only the 'llama' block (separate q/k/v, ff_proj + up_proj) is implemented"),
    "layer_norm_type": ("rms", "only RMSNorm is implemented"),
    "alibi": (False, "ALiBi attention biases are not implemented"),
    "attention_layer_norm": (False, "QK-norm (attention_layer_norm) is not implemented"),
    "input_emb_norm": (False, "input embedding normalisation is not implemented"),
    "scale_logits": (False, "logit scaling is not implemented"),
    "weight_tying": (False, "tied input/output embeddings are not implemented (the LM head must be separate)"),
    "include_bias": (False, "biases in backbone linear layers are not implemented"),
    "include_qkv_bias": (False, "q/k/v biases are not implemented"),
    "rope": (True, "only rotary position embeddings are implemented"),
    "rope_full_precision": (True, "RoPE is always computed in float32"),
    "layer_norm_with_affine": (True, "norms without a learned scale are not implemented"),
    "block_group_size": (1, "grouped blocks (block_group_size > 1) are not implemented"),
    "use_adaln": (True, "the planner head without AdaLN is not implemented (no released checkpoint uses it)"),
}
# Keys that may be absent: the value the original then uses, when it is the one we implement.
_ABSENT_OK: dict[str, Any] = {
    "alibi": False,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "rope_full_precision": True,
    "layer_norm_with_affine": True,
    "block_group_size": 1,
    "use_adaln": True,
}
_REQUIRED = ("d_model", "n_heads", "n_layers", "vocab_size", "rope_theta", "mask_token_id")


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter that changes what the model computes.

    ``hf`` keeps the original JSON (merged with our values) so export writes back a config the original
    PyTorch class loads unchanged.
    """

    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    mlp_hidden_size: int
    rope_theta: float
    mask_token_id: int
    n_kv_heads: int | None = None
    embedding_size: int | None = None
    rms_norm_eps: float = 1e-5
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    max_sequence_length: int = 4096
    # Planner head (dUltra's lladou_config values are the defaults: a plain LLaDA config has none of these).
    num_head_layers: int = 1
    use_adaln: bool = True
    use_mask_embeddings: bool = True
    use_block_embeddings: bool = False
    planner_layernorm_eps: float = 1e-4
    timestep_features: int = 256
    hf: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.embedding_size is None:
            object.__setattr__(self, "embedding_size", self.vocab_size)
        for name in ("d_model", "n_heads", "n_layers", "vocab_size", "mlp_hidden_size", "num_head_layers"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head dimension d_model/n_heads = {self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.embedding_size < self.vocab_size:
            raise ConfigError(f"embedding_size ({self.embedding_size}) is smaller than vocab_size ({self.vocab_size})")
        if not 0 <= self.mask_token_id < self.embedding_size:
            raise ConfigError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {self.embedding_size})"
            )
        if not self.use_adaln:
            raise UnsupportedConfigError("unsupported config: use_adaln=false: " + _MUST_EQUAL["use_adaln"][1])

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    # ------------------------------------------------------------------ HF JSON
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Build from the original's config dict; raise on anything we do not compute the same way."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {missing}; is this a LLaDA/dUltra config.json?")
        problems = []
        for key, (want, why) in _MUST_EQUAL.items():
            if key in raw:
                got = raw[key]
            elif key in _ABSENT_OK:
                got = _ABSENT_OK[key]
            else:
                problems.append(f"'{key}' is absent (the original's default differs from what we implement: {why})")
                continue
            if got != want:
                problems.append(f"'{key}'={got!r} ({why}; expected {want!r})")
        if raw.get("multi_query_attention"):
            problems.append("'multi_query_attention'=true (use n_kv_heads instead)")
        if problems:
            raise UnsupportedConfigError(f"unsupported config in {source}: " + "; ".join(problems))
        mlp = raw.get("mlp_hidden_size")
        if mlp is None:
            mlp = int(raw.get("mlp_ratio", 4)) * int(raw["d_model"])
        try:
            return cls(
                d_model=int(raw["d_model"]),
                n_heads=int(raw["n_heads"]),
                n_kv_heads=int(raw["n_kv_heads"]) if raw.get("n_kv_heads") is not None else None,
                n_layers=int(raw["n_layers"]),
                vocab_size=int(raw["vocab_size"]),
                embedding_size=int(raw["embedding_size"]) if raw.get("embedding_size") is not None else None,
                mlp_hidden_size=int(mlp),
                rope_theta=float(raw["rope_theta"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                mask_token_id=int(raw["mask_token_id"]),
                eos_token_id=_opt_int(raw.get("eos_token_id")),
                pad_token_id=_opt_int(raw.get("pad_token_id")),
                max_sequence_length=int(raw.get("max_sequence_length", 4096)),
                num_head_layers=int(raw.get("num_head_layers", 1)),
                use_adaln=bool(raw.get("use_adaln", True)),
                use_mask_embeddings=bool(raw.get("use_mask_embeddings", True)),
                use_block_embeddings=bool(raw.get("use_block_embeddings", False)),
                hf=copy.deepcopy(raw),
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: malformed value: {e}") from e

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The original's config.json for this model (original keys kept, ours written over them)."""
        out = copy.deepcopy(self.hf) if self.hf else dict(_HF_TEMPLATE)
        out.update(
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            n_layers=self.n_layers,
            vocab_size=self.vocab_size,
            embedding_size=self.embedding_size,
            mlp_hidden_size=self.mlp_hidden_size,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            mask_token_id=self.mask_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            max_sequence_length=self.max_sequence_length,
            num_head_layers=self.num_head_layers,
            use_adaln=self.use_adaln,
            use_mask_embeddings=self.use_mask_embeddings,
            use_block_embeddings=self.use_block_embeddings,
        )
        for key, (want, _) in _MUST_EQUAL.items():
            out.setdefault(key, want)
        return out


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


# Fields of the original format that do not change the math but make an exported config complete.
_HF_TEMPLATE: dict[str, Any] = {
    "architectures": ["LLaDOUModelLM"],
    "model_type": "llada",
    "activation_type": "silu",
    "block_type": "llama",
    "layer_norm_type": "rms",
    "mlp_ratio": 4,
    "attention_dropout": 0.0,
    "residual_dropout": 0.0,
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "init_fn": "mitchell",
    "init_std": 0.02,
    "init_device": "cpu",
    "init_cutoff_factor": None,
    "multi_query_attention": None,
    "bias_for_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "alibi_bias_max": 8.0,
    "precision": "amp_bf16",
    "use_cache": False,
    "torch_dtype": "bfloat16",
    **{key: want for key, (want, _) in _MUST_EQUAL.items()},
}

PRESETS: dict[str, dict[str, Any]] = {
    # GSAI-ML/LLaDA-8B-Instruct + dUltra's lladou_config planner fields.
    "llada-8b": {
        **_HF_TEMPLATE,
        "d_model": 4096,
        "n_heads": 32,
        "n_kv_heads": 32,
        "n_layers": 32,
        "mlp_hidden_size": 12288,
        "vocab_size": 126464,
        "embedding_size": 126464,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_sequence_length": 4096,
        "mask_token_id": 126336,
        "eos_token_id": 126081,
        "pad_token_id": 126081,
        "weight_tying": False,
        "num_head_layers": 1,
        "use_adaln": True,
        "use_mask_embeddings": True,
        "use_block_embeddings": False,
    },
    # Same code paths as the 8B model at CPU-test size.
    "tiny": {
        **_HF_TEMPLATE,
        "d_model": 64,
        "n_heads": 4,
        "n_kv_heads": 4,
        "n_layers": 2,
        "mlp_hidden_size": 96,
        "vocab_size": 300,
        "embedding_size": 300,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_sequence_length": 256,
        "mask_token_id": 299,
        "eos_token_id": 298,
        "pad_token_id": 298,
        "weight_tying": False,
        "num_head_layers": 1,
        "use_adaln": True,
        "use_mask_embeddings": True,
        "use_block_embeddings": False,
        "torch_dtype": "float32",
    },
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named configuration (``llada-8b`` or ``tiny``), optionally with HF-field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_hf_dict({**PRESETS[name], **overrides}, source=f"preset {name!r}")
