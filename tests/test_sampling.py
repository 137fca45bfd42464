"""Tests for xpo_jax.sampling: distribution (chi-square), greedy, EOS / min_new_tokens, log-probs,
determinism, no recompilation over traced hyperparameters, jit / vmap / sharded inputs, bad input.

One tiny f32 model; most tests share one compiled sampler shape (B=8, P=6, N=8, eos=1, pad=0).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xpo_jax.models import Transformer, get_config, init_params
from xpo_jax.sampling import (Completions, _sample_jit, categorical_inverse_cdf, filter_logits,
                              sample)

ATOL = 1e-5
CONFIG = get_config("test", init_std=0.3)  # logits far from uniform
V = CONFIG.vocab_size
B, P, N = 8, 6, 8
EOS, PAD = 1, 0
P_VALUE_MIN = 1e-3  # chi-square: fail if p < 1e-3 (fixed seeds, so the outcome is deterministic)


@pytest.fixture(scope="module")
def setup():
    model = Transformer(CONFIG)
    params = init_params(CONFIG, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(2, V, (B, P)).astype(np.int32)
    mask = np.ones((B, P), np.int32)
    for b, n in enumerate([0, 1, 2, 3, 0, 5, 1, 0]):  # left padding
        mask[b, :n] = 0
        prompts[b, :n] = PAD
    forward = jax.jit(lambda t, m: model.apply({"params": params}, t, m))
    return model, params, prompts, mask, forward


def _sample(setup, key=0, **kw):
    model, params, prompts, mask, _ = setup
    kw = {"max_new_tokens": N, "eos_id": EOS, "pad_id": PAD, **kw}
    key = jax.random.key(key) if isinstance(key, int) else key
    return sample(model.apply, params, kw.pop("prompts", prompts), kw.pop("prompt_mask", mask), key, **kw)


def _full_logits(setup, prompts, mask, out):
    """Full forward over prompt + completion; rows t = logits predicting completion token t."""
    forward = setup[4]
    tokens = np.concatenate([prompts, np.asarray(out.tokens)], 1)
    full_mask = np.concatenate([mask, np.asarray(out.mask)], 1)
    logits = np.asarray(forward(tokens, full_mask))
    return logits[:, prompts.shape[1] - 1: -1]


def _check_invariants(out, n=N, eos=EOS, pad=PAD):
    tokens, mask, lp, lengths = (np.asarray(x) for x in out)
    assert tokens.shape == mask.shape == lp.shape == (tokens.shape[0], n)
    assert tokens.dtype == np.int32 and lengths.dtype == np.int32 and lp.dtype == np.float32
    for b in range(tokens.shape[0]):
        eos_at = np.flatnonzero(tokens[b] == eos)
        L = eos_at[0] + 1 if eos_at.size and (mask[b, eos_at[0]] == 1) else n
        np.testing.assert_array_equal(mask[b], (np.arange(n) < L).astype(np.int32))
        assert lengths[b] == L
        assert np.all(tokens[b, L:] == pad) and np.all(lp[b, L:] == 0)
        assert np.all(lp[b, :L] < 0) or L == 0
        assert not np.any(tokens[b, : L - 1] == eos)  # EOS only as the last real token


# ------------------------------------------------------------------------------------------
# Logit filtering and the sampled distribution
# ------------------------------------------------------------------------------------------


def _np_filtered_probs(logits, temperature, top_k, top_p):
    """Reference: HF order temperature -> top-k -> top-p, written with argsort in numpy."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z)
    keep = np.zeros_like(z, bool)
    k = len(z) if top_k == 0 else min(top_k, len(z))
    keep[order[:k]] = True
    zk = np.where(keep, z, -np.inf)
    p = np.exp(zk - zk.max())
    p /= p.sum()
    if top_p < 1.0:
        ps = p[order]
        before = np.cumsum(ps) - ps
        keep_sorted = before < top_p
        keep_sorted[0] = True
        keep2 = np.zeros_like(keep)
        keep2[order[keep_sorted]] = True
        keep &= keep2
    zk = np.where(keep, z, -np.inf)
    p = np.exp(zk - zk.max())
    return p / p.sum()


