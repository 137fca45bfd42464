"""XPOState: everything an online run carries from round to round, as one pytree.

A flax `TrainState` (policy params, optimiser state, step) plus the reference parameters, the
PRNG key, the round counter, the hyperparameters *as arrays* (so a sweep over them is a `vmap` of
one compiled program), and an optional replay buffer of labelled pairs.

Replay. Algorithm 1 of the XPO paper (arXiv 2405.21046) minimises over all of D_pref and D_opt
gathered so far; TRL's XPOTrainer keeps nothing (each round trains on its fresh batch only).
`replay_capacity = 0` is TRL's behaviour; > 0 keeps a ring buffer of every labelled pair so far
(x, y, y~, y_wins), up to the capacity, with their reference log-probs (pi_ref is frozen, so they
never need recomputing), and each of the round's K optimiser steps draws a fresh minibatch from
it: minibatch SGD on Algorithm 1's cumulative objective, whose argmin K -> infinity approaches.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from xpo_jax.pairs import LabelledPairs

Array = jax.Array


class Hyperparams(struct.PyTreeNode):
    """Traced hyperparameters (float32 scalars, or [G] under a sweep's vmap).

    alpha and beta follow linear schedules from their start to their end value over the run
    (equal ends = constant); TRL's per-epoch lists have no traced equivalent and crash past the
    list's end, a linear schedule does neither. `loss_params` and `bonus_params` hold the
    hyperparameters that the run's loss and bonus form declare (`xpo_jax.losses`), by name.
    """

    alpha: Array
    alpha_end: Array
    beta: Array
    beta_end: Array
    temperature: Array
    lr_scale: Array
    exploration_mix: Array  # lambda: P(y~ from pi_ref); 1 = XPO Algorithm 1, 0 = online DPO
    loss_params: dict = struct.field(default_factory=dict)
    bonus_params: dict = struct.field(default_factory=dict)

    @classmethod
    def create(cls, *, alpha, beta, temperature=1.0, lr_scale=1.0, alpha_end=None, beta_end=None,
               exploration_mix=1.0, loss_params=None, bonus_params=None):
        f = lambda x: jnp.asarray(x, jnp.float32)
        floats = lambda d: {k: f(v) for k, v in (d or {}).items()}
        return cls(
            alpha=f(alpha),
            alpha_end=f(alpha if alpha_end is None else alpha_end),
            beta=f(beta),
            beta_end=f(beta if beta_end is None else beta_end),
            temperature=f(temperature),
            lr_scale=f(lr_scale),
            exploration_mix=f(exploration_mix),
            loss_params=floats(loss_params),
            bonus_params=floats(bonus_params),
        )

    @classmethod
    def from_config(cls, cfg, bonus_defaults: Optional[dict] = None) -> "Hyperparams":
        """The traced hyperparameters of a TrainConfig: every hyperparameter of its loss and bonus
        form, at cfg's value or the declared default (`bonus_defaults`: a run's own, e.g. a
        task's reward range as v_max)."""
        return cls.create(
            alpha=cfg.alpha, alpha_end=cfg.alpha_end, beta=cfg.beta, beta_end=cfg.beta_end,
            temperature=cfg.temperature, lr_scale=cfg.lr_scale, exploration_mix=cfg.exploration_mix,
            loss_params=cfg.resolved_loss_params(), bonus_params=cfg.resolved_bonus_params(bonus_defaults),
        )

    def scheduled(self, round_idx: Array, num_rounds: int) -> tuple[Array, Array]:
        """(alpha_t, beta_t) at round `round_idx` of `num_rounds` (linear, end value at the last)."""
        frac = jnp.clip(round_idx.astype(jnp.float32) / max(num_rounds - 1, 1), 0.0, 1.0)
        alpha = self.alpha + (self.alpha_end - self.alpha) * frac
        beta = self.beta + (self.beta_end - self.beta) * frac
        return alpha, beta


class Replay(struct.PyTreeNode):
    """Ring buffer of labelled pairs (`LabelledPairs` of [C, ...], reference log-probs included);
    `count` is how many were ever inserted."""

    pairs: LabelledPairs
    count: Array  # int32 scalar

    @classmethod
    def empty(cls, capacity: int, prompt_len: int, response_len: int) -> "Replay":
        zi = lambda *s: jnp.zeros(s, jnp.int32)
        zf = lambda: jnp.zeros((capacity,), jnp.float32)
        C = capacity
        pairs = LabelledPairs(
            prompts=zi(C, prompt_len), prompt_mask=zi(C, prompt_len), y=zi(C, response_len), y_mask=zi(C, response_len),
            yt=zi(C, response_len), yt_mask=zi(C, response_len), y_logprob=zf(), yt_logprob=zf(),
            yt_from_ref=jnp.zeros((C,), bool), y_wins=jnp.zeros((C,), bool), valid=zf(), scores_y=zf(), scores_yt=zf(),
            ref_y=zf(), ref_yt=zf(),
        )
        return cls(pairs=pairs, count=jnp.zeros((), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.pairs.valid.shape[-1]

    def insert(self, batch: LabelledPairs) -> "Replay":
        """Write a batch of B <= capacity pairs (reference log-probs computed) at the ring
        position, the oldest overwritten."""
        if batch.ref_y is None or batch.ref_yt is None:
            raise ValueError("Replay.insert: the pairs need their reference log-probs (ref_y, ref_yt)")
        B = batch.valid.shape[0]
        idx = (self.count + jnp.arange(B)) % self.capacity
        pairs = jax.tree_util.tree_map(lambda old, new: old.at[idx].set(new.astype(old.dtype)), self.pairs, batch)
        return self.replace(pairs=pairs, count=self.count + B)

    def draw(self, key: Array, shape: tuple) -> LabelledPairs:
        """Pairs drawn uniformly (with replacement) from the filled part, each field [*shape, ...]
        (e.g. (K, M): K minibatches of M); valid = 0 while empty."""
        filled = jnp.minimum(self.count, self.capacity)
        idx = jax.random.randint(key, shape, 0, jnp.maximum(filled, 1))
        out = jax.tree_util.tree_map(lambda a: a[idx], self.pairs)
        return out._replace(valid=out.valid * (filled > 0))


class XPOState(train_state.TrainState):
    """TrainState (step, apply_fn, params, tx, opt_state) + ref_params, rng, round, hparams, replay.

    `rng` is a raw uint32 key (`jax.random.PRNGKey`), which checkpoints as a plain array.
    """

    ref_params: Any = None
    rng: Array = None
    round: Array = None
    hparams: Hyperparams = None
    replay: Optional[Replay] = None

    @classmethod
    def create_xpo(cls, *, apply_fn, params, ref_params, tx, rng, hparams: Hyperparams, replay: Optional[Replay] = None):
        return cls.create(
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            ref_params=ref_params,
            rng=rng,
            round=jnp.zeros((), jnp.int32),
            hparams=hparams,
            replay=replay,
        )

    def apply_scaled_gradients(self, grads) -> "XPOState":
        """One optimiser step with the update scaled by hparams.lr_scale (traced: for Adam-type
        optimisers, scaling the update is scaling the learning rate)."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        updates = jax.tree_util.tree_map(lambda u: u * self.hparams.lr_scale.astype(u.dtype), updates)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state)


def initial_state(cfg, *, apply_fn, ref_params, tx, key: Array, hparams: Hyperparams, prompt_len: int,
                  max_new_tokens: int, param_dtype=None, params=None) -> XPOState:
    """Round 0 of a run: the policy starts at the reference (as in RLHF fine-tuning).

    `params`: the trained parameters when they are not a copy of the reference: a LoRA run's
    adapters (lora_b = 0, so the policy still starts at the reference), the optimiser state
    then the adapters' only.

    `param_dtype`: the storage dtype of the policy's parameters (default: the reference's).
    Everything taken from the caller (params and ref_params from `ref_params`, the key, the
    hyperparameters) is a *copy*: the host loop donates the state, and donating one buffer twice
    (as params and as ref_params) is an error, as is deleting the caller's arrays (a later
    `init_state(key, hparams)` with the same key would find it deleted)."""
    replay = Replay.empty(cfg.replay_capacity, prompt_len, max_new_tokens) if cfg.replay_capacity else None
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
    # The policy's master weights in `param_dtype` (e.g. float32 over a bfloat16 reference).
    params = ref_params if params is None else params
    params = params if param_dtype is None else jax.tree_util.tree_map(lambda x: x.astype(param_dtype), params)
    return XPOState.create_xpo(apply_fn=apply_fn, params=copy(params), ref_params=copy(ref_params), tx=tx,
                               rng=copy(key), hparams=copy(hparams), replay=replay)
