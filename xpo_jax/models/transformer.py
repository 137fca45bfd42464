"""Llama / Qwen2 / Mistral / Gemma 2-3 decoder language model in Flax Linen, with an explicit KV cache.

Architecture (Touvron et al. 2023, arXiv 2302.13971; Qwen2, arXiv 2407.10671), per layer:

    h   = x + o_proj(Attention(RoPE(q_proj(RMSNorm(x))), RoPE(k_proj(.)), v_proj(.)))
    out = h + down_proj(silu(gate_proj(RMSNorm(h))) * up_proj(RMSNorm(h)))          (SwiGLU)

    RMSNorm(x) = scale * x / sqrt(mean(x^2) + eps)                (Zhang & Sennrich 2019)
    Attention  = softmax(q k^T / sqrt(head_dim) + mask) v, grouped-query (Ainslie et al. 2023):
                 query head h reads key/value head h // (n_heads / n_kv_heads), as HF `repeat_kv`.
    RoPE       = x * cos(p w) + rotate_half(x) * sin(p w), w_i = theta^(-2i/head_dim)
                 (Su et al. 2021), HF "rotate_half" convention: the two halves of each head are
                 rotated together, so HF q/k weights import without any permutation.

Gemma 2 / 3 (Gemma Team 2024, arXiv 2408.00118; 2025, arXiv 2503.19786) are the same block with
ModelConfig options (defaults give the Llama block above): embeddings times sqrt(D); RMSNorm
times (1 + w); GeGLU (tanh GELU) instead of SwiGLU; "sandwich" norms

    h   = x + post_attention_layernorm(o_proj(Attention(input_layernorm(x))))
    out = h + post_feedforward_layernorm(MLP(pre_feedforward_layernorm(h)))

scores scaled by query_pre_attn_scalar^-1/2 and soft-capped c tanh(s / c) (Gemma 2, also the
final logits); QK-norm (RMSNorm of each q / k head before RoPE) and a separate RoPE base for the
local layers (Gemma 3). Sliding-window layers (Mistral, Qwen2, Gemma's local layers) mask keys
at slots <= t - W for the query at slot t, in the full forward and the cached path alike. Extra
parameters, named as in HF: self_attn/{q,k}_norm/scale, {pre,post}_feedforward_layernorm/scale.

Padding. `mask` [B, T] marks real tokens. Prompts are left-padded and responses right-padded, so a
row looks like `pad pad p1 p2 p3 r1 r2 EOS pad`. Positions are `cumsum(mask) - 1` clipped at 0,
so a left-padded prompt gets exactly the positions of the unpadded one, and attention is causal
AND never looks at a padded key. Outputs at padded positions are finite but meaningless. Logits at
position t predict token t+1 and are float32 whatever the compute dtype.

Parameter tree (the "params" collection) and the mechanical map from HF Llama / Qwen2 names
(`LlamaForCausalLM`, `Qwen2ForCausalLM`, `*ForSequenceClassification`). A Linear `weight` is
[out, in] in torch and `kernel` [in, out] here, so it is transposed; nothing else changes:

    HF name                                          xpo_jax path                                   op
    model.embed_tokens.weight          [V, D]        model/embed_tokens/embedding       [V, D]
    model.layers.{i}.input_layernorm.weight          model/layers_{i}/input_layernorm/scale
    model.layers.{i}.self_attn.q_proj.weight [H*Dh,D] model/layers_{i}/self_attn/q_proj/kernel [D,H*Dh] .T
    model.layers.{i}.self_attn.q_proj.bias   (Qwen2) model/layers_{i}/self_attn/q_proj/bias
    model.layers.{i}.self_attn.{k,v}_proj.{weight,bias}   .../self_attn/{k,v}_proj/{kernel,bias}     .T (kernel)
    model.layers.{i}.self_attn.o_proj.weight         model/layers_{i}/self_attn/o_proj/kernel      .T
    model.layers.{i}.post_attention_layernorm.weight model/layers_{i}/post_attention_layernorm/scale
    model.layers.{i}.mlp.{gate,up,down}_proj.weight  model/layers_{i}/mlp/{gate,up,down}_proj/kernel .T
    model.norm.weight                                model/norm/scale
    lm_head.weight                     [V, D]        lm_head/kernel                      [D, V]     .T
        (absent when tie_word_embeddings / tie_embeddings: logits use model/embed_tokens/embedding)
    score.weight                       [1, D]        score/kernel (RewardModel only)     [D, 1]     .T

i.e. split the HF name on ".", join "layers" and its index as "layers_{i}", rename the leaf
(`weight` -> `kernel` (transposed) for Linear, `scale` for RMSNorm, `embedding` for the embedding).
With `scan_layers` the per-layer entries are stacked instead: `model/layers/self_attn/q_proj/
kernel` [n_layers, D, H*Dh], whose [i] is `model/layers_{i}/self_attn/q_proj/kernel`.
experiments/bench_sampler.py applies this map to load our weights into HF `Qwen2ForCausalLM` and
compares logits on a left- and right-padded batch (float32: max |difference| ~1e-6).

Precision. `dtype` is the compute dtype (activations, KV cache; attention scores, softmax,
RMSNorm statistics and RoPE always in float32) and `param_dtype` the storage dtype. The large
presets compute in bfloat16 with float32 parameters (for accelerators); `test` and `bench-tiny`
are float32 throughout (CPU tests). Every weight is cast to the compute dtype where it is used, so
apply accepts parameters stored in any float dtype (e.g. a bfloat16 copy of a reference model).

Length. `max_seq_len` is enforced by the model itself, at trace time: a full forward over more
than max_seq_len tokens, or a KV cache with more slots, raises ValueError naming both numbers.

KV cache. `KVCache` is a plain pytree (no Flax "cache" collection): per-layer key and value
buffers laid out [B, n_kv_heads, S, head_dim] (stacked [n_layers, ...] with scan_layers), a slot
mask [B, S], the write index (shared by all rows, because prompts are left-padded to one length)
and each row's next RoPE position. The [B, Hkv, S, Dh] layout keeps (batch, head) leading and
head_dim last, so both attention einsums are plain batched matmuls on the cache as stored -- no
per-step transpose or copy of the cache -- and a decode step writes one slot with
`dynamic_update_slice`, in place inside a jitted loop (with scan_layers the stacked cache rides in
the scan's carry for the same reason, see `_ScanLayer`).

Methods (call through `model.apply({"params": params}, ..., method=NAME)`):

    __call__(tokens, mask)                -> logits [B, T, V] f32           (full forward, no cache)
    hidden(tokens, mask) / head(h)        -> final hidden [B, T, D] / logits of hidden states
    init_cache(batch_size, max_len)       -> KVCache (zeros; reads no params)
    prefill(tokens, mask, cache)          -> (logits of the last position [B, V] f32, cache)
    decode(tokens [B], cache)             -> (logits [B, V] f32, cache)    (one token per row)
    extend(tokens, mask, cache)           -> (logits [B, T, V] f32, cache) (general chunk; prefill
                                             and decode are this with T = prompt length / 1)

The cached path attends to the cache after writing the chunk into it, with the mask
`slot <= index + t  and  cache.mask[b, slot]`, which is the full forward's causal-and-not-pad
mask restated in slots (a sliding layer adds `slot > index + t - W`: the cache keeps every slot
and the window is a mask on it, so the slots a sampler allocates do not shrink with W); the
tests check equality at every step.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xpo_jax.models.lora import LoraDense
from xpo_jax.parallel import pin_batch, pin_columns, pin_heads

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1+ RoPE frequency scaling (HF `rope_type="llama3"`).

    With wavelength l_i = 2 pi / w_i and L = original_max_position:
    l_i > L / low_freq_factor  -> w_i / factor;   l_i < L / high_freq_factor -> w_i;
    otherwise (1 - s) w_i / factor + s w_i with s = (L / l_i - low) / (high - low).
    """

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
    """Position interpolation (HF `rope_type="linear"`, Gemma 3's global layers): w_i / factor."""

    factor: float = 1.0


