"""The original's HF safetensors checkpoints <-> our parameters, both ways, one tensor at a time.

Key names and layouts are the original's (docs/original.md §2): PyTorch ``Linear`` weights are [out, in]
and become [in, out] kernels; per-layer tensors ``...blocks.{i}.*`` / ``mask_head.{i}.*`` are stacked on a
leading layer axis because our blocks run under a scan. Everything is validated from the safetensors
headers (names, shapes) before a single tensor is read, so a bad checkpoint fails fast with the list of what is
wrong.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors.numpy needs it)
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from dultra_jax.atomic import apply_umask
from dultra_jax.checkpoints.errors import CheckpointError
from dultra_jax.config import ConfigError, ModelConfig
from dultra_jax.model.dultra import DUltra
from dultra_jax.model.planner_head import PlannerHead
from dultra_jax.outputs import check_replaceable

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
)
_SAFETENSORS_DTYPES = {
    "BF16": jnp.bfloat16, "F16": jnp.float16, "F32": jnp.float32, "F64": jnp.float64,
}
_TORCH_DTYPE_NAMES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}

# Leaf of one of our blocks -> (suffix of the original's key, transpose?)
_BLOCK_LEAVES: dict[tuple[str, ...], tuple[str, bool]] = {
    ("attn_norm", "scale"): ("attn_norm.weight", False),
    ("q", "kernel"): ("q_proj.weight", True),
    ("k", "kernel"): ("k_proj.weight", True),
    ("v", "kernel"): ("v_proj.weight", True),
    ("o", "kernel"): ("attn_out.weight", True),
    ("ff_norm", "scale"): ("ff_norm.weight", False),
    ("gate", "kernel"): ("ff_proj.weight", True),  # ff_proj is the SiLU gate
    ("up", "kernel"): ("up_proj.weight", True),
    ("down", "kernel"): ("ff_out.weight", True),  # block ff_out = MLP down-projection (not the LM head)
}
_PLANNER_PREFIXES = ("mask_head.", "time_embedding.", "norm_out_1.", "norm_out_2.", "mask_linear.",
                     "mask_embedding.", "block_embedding.")


@dataclass(frozen=True)
class TensorSpec:
    """One of our parameters and the original key(s) it comes from (one per layer when stacked)."""

    path: tuple[str, ...]
    keys: tuple[str, ...]
    transpose: bool
    stacked: bool


def param_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """The full mapping between our parameter tree and the original's state-dict keys."""
    specs = [
        TensorSpec(("backbone", "embed", "embedding"), ("model.transformer.wte.weight",), False, False),
        TensorSpec(("backbone", "final_norm", "scale"), ("model.transformer.ln_f.weight",), False, False),
        TensorSpec(("backbone", "lm_head", "kernel"), ("model.transformer.ff_out.weight",), True, False),
    ]
    specs += _stack_specs(("backbone", "blocks", "layers"), "model.transformer.blocks", cfg.n_layers)
    specs += _stack_specs(("planner", "blocks", "layers"), "mask_head", cfg.num_head_layers)
    for ours, theirs in (("time_in", "time_embedding.mlp.0"), ("time_out", "time_embedding.mlp.2"),
                         ("out", "mask_linear")):
        specs.append(TensorSpec(("planner", ours, "kernel"), (f"{theirs}.weight",), True, False))
        specs.append(TensorSpec(("planner", ours, "bias"), (f"{theirs}.bias",), False, False))
    for ours, theirs in (("adaln_in", "norm_out_1"), ("adaln_out", "norm_out_2")):
        mod = ("planner", ours, "modulation")
        specs.append(TensorSpec((*mod, "kernel"), (f"{theirs}.modulation.weight",), True, False))
        specs.append(TensorSpec((*mod, "bias"), (f"{theirs}.modulation.bias",), False, False))
    if cfg.use_mask_embeddings:
        specs.append(TensorSpec(("planner", "mask_embedding", "embedding"), ("mask_embedding.weight",), False, False))
    if cfg.use_block_embeddings:
        specs.append(TensorSpec(("planner", "block_embedding", "embedding"), ("block_embedding.weight",), False, False))
    return specs


def _stack_specs(path: tuple[str, ...], prefix: str, n: int) -> list[TensorSpec]:
    return [
        TensorSpec(path + leaf, tuple(f"{prefix}.{i}.{suffix}" for i in range(n)), transpose, True)
        for leaf, (suffix, transpose) in _BLOCK_LEAVES.items()
    ]


def _ignorable_keys(cfg: ModelConfig) -> set[str]:
    """Keys the original may carry that a config disables: accepted and skipped."""
    out = set()
    if not cfg.use_block_embeddings:
        out.add("block_embedding.weight")
    if not cfg.use_mask_embeddings:
        out.add("mask_embedding.weight")
    return out


