"""One online XPO round, sample -> judge -> loss -> update, as pure functions to jit whole.

    prompts [B,P] --sample(policy)-----------------> y  [B,N]
                 \\-sample(ref | policy)-----------> y~ [B,N]            (make_pairs -> Pairs)
    oracle(key, prompts, y, y~) ------------------> Judgement          (label -> LabelledPairs)
    one policy forward over concat(y, y~) (grad)  -> log pi(y|x), log pi(y~|x)
    one ref forward over concat(y, y~) (no grad)  -> log pi_ref(y|x), log pi_ref(y~|x)
    xpo_loss(...)  -> grads -> optax update (scaled by the traced lr_scale)      (update)

`make_round` returns three pure functions: `make_pairs` (sampling), `update` (loss and optimiser
step on labelled pairs) and `round_fn(state, prompts, mask, oracle)`, their composition with a
JAX oracle in between. A judge that lives on the host (an API, a reward model with another
tokenizer) runs between the jitted halves; the fused round is the same two halves, not a copy.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from xpo_jax.logprobs import completion_logprobs, has_eos
from xpo_jax.losses import xpo_loss
from xpo_jax.models import lora
from xpo_jax.pairs import LabelledPairs, Pairs, label
from xpo_jax.parallel import TRAIN
from xpo_jax.sampling import sample
from xpo_jax.state import XPOState

if TYPE_CHECKING:  # the config is read, never imported at run time (it sits in a higher layer)
    from xpo_jax.config import TrainConfig

Array = jax.Array


class RoundFns(NamedTuple):
    make_pairs: Callable  # (state, prompts, prompt_mask) -> (state, Pairs)
    update: Callable  # (state, LabelledPairs) -> (state, metrics)
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


def pair_logprobs(logits_fn: Callable, params, pairs: LabelledPairs) -> tuple[Array, Array]:
    """(log p(y|x), log p(y~|x)) [B] under `params`: one forward over the 2B sequences
    concat(x, y) and concat(x, y~)."""
    x, xm = pairs.prompts, pairs.prompt_mask
    tokens = jnp.concatenate([jnp.concatenate([x, pairs.y], 1), jnp.concatenate([x, pairs.yt], 1)], 0)
    mask = jnp.concatenate([jnp.concatenate([xm, pairs.y_mask], 1), jnp.concatenate([xm, pairs.yt_mask], 1)], 0)
    N = pairs.y.shape[1]
    _, lp = completion_logprobs(logits_fn(params, tokens, mask), tokens[:, -N:], mask[:, -N:])
    B = x.shape[0]
    return lp[:B], lp[B:]


def lora_scale_of(cfg: Any) -> Optional[float]:
    """alpha / r of a LoRA config (`--lora-rank` > 0), else None (full fine-tuning)."""
    rank = getattr(cfg, "lora_rank", 0)
    return lora.lora_scale(cfg.lora_alpha, rank) if rank else None


def policy_params_fn(cfg: Any) -> Callable:
    """(state.params, state.ref_params) -> the policy's parameter tree. Full fine-tuning: the
    params themselves. LoRA: the params are the adapters and the reference the frozen base, so
    the policy is the base with the adapters beside its kernels (`lora.with_adapters`: the
    base's arrays shared, never copied)."""
    scale = lora_scale_of(cfg)
    if scale is None:
        return lambda params, ref_params: params
    return lambda params, ref_params: lora.with_adapters(ref_params, params, scale)


def exploration_sampling(cfg: TrainConfig) -> str:
    """The static path that samples y~: "ref" (lambda = 1), "policy" (lambda = 0), or "mixture"
    (lambda anything, traced; forced by cfg.exploration_sampling = "mixture")."""
    if cfg.exploration_sampling == "mixture":
        return "mixture"
    return {1.0: "ref", 0.0: "policy"}.get(float(cfg.exploration_mix), "mixture")


def _weighted_mean(x: Array, w: Array) -> Array:
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


# ----------------------------------------------------------------------------------------------
# The halves of a round
# ----------------------------------------------------------------------------------------------


def compute_dtype(apply_fn: Callable) -> Any:
    """The compute dtype of the module behind `apply_fn` (its `config.compute_dtype`), or None."""
    config = getattr(getattr(apply_fn, "__self__", None), "config", None)
    return getattr(config, "compute_dtype", None)


def _pairs_fn(cfg: TrainConfig, apply_fn: Callable, eos_id: int, pad_id: int, n: int, min_new_tokens: int,
              layout: Any = None) -> Callable:
    """make_pairs: y ~ pi_t and y~ ~ pi_ref (prob. lambda) or pi_t, by cfg's exploration path.
    With a `layout`, each model sampled is first cast to the compute dtype and moved once into
    the decode layout (`Layout.decode_params`): the decode loops then move only activations."""
    path = exploration_sampling(cfg)
    dtype = compute_dtype(apply_fn)
    decoded = (lambda p: p) if layout is None else (lambda p: layout.decode_params(p, dtype))
    scale = lora_scale_of(cfg)

    def models(state: XPOState) -> tuple[Any, Callable]:
        """(pi_t's parameters in the decode layout, () -> pi_ref's). LoRA: one base moved once,
        shared by both (pi_ref is the base with the adapters off)."""
        if scale is None:
            return decoded(state.params), lambda: decoded(state.ref_params)
        base = decoded(state.ref_params)
        return lora.attach(base, decoded(lora.scaled(state.params, scale))), lambda: base

    def make_pairs(state: XPOState, prompts: Array, prompt_mask: Array):
        # Five keys on every path, so the paths draw the same y (and, for lambda in {0, 1}, y~).
        rng, k_y, k_yt, k_mix, k_judge = jax.random.split(state.rng, 5)
        B = prompts.shape[0]
        policy, reference = models(state)

        def draw(params, key):
            return sample(apply_fn, params, prompts, prompt_mask, key, max_new_tokens=n,
                          temperature=state.hparams.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eos_id=eos_id,
                          pad_id=pad_id, min_new_tokens=min_new_tokens, layout=layout)

        def policy_pair():
            # Same parameters: one decode loop over both keys (N steps instead of 2N, each a
            # matmul over 2B rows).
            out = jax.vmap(draw, in_axes=(None, 0))(policy, jnp.stack([k_y, k_yt]))
            return tuple(jax.tree_util.tree_map(lambda a: a[i], out) for i in (0, 1))

        if path == "policy":
            (y, yt), from_ref = policy_pair(), jnp.zeros((B,), bool)
        elif path == "ref":
            # Two loops. Stacking (policy, ref) and vmapping the sampler over them was measured
            # slower on CPU (0.55 s vs 2 x 0.16 s at bench-tiny B=8): batched dots with distinct
            # weights lower worse than two plain loops.
            # One model in the decode layout at a time: y~'s copy is made from y's result on.
            y = draw(policy, k_y)
            if scale is None:
                ref = state.ref_params
                if layout is not None:  # (an optimisation barrier orders the reference's move after y)
                    ref, _ = jax.lax.optimization_barrier((ref, y.tokens))
                ref = decoded(ref)
            else:  # LoRA: the base already moved for pi_t
                ref = reference()
            yt, from_ref = draw(ref, k_yt), jnp.ones((B,), bool)
        else:
            (y, yt_policy), yt_ref = policy_pair(), draw(reference(), k_yt)
            from_ref = jax.random.uniform(k_mix, (B,)) < state.hparams.exploration_mix
            pick = lambda a, b: jnp.where(from_ref.reshape((B,) + (1,) * (a.ndim - 1)), a, b)
            yt = jax.tree_util.tree_map(pick, yt_ref, yt_policy)
        return state.replace(rng=rng), Pairs(prompts, prompt_mask, y, yt, k_judge, from_ref)

    return make_pairs


def _grads_fn(cfg: TrainConfig, logits_fn: Callable) -> Callable:
    """(params, ref_params, batch: LabelledPairs, alpha, beta, hparams) -> (gradient in `params`
    of the pair-weighted mean loss, aux = (log pi(y), loss, per-example metrics)), by
    micro-batches when cfg asks. The policy is `policy_params_fn(cfg)(params, ref_params)`
    (LoRA: gradients of the adapters only; the base is a constant)."""
    M = cfg.micro_batches
    policy = policy_params_fn(cfg)

    def loss_sum(params, ref_params, mb: LabelledPairs, alpha, beta, hp):
        pi_y, pi_yt = pair_logprobs(logits_fn, policy(params, ref_params), mb)
        loss, m = xpo_loss(pi_y=pi_y, pi_ytilde=pi_yt, ref_y=mb.ref_y, ref_ytilde=mb.ref_yt, y_wins=mb.y_wins,
                           alpha=alpha, beta=beta, loss_type=cfg.loss_type, loss_params=hp.loss_params,
                           bonus=cfg.bonus, bonus_params=hp.bonus_params)
        return jnp.sum(loss * mb.valid), (pi_y, loss, m)

    grad_fn = jax.grad(loss_sum, has_aux=True)

    def grads(params, ref_params, batch: LabelledPairs, alpha, beta, hp):
        norm = jnp.maximum(batch.valid.sum(), 1.0)
        if M == 1:
            g, aux = grad_fn(params, ref_params, batch, alpha, beta, hp)
            return jax.tree_util.tree_map(lambda a: a / norm, g), aux
        # Gradient accumulation: the sum of micro-batch gradients of sum(valid * loss), divided
        # once by the whole batch's weight, equals the full batch's gradient.
        micro = jax.tree_util.tree_map(lambda a: a.reshape((M, a.shape[0] // M) + a.shape[1:]), batch)

        def body(acc, mb):
            g, aux = grad_fn(params, ref_params, mb, alpha, beta, hp)
            return jax.tree_util.tree_map(jnp.add, acc, g), aux

        g, aux = jax.lax.scan(body, jax.tree_util.tree_map(jnp.zeros_like, params), micro)
        aux = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), aux)
        return jax.tree_util.tree_map(lambda a: a / norm, g), aux

    return grads


def _pair_metrics(fresh: LabelledPairs, pi_y: Array, eos_id: int) -> dict:
    """Metrics of the round's fresh pairs, each named for the sample it describes: y (the policy's
    sample: `model`), y~ (the exploration sample: `ytilde`, from pi_ref or pi_t)."""
    f32 = lambda a: a.astype(jnp.float32)
    return {
        "objective/kl": jnp.mean(pi_y - fresh.ref_y),
        "objective/entropy": -jnp.mean(pi_y),
        "objective/model_scores": jnp.mean(fresh.scores_y),
        "objective/ytilde_scores": jnp.mean(fresh.scores_yt),
        "objective/scores_margin": jnp.mean(fresh.scores_y - fresh.scores_yt),
        "val/model_contain_eos_token": jnp.mean(f32(has_eos(fresh.y, fresh.y_mask.astype(bool), eos_id))),
        "val/ytilde_contain_eos_token": jnp.mean(f32(has_eos(fresh.yt, fresh.yt_mask.astype(bool), eos_id))),
        "val/y_wins": jnp.mean(f32(fresh.y_wins)),
        "val/valid_pairs": jnp.mean(fresh.valid),
        "val/yt_from_ref": jnp.mean(f32(fresh.yt_from_ref)),
        "val/model_length": jnp.mean(f32(fresh.y_mask.sum(-1))),
    }


def _task_metrics(fresh: LabelledPairs, true_reward_fn, optimal_reward_fn) -> dict:
    """`task/reward` (the true reward of y) and the fractions of y and y~ that are optimal."""
    if true_reward_fn is None:
        return {}
    x, xm = fresh.prompts, fresh.prompt_mask
    r_y = true_reward_fn(x, xm, fresh.y, fresh.y_mask)
    out = {"task/reward": jnp.mean(r_y)}
    if optimal_reward_fn is not None:
        best = optimal_reward_fn(x, xm)
        r_yt = true_reward_fn(x, xm, fresh.yt, fresh.yt_mask)
        out["explore/y_optimal"] = jnp.mean((r_y >= best).astype(jnp.float32))
        out["explore/yt_optimal"] = jnp.mean((r_yt >= best).astype(jnp.float32))
    return out


def _update_fn(cfg: TrainConfig, logits_fn: Callable, lr_schedule: Callable, eos_id: int, task_metrics: Callable):
    grads = _grads_fn(cfg, logits_fn)
    K = cfg.updates_per_round

    def update(state: XPOState, pairs: LabelledPairs):
        alpha, beta = state.hparams.scheduled(state.round, cfg.rounds)
        ref_y, ref_yt = jax.lax.stop_gradient(pair_logprobs(logits_fn, state.ref_params, pairs))
        fresh = pairs._replace(ref_y=ref_y, ref_yt=ref_yt)
        rng, replay = state.rng, state.replay
        if replay is None:
            batches = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (K,) + a.shape), fresh)
        else:
            rng, k_replay = jax.random.split(rng)
            replay = replay.insert(fresh)
            batches = replay.draw(k_replay, (K, cfg.replay_batch_size))

        def step(st, batch):
            g, aux = grads(st.params, st.ref_params, batch, alpha, beta, st.hparams)
            return st.apply_scaled_gradients(g), (aux, optax.tree.norm(g), batch.valid)

        new_state, (aux, gnorm, weights) = jax.lax.scan(step, state, batches)
        # The loss metrics describe the first step's pairs at the round's starting parameters:
        # the fresh pairs (no replay) or the first replay minibatch.
        pi_y_first, loss, m = jax.tree_util.tree_map(lambda a: a[0], aux)
        metrics = {k: _weighted_mean(v, weights[0]) for k, v in m.items()}
        # log pi(y|x) of the fresh samples: the training forward's without replay, else the
        # sampler's own record (the same value, from the cached decode, at temperature 1).
        pi_y = pi_y_first if replay is None else fresh.y_logprob
        metrics.update(_pair_metrics(fresh, pi_y, eos_id), **task_metrics(fresh))
        metrics.update({
            "loss": _weighted_mean(loss, weights[0]),
            "labels": ((state.round + 1) * pairs.prompts.shape[0]).astype(jnp.float32),
            "grad_norm": gnorm[0],
            "learning_rate": lr_schedule(state.step) * state.hparams.lr_scale,
            "alpha": alpha,
            "beta": beta,
        })
        return new_state.replace(rng=rng, round=state.round + 1, replay=replay), metrics

    return update