# Layer kinds (HF `layer_types`): full causal attention, or causal attention over the last
# `sliding_window` slots only (Mistral, Gemma 2/3 local layers).
LAYER_TYPES = ("full_attention", "sliding_attention")

# MLP gate activations: SwiGLU (Llama) or GeGLU with the tanh approximation of GELU (Gemma;
# HF "gelu_pytorch_tanh": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))).
ACTIVATIONS: dict[str, Any] = {"silu": nn.silu, "gelu_tanh": lambda x: nn.gelu(x, approximate=True)}


# What the backward pass keeps of a decoder layer's forward (`jax.checkpoint` policies).
# "block" keeps nothing inside the layer: memory O(n_layers * B * T * D) for the layer inputs, at
# the price of a second forward of every layer. "matmuls" keeps the outputs of the dots without
# batch dimensions -- the q/k/v/o, gate/up/down projections -- and recomputes the cheap
# elementwise work and the attention (whose score matmuls have batch dimensions (b, h), and whose
# [B, H, T, T] scores are the largest activations). experiments/bench_compile_layers.py measures
# this against `checkpoint_dots` (which keeps the attention matmuls too).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Logit of a suppressed token (ModelConfig.suppress_ids). exp(SUPPRESSED_LOGIT - max logit)
# underflows to exactly 0 in float32, so the token has probability 0 and is never sampled, while
# its log-prob stays finite (-1e9 - logsumexp): 0 * log p is 0, not NaN, in every expectation.
SUPPRESSED_LOGIT = -1e9


