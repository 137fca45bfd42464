"""From one CPU to a TPU pod: the device mesh and the one object that says where arrays live.

JAX's multi-controller runtime is the distributed engine: every host runs the same program on
its own devices, `jax.sharding` says which slice of each array lives where, and XLA inserts the
collectives. Nothing here is an engine of its own: it is the rules, kept in one place, and it
imports nothing of xpo_jax (multi-host plumbing is `xpo_jax.distributed`).

    mesh      = make_mesh(data=D, fsdp=F, tensor=T)     D x F x T devices, axes (data, fsdp, tensor)
    layout    = Layout(mesh)                            built once per run; everything that needs
                                                        the mesh takes the layout
    params    : Megatron-style over "tensor" (`tensor_dim`): attention q/k/v split by output
                columns, o by input rows, the MLP hidden dimension (gate/up columns, down rows),
                the vocabulary of the embedding and the LM head; norms and biases replicated.
                Then FSDP over "fsdp" (`fsdp_spec`): each large weight (>= 2-D, >= min_size
                elements) split on its largest remaining dimension that F divides. The reference,
                the reward model and the optimiser state follow the same rules (a function of
                the parameter's path and shape, so Adam's mu/nu get their parameter's sharding).
                A quantized kernel's codes and scales (QLoRA) are split as their kernel.
    batch     : rows split over ("data", "fsdp") jointly: D*F shards of B/(D*F) prompts, whole
                on every "tensor" device. Each host builds only its own rows (`host_rows`) and
                `shard_batch` assembles the global array with
                `jax.make_array_from_process_local_data`.
    the rest  : (rng, round counter, hyperparameters, replay buffer) replicated.
    decoding  : `decode_params` casts the weights to the compute dtype, then reshards them once
                per round into the decode layout (`decode_spec`: Megatron over the model axes
                fsdp x tensor together, replicated over data) so that the sampler's loops move
                only activations. Inside the model, `pin_batch` / `pin_heads` keep activations
                split by batch (training: rows over data x fsdp; decoding: hidden states over
                data only, the attention and its KV cache over data x fsdp by rows and "tensor"
                by KV heads), set for a traced region by `with layout.activations(mode)`.

The round itself is unchanged: jitted with these in/out shardings, gradients of a batch-sharded
loss come out as XLA collectives and sharded weights are gathered where they are used. With JAX's
partitionable threefry (`jax.config.jax_threefry_partitionable`, the default), the random bits of
an array do not depend on how it is sharded, so a sharded round samples exactly the tokens the
one-device round samples.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
BATCH_AXES = (DATA, FSDP)
# Weights with fewer elements than this stay replicated: sharding them saves little memory and
# costs an all-gather each use. 1024 keeps the tiny test model's 32x32 / 32x64 kernels sharded.
FSDP_MIN_SIZE = 1024
STACKED_LAYERS = "layers"  # the parameter key of scan_layers' stacked decoder layers

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------


def _size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"make_mesh: {name} must be an int >= 1, got {value!r}")
    return int(value)


def make_mesh(data: Optional[int] = None, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: `jax.devices()`, every process's).

    `data` defaults to len(devices) // (fsdp * tensor); data * fsdp * tensor must equal the number
    of devices (pass `devices=jax.devices()[:k]` to use fewer, single process only). Without
    `devices` the device order is `jax.make_mesh`'s (topology-aware on TPU: "tensor", the axis
    that talks most, gets the closest devices); with `devices` it is the list's order, reshaped
    row-major, so "tensor" neighbours are consecutive devices and, for a process-ordered list (as
    `jax.devices()` is), every host owns a contiguous block of the batch. The axes are
    `AxisType.Auto`: XLA propagates shardings.
    """
    given = devices is not None
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs)
    if n == 0:
        raise ValueError("make_mesh: no devices")
    fsdp, tensor = _size("fsdp", fsdp), _size("tensor", tensor)
    if data is None:
        if n % (fsdp * tensor):
            raise ValueError(f"make_mesh: fsdp={fsdp} x tensor={tensor} does not divide the {n} devices")
        data = n // (fsdp * tensor)
    data = _size("data", data)
    if data * fsdp * tensor != n:
        raise ValueError(
            f"make_mesh: data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, but {n} are "
            f"given; pass devices=jax.devices()[:{data * fsdp * tensor}] to use a subset (single process only)")
    shape, auto = (data, fsdp, tensor), (jax.sharding.AxisType.Auto,) * 3
    if not given:
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devs)
    return Mesh(np.asarray(devs, dtype=object).reshape(shape), AXES, axis_types=auto)


