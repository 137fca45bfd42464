"""Decoder language models (Llama / Qwen2 family) with an explicit KV cache, and a reward model."""
from xpo_jax.models.transformer import (
    PRESETS,
    Decoder,
    KVCache,
    Llama3RopeScaling,
    ModelConfig,
    RewardModel,
    Transformer,
    get_config,
    init_cache,
    init_params,
    init_reward_params,
    last_token_index,
    positions_from_mask,
)

__all__ = [
    "PRESETS", "Decoder", "KVCache", "Llama3RopeScaling", "ModelConfig", "RewardModel",
    "Transformer", "get_config", "init_cache", "init_params", "init_reward_params",
    "last_token_index", "positions_from_mask",
]