def suppress(logits: Array, config: "ModelConfig") -> Array:
    """Logits [..., V] with `config.suppress_ids` set to SUPPRESSED_LOGIT (probability 0)."""
    if not config.suppress_ids:
        return logits
    banned = np.zeros(config.vocab_size, bool)
    banned[list(config.suppress_ids)] = True
    return jnp.where(banned, jnp.float32(SUPPRESSED_LOGIT), logits)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama/Qwen2 decoder.

    `dtype` is the compute dtype (activations, KV cache), `param_dtype` the storage dtype of the
    parameters; both accept a string ("bfloat16") or a jnp dtype. `max_seq_len` (HF
    max_position_embeddings) bounds prompt + generated length; RoPE itself has no limit.
    `init_std` is HF's `initializer_range` (normal init of every Linear and the embedding).

    Memory and compile time (none of these changes the function the model computes):
      remat: "none"; "block" rematerialises each decoder layer in the backward pass (only the
        layer inputs are kept, `nn.remat`); "matmuls" keeps the outputs of the projection
        matmuls and recomputes the rest (norms, RoPE, attention, SiLU): see REMAT_POLICIES.
      scan_layers: run the identical decoder layers with `nn.scan`: one compiled layer instead
        of n_layers copies. Parameters are then stacked, `model/layers/...` with a leading
        [n_layers] axis instead of `model/layers_{i}/...`, and so is the KV cache
        ([n_layers, B, Hkv, S, Dh] arrays instead of tuples). `stack_layer_params` /
        `unstack_layer_params` convert between the two layouts; load_hf / save_hf follow it.
    suppress_ids: token ids the model never generates: their logits are set to SUPPRESSED_LOGIT
      (finite, so log-probs stay finite), in `_logits`, the one place logits are made, so the
      sampler, training log-probs and exact evaluation all see the same distribution.

    Block options (defaults: Llama / Qwen2; Gemma 2 / 3 set them, see models/families.py):
      hidden_act: MLP gate activation, a key of ACTIVATIONS ("silu" SwiGLU, "gelu_tanh" GeGLU).
      norm_plus_one: RMSNorm multiplies by (1 + w) in float32 (w initialised to 0), as Gemma.
      embed_scale: embeddings times sqrt(d_model), rounded to the compute dtype (as HF Gemma).
      sandwich_norms: Gemma 2's pre- AND post-norms: x + post_attention_layernorm(attn(
        input_layernorm(x))), then h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))).
        (Without it post_attention_layernorm is the pre-MLP norm, as Llama names it.)
      qk_norm: RMSNorm over head_dim of each query and key head before RoPE (Gemma 3).
      query_pre_attn_scalar: attention scores scaled by query_pre_attn_scalar^-1/2 instead of
        head_dim^-1/2 (Gemma).
      attn_softcap / final_softcap: soft-capping c tanh(s / c) of the attention scores (before
        the mask) / of the final logits (Gemma 2); None is no capping.
      sliding_window: W; a "sliding_attention" layer's query at slot t sees keys at slots
        t - W < s <= t only (HF's rule, slots counting padding as HF's cache positions do).
      layer_types: per layer "full_attention" or "sliding_attention" (HF `layer_types`); empty:
        every layer slides if sliding_window is set (Mistral), else none does.
      rope_local_theta: RoPE base of the sliding layers, which then use no rope_scaling (Gemma 3's
        rope_local_base_freq); None: every layer uses rope_theta and rope_scaling.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    max_seq_len: int = 4096
    init_std: float = 0.02
    rope_scaling: Optional[Llama3RopeScaling] = None
    remat: str = "none"
    scan_layers: bool = False
    suppress_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"
    norm_plus_one: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    qk_norm: bool = False
    query_pre_attn_scalar: Optional[float] = None
    attn_softcap: Optional[float] = None
    final_softcap: Optional[float] = None
    sliding_window: Optional[int] = None
    layer_types: tuple[str, ...] = ()
    rope_local_theta: Optional[float] = None

    def __post_init__(self):
        # A list is the natural way to write ids on a command line or in JSON; the config must
        # stay hashable (it is a static field of the Flax modules), so store a tuple.
        for name in ("suppress_ids", "layer_types"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it attend over the sliding window only?"""
        if self.layer_types:
            return tuple(t == "sliding_attention" for t in self.layer_types)
        return (self.sliding_window is not None,) * self.n_layers

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the first bad field; return self so calls chain."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "mlp_dim", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide "
                             f"n_heads={self.n_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        for name in ("rope_theta", "rms_eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {v!r}")
        if not (isinstance(self.init_std, (int, float)) and self.init_std >= 0):
            raise ValueError(f"ModelConfig.init_std must be >= 0, got {self.init_std!r}")
        for name in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("dtype", "param_dtype"):
            try:
                dt = jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is not a dtype") from e
            if not jnp.issubdtype(dt, jnp.floating):
                raise ValueError(f"ModelConfig.{name} must be a floating dtype, got {dt}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat must be one of {sorted(REMAT_POLICIES)}, "
                             f"got {self.remat!r}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"ModelConfig.scan_layers must be a bool, got {self.scan_layers!r}")
        ids = self.suppress_ids
        if not isinstance(ids, tuple):
            raise ValueError(f"ModelConfig.suppress_ids must be a tuple of token ids, got {ids!r}")
        for i in ids:
            if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < self.vocab_size:
                raise ValueError(f"ModelConfig.suppress_ids: {i!r} is not a token id in "
                                 f"[0, vocab_size={self.vocab_size})")
        if len(set(ids)) >= self.vocab_size:
            raise ValueError(f"ModelConfig.suppress_ids suppresses all {self.vocab_size} tokens")
        rs = self.rope_scaling
        if rs is not None:
            if not isinstance(rs, (Llama3RopeScaling, LinearRopeScaling)):
                raise ValueError(f"ModelConfig.rope_scaling must be None, Llama3RopeScaling or "
                                 f"LinearRopeScaling, got {rs!r}")
            if isinstance(rs, LinearRopeScaling) and not rs.factor > 0:
                raise ValueError(f"ModelConfig.rope_scaling has bad values: {rs!r}")
            if isinstance(rs, Llama3RopeScaling) and not (
                    rs.factor > 0 and rs.high_freq_factor > rs.low_freq_factor > 0 and rs.original_max_position > 0):
                raise ValueError(f"ModelConfig.rope_scaling has bad values: {rs!r}")
        return self._validate_block_options()

    def _validate_block_options(self) -> "ModelConfig":
        """The Gemma-style options (see the class docstring); returns self."""
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.hidden_act must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.hidden_act!r}")
        for name in ("norm_plus_one", "embed_scale", "sandwich_norms", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_local_theta"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and v > 0 and math.isfinite(v)):
                raise ValueError(f"ModelConfig.{name} must be None or a positive finite number, got {v!r}")
        w = self.sliding_window
        if w is not None and (not isinstance(w, (int, np.integer)) or isinstance(w, bool) or w <= 0):
            raise ValueError(f"ModelConfig.sliding_window must be None or a positive int, got {w!r}")
        lt = self.layer_types
        if not isinstance(lt, tuple) or (lt and len(lt) != self.n_layers) or set(lt) - set(LAYER_TYPES):
            raise ValueError(f"ModelConfig.layer_types must be () or {self.n_layers} (n_layers) entries "
                             f"of {LAYER_TYPES}, got {lt!r}")
        if "sliding_attention" in lt and w is None:
            raise ValueError("ModelConfig.layer_types has sliding_attention layers but sliding_window "
                             "is None")
        return self


PRESETS: dict[str, ModelConfig] = {
    # Tiny and fast to compile: for unit tests (Qwen2 flavour: q/k/v bias, untied head).
    "test": ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        mlp_dim=64, rope_theta=10000.0, rms_eps=1e-6, qkv_bias=True,
                        tie_embeddings=False, max_seq_len=512),
    # The `tiny` preset of shared/bench/trl_xpo_round.py (Qwen2Config, HF defaults filled in:
    # head_dim = 256 / 4, rope_theta 1e6, rms_norm_eps 1e-6, attention bias on).
    "bench-tiny": ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                              head_dim=64, mlp_dim=688, rope_theta=1e6, rms_eps=1e-6, qkv_bias=True,
                              tie_embeddings=False, max_seq_len=4096),
    # The deep presets scan their layers: experiments/bench_compile_layers.py measured a training
    # step's trace + compile at 24 and 32 layers 1.2-2.8x faster scanned (flat in depth, while the
    # unrolled program grows with it), and only scanned layers let XLA (CPU) realise remat's
    # memory saving. The shallow presets stay unrolled: little to gain at 2-4 layers.
    # Qwen/Qwen2-0.5B (and the `small` preset of trl_xpo_round.py).
    "qwen2-0.5b": ModelConfig(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                              head_dim=64, mlp_dim=4864, rope_theta=1e6, rms_eps=1e-6, qkv_bias=True,
                              tie_embeddings=True, dtype="bfloat16", param_dtype="float32",
                              max_seq_len=32768, scan_layers=True),
    # meta-llama/Llama-3.2-1B shape (random init here; rope_scaling as in its config.json).
    "llama-1b": ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                            head_dim=64, mlp_dim=8192, rope_theta=500000.0, rms_eps=1e-5,
                            qkv_bias=False, tie_embeddings=True, dtype="bfloat16",
                            param_dtype="float32", max_seq_len=131072,
                            rope_scaling=Llama3RopeScaling(32.0, 1.0, 4.0, 8192), scan_layers=True),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset from PRESETS with fields replaced by `overrides`, validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    bad = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if bad:
        raise ValueError(f"unknown ModelConfig field(s) {sorted(bad)}")
    return dataclasses.replace(PRESETS[name], **overrides).validate()


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """Explicit decoding state. S = number of slots (prompt length + new tokens).

    k, v:          tuples of n_layers arrays [B, n_kv_heads, S, head_dim] (compute dtype); with
                   scan_layers one stacked array [n_layers, B, n_kv_heads, S, head_dim] each
                   (`k[i]` is layer i's buffer either way).
    mask:          [B, S] bool, slot holds a real token (a key that may be attended to).
    index:         [] int32, slots [0, index) are written; the next chunk is written at index.
                   One index for all rows: prompts are left-padded to a common length.
    next_position: [B] int32, RoPE position the next real token of each row gets
                   (= number of real tokens seen so far).
    """

    k: tuple
    v: tuple
    mask: Array
    index: Array
    next_position: Array


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache with `max_len` slots; `dtype` defaults to the compute dtype.

    Raises ValueError when max_len > config.max_seq_len: a sequence cannot outgrow the model, and
    the shapes are static, so a sampler asking for too long a cache fails here, while tracing,
    however it reaches the model."""
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if max_len > config.max_seq_len:
        raise ValueError(f"a KV cache of {max_len} slots exceeds the model's max_seq_len "
                         f"{config.max_seq_len}")
    dtype = config.compute_dtype if dtype is None else jnp.dtype(dtype)
    shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
    # pin_heads: split by rows and KV heads where a traced region's layout says (parallel.py).
    if config.scan_layers:
        zeros = lambda: pin_heads(jnp.zeros((config.n_layers,) + shape, dtype), stacked=True)  # noqa: E731
    else:
        zeros = lambda: tuple(pin_heads(jnp.zeros(shape, dtype)) for _ in range(config.n_layers))  # noqa: E731
    return KVCache(k=zeros(), v=zeros(), mask=jnp.zeros((batch_size, max_len), bool),
                   index=jnp.zeros((), jnp.int32), next_position=jnp.zeros((batch_size,), jnp.int32))


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def positions_from_mask(mask: Array) -> Array:
    """RoPE positions cumsum(mask) - 1 clipped at 0: left padding does not shift positions."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def last_token_index(mask: Array) -> Array:
    """Index of the last real token of each row of `mask` [B, T] (T - 1 if the row is empty)."""
    T = mask.shape[-1]
    return (T - 1 - jnp.argmax(mask.astype(bool)[:, ::-1], axis=-1)).astype(jnp.int32)


def rope_inv_freq(config: ModelConfig, local: bool = False) -> np.ndarray:
    """w_i = theta^(-2i/Dh), i < Dh/2, computed in float32 as HF does, optionally llama3- or
    linearly scaled. `local`: the sliding layers' frequencies when config.rope_local_theta is set
    (that base, no scaling, as Gemma 3's rope_local_base_freq)."""
    d = config.head_dim
    local = local and config.rope_local_theta is not None
    theta = config.rope_local_theta if local else config.rope_theta
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / d)))
    inv = inv.astype(np.float32)
    rs = None if local else config.rope_scaling
    if isinstance(rs, LinearRopeScaling):
        inv = (inv / np.float32(rs.factor)).astype(np.float32)
    elif rs is not None:
        L = rs.original_max_position
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > L / rs.low_freq_factor, inv / rs.factor, inv)
        smooth = (L / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= L / rs.high_freq_factor) & (wavelen <= L / rs.low_freq_factor)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_tables(positions: Array, inv_freq: np.ndarray):
    """cos, sin [B, T, Dh] float32 for positions [B, T]: angle p * w_i, each half repeated (HF)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, ..., Dh] -> x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1] (HF convention);
    cos/sin [B, T, Dh] from `rope_tables`. Computed in float32."""
    extra = x.ndim - 3  # head axes between T and Dh
    shape = cos.shape[:2] + (1,) * extra + cos.shape[-1:]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos.reshape(shape) + rotated * sin.reshape(shape)).astype(x.dtype)


