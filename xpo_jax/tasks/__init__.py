"""Synthetic preference tasks with a JAX reward and exact evaluation by enumeration.

    base       Task (prompts, reward, policy model, reference, suppressed ids) and its exact
               evaluation
    reference  the reference policy: explicit parameters, or supervised fine-tuning on the
               demonstrations (memoised, and cached on disk in $XPO_JAX_CACHE)
    builtin    the built-in tasks ("hard-explore", "copy") and their reward pieces
    coverage   task families with a coverage knob: contextual bandit, chain (tabular and
               Transformer), pi_ref(optimal) from 1e-1 to 1e-4
    registry   TASKS by name, user tasks as "module:attribute"
"""
from xpo_jax.tasks.base import (
    MAX_ENUMERATED, Task, enumerate_responses, prefix_index, response_alphabet, tiny_model_config,
)
from xpo_jax.tasks.builtin import (
    EOS_ID, FILLER_ID, PAD_ID, left_align, make_copy_task, make_hard_explore_task,
    positional_match_reward, prefix_match_reward, reverse_target, target_with_eos,
)
from xpo_jax.tasks.coverage import (
    PRESET_COVERAGES, bandit_arms, chain_reference_table, make_bandit_task, make_chain_task,
    make_chain_transformer_task,
)
from xpo_jax.tasks.reference import (
    make_reference, reference_cache_path, reference_digest, sft_loss, train_reference,
)
from xpo_jax.tasks.registry import DEFAULT_TASK, TASKS, get_task, register_task, resolve_task

__all__ = [
    "DEFAULT_TASK", "EOS_ID", "FILLER_ID", "MAX_ENUMERATED", "PAD_ID", "PRESET_COVERAGES", "TASKS",
    "Task", "bandit_arms", "chain_reference_table", "enumerate_responses", "get_task", "left_align",
    "make_bandit_task", "make_chain_task", "make_chain_transformer_task", "make_copy_task",
    "make_hard_explore_task", "make_reference", "positional_match_reward", "prefix_index",
    "prefix_match_reward", "reference_cache_path", "reference_digest", "register_task",
    "resolve_task", "response_alphabet", "reverse_target", "sft_loss", "target_with_eos",
    "tiny_model_config", "train_reference",
]
