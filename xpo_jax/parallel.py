"""From one CPU to a TPU pod: a device mesh, sharding rules, the sharded round, pmap, multi-host.

JAX's multi-controller runtime is the distributed engine: every host runs this same program on
its own devices, `jax.sharding` says which slice of each array lives where, and XLA inserts the
collectives. Nothing here is an engine of its own; it is the rules and the plumbing.

    mesh      = make_mesh(data=D, fsdp=F)                 D x F devices, axes ("data", "fsdp")
    params    : each large weight (>= 2-D, >= min_size elements) split over "fsdp" on its largest
                dimension that F divides; small weights (norm scales, biases, tiny kernels)
                replicated. Reference params the same; the optimiser state follows the params
                (the rule is a function of the shape, so Adam's mu/nu get their param's sharding).
    batch     : rows split over ("data", "fsdp") jointly: D*F shards of B/(D*F) prompts. Each
                host builds only its own rows (`host_batch_slice`) and `shard_batch` assembles
                the global array with `jax.make_array_from_process_local_data`.
    the rest  : (rng, round counter, hyperparameters, replay buffer) replicated.

The round itself is unchanged: `jax.jit(round_fn, in_shardings=..., out_shardings=...)` called
under `jax.set_mesh(mesh)`; gradients of a batch-sharded loss come out as XLA all-reduces, FSDP
weights are all-gathered where they are used. With JAX's partitionable threefry (the default,
`jax.config.jax_threefry_partitionable`), the random bits of an array do not depend on how it is
sharded, so the sharded round samples exactly the tokens the one-device round samples.

`pmap_round` is the older form for code that still uses `pmap`: the round's gradients are summed
with `lax.psum` over `axis_name="data"` and divided by the global pair weight (`make_round`'s
`axis_name`), so every replica applies the one-device update.

Multi-host: call `initialize_distributed()` first thing in every process (before anything touches
a JAX device -- note that importing `xpo_jax.tasks` or `xpo_jax.train` does), then build the mesh
from `jax.devices()`, which then lists every process's devices.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
# Weights with fewer elements than this stay replicated: sharding them saves little memory and
# costs an all-gather each use. 1024 keeps the tiny test model's 32x32 / 32x64 kernels sharded.
FSDP_MIN_SIZE = 1024

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------


def make_mesh(data: Optional[int] = None, fsdp: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: `jax.devices()`, every process's devices).

    `data` defaults to len(devices) // fsdp; data * fsdp must equal the number of devices (pass
    `devices=jax.devices()[:k]` to use fewer, single-process only). Without `devices` the device
    order is `jax.make_mesh`'s (topology-aware on TPU); with `devices` it is the list's order,
    reshaped row-major, so `fsdp` neighbours are consecutive devices and, for a process-ordered
    list (as `jax.devices()` is), every host owns a contiguous block of the batch. Both axes are
    `AxisType.Auto`: XLA propagates shardings (jax 0.10's `make_mesh` default is Explicit).
    """
    given = devices is not None
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs)
    if n == 0:
        raise ValueError("make_mesh: no devices")
    if not isinstance(fsdp, (int, np.integer)) or fsdp < 1:
        raise ValueError(f"make_mesh: fsdp must be an int >= 1, got {fsdp!r}")
    if data is None:
        if n % fsdp:
            raise ValueError(f"make_mesh: fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if not isinstance(data, (int, np.integer)) or data < 1:
        raise ValueError(f"make_mesh: data must be an int >= 1, got {data!r}")
    if data * fsdp != n:
        raise ValueError(
            f"make_mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are given; pass "
            f"devices=jax.devices()[:{data * fsdp}] to use a subset (single process only)"
        )
    auto = (jax.sharding.AxisType.Auto,) * 2
    if not given:
        return jax.make_mesh((data, fsdp), (DATA, FSDP), axis_types=auto, devices=devs)
    return Mesh(np.asarray(devs, dtype=object).reshape(data, fsdp), (DATA, FSDP), axis_types=auto)


def _axis_size(mesh: Mesh, name: str) -> int:
    return int(mesh.shape.get(name, 1))


def batch_axes(mesh: Mesh) -> tuple:
    """The mesh axes the batch is split over: ("data", "fsdp") where present."""
    return tuple(a for a in (DATA, FSDP) if a in mesh.axis_names)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over ("data", "fsdp") jointly, other dimensions whole."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


# ----------------------------------------------------------------------------------------------
# Sharding rules
# ----------------------------------------------------------------------------------------------


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """PartitionSpec of one weight: its largest dimension divisible by `fsdp_size` over "fsdp"
    (ties: the first such dimension) when it is >= 2-D with >= `min_size` elements; else P()."""
    shape = tuple(int(s) for s in shape)
    if fsdp_size <= 1 or len(shape) < 2 or math.prod(shape) < min_size:
        return P()
    for d in sorted(range(len(shape)), key=lambda d: -shape[d]):  # stable: ties keep order
        if shape[d] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[d] = FSDP
            return P(*spec)
    return P()


def param_shardings(params: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
    """NamedSharding per leaf of a parameter (or optimiser-state) tree, by `fsdp_spec`."""
    f = _axis_size(mesh, FSDP)
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), f, min_size)), params)