class RMSNorm(nn.Module):
    """y = scale * x / sqrt(mean(x^2) + eps); statistics in float32 (as HF).

    plus_one (Gemma): y = (1 + scale) * x / sqrt(...), scale initialised to 0 and the product
    taken in float32 before the cast (HF's Gemma RMSNorm; Llama casts first, then multiplies)."""

    eps: float
    dtype: Any
    param_dtype: Any
    plus_one: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (y * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return y.astype(self.dtype) * scale.astype(self.dtype)


def _norm(config: ModelConfig) -> RMSNorm:
    return RMSNorm(config.rms_eps, config.compute_dtype, config.storage_dtype, config.norm_plus_one)


def softcap(x: Array, cap: Optional[float]) -> Array:
    """cap * tanh(x / cap) (Gemma 2's soft-capping of scores and logits); identity when cap is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def _dense(config: ModelConfig, features: int, use_bias: bool, name: Optional[str] = None) -> nn.Dense:
    """A projection: nn.Dense, which adds LoRA's (x A) B when its parameters hold adapters
    (`xpo_jax.models.lora`; without them it is nn.Dense exactly)."""
    return LoraDense(features, use_bias=use_bias, dtype=config.compute_dtype,
                    param_dtype=config.storage_dtype,
                    kernel_init=nn.initializers.normal(config.init_std), name=name)


def _attend(q: Array, k: Array, v: Array, visible: Array, config: ModelConfig) -> Array:
    """Grouped-query attention.

    q [B, Hkv, G, T, Dh], k/v [B, Hkv, S, Dh], visible [B, T, S] bool -> [B, Hkv, G, T, Dh].
    Scores (scaled by head_dim^-1/2, or query_pre_attn_scalar^-1/2, then soft-capped when
    attn_softcap is set) and softmax in float32. Hidden keys get the most negative finite float
    rather than -inf, so a query that sees no key (a padded position) yields a uniform average,
    not NaN.
    """
    scale = 1.0 / math.sqrt(config.query_pre_attn_scalar or q.shape[-1])
    scores = jnp.einsum("bhgtd,bhsd->bhgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = softcap(scores, config.attn_softcap)
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgts,bhsd->bhgtd", probs, v)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with RoPE; optional write into a KV cache."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.q_proj = _dense(c, c.n_heads * c.head_dim, c.qkv_bias)
        self.k_proj = _dense(c, c.n_kv_heads * c.head_dim, c.qkv_bias)
        self.v_proj = _dense(c, c.n_kv_heads * c.head_dim, c.qkv_bias)
        self.o_proj = _dense(c, c.d_model, False)
        if c.qk_norm:
            self.q_norm = _norm(c)
            self.k_norm = _norm(c)

    def __call__(self, x, rope, visible, layer_cache=None, index=None, layer=None):
        """x [B, T, D]; rope = (cos, sin) [B, T, Dh]; visible [B, T, S]. Without a cache S = T
        and the keys are this chunk's.

        With `layer_cache` = (k, v) [B, Hkv, S, Dh], the chunk's keys/values are written at slot
        `index` first and the queries attend over all S slots. Returns (out, new layer_cache).
        With `layer` (a traced int, scan_layers) the cache is the whole stacked
        (k, v) [L, B, Hkv, S, Dh]: the chunk is written in place at [layer, :, :, index] and this
        layer's buffers read back, so a decode step writes T slots, not a copy of the cache.
        """
        c = self.config
        B, T, _ = x.shape
        G = c.n_heads // c.n_kv_heads
        # pin_columns: decoding keeps the column-parallel outputs split as the weights are.
        q = pin_columns(self.q_proj(x)).reshape(B, T, c.n_kv_heads, G, c.head_dim)
        k = pin_columns(self.k_proj(x)).reshape(B, T, c.n_kv_heads, c.head_dim)
        v = pin_columns(self.v_proj(x)).reshape(B, T, c.n_kv_heads, c.head_dim)
        if c.qk_norm:  # per head, over head_dim, before RoPE (Gemma 3)
            q, k = self.q_norm(q), self.k_norm(k)
        # The attention runs split by rows and KV heads, as its cache (pin_heads: a no-op unless
        # a traced region's layout says otherwise).
        q = pin_heads(apply_rope(q, *rope).transpose(0, 2, 3, 1, 4))  # [B, Hkv, G, T, Dh]
        k = pin_heads(apply_rope(k, *rope).transpose(0, 2, 1, 3))     # [B, Hkv, T, Dh]
        v = pin_heads(v.transpose(0, 2, 1, 3))
        if layer_cache is not None and layer is None:
            ck, cv = layer_cache
            start = (0, 0, index, 0)
            ck = pin_heads(lax.dynamic_update_slice(ck, k.astype(ck.dtype), start))
            cv = pin_heads(lax.dynamic_update_slice(cv, v.astype(cv.dtype), start))
            layer_cache = (ck, cv)
            k, v = ck.astype(q.dtype), cv.astype(q.dtype)
        elif layer_cache is not None:
            ck, cv = layer_cache
            start = (layer, 0, 0, index, 0)
            ck = pin_heads(lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), start), stacked=True)
            cv = pin_heads(lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), start), stacked=True)
            layer_cache = (ck, cv)
            k = lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False).astype(q.dtype)
            v = lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False).astype(q.dtype)
        # Pinned too: else XLA may compute it whole-batch in o_proj's layout, gathering the cache.
        out = pin_heads(_attend(q, k, v, visible, c))  # [B, Hkv, G, T, Dh]
        out = pin_columns(out.transpose(0, 3, 1, 2, 4).reshape(B, T, c.n_heads * c.head_dim))
        return self.o_proj(out), layer_cache


class MLP(nn.Module):
    """Gated MLP (Shazeer 2020): down_proj(act(gate_proj(x)) * up_proj(x)), act = silu (SwiGLU)
    or tanh-approximated GELU (GeGLU), config.hidden_act."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.gate_proj = _dense(c, c.mlp_dim, False)
        self.up_proj = _dense(c, c.mlp_dim, False)
        self.down_proj = _dense(c, c.d_model, False)

    def __call__(self, x):
        act = ACTIVATIONS[self.config.hidden_act]
        return self.down_proj(act(pin_columns(self.gate_proj(x))) * pin_columns(self.up_proj(x)))


def _pick(config: ModelConfig, pair: tuple, layer_idx: Optional[int], layer, differ: bool):
    """pair = (input of full-attention layers, input of sliding layers): this layer's.

    `layer_idx` is static (unrolled layers); else `layer` is the traced index in a scan, and when
    the layer kinds are mixed the choice is a select on a per-layer flag (one compiled layer
    still serves all). `differ` False: both entries are the same, no select needed."""
    flags = config.sliding_layers()
    if not differ or len(set(flags)) == 1:
        return pair[1] if flags[0] and differ else pair[0]
    if layer_idx is not None:
        return pair[1] if flags[layer_idx] else pair[0]
    sliding = jnp.asarray(flags)[layer]
    return jax.tree.map(lambda full, local: jnp.where(sliding, local, full), *pair)


class DecoderLayer(nn.Module):
    """One block. `rope` and `visible` are (full-attention, sliding) pairs; the layer takes the
    one of its kind (layer_idx, or the scan's traced layer index)."""

    config: ModelConfig
    layer_idx: Optional[int] = None

    def setup(self):
        c = self.config
        self.input_layernorm = _norm(c)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = _norm(c)
        if c.sandwich_norms:
            self.pre_feedforward_layernorm = _norm(c)
            self.post_feedforward_layernorm = _norm(c)
        self.mlp = MLP(c)

    def __call__(self, x, rope, visible, layer_cache=None, index=None, layer=None):
        c = self.config
        rope = _pick(c, rope, self.layer_idx, layer, c.rope_local_theta is not None)
        visible = _pick(c, visible, self.layer_idx, layer, c.sliding_window is not None)
        # Block boundaries pinned by rows (pin_batch: the traced region's batch axes, if any), so
        # XLA gathers weights rather than all-reducing full-batch partial sums.
        x = pin_batch(x)
        h, layer_cache = self.self_attn(self.input_layernorm(x), rope, visible, layer_cache, index,
                                        layer)
        if c.sandwich_norms:  # Gemma 2/3: norms before and after both attention and MLP
            x = pin_batch(x + self.post_attention_layernorm(h))
            return pin_batch(x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))), layer_cache
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return pin_batch(x), layer_cache


