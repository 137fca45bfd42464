"""The data of one round, typed: the sampled pairs, and the pairs once the oracle has judged them.

    make_pairs  -> Pairs            prompts, y ~ pi_t, y~ ~ pi~ (pi_ref or pi_t), the judge's key
    oracle      -> Judgement        which of y, y~ won, their scores, which pairs count
    label(...)  -> LabelledPairs    what `update` trains on and what `Replay` stores

Every field is batch-first ([B, ...]); a replay buffer holds a LabelledPairs of [C, ...] and a
draw of K minibatches of M pairs one of [K, M, ...].
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax

from xpo_jax.oracles import Judgement
from xpo_jax.sampling import Completions

Array = jax.Array


class Pairs(NamedTuple):
    """`make_pairs`' output: the prompts, both samples and the key reserved for the judge."""

    prompts: Array  # [B, P] int32, left-padded
    prompt_mask: Array  # [B, P]
    y: Completions  # y ~ pi_t
    yt: Completions  # y~ ~ pi_ref (yt_from_ref) or pi_t
    judge_key: Array  # PRNG key of the oracle's randomness (Bradley-Terry draws)
    yt_from_ref: Array  # [B] bool: y~ was drawn from pi_ref (else from pi_t)


class LabelledPairs(NamedTuple):
    """Judged pairs: what `update` trains on and what `Replay` keeps.

    `ref_y` / `ref_yt` (log pi_ref of y and y~) are None until `update` computes them once (the
    reference is frozen, so a replayed pair never needs them again)."""

    prompts: Array  # [B, P] int32
    prompt_mask: Array  # [B, P] int32
    y: Array  # [B, N] int32 tokens of y (pad after EOS)
    y_mask: Array  # [B, N] int32
    yt: Array  # [B, N] int32 tokens of y~
    yt_mask: Array  # [B, N] int32
    y_logprob: Array  # [B] float32: log of y's probability under the policy that sampled it (temperature 1)
    yt_logprob: Array  # [B] float32: the same for y~ (under pi_ref or pi_t, see yt_from_ref)
    yt_from_ref: Array  # [B] bool
    y_wins: Array  # [B] bool: the oracle preferred y (ties go to y)
    valid: Array  # [B] float32: 1 for pairs that count, 0 for masked ones
    scores_y: Array  # [B] float32: the oracle's scores
    scores_yt: Array  # [B] float32
    ref_y: Optional[Array] = None  # [B] float32: log pi_ref(y|x)
    ref_yt: Optional[Array] = None  # [B] float32: log pi_ref(y~|x)


def label(pairs: Pairs, judgement: Judgement) -> LabelledPairs:
    """The sampled pairs with the oracle's verdict."""
    i32 = lambda a: a.astype("int32")
    return LabelledPairs(
        prompts=pairs.prompts, prompt_mask=i32(pairs.prompt_mask),
        y=pairs.y.tokens, y_mask=i32(pairs.y.mask), yt=pairs.yt.tokens, yt_mask=i32(pairs.yt.mask),
        y_logprob=pairs.y.logprobs.sum(-1), yt_logprob=pairs.yt.logprobs.sum(-1), yt_from_ref=pairs.yt_from_ref,
        y_wins=judgement.y_wins, valid=judgement.valid.astype("float32"),
        scores_y=judgement.scores_y.astype("float32"), scores_yt=judgement.scores_ytilde.astype("float32"),
    )
