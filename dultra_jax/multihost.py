"""Multi-host: joining a job of several JAX processes, and the host-side reads of rows that live elsewhere.

- :func:`initialize_distributed`: ``jax.distributed.initialize()`` from the usual environment on several hosts
  (gloo collectives for CPU devices), a no-op on one.
- :func:`local_rows` / :func:`gather_rows` / :func:`gather_objects`: this process's rows of a global array,
  everybody's rows of a host array, everybody's JSON-able records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["distributed_settings", "gather_objects", "gather_rows", "initialize_distributed", "is_primary",
           "local_rows"]

_COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
_NUM_PROCESSES_VARS = ("JAX_NUM_PROCESSES", "NUM_PROCESSES")
_PROCESS_ID_VARS = ("JAX_PROCESS_ID", "PROCESS_ID")


def _first(env: Mapping[str, str], names: Sequence[str]) -> tuple[str, str] | None:
    for n in names:
        if env.get(n, "").strip():
            return n, env[n].strip()
    return None


def distributed_settings(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Arguments for ``jax.distributed.initialize`` from the environment, or None on a single host.

    Explicit: ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (the
    ``JAX_`` prefix is optional). Otherwise a SLURM or Open MPI job of several tasks is detected by JAX itself
    (returns ``{}``).
    """
    env = os.environ if env is None else env
    coord, nproc, pid = (_first(env, v) for v in (_COORDINATOR_VARS, _NUM_PROCESSES_VARS, _PROCESS_ID_VARS))
    if coord or nproc or pid:
        try:
            n = int(nproc[1]) if nproc else None
            i = int(pid[1]) if pid else None
        except ValueError as e:
            raise ValueError(f"multi-host environment: process count / id must be integers ({e})") from e
        if n == 1 and not coord:
            return None
        missing = [names[0] for names, got in ((_COORDINATOR_VARS, coord), (_NUM_PROCESSES_VARS, nproc),
                                                (_PROCESS_ID_VARS, pid)) if not got]
        if missing:
            raise ValueError(f"multi-host environment is incomplete: set {missing} as well "
                             f"(have {[g[0] for g in (coord, nproc, pid) if g]})")
        if not 0 <= i < n:
            raise ValueError(f"{pid[0]}={i} is outside [0, {nproc[0]}={n})")
        return {"coordinator_address": coord[1], "num_processes": n, "process_id": i}
    for size_var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(size_var, "").isdigit() and int(env[size_var]) > 1:
            return {}
    return None


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Join the multi-host job described by the environment (before any other JAX call); no-op on one host.

    Returns whether JAX runs distributed. CPU devices of several processes talk through gloo (JAX's CPU
    backend has no cross-process collectives otherwise); the setting only concerns CPU devices, so it is set
    whatever the accelerator (unless ``jax_cpu_collectives_implementation`` was chosen already).
    """
    if jax.distributed.is_initialized():
        return True
    settings = distributed_settings(env)
    if settings is None:
        return False
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
    return True


def is_primary() -> bool:
    """Process 0: the one that writes metrics, configs and other single-copy files."""
    return jax.process_index() == 0


def local_rows(a: Any, axis: int = 0) -> np.ndarray:
    """This process's rows of a global array (batch split along ``axis``) as numpy, in global row order.

    On one process, the whole array. Other axes must not be split over processes (only the batch is).
    """
    if not isinstance(a, jax.Array) or a.is_fully_addressable:
        return np.asarray(a)
    pieces: dict[int, np.ndarray] = {}
    for shard in a.addressable_shards:
        idx = shard.index[axis]
        pieces.setdefault(idx.start or 0, np.asarray(shard.data))
    out = np.concatenate([pieces[k] for k in sorted(pieces)], axis=axis)
    other = [d for i, d in enumerate(out.shape) if i != axis]
    if other != [d for i, d in enumerate(a.shape) if i != axis]:
        raise ValueError(f"local_rows: array {a.shape} is split over processes along an axis other than {axis}")
    return out


def gather_rows(x: Any) -> np.ndarray:
    """Every process's rows of a host array (concatenated along axis 0 in process order): what rewards,
    advantages and logged statistics need from the rows computed elsewhere. On one process, ``x`` itself."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_objects(items: list[Any], default=None) -> list[Any]:
    """Every process's JSON-able ``items`` on every process (concatenated in process order, as JSON bytes through
    ``process_allgather``); ``items`` itself on one process. ``default`` is ``json.dumps``'s hook."""
    if jax.process_count() == 1:
        return items
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(items, default=default).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: data.size] = data
    everything = np.asarray(multihost_utils.process_allgather(buf))
    return [r for k, n in enumerate(sizes) for r in json.loads(everything[k, : int(n)].tobytes().decode())]