def test_filter_logits_matches_reference_per_row():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 2
    top_k = np.array([0, 1, 5, 0, 7, 100], np.int32)
    top_p = np.array([1.0, 1.0, 1.0, 0.5, 0.9, 0.3], np.float32)
    out = np.asarray(jax.jit(filter_logits)(logits, top_k, top_p))
    for b in range(6):
        want = _np_filtered_probs(logits[b], 1.0, top_k[b], top_p[b]) > 0
        np.testing.assert_array_equal(np.isfinite(out[b]), want, err_msg=f"row {b}")
        np.testing.assert_array_equal(out[b][want], logits[b][want])


def test_inverse_cdf_sampler_distribution_and_edges():
    """The two-level inverse-CDF draw: chi-square against softmax on a vocabulary that is not a
    multiple of the chunk, with -inf (filtered) entries that must never be drawn; u = 0 gives the
    first possible token and u -> 1 the last."""
    from scipy import stats
    rng = np.random.default_rng(2)
    V_, rows = 300, 20000
    logits = rng.normal(size=V_).astype(np.float32) * 1.5
    logits[rng.choice(V_, 120, replace=False)] = -np.inf
    logits[:5] = -np.inf
    logits[-3:] = -np.inf
    draw = jax.jit(lambda u, l: categorical_inverse_cdf(u, l, chunk=64))
    u = jax.random.uniform(jax.random.key(0), (rows,))
    toks = np.asarray(draw(u, jnp.broadcast_to(jnp.asarray(logits), (rows, V_))))
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    counts = np.bincount(toks, minlength=V_)
    assert counts[p == 0].sum() == 0
    big = p * rows >= 5
    obs = np.append(counts[big], counts[~big & (p > 0)].sum())
    exp = np.append(p[big] * rows, p[~big & (p > 0)].sum() * rows)
    assert stats.chisquare(obs, exp).pvalue >= P_VALUE_MIN
    possible = np.flatnonzero(p > 0)
    edges = np.asarray(draw(jnp.array([0.0, np.nextafter(np.float32(1), np.float32(0))]),
                            jnp.broadcast_to(jnp.asarray(logits), (2, V_))))
    assert edges[0] == possible[0] and edges[1] == possible[-1]


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.5, 0, 0.7), (1.0, 10, 0.8), (1.0, 1000, 1.0)])
def test_sampled_frequencies_match_filtered_softmax(setup, temperature, top_k, top_p):
    """One step from one fixed prompt on 4000 rows: token counts vs softmax(filter(logits / T)).
    Chi-square goodness of fit (scipy), bins with expected count < 5 pooled; p >= 1e-3 required,
    and a token the filters remove must never appear."""
    from scipy import stats
    model, params, prompts, mask, forward = setup
    rows = 4000
    prompt = np.repeat(prompts[2:3], rows, 0)
    pmask = np.repeat(mask[2:3], rows, 0)
    out = sample(model.apply, params, prompt, pmask, jax.random.key(123), max_new_tokens=1,
                 temperature=temperature, top_k=top_k, top_p=top_p, eos_id=EOS, pad_id=PAD)
    logits = np.asarray(forward(prompts[2:3], mask[2:3]))[0, -1]
    expected = _np_filtered_probs(logits, temperature, top_k, top_p)
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=V)
    assert counts[expected == 0].sum() == 0, "sampled a filtered-out token"
    exp_counts = expected * rows
    big = exp_counts >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(exp_counts[big], exp_counts[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert len(exp) >= 2
    p_value = stats.chisquare(obs, exp).pvalue
    assert p_value >= P_VALUE_MIN, (p_value, obs, exp)


# ------------------------------------------------------------------------------------------
# Greedy, log-probs, EOS
# ------------------------------------------------------------------------------------------


def test_greedy_equals_argmax_of_full_forward(setup):
    out = _sample(setup, temperature=0.0)
    _check_invariants(out)
    logits = _full_logits(setup, setup[2], setup[3], out)
    m = np.asarray(out.mask).astype(bool)
    np.testing.assert_array_equal(np.asarray(out.tokens)[m], logits.argmax(-1)[m])
    # Greedy ignores the key and the filters; a per-row temperature of zeros is the same.
    out2 = _sample(setup, key=9, temperature=np.zeros(B, np.float32), top_k=3, top_p=0.5)
    np.testing.assert_array_equal(out2.tokens, out.tokens)


def test_per_row_temperature(setup):
    """Rows with temperature 0 are greedy while the others sample."""
    greedy = _sample(setup, temperature=0.0)
    temps = np.where(np.arange(B) % 2 == 0, 0.0, 1.0).astype(np.float32)
    mixed = _sample(setup, key=5, temperature=temps)
    np.testing.assert_array_equal(np.asarray(mixed.tokens)[::2], np.asarray(greedy.tokens)[::2])
    assert not np.array_equal(np.asarray(mixed.tokens)[1::2], np.asarray(greedy.tokens)[1::2])


def test_left_padding_gives_same_greedy_tokens(setup):
    model, params, prompts, mask, _ = setup
    extra = 3
    padded = np.concatenate([np.full((B, extra), PAD, np.int32), prompts], 1)
    pmask = np.concatenate([np.zeros((B, extra), np.int32), mask], 1)
    a = _sample(setup, temperature=0.0)
    b = _sample(setup, temperature=0.0, prompts=padded, prompt_mask=pmask)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=ATOL)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_logprobs_equal_full_forward_log_softmax(setup, kw):
    """Completions.logprobs = log_softmax(full-forward logits at T=1)[token], 0 where masked,
    whatever the sampling temperature/filters were."""
    out = _sample(setup, key=3, **kw)
    _check_invariants(out)
    logits = _full_logits(setup, setup[2], setup[3], out)
    lp = jax.nn.log_softmax(logits, axis=-1)
    want = np.take_along_axis(np.asarray(lp), np.asarray(out.tokens)[..., None], -1)[..., 0]
    want = np.where(np.asarray(out.mask).astype(bool), want, 0.0)
    np.testing.assert_allclose(out.logprobs, want, atol=ATOL, rtol=0)


def _frequent_token(setup):
    """A token the model samples often from these prompts: as EOS it ends rows at varied steps."""
    out = _sample(setup, key=11)
    counts = np.bincount(np.asarray(out.tokens[:, 1:]).ravel(), minlength=V)
    counts[[EOS, PAD]] = 0
    return int(counts.argmax()), out


def test_eos_handling(setup):
    """With a frequent token as EOS: EOS kept (mask 1), later positions pad with mask 0, lengths,
    and the tokens up to EOS are those of the same-key run without that EOS."""
    eos, ref = _frequent_token(setup)
    pad = 2  # a pad id different from 0 so pads are distinguishable from zeros
    out = _sample(setup, key=11, eos_id=eos, pad_id=pad)
    _check_invariants(out, eos=eos, pad=pad)
    lengths = np.asarray(out.lengths)
    assert lengths.min() < N, "expected some rows to stop early"
    ref_tokens = np.asarray(ref.tokens)
    for b in range(B):
        L = lengths[b]
        if EOS not in ref_tokens[b, :L]:
            np.testing.assert_array_equal(np.asarray(out.tokens)[b, :L], ref_tokens[b, :L])
            np.testing.assert_allclose(np.asarray(out.logprobs)[b, :L], np.asarray(ref.logprobs)[b, :L],
                                       atol=ATOL)
    # pad_id == eos_id (Qwen's default): same rows, same lengths; the mask tells EOS from padding.
    same = _sample(setup, key=11, eos_id=eos, pad_id=eos)
    _check_invariants(same, eos=eos, pad=eos)
    np.testing.assert_array_equal(same.lengths, out.lengths)
    np.testing.assert_array_equal(np.asarray(same.tokens)[np.asarray(out.mask) == 1],
                                  np.asarray(out.tokens)[np.asarray(out.mask) == 1])
    # min_new_tokens: EOS cannot come before 4 tokens.
    out4 = _sample(setup, key=11, eos_id=eos, pad_id=pad, min_new_tokens=4)
    _check_invariants(out4, eos=eos, pad=pad)
    assert np.asarray(out4.lengths).min() >= 4
    assert not np.any(np.asarray(out4.tokens)[:, :3] == eos)
    # min_new_tokens = N: every response is full length (what the benchmark relies on).
    full = _sample(setup, key=11, eos_id=eos, pad_id=pad, min_new_tokens=N)
    assert np.all(np.asarray(full.lengths) == N) and np.all(np.asarray(full.mask) == 1)


def test_loop_stops_early_when_all_rows_done(setup):
    """Every row ends at step 0 when EOS is forced to be the greedy token: tokens = [EOS, pad...]."""
    model, params, prompts, mask, forward = setup
    first = np.asarray(forward(prompts, mask))[:, -1].argmax(-1)
    rows = first == first[0]
    out = sample(model.apply, params, prompts[rows], mask[rows], jax.random.key(0), max_new_tokens=N,
                 temperature=0.0, eos_id=int(first[0]), pad_id=PAD)
    np.testing.assert_array_equal(out.lengths, 1)
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 1:], PAD)


