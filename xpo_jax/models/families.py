"""Model families: the one place where a Hugging Face architecture is described.

A `Family` says, for one HF `model_type`:

    architectures   HF class names -> kind ("causal_lm" / "reward_model")
    hf_defaults     the HF config class defaults for keys a config.json may leave out
                    (save_pretrained omits some values equal to the defaults)
    fixed           the ModelConfig block options every model of the family has (e.g. Gemma 2:
                    GeGLU, (1 + w) norms, scaled embeddings, sandwich norms)
    read            config.json -> the family-specific ModelConfig fields (window, soft-caps, ...)
    write           ModelConfig -> the family-specific config.json keys
    accepts         whether a ModelConfig is exactly expressible in this family (save_hf writes
                    the first family in FAMILIES that accepts it)

Parameter names are mechanical for every family (transformer.py's module docstring):
`param_map(config, kind)` lists them from the block options (q/k/v bias, QK-norm, sandwich norms),
so a family whose tensors follow HF's Llama naming needs no table of its own. models/hf.py reads
and writes checkpoints through this module only: adding a family is adding an entry to FAMILIES.

RoPE parsing (`rope_from_hf`) reads both config.json dialects: transformers 4.x (`rope_theta`,
`rope_scaling` at the top level) and 5.x (`rope_parameters`, nested per layer type for Gemma 3).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

from xpo_jax.models.transformer import Llama3RopeScaling, LinearRopeScaling, ModelConfig

# ModelConfig block options and their Llama values; a family's `fixed` overrides some of them.
BLOCK_DEFAULTS: dict[str, Any] = {"hidden_act": "silu", "norm_plus_one": False, "embed_scale": False,
                                  "sandwich_norms": False, "qk_norm": False, "qkv_bias": False}

# ModelConfig fields that only some families can write; `accepts` checks them.
_GEMMA_ONLY = ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_local_theta")

# HF activation names -> ModelConfig.hidden_act.
_HF_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One HF model family (see the module docstring)."""

    name: str
    architectures: dict[str, str]
    hf_defaults: dict[str, Any]
    fixed: dict[str, Any]
    read: Callable[[dict], dict]
    write: Callable[[ModelConfig], dict]
    accepts: Callable[[ModelConfig], bool]
    model_types: tuple[str, ...] = ()  # model_type values besides `name` (config without architectures)

    def block_matches(self, config: ModelConfig) -> bool:
        """config has exactly this family's block options."""
        return all(getattr(config, k) == v for k, v in {**BLOCK_DEFAULTS, **self.fixed}.items())


# --------------------------------------------------------------------------------------------
# Parameter names
# --------------------------------------------------------------------------------------------


class Entry(NamedTuple):
    """Where one HF tensor goes: our param path, whether the kernel is the transposed HF weight,
    and (scan_layers) its index on the leading layer axis of a stacked parameter, else None."""

    path: tuple
    transpose: bool
    layer: Optional[int]


def block_tensors(config: ModelConfig) -> list[tuple[str, tuple, bool]]:
    """(HF name inside `model.layers.{i}.`, our path inside the layer, transposed) of one block."""
    norms = ["input_layernorm", "post_attention_layernorm"]
    if config.sandwich_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    out = [(f"{n}.weight", (n, "scale"), False) for n in norms]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.append((f"self_attn.{proj}.weight", ("self_attn", proj, "kernel"), True))
        if config.qkv_bias and proj != "o_proj":
            out.append((f"self_attn.{proj}.bias", ("self_attn", proj, "bias"), False))
    if config.qk_norm:
        out += [(f"self_attn.{n}.weight", ("self_attn", n, "scale"), False) for n in ("q_norm", "k_norm")]
    out += [(f"mlp.{p}.weight", ("mlp", p, "kernel"), True) for p in ("gate_proj", "up_proj", "down_proj")]
    return out


def param_map(config: ModelConfig, kind: str) -> dict[str, Entry]:
    """HF tensor name -> Entry for every parameter of the model (Transformer or RewardModel)."""
    m: dict[str, Entry] = {
        "model.embed_tokens.weight": Entry(("model", "embed_tokens", "embedding"), False, None),
        "model.norm.weight": Entry(("model", "norm", "scale"), False, None),
    }
    block = block_tensors(config)
    for i in range(config.n_layers):
        ours, layer = (("model", "layers"), i) if config.scan_layers else (("model", f"layers_{i}"), None)
        for hf_name, path, transpose in block:
            m[f"model.layers.{i}.{hf_name}"] = Entry(ours + path, transpose, layer)
    if kind == "causal_lm" and not config.tie_embeddings:
        m["lm_head.weight"] = Entry(("lm_head", "kernel"), True, None)
    if kind == "reward_model":
        m["score.weight"] = Entry(("score", "kernel"), True, None)
    return m


