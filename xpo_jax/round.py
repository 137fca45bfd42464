"""One online XPO round, sample -> judge -> loss -> update, as pure functions to jit whole.

    prompts [B,P] --sample(policy)-----------------> y  [B,N]
                 \\-sample(ref | policy)-----------> y~ [B,N]
    oracle(key, prompts, y, y~) ------------------> y_wins [B], scores
    one policy forward over concat(y, y~) (grad)  -> log pi(y|x), log pi(y~|x)
    one ref forward over concat(y, y~) (no grad)  -> log pi_ref(y|x), log pi_ref(y~|x)
    xpo_loss(...)  -> grads -> optax update (scaled by the traced lr_scale)

`make_round` returns three pure functions: `make_pairs` (sampling), `update` (loss and optimiser
step on labelled pairs) and `round_fn(state, prompts, mask, oracle)`, their composition with a
JAX oracle in between. A judge
that lives on the host (an API, a reward model with another tokenizer) runs between the jitted
halves; the fused round is the same two halves, not a copy.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from xpo_jax.config import TrainConfig
from xpo_jax.logprobs import completion_logprobs, has_eos
from xpo_jax.losses import xpo_loss
from xpo_jax.oracles import Judgement
from xpo_jax.sampling import Completions, sample
from xpo_jax.state import XPOState

Array = jax.Array


class Pairs(NamedTuple):
    """Output of `make_pairs`: the prompts, both samples and the key reserved for the judge."""

    prompts: Array
    prompt_mask: Array
    y: Completions
    yt: Completions
    judge_key: Array


class RoundFns(NamedTuple):
    make_pairs: Callable  # (state, prompts, prompt_mask) -> (state, Pairs)
    update: Callable  # (state, Pairs, Judgement) -> (state, metrics)
    round_fn: Callable  # (state, prompts, prompt_mask, oracle) -> (state, metrics); a JAX oracle


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with linear warm-up and global-norm clipping; returns (tx, learning-rate schedule)."""
    if cfg.warmup_rounds:
        schedule = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_rounds)
    else:
        schedule = optax.constant_schedule(cfg.learning_rate)
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, weight_decay=cfg.weight_decay))
    return optax.chain(*parts), schedule


def completion_logits_fn(apply_fn: Callable, n: int) -> Callable:
    """params, tokens [B, P+N], mask -> logits [B, N+1, V] of the last N+1 positions only.

    The LM head runs only where the loss needs it (positions P-1 .. P+N-1): the prompt's logits
    would cost B*P*V floats for nothing (0.6 GB at B=32, P=128, V=152k). The model's public
    `hidden` and `head` methods, so any policy module with them works (decoder or table).
    """

    def logits(params, tokens, mask):
        variables = {"params": params}
        h = apply_fn(variables, tokens, mask, method="hidden")
        return apply_fn(variables, h[:, -(n + 1):], method="head")

    return logits