class _ScanLayer(DecoderLayer):
    """DecoderLayer in `nn.scan`'s form, (carry, *broadcast) -> (carry, None).

    carry = (x, stacked cache (k, v) [L, ...] or None, layer index). The cache rides in the carry
    rather than as a scanned input/output: scanned outputs are new buffers, so each decode step
    would copy the whole cache, while a carry is updated in place (`Attention` writes T slots).
    Reading a layer's buffers back is a dynamic slice, which XLA on CPU materialises: a decode
    step's temporaries hold one layer's k and v, not the cache (the test checks both)."""

    def __call__(self, carry, rope, visible, index):
        x, cache, layer = carry
        x, cache = DecoderLayer.__call__(self, x, rope, visible, cache, index, layer)
        return (x, cache, layer + 1), None


def _layers(config: ModelConfig):
    """The decoder layers of `config`: a list of n_layers modules, or one scanned module."""
    policy = REMAT_POLICIES[config.remat]
    if not config.scan_layers:
        cls = DecoderLayer if config.remat == "none" else nn.remat(DecoderLayer, policy=policy)
        return [cls(config, layer_idx=i) for i in range(config.n_layers)]  # layers_0, layers_1, ...
    cls = _ScanLayer
    if config.remat != "none":
        # prevent_cse=False: inside a scan CSE cannot merge the recomputation with the forward
        # anyway, and the barriers it would add cost performance (JAX's `checkpoint` docs).
        cls = nn.remat(cls, policy=policy, prevent_cse=False)
    scanned = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=config.n_layers)
    return scanned(config)  # named layers; every parameter gets a leading [n_layers] axis