# ------------------------------------------------------------------------------------------
# Keys, compilation, transformations
# ------------------------------------------------------------------------------------------


def test_same_key_same_output_different_key_different(setup):
    a, b, c = _sample(setup, key=1), _sample(setup, key=1), _sample(setup, key=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.tokens, c.tokens)
    # Rows with the same prompt get independent draws from the one key.
    model, params, prompts, mask, _ = setup
    same = sample(model.apply, params, np.repeat(prompts[:1], B, 0), np.repeat(mask[:1], B, 0),
                  jax.random.key(1), max_new_tokens=N, eos_id=EOS, pad_id=PAD)
    assert len({tuple(r) for r in np.asarray(same.tokens)}) > 1


def test_no_recompilation_across_temperature_top_k_top_p(setup):
    _sample(setup, key=0)
    n_compiled = _sample_jit._cache_size()
    for kw in [dict(temperature=0.5), dict(temperature=0), dict(top_k=3), dict(top_p=0.8),
               dict(temperature=np.float32(2.0), top_k=np.int64(7), top_p=0.95),
               dict(temperature=jnp.full((B,), 0.9), top_k=jnp.arange(B), top_p=np.linspace(0.5, 1, B))]:
        out = _sample(setup, key=4, **kw)
        jax.block_until_ready(out)
        assert _sample_jit._cache_size() == n_compiled, f"recompiled for {kw}"