# ------------------------------------------------------------------------------------------- reading
class SafetensorsReader:
    """Lazy, per-tensor access to a single-file or sharded (index.json) safetensors checkpoint."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.directory}")
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is malformed (expected a 'weight_map' object): {e}") from e
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            weight_map = None
            if not files:
                raise CheckpointError(
                    f"no weights in {self.directory}: expected {SINGLE_FILE}, or {INDEX_FILE} with its shards"
                )
        missing = [f for f in files if not (self.directory / f).is_file()]
        if missing:
            raise CheckpointError(f"{self.directory}: shard file(s) listed in {INDEX_FILE} are missing: {missing}")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            try:
                handle = safe_open(str(path), framework="np")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"corrupt or truncated safetensors file {path}: {e}") from e
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name
        if weight_map is not None:
            wrong = [k for k, f in weight_map.items() if self._where.get(k) != f]
            if wrong:
                raise CheckpointError(
                    f"{INDEX_FILE} in {self.directory} lists tensors that are not in the named shard: {wrong[:10]}"
                )

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def dtype(self, key: str):
        code = self._handles[self._where[key]].get_slice(key).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {key} has unsupported dtype {code}")
        return _SAFETENSORS_DTYPES[code]

    def get(self, key: str) -> np.ndarray:
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"could not read tensor {key} from {self._where[key]}: {e}") from e


def _expected_shape(spec: TensorSpec, target_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The original's per-key shape for one of our (possibly stacked) parameter shapes."""
    shape = target_shape[1:] if spec.stacked else target_shape
    return tuple(reversed(shape)) if spec.transpose else tuple(shape)


def stored_dtype(directory: str | Path):
    """The dtype the weights are stored in (of the embedding), for 'keep the checkpoint's dtype'."""
    reader = SafetensorsReader(directory)
    key = "model.transformer.wte.weight"
    if key not in reader.keys():
        raise CheckpointError(f"{directory}: missing key {key}; is this a LLaDA/dUltra checkpoint?")
    return reader.dtype(key)


