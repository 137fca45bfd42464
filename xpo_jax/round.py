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
from xpo_jax.losses import vmax_clip_bounds, xpo_loss
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
    yt_from_ref: Array  # [B] bool: y~ was drawn from pi_ref (else from pi_t)


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


def exploration_sampling(cfg: TrainConfig) -> str:
    """The static path that samples y~: "ref" (lambda = 1), "policy" (lambda = 0), or "mixture"
    (lambda anything, traced; forced by cfg.exploration_sampling = "mixture")."""
    if cfg.exploration_sampling == "mixture":
        return "mixture"
    return {1.0: "ref", 0.0: "policy"}.get(float(cfg.exploration_mix), "mixture")


def bonus_options(cfg: TrainConfig, v_max: Optional[float] = None) -> Callable:
    """beta -> xpo_loss keywords for cfg.bonus: "logprob" alpha log pi(y~) (TRL), "logratio"
    alpha log pi/pi_ref(y~) (same gradient), "clip" the log-ratio clipped to [bonus_clip_low,
    bonus_clip_high], "vmax" clipped to [-V_max/beta, V_max/beta] (the paper's bound on the
    log-ratio, with V_max the reward range; beta is traced, so are the bounds)."""
    if cfg.bonus == "logprob":
        return lambda beta: {}
    if cfg.bonus == "logratio":
        return lambda beta: {"bonus_logratio": True}
    if cfg.bonus == "clip":
        return lambda beta: {"bonus_clip_low": cfg.bonus_clip_low, "bonus_clip_high": cfg.bonus_clip_high}
    v = cfg.bonus_v_max if cfg.bonus_v_max is not None else v_max
    if v is None:
        raise ValueError("--bonus vmax needs --bonus-v-max (this run's reward range is not known)")

    def vmax(beta):
        low, high = vmax_clip_bounds(v, beta)
        return {"bonus_clip_low": low, "bonus_clip_high": high}

    return vmax


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
    optimal_reward_fn: Optional[Callable] = None,
    v_max: Optional[float] = None,
    lr_schedule: Optional[Callable] = None,
    axis_name: Optional[str] = None,
    min_new_tokens: Optional[int] = None,
) -> RoundFns:
    """Build the round's pure functions for `cfg` (static choices) and a Transformer `apply_fn`.

    Traced, from the state: alpha, beta (scheduled by round), temperature, lr_scale,
    label_smoothing, exploration_mix (lambda). Static, from cfg: loss type, bonus form, batch
    sizes, micro-batches, top-k/top-p, the exploration sampling path, replay sizes.
    `true_reward_fn(prompts, prompt_mask, y, y_mask)` (synthetic tasks) adds the `task/reward`
    metric: the policy samples' reward before any EOS penalty; `optimal_reward_fn(prompts,
    prompt_mask) -> [B]` (the best reward attainable on each prompt) adds `explore/y_optimal` and
    `explore/yt_optimal`, the fractions of y and y~ that are optimal. `v_max`: the reward range
    for `cfg.bonus == "vmax"` (cfg.bonus_v_max wins when set).

    Exploration (which policy y~ comes from): each y~ is drawn from pi_ref with probability
    lambda = hparams.exploration_mix, else from pi_t (XPO Algorithm 2's pi~_t). lambda = 1 is
    Algorithm 1 (XPO; with alpha = 0, reference-sampling DPO), lambda = 0 is online DPO (both
    responses from pi_t). With cfg.exploration_sampling "auto" and lambda a concrete 0 or 1 only
    the policy needed is sampled; otherwise ("mixture", e.g. a sweep over lambda) y~ is sampled
    from both and chosen per row, so every lambda is one compiled program, and the keys are the
    cheap paths' keys: a mixture cell with lambda in {0, 1} samples exactly their tokens.

    Update: with no replay, K = cfg.updates_per_round optimiser steps on the fresh batch (TRL).
    With replay (Algorithm 1's cumulative data), the fresh pairs join the buffer and each of the
    K steps draws a fresh minibatch of cfg.replay_batch_size pairs from every pair so far (up to
    the capacity); the loss metrics are then the first minibatch's, the objective/* metrics the
    fresh pairs'.

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
    if min_new_tokens is None:
        min_new_tokens = cfg.min_new_tokens
    sampling = exploration_sampling(cfg)
    bonus = bonus_options(cfg, v_max)

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
        # Five keys on every path, so the paths draw the same y (and, for lambda in {0, 1}, y~).
        rng, k_y, k_yt, k_mix, k_judge = jax.random.split(state.rng, 5)
        opts = dict(
            max_new_tokens=N, temperature=state.hparams.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            eos_id=eos_id, pad_id=pad_id, min_new_tokens=min_new_tokens,
        )
        B = prompts.shape[0]

        def draw(params, key):
            return sample(apply_fn, params, prompts, prompt_mask, key, **opts)

        def policy_pair():
            # Same parameters: one decode loop over both keys (N steps instead of 2N, each a
            # matmul over 2B rows).
            out = jax.vmap(draw, in_axes=(None, 0))(state.params, jnp.stack([k_y, k_yt]))
            return tuple(jax.tree_util.tree_map(lambda a: a[i], out) for i in (0, 1))

        if sampling == "policy":
            (y, yt), from_ref = policy_pair(), jnp.zeros((B,), bool)
        elif sampling == "ref":
            # Two loops. Stacking (policy, ref) and vmapping the sampler over them was measured
            # slower on CPU (0.55 s vs 2 x 0.16 s at bench-tiny B=8): batched dots with distinct
            # weights lower worse than two plain loops.
            y, yt, from_ref = draw(state.params, k_y), draw(state.ref_params, k_yt), jnp.ones((B,), bool)
        else:
            (y, yt_policy), yt_ref = policy_pair(), draw(state.ref_params, k_yt)
            from_ref = jax.random.uniform(k_mix, (B,)) < state.hparams.exploration_mix
            pick = lambda a, b: jnp.where(from_ref.reshape((B,) + (1,) * (a.ndim - 1)), a, b)
            yt = jax.tree_util.tree_map(pick, yt_ref, yt_policy)
        return state.replace(rng=rng), Pairs(prompts, prompt_mask, y, yt, k_judge, from_ref)

    def update(state: XPOState, pairs: Pairs, judgement: Judgement):
        alpha, beta = state.hparams.scheduled(state.round, cfg.rounds)
        ls = state.hparams.label_smoothing
        num_shards = 1 if axis_name is None else jax.lax.psum(1, axis_name)
        x, xm = pairs.prompts, pairs.prompt_mask
        y, ym = pairs.y.tokens, pairs.y.mask.astype(jnp.int32)
        yt, ytm = pairs.yt.tokens, pairs.yt.mask.astype(jnp.int32)
        B = x.shape[0]
        ref_y, ref_yt = jax.lax.stop_gradient(seq_logprobs(state.ref_params, x, xm, y, ym, yt, ytm))
        fresh = dict(
            prompts=x, prompt_mask=xm, y=y, y_mask=ym, yt=yt, yt_mask=ytm,
            y_wins=judgement.y_wins, valid=judgement.valid.astype(jnp.float32), ref_y=ref_y, ref_yt=ref_yt,
        )
        K, M = cfg.updates_per_round, cfg.micro_batches
        rng, replay = state.rng, state.replay
        if replay is None:
            batches = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (K,) + a.shape), fresh)
        else:
            rng, k_replay = jax.random.split(rng)
            replay = replay.insert(**fresh)
            batches = replay.draw(k_replay, (K, cfg.replay_batch_size))

        def loss_sum(params, mb):
            pi_y, pi_yt = seq_logprobs(params, mb["prompts"], mb["prompt_mask"], mb["y"], mb["y_mask"], mb["yt"], mb["yt_mask"])
            loss, m = xpo_loss(
                pi_y=pi_y, pi_ytilde=pi_yt, ref_y=mb["ref_y"], ref_ytilde=mb["ref_yt"], y_wins=mb["y_wins"],
                alpha=alpha, beta=beta, loss_type=cfg.loss_type, label_smoothing=ls, **bonus(beta),
            )
            return jnp.sum(loss * mb["valid"]), (pi_y, pi_yt, loss, m)

        grad_fn = jax.grad(loss_sum, has_aux=True)

        def grads_and_aux(params, batch):
            total = batch["valid"].sum()
            if axis_name is not None:
                total = jax.lax.psum(total, axis_name)
            norm = jnp.maximum(total, 1.0)
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

        def step(st, batch):
            g, aux = grads_and_aux(st.params, batch)
            if axis_name is not None:
                g = jax.lax.psum(g, axis_name)
            return st.apply_scaled_gradients(g), (aux, optax.tree.norm(g), batch["valid"])

        lr = lr_schedule(state.step) * state.hparams.lr_scale
        new_state, (aux, gnorm, weights) = jax.lax.scan(step, state, batches)
        # The loss metrics describe the first step's pairs at the round's starting parameters:
        # the fresh pairs (no replay) or the first replay minibatch.
        pi_y_first, _, loss, m = jax.tree_util.tree_map(lambda a: a[0], aux)
        w = weights[0]
        metrics = {k: _weighted_mean(v, w) for k, v in m.items()}
        # log pi(y|x) of the fresh samples: the training forward's without replay, else the
        # sampler's own record (the same value, from the cached decode, at temperature 1).
        pi_y = pi_y_first if replay is None else pairs.y.logprobs.sum(-1)
        ymask_b, ytmask_b = ym.astype(bool), ytm.astype(bool)
        fresh_w = fresh["valid"]
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
            "val/valid_pairs": jnp.mean(fresh_w),
            "val/yt_from_ref": jnp.mean(pairs.yt_from_ref.astype(jnp.float32)),
            "labels": ((state.round + 1) * B * num_shards).astype(jnp.float32),
            "val/model_length": jnp.mean(ym.sum(-1).astype(jnp.float32)),
            "grad_norm": gnorm[0],
            "learning_rate": lr,
            "alpha": alpha,
            "beta": beta,
        })
        if true_reward_fn is not None:
            r_y = true_reward_fn(x, xm, y, ym)
            metrics["task/reward"] = jnp.mean(r_y)
            if optimal_reward_fn is not None:
                best = optimal_reward_fn(x, xm)
                r_yt = true_reward_fn(x, xm, yt, ytm)
                metrics["explore/y_optimal"] = jnp.mean((r_y >= best).astype(jnp.float32))
                metrics["explore/yt_optimal"] = jnp.mean((r_yt >= best).astype(jnp.float32))
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