def state_shardings(state: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
    """An XPOState-shaped tree of NamedShardings (works on arrays and on `jax.eval_shape`
    output): params, ref_params and opt_state by the FSDP rule, everything else replicated."""
    rep = replicated(mesh)
    everything = lambda t: jax.tree_util.tree_map(lambda _: rep, t)
    return state.replace(
        step=rep,
        params=param_shardings(state.params, mesh, min_size),
        ref_params=param_shardings(state.ref_params, mesh, min_size),
        opt_state=param_shardings(state.opt_state, mesh, min_size),
        rng=rep,
        round=rep,
        hparams=everything(state.hparams),
        replay=everything(state.replay),
    )


def _put(x: Any, sharding: NamedSharding) -> Array:
    """Place a value that every process holds in full onto a (possibly multi-host) sharding."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) and x.is_fully_addressable else np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_state(state: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
    """`state` (the same full value on every process) placed by `state_shardings`."""
    return jax.tree_util.tree_map(_put, state, state_shardings(state, mesh, min_size))


def abstract_state(run: Any, mesh: Mesh, hparams: Any = None, min_size: int = FSDP_MIN_SIZE) -> Any:
    """The state's shapes, dtypes and target shardings, without materialising it: the
    `like_state` for `Checkpointer.restore` onto `mesh` (any mesh shape, e.g. not the saver's)."""
    hp = run.hparams() if hparams is None else hparams
    shapes = jax.eval_shape(run.init_state, jax.random.PRNGKey(0), hp)
    shardings = state_shardings(shapes, mesh, min_size)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


# ----------------------------------------------------------------------------------------------
# Batches: each host feeds its own rows
# ----------------------------------------------------------------------------------------------


def host_batch_slice(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of a global batch that this process's devices hold under `batch_sharding`.

    Raises if they are not one contiguous block (a device list not ordered by process)."""
    n = math.prod(_axis_size(mesh, a) for a in batch_axes(mesh))
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {n} batch shards "
                         f"(mesh {dict(mesh.shape)})")
    index = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    rows = sorted({(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop) for s in index.values()})
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start or any(b != a2 for (_, b), (a2, _) in zip(rows, rows[1:])):
        raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {rows}; "
                         "build the mesh from a process-ordered device list (e.g. jax.devices())")
    return slice(start, stop)


def shard_batch(mesh: Mesh, *local_arrays: Any, global_batch_size: Optional[int] = None):
    """Global batch arrays from this process's rows (`host_batch_slice`), by
    `jax.make_array_from_process_local_data`: no host ever holds another host's rows.
    Returns one array per argument (a single array for a single argument)."""
    sharding = batch_sharding(mesh)
    out = []
    for x in local_arrays:
        x = np.asarray(x)
        shape = None if global_batch_size is None else (global_batch_size,) + x.shape[1:]
        out.append(jax.make_array_from_process_local_data(sharding, x, shape))
    return out[0] if len(out) == 1 else tuple(out)


def host_prompts(run: Any, mesh: Mesh, data_key: Array, round_idx: int):
    """This round's prompts as global sharded arrays, fed per host.

    The synthetic tasks draw the whole batch from (data_key, round) (tiny), so every host draws
    it and keeps its own rows; a dataset reader would read only `host_batch_slice` rows."""
    B = run.cfg.batch_size
    prompts, mask = jax.device_get(run.prompts_for(data_key, round_idx))
    rows = host_batch_slice(mesh, B)
    return shard_batch(mesh, prompts[rows], mask[rows], global_batch_size=B)


# ----------------------------------------------------------------------------------------------
# The round and train, jitted with shardings
# ----------------------------------------------------------------------------------------------


class ShardedRound(NamedTuple):
    """Jitted, sharded halves of the round; call them as plain functions (they enter
    `jax.set_mesh(mesh)` themselves). Arguments must already carry the shardings below
    (`shard_state`, `shard_batch` / `host_prompts`)."""

    mesh: Mesh
    state_sharding: Any  # XPOState of NamedSharding
    batch_sharding: NamedSharding
    round_fn: Callable  # (state, prompts, prompt_mask) -> (state, metrics)
    make_pairs: Callable  # (state, prompts, prompt_mask) -> (state, Pairs)


def _under_mesh(mesh: Mesh, f: Callable) -> Callable:
    def call(*args):
        with jax.set_mesh(mesh):
            return f(*args)

    call.jitted = f
    return call


def shard_round(run: Any, mesh: Mesh, *, min_size: int = FSDP_MIN_SIZE, donate: bool = False) -> ShardedRound:
    """`run.fns.round_fn` and `make_pairs` jitted with in/out shardings on `mesh`.

    `donate=True` donates the state (as the host loop does): the caller must not reuse it."""
    st = state_shardings(jax.eval_shape(run.init_state, jax.random.PRNGKey(0), run.hparams()), mesh, min_size)
    bs, rep = batch_sharding(mesh), replicated(mesh)
    donate_argnums = (0,) if donate else ()
    round_fn = jax.jit(run.fns.round_fn, in_shardings=(st, bs, bs), out_shardings=(st, rep), donate_argnums=donate_argnums)
    pairs_sh = jax.tree_util.tree_map(lambda _: bs, _pairs_shape(run))
    pairs_sh = pairs_sh._replace(judge_key=rep)
    make_pairs = jax.jit(run.fns.make_pairs, in_shardings=(st, bs, bs), out_shardings=(st, pairs_sh))
    return ShardedRound(mesh, st, bs, _under_mesh(mesh, round_fn), _under_mesh(mesh, make_pairs))


def _pairs_shape(run: Any):
    state = jax.eval_shape(run.init_state, jax.random.PRNGKey(0), run.hparams())
    prompts = jax.ShapeDtypeStruct((run.cfg.batch_size, run.task.prompt_len), jnp.int32)
    return jax.eval_shape(run.fns.make_pairs, state, prompts, prompts)[1]


def sharded_train(cfg: Any, mesh: Mesh, run: Any = None, *, min_size: int = FSDP_MIN_SIZE) -> Callable:
    """`make_train(cfg)` jitted on `mesh`: `train(key, hparams) -> (state, metrics)` with the
    state FSDP-sharded and each round's prompts batch-sharded (sharding constraints inside the
    scan), the final state returned with `state_shardings`, metrics replicated."""
    from xpo_jax.train import build_run, make_train  # late: importing tasks starts the backend

    run = run or build_run(cfg)
    st = state_shardings(jax.eval_shape(run.init_state, jax.random.PRNGKey(0), run.hparams()), mesh, min_size)
    bs, rep = batch_sharding(mesh), replicated(mesh)
    inner = run.fns.round_fn
    wsc = jax.lax.with_sharding_constraint

    def round_fn(state, prompts, prompt_mask):
        state, metrics = inner(wsc(state, st), wsc(prompts, bs), wsc(prompt_mask, bs))
        return wsc(state, st), metrics

    constrained = dataclasses.replace(run, fns=run.fns._replace(round_fn=round_fn))
    train = jax.jit(make_train(cfg, constrained), in_shardings=(rep, rep), out_shardings=(st, rep))
    return _under_mesh(mesh, train)


# ----------------------------------------------------------------------------------------------
# pmap form
# ----------------------------------------------------------------------------------------------


class PmapRound(NamedTuple):
    """pmapped round over `axis_name="data"`: state replicated with a leading device axis
    (`replicate`), batches split [D, B/D, ...] (`split_batch`), metrics per device (identical)."""

    round_fn: Callable  # (state[D], prompts[D,b,P], mask[D,b,P]) -> (state[D], metrics[D])
    update: Callable  # (state[D], Pairs[D], Judgement[D]) -> (state[D], metrics[D])
    fns: Any  # the unmapped RoundFns built with axis_name="data"
    oracle: Callable  # the JAX oracle of the round (unmapped), for the host-judge style
    devices: list


def pmap_round(cfg: Any, run: Any, devices: Optional[Sequence] = None) -> PmapRound:
    """The round as `jax.pmap(..., axis_name="data")`, built from the same pieces as `run.fns`
    (model, oracle options, reward, schedule) with `make_round(..., axis_name="data")`.

    Gradients are `psum`-ed over the devices and divided by the global pair weight, so the update
    is the one-device update on the whole batch. Sampling: each device draws its rows from
    `fold_in(round key, device index)` -- independent, valid noise, but not the one-device
    round's tokens (a device cannot draw "its rows" of a global [B, V] draw without computing the
    whole draw; the jit + sharding path can, see the module docstring). The shared `rng` advances
    identically on every device, so the state stays replicated. With a replay buffer, each device
    keeps the pairs of its own rows (a per-device buffer, capacity per device).
    """
    from xpo_jax.oracles import reward_fn_oracle
    from xpo_jax.round import make_optimizer, make_round

    task = run.task
    oracle = reward_fn_oracle(
        task.reward_fn, eos_id=task.eos_id, bradley_terry=cfg.bradley_terry,
        missing_eos_penalty=cfg.missing_eos_penalty, mask_identical=cfg.mask_identical,
    )
    fns = make_round(
        cfg, apply_fn=run.apply_fn, eos_id=task.eos_id, pad_id=task.pad_id, max_new_tokens=run.max_new_tokens,
        oracle=oracle, true_reward_fn=task.reward_fn, lr_schedule=make_optimizer(cfg)[1], axis_name=DATA,
    )
    devices = list(jax.local_devices() if devices is None else devices)

    def round_fn(state, prompts, prompt_mask):
        shared, per_round = jax.random.split(state.rng)
        local = state.replace(rng=jax.random.fold_in(per_round, jax.lax.axis_index(DATA)))
        local, pairs = fns.make_pairs(local, prompts, prompt_mask)
        judgement = oracle(pairs.judge_key, pairs.prompts, pairs.prompt_mask, pairs.y.tokens, pairs.y.mask,
                           pairs.yt.tokens, pairs.yt.mask)
        new, metrics = fns.update(local, pairs, judgement)
        return new.replace(rng=shared), metrics

    pm = lambda f: jax.pmap(f, axis_name=DATA, devices=devices)
    return PmapRound(pm(round_fn), pm(fns.update), fns, oracle, devices)


def replicate(tree: Any, n: int) -> Any:
    """Stack `n` copies of every leaf (a pmap argument replicated over n devices)."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def unreplicate(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def split_batch(tree: Any, n: int) -> Any:
    """[B, ...] -> [n, B/n, ...] for every leaf (rows in order: device i gets rows i*B/n ...)."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split over {n} devices")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree_util.tree_map(split, tree)


# ----------------------------------------------------------------------------------------------
# Multi-host initialisation
# ----------------------------------------------------------------------------------------------

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


def gather(tree: Any) -> Any:
    """Every leaf as a full numpy array on every process (`process_allgather` when multi-host)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# ----------------------------------------------------------------------------------------------
# The host loop on a mesh (one host or many) and `python -m xpo_jax.parallel`
# ----------------------------------------------------------------------------------------------


def train_sharded(cfg: Any, mesh: Mesh, run: Any = None, *, out_dir: Optional[str] = None,
                  min_size: int = FSDP_MIN_SIZE, verbose: bool = True) -> tuple[Any, list]:
    """Online rounds on `mesh` from Python, the same program in every process.

    Each round every process draws the round's prompts and feeds only its rows (`host_prompts`);
    the round is `shard_round`'s (state donated). With `out_dir`, process 0 writes
    metrics.jsonl and config.json there, and every process takes part in orbax checkpoints
    (out_dir/checkpoints, every cfg.checkpoint_every rounds and at the end; with several hosts
    it must be a directory all of them see, e.g. a GCS bucket); `cfg.resume` restores the latest
    one onto this mesh, whatever mesh saved it. Exact evaluation (built-in tasks) every
    cfg.eval_every rounds and after the last. Returns (final sharded state, per-round metric dicts (floats, every process))."""
    import json
    import math as _math

    from xpo_jax.config import check_resumable
    from xpo_jax.train import build_run

    if getattr(cfg, "policy", None) is not None and run is None:
        raise ValueError("train_sharded: --policy (Hugging Face) runs are not wired to a mesh yet; built-in tasks only")
    run = run or build_run(cfg)
    lead = jax.process_index() == 0
    key = jax.random.PRNGKey(cfg.seed)
    data_key = run.data_key(key)
    sharded = shard_round(run, mesh, min_size=min_size, donate=True)
    # Jitted once, outside the loop: a fresh jax.jit per evaluation would recompile each time.
    evaluate = jax.jit(run.evaluate) if getattr(run, "has_exact_eval", False) else None
    state, start, ckpt, log = None, 0, None, None
    if out_dir is not None:
        from xpo_jax.checkpoint import Checkpointer

        ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=cfg.keep_checkpoints)
        if cfg.resume and ckpt.latest_round() is not None:
            state, saved, pos = ckpt.restore(abstract_state(run, mesh, min_size=min_size))
            check_resumable(saved, cfg.to_dict())
            start = int(pos["round"])
        if lead:  # epath: local folders and gs:// buckets alike (orbax's own path type)
            from etils import epath

            out = epath.Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(cfg.to_json())
            log = (out / "metrics.jsonl").open("a" if start else "w")
    if state is None:
        state = shard_state(run.init_state(key, run.hparams()), mesh, min_size)
    if verbose and lead:
        rows = host_batch_slice(mesh, cfg.batch_size)
        print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices in {jax.process_count()} process(es); "
              f"process 0 feeds rows {rows.start}:{rows.stop} of {cfg.batch_size}; rounds {start + 1}..{cfg.rounds}",
              flush=True)
    history = []
    try:
        for r in range(start, cfg.rounds):
            state, metrics = sharded.round_fn(state, *host_prompts(run, mesh, data_key, r))
            m = {k: float(v) for k, v in gather(metrics).items()}
            if not _math.isfinite(m["loss"]):
                raise FloatingPointError(f"round {r + 1}: loss {m['loss']}; stopping (nothing saved for it)")
            m["round"] = r + 1
            due = cfg.eval_every and ((r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds)
            if due and evaluate is not None:
                with jax.set_mesh(mesh):
                    m.update({k: float(v) for k, v in gather(evaluate(state)).items()})
            history.append(m)
            if log is not None:
                log.write(json.dumps(m) + "\n")
                log.flush()
            if verbose and lead and (r + 1 == cfg.rounds or (r + 1) % max(1, cfg.rounds // 10) == 0):
                shown = {k: m[k] for k in ("loss", "task/reward", "objective/kl", "eval/j_beta") if k in m}
                print(f"round {r + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()), flush=True)
            due = cfg.checkpoint_every and (r + 1) % cfg.checkpoint_every == 0
            if ckpt is not None and (due or r + 1 == cfg.rounds):
                ckpt.save(r + 1, state, cfg.to_dict(), {"round": r + 1})
    finally:
        if log is not None:
            log.close()
        if ckpt is not None:
            ckpt.close()
    return state, history


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m xpo_jax.parallel [--data D] [--fsdp F] [--coordinator-address H:P --num-processes N
    --process-id I] [every train flag]`: online training on a device mesh, on one host or many
    (run the same command on every host; on a Cloud TPU pod no distributed flags are needed)."""
    import argparse
    import sys

    from xpo_jax.config import TrainConfig, add_config_flags, config_from_args

    ap = argparse.ArgumentParser(prog="python -m xpo_jax.parallel", description=main.__doc__)
    ap.add_argument("--data", type=int, default=None, help="data-parallel size (default: devices / fsdp)")
    ap.add_argument("--fsdp", type=int, default=1, help="FSDP size: large weights split over this many devices")
    ap.add_argument("--distributed", action="store_true",
                    help="join a multi-process run (initialize_distributed; implied by the three flags below)")
    ap.add_argument("--coordinator-address", default=None, help="host:port of process 0 ($JAX_COORDINATOR_ADDRESS)")
    ap.add_argument("--num-processes", type=int, default=None, help="$JAX_NUM_PROCESSES")
    ap.add_argument("--process-id", type=int, default=None, help="$JAX_PROCESS_ID")
    add_config_flags(ap)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.distributed or any(v is not None for v in (args.coordinator_address, args.num_processes, args.process_id)):
        info = initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        print(f"process {info['process_index']} of {info['process_count']}: {info['local_device_count']} local "
              f"of {info['device_count']} {info['platform']} devices", flush=True)
    cfg = config_from_args(args, base=TrainConfig(name="sharded"))
    try:
        cfg.validate()
        mesh = make_mesh(args.data, args.fsdp)
    except ValueError as e:
        print(f"python -m xpo_jax.parallel: error: {e}", file=sys.stderr)
        return 2
    out = os.path.join(cfg.run_dir, cfg.name)
    _, history = train_sharded(cfg, mesh, out_dir=out)
    if jax.process_index() == 0:
        last = history[-1] if history else {}
        if "eval/j_beta" in last:
            print(f"exact J_beta {last['eval/j_beta']:.4f}, P(optimal) {last['eval/p_optimal']:.4f}")
        print(f"wrote {out}/ (metrics.jsonl, config.json, checkpoints/)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