def _weighted_mean(x: Array, w: Array) -> Array:
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def make_round(
    cfg: TrainConfig,
    *,
    apply_fn: Callable,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    true_reward_fn: Optional[Callable] = None,
    lr_schedule: Optional[Callable] = None,
    axis_name: Optional[str] = None,
    min_new_tokens: int = 0,
) -> RoundFns:
    """Build the round's pure functions for `cfg` (static choices) and a Transformer `apply_fn`.

    Traced, from the state: alpha, beta (scheduled by round), temperature, lr_scale,
    label_smoothing. Static, from cfg: loss type, batch sizes, micro-batches, top-k/top-p,
    exploration policy, replay sizes. `true_reward_fn(prompts, prompt_mask, y, y_mask)` (synthetic
    tasks) adds the `task/reward` metric: the policy samples' reward before any EOS penalty.

    `axis_name`: set when the round runs under `pmap`/`shard_map` with the batch split over that
    axis; gradients are then summed across it and divided by the global pair weight, and metrics
    averaged, so every replica applies the same update as one device would on the whole batch.
    (Under `jit` with sharded arrays leave it None: XLA inserts the collectives.)
    `min_new_tokens` forbids EOS before that many tokens (benchmarks: every response full length).
    """
    N = max_new_tokens
    logits_fn = completion_logits_fn(apply_fn, N)
    if lr_schedule is None:
        lr_schedule = make_optimizer(cfg)[1]

    def seq_logprobs(params, prompts, prompt_mask, y, y_mask, yt, yt_mask):
        """One forward over the 2B sequences concat(x, y) and concat(x, y~): ([B], [B])."""
        tokens = jnp.concatenate([jnp.concatenate([prompts, y], 1), jnp.concatenate([prompts, yt], 1)], 0)
        mask = jnp.concatenate(
            [jnp.concatenate([prompt_mask, y_mask], 1), jnp.concatenate([prompt_mask, yt_mask], 1)], 0
        )
        completion = tokens[:, -N:]
        completion_mask = mask[:, -N:]
        _, lp = completion_logprobs(logits_fn(params, tokens, mask), completion, completion_mask)
        B = prompts.shape[0]
        return lp[:B], lp[B:]

    def make_pairs(state: XPOState, prompts: Array, prompt_mask: Array):
        rng, k_y, k_yt, k_judge = jax.random.split(state.rng, 4)
        opts = dict(
            max_new_tokens=N, temperature=state.hparams.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            eos_id=eos_id, pad_id=pad_id, min_new_tokens=min_new_tokens,
        )

        def draw(params, key):
            return sample(apply_fn, params, prompts, prompt_mask, key, **opts)

        if cfg.exploration_policy == "policy":
            # Same parameters: one decode loop over both keys (N steps instead of 2N, each a
            # matmul over 2B rows).
            out = jax.vmap(draw, in_axes=(None, 0))(state.params, jnp.stack([k_y, k_yt]))
            y, yt = (jax.tree_util.tree_map(lambda a: a[i], out) for i in (0, 1))
        else:
            # Two loops. Stacking (policy, ref) and vmapping the sampler over them was measured
            # slower on CPU (0.55 s vs 2 x 0.16 s at bench-tiny B=8): batched dots with distinct
            # weights lower worse than two plain loops.
            y, yt = draw(state.params, k_y), draw(state.ref_params, k_yt)
        return state.replace(rng=rng), Pairs(prompts, prompt_mask, y, yt, k_judge)

    def update(state: XPOState, pairs: Pairs, judgement: Judgement):
        alpha, beta = state.hparams.scheduled(state.round, cfg.rounds)
        ls = state.hparams.label_smoothing
        x, xm = pairs.prompts, pairs.prompt_mask
        y, ym = pairs.y.tokens, pairs.y.mask.astype(jnp.int32)
        yt, ytm = pairs.yt.tokens, pairs.yt.mask.astype(jnp.int32)
        B = x.shape[0]
        ref_y, ref_yt = jax.lax.stop_gradient(seq_logprobs(state.ref_params, x, xm, y, ym, yt, ytm))
        fresh = dict(
            prompts=x, prompt_mask=xm, y=y, y_mask=ym, yt=yt, yt_mask=ytm,
            y_wins=judgement.y_wins, valid=judgement.valid.astype(jnp.float32), ref_y=ref_y, ref_yt=ref_yt,
        )
        rng = state.rng
        batch = fresh
        replay = state.replay
        if replay is not None:
            rng, k_replay = jax.random.split(rng)
            drawn = replay.draw(k_replay, cfg.replay_batch_size)
            batch = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b], 0), fresh, drawn)
            replay = replay.insert(**fresh)
        total = batch["valid"].sum()
        if axis_name is not None:
            total = jax.lax.psum(total, axis_name)
        norm = jnp.maximum(total, 1.0)
        M = cfg.micro_batches

        def loss_sum(params, mb):
            pi_y, pi_yt = seq_logprobs(params, mb["prompts"], mb["prompt_mask"], mb["y"], mb["y_mask"], mb["yt"], mb["yt_mask"])
            loss, m = xpo_loss(
                pi_y=pi_y, pi_ytilde=pi_yt, ref_y=mb["ref_y"], ref_ytilde=mb["ref_yt"], y_wins=mb["y_wins"],
                alpha=alpha, beta=beta, loss_type=cfg.loss_type, label_smoothing=ls, bonus_clip=cfg.bonus_clip,
            )
            return jnp.sum(loss * mb["valid"]), (pi_y, pi_yt, loss, m)

        grad_fn = jax.grad(loss_sum, has_aux=True)

        def grads_and_aux(params):
            if M == 1:
                g, aux = grad_fn(params, batch)
                return jax.tree_util.tree_map(lambda a: a / norm, g), aux
            # Gradient accumulation: the sum of micro-batch gradients of sum(valid * loss),
            # divided once by the whole batch's weight, equals the full batch's gradient.
            micro = jax.tree_util.tree_map(lambda a: a.reshape((M, a.shape[0] // M) + a.shape[1:]), batch)

            def body(acc, mb):
                g, aux = grad_fn(params, mb)
                return jax.tree_util.tree_map(jnp.add, acc, g), aux

            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            g, aux = jax.lax.scan(body, zeros, micro)
            aux = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), aux)
            return jax.tree_util.tree_map(lambda a: a / norm, g), aux

        def step(st, _):
            g, aux = grads_and_aux(st.params)
            if axis_name is not None:
                g = jax.lax.psum(g, axis_name)
            return st.apply_scaled_gradients(g), (aux, optax.tree.norm(g))

        lr = lr_schedule(state.step) * state.hparams.lr_scale
        new_state, (aux, gnorm) = jax.lax.scan(step, state, None, length=cfg.updates_per_round)
        # Metrics describe the fresh pairs at the parameters that sampled them (first update).
        pi_y, pi_yt, loss, m = jax.tree_util.tree_map(lambda a: a[0, :B], aux)
        w = fresh["valid"]
        metrics = {k: _weighted_mean(v, w) for k, v in m.items()}
        ymask_b, ytmask_b = ym.astype(bool), ytm.astype(bool)
        metrics.update({
            "loss": _weighted_mean(loss, w),
            "objective/kl": jnp.mean(pi_y - ref_y),
            "objective/entropy": -jnp.mean(pi_y),
            "objective/model_scores": jnp.mean(judgement.scores_y),
            "objective/ref_scores": jnp.mean(judgement.scores_ytilde),
            "objective/scores_margin": jnp.mean(judgement.scores_y - judgement.scores_ytilde),
            "val/model_contain_eos_token": jnp.mean(has_eos(y, ymask_b, eos_id).astype(jnp.float32)),
            "val/ref_contain_eos_token": jnp.mean(has_eos(yt, ytmask_b, eos_id).astype(jnp.float32)),
            "val/y_wins": jnp.mean(judgement.y_wins.astype(jnp.float32)),
            "val/valid_pairs": jnp.mean(w),
            "val/model_length": jnp.mean(ym.sum(-1).astype(jnp.float32)),
            "grad_norm": gnorm[0],
            "learning_rate": lr,
            "alpha": alpha,
            "beta": beta,
        })
        if true_reward_fn is not None:
            metrics["task/reward"] = jnp.mean(true_reward_fn(x, xm, y, ym))
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name)
        new_state = new_state.replace(rng=rng, round=state.round + 1, replay=replay)
        return new_state, metrics

    def round_fn(state: XPOState, prompts: Array, prompt_mask: Array, oracle: Callable):
        # The oracle is an argument, not a closure: a reward model's parameters are its pytree
        # leaves, so under jit they are traced inputs (shardable) rather than baked-in constants.
        state, pairs = make_pairs(state, prompts, prompt_mask)
        judgement = oracle(pairs.judge_key, pairs.prompts, pairs.prompt_mask, pairs.y.tokens, pairs.y.mask,
                           pairs.yt.tokens, pairs.yt.mask)
        return update(state, pairs, judgement)

    return RoundFns(make_pairs, update, round_fn)
