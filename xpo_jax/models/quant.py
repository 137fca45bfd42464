"""QLoRA's frozen base: the decoder's projection kernels stored as int8 or NF4 codes.

Dettmers et al. 2023, "QLoRA" (arXiv 2305.14314): the frozen base is stored in 4 bits and
dequantized to the compute dtype on the fly, in each layer's forward (and again in its backward);
the LoRA adapters stay in their own dtype and are the only trained weights. Here a kernel W
[..., in, out] (a scanned model's [L, in, out]) becomes two leaves beside it in place of `kernel`:

    kernel_q      the codes, the kernel's rank; `kernel_scale` [..., in / block, out] float32,
                  the absmax of each block of `block` consecutive inputs of one output column
    int8          block = in (symmetric per output channel): s = max_i |W[i, o]| / 127,
                  q = round(W / s) in [-127, 127]; kernel_q int8 [..., in, out], scale [..., 1, out];
                  W_deq = q * s, |W - W_deq| <= s / 2
    nf4           block = 64 inputs (QLoRA's; gcd(in, 64) when 64 does not divide `in`): s = the
                  block's absmax, q = the index of the NF4 value nearest to W / s (NF4: the 16
                  quantiles of N(0, 1) scaled to [-1, 1] with an exact 0, bitsandbytes' table);
                  two codes per byte along the input axis (row 2i in the low nibble, row 2i + 1 in
                  the high one): kernel_q uint8 [..., in / 2, out], scale [..., in / block, out];
                  W_deq = NF4[q] * s

Every leaf keeps the kernel's rank and its output axis, and row i of the codes (and of the scales)
covers a contiguous run of inputs, so `xpo_jax.parallel` splits them as it splits the kernel
(columns of q/k/v/gate/up, rows of o/down) and each shard dequantizes from its own bytes. The
codes' dtype says the format (int8: int8, nf4: packed uint8). QLoRA's double quantization (the
scales themselves in 8 bits) is not done: a float32 scale per 64 weights is 0.5 bit per weight.

Quantization is numpy on the host (`quantize_base`, before placement: a big base is never on a
device in float); dequantization is jnp inside `lora.LoraDense`, one layer at a time.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xpo_jax.parallel import KERNEL_CODES as CODES, KERNEL_SCALE as SCALE

KINDS = ("int8", "nf4")
NF4_BLOCK = 64
# The 16 NF4 values (Dettmers et al. 2023, Appendix E; bitsandbytes' `nf4` code book).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


def nf4_block(d_in: int, name: str = "kernel") -> int:
    """The NF4 block of a kernel with `d_in` inputs: 64, or gcd(d_in, 64) when 64 does not divide
    it (e.g. a tiny test model's 32); ValueError naming the kernel when it is odd (no packing)."""
    block = math.gcd(int(d_in), NF4_BLOCK)
    if block % 2:
        raise ValueError(f"--base-dtype=nf4: {name} has {d_in} inputs; two 4-bit codes are packed per byte "
                         "along the input axis, so it must be even (use --base-dtype int8)")
    return block


def _quantize_2d(w: np.ndarray, kind: str, block: int) -> tuple[np.ndarray, np.ndarray]:
    """One [in, out] kernel -> (codes, scale), in float64 so each code is the nearest one."""
    w = np.asarray(w, np.float64)
    d_in, d_out = w.shape
    blocks = w.reshape(d_in // block, block, d_out)
    absmax = np.max(np.abs(blocks), axis=1)  # [in / block, out]
    scale = (absmax / 127.0 if kind == "int8" else absmax).astype(np.float32)
    s = scale.astype(np.float64)[:, None, :]
    x = np.divide(blocks, s, out=np.zeros_like(blocks), where=s > 0).reshape(d_in, d_out)
    if kind == "int8":
        return np.clip(np.rint(x), -127, 127).astype(np.int8), scale
    mids = (NF4[1:].astype(np.float64) + NF4[:-1]) / 2  # nearest value = count of midpoints below
    q = np.searchsorted(mids, x).astype(np.uint8)
    return (q[0::2] | (q[1::2] << 4)).astype(np.uint8), scale


def quantized_shapes(shape: Any, kind: str, name: str = "kernel") -> tuple:
    """(kernel_q, kernel_scale) of a kernel of `shape` [..., in, out] as jax.ShapeDtypeStructs."""
    if kind not in KINDS:
        raise ValueError(f"--base-dtype={kind!r}: expected one of {', '.join(KINDS)} for a quantized base")
    *lead, d_in, d_out = (int(d) for d in shape)
    block = d_in if kind == "int8" else nf4_block(d_in, name)
    codes = (*lead, d_in if kind == "int8" else d_in // 2, d_out)
    return (jax.ShapeDtypeStruct(codes, np.int8 if kind == "int8" else np.uint8),
            jax.ShapeDtypeStruct((*lead, d_in // block, d_out), np.float32))


def quantize(w: Any, kind: str, name: str = "kernel") -> tuple[np.ndarray, np.ndarray]:
    """(kernel_q, kernel_scale) of a kernel [..., in, out] (host numpy, one [in, out] slice at a
    time: a stacked kernel never exists in float64 whole). See the module docstring."""
    w = np.asarray(w)
    codes, scale = (np.empty(s.shape, s.dtype) for s in quantized_shapes(w.shape, kind, name))
    block = w.shape[-2] // scale.shape[-2]
    for i in np.ndindex(*w.shape[:-2]):
        codes[i], scale[i] = _quantize_2d(w[i], kind, block)
    return codes, scale


def dequantize(codes: Any, scale: Any, dtype: Any = jnp.float32) -> jax.Array:
    """W_deq [..., in, out] in `dtype` from (kernel_q, kernel_scale) (jnp, traceable; computed in
    float32, then cast): int8 codes times their column's scale, or NF4[code] times its block's."""
    codes = jnp.asarray(codes)
    if codes.dtype == jnp.uint8:  # nf4: unpack the two nibbles back into consecutive rows
        q = jnp.stack([codes & 15, codes >> 4], axis=-2)
        q = q.reshape(*codes.shape[:-2], 2 * codes.shape[-2], codes.shape[-1])
        values = jnp.asarray(NF4)[q.astype(jnp.int32)]
    else:
        values = codes.astype(jnp.float32)
    *lead, d_in, d_out = values.shape
    n_blocks = scale.shape[-2]
    w = values.reshape(*lead, n_blocks, d_in // n_blocks, d_out) * jnp.asarray(scale, jnp.float32)[..., None, :]
    return w.reshape(*lead, d_in, d_out).astype(dtype)


def kernel_shape(codes: Any) -> tuple:
    """The float kernel's shape [..., in, out] of its codes (nf4 packs two inputs per byte)."""
    shape = tuple(codes.shape)
    return shape if np.dtype(codes.dtype) != np.uint8 else (*shape[:-2], 2 * shape[-2], shape[-1])


def quantize_base(base: Any, kernels: Any, kind: str, _prefix: tuple = ()) -> dict:
    """`base` (nested dicts of arrays) with the kernel at each path of `kernels` (strings like
    "model/layers/self_attn/q_proj/kernel") replaced by kernel_q and kernel_scale (host numpy; of
    a jax.ShapeDtypeStruct kernel, their ShapeDtypeStructs); every other leaf as it is."""
    out: dict = {}
    for k, v in base.items():
        path = "/".join(_prefix + (k,))
        if isinstance(v, Mapping):
            out[k] = quantize_base(v, kernels, kind, _prefix + (k,))
        elif k == "kernel" and path in kernels:
            abstract = isinstance(v, jax.ShapeDtypeStruct)
            out[CODES], out[SCALE] = (quantized_shapes(v.shape, kind, path) if abstract else
                                      quantize(jax.device_get(v), kind, path))
        else:
            out[k] = v
    return out


def is_quantized(tree: Any) -> bool:
    """Whether `tree` (nested dicts) holds quantized kernels."""
    return isinstance(tree, Mapping) and (CODES in tree or any(is_quantized(v) for v in tree.values()))


def dequantized(tree: Any, dtype: Any = jnp.float32) -> Any:
    """`tree` with every (kernel_q, kernel_scale) pair replaced by its dequantized `kernel` in
    `dtype` (export, tests): the float model the quantized one computes."""
    if not isinstance(tree, Mapping):
        return tree
    if CODES in tree:
        rest = {k: v for k, v in tree.items() if k not in (CODES, SCALE)}
        return {**rest, "kernel": dequantize(tree[CODES], tree[SCALE], dtype)}
    return {k: dequantized(v, dtype) for k, v in tree.items()}