# ----------------------------------------------------------------------------------------------
# Parameter rules: a function of a weight's path and shape
# ----------------------------------------------------------------------------------------------

# Megatron-style splits over "tensor", by the module a weight belongs to: which dimension of its
# kernel (counted from the end, so a stacked [n_layers, ...] kernel is split the same way).
# Column-parallel layers split their output, row-parallel ones their input: within one attention
# or MLP block the activations then stay split by heads / hidden units from the column layer to the
# row layer, and one all-reduce of the row layer's output joins them.
TENSOR_SPLITS: dict[str, tuple[str, int]] = {
    "q_proj": ("kernel", -1), "k_proj": ("kernel", -1), "v_proj": ("kernel", -1),  # columns: heads
    "o_proj": ("kernel", -2),  # rows: heads
    "gate_proj": ("kernel", -1), "up_proj": ("kernel", -1),  # columns: hidden units
    "down_proj": ("kernel", -2),  # rows: hidden units
    "embed_tokens": ("embedding", -2),  # [V, D]: the vocabulary
    "lm_head": ("kernel", -1),  # [D, V]: the vocabulary
}


# A quantized kernel (`xpo_jax.models.quant`, QLoRA's frozen base) is stored as codes and scales
# in place of "kernel"; both keep the kernel's rank, output axis and the order of its inputs, so
# the kernel's rule splits them too (a row-split scale [.., in / block, out] only where the split
# divides it: each shard then holds its own codes' scales).
KERNEL_CODES, KERNEL_SCALE = "kernel_q", "kernel_scale"
QUANTIZED = (KERNEL_CODES, KERNEL_SCALE)

# LoRA adapters (`xpo_jax.models.lora`: lora_a [in, r], lora_b [r, out] beside a kernel) are split
# as their kernel is on the dimension they share with it: a column-parallel layer's lora_b by its
# output columns, a row-parallel layer's lora_a by its input rows; the rank dimension and the
# other adapter stay whole. x A then needs no gather of A (row layers: a partial sum, reduced with
# the kernel's), and (x A) B comes out split like x W.
LORA_SPLITS: dict[str, tuple[str, int]] = {
    module: ("lora_b", -1) if dim == -1 else ("lora_a", -2)
    for module, (leaf, dim) in TENSOR_SPLITS.items() if leaf == "kernel" and module != "lm_head"}


def _names(path: Sequence) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def split_dim(path: Sequence, shape: Sequence[int]) -> Optional[int]:
    """The dimension of the weight at `path` that Megatron's rules split (TENSOR_SPLITS, and
    LORA_SPLITS for adapters), counted from the start; None when no rule names it."""
    names = _names(path)
    if len(names) < 2:
        return None
    for table in (TENSOR_SPLITS, LORA_SPLITS):
        rule = table.get(names[-2])
        leaf = "kernel" if names[-1] in QUANTIZED else names[-1]
        if rule is not None and leaf == rule[0] and len(shape) >= -rule[1]:
            return len(shape) + rule[1]
    return None


