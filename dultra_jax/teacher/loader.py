"""Load a Qwen2 HF checkpoint (safetensors, single or sharded) into :class:`Qwen2ForCausalLM`.

Same conventions as the LLaDA loader (:mod:`dultra_jax.checkpoints.hf`): names and shapes are validated from
the safetensors headers before any tensor is read, tensors are read one at a time, PyTorch ``Linear`` weights
[out, in] become [in, out] kernels, per-layer tensors are stacked on a leading layer axis (for ``nnx.scan``).
Every parameter also has logical axis names (:data:`LOGICAL_AXES`) for sharding by the project's rules.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dultra_jax.checkpoints.errors import CheckpointError
from dultra_jax.checkpoints.hf import SafetensorsReader, TensorSpec, parse_dtype
from dultra_jax.teacher.qwen2 import Qwen2Config, Qwen2ForCausalLM

log = logging.getLogger(__name__)

# Leaf of a stacked layer -> (suffix of the HF key under model.layers.{i}., transpose?)
_LAYER_LEAVES: dict[tuple[str, ...], tuple[str, bool]] = {
    ("input_norm", "scale"): ("input_layernorm.weight", False),
    ("q", "kernel"): ("self_attn.q_proj.weight", True),
    ("q", "bias"): ("self_attn.q_proj.bias", False),
    ("k", "kernel"): ("self_attn.k_proj.weight", True),
    ("k", "bias"): ("self_attn.k_proj.bias", False),
    ("v", "kernel"): ("self_attn.v_proj.weight", True),
    ("v", "bias"): ("self_attn.v_proj.bias", False),
    ("o", "kernel"): ("self_attn.o_proj.weight", True),
    ("post_norm", "scale"): ("post_attention_layernorm.weight", False),
    ("gate", "kernel"): ("mlp.gate_proj.weight", True),
    ("up", "kernel"): ("mlp.up_proj.weight", True),
    ("down", "kernel"): ("mlp.down_proj.weight", True),
}

# Logical axis names of every parameter (path pattern -> names), the vocabulary of dultra_jax.model.axes.
LOGICAL_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("final_norm", "scale"): ("norm",),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("layers", "input_norm", "scale"): ("layers", "norm"),
    ("layers", "post_norm", "scale"): ("layers", "norm"),
    ("layers", "q", "kernel"): ("layers", "embed", "heads"),
    ("layers", "q", "bias"): ("layers", "heads"),
    ("layers", "k", "kernel"): ("layers", "embed", "kv_heads"),
    ("layers", "k", "bias"): ("layers", "kv_heads"),
    ("layers", "v", "kernel"): ("layers", "embed", "kv_heads"),
    ("layers", "v", "bias"): ("layers", "kv_heads"),
    ("layers", "o", "kernel"): ("layers", "heads", "embed"),
    ("layers", "gate", "kernel"): ("layers", "embed", "mlp"),
    ("layers", "up", "kernel"): ("layers", "embed", "mlp"),
    ("layers", "down", "kernel"): ("layers", "mlp", "embed"),
}
# Keys some Qwen2 exports carry that hold no parameters (recomputed buffers).
_IGNORABLE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def param_specs(cfg: Qwen2Config) -> list[TensorSpec]:
    """Our parameter paths and the HF keys they come from."""
    specs = [
        TensorSpec(("embed", "embedding"), ("model.embed_tokens.weight",), False, False),
        TensorSpec(("final_norm", "scale"), ("model.norm.weight",), False, False),
    ]
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec(("lm_head", "kernel"), ("lm_head.weight",), True, False))
    for leaf, (suffix, transpose) in _LAYER_LEAVES.items():
        keys = tuple(f"model.layers.{i}.{suffix}" for i in range(cfg.num_hidden_layers))
        specs.append(TensorSpec(("layers", *leaf), keys, transpose, True))
    return specs


def logical_axes(model: Qwen2ForCausalLM) -> dict[tuple[str, ...], tuple[str, ...]]:
    """{parameter path: logical axis names} for every parameter of ``model`` (raises if one is unnamed)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(str(p) for p in path)
        names = LOGICAL_AXES.get(path)
        if names is None or len(names) != var[...].ndim:
            raise KeyError(f"no logical axis names of rank {var[...].ndim} for teacher parameter {'/'.join(path)}")
        out[path] = names
    return out


