"""Tests for xpo_jax.models.transformer: config, parameter names, cached decode == full forward,
padding invariance, reward model, RoPE scaling, remat, scan_layers, precision, suppressed tokens,
length limits. Tiny f32 models on CPU."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xpo_jax.models import (
    PRESETS,
    SUPPRESSED_LOGIT,
    Decoder,
    KVCache,
    RewardModel,
    Transformer,
    get_config,
    init_params,
    init_reward_params,
    last_token_index,
    positions_from_mask,
    stack_layer_params,
    unstack_layer_params,
)
from xpo_jax.models.transformer import rope_inv_freq

ATOL = 1e-5
# init_std 0.3 (not HF's 0.02) so that logits are far from uniform and differences show.
CONFIGS = {
    "qwen2-like": get_config("test", init_std=0.3),  # q/k/v bias, untied head
    "llama-like": get_config("test", init_std=0.3, qkv_bias=False, tie_embeddings=True, n_kv_heads=1),
    # nn.scan over the layers (stacked params and KV cache) with rematerialised blocks.
    "qwen2-like-scan": get_config("test", init_std=0.3, scan_layers=True, remat="block"),
}


class Model:
    """A model with its params and jitted entry points, compiled once per module."""

    def __init__(self, config, seed=0):
        self.config = config
        self.module = Transformer(config)
        self.params = init_params(config, jax.random.key(seed))
        v = {"params": self.params}
        self.forward = jax.jit(lambda t, m: self.module.apply(v, t, m))
        self.init_cache = lambda b, s: self.module.apply(v, b, s, method="init_cache")
        self.prefill = jax.jit(lambda t, m, c: self.module.apply(v, t, m, c, method="prefill"))
        self.extend = jax.jit(lambda t, m, c: self.module.apply(v, t, m, c, method="extend"))
        self.decode = jax.jit(lambda t, c: self.module.apply(v, t, c, method="decode"))


_MODELS = {}


def _get_model(name):
    if name not in _MODELS:
        _MODELS[name] = Model(CONFIGS[name])
    return _MODELS[name]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return _get_model(request.param)


@pytest.fixture(scope="module")
def qwen_model():
    return _get_model("qwen2-like")


def _batch(rng, B, T, V, left_pads, right_pads=None):
    tokens = rng.integers(2, V, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    for b, n in enumerate(left_pads):
        mask[b, :n] = 0
    for b, n in enumerate(right_pads or []):
        if n:
            mask[b, T - n:] = 0
    return tokens, mask


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------


def test_presets_exist_and_validate():
    assert {"test", "bench-tiny", "qwen2-0.5b", "llama-1b"} <= set(PRESETS)
    for name in PRESETS:
        assert get_config(name) == PRESETS[name].validate()


def test_bench_tiny_matches_trl_tiny_preset():
    # shared/bench/trl_xpo_round.py PRESETS["tiny"] plus its common Qwen2Config kwargs.
    c = get_config("bench-tiny")
    assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.mlp_dim, c.vocab_size) == (256, 4, 4, 2, 688, 4096)
    assert (c.head_dim, c.tie_embeddings, c.max_seq_len, c.rope_theta, c.rms_eps, c.qkv_bias) == (
        64, False, 4096, 1e6, 1e-6, True)


@pytest.mark.parametrize("name,n_params", [("qwen2-0.5b", 494_032_768), ("llama-1b", 1_235_814_400)])
def test_published_parameter_counts(name, n_params):
    # Abstract init: shapes only, nothing allocated. Counts are the published ones
    # (Qwen2-0.5B: 494M with tied embeddings; Llama-3.2-1B: 1.24B).
    shapes = jax.eval_shape(lambda k: init_params(get_config(name), k), jax.random.key(0))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == n_params


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("d_model", -1), ("n_layers", 1.5), ("head_dim", 7), ("n_kv_heads", 3),
    ("rope_theta", 0.0), ("rms_eps", -1e-6), ("dtype", "int32"), ("param_dtype", "notadtype"),
    ("qkv_bias", 1), ("max_seq_len", 0), ("init_std", -0.1), ("remat", "full"), ("scan_layers", 1),
    ("suppress_ids", (3, 64)), ("suppress_ids", (-1,)), ("suppress_ids", "3"),
    ("suppress_ids", tuple(range(64)))])
def test_validate_names_bad_field(field, value):
    with pytest.raises(ValueError, match=field) as e:
        dataclasses.replace(PRESETS["test"], **{field: value}).validate()
    if field in ("remat", "suppress_ids") and value != tuple(range(64)):
        shown = {"suppress_ids": {(3, 64): "64", (-1,): "-1"}}.get(field, {}).get(value, repr(value))
        assert shown in str(e.value)  # the message names the bad value


def test_suppress_ids_list_becomes_tuple():
    c = get_config("test", suppress_ids=[5, 3])
    assert c.suppress_ids == (5, 3) and hash(c) == hash(get_config("test", suppress_ids=(5, 3)))


def test_get_config_errors():
    with pytest.raises(ValueError, match="nope"):
        get_config("nope")
    with pytest.raises(ValueError, match="not_a_field"):
        get_config("test", not_a_field=1)
    with pytest.raises(ValueError, match="n_kv_heads"):
        get_config("test", n_kv_heads=3)


def test_parameter_tree_follows_hf_names():
    p = jax.eval_shape(lambda k: init_params(get_config("test"), k), jax.random.key(0))
    assert set(p) == {"model", "lm_head"}
    assert set(p["model"]) == {"embed_tokens", "layers_0", "layers_1", "norm"}
    layer = p["model"]["layers_0"]
    assert set(layer) == {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
    assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(layer["self_attn"]["q_proj"]) == {"kernel", "bias"}
    assert set(layer["self_attn"]["o_proj"]) == {"kernel"}
    assert set(layer["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    assert layer["self_attn"]["q_proj"]["kernel"].shape == (32, 4 * 8)  # [in, out] = HF weight.T
    assert layer["self_attn"]["k_proj"]["kernel"].shape == (32, 2 * 8)
    assert p["model"]["embed_tokens"]["embedding"].shape == (64, 32)
    assert p["lm_head"]["kernel"].shape == (32, 64)
    assert set(layer["input_layernorm"]) == {"scale"}
    tied = jax.eval_shape(lambda k: init_params(get_config("test", tie_embeddings=True, qkv_bias=False), k),
                          jax.random.key(0))
    assert set(tied) == {"model"}
    assert set(tied["model"]["layers_0"]["self_attn"]["q_proj"]) == {"kernel"}


# ------------------------------------------------------------------------------------------
# Forward, cache, padding
# ------------------------------------------------------------------------------------------


def test_positions_and_last_index():
    mask = jnp.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5],
                                                              [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(last_token_index(mask), [4, 5, 1])


def test_forward_shapes_dtype_finite(model):
    tokens, mask = _batch(np.random.default_rng(0), 3, 7, 64, [0, 3, 7])  # last row: all pads
    logits = model.forward(tokens, mask)
    assert logits.shape == (3, 7, 64) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_hidden_then_head_equals_forward(qwen_model):
    m = qwen_model
    tokens, mask = _batch(np.random.default_rng(9), 2, 6, 64, [2, 0])
    v = {"params": m.params}
    h = m.module.apply(v, tokens, mask, method="hidden")
    assert h.shape == (2, 6, m.config.d_model)
    logits = m.module.apply(v, h, method="head")
    np.testing.assert_allclose(logits, m.forward(tokens, mask), atol=ATOL)


def test_cached_decode_matches_full_forward_every_step(model):
    """prefill over a left-padded prompt, then one-token decodes: logits equal the full forward's
    at every position (prompt's last position and each generated position)."""
    B, P, N = 3, 7, 6
    tokens, mask = _batch(np.random.default_rng(1), B, P + N, 64, [0, 2, 5])
    full = np.asarray(model.forward(tokens, mask))
    cache = model.init_cache(B, P + N)
    logits, cache = model.prefill(tokens[:, :P], mask[:, :P], cache)
    np.testing.assert_allclose(logits, full[:, P - 1], atol=ATOL, rtol=0)
    for t in range(P, P + N):
        logits, cache = model.decode(tokens[:, t], cache)
        np.testing.assert_allclose(logits, full[:, t], atol=ATOL, rtol=0, err_msg=f"step {t}")
    assert int(cache.index) == P + N
    np.testing.assert_array_equal(cache.next_position, mask.sum(1))


def test_chunked_extend_matches_full_forward(qwen_model):
    m = qwen_model
    B, T = 2, 10
    tokens, mask = _batch(np.random.default_rng(2), B, T, 64, [3, 0], [0, 2])
    full = np.asarray(m.forward(tokens, mask))
    cache = m.init_cache(B, T)
    a, cache = m.extend(tokens[:, :6], mask[:, :6], cache)
    b, cache = m.extend(tokens[:, 6:], mask[:, 6:], cache)
    got = np.concatenate([a, b], axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], full[real], atol=ATOL, rtol=0)