class Decoder(nn.Module):
    """The trunk (HF `model.*`): embedding, layers, final norm. Returns normed hidden states."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.d_model, dtype=c.compute_dtype,
                                     param_dtype=c.storage_dtype,
                                     embedding_init=nn.initializers.normal(c.init_std))
        self.layers = _layers(c)
        self.norm = _norm(c)

    def _embed(self, tokens: Array) -> Array:
        """Token embeddings [B, T, D]; times sqrt(d_model) rounded to the compute dtype when
        config.embed_scale (Gemma: HF multiplies by the scale cast to the weights' dtype)."""
        x = self.embed_tokens(tokens)
        if self.config.embed_scale:
            x = x * jnp.asarray(math.sqrt(self.config.d_model), jnp.float32).astype(x.dtype)
        return x

    def _ropes(self, positions: Array) -> tuple:
        """(cos, sin) tables of full-attention and of sliding layers (equal objects unless
        config.rope_local_theta gives the sliding layers their own base)."""
        c = self.config
        full = rope_tables(positions, rope_inv_freq(c))
        return full, (full if c.rope_local_theta is None else rope_tables(positions, rope_inv_freq(c, True)))

    def _visibles(self, visible: Array, q_slots: Array, k_slots: Array) -> tuple:
        """(mask of full-attention layers, mask of sliding layers) [B, T, S] from the causal-and-
        not-pad mask: a sliding layer also hides keys at slots <= q_slot - sliding_window."""
        w = self.config.sliding_window
        if w is None:
            return visible, visible
        near = k_slots[None, :] > q_slots[:, None] - w
        return visible, visible & near[None]

    def _run_layers(self, x, rope, visible, kv=None, index=None):
        """All layers; kv = (k, v) as KVCache holds them, or None. Returns (x, new kv)."""
        if self.config.scan_layers:
            (x, kv, _), _ = self.layers((x, kv, jnp.zeros((), jnp.int32)), rope, visible, index)
            return x, kv
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, layer_kv = layer(x, rope, visible, None if kv is None else (kv[0][i], kv[1][i]), index)
            if kv is not None:
                new_k.append(layer_kv[0])
                new_v.append(layer_kv[1])
        return x, None if kv is None else (tuple(new_k), tuple(new_v))

    def __call__(self, tokens: Array, mask: Array) -> Array:
        """Full causal forward. tokens, mask [B, T] -> hidden [B, T, D].

        Raises ValueError when T > max_seq_len (shapes are static: a trace-time check)."""
        tokens, mask = pin_batch(tokens), pin_batch(mask.astype(bool))
        T = tokens.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"a sequence of {T} tokens exceeds the model's max_seq_len "
                             f"{self.config.max_seq_len}")
        causal = jnp.tril(jnp.ones((T, T), bool))
        slots = jnp.arange(T, dtype=jnp.int32)
        visible = self._visibles(causal[None] & mask[:, None, :], slots, slots)
        x, _ = self._run_layers(self._embed(tokens), self._ropes(positions_from_mask(mask)), visible)
        return self.norm(x)

    def extend(self, tokens: Array, mask: Array, cache: KVCache):
        """Append a chunk [B, T] to the cache; hidden [B, T, D] and the updated cache.

        The chunk goes to slots [index, index + T). The caller keeps index + T <= S: `index` is
        traced, so only T <= S is checked here, and `dynamic_update_slice` would clamp a write
        past the end onto the last T slots.
        """
        tokens, mask = pin_batch(tokens), pin_batch(mask.astype(bool))
        B, T = tokens.shape
        S = cache.mask.shape[1]
        if T > S:
            raise ValueError(f"chunk of {T} tokens is longer than the KV cache ({S} slots)")
        index = cache.index
        positions = cache.next_position[:, None] + positions_from_mask(mask)
        # positions_from_mask clips pads before the first real token at 0 (not -1), which only
        # moves padded queries; real tokens get next_position + (their rank in the chunk).
        slot_mask = lax.dynamic_update_slice(cache.mask, mask, (0, index))
        q_slots = index + jnp.arange(T, dtype=jnp.int32)
        k_slots = jnp.arange(S, dtype=jnp.int32)
        visible = (k_slots[None, :] <= q_slots[:, None])[None] & slot_mask[:, None, :]
        visible = self._visibles(visible, q_slots, k_slots)
        x, (new_k, new_v) = self._run_layers(self._embed(tokens), self._ropes(positions), visible,
                                             (cache.k, cache.v), index)
        cache = KVCache(k=new_k, v=new_v, mask=slot_mask, index=index + T,
                        next_position=cache.next_position + mask.sum(axis=1, dtype=jnp.int32))
        return self.norm(x), cache