def tensor_dim(path: Sequence, shape: Sequence[int], tensor_size: int) -> Optional[int]:
    """The dimension of the weight at `path` that "tensor" splits (TENSOR_SPLITS), or None:
    replicated over "tensor" (norms, biases, other weights, or a dimension `tensor_size` does not
    divide, e.g. GQA's k/v columns when there are fewer KV heads than tensor devices)."""
    if tensor_size <= 1:
        return None
    d = split_dim(path, shape)
    return d if d is not None and shape[d] % tensor_size == 0 else None


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = FSDP_MIN_SIZE, stacked: bool = False,
              taken: Optional[int] = None, prefer_last: bool = False) -> list:
    """Per-dimension axis names of one weight under FSDP: its largest dimension divisible by
    `fsdp_size` (ties: the first; never `taken`, nor the stacked layer axis) over "fsdp", when it
    is >= 2-D with >= `min_size` elements. `stacked`: the leading axis indexes layers
    (`scan_layers`); it is never split, so each step of the layer scan finds its layer's shards.
    `prefer_last`: the last dimension first when it divides (a quantized kernel's codes and
    scales share only their output axis: split alike there, each shard dequantizes alone)."""
    shape = tuple(int(s) for s in shape)
    spec = [None] * len(shape)
    first = 1 if stacked else 0
    if fsdp_size <= 1 or len(shape) - first < 2 or math.prod(shape[first:]) < min_size:
        return spec
    order = sorted(range(first, len(shape)), key=lambda d: -shape[d])  # stable: ties keep order
    for d in ([len(shape) - 1] if prefer_last else []) + order:
        if d != taken and shape[d] % fsdp_size == 0:
            spec[d] = FSDP
            return spec
    return spec


# ----------------------------------------------------------------------------------------------
# Activation layout of the region being traced
# ----------------------------------------------------------------------------------------------

# (layout, mode) while a region is traced under `Layout.activations(mode)`; None elsewhere (one
# device, a sweep's vmap, tests calling the model directly): then the pins below are identities.
# A context variable rather than an argument: the model's modules are built by the tasks and
# the HF loaders, which know nothing of meshes, and it is read only while tracing.
ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar("xpo_jax_activations", default=None)
# TRAIN: full-sequence forwards and the backward; DECODE: the sampler's steps; PREFILL: the
# sampler's prompt pass (rows split as TRAIN, its last position's logits as DECODE's).
TRAIN, DECODE, PREFILL = "train", "decode", "prefill"


def _axes_dividing(layout: "Layout", axes: Sequence[str], size: int):
    """The axes of `axes` (present in the mesh, size > 1) as a spec entry, or None when they are
    none or their product does not divide `size`."""
    axes = tuple(a for a in axes if a in layout.mesh.axis_names and layout.mesh.shape[a] > 1)
    n = math.prod(layout.mesh.shape[a] for a in axes)
    if not axes or size % n:
        return None
    return axes[0] if len(axes) == 1 else axes


def pin_batch(x: Array) -> Array:
    """`x` [B, ...] (hidden states [B, T, D], token ids and masks [B, T]) constrained by rows to
    the traced region's batch axes: data x fsdp when training (FSDP then gathers weights and
    reduce-scatters gradients instead of all-reducing full-batch partial sums), data only when
    decoding (the weights are split over fsdp x tensor, so the rows are whole there). Identity
    outside a `Layout.activations` region or when the rows do not divide."""
    active = ACTIVATIONS.get()
    if active is None:
        return x
    layout, mode = active
    rows = _axes_dividing(layout, (DATA,) if mode == DECODE else BATCH_AXES, x.shape[0])
    spec = P(rows, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, spec))


def model_axes(layout: "Layout", size: int):
    """The model-parallel axes that split a dimension of `size` in the decode layout: fsdp x
    tensor together when their product divides it, else the larger single one that does, else
    None (replicated)."""
    options = [(FSDP, TENSOR)] + sorted([(FSDP,), (TENSOR,)], key=lambda a: -layout.shape[a[0]])
    return next((ax for ax in (_axes_dividing(layout, o, size) for o in options) if ax), None)