def test_left_padding_does_not_change_outputs(model):
    """The same prompt with 0 and with 4 extra left pads: equal logits on real positions."""
    rng = np.random.default_rng(3)
    T, extra = 9, 4
    tokens, mask = _batch(rng, 2, T, 64, [0, 2])
    padded = np.concatenate([rng.integers(0, 64, (2, extra)).astype(np.int32), tokens], 1)
    pmask = np.concatenate([np.zeros((2, extra), np.int32), mask], 1)
    a = np.asarray(model.forward(tokens, mask))
    b = np.asarray(model.forward(padded, pmask))[:, extra:]
    real = mask.astype(bool)
    np.testing.assert_allclose(a[real], b[real], atol=ATOL, rtol=0)


def test_padded_keys_are_ignored(qwen_model):
    """Changing the token ids under mask 0 (left and right pads) changes no real position."""
    rng = np.random.default_rng(4)
    tokens, mask = _batch(rng, 2, 12, 64, [3, 1], [2, 4])
    other = np.where(mask.astype(bool), tokens, rng.integers(0, 64, tokens.shape)).astype(np.int32)
    real = mask.astype(bool)
    a = np.asarray(qwen_model.forward(tokens, mask))
    b = np.asarray(qwen_model.forward(other, mask))
    np.testing.assert_allclose(a[real], b[real], atol=ATOL, rtol=0)


