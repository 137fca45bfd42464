"""Pure, jittable autoregressive sampler over an explicit KV cache.

    prompts [B, P] (left-padded) --prefill--> logits of token 0, cache
    token t = choose(logits_t);  logits_{t+1}, cache = decode(token t, cache)      t = 0 .. N-1

`choose` follows HF `generate`'s order of logits processors: min_new_tokens (EOS logit -> -inf
while fewer than `min_new_tokens` tokens exist), then temperature (logits / T), then top-k, then
top-p (nucleus, Holtzman et al. 2020, arXiv 1904.09751), then a categorical draw. Temperature 0
is greedy (argmax of the processed logits, no division). The recorded `logprobs` are
log softmax(model logits)[token] at temperature 1 with no processing: the log-prob of the sample
under the model itself, which is what the DPO/XPO losses and a full forward see.

Shapes are fixed (cache of P + N - 1 slots, outputs [B, N]); the decode loop is a
`lax.while_loop` that stops early once every row has emitted EOS. Rows that finished emit
`pad_id` with mask 0. Randomness: one [N, B] array of uniforms is drawn from `key` before the
loop and step t uses row t, so every row gets independent noise from the single key (and, with
JAX's partitionable threefry, the same noise whether or not the batch is sharded).

Static vs traced. `max_new_tokens`, `eos_id`, `pad_id`, `min_new_tokens` fix shapes or are
baked into the loop, so they are static Python ints. `temperature`, `top_k`, `top_p` are traced
[B] arrays (scalars are broadcast): a sweep over them never recompiles, and they may be vmapped.
`apply_fn` is static: it must be the `apply` of one model object (jit caches on its identity).

Donation. `sample` creates its KV cache inside the compiled function and keeps it in the
`while_loop` carry; XLA then updates it in place (a `dynamic_update_slice` on a loop-carried
buffer aliases input and output), so there is no cache crossing a jit boundary to donate. (Code
that decodes step by step from Python, jitting the model's `prefill` / `decode` itself, should
donate the cache: otherwise every step allocates a fresh [B, Hkv, S, Dh] buffer per layer and
copies the whole cache into it to change one slot.)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xpo_jax.models.transformer import ModelConfig
from xpo_jax.parallel import DECODE, PREFILL, pin_rows

Array = jax.Array


class Completions(NamedTuple):
    """Sampled responses, right-padded.

    tokens:   [B, N] int32, pad_id after EOS.
    mask:     [B, N] int32, 1 up to and including the first EOS (or all N when no EOS).
    logprobs: [B, N] float32, log pi(token | prefix) at temperature 1, 0 where masked.
    lengths:  [B] int32, mask.sum(-1).
    """

    tokens: Array
    mask: Array
    logprobs: Array
    lengths: Array


# --------------------------------------------------------------------------------------------
# Logit processing
# --------------------------------------------------------------------------------------------


def filter_logits(logits: Array, top_k: Array, top_p: Array) -> Array:
    """Top-k then top-p filtering; removed entries become -inf.

    logits [B, V] (already divided by the temperature), top_k [B] int (0 = off), top_p [B] float
    in (0, 1] (1 = off). With the logits sorted descending, l_(1) >= l_(2) >= ..., rank j is kept
    iff j <= k and sum_{i<j} p_(i) < top_p, where p = softmax of the top-k logits (HF order:
    nucleus over the top-k-renormalised distribution). The most likely token is always kept. The
    kept set is a prefix of the sorted order, turned into a threshold on logit values, so tokens
    tied with the last kept one are kept too.
    """
    V = logits.shape[-1]
    srt = jnp.sort(logits, axis=-1, descending=True)
    ranks = jnp.arange(V, dtype=jnp.int32)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V).astype(jnp.int32)[:, None]
    in_k = ranks < k
    probs = jax.nn.softmax(jnp.where(in_k, srt, -jnp.inf), axis=-1)
    cum_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative mass
    top_p = top_p[:, None]
    # top_p >= 1 must keep everything even if float rounding takes cum_before to 1.0.
    keep = in_k & ((cum_before < top_p) | (top_p >= 1.0))
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, dtype=jnp.int32), 1)
    threshold = jnp.take_along_axis(srt, n_keep[:, None] - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _first_true(mask: Array) -> Array:
    """Index of the first True along the last axis, or the axis length if none.

    A min-reduction over `where(mask, iota, n)`: on CPU several times faster than `argmax`,
    which XLA lowers to a two-operand (value, index) reduction."""
    n = mask.shape[-1]
    iota = lax.broadcasted_iota(jnp.int32, mask.shape, mask.ndim - 1)
    return jnp.min(jnp.where(mask, iota, n), axis=-1)


def _last_true(mask: Array) -> Array:
    """Index of the last True along the last axis, or -1 if none."""
    iota = lax.broadcasted_iota(jnp.int32, mask.shape, mask.ndim - 1)
    return jnp.max(jnp.where(mask, iota, -1), axis=-1)


def categorical_inverse_cdf(u: Array, logits: Array, chunk: int = 128) -> Array:
    """One draw per row from softmax(logits) [B, V] by inversion, given u [B] ~ U[0, 1).

    With w_i = exp(l_i - max l) and target t = u * sum(w), return the i with
    sum_{j<i} w_j <= t < sum_{j<=i} w_j: token i has probability w_i / sum(w) exactly (in real
    arithmetic), as with Gumbel-max (`jax.random.categorical`). Inversion needs one random number
    per row instead of one per vocabulary entry; on CPU the [B, V] threefry bits and the Gumbel
    transform's two logs cost more than the rest of the sampling step together (measured ~2.2 ms
    vs ~0.7 ms per step at B=8, V=4096 on the 2-core benchmark machine).

    The search is two-level so that no full-length prefix sum is needed (a [B, V] cumsum is a
    log-depth reduce-window, the slowest op of the step on CPU): sum w over chunks of `chunk`
    tokens, find the chunk by a prefix sum over the V / chunk chunk totals, then the token by a
    prefix sum inside that one chunk. Tokens with w = 0 (filtered, -inf logits) are never drawn;
    when rounding leaves t beyond the last prefix sum, the last possible entry is taken. float32
    resolves probabilities to ~1e-7 of the total, so the mass of rarer tokens is right in total
    but quantised among them.
    """
    B, V = logits.shape
    n_chunks = -(-V // chunk)
    w = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # -inf -> 0
    w = jnp.pad(w, ((0, 0), (0, n_chunks * chunk - V))).reshape(B, n_chunks, chunk)
    totals = w.sum(axis=-1)                                    # [B, n_chunks]
    ends = jnp.cumsum(totals, axis=-1)                         # prefix sums at chunk ends
    target = u * ends[:, -1]                                   # [B]
    c = _first_true((ends > target[:, None]) & (totals > 0))
    c = jnp.where(c < n_chunks, c, _last_true(totals > 0))
    rows = jnp.take_along_axis(w, c[:, None, None], axis=1)[:, 0]  # [B, chunk]
    start = jnp.take_along_axis(ends - totals, c[:, None], axis=1)  # [B, 1]
    inner = start + jnp.cumsum(rows, axis=-1)
    i = _first_true((inner > target[:, None]) & (rows > 0))
    i = jnp.where(i < chunk, i, _last_true(rows > 0))
    return (c * chunk + i).astype(jnp.int32)


def choose_tokens(u: Array, logits: Array, step: Array, temperature: Array, top_k: Array,
                  top_p: Array, *, eos_id: int, min_new_tokens: int):
    """One sampling step. u [B] uniforms, logits [B, V] f32 -> (tokens [B] int32, their
    log-probs [B] f32 under the unprocessed logits, i.e. at temperature 1)."""
    V = logits.shape[-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    if min_new_tokens > 0:
        forbid = (step < min_new_tokens) & (jnp.arange(V) == eos_id)
        logits = jnp.where(forbid[None, :], -jnp.inf, logits)
    greedy = _first_true(logits == jnp.max(logits, axis=-1, keepdims=True))  # = argmax
    t = temperature[:, None]
    scaled = logits / jnp.where(t > 0, t, 1.0)  # no division by zero; T = 0 rows use `greedy`
    # The sort behind top-k/top-p costs O(V log V) per step; skip it when every row has both off.
    # (Under vmap over these hyperparameters the cond becomes a select and both sides run.)
    needs_filter = jnp.any(top_k > 0) | jnp.any(top_p < 1.0)
    scaled = lax.cond(needs_filter, lambda x: filter_logits(x, top_k, top_p), lambda x: x, scaled)
    sampled = categorical_inverse_cdf(u, scaled)
    tokens = jnp.where(temperature > 0, sampled, jnp.minimum(greedy, V - 1)).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------


class _LoopState(NamedTuple):
    step: Array      # [] int32, number of tokens chosen so far
    last: Array      # [B] int32, token chosen at step - 1 (input of the next decode)
    done: Array      # [B] bool, row has emitted EOS
    tokens: Array    # [B, N] int32
    mask: Array      # [B, N] int32
    logprobs: Array  # [B, N] float32
    cache: Any       # the model's KVCache


@functools.partial(jax.jit, static_argnames=("apply_fn", "max_new_tokens", "eos_id", "pad_id",
                                             "min_new_tokens", "layout"))
def _sample_jit(apply_fn, params, prompts, prompt_mask, key, temperature, top_k, top_p, *,
                max_new_tokens, eos_id, pad_id, min_new_tokens, layout=None):
    if layout is None:
        return _sample_body(apply_fn, params, prompts, prompt_mask, key, temperature, top_k, top_p,
                            max_new_tokens, eos_id, pad_id, min_new_tokens, contextlib.nullcontext)
    # The layout is a static argument, so a program traced with it is never reused without it.
    # The prefill runs with its [B, P, D] activations split by rows (PREFILL: whole-batch prompt
    # activations on every model-parallel device cost 4 GiB more at the 8B x 64 plan row), the
    # decode steps in the decode layout (DECODE: a step's [B, D] rows whole, weights not moved).
    with layout.activations(DECODE):
        return _sample_body(apply_fn, params, prompts, prompt_mask, key, temperature, top_k, top_p,
                            max_new_tokens, eos_id, pad_id, min_new_tokens, lambda: layout.activations(PREFILL))


def _sample_body(apply_fn, params, prompts, prompt_mask, key, temperature, top_k, top_p,
                 max_new_tokens, eos_id, pad_id, min_new_tokens, prefill_region):
    B, P = prompts.shape
    N = max_new_tokens
    variables = {"params": params}
    # Slot P + N - 1 would only hold the last token, whose successor is never needed.
    cache = apply_fn(variables, B, P + N - 1, method="init_cache")
    with prefill_region():
        logits, cache = apply_fn(variables, prompts, prompt_mask, cache, method="prefill")
    logits = pin_rows(logits)  # decoding: each device draws its own rows' tokens

    # All the randomness, drawn once: one uniform per row and step. Keeping the PRNG out of the
    # loop body saves its (on CPU, loop-implemented) threefry rounds at every step.
    uniforms = jax.random.uniform(key, (N, B), jnp.float32)

    def choose(step, logits, done):
        u = lax.dynamic_index_in_dim(uniforms, step, axis=0, keepdims=False)
        tok, lp = choose_tokens(u, logits, step, temperature, top_k, top_p, eos_id=eos_id,
                                min_new_tokens=min_new_tokens)
        live = ~done
        tok = jnp.where(live, tok, pad_id)
        lp = jnp.where(live, lp, 0.0)
        return tok, lp, live.astype(jnp.int32), done | (tok == eos_id)

    def write(buf, col, step):
        return lax.dynamic_update_slice(buf, col[:, None].astype(buf.dtype), (0, step))

    step0 = jnp.zeros((), jnp.int32)
    tok, lp, live, done = choose(step0, logits, jnp.zeros((B,), bool))
    state = _LoopState(
        step=step0 + 1, last=tok, done=done,
        tokens=write(jnp.full((B, N), pad_id, jnp.int32), tok, step0),
        mask=write(jnp.zeros((B, N), jnp.int32), live, step0),
        logprobs=write(jnp.zeros((B, N), jnp.float32), lp, step0),
        cache=cache)

    def cond(s: _LoopState):
        return (s.step < N) & ~jnp.all(s.done)

    def body(s: _LoopState):
        logits, cache = apply_fn(variables, s.last, s.cache, method="decode")
        logits = pin_rows(logits)
        tok, lp, live, done = choose(s.step, logits, s.done)
        return _LoopState(step=s.step + 1, last=tok, done=done,
                          tokens=write(s.tokens, tok, s.step), mask=write(s.mask, live, s.step),
                          logprobs=write(s.logprobs, lp, s.step), cache=cache)

    s = lax.while_loop(cond, body, state)
    return Completions(tokens=s.tokens, mask=s.mask, logprobs=s.logprobs,
                       lengths=s.mask.sum(axis=-1, dtype=jnp.int32))


def sample(apply_fn: Callable, params, prompts: Array, prompt_mask: Array, key: Array, *,
           max_new_tokens: int, temperature=1.0, top_k=0, top_p=1.0, eos_id: int, pad_id: int,
           min_new_tokens: int = 0, layout: Any = None) -> Completions:
    """Sample up to `max_new_tokens` tokens per prompt.

    Args:
      apply_fn: `model.apply` of a `Transformer` (or any module with `init_cache`, `prefill`,
        `decode` methods of the same signatures); called with `method=` names.
      params: the "params" collection (not wrapped in {"params": ...}).
      prompts, prompt_mask: [B, P] int32 / bool-or-int, left-padded: every row needs >= 1 real
        token and its last column must be real (the first new token is predicted from it). Zeros
        between real tokens are allowed and act as if the column were absent. Every id, padding
        included, must be in [0, vocab): pads are embedded too, and an out-of-range id gives NaN
        (too large) or silently another token (negative) for the whole row.
      key: PRNG key (typed or raw); the only source of randomness.
      max_new_tokens: N, static. Outputs are [B, N].
      temperature: scalar or [B], traced; 0 = greedy.
      top_k: scalar or [B] int, traced; 0 = off.
      top_p: scalar or [B] float in (0, 1], traced; 1 = off.
      eos_id, pad_id: static ints in [0, vocab). EOS is kept in the response (mask 1); later
        positions are `pad_id` with mask 0.
      min_new_tokens: static; EOS cannot be chosen before this many tokens (HF semantics).
      layout: a `parallel.Layout` (static): the model's activations follow its decode layout
        (`Layout.activations(DECODE)`); pass the parameters already in it (`Layout.decode_params`,
        once, before this call) so that the loop moves no weight. None: no constraints.

    Callable inside jit and vmap (e.g. over keys or temperatures); bad static or concrete
    arguments raise ValueError before anything is traced or compiled. The value checks (prompt
    ids in range, masks non-empty and ending in a real token, hyperparameter ranges) run in numpy
    on concrete inputs only: an argument that is a tracer -- an argument of an enclosing jit, or
    vmapped over -- cannot be read and is not checked. Constants closed over by a jit are
    concrete and are checked. For a global array spread over several processes, each process
    checks the rows it holds.
    """
    # Host copies of concrete prompts/mask for the value checks below, taken before the
    # conversion to jax arrays (numpy input is read where it is, with no device round trip).
    prompt_rows, mask_rows = _concrete_rows(prompts), _concrete_rows(prompt_mask)
    prompts = jnp.asarray(prompts)
    prompt_mask = jnp.asarray(prompt_mask)
    if prompts.ndim != 2 or prompt_mask.shape != prompts.shape:
        raise ValueError(f"prompts and prompt_mask must both be [B, P]; got {prompts.shape} and "
                         f"{prompt_mask.shape}")
    B, P = prompts.shape
    if P < 1 or B < 1:
        raise ValueError(f"prompts must be non-empty, got shape {prompts.shape}")
    if not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"prompts must be integer token ids, got dtype {prompts.dtype}")
    for name, v, lo in (("max_new_tokens", max_new_tokens, 1), ("min_new_tokens", min_new_tokens, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    vocab_size, max_len = _model_limits(apply_fn, params, B)
    for name, v in (("eos_id", eos_id), ("pad_id", pad_id)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v < vocab_size:
            raise ValueError(f"{name}={v!r} is outside the vocabulary [0, {vocab_size})")
    if max_len is not None and P + max_new_tokens > max_len:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_seq_len {max_len}")
    if prompt_rows is not None:
        _check_prompt_ids(prompt_rows, vocab_size)
    if mask_rows is not None:
        _check_prompt_mask(mask_rows)

    temperature = _per_row("temperature", temperature, B, jnp.float32)
    top_k = _per_row("top_k", top_k, B, jnp.int32)
    top_p = _per_row("top_p", top_p, B, jnp.float32)
    _check_concrete("temperature", temperature, lambda x: np.all(x >= 0) and np.all(np.isfinite(x)),
                    "must be finite and >= 0")
    _check_concrete("top_k", top_k, lambda x: np.all(x >= 0), "must be >= 0 (0 = off)")
    _check_concrete("top_p", top_p, lambda x: np.all((x > 0) & (x <= 1)), "must be in (0, 1]")

    return _sample_jit(apply_fn, params, prompts.astype(jnp.int32), prompt_mask, key, temperature,
                       top_k, top_p, max_new_tokens=int(max_new_tokens), eos_id=int(eos_id),
                       pad_id=int(pad_id), min_new_tokens=int(min_new_tokens), layout=layout)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _model_limits(apply_fn, params, batch_size):
    """(vocab_size, max_seq_len or None) from the bound module's config, else by shape inference."""
    config = getattr(getattr(apply_fn, "__self__", None), "config", None)
    if isinstance(config, ModelConfig):
        return config.vocab_size, config.max_seq_len

    def one_step(p):
        cache = apply_fn({"params": p}, batch_size, 1, method="init_cache")
        return apply_fn({"params": p}, jnp.zeros((batch_size,), jnp.int32), cache, method="decode")[0]

    return jax.eval_shape(one_step, params).shape[-1], None