def _expected_shape(spec: TensorSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = shape[1:] if spec.stacked else shape
    return tuple(reversed(shape)) if spec.transpose else tuple(shape)


def load_qwen2(directory: str | Path, *, dtype="fp32", param_dtype=None) -> Qwen2ForCausalLM:
    """A Qwen2 checkpoint directory (``config.json`` + safetensors) -> :class:`Qwen2ForCausalLM`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"teacher checkpoint directory not found: {directory}")
    cfg = Qwen2Config.from_json_file(directory / "config.json")
    dtype = parse_dtype(dtype)
    param_dtype = dtype if param_dtype is None else parse_dtype(param_dtype)
    reader = SafetensorsReader(directory)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, dtype=dtype, param_dtype=param_dtype,
                                                       rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    targets = {tuple(str(p) for p in path): var for path, var in nnx.to_flat_state(abs_state)}
    specs = param_specs(cfg)

    present = reader.keys()
    expected = {k for s in specs for k in s.keys}
    ignorable = {k for k in present if _IGNORABLE.fullmatch(k)}
    if cfg.tie_word_embeddings:
        ignorable |= {"lm_head.weight"} & present
    problems = []
    missing = sorted(expected - present)
    unexpected = sorted(present - expected - ignorable)
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:20]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    for spec in specs:
        want = _expected_shape(spec, tuple(targets[spec.path].shape))
        for key in spec.keys:
            if key in present and reader.shape(key) != want:
                problems.append(f"shape mismatch for {key}: expected {list(want)}, got {list(reader.shape(key))}")
    if problems:
        raise CheckpointError(f"teacher checkpoint {directory} does not match its config.json: " + "; ".join(problems))

    values = {}
    for spec in specs:
        shape = tuple(targets[spec.path].shape)
        if spec.stacked:
            arr = np.empty(shape, dtype=param_dtype)
            for i, key in enumerate(spec.keys):
                t = reader.get(key)
                arr[i] = (t.T if spec.transpose else t).astype(param_dtype)
        else:
            t = reader.get(spec.keys[0])
            arr = np.ascontiguousarray((t.T if spec.transpose else t).astype(param_dtype))
        values[spec.path] = jnp.asarray(arr)
    flat = []
    for path, var in nnx.to_flat_state(abs_state):
        key = tuple(str(p) for p in path)
        if key not in values:
            raise CheckpointError(f"internal: no value for teacher parameter {'/'.join(key)}")
        flat.append((path, var.replace(values[key])))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def resolve_teacher_path(name_or_path: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """A local checkpoint directory as is; otherwise a Hugging Face hub id ``org/name[@revision]``, fetched
    (weights, config, tokenizer only) by :func:`dultra_jax.checkpoints.hub.resolve_model_path`."""
    from dultra_jax.checkpoints.hub import resolve_model_path

    return resolve_model_path(name_or_path, what="teacher", cache_dir=cache_dir)


def shard_teacher(model: Qwen2ForCausalLM, plan, *, on_uneven: str = "replicate") -> Qwen2ForCausalLM:
    """Place the teacher's parameters on ``plan``'s mesh by their logical names and the plan's rules (the same
    table the student uses); dimensions the mesh does not divide are replicated unless ``on_uneven="raise"``."""
    import jax
    from jax.sharding import NamedSharding

    from dultra_jax.model.axes import logical_to_spec

    names = logical_axes(model)
    mesh_shape = dict(plan.mesh.shape)
    graphdef, state = nnx.split(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(p) for p in path)
        if key in names:
            spec = logical_to_spec(names[key], var[...].shape, mesh_shape, plan.rules, on_uneven=on_uneven,
                                   what="teacher parameter " + "/".join(key))
            var = var.replace(jax.device_put(var[...], NamedSharding(plan.mesh, spec)))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