def test_extend_rejects_chunk_longer_than_cache(qwen_model):
    m = qwen_model
    cache = m.init_cache(2, 4)
    with pytest.raises(ValueError, match="longer than the KV cache"):
        m.module.apply({"params": m.params}, jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5)), cache,
                       method="prefill")


def test_init_cache_layout():
    c = get_config("test")
    cache = Transformer(c).apply({"params": {}}, 3, 11, method="init_cache")
    assert isinstance(cache, KVCache)
    assert len(cache.k) == len(cache.v) == c.n_layers
    assert cache.k[0].shape == (3, c.n_kv_heads, 11, c.head_dim)
    assert cache.mask.shape == (3, 11) and cache.mask.dtype == jnp.bool_
    assert cache.index.shape == () and cache.next_position.shape == (3,)


def test_bf16_compute_returns_float32_logits():
    c = get_config("test", dtype="bfloat16", param_dtype="bfloat16", init_std=0.3)
    p = init_params(c, jax.random.key(0))
    assert jax.tree.leaves(p)[0].dtype == jnp.bfloat16
    tokens, mask = _batch(np.random.default_rng(5), 2, 5, 64, [1, 0])
    logits = jax.jit(Transformer(c).apply)({"params": p}, tokens, mask)
    assert logits.dtype == jnp.float32
    ref = CONFIGS["qwen2-like"]
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p)
    ref_logits = jax.jit(Transformer(ref).apply)({"params": p32}, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref_logits)[real], atol=0.1)


# ------------------------------------------------------------------------------------------
# Reward model
# ------------------------------------------------------------------------------------------


def test_reward_model_reads_last_non_pad_token():
    c = CONFIGS["qwen2-like"]
    rm = RewardModel(c)
    p = init_reward_params(c, jax.random.key(7))
    assert set(p) == {"model", "score"} and p["score"]["kernel"].shape == (c.d_model, 1)
    assert "bias" not in p["score"]
    rng = np.random.default_rng(6)
    tokens, mask = _batch(rng, 3, 10, 64, [2, 0, 4], [3, 0, 1])
    rm_apply = jax.jit(rm.apply)
    r = rm_apply({"params": p}, tokens, mask)
    assert r.shape == (3,) and r.dtype == jnp.float32
    # Manually: trunk hidden state at the last real token, times the score kernel.
    h = jax.jit(Decoder(c).apply)({"params": p["model"]}, tokens, mask)
    last = [9 - 3, 9, 9 - 1]
    manual = np.stack([np.asarray(h[b, last[b]]) @ np.asarray(p["score"]["kernel"][:, 0]) for b in range(3)])
    np.testing.assert_allclose(r, manual, atol=ATOL)
    # Right pads' contents do not matter, and truncating after the last real token changes nothing.
    other = np.where(mask.astype(bool), tokens, 5).astype(np.int32)
    np.testing.assert_allclose(rm_apply({"params": p}, other, mask), r, atol=ATOL)
    r0 = rm_apply({"params": p}, tokens[:1, :7], mask[:1, :7])
    np.testing.assert_allclose(r0, r[:1], atol=ATOL)