def load_hf(
    directory: str | Path,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    seed: int = 0,
    **model_kwargs,
) -> DUltra:
    """Load an original HF checkpoint directory into a :class:`DUltra`.

    A plain LLaDA checkpoint (no planner keys) gets a planner head initialised as the original initialises
    it (seeded by ``seed``). ``param_dtype=None`` stores parameters in ``dtype``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    cfg = ModelConfig.from_json_file(directory / "config.json")
    reader = SafetensorsReader(directory)
    param_dtype = dtype if param_dtype is None else param_dtype

    def build(rngs=None):
        return DUltra(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **model_kwargs)

    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(seed)))
    graphdef, abs_state = nnx.split(abstract)
    targets = dict(nnx.to_flat_state(abs_state))
    specs = param_specs(cfg)
    present = reader.keys()
    has_planner = any(k.startswith(_PLANNER_PREFIXES) and k not in _ignorable_keys(cfg) for k in present)
    load_specs = [s for s in specs if has_planner or s.path[0] != "planner"]
    _validate(reader, cfg, load_specs, targets, directory)

    values: dict[tuple[str, ...], jax.Array] = {}
    for spec in tqdm(load_specs, desc=f"loading {directory.name}", unit="tensor", leave=False, disable=None):
        values[spec.path] = jnp.asarray(_read_param(reader, spec, targets[spec.path].shape, param_dtype))
    if not has_planner:
        log.warning(
            "%s has no planner-head weights (a plain LLaDA checkpoint): the planner head is freshly initialised "
            "as the original initialises it (seed %d); pre-train it before decoding with the planner.",
            directory, seed,
        )
        print(f"note: {directory} has no planner-head weights; initialised a fresh planner head (seed {seed}).")
        head = PlannerHead(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed),
                           **{k: v for k, v in model_kwargs.items() if k in ("attention_impl", "remat", "scan_layers")})
        for path, var in nnx.to_flat_state(nnx.state(head)):
            values[("planner", *path)] = var[...]
    flat = []
    for path, var in targets.items():
        if path not in values:
            raise CheckpointError(f"internal: no value for parameter {'/'.join(map(str, path))}")
        flat.append((path, var.replace(values[path])))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _validate(reader: SafetensorsReader, cfg: ModelConfig, specs: list[TensorSpec], targets, directory) -> None:
    expected = {k for s in specs for k in s.keys}
    present = reader.keys()
    ignorable = _ignorable_keys(cfg)
    missing = sorted(expected - present)
    # A plain LLaDA checkpoint carries no planner keys at all; any other leftover is unexpected.
    unexpected = sorted(present - expected - ignorable)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    for spec in specs:
        want = _expected_shape(spec, targets[spec.path].shape)
        for key in spec.keys:
            if key in present and reader.shape(key) != want:
                problems.append(f"shape mismatch for {key}: expected {list(want)}, got {list(reader.shape(key))}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match its config.json: " + "; ".join(problems))


def _read_param(reader: SafetensorsReader, spec: TensorSpec, shape, param_dtype) -> np.ndarray:
    def one(key):
        t = reader.get(key)
        return (t.T if spec.transpose else t).astype(param_dtype)

    if not spec.stacked:
        return np.ascontiguousarray(one(spec.keys[0]))
    out = np.empty(shape, dtype=param_dtype)
    for i, key in enumerate(spec.keys):
        out[i] = one(key)
    return out


# ------------------------------------------------------------------------------------------- writing
def hf_tensors(model: DUltra, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(original key, array in the original's layout and ``dtype``), one tensor at a time."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for spec in param_specs(model.cfg):
        value = np.asarray(jax.device_get(flat[spec.path][...]))
        layers = [value[i] for i in range(value.shape[0])] if spec.stacked else [value]
        for key, arr in zip(spec.keys, layers, strict=True):
            yield key, np.ascontiguousarray((arr.T if spec.transpose else arr).astype(dtype))


def export_hf(
    model: DUltra,
    out_dir: str | Path,
    *,
    dtype=None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
    copy_from: str | Path | None = None,
) -> Path:
    """Write the original's format (safetensors + config.json), sharded with an index above ``max_shard_bytes``.

    ``dtype`` defaults to the config's ``torch_dtype`` (the dtype the source checkpoint was stored in), so
    HF -> ours -> HF is bit-exact. Tokenizer files are copied from ``copy_from`` if given.
    """
    cfg = model.cfg
    dtype = _export_dtype(cfg, model, dtype)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        shards: list[dict[str, np.ndarray]] = [{}]
        sizes = [0]
        weight_map: dict[str, int] = {}
        total = 0
        # Shards are written as soon as they fill so host memory holds at most one shard at a time.
        written: list[str] = []

        def flush():
            name = f"shard-{len(written):05d}.tmp"
            save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
            written.append(name)
            shards[-1] = {}
            sizes[-1] = 0

        n_keys = sum(len(s.keys) for s in param_specs(cfg))
        bar = tqdm(hf_tensors(model, dtype), total=n_keys, desc="exporting", unit="tensor", leave=False, disable=None)
        for key, arr in bar:
            if shards[-1] and sizes[-1] + arr.nbytes > max_shard_bytes:
                flush()
            shards[-1][key] = arr
            sizes[-1] += arr.nbytes
            total += arr.nbytes
            weight_map[key] = len(written)
        flush()
        n = len(written)
        if n == 1:
            os.replace(tmp / written[0], tmp / SINGLE_FILE)
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            for old, new in zip(written, names, strict=True):
                os.replace(tmp / old, tmp / new)
            index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        hf_cfg = cfg.to_hf_dict()
        hf_cfg["torch_dtype"] = _dtype_name(dtype)
        hf_cfg["architectures"] = ["LLaDOUModelLM"]  # we always write the planner head
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
        if copy_from is not None:
            copy_tokenizer_files(copy_from, tmp)
    return Path(out_dir)


def _export_dtype(cfg: ModelConfig, model: DUltra, dtype):
    if dtype is not None:
        return jnp.dtype(dtype)
    name = cfg.hf.get("torch_dtype")
    if name in _TORCH_DTYPE_NAMES:
        return jnp.dtype(_TORCH_DTYPE_NAMES[name])
    return jnp.dtype(model.backbone.embed.embedding[...].dtype)


def _dtype_name(dtype) -> str:
    dtype = jnp.dtype(dtype)
    for name, d in _TORCH_DTYPE_NAMES.items():
        if jnp.dtype(d) == dtype:
            return name
    raise CheckpointError(f"cannot export dtype {dtype}; choose one of {sorted(_TORCH_DTYPE_NAMES)}")


def parse_dtype(name):
    """'bf16'/'bfloat16'/'fp16'/'float16'/'fp32'/'float32' (or a dtype) -> a JAX dtype."""
    if name is None or not isinstance(name, str):
        return name
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    key = aliases.get(name.lower(), name.lower())
    if key not in _TORCH_DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of bf16, fp16, fp32")
    return _TORCH_DTYPE_NAMES[key]


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


# ------------------------------------------------------------------------------------------- atomic output
class atomic_directory:
    """Build a directory under a temporary name next to the target and rename it into place on success.

    On any exception the temporary directory is removed, so a failed write leaves no partial output. An
    existing target raises unless ``overwrite``; then it is replaced only after the new one is complete.
    """

    def __init__(self, target: str | Path, *, overwrite: bool = False):
        self.target = Path(target).absolute()
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        if self.target.exists() and not self.overwrite:
            raise CheckpointError(f"output directory {self.target} already exists; pass --overwrite to replace it")
        check_replaceable(self.target)  # --overwrite deletes only a checkpoint directory
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        apply_umask(self.tmp)
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
