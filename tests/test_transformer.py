"""Tests for xpo_jax.models.transformer: config, parameter names, cached decode == full forward,
padding invariance, reward model, RoPE scaling. Tiny f32 models on CPU."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xpo_jax.models import (
    PRESETS,
    Decoder,
    KVCache,
    RewardModel,
    Transformer,
    get_config,
    init_params,
    init_reward_params,
    last_token_index,
    positions_from_mask,
)
from xpo_jax.models.transformer import rope_inv_freq

ATOL = 1e-5
# init_std 0.3 (not HF's 0.02) so that logits are far from uniform and differences show.
CONFIGS = {
    "qwen2-like": get_config("test", init_std=0.3),  # q/k/v bias, untied head
    "llama-like": get_config("test", init_std=0.3, qkv_bias=False, tie_embeddings=True, n_kv_heads=1),
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
    ("qkv_bias", 1), ("max_seq_len", 0), ("init_std", -0.1)])
def test_validate_names_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(PRESETS["test"], **{field: value}).validate()


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