def test_vmap_over_keys(setup):
    model, params, prompts, mask, _ = setup
    keys = jax.random.split(jax.random.key(21), 3)
    batched = jax.vmap(lambda k: sample(model.apply, params, prompts, mask, k, max_new_tokens=N,
                                        eos_id=EOS, pad_id=PAD, temperature=0.8))(keys)
    assert batched.tokens.shape == (3, B, N)
    for i in range(3):
        one = _sample(setup, key=keys[i], temperature=0.8)
        np.testing.assert_array_equal(batched.tokens[i], one.tokens)
        np.testing.assert_array_equal(batched.mask[i], one.mask)
        np.testing.assert_allclose(batched.logprobs[i], one.logprobs, atol=ATOL)


def test_inside_a_larger_jit_twice_with_traced_hyperparameters(setup):
    """The online round samples from policy and reference inside one jit; temperature is traced."""
    model, params, prompts, mask, _ = setup
    ref_params = jax.tree.map(lambda x: x * 0.9, params)

    @jax.jit
    def both(p, rp, key, temperature):
        k1, k2 = jax.random.split(key)
        kw = dict(max_new_tokens=N, eos_id=EOS, pad_id=PAD, temperature=temperature)
        return (sample(model.apply, p, prompts, mask, k1, **kw),
                sample(model.apply, rp, prompts, mask, k2, **kw))

    key = jax.random.key(8)
    y, yt = both(params, ref_params, key, 1.0)
    k1, k2 = jax.random.split(key)
    np.testing.assert_array_equal(y.tokens, _sample(setup, key=k1).tokens)
    want = sample(model.apply, ref_params, prompts, mask, k2, max_new_tokens=N, eos_id=EOS, pad_id=PAD)
    np.testing.assert_array_equal(yt.tokens, want.tokens)
    np.testing.assert_allclose(yt.logprobs, want.logprobs, atol=ATOL)


