"""Multi-host plumbing: joining a multi-process run, and the few host-side agreements a host
loop needs (every process takes the same branch, reads its own copy, waits at a barrier).

JAX's multi-controller runtime is the engine: every process runs the same program on its own
devices. Call `initialize_distributed()` first thing in every process (before anything touches a
JAX device); `jax.devices()` then lists every process's devices. Imports nothing of xpo_jax.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"initialize_distributed: ${name}={v!r} is not an integer") from None


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_device_ids: Optional[Sequence[int]] = None,
    *,
    initialization_timeout: int = 300,
    cpu_collectives: Optional[str] = "gloo",
) -> dict:
    """Join this process to a multi-process JAX run (`jax.distributed.initialize`), with checks.

    Call it first, in every process, before anything touches a JAX device (`jax.devices()`, any
    computation, or importing `xpo_jax.tasks` / `xpo_jax.train`, which build arrays on import).

    Arguments (each falls back to an environment variable, then to JAX's cluster auto-detection
    -- Cloud TPU pods, SLURM, Open MPI, Kubernetes -- when still unset):
      coordinator_address: "host:port" of process 0, the same string in every process
        ($JAX_COORDINATOR_ADDRESS). Process 0 listens on that port.
      num_processes: how many processes in total ($JAX_NUM_PROCESSES).
      process_id: this process's rank in [0, num_processes) ($JAX_PROCESS_ID).
      local_device_ids: the local devices this process uses (GPU ids; $JAX_LOCAL_DEVICE_IDS).
      cpu_collectives: the CPU cross-process collectives ("gloo"; None leaves JAX's setting);
        only matters for CPU devices, where without it cross-process collectives fail.

    On a Cloud TPU pod call it with no arguments on every host. Returns a summary dict
    (process_index, process_count, local/global device counts). Calling it again after a
    successful call returns the summary without re-initialising.
    """
    from jax._src import xla_bridge

    if jax.distributed.is_initialized():
        return _distributed_summary()
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator_address is not None and not _ADDRESS.match(coordinator_address):
        raise ValueError(f"initialize_distributed: coordinator_address={coordinator_address!r} must be "
                         "'host:port', e.g. '10.0.0.1:1234' or 'localhost:12345'")
    if num_processes is not None and (not isinstance(num_processes, int) or num_processes < 1):
        raise ValueError(f"initialize_distributed: num_processes={num_processes!r} must be an int >= 1")
    if process_id is not None and (not isinstance(process_id, int) or process_id < 0):
        raise ValueError(f"initialize_distributed: process_id={process_id!r} must be an int >= 0")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(f"initialize_distributed: process_id={process_id} must be < num_processes={num_processes}")
    manual = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in manual) and any(v is None for v in manual) and not _cluster_detected():
        missing = [n for n, v in zip(("coordinator_address", "num_processes", "process_id"), manual) if v is None]
        raise ValueError(f"initialize_distributed: {', '.join(missing)} not given (nor set in the environment) and no "
                         "cluster (TPU pod, SLURM, MPI, Kubernetes) was detected to supply them")
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "initialize_distributed() must run before anything initialises JAX's backend (jax.devices(), any "
            "computation, device_put, or importing xpo_jax.tasks / xpo_jax.train). Call it first in the process."
        )
    if cpu_collectives is not None and "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
            local_device_ids=local_device_ids, initialization_timeout=initialization_timeout,
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the arguments that were used
        raise RuntimeError(
            f"jax.distributed.initialize(coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}) failed: {type(e).__name__}: {e}. Check that every process uses the same "
            "coordinator address, that process 0 is running and its port is reachable, and that process ids are "
            "distinct and below num_processes."
        ) from e
    return _distributed_summary()


def _cluster_detected() -> bool:
    try:
        from jax._src import clusters

        return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types)
    except Exception:  # noqa: BLE001 - private API; assume none
        return False


def _distributed_summary() -> dict:
    return dict(
        process_index=jax.process_index(), process_count=jax.process_count(),
        local_device_count=jax.local_device_count(), device_count=jax.device_count(),
        platform=jax.devices()[0].platform,
    )


def first_copy(tree: Any) -> Any:
    """Every leaf of a replicated tree as numpy, read from this process's first copy (no
    cross-host traffic: each process holds the whole value)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def any_process(flag: bool) -> bool:
    """True when `flag` is True in any process (a host all-reduce; every process must call it),
    so that all processes take the same branch (e.g. stop and save after a signal)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def all_processes(values: Sequence[int]) -> np.ndarray:
    """[process_count, len(values)]: every process's small integer vector, on every process."""
    v = np.asarray(values, np.int64)[None]
    if jax.process_count() == 1:
        return v
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(v, tiled=True)).reshape(jax.process_count(), -1)


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