def pin_columns(x: Array, logits: bool = False) -> Array:
    """Decoding only: `x` [B, ..., F] (a column-parallel layer's output: q / k / v, gate / up, and
    the attention's output entering o_proj) split over the model axes on its last dimension, as
    the weights of the decode layout leave it, rows over data. Without it XLA may split the rows
    instead, and gather the weight to do so. `logits`: the LM head's output [.., V], split by
    vocabulary in PREFILL too (else XLA gathers the whole head to give each device its rows'
    logits; the sampler then moves the [B, V] logits to rows with an all-to-all). Identity
    elsewhere."""
    active = ACTIVATIONS.get()
    if active is None or active[1] not in ((DECODE, PREFILL) if logits else (DECODE,)):
        return x
    layout = active[0]
    spec = P(_axes_dividing(layout, (DATA,), x.shape[0]), *([None] * (x.ndim - 2)), model_axes(layout, x.shape[-1]))
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, spec))


def pin_codes_gathered(x: Array, path: Sequence[str]) -> Array:
    """Training only: a quantized kernel's codes or scales at `path` (one layer, inside the model)
    constrained to their parameter sharding without "fsdp". FSDP's all-gather then moves the codes
    (1 or 0.5 byte a weight) and each device dequantizes the whole kernel; unconstrained, XLA
    dequantizes each shard and gathers floats. Identity elsewhere (decoding and prefill read the
    decode layout, which is never gathered)."""
    active = ACTIVATIONS.get()
    if active is None or active[1] != TRAIN:
        return x
    layout = active[0]
    spec = [None if a == FSDP else a for a in layout.param_spec(path, x.shape)]
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, P(*spec)))


def pin_rows(x: Array) -> Array:
    """`x` [B, ...] split by rows over data x fsdp in any mode (the sampler's logits [B, V]: each
    device draws the tokens of its own rows). Identity outside a `Layout.activations` region."""
    active = ACTIVATIONS.get()
    if active is None:
        return x
    layout, _ = active
    spec = P(_axes_dividing(layout, BATCH_AXES, x.shape[0]), *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, spec))


def pin_heads(x: Array, stacked: bool = False) -> Array:
    """`x` [B, Hkv, ...] (the attention's q [B, Hkv, G, T, Dh], k / v and the KV cache [B, Hkv, S,
    Dh]; with `stacked` a leading [n_layers] axis) split by rows over data x fsdp and by KV heads
    over "tensor" (Megatron). KV heads that "tensor" does not divide (GQA with fewer KV heads
    than tensor devices) stay replicated over it. Identity outside a `Layout.activations` region."""
    active = ACTIVATIONS.get()
    if active is None:
        return x
    layout, _ = active
    lead = [None] if stacked else []
    b, h = (1, 2) if stacked else (0, 1)
    spec = lead + [_axes_dividing(layout, BATCH_AXES, x.shape[b]), _axes_dividing(layout, (TENSOR,), x.shape[h])]
    spec += [None] * (x.ndim - len(spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, P(*spec)))


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------


