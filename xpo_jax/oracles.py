"""Preference oracles: which of two responses to the same prompt is preferred.

Every oracle here is a pure JAX function with one signature,

    oracle(key, prompts, prompt_mask, y, y_mask, yt, yt_mask) -> Judgement

so that sampling, judging and the policy update fit in one jitted online round. ``y`` is the
policy sample and ``yt`` (y~) the exploration sample (XPO, arXiv 2405.21046, Algorithm 1).
Prompts are left-padded ``[B, P]``; responses are right-padded ``[B, N]`` with masks that are 1
up to and including the EOS token.

Scores come from a reward ``r(x, y)`` (a JAX reward function or a reward model). Two labelling
rules:

- deterministic: ``y`` wins iff ``r(x, y) >= r(x, y~)`` (ties go to ``y``, as TRL's XPOTrainer);
- Bradley-Terry: ``y`` wins with probability ``sigmoid(r(x, y) - r(x, y~))``, sampled with ``key``.

Options shared by both oracles:

- ``missing_eos_penalty``: subtract this (>= 0) from the score of a response with no EOS among its
  own tokens under its mask. TRL looks for EOS in prompt + completion, so a prompt that contains
  EOS hides a completion that never stopped; we look at the response only.
- ``mask_identical``: ``valid = 0`` for pairs whose two responses are the same (same tokens under
  the same mask), which carry no preference; the loss can weight them out.

The returned oracles are ``jax.tree_util.Partial`` objects. Calling one is calling a function;
in addition, they are pytrees whose leaves are the reward-model parameters (none for a reward
function), so passing an oracle as an argument of a jitted function traces the parameters
instead of baking them into the compiled program as constants.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from xpo_jax import logprobs

Array = jax.Array

# reward_fn(prompts [B,P], prompt_mask [B,P], responses [B,N], response_mask [B,N]) -> [B] float.
RewardFn = Callable[[Array, Array, Array, Array], Array]


class Judgement(NamedTuple):
    """What an oracle says about a batch of pairs (y, y~).

    Attributes:
      y_wins: [B] bool, True where y (the policy sample) is preferred to y~.
      scores_y: [B] float32, score of y (after the missing-EOS penalty, if any).
      scores_ytilde: [B] float32, score of y~ (after the penalty).
      valid: [B] float32, 1 where the pair carries a preference, 0 where it is masked out.
    """

    y_wins: Array
    scores_y: Array
    scores_ytilde: Array
    valid: Array


# --------------------------------------------------------------------------------------------
# Pieces (pure functions over arrays)


def identical_responses(y: Array, y_mask: Array, yt: Array, yt_mask: Array) -> Array:
    """[B] bool: same mask (hence same length) and same tokens wherever the mask is 1.

    Tokens under mask 0 (padding) are ignored, so two responses padded differently after EOS
    still count as identical.
    """
    chex.assert_rank(y, 2)
    chex.assert_equal_shape([y, y_mask, yt, yt_mask])
    in_y, in_yt = y_mask > 0, yt_mask > 0
    same_mask = jnp.all(in_y == in_yt, axis=-1)
    same_tokens = jnp.all(jnp.where(in_y, y == yt, True), axis=-1)
    return same_mask & same_tokens


def penalise_missing_eos(
    scores: Array, responses: Array, response_mask: Array, *, eos_id: int, penalty: float
) -> Array:
    """``scores - penalty * [no EOS in the response]``."""
    # Judged on the response only: an EOS in the prompt says nothing about whether the
    # completion stopped (TRL's `eos in prompt + completion` check misses this).
    missing = ~logprobs.has_eos(responses, response_mask, eos_id)
    return scores - penalty * missing.astype(scores.dtype)


def prefer_y(key: Array, scores_y: Array, scores_ytilde: Array, *, bradley_terry: bool) -> Array:
    """[B] bool labels from scores.

    Deterministic: ``y_wins = r(y) >= r(y~)`` (ties to y). Bradley-Terry:
    ``y_wins ~ Bernoulli(sigmoid(r(y) - r(y~)))``, one independent draw per pair from ``key``.
    """
    chex.assert_equal_shape([scores_y, scores_ytilde])
    if bradley_terry:
        return jax.random.bernoulli(key, jax.nn.sigmoid(scores_y - scores_ytilde))
    return scores_y >= scores_ytilde


def judge_scores(
    key: Array,
    scores_y: Array,
    scores_ytilde: Array,
    y: Array,
    y_mask: Array,
    yt: Array,
    yt_mask: Array,
    *,
    eos_id: int,
    bradley_terry: bool = False,
    missing_eos_penalty: Optional[float] = None,
    mask_identical: bool = False,
) -> Judgement:
    """Turn raw scores of (y, y~) into a Judgement, applying the penalty and masking options.

    Shared by every oracle so the labelling rule lives in one place.
    """
    scores_y = scores_y.astype(jnp.float32)
    scores_ytilde = scores_ytilde.astype(jnp.float32)
    if missing_eos_penalty is not None:
        scores_y = penalise_missing_eos(
            scores_y, y, y_mask, eos_id=eos_id, penalty=missing_eos_penalty
        )
        scores_ytilde = penalise_missing_eos(
            scores_ytilde, yt, yt_mask, eos_id=eos_id, penalty=missing_eos_penalty
        )
    y_wins = prefer_y(key, scores_y, scores_ytilde, bradley_terry=bradley_terry)
    if mask_identical:
        valid = 1.0 - identical_responses(y, y_mask, yt, yt_mask).astype(jnp.float32)
    else:
        valid = jnp.ones_like(scores_y)
    return Judgement(y_wins, scores_y, scores_ytilde, valid)


# --------------------------------------------------------------------------------------------
# Oracles


def _check_options(
    eos_id: Any, bradley_terry: Any, missing_eos_penalty: Any, mask_identical: Any
) -> dict:
    """Validate oracle options eagerly (at construction, not inside a trace) with clear errors."""
    if isinstance(eos_id, bool) or not isinstance(eos_id, numbers.Integral) or eos_id < 0:
        raise ValueError(f"eos_id must be a non-negative integer token id; got {eos_id!r}")
    if not isinstance(bradley_terry, bool):
        raise TypeError(f"bradley_terry must be True or False; got {bradley_terry!r}")
    if not isinstance(mask_identical, bool):
        raise TypeError(f"mask_identical must be True or False; got {mask_identical!r}")
    if missing_eos_penalty is not None:
        if isinstance(missing_eos_penalty, bool) or not isinstance(
            missing_eos_penalty, numbers.Real
        ):
            raise TypeError(
                "missing_eos_penalty must be None or a number >= 0 (it is subtracted from the "
                f"score of a response without EOS); got {missing_eos_penalty!r}"
            )
        if not math.isfinite(missing_eos_penalty) or missing_eos_penalty < 0:
            raise ValueError(
                "missing_eos_penalty must be a finite number >= 0: it is subtracted from the "
                "score of a response without EOS, so a negative value would reward not "
                f"stopping; got {missing_eos_penalty!r}"
            )
        missing_eos_penalty = float(missing_eos_penalty)
    return dict(
        eos_id=int(eos_id),
        bradley_terry=bradley_terry,
        missing_eos_penalty=missing_eos_penalty,
        mask_identical=mask_identical,
    )


def _check_batch(prompts, prompt_mask, y, y_mask, yt, yt_mask) -> None:
    chex.assert_rank([prompts, y], 2)
    chex.assert_equal_shape([prompts, prompt_mask])
    chex.assert_equal_shape([y, y_mask, yt, yt_mask])
    chex.assert_equal_shape_prefix([prompts, y], 1)


def _judge_with_reward_fn(
    key, prompts, prompt_mask, y, y_mask, yt, yt_mask, *, reward_fn, **options
) -> Judgement:
    _check_batch(prompts, prompt_mask, y, y_mask, yt, yt_mask)
    batch = y.shape[0]
    # One call on the 2B stacked pairs: the reward function is traced once and sees y and y~
    # in the same batch, exactly as the reward model does.
    scores = reward_fn(
        jnp.concatenate([prompts, prompts], axis=0),
        jnp.concatenate([prompt_mask, prompt_mask], axis=0),
        jnp.concatenate([y, yt], axis=0),
        jnp.concatenate([y_mask, yt_mask], axis=0),
    )
    chex.assert_shape(scores, (2 * batch,))
    return judge_scores(key, scores[:batch], scores[batch:], y, y_mask, yt, yt_mask, **options)


def _judge_with_reward_model(
    params, key, prompts, prompt_mask, y, y_mask, yt, yt_mask, *, apply_fn, **options
) -> Judgement:
    _check_batch(prompts, prompt_mask, y, y_mask, yt, yt_mask)
    batch = y.shape[0]
    # The reward model reads concat(left-padded prompt, right-padded response), the same layout
    # the policy sees; one forward over the 2B stacked sequences.
    mask_dtype = jnp.int32
    tokens = jnp.concatenate(
        [jnp.concatenate([prompts, y], axis=1), jnp.concatenate([prompts, yt], axis=1)], axis=0
    )
    mask = jnp.concatenate(
        [
            jnp.concatenate([prompt_mask.astype(mask_dtype), y_mask.astype(mask_dtype)], axis=1),
            jnp.concatenate([prompt_mask.astype(mask_dtype), yt_mask.astype(mask_dtype)], axis=1),
        ],
        axis=0,
    )
    scores = apply_fn({"params": params}, tokens.astype(jnp.int32), mask)
    chex.assert_shape(scores, (2 * batch,))
    return judge_scores(key, scores[:batch], scores[batch:], y, y_mask, yt, yt_mask, **options)


def reward_fn_oracle(reward_fn: RewardFn, *, eos_id: int, bradley_terry: bool = False,
                     missing_eos_penalty: Optional[float] = None, mask_identical: bool = False) -> jax.tree_util.Partial:
    """Oracle from a pure reward function ``reward_fn(prompts, prompt_mask, responses, mask) -> [B]``.

    Returns ``oracle(key, prompts, prompt_mask, y, y_mask, yt, yt_mask) -> Judgement`` with
    ``scores = reward_fn(x, .) - missing_eos_penalty * [no EOS in the response]`` and
    ``y_wins = scores_y >= scores_ytilde`` (or a Bradley-Terry draw). ``key`` is only used by
    Bradley-Terry.
    """
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable; got {reward_fn!r}")
    options = _check_options(eos_id, bradley_terry, missing_eos_penalty, mask_identical)
    return jax.tree_util.Partial(
        functools.partial(_judge_with_reward_fn, reward_fn=reward_fn, **options)
    )


def reward_model_oracle(apply_fn: Callable[..., Array], params: Any, *, eos_id: int, bradley_terry: bool = False,
                        missing_eos_penalty: Optional[float] = None, mask_identical: bool = False) -> jax.tree_util.Partial:
    """Oracle from a reward model: ``apply_fn({"params": params}, tokens [2B,T], mask) -> [2B]``.

    Scores ``r(x, y) = RM(concat(prompt, response))`` for y and y~ in one forward pass, then
    labels as ``reward_fn_oracle``. ``params`` are the oracle's pytree leaves, so the oracle can
    be passed into jit as an ordinary argument.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable; got {apply_fn!r}")
    options = _check_options(eos_id, bradley_terry, missing_eos_penalty, mask_identical)
    return jax.tree_util.Partial(
        functools.partial(_judge_with_reward_model, apply_fn=apply_fn, **options), params
    )
