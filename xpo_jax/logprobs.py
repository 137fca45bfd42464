"""Token and sequence log-probabilities from logits, and response masks.

Conventions: `logits[:, t]` scores `tokens[:, t]` (callers shift once, see `completion_logprobs`).
Prompts are left-padded and responses right-padded; a response mask is 1 on real response tokens
up to and including the first EOS, 0 after it.

Memory. log pi(token) = logit[token] - logsumexp(logits). The naive
`log_softmax(logits)[token]` materialises a float32 [B, T, V] array (2.5 GB at B=8, T=512,
V=152k) on top of the logits. Here the sequence axis is processed in chunks: each chunk upcasts
[B, c, V] to float32, reduces it to its logsumexp and gathers the chosen logits, so the extra
memory is O(B c V) whatever T is (see experiments/bench_logprobs.py). Under `grad`, each chunk is
rematerialised (`jax.checkpoint`) so the backward pass does not keep every chunk's float32 copy.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_CHUNK = 128


def _chunk_logprobs(logits: Array, tokens: Array) -> Array:
    """[B, c, V], [B, c] -> [B, c] float32 log-probs of `tokens`."""
    x = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1)
    picked = jnp.take_along_axis(x, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse


def token_logprobs(logits: Array, tokens: Array, *, chunk_size: int = DEFAULT_CHUNK) -> Array:
    """log softmax(logits)[tokens], shape [B, T], float32, computed `chunk_size` steps at a time.

    Args:
      logits: [B, T, V] (any float dtype; upcast to float32 one chunk at a time).
      tokens: [B, T] integer ids in [0, V).
      chunk_size: positions per chunk (static). T <= chunk_size runs in one piece.
    """
    chex.assert_rank(logits, 3)
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape_prefix((logits, tokens), 2)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, T, _ = logits.shape
    if T <= chunk_size:
        return _chunk_logprobs(logits, tokens)

    n = -(-T // chunk_size)
    chunk_fn = jax.checkpoint(_chunk_logprobs)

    def body(i, out):
        # The last chunk may overlap its predecessor (dynamic_slice clamps the start so the slice
        # stays in bounds); overlapping positions are written twice with the same values.
        start = jnp.minimum(i * chunk_size, T - chunk_size)
        lg = jax.lax.dynamic_slice_in_dim(logits, start, chunk_size, axis=1)
        tk = jax.lax.dynamic_slice_in_dim(tokens, start, chunk_size, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(out, chunk_fn(lg, tk), start, axis=1)

    return jax.lax.fori_loop(0, n, body, jnp.zeros((B, T), jnp.float32))


def completion_logprobs(
    logits: Array, completion: Array, completion_mask: Array, *, chunk_size: int = DEFAULT_CHUNK
) -> tuple[Array, Array]:
    """Per-token and sequence log-probs of a completion from a forward over concat(prompt, completion).

    logits: [B, P + N, V] from the full sequence; completion, completion_mask: [B, N]. The logits
    at position P - 1 + t predict completion token t. Returns ([B, N] masked token log-probs,
    [B] their sum).
    """
    N = completion.shape[1]
    T = logits.shape[1]
    if T <= N:
        raise ValueError(f"logits cover {T} positions; need a prompt of >= 1 token before {N} completion tokens")
    shifted = logits[:, T - N - 1 : T - 1]
    lp = token_logprobs(shifted, completion, chunk_size=chunk_size)
    lp = jnp.where(completion_mask.astype(bool), lp, 0.0)
    return lp, lp.sum(-1)


def response_mask(tokens: Array, eos_id: int, pad_id: int) -> Array:
    """[B, N] int32 mask of a right-padded response: 1 up to and including the first EOS.

    Everything after the first EOS is masked. Before it, `pad_id` tokens are masked too when
    pad_id != eos_id (a response cut at the length limit and right-padded); when pad_id == eos_id
    (a common convention) the first EOS is the real end.
    """
    chex.assert_rank(tokens, 2)
    is_eos = tokens == eos_id
    # eos_before[t] = an EOS occurs strictly before t.
    eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos > 0
    keep = ~eos_before
    if pad_id != eos_id:
        keep &= tokens != pad_id
    return keep.astype(jnp.int32)


def has_eos(tokens: Array, mask: Array, eos_id: int) -> Array:
    """[B] bool: the response contains EOS within its mask (judged on the response only)."""
    return jnp.any((tokens == eos_id) & mask.astype(bool), axis=-1)