# --------------------------------------------------------------------------------------------
# Shared config pieces
# --------------------------------------------------------------------------------------------


def _rope_dict(rope: dict, max_pos: int, key: str):
    """(theta or None, scaling) of one RoPE parameter dict (rope_type default / llama3 / linear)."""
    theta = rope.get("rope_theta")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise NotImplementedError(f"config key 'partial_rotary_factor'={partial}: RoPE on part of "
                                  "each head is not implemented")
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, LinearRopeScaling(factor=float(rope["factor"]))
    if rope_type == "llama3":
        return theta, Llama3RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position=int(rope.get("original_max_position_embeddings", max_pos)),
        )
    raise NotImplementedError(f"config key {key!r}: rope_type {rope_type!r} is not implemented "
                              "(supported: 'default', 'linear', 'llama3')")


def _rope_source(hf_config: dict) -> tuple[str, dict]:
    """transformers 5's precedence: `rope_scaling` if set, else `rope_parameters`."""
    key = "rope_scaling" if hf_config.get("rope_scaling") else "rope_parameters"
    return key, dict(hf_config.get(key) or {})


def rope_from_hf(hf_config: dict) -> tuple[float, Any]:
    """(rope_theta, scaling or None), one RoPE for every layer, from either config dialect."""
    key, rope = _rope_source(hf_config)
    layer_types = set(hf_config.get("layer_types") or ())
    if rope and layer_types and set(rope) <= layer_types:
        # Nested per layer type ({"full_attention": {...}, ...}): fine if all layers agree.
        variants = [v for v in rope.values() if v is not None]
        if any(v != variants[0] for v in variants):
            raise NotImplementedError(f"config key {key!r}: different RoPE per layer type {rope}")
        rope = dict(variants[0]) if variants else {}
    if "partial_rotary_factor" not in rope and hf_config.get("partial_rotary_factor") is not None:
        rope["partial_rotary_factor"] = hf_config["partial_rotary_factor"]
    theta, scaling = _rope_dict(rope, hf_config.get("max_position_embeddings", 8192), key)
    return float(theta if theta is not None else hf_config.get("rope_theta", 10000.0)), scaling


