"""LoRA: low-rank adapters on the decoder's projections, kept apart from the frozen base.

Hu et al. 2021 (arXiv 2106.09685): a frozen kernel W [in, out] gains a trainable low-rank update,

    y = x W + (alpha / r) * (x A) B,        A [in, r], B [r, out], B = 0 at the start,

so the adapted model starts exactly at the base. For XPO the base IS the reference policy: a LoRA
run keeps one copy of the base weights (the run's `ref_params`) and trains only the adapters.

Trees. Adapters are a nested dict mirroring the base's parameter tree, holding `lora_a` and
`lora_b` beside each targeted module's `kernel` (a scanned model's stacked kernel [L, in, out]
gets stacked adapters [L, in, r] / [L, r, out]). `with_adapters(base, adapters, scale)` is the
policy's parameter tree: the base's leaves plus the adapters, `lora_b` pre-multiplied by the scale
(the same function and the same gradients as scaling the adapter's output: d(sB)/dB = s). The
decoder's projections are `LoraDense` (`transformer._dense`): a Dense that adds `(x A) B` when its
parameters hold `lora_a` / `lora_b`, and is exactly `nn.Dense` when they do not, so the base tree
alone is the reference (adapters off) through the same module.

Initialisation as peft's default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)),
B = 0. `merged(base, adapters, scale)` folds the adapters into the kernels (W + s A B) for export.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xpo_jax.models import quant
from xpo_jax.parallel import pin_codes_gathered

Array = jax.Array

LORA_A, LORA_B = "lora_a", "lora_b"
# The projections built by `transformer._dense`: the only modules that can carry adapters.
ADAPTABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = "|".join(ADAPTABLE)


class LoraDense(nn.Dense):
    """nn.Dense, plus `(x A) B` when the module's parameters hold `lora_a` [in, r] and `lora_b`
    [r, out] (the scale already in `lora_b`: `with_adapters`). The adapter matmuls run in the
    compute dtype like the kernel's. Without adapters it is nn.Dense unchanged.

    QLoRA: parameters holding `kernel_q` / `kernel_scale` (`xpo_jax.models.quant`) in place of
    `kernel` are dequantized here, in this layer's forward, and the result is nn.Dense's on the
    dequantized kernel. Under `jax.checkpoint`: the backward dequantizes again rather than keep
    the float kernel (with scan_layers, one layer's float kernel is alive at a time). Training on
    an FSDP mesh gathers the codes, not the floats (`parallel.pin_codes_gathered`)."""

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        if self.has_variable("params", quant.CODES):
            y = self._quantized(inputs)
        else:
            y = super().__call__(inputs)
        if not (self.has_variable("params", LORA_A) and self.has_variable("params", LORA_B)):
            return y
        a = self.get_variable("params", LORA_A)
        b = self.get_variable("params", LORA_B)
        dt = self.dtype or inputs.dtype
        h = jnp.einsum("...i,ir->...r", inputs.astype(dt), a.astype(dt))
        return y + jnp.einsum("...r,ro->...o", h, b.astype(dt)).astype(y.dtype)

    def _quantized(self, inputs: Array) -> Array:
        """nn.Dense's computation on the kernel dequantized (float32, then the compute dtype)."""
        codes, scale = self.get_variable("params", quant.CODES), self.get_variable("params", quant.SCALE)
        bias = self.get_variable("params", "bias") if self.use_bias else None

        where = ("model", self.name or "dense")  # the codes' parameter rule (tensor split kept, fsdp gathered)
        gathered = lambda leaf, v: pin_codes_gathered(v, where + (leaf,))

        @jax.checkpoint
        def dense(inputs, codes, scale, bias):
            codes, scale = gathered(quant.CODES, codes), gathered(quant.SCALE, scale)
            x, kernel, bias = self.promote_dtype(inputs, quant.dequantize(codes, scale), bias, dtype=self.dtype)
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
            return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))

        return dense(inputs, codes, scale, bias)