def _per_row(name, value, batch_size, dtype):
    """Broadcast a scalar or [B] hyperparameter to a [B] array of a fixed dtype, so that every
    value -- Python number, numpy or jax array, tracer -- hits the same compiled function."""
    value = jnp.asarray(value)
    if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, batch_size)):
        raise ValueError(f"{name} must be a scalar or have shape [{batch_size}], got {value.shape}")
    return jnp.broadcast_to(value.astype(dtype), (batch_size,))


def _concrete_rows(value):
    """Host views of a concrete [B, P] argument as (first row, numpy block) pairs, or None when it
    is a tracer. A global array that this process holds only part of (multi-host) yields the
    whole-row shards it holds, each at its global row offset."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return _shard_rows(value)
    try:
        return [(0, np.asarray(value))]
    except (TypeError, ValueError):
        return None  # not array-like: the shape checks that follow report it


def _shard_rows(value: jax.Array):
    """(first row, numpy block) for each distinct addressable shard of `value` that spans whole
    rows (shards split along columns are skipped: their rows cannot be checked locally)."""
    if value.ndim != 2:
        return []  # the shape check in `sample` reports it
    blocks, seen = [], set()
    for shard in value.addressable_shards:
        rows, cols = tuple(shard.index) + (slice(None),) * (2 - len(shard.index))
        if cols.indices(value.shape[1]) != (0, value.shape[1], 1):
            continue
        start = rows.indices(value.shape[0])[0]
        if start in seen:  # replicated copies of the same rows
            continue
        seen.add(start)
        blocks.append((start, np.asarray(shard.data)))
    return blocks


def _check_prompt_ids(blocks, vocab_size):
    """Every prompt id -- padding included, since pads are embedded too -- in [0, vocab_size)."""
    for start, ids in blocks:
        if ids.ndim != 2:
            return
        bad = (ids < 0) | (ids >= vocab_size)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            value = ids[r, c].item()
            rows = sorted({int(i) + start for i in np.flatnonzero(bad.any(axis=1))})
            more = f" ({int(bad.sum())} bad ids in rows {rows[:8]}{' ...' if len(rows) > 8 else ''})"
            raise ValueError(
                f"prompt token id {value} at prompts[{r + start}, {c}] is outside the vocabulary "
                f"[0, {vocab_size}){more}; every id, padding included, must be a valid token "
                f"(pad with pad_id)")


def _check_prompt_mask(blocks):
    """Each row has a real token and ends in one (left padding; the sampler continues from the
    last column). Zeros between real tokens are fine: positions and attention skip them."""
    for start, mask in blocks:
        if mask.ndim != 2:
            return
        real = mask != 0
        empty = np.flatnonzero(~real.any(axis=1))
        if empty.size:
            raise ValueError(
                f"prompt_mask row {empty[0] + start} is all zero: every prompt needs at least one "
                f"real token (all-zero rows: {(empty[:8] + start).tolist()}"
                f"{' ...' if empty.size > 8 else ''})")
        right = np.flatnonzero(~real[:, -1])
        if right.size:
            r = right[0]
            last = int(np.flatnonzero(real[r])[-1])
            raise ValueError(
                f"prompt_mask row {r + start} ends in padding (its last real token is at column "
                f"{last} of {mask.shape[1]}): prompts must be left-padded, since the first new "
                f"token is predicted from the last column (rows ending in padding: "
                f"{(right[:8] + start).tolist()}{' ...' if right.size > 8 else ''})")


def _check_concrete(name, value, ok, message):
    if isinstance(value, jax.core.Tracer):
        return  # traced (inside jit/vmap): cannot be checked here
    arr = np.asarray(value)
    if not ok(arr):
        raise ValueError(f"{name} {message}, got {arr.tolist() if arr.size <= 8 else arr}")