def rope_to_hf(theta: float, scaling: Any) -> dict:
    """A transformers 5 `rope_parameters` dict."""
    if isinstance(scaling, Llama3RopeScaling):
        return {"rope_type": "llama3", "rope_theta": theta, "factor": scaling.factor,
                "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_position}
    if isinstance(scaling, LinearRopeScaling):
        return {"rope_type": "linear", "rope_theta": theta, "factor": scaling.factor}
    return {"rope_type": "default", "rope_theta": theta}


def _act(hf_config: dict, *keys: str) -> str:
    """ModelConfig.hidden_act from the first of `keys` set in config.json."""
    name = next((hf_config[k] for k in keys if hf_config.get(k) is not None), None)
    if name not in _HF_ACTS:
        raise NotImplementedError(f"config key {keys[0]!r}={name!r}: implemented activations are "
                                  f"{sorted(_HF_ACTS)}")
    return _HF_ACTS[name]


def _no_gemma_options(config: ModelConfig) -> bool:
    return all(getattr(config, k) is None for k in _GEMMA_ONLY)


def _uniform(config: ModelConfig) -> bool:
    """Every layer is of one kind (all slide, or none does)."""
    return len(set(config.sliding_layers())) == 1


# --------------------------------------------------------------------------------------------
# Llama, Mistral, Qwen2
# --------------------------------------------------------------------------------------------


def _read_llama(hf_config: dict) -> dict:
    if _act(hf_config, "hidden_act") != "silu":
        raise NotImplementedError(f"config key 'hidden_act'={hf_config['hidden_act']!r}: only "
                                  "'silu' (SwiGLU) is implemented for this family")
    if hf_config.get("attention_bias"):
        # Llama's attention_bias puts a bias on o_proj too; our Attention has q/k/v bias only.
        raise NotImplementedError("config key 'attention_bias': o_proj bias is not implemented")
    return {}


def _read_mistral(hf_config: dict) -> dict:
    return {**_read_llama(hf_config), "sliding_window": hf_config.get("sliding_window")}


def _read_qwen2(hf_config: dict) -> dict:
    """Qwen2: q/k/v bias; with use_sliding_window, the layers from max_window_layers on slide
    (or as `layer_types` says, transformers 5)."""
    if _act(hf_config, "hidden_act") != "silu":
        raise NotImplementedError(f"config key 'hidden_act'={hf_config['hidden_act']!r}: only "
                                  "'silu' (SwiGLU) is implemented for this family")
    window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window") else None
    if window is None:
        return {}
    n_layers = int(hf_config["num_hidden_layers"])
    types = hf_config.get("layer_types") or [
        "sliding_attention" if i >= hf_config.get("max_window_layers", 28) else "full_attention"
        for i in range(n_layers)]
    if "sliding_attention" not in types:
        return {}
    return {"sliding_window": int(window), "layer_types": tuple(types)}


def _write_llama(config: ModelConfig) -> dict:
    return {"attention_bias": False, "mlp_bias": False}


def _write_mistral(config: ModelConfig) -> dict:
    return {"sliding_window": config.sliding_window}


def _write_qwen2(config: ModelConfig) -> dict:
    if config.sliding_window is None or not any(config.sliding_layers()):
        return {"use_sliding_window": False, "sliding_window": None}
    types = ["sliding_attention" if s else "full_attention" for s in config.sliding_layers()]
    return {"use_sliding_window": True, "sliding_window": config.sliding_window, "layer_types": types,
            "max_window_layers": types.index("sliding_attention")}


def _qwen2_accepts(config: ModelConfig) -> bool:
    """Qwen2's windows: the layers from max_window_layers on slide, the ones before do not."""
    flags = list(config.sliding_layers())
    return _no_gemma_options(config) and flags == sorted(flags)


# --------------------------------------------------------------------------------------------
# Gemma 2 and Gemma 3 (text)
# --------------------------------------------------------------------------------------------


def _read_gemma_common(hf_config: dict, default_pattern: int) -> dict:
    """What Gemma 2 and 3 share: activation, query scalar, window, layer kinds. Layers slide
    unless (i + 1) % pattern == 0 (HF's default `layer_types`: Gemma 2 alternates, Gemma 3 has
    five local layers per global one, `sliding_window_pattern`)."""
    if _act(hf_config, "hidden_activation", "hidden_act") != "gelu_tanh":
        raise NotImplementedError("config key 'hidden_activation': Gemma is implemented with "
                                  "'gelu_pytorch_tanh' only")
    if hf_config.get("attention_bias"):
        raise NotImplementedError("config key 'attention_bias': biases in Gemma attention are not "
                                  "implemented")
    if hf_config.get("use_bidirectional_attention"):
        raise NotImplementedError("config key 'use_bidirectional_attention': only causal attention "
                                  "is implemented")
    n_layers = int(hf_config["num_hidden_layers"])
    pattern = int(hf_config.get("sliding_window_pattern") or default_pattern)
    types = tuple(hf_config.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)])
    window = hf_config.get("sliding_window")
    if window is None:  # HF: no window, every layer is global
        types = ("full_attention",) * n_layers
    return {"query_pre_attn_scalar": float(hf_config["query_pre_attn_scalar"]),
            "sliding_window": None if window is None else int(window), "layer_types": types,
            "final_softcap": hf_config.get("final_logit_softcapping")}


def _read_gemma2(hf_config: dict) -> dict:
    return {**_read_gemma_common(hf_config, 2), "attn_softcap": hf_config.get("attn_logit_softcapping")}


def _read_gemma3(hf_config: dict) -> dict:
    """Gemma 3 (text): QK-norm, and the local layers' RoPE base. transformers 5 nests
    rope_parameters per layer type; 4.x writes rope_local_base_freq (and a rope_scaling that
    applies to the global layers only). No attention soft-capping: transformers 5's Gemma 3
    does not apply attn_logit_softcapping, whatever the config says."""
    out = _read_gemma_common(hf_config, 6)
    key, rope = _rope_source(hf_config)
    max_pos = hf_config.get("max_position_embeddings", 131072)
    if set(rope) <= {"full_attention", "sliding_attention"} and rope:
        theta, scaling = _rope_dict(dict(rope.get("full_attention") or {}), max_pos, key)
        local, local_scaling = _rope_dict(dict(rope.get("sliding_attention") or {}), max_pos, key)
        if local_scaling is not None:
            raise NotImplementedError(f"config key {key!r}: RoPE scaling on the sliding layers is "
                                      "not implemented")
    else:
        theta, scaling = _rope_dict(rope, max_pos, key)
        local = None
    theta = hf_config.get("rope_theta", 1e6) if theta is None else theta
    local = hf_config.get("rope_local_base_freq", 1e4) if local is None else local
    return {**out, "rope_theta": float(theta), "rope_scaling": scaling, "rope_local_theta": float(local)}


def _int_if_whole(x: float):
    """transformers 5's strict configs type query_pre_attn_scalar as int: write 256, not 256.0."""
    return int(x) if float(x).is_integer() else x