# ------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------


def test_rope_frequencies_and_llama3_scaling():
    c = get_config("test", head_dim=16, rope_theta=10000.0)
    np.testing.assert_allclose(rope_inv_freq(c), 10000.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)
    base = rope_inv_freq(get_config("llama-1b", rope_scaling=None))
    scaled = rope_inv_freq(get_config("llama-1b"))
    wavelen = 2 * np.pi / base
    high = wavelen < 8192 / 4.0   # short wavelengths: unchanged
    low = wavelen > 8192 / 1.0    # long wavelengths: divided by the factor
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], base[low] / 32.0, rtol=1e-6)
    mid = ~high & ~low  # in between: between the two
    assert np.all(scaled[mid] <= base[mid]) and np.all(scaled[mid] >= base[mid] / 32.0)


def test_rope_is_relative():
    """q.k after RoPE depends only on the position difference."""
    from xpo_jax.models.transformer import apply_rope, rope_tables
    inv = rope_inv_freq(get_config("test"))
    rng = np.random.default_rng(8)
    q = jnp.asarray(rng.normal(size=(1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 8)), jnp.float32)
    rot = lambda x, i: apply_rope(x, *rope_tables(jnp.array([[i]]), inv))  # noqa: E731
    dot = lambda i, j: float(jnp.sum(rot(q, i) * rot(k, j)))  # noqa: E731
    assert dot(3, 1) == pytest.approx(dot(12, 10), abs=1e-5)
    assert dot(3, 1) != pytest.approx(dot(3, 2), abs=1e-3)


# ------------------------------------------------------------------------------------------
# Memory and compile-time options: remat, scan_layers
# ------------------------------------------------------------------------------------------


def _seq_logprob_loss(config):
    """Mean next-token log-prob over real positions: a sequence log-prob loss as the round's."""

    def loss(params, tokens, mask):
        logp = jax.nn.log_softmax(Transformer(config).apply({"params": params}, tokens, mask))
        lp = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
        w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        return jnp.sum(lp * w) / jnp.sum(w)

    return loss


_GRAD = jax.jit(lambda config, p, t, m: jax.grad(_seq_logprob_loss(config))(p, t, m), static_argnums=0)


def _max_abs_diff(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("remat", ["block", "matmuls"])
def test_remat_gradients_equal_plain_gradients(remat, scan):
    """Rematerialisation recomputes the same float32 operations, compiled as another program:
    gradients agree to 1e-5 (measured 3e-7 to 1.1e-6 on 2-core AMD EPYC machines; the gradients
    themselves are O(0.5), so this is a few float32 ulps of accumulated rounding)."""
    base = get_config("test", init_std=0.3, scan_layers=scan)
    params = _get_model("qwen2-like").params
    if scan:
        params = stack_layer_params(params, base.n_layers)
    tokens, mask = _batch(np.random.default_rng(10), 3, 9, 64, [0, 3, 1])
    plain = _GRAD(base, params, tokens, mask)  # compiled once per `scan`, then cached by jit
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain)) > 0.1
    got = _GRAD(dataclasses.replace(base, remat=remat), params, tokens, mask)
    assert _max_abs_diff(got, plain) < 1e-5


def test_scan_layers_matches_unrolled_logits_and_gradients():
    unrolled = CONFIGS["qwen2-like"]
    scanned = dataclasses.replace(unrolled, scan_layers=True)
    params = _get_model("qwen2-like").params
    stacked = stack_layer_params(params, unrolled.n_layers)
    assert set(stacked["model"]) == {"embed_tokens", "layers", "norm"}
    assert stacked["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 32, 64)
    # The scanned module's own parameter tree has exactly this layout.
    shapes = jax.eval_shape(lambda k: init_params(scanned, k), jax.random.key(0))
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, stacked)
    tokens, mask = _batch(np.random.default_rng(11), 3, 9, 64, [0, 3, 1], [2, 0, 0])
    real = mask.astype(bool)
    a = np.asarray(_get_model("qwen2-like").forward(tokens, mask))
    b = np.asarray(jax.jit(Transformer(scanned).apply)({"params": stacked}, tokens, mask))
    np.testing.assert_allclose(b[real], a[real], atol=ATOL, rtol=0)
    g = _GRAD(unrolled, params, tokens, mask)
    gs = unstack_layer_params(_GRAD(scanned, stacked, tokens, mask), unrolled.n_layers)
    assert _max_abs_diff(gs, g) < 1e-6  # float rounding (measured ~4e-7)
    assert unstack_layer_params(stacked, 2)["model"].keys() == params["model"].keys()


