"""Converted checkpoints (orbax) and the one loader that opens either format.

A converted directory holds ``config.json`` (the original's format, so the model stays self-describing),
``dultra_jax.json`` (our format marker and the dtype the source was stored in), ``params/`` (an orbax
checkpoint of the parameter tree) and the tokenizer files of the source, if it had any.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from dultra_jax.checkpoints.errors import CheckpointError
from dultra_jax.checkpoints.hf import (
    _TORCH_DTYPE_NAMES,
    atomic_directory,
    copy_tokenizer_files,
    export_hf,
    load_hf,
    parse_dtype,
    stored_dtype,
)
from dultra_jax.config import ModelConfig
from dultra_jax.model.dultra import DUltra

FORMAT_FILE = "dultra_jax.json"
FORMAT_NAME = "dultra-jax-params"
FORMAT_VERSION = 1
PARAMS_DIR = "params"


def is_converted(path: str | Path) -> bool:
    return (Path(path) / FORMAT_FILE).is_file()


def save_converted(
    model: DUltra,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    copy_from: str | Path | None = None,
    source_dtype: str | None = None,
) -> Path:
    """Write ``model`` as a converted directory, atomically (nothing is left behind on failure)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    param_dtype = jnp.dtype(model.backbone.embed.embedding[...].dtype).name
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS_DIR, params)
        ckptr.wait_until_finished()
        hf_cfg = model.cfg.to_hf_dict()
        if source_dtype is not None:
            hf_cfg["torch_dtype"] = source_dtype
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "param_dtype": param_dtype,
                "source_dtype": hf_cfg.get("torch_dtype")}
        (tmp / FORMAT_FILE).write_text(json.dumps(meta, indent=2))
        if copy_from is not None:
            copy_tokenizer_files(copy_from, tmp)
    return Path(out_dir)


def load_converted(path: str | Path, *, dtype=jnp.float32, param_dtype=None, **model_kwargs) -> DUltra:
    path = Path(path)
    meta = _read_meta(path)
    cfg = ModelConfig.from_json_file(path / "config.json")
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(lambda: DUltra(cfg, dtype=dtype, param_dtype=param_dtype, **model_kwargs))
    graphdef, abs_state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device),
        nnx.to_pure_dict(nnx.state(abstract, nnx.Param)),
    )
    try:
        restored = ocp.StandardCheckpointer().restore((path / PARAMS_DIR).absolute(), target)
    except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, tensorstore errors)
        raise CheckpointError(
            f"could not restore parameters from {path / PARAMS_DIR} (format {meta.get('format')} "
            f"v{meta.get('version')}): {e}"
        ) from e
    restored = jax.tree.map(lambda a, t: a.astype(t.dtype), restored, target)
    nnx.replace_by_pure_dict(abs_state, restored)
    return nnx.merge(graphdef, abs_state)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / FORMAT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / FORMAT_FILE} is unreadable: {e}") from e
    if meta.get("format") != FORMAT_NAME or meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} holds format {meta.get('format')!r} v{meta.get('version')}; this version of dultra-jax reads "
            f"{FORMAT_NAME!r} up to v{FORMAT_VERSION}"
        )
    if not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path} is missing its '{PARAMS_DIR}/' directory (incomplete conversion?)")
    return meta


def load(path: str | Path, *, dtype=jnp.float32, param_dtype=None, **model_kwargs) -> DUltra:
    """Open a model from an original HF checkpoint directory or a converted directory.

    ``dtype`` is the compute dtype (``"bf16"``/``"fp32"`` strings accepted); ``param_dtype`` the storage dtype
    (defaults to ``dtype``). Extra keyword arguments go to :class:`DUltra` (``attention_impl``, ``remat``,
    ``scan_layers``; ``seed`` for a fresh planner head when the checkpoint has none).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model path not found or not a directory: {path}")
    dtype, param_dtype = parse_dtype(dtype), parse_dtype(param_dtype)
    if is_converted(path):
        model_kwargs.pop("seed", None)
        return load_converted(path, dtype=dtype, param_dtype=param_dtype, **model_kwargs)
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is neither a converted dultra-jax directory (no {FORMAT_FILE}) nor an HF checkpoint "
            "(no config.json)"
        )
    return load_hf(path, dtype=dtype, param_dtype=param_dtype, **model_kwargs)


def convert(
    src: str | Path,
    out: str | Path,
    *,
    to_hf: bool = False,
    dtype=None,
    overwrite: bool = False,
    seed: int = 0,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """HF -> converted (default) or any -> HF (``to_hf``). ``dtype=None`` keeps the stored dtype."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise CheckpointError(f"source checkpoint directory not found: {src}")
    if out.exists() and not overwrite:
        raise CheckpointError(f"output directory {out} already exists; pass --overwrite to replace it")
    if src.resolve() == out.resolve():
        raise CheckpointError("source and output directories are the same; choose another output directory")
    dtype = parse_dtype(dtype)
    if is_converted(src):
        source_dtype = _read_meta(src).get("source_dtype")
        keep = jnp.dtype(_read_meta(src)["param_dtype"])
    else:
        keep = stored_dtype(src)
        source_dtype = jnp.dtype(keep).name
    work_dtype = dtype or keep
    model = load(src, dtype=work_dtype, seed=seed)
    if to_hf:
        export_dtype = dtype or _TORCH_DTYPE_NAMES.get(source_dtype or "", work_dtype)
        return export_hf(model, out, dtype=export_dtype, overwrite=overwrite, copy_from=src,
                         max_shard_bytes=max_shard_bytes)
    if is_converted(src) and dtype is None:
        raise CheckpointError(f"{src} is already converted; pass --to-hf to export it, or --dtype to re-cast it")
    return save_converted(model, out, overwrite=overwrite, copy_from=src, source_dtype=source_dtype)