def _write_gemma(config: ModelConfig) -> dict:
    types = ["sliding_attention" if s else "full_attention" for s in config.sliding_layers()]
    return {"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": _int_if_whole(config.query_pre_attn_scalar), "sliding_window": config.sliding_window,
            "layer_types": types, "final_logit_softcapping": config.final_softcap,
            "attn_logit_softcapping": config.attn_softcap, "attention_bias": False,
            "use_bidirectional_attention": False}


def _write_gemma3(config: ModelConfig) -> dict:
    full = rope_to_hf(config.rope_theta, config.rope_scaling)
    local = rope_to_hf(config.rope_local_theta, None)
    return {**_write_gemma(config), "rope_parameters": {"full_attention": full, "sliding_attention": local},
            "rope_theta": config.rope_theta, "rope_local_base_freq": config.rope_local_theta,
            "rope_scaling": None if config.rope_scaling is None else dict(full)}


def _gemma_accepts(config: ModelConfig, gemma3: bool) -> bool:
    """Gemma writes a query scalar and a window for every config (the HF classes have no
    'none'); Gemma 2 has no local RoPE base, Gemma 3 no attention soft-capping."""
    if config.query_pre_attn_scalar is None or (config.sliding_window is None and any(config.sliding_layers())):
        return False
    if gemma3:
        return config.attn_softcap is None and config.rope_local_theta is not None
    return config.rope_local_theta is None


_GEMMA_BLOCK = {"hidden_act": "gelu_tanh", "norm_plus_one": True, "embed_scale": True,
                "sandwich_norms": True, "qkv_bias": False}


def _arch(prefix: str, reward_prefix: Optional[str] = None) -> dict[str, str]:
    """{<prefix>ForCausalLM: causal_lm, <reward_prefix>ForSequenceClassification: reward_model}."""
    return {f"{prefix}ForCausalLM": "causal_lm",
            f"{reward_prefix or prefix}ForSequenceClassification": "reward_model"}


# Order matters for saving: the first family that accepts a ModelConfig writes it.
FAMILIES: tuple[Family, ...] = (
    Family("llama", _arch("Llama"),
           {"max_position_embeddings": 2048, "tie_word_embeddings": False, "hidden_act": "silu"},
           {}, _read_llama, _write_llama,
           lambda c: _no_gemma_options(c) and not any(c.sliding_layers())),
    Family("qwen2", _arch("Qwen2"),
           {"max_position_embeddings": 32768, "tie_word_embeddings": False, "hidden_act": "silu"},
           {"qkv_bias": True}, _read_qwen2, _write_qwen2, _qwen2_accepts),
    Family("mistral", _arch("Mistral"),
           {"max_position_embeddings": 4096 * 32, "tie_word_embeddings": False, "hidden_act": "silu"},
           {}, _read_mistral, _write_mistral,
           lambda c: _no_gemma_options(c) and _uniform(c) and c.sliding_window is not None),
    Family("gemma2", _arch("Gemma2"),
           {"max_position_embeddings": 8192, "tie_word_embeddings": True, "head_dim": 256,
            "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0, "hidden_activation": "gelu_pytorch_tanh"},
           {**_GEMMA_BLOCK, "qk_norm": False}, _read_gemma2, _write_gemma,
           lambda c: _gemma_accepts(c, gemma3=False)),
    Family("gemma3_text", _arch("Gemma3", "Gemma3Text"),
           {"max_position_embeddings": 131072, "tie_word_embeddings": True, "head_dim": 256,
            "query_pre_attn_scalar": 256, "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh"},
           {**_GEMMA_BLOCK, "qk_norm": True}, _read_gemma3, _write_gemma3,
           lambda c: _gemma_accepts(c, gemma3=True)),
)

ARCHITECTURES: dict[str, tuple[Family, str]] = {
    arch: (fam, kind) for fam in FAMILIES for arch, kind in fam.architectures.items()}
MODEL_TYPES: dict[str, Family] = {t: fam for fam in FAMILIES for t in (fam.name,) + fam.model_types}


def family_of(config: ModelConfig) -> Family:
    """The family save_hf writes `config` as: the first in FAMILIES with its block options that
    accepts the rest. ValueError when none can express it exactly."""
    for fam in FAMILIES:
        if fam.block_matches(config) and fam.accepts(config):
            return fam
    raise ValueError("no Hugging Face family expresses this ModelConfig exactly (block options "
                     f"{ {k: getattr(config, k) for k in BLOCK_DEFAULTS} }, sliding_window="
                     f"{config.sliding_window}, layer_types={config.layer_types}); supported: "
                     f"{[f.name for f in FAMILIES]}")