def make_round(
    cfg: TrainConfig,
    *,
    apply_fn: Callable,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    true_reward_fn: Optional[Callable] = None,
    optimal_reward_fn: Optional[Callable] = None,
    lr_schedule: Optional[Callable] = None,
    min_new_tokens: Optional[int] = None,
    layout: Any = None,
) -> RoundFns:
    """Build the round's pure functions for `cfg` (static choices) and a policy `apply_fn`.

    Traced, from the state: alpha, beta (scheduled by round), temperature, lr_scale,
    exploration_mix (lambda), and the loss's and the bonus form's own hyperparameters
    (`hparams.loss_params`, `hparams.bonus_params`). Static, from cfg: the loss and the bonus
    form, batch sizes, micro-batches, top-k/top-p, the exploration sampling path, replay sizes.
    `true_reward_fn(prompts, prompt_mask, y, y_mask)` (synthetic tasks) adds the `task/reward`
    metric: the policy samples' reward before any EOS penalty; `optimal_reward_fn(prompts,
    prompt_mask) -> [B]` (the best reward attainable on each prompt) adds `explore/y_optimal` and
    `explore/yt_optimal`, the fractions of y and y~ that are optimal.

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
    fresh pairs'. Under `jit` with sharded arrays XLA inserts the collectives.
    `min_new_tokens` forbids EOS before that many tokens (benchmarks: every response full length).
    `layout` (a `parallel.Layout`, or None for no constraints): the sampler runs in its decode
    layout (weights cast to the compute dtype, then moved once per round and model; only
    activations cross devices per token), the forwards and the backward with activations split
    by rows (FSDP gathers weights, reduce-scatters gradients).
    """
    N = max_new_tokens
    logits_fn = completion_logits_fn(apply_fn, N)
    lr_schedule = lr_schedule or make_optimizer(cfg)[1]
    min_new = cfg.min_new_tokens if min_new_tokens is None else min_new_tokens
    make_pairs = _pairs_fn(cfg, apply_fn, eos_id, pad_id, N, min_new, layout)
    update = _update_fn(cfg, logits_fn, lr_schedule, eos_id,
                        lambda fresh: _task_metrics(fresh, true_reward_fn, optimal_reward_fn))
    update = update if layout is None else _in_region(layout, update)

    def round_fn(state: XPOState, prompts: Array, prompt_mask: Array, oracle: Callable):
        # The oracle is an argument, not a closure: a reward model's parameters are its pytree
        # leaves, so under jit they are traced inputs (shardable) rather than baked-in constants.
        state, pairs = make_pairs(state, prompts, prompt_mask)
        with contextlib.nullcontext() if layout is None else layout.activations(TRAIN):
            judgement = oracle(pairs.judge_key, pairs.prompts, pairs.prompt_mask, pairs.y.tokens, pairs.y.mask,
                               pairs.yt.tokens, pairs.yt.mask)
        return update(state, label(pairs, judgement))

    return RoundFns(make_pairs, update, round_fn)


def _in_region(layout: Any, fn: Callable) -> Callable:
    """`fn` traced with the model's activations split by rows over data x fsdp (`Layout.activations`)."""
    def wrapped(*args):
        with layout.activations(TRAIN):
            return fn(*args)

    return wrapped