def test_scan_layers_cache_is_stacked():
    c = CONFIGS["qwen2-like-scan"]
    cache = Transformer(c).apply({"params": {}}, 3, 11, method="init_cache")
    assert cache.k.shape == cache.v.shape == (c.n_layers, 3, c.n_kv_heads, 11, c.head_dim)
    assert len(cache.k) == c.n_layers and cache.k[0].shape == (3, c.n_kv_heads, 11, c.head_dim)


@pytest.mark.parametrize("scan", [False, True])
def test_decode_updates_the_cache_in_place(scan):
    """A donated decode step aliases the whole cache (input buffer = output buffer) and its
    temporaries stay below one layer's k and v (scan reads a layer back by a dynamic slice) plus
    1 MiB: no copy of the cache per generated token. Compiled only, not run."""
    c = get_config("test", max_seq_len=4096, scan_layers=scan)
    m = Transformer(c)
    params = jax.eval_shape(lambda k: init_params(c, k), jax.random.key(0))
    cache = jax.eval_shape(lambda: m.apply({"params": {}}, 8, 4096, method="init_cache"))
    kv_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.k, cache.v)))
    step = jax.jit(lambda p, t, ca: m.apply({"params": p}, t, ca, method="decode"), donate_argnums=2)
    mem = step.lower(params, jax.ShapeDtypeStruct((8,), jnp.int32), cache).compile().memory_analysis()
    assert mem.alias_size_in_bytes >= kv_bytes
    assert mem.temp_size_in_bytes <= kv_bytes / c.n_layers + 2**20


# ------------------------------------------------------------------------------------------
# Precision
# ------------------------------------------------------------------------------------------


