"""Policy models: the Llama / Qwen2-family decoder with an explicit KV cache, its reward-model head,
and a tabular policy (a softmax over a table of logits) for bandit-like tasks."""
from xpo_jax.models.transformer import (
    PRESETS,
    REMAT_POLICIES,
    SUPPRESSED_LOGIT,
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
    stack_layer_params,
    unstack_layer_params,
)
from xpo_jax.models.tabular import TabularPolicy, init_tabular_params

__all__ = [
    "PRESETS", "Decoder", "KVCache", "Llama3RopeScaling", "ModelConfig", "RewardModel",
    "Transformer", "get_config", "init_cache", "init_params", "init_reward_params",
    "last_token_index", "positions_from_mask", "REMAT_POLICIES", "SUPPRESSED_LOGIT",
    "stack_layer_params", "unstack_layer_params", "TabularPolicy", "init_tabular_params",
]