class Layout:
    """Where every array of a run lives on `mesh`: built once per run and handed to everything
    that needs the mesh (the trainer, the pure program, the loaders, the evaluation). The one
    place of the sharding rules, placement and the batch-divides-mesh checks."""

    def __init__(self, mesh: Mesh, min_size: int = FSDP_MIN_SIZE):
        missing = [a for a in mesh.axis_names if a not in AXES]
        if missing:
            raise ValueError(f"Layout: unknown mesh axes {missing}; expected a subset of {AXES} (make_mesh)")
        self.mesh, self.min_size = mesh, min_size
        self.data, self.fsdp, self.tensor = (int(mesh.shape.get(a, 1)) for a in AXES)
        self.batch_shards = self.data * self.fsdp
        self.replicated = NamedSharding(mesh, P())
        self.batch = NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))

    @classmethod
    def of(cls, mesh: Union["Layout", Mesh, None] = None) -> "Layout":
        """`mesh` as a Layout: a Layout as is, a Mesh wrapped, None one device."""
        if isinstance(mesh, Layout):
            return mesh
        return cls(make_mesh(1, 1, 1, devices=jax.devices()[:1]) if mesh is None else mesh)

    def __repr__(self) -> str:
        return f"Layout(data={self.data}, fsdp={self.fsdp}, tensor={self.tensor})"

    @property
    def shape(self) -> dict:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    # -- parameters ---------------------------------------------------------------------------

    def param_spec(self, path: Sequence, shape: Sequence[int]) -> P:
        """The PartitionSpec of the weight at `path` with `shape`: tensor first, then FSDP."""
        names = _names(path)
        stacked = STACKED_LAYERS in names
        t = tensor_dim(path, shape, self.tensor)
        quantized = bool(names) and names[-1] in QUANTIZED
        spec = fsdp_spec(shape, self.fsdp, self.min_size, stacked, taken=t, prefer_last=quantized)
        if t is not None:
            spec[t] = TENSOR
        while spec and spec[-1] is None:  # P() for a replicated weight, P(None, "fsdp") ...
            spec.pop()
        return P(*spec)

    def param_fn(self) -> Callable:
        """`(param_path, shape) -> NamedSharding`: for loaders that build each parameter straight
        into its sharding (`xpo_jax.models.hf.load_hf(..., shardings=...)`)."""
        return lambda path, shape: NamedSharding(self.mesh, self.param_spec(path, tuple(shape)))

    def params(self, tree: Any) -> Any:
        """A NamedSharding per leaf of a parameter (or optimiser-state) tree."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x: NamedSharding(self.mesh, self.param_spec(path, np.shape(x))), tree)

    def state(self, state: Any) -> Any:
        """An XPOState-shaped tree of NamedShardings (arrays or `jax.eval_shape` output): params,
        ref_params and opt_state by the parameter rules, everything else replicated."""
        rep = self.replicated
        everything = lambda t: jax.tree_util.tree_map(lambda _: rep, t)
        return state.replace(step=rep, params=self.params(state.params), ref_params=self.params(state.ref_params),
                             opt_state=self.params(state.opt_state), rng=rep, round=rep,
                             hparams=everything(state.hparams), replay=everything(state.replay))

    def abstract_state(self, shapes: Any) -> Any:
        """`shapes` (an XPOState of `jax.ShapeDtypeStruct`) with their shardings: the target of a
        checkpoint restore onto this mesh, nothing materialised."""
        return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                      shapes, self.state(shapes))

    # -- decoding -----------------------------------------------------------------------------

    def decode_spec(self, path: Sequence, shape: Sequence[int]) -> P:
        """The PartitionSpec of a weight in the decode layout: the TENSOR_SPLITS dimension split
        over fsdp x tensor together when their product divides it, else over the larger single
        axis that does; everything else (norms, biases, a score head) replicated. Replicated
        over data. Megatron over every model-parallel device: a decode step's matmuls need no
        weight from another device, only activations cross (an all-reduce of [B, D] after each
        row-split layer, the rows' reshuffles around the attention)."""
        spec: list = [None] * len(shape)
        d = split_dim(path, shape)
        if d is not None:
            spec[d] = model_axes(self, shape[d])
            if _names(path)[-1] == KERNEL_SCALE and spec[d] != _axes_dividing(self, (FSDP, TENSOR), shape[d]):
                spec[d] = None  # fsdp x tensor together or whole: always where its codes' shard is
        while spec and spec[-1] is None:
            spec.pop()
        return P(*spec)

    def decode_params(self, tree: Any, dtype: Any = None) -> Any:
        """`tree` (parameters, inside a jitted program) in the decode layout: floating leaves
        wider than `dtype` cast to it FIRST (a float32 master weight never crosses the
        interconnect to be used in bfloat16), then constrained to `decode_spec`. On one device
        only the cast. A quantized kernel's codes and scales are left as they are (the module
        dequantizes them: sampling and training use the same weights)."""
        def one(path, x):
            quantized = _names(path)[-1:] and _names(path)[-1] in QUANTIZED
            wider = jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize > jnp.dtype(dtype or x.dtype).itemsize
            if dtype is not None and wider and not quantized:
                x = x.astype(dtype)
            if self.mesh.size == 1:
                return x
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.decode_spec(path, x.shape)))

        return jax.tree_util.tree_map_with_path(one, tree)

    @contextlib.contextmanager
    def activations(self, mode: str):
        """While tracing inside it, `pin_batch` / `pin_heads` constrain the model's activations for
        `mode` (TRAIN or DECODE) on this layout. A no-op on one device."""
        if mode not in (TRAIN, DECODE, PREFILL):
            raise ValueError(f"Layout.activations: mode must be {TRAIN!r}, {DECODE!r} or {PREFILL!r}, got {mode!r}")
        token = ACTIVATIONS.set(None if self.mesh.size == 1 else (self, mode))
        try:
            yield self
        finally:
            ACTIVATIONS.reset(token)

    # -- placement ----------------------------------------------------------------------------

    def place(self, tree: Any, shardings: Any = None) -> Any:
        """`tree` (the same full value on every process) on `shardings` (default: the parameter
        rules); arrays already there are kept (no copy)."""
        shardings = self.params(tree) if shardings is None else shardings
        return jax.tree_util.tree_map(_put, tree, shardings)

    def constrain(self, tree: Any, shardings: Any) -> Any:
        """`with_sharding_constraint` inside a jitted program (a no-op on one device)."""
        return jax.lax.with_sharding_constraint(tree, shardings)

    # -- the batch ----------------------------------------------------------------------------

    def check_batch(self, rows: int, flag: str = "--batch-size") -> None:
        """ValueError naming `flag` unless `rows` splits evenly over the batch shards."""
        if rows % self.batch_shards:
            raise ValueError(f"{flag}={rows} must be divisible by the mesh's {self.batch_shards} batch shards (data "
                             f"{self.data} x fsdp {self.fsdp}): each takes an equal share of the rows")

    def host_rows(self, global_batch_size: int) -> slice:
        """The rows of a global batch that this process's devices hold. Raises if they are not
        one contiguous block (a device list not ordered by process)."""
        self.check_batch(global_batch_size)
        index = self.batch.addressable_devices_indices_map((global_batch_size,))
        rows = sorted({(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
                       for s in index.values()})
        start, stop = rows[0][0], rows[-1][1]
        if any(b != a2 for (_, b), (a2, _) in zip(rows, rows[1:])):
            raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {rows}; "
                             "build the mesh from a process-ordered device list (e.g. jax.devices())")
        return slice(start, stop)

    def shard_batch(self, *local_arrays: Any, global_batch_size: Optional[int] = None):
        """Global batch arrays from this process's rows (`host_rows`): no host ever holds another
        host's rows. One array per argument (a single array for a single argument)."""
        out = []
        for x in local_arrays:
            x = np.asarray(x)
            shape = None if global_batch_size is None else (global_batch_size,) + x.shape[1:]
            out.append(jax.make_array_from_process_local_data(self.batch, x, shape))
        return out[0] if len(out) == 1 else tuple(out)


def local_rows(x: Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order, as numpy (the inverse of
    `Layout.shard_batch`; on one process, the whole array)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    rows = {}
    for s in x.addressable_shards:
        rows.setdefault(s.index[0].start or 0, s.data)  # replicas of one block: keep one
    return np.concatenate([np.asarray(rows[k]) for k in sorted(rows)])


def _put(x: Any, sharding: NamedSharding) -> Array:
    """A value that every process holds in full, on a (possibly multi-host) sharding."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) and x.is_fully_addressable else np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