def test_bf16_compute_over_f32_master_weights():
    """dtype=bfloat16, param_dtype=float32 (the large presets): float32 logits within 0.05 of
    the float32 model's log-probs at init_std 0.1 (measured 0.021; bf16 keeps 8 significant
    bits), and float32 gradients for the float32 master weights."""
    c32 = get_config("test", init_std=0.1)
    cbf = dataclasses.replace(c32, dtype="bfloat16")
    params = init_params(c32, jax.random.key(3))
    tokens, mask = _batch(np.random.default_rng(12), 3, 10, 64, [0, 3, 1])
    real = mask.astype(bool)
    lp = lambda c: np.asarray(jax.nn.log_softmax(jax.jit(Transformer(c).apply)({"params": params}, tokens, mask)))  # noqa: E731
    lp32, lpbf = lp(c32), lp(cbf)
    assert np.abs(lpbf - lp32)[real].max() < 0.05
    assert np.abs(lpbf - lp32)[real].max() > 0  # bf16 really was used
    g = _GRAD(cbf, params, tokens, mask)
    assert all(x.dtype == jnp.float32 and np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_bf16_stored_params_accepted_by_f32_model(qwen_model):
    """A reference model cast to bfloat16 storage runs through the float32 model unchanged
    (every weight is cast to the compute dtype where it is used)."""
    m = qwen_model
    ref = jax.tree.map(lambda x: x.astype(jnp.bfloat16), m.params)
    tokens, mask = _batch(np.random.default_rng(13), 2, 8, 64, [2, 0])
    got = np.asarray(jax.jit(m.module.apply)({"params": ref}, tokens, mask))
    want = np.asarray(m.forward(tokens, mask))
    assert got.dtype == np.float32
    # Only the weights were rounded (2^-9 relative): logits of size ~7 move by < 0.5.
    real = mask.astype(bool)
    assert np.abs(got - want)[real].max() < 0.5


# ------------------------------------------------------------------------------------------
# Suppressed tokens
# ------------------------------------------------------------------------------------------


def test_suppress_ids_zero_probability_and_cache_consistent():
    base = CONFIGS["qwen2-like"]
    c = dataclasses.replace(base, suppress_ids=(0, 7, 63))
    m = Model(c)
    m.params = _get_model("qwen2-like").params  # same weights: only the suppressed logits move
    v = {"params": m.params}
    B, P, N = 2, 5, 4
    tokens, mask = _batch(np.random.default_rng(14), B, P + N, 64, [0, 2])
    full = np.asarray(jax.jit(m.module.apply)(v, tokens, mask))
    plain = np.asarray(_get_model("qwen2-like").forward(tokens, mask))
    keep = np.ones(64, bool)
    keep[[0, 7, 63]] = False
    # two compiled programs (with and without the suppression): float32 rounding, not bitwise
    np.testing.assert_allclose(full[..., keep], plain[..., keep], rtol=1e-6, atol=1e-6)
    assert (full[..., ~keep] == SUPPRESSED_LOGIT).all()
    probs = np.asarray(jax.nn.softmax(full, axis=-1))
    logp = np.asarray(jax.nn.log_softmax(full, axis=-1))
    assert (probs[..., ~keep] == 0).all() and np.isfinite(logp).all()
    assert (0.0 * logp == 0).all()  # an expectation over tokens is not poisoned by NaN
    # The cached path makes its logits in the same place.
    prefill = jax.jit(lambda t, mk, ca: m.module.apply(v, t, mk, ca, method="prefill"))
    decode = jax.jit(lambda t, ca: m.module.apply(v, t, ca, method="decode"))
    logits, cache = prefill(tokens[:, :P], mask[:, :P], m.module.apply(v, B, P + N, method="init_cache"))
    np.testing.assert_allclose(logits, full[:, P - 1], atol=ATOL, rtol=0)
    for t in range(P, P + N):
        logits, cache = decode(tokens[:, t], cache)
        np.testing.assert_allclose(logits, full[:, t], atol=ATOL, rtol=0)
    hidden = m.module.apply(v, tokens, mask, method="hidden")
    np.testing.assert_allclose(m.module.apply(v, hidden, method="head"), full, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------
# Length limits (trace-time checks)
# ------------------------------------------------------------------------------------------


def test_too_long_inputs_are_rejected_by_the_model():
    c = get_config("test", max_seq_len=16)
    module = Transformer(c)
    with pytest.raises(ValueError, match=r"17 slots.*max_seq_len 16"):
        module.apply({"params": {}}, 2, 17, method="init_cache")
    module.apply({"params": {}}, 2, 16, method="init_cache")  # the limit itself is fine
    params = jax.eval_shape(lambda k: init_params(c, k), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((2, 17), jnp.int32)
    for method in (None, "hidden"):  # the full forward, traced: nothing is compiled or run
        with pytest.raises(ValueError, match=r"17 tokens.*max_seq_len 16"):
            jax.eval_shape(lambda p, t, m=method: module.apply({"params": p}, t, jnp.ones(t.shape, bool), method=m),
                           params, tokens)
    with pytest.raises(ValueError, match=r"17 tokens.*max_seq_len 16"):
        jax.eval_shape(lambda p, t: RewardModel(c).apply({"params": p}, t, jnp.ones(t.shape, bool)),
                       jax.eval_shape(lambda k: init_reward_params(c, k), jax.random.key(0)), tokens)


def test_sampler_with_wrapped_apply_fn_gets_a_clear_error_before_compiling():
    """`sample` reads max_seq_len from `model.apply`'s bound module; behind a lambda it cannot,
    and the model's own check must fire while the sampler is traced, before any compilation."""
    from xpo_jax.sampling import sample

    c = get_config("test", max_seq_len=16)
    module = Transformer(c)
    params = init_params(c, jax.random.key(0))
    wrapped = lambda *a, **k: module.apply(*a, **k)  # noqa: E731
    prompts, mask = np.ones((2, 10), np.int32), np.ones((2, 10), np.int32)
    call = lambda: sample(wrapped, params, prompts, mask, jax.random.key(0), max_new_tokens=12,  # noqa: E731
                          eos_id=1, pad_id=0)
    with pytest.raises(ValueError, match=r"21 slots.*max_seq_len 16"):
        call()  # warms the small eager ops of the argument checks
    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.raises(ValueError, match=r"21 slots.*max_seq_len 16"):
            call()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