class LMHead(nn.Module):
    """Untied output projection, kernel [D, V]; logits accumulate (and are returned) in float32
    because bf16 logits lose the small log-prob differences the DPO loss is built on."""

    config: ModelConfig

    @nn.compact
    def __call__(self, h: Array) -> Array:
        c = self.config
        w = self.param("kernel", nn.initializers.normal(c.init_std), (c.d_model, c.vocab_size),
                       c.storage_dtype)
        return jnp.einsum("...d,dv->...v", h, w.astype(c.compute_dtype),
                          preferred_element_type=jnp.float32)


class Transformer(nn.Module):
    """Decoder LM (HF `*ForCausalLM`). See the module docstring for methods and parameter names."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.model = Decoder(c)
        if not c.tie_embeddings:
            self.lm_head = LMHead(c)

    def _logits(self, h: Array) -> Array:
        """h [..., D] -> float32 logits [..., V]; matmul in compute dtype, f32 accumulation.
        The only place logits are made: suppressed ids (config.suppress_ids) get SUPPRESSED_LOGIT."""
        c = self.config
        if c.tie_embeddings:
            w = self.model.embed_tokens.embedding.astype(c.compute_dtype)  # [V, D]
            logits = jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(h)
        # Sampling: split by vocabulary as the decode layout's head is (parallel.pin_columns).
        return suppress(pin_columns(softcap(logits, c.final_softcap), logits=True), c)

    def __call__(self, tokens: Array, mask: Array) -> Array:
        """tokens int32 [B, T], mask [B, T] -> logits [B, T, V] float32."""
        return self._logits(self.model(tokens, mask))

    def hidden(self, tokens: Array, mask: Array) -> Array:
        """Final-norm hidden states [B, T, D] (the full forward without the LM head), for callers
        that apply `head` chunk by chunk instead of materialising [B, T, V] logits."""
        return self.model(tokens, mask)

    def head(self, h: Array) -> Array:
        """LM head: hidden [..., D] -> float32 logits [..., V] (tied or untied)."""
        return self._logits(h)

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """Empty cache with `max_len` slots (reads no parameters)."""
        return init_cache(self.config, batch_size, max_len, dtype)

    def extend(self, tokens: Array, mask: Array, cache: KVCache):
        """Append tokens/mask [B, T] to the cache; (logits [B, T, V] f32, cache)."""
        h, cache = self.model.extend(tokens, mask, cache)
        return self._logits(h), cache

    def prefill(self, tokens: Array, mask: Array, cache: KVCache):
        """Run a (left-padded) prompt [B, P] through the cache.

        Returns (logits [B, V] f32 at the last position -- the next-token distribution -- and the
        cache). Only the last position goes through the LM head: [B, P, V] logits would be large
        for big vocabularies and the sampler needs just the last row.
        """
        h, cache = self.model.extend(tokens, mask, cache)
        return self._logits(h[:, -1]), cache

    def decode(self, tokens: Array, cache: KVCache):
        """One token per row, tokens [B] -> (logits [B, V] f32 for the next token, cache)."""
        h, cache = self.model.extend(tokens[:, None], jnp.ones(tokens.shape + (1,), bool), cache)
        return self._logits(h[:, 0]), cache


class RewardModel(nn.Module):
    """Scalar reward (HF `*ForSequenceClassification`, num_labels=1): the trunk plus `score`
    (Linear D -> 1, no bias) read at the last non-pad token of each row.

    apply({"params": p}, tokens, mask) -> [B] float32.
    """

    config: ModelConfig

    def setup(self):
        c = self.config
        self.model = Decoder(c)
        self.score = nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=c.storage_dtype,
                              kernel_init=nn.initializers.normal(c.init_std))

    def __call__(self, tokens: Array, mask: Array) -> Array:
        h = self.model(tokens, mask)  # [B, T, D]
        idx = last_token_index(mask)
        h_last = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]  # [B, D]
        return self.score(h_last)[:, 0].astype(jnp.float32)


def init_params(config: ModelConfig, key: Array) -> dict:
    """Random parameters of `Transformer(config)` (the "params" collection), HF-style init:
    Linear and embedding weights ~ N(0, init_std^2), biases 0, RMSNorm scales 1."""
    config.validate()
    return _init(Transformer(config), key)


def init_reward_params(config: ModelConfig, key: Array) -> dict:
    """Random parameters of `RewardModel(config)`."""
    config.validate()
    return _init(RewardModel(config), key)


def stack_layer_params(params: dict, n_layers: int) -> dict:
    """Unrolled parameters (`model/layers_{i}/...`) -> the scan_layers layout (`model/layers/...`,
    each leaf stacked on a new leading [n_layers] axis). Works for Transformer and RewardModel
    trees; other entries pass through. Inverse of `unstack_layer_params`."""
    trunk = dict(params["model"])
    per_layer = [trunk.pop(f"layers_{i}") for i in range(n_layers)]
    trunk["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return {**params, "model": trunk}


def unstack_layer_params(params: dict, n_layers: int) -> dict:
    """The scan_layers layout -> unrolled `model/layers_{i}/...`; inverse of `stack_layer_params`."""
    trunk = dict(params["model"])
    stacked = trunk.pop("layers")
    for i in range(n_layers):
        trunk[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "model": trunk}


def _init(module: nn.Module, key: Array) -> dict:
    # Eager on purpose: each primitive compiles once per process and is then reused by every
    # config, while a jitted init recompiles the whole program (seconds) per config. Wrap the
    # call in jax.jit (static config) to init straight into sharded or donated buffers.
    dummy = jnp.zeros((1, 1), jnp.int32)
    return module.init(key, dummy, jnp.ones((1, 1), bool))["params"]
