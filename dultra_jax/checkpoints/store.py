"""Converted checkpoints (orbax) and the one loader that opens either format.

A converted directory holds ``config.json`` (the original's format, so the model stays self-describing),
``dultra_jax.json`` (our format marker and the dtype the source was stored in), ``params/`` (an orbax
checkpoint of the parameter tree) and the tokenizer files of the source, if it had any.

The orbax checkpoint is stored per array, so it can be restored straight into any sharding: pass ``mesh`` (a
``jax.sharding.Mesh`` or a spec like ``"fsdp=8"``) to :func:`load` / :func:`load_converted` and every host reads
only the shards its devices hold, whatever mesh shape the checkpoint was written from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dultra_jax.atomic import apply_umask
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
from dultra_jax.checkpoints.hub import resolve_model_path
from dultra_jax.config import ModelConfig
from dultra_jax.model.dultra import DUltra
from dultra_jax.outputs import check_replaceable

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from dultra_jax.parallel import MeshConfig, ShardingPlan

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
    task: dict | None = None,
) -> Path:
    """Write ``model`` as a converted directory, atomically (nothing is left behind on failure).

    A sharded model is written shard by shard (orbax); the directory can be restored onto any mesh. On several
    processes every process must call this (each writes the shards it holds, into a shared file system);
    process 0 writes the small files and renames the finished directory into place. ``task`` (the settings of
    the task it was trained on) is recorded for ``dultra eval`` (:func:`recorded_task`).
    """
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    param_dtype = jnp.dtype(model.backbone.embed.embedding[...].dtype).name

    def write(tmp: Path, primary: bool = True) -> None:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS_DIR, params)
        ckptr.wait_until_finished()
        if not primary:
            return
        hf_cfg = model.cfg.to_hf_dict()
        if source_dtype is not None:
            hf_cfg["torch_dtype"] = source_dtype
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "param_dtype": param_dtype,
                "source_dtype": hf_cfg.get("torch_dtype")}
        if task:
            meta["task"] = task
        (tmp / FORMAT_FILE).write_text(json.dumps(meta, indent=2))
        if copy_from is not None:
            copy_tokenizer_files(copy_from, tmp)

    if jax.process_count() > 1:
        _save_on_all_processes(Path(out_dir), write, overwrite=overwrite)
        return Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write(tmp)
    return Path(out_dir)


def _save_on_all_processes(target: Path, write, *, overwrite: bool) -> None:
    """The multi-process form of ``atomic_directory``: one temporary directory named the same on every process
    (shared file system), written by all, renamed into place by process 0; barriers between the phases."""
    import shutil

    from jax.experimental import multihost_utils

    target = target.absolute()
    primary = jax.process_index() == 0
    if target.exists() and not overwrite:
        raise CheckpointError(f"output directory {target} already exists; pass --overwrite to replace it")
    check_replaceable(target)
    tmp = target.parent / f".{target.name}.tmp-multiprocess"
    if primary:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    multihost_utils.sync_global_devices(f"save_converted:start:{target}")
    try:
        write(tmp, primary)
        multihost_utils.sync_global_devices(f"save_converted:written:{target}")
        if primary:
            apply_umask(tmp)
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    multihost_utils.sync_global_devices(f"save_converted:done:{target}")


def load_converted(
    path: str | Path,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: Mesh | MeshConfig | ShardingPlan | str | None = None,
    rules=None,
    **model_kwargs,
) -> DUltra:
    """Restore a converted directory; onto one device, or with ``mesh`` directly into the rules' shardings.

    ``rules`` defaults to ``dultra_jax.parallel.DEFAULT_RULES``. Each host reads only its own shards.
    """
    path = Path(path)
    meta = _read_meta(path)
    cfg = ModelConfig.from_json_file(path / "config.json")
    param_dtype = dtype if param_dtype is None else param_dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, **model_kwargs)
    if mesh is None:
        graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: DUltra(cfg, **kw)))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device), nnx.to_pure_dict(abs_state)
        )
    else:
        graphdef, abs_state = _plan(mesh, rules).abstract_model(cfg, **kw)
        target = nnx.to_pure_dict(abs_state)
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


def recorded_task(path: str | Path) -> dict:
    """The task settings a trained model was exported with (``{}`` for other checkpoints, or a hub id)."""
    path = Path(path)
    if not (path / FORMAT_FILE).is_file():
        return {}
    task = _read_meta(path).get("task")
    return task if isinstance(task, dict) else {}


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / FORMAT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / FORMAT_FILE} is unreadable: {e}") from e
    if meta.get("format") != FORMAT_NAME or meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} holds format {meta.get('format')!r} v{meta.get('version')}; this version of dultra-jax reads "
            f"{FORMAT_NAME!r} up to v{FORMAT_VERSION}"
        )
    if not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path} is missing its '{PARAMS_DIR}/' directory (incomplete conversion?)")
    return meta


def load(
    path: str | Path,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: Mesh | MeshConfig | ShardingPlan | str | None = None,
    rules=None,
    tokenizer: bool = False,
    **model_kwargs,
) -> DUltra | tuple[DUltra, Any]:
    """Open a model from an original HF checkpoint directory, a converted directory, or a hub id
    ``org/name[@revision]`` (fetched into the hub cache; a local directory of that name wins).

    ``dtype`` is the compute dtype (``"bf16"``/``"fp32"`` strings accepted); ``param_dtype`` the storage dtype
    (defaults to ``dtype``). Extra keyword arguments go to :class:`DUltra` (``attention_impl``, ``remat``,
    ``scan_layers``; ``seed`` for a fresh planner head when the checkpoint has none).

    ``mesh`` (a ``jax.sharding.Mesh``, a spec such as ``"data=1,fsdp=8,tensor=1"``, or a ``ShardingPlan``
    carrying its own rules) returns the model sharded by ``rules`` (default ``dultra_jax.parallel.DEFAULT_RULES``).
    A converted directory is restored straight into those shardings; HF safetensors are read into host memory
    first and then placed (convert once, then load the converted directory on big meshes).

    ``tokenizer=True`` returns ``(model, tokenizer)``: the directory's own tokenizer (an error if it has none).
    """
    path = resolve_model_path(path)
    if tokenizer:
        from dultra_jax.checkpoints.tokenizer import load_tokenizer

        tok = load_tokenizer(path)  # fail before reading the weights
        return load(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, **model_kwargs), tok
    dtype, param_dtype = parse_dtype(dtype), parse_dtype(param_dtype)
    if is_converted(path):
        model_kwargs.pop("seed", None)
        return load_converted(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, **model_kwargs)
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is neither a converted dultra-jax directory (no {FORMAT_FILE}) nor an HF checkpoint "
            "(no config.json)"
        )
    if mesh is None:
        return load_hf(path, dtype=dtype, param_dtype=param_dtype, **model_kwargs)
    plan = _plan(mesh, rules)
    with jax.default_device(jax.devices("cpu")[0]):  # host memory, not one accelerator
        model = load_hf(path, dtype=dtype, param_dtype=param_dtype, **model_kwargs)
    graphdef, state = nnx.split(model)
    if jax.process_count() > 1:  # every host holds the same values; each places its addressable shards
        state = jax.tree.map(np.asarray, state)
    return nnx.merge(graphdef, jax.device_put(state, plan.param_shardings(nnx.split(model)[1])))


def _plan(mesh, rules):
    from dultra_jax.parallel import ShardingPlan  # parallel imports the model only; imported lazily here

    if isinstance(mesh, ShardingPlan):
        if rules is not None:
            raise ValueError("pass rules inside the ShardingPlan, not both")
        return mesh
    return ShardingPlan.create(mesh, rules)


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
    """HF -> converted (default) or any -> HF (``to_hf``); ``src`` may be a hub id ``org/name[@revision]``.
    ``dtype=None`` keeps the stored dtype."""
    src, out = resolve_model_path(src, what="source checkpoint"), Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output directory {out} already exists; pass --overwrite to replace it")
    if src.resolve() == out.resolve():
        raise CheckpointError("source and output directories are the same; choose another output directory")
    check_replaceable(out, source=src)
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