def test_sharded_batch_equals_unsharded(setup):
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices; tests/conftest.py sets XLA_FLAGS")
    model, params, prompts, mask, _ = setup
    mesh = Mesh(np.array(devices[:8]), ("data",))
    shard = NamedSharding(mesh, PartitionSpec("data"))
    sp, sm = jax.device_put(prompts, shard), jax.device_put(mask, shard)
    rep = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    got = sample(model.apply, rep, sp, sm, jax.random.key(5), max_new_tokens=N, eos_id=EOS,
                 pad_id=PAD, temperature=0.9, top_p=0.9)
    want = _sample(setup, key=5, temperature=0.9, top_p=0.9)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=ATOL)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def _refused(setup, match, **inputs):
    """_sample(setup, **inputs) raises ValueError matching `match`, and nothing was compiled."""
    n_compiled = _sample_jit._cache_size()
    with pytest.raises(ValueError, match=match):
        _sample(setup, **inputs)
    assert _sample_jit._cache_size() == n_compiled


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=CONFIG.max_seq_len), "max_seq_len"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=np.array([0.5] * (B - 1) + [2.0])), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=np.ones(B + 1)), "temperature"),
    (dict(eos_id=V), "eos_id"),
    (dict(eos_id=-1), "eos_id"),
    (dict(pad_id=V + 5), "pad_id"),
])
def test_bad_input_raises_before_compiling(setup, kw, match):
    _refused(setup, match, **kw)


def test_bad_prompt_shapes_raise(setup):
    model, params, prompts, mask, _ = setup
    with pytest.raises(ValueError, match="prompt"):
        sample(model.apply, params, prompts[0], mask[0], jax.random.key(0), max_new_tokens=2,
               eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="prompt_mask"):
        sample(model.apply, params, prompts, mask[:, 1:], jax.random.key(0), max_new_tokens=2,
               eos_id=EOS, pad_id=PAD)
    long = np.zeros((1, CONFIG.max_seq_len + 1), np.int32)
    with pytest.raises(ValueError, match="prompt length"):
        sample(model.apply, params, long, np.ones_like(long), jax.random.key(0), max_new_tokens=1,
               eos_id=EOS, pad_id=PAD)


def test_completions_is_a_namedtuple_pytree(setup):
    out = _sample(setup)
    assert isinstance(out, Completions) and out._fields == ("tokens", "mask", "logprobs", "lengths")
    assert len(jax.tree.leaves(out)) == 4


# ------------------------------------------------------------------------------------------
# Bad prompt values (concrete prompts are checked in numpy before anything compiles)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row,col,value", [
    (3, 5, V),          # first id past the vocabulary: used to give token V-1 and NaN log-probs
    (6, 4, V + 1000),
    (2, 5, -1),         # negative ids used to wrap around to V-1 silently
    (5, 0, -V - 7),     # a padded position: pads are embedded too (an out-of-range pad gives NaN)
    (1, 5, 2 ** 32 + 3),  # would wrap to a valid id when cast to int32
])
def test_prompt_ids_outside_vocabulary_raise(setup, row, col, value):
    prompts = setup[2].astype(np.int64)
    prompts[row, col] = value
    _refused(setup, rf"prompt token id {value} at prompts\[{row}, {col}\] is outside the vocabulary \[0, {V}\)",
             prompts=prompts)


def test_prompt_id_errors_list_every_bad_row(setup):
    prompts = setup[2].copy()
    prompts[[1, 4, 6], 5] = [V, -2, V + 3]
    with pytest.raises(ValueError, match=r"prompts\[1, 5\] .* \(3 bad ids in rows \[1, 4, 6\]\)"):
        _sample(setup, prompts=prompts)