# ----------------------------------------------------------------------------------------------
# Paths and trees
# ----------------------------------------------------------------------------------------------


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def adaptable_kernels(base: Any) -> dict[str, tuple]:
    """{"model/layers_0/self_attn/q_proj/kernel": shape} for every kernel of an ADAPTABLE module
    in the base tree (arrays or ShapeDtypeStructs)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(base)[0]:
        s = _path_str(path).split("/")
        if len(s) >= 2 and s[-1] in ("kernel", quant.CODES) and s[-2] in ADAPTABLE:  # float or quantized
            out["/".join(s[:-1] + ["kernel"])] = quant.kernel_shape(x)
    return out


def target_kernels(base: Any, targets: str) -> dict[str, tuple]:
    """The adaptable kernels whose path `re.search`es `targets`; ValueError naming the pattern when
    it is not a regular expression or matches none."""
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise ValueError(f"--lora-targets={targets!r} is not a regular expression: {e}") from e
    every = adaptable_kernels(base)
    hit = {p: s for p, s in every.items() if pattern.search(p)}
    if not hit:
        names = sorted({p.split("/")[-2] for p in every}) or ["none: the model has no adaptable projection"]
        raise ValueError(f"--lora-targets={targets!r} matches no kernel of the model; adaptable kernels are the "
                         f"projections {', '.join(names)} (paths like {next(iter(every), 'model/.../q_proj/kernel')})")
    return hit


def check_rank(kernels: dict, rank: int) -> None:
    """ValueError when `rank` exceeds min(in, out) of a targeted kernel ({path: shape}, as
    `target_kernels` gives): past it the update A @ B is already full rank, so the extra rank only
    adds parameters and optimiser state."""
    path, shape = min(kernels.items(), key=lambda kv: min(kv[1][-2:]))
    if rank > min(shape[-2:]):
        raise ValueError(f"--lora-rank={rank}: exceeds min(in, out) = {min(shape[-2:])} of {path} "
                         f"{list(shape[-2:])}; at that rank the update is already full rank (use a smaller "
                         "rank, or narrow --lora-targets)")


def _set(tree: dict, path: list, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def init_adapters(base: Any, rank: int, targets: str, key: Array, dtype: Any = jnp.float32) -> dict:
    """Adapters for every targeted kernel [..., in, out] of `base`: lora_a [..., in, rank] ~
    U(-1/sqrt(in), 1/sqrt(in)) (peft's default), lora_b [..., rank, out] zeros, in `dtype`."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"--lora-rank={rank!r}: must be an int >= 1")
    out: dict = {}
    for i, (path, shape) in enumerate(sorted(target_kernels(base, targets).items())):
        *lead, d_in, d_out = shape
        bound = 1.0 / np.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, d_in, rank), jnp.float32, -bound, bound)
        module = path.split("/")[:-1]
        _set(out, module + [LORA_A], a.astype(dtype))
        _set(out, module + [LORA_B], jnp.zeros((*lead, rank, d_out), dtype))
    return out


def attach(base: dict, extra: dict) -> dict:
    """`base` with the leaves of `extra` (adapters) added at their paths; base arrays shared."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = attach(base[k], v) if isinstance(v, dict) else v
    return out


def scaled(adapters: Any, scale: float) -> Any:
    """`adapters` with every lora_b times `scale` (alpha / r)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * jnp.asarray(scale, x.dtype) if _path_str(p).endswith(LORA_B) else x, adapters)


def with_adapters(base: Any, adapters: Any, scale: float) -> dict:
    """The policy's parameter tree: `base` plus `adapters` beside their kernels, lora_b times
    `scale` (alpha / r). Differentiable in the adapters; the base's arrays are shared, not copied."""
    return attach(base, scaled(adapters, scale))


def split_adapters(params: Any) -> tuple[dict, dict]:
    """(base, adapters) of a tree that holds both (the inverse of `attach`, scale untouched)."""
    base, adapters = {}, {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = _path_str(path).split("/")
        _set(adapters if keys[-1] in (LORA_A, LORA_B) else base, keys, x)
    return base, adapters


def merged(base: Any, adapters: Any, scale: float) -> dict:
    """The base with each adapted kernel replaced by W + scale * A @ B (float32 sum, cast back to
    W's dtype): the adapted model as plain weights (export, tests). A quantized base is
    dequantized first (float32): the merged weights carry its quantization error."""
    base = quant.dequantized(base)
    flat = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0]}

    def one(path, w):
        s = _path_str(path)
        if not s.endswith("/kernel") or s[:-len("kernel")] + LORA_A not in flat:
            return w
        a, b = flat[s[:-len("kernel")] + LORA_A], flat[s[:-len("kernel")] + LORA_B]
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
        return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(one, base)


def base_fingerprint(base: Any) -> str:
    """sha256 of the base's parameters (each leaf's path, dtype, shape and bytes, in path order):
    what a LoRA checkpoint's adapters were trained on. Reads every array to the host once."""
    digest = hashlib.sha256()
    for path, x in sorted(jax.tree_util.tree_flatten_with_path(base)[0], key=lambda px: _path_str(px[0])):
        a = np.asarray(jax.device_get(x))
        digest.update(f"{_path_str(path)}|{a.dtype}|{a.shape}|".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of `tree` (shapes and dtypes only; ShapeDtypeStructs too)."""
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def lora_scale(alpha: float, rank: int) -> float:
    """alpha / r (Hu et al.): the adapter's output scale."""
    return float(alpha) / int(rank)


def adapter_shapes(base: Any, rank: int, targets: str, dtype: Optional[Any] = None) -> dict:
    """The adapters' shapes and dtypes (`jax.ShapeDtypeStruct` leaves) for `base`, nothing made."""
    return jax.eval_shape(lambda: init_adapters(base, rank, targets, jax.random.PRNGKey(0), dtype or jnp.float32))
