"""Synthetic preference tasks with a JAX reward and exact evaluation by enumeration.

    base       Task (prompts, reward, model shape, demonstrations) and its exact evaluation
    reference  the reference policy: supervised fine-tuning on the demonstrations
    builtin    the built-in tasks ("hard-explore", "copy") and their reward pieces
    registry   TASKS by name, user tasks as "module:attribute"
"""
from xpo_jax.tasks.base import MAX_ENUMERATED, Task, enumerate_responses, prefix_index, tiny_model_config
from xpo_jax.tasks.builtin import (
    left_align, make_copy_task, make_hard_explore_task, positional_match_reward, prefix_match_reward,
    reverse_target, target_with_eos,
)
from xpo_jax.tasks.reference import make_reference, sft_loss, train_reference
from xpo_jax.tasks.registry import DEFAULT_TASK, TASKS, get_task, register_task, resolve_task

__all__ = [
    "DEFAULT_TASK", "MAX_ENUMERATED", "TASKS", "Task", "enumerate_responses", "get_task", "left_align",
    "make_copy_task", "make_hard_explore_task", "make_reference", "positional_match_reward", "prefix_index",
    "prefix_match_reward", "register_task", "resolve_task", "reverse_target", "sft_loss", "target_with_eos",
    "tiny_model_config", "train_reference",
]