def test_all_zero_mask_row_raises(setup):
    mask = setup[3].copy()
    mask[4] = 0
    _refused(setup, r"prompt_mask row 4 is all zero", prompt_mask=mask)
    _refused(setup, r"prompt_mask row 0 is all zero", prompt_mask=np.zeros((B, P), bool))


def test_right_padded_mask_raises(setup):
    """The first new token is predicted from the last column, so a row ending in padding would be
    continued from a pad (it samples different tokens than the same prompt left-padded)."""
    model, params, prompts, mask, _ = setup
    right = np.ones((B, P), np.int32)
    right[3, -2:] = 0
    _refused(setup, r"prompt_mask row 3 ends in padding \(its last real token is at column 3 of 6\): prompts must "
                    r"be left-padded", prompt_mask=right)


def test_zeros_between_real_tokens_are_allowed(setup):
    """A mask with a hole (0 between 1s) is not rejected: positions and attention skip the hole,
    so the row samples exactly what the same prompt without that column does."""
    model, params, prompts, mask, _ = setup
    # Same [B, P] shape (no new compilation): in each row with padding and >= 2 real tokens, move
    # one pad column between the first and the second real token.
    holed_p, holed_m = prompts.copy(), mask.copy()
    n_holed = 0
    for b in range(B):
        real = np.flatnonzero(mask[b])
        if real[0] >= 1 and real.size >= 2:
            order = np.r_[np.arange(real[0] - 1), real[0], real[0] - 1, real[1:]]
            holed_p[b], holed_m[b] = prompts[b, order], mask[b, order]
            assert holed_m[b, real[0] - 1] == 1 and holed_m[b, real[0]] == 0
            n_holed += 1
    assert n_holed >= 3
    a = _sample(setup, temperature=0.0)
    b = _sample(setup, temperature=0.0, prompts=holed_p, prompt_mask=holed_m)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=ATOL)


def test_sharded_prompts_are_checked_per_shard_with_global_rows(setup):
    """Global arrays are read shard by shard (the path a multi-host array takes): the error names
    the global row."""
    from xpo_jax.sampling import _check_prompt_ids, _check_prompt_mask, _shard_rows
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices; tests/conftest.py sets XLA_FLAGS")
    mesh = Mesh(np.array(devices[:8]).reshape(4, 2), ("data", "model"))
    rows = NamedSharding(mesh, PartitionSpec("data"))  # 4 row blocks, each on 2 devices
    prompts = setup[2].copy()
    prompts[5, 2] = V + 1
    blocks = _shard_rows(jax.device_put(prompts, rows))
    assert sorted(s for s, _ in blocks) == [0, 2, 4, 6]
    with pytest.raises(ValueError, match=r"prompts\[5, 2\]"):
        _check_prompt_ids(blocks, V)
    mask = setup[3].copy()
    mask[6] = 0
    with pytest.raises(ValueError, match="prompt_mask row 6 is all zero"):
        _check_prompt_mask(_shard_rows(jax.device_put(mask, rows)))
    # Shards split along columns cannot be checked row by row and are skipped.
    cols = NamedSharding(mesh, PartitionSpec("data", "model"))
    assert _shard_rows(jax.device_put(np.zeros((B, P), np.int32), cols)) == []
    # End to end through `sample` with a sharded (fully addressable) batch.
    with pytest.raises(ValueError, match=r"prompts\[5, 2\]"):
        _sample(setup, prompts=jax.device_put(prompts, rows))


def test_traced_prompts_are_not_checked_under_jit(setup):
    """Inside jit the prompt values are unknown: `sample` still traces (no check, no error)."""
    model, params, prompts, mask, _ = setup
    f = jax.jit(lambda p, m: sample(model.apply, params, p, m, jax.random.key(0), max_new_tokens=N,
                                    eos_id=EOS, pad_id=PAD, temperature=0.0).tokens)
    np.testing.assert_array_equal(f(prompts, mask), _sample(setup, temperature=0.0).tokens)
