"""Task families with a coverage knob: pi_ref(optimal response) set from ~1e-1 down to 1e-4.

The question they serve: when does XPO's exploration bonus find good responses that online DPO
misses, and at what cost? XPO (Xie et al. 2024, arXiv 2405.21046) is shown to approach the
optimum even when the reference covers it poorly (its guarantee rests on a coverability
coefficient of the policy class, not on pi_ref), while online DPO learns only from what pi_t
samples: with pi_t near pi_ref it sees y* about once per 1/pi_ref(y*) samples. Each family below
takes ``coverage`` = pi_ref(y* | x), the reference's probability of the optimal response, and
keeps everything else fixed, so a sweep over coverage isolates the exploration problem.

- `make_bandit_task` (presets "bandit-1e-1" .. "bandit-1e-4"): a contextual bandit, K
  single-token prompts, A actions, one response token, a tabular policy (exactly a table over
  (prompt, action)) and an explicit reference table: coverage is exact.
- `make_chain_task` ("chain-1e-1" .. "chain-1e-4"): an L-token chain then EOS, prefix-match
  reward, a tabular bigram policy and an explicit reference whose per-step probability of the
  right next token is q = coverage^(1/(L+1)): coverage = q^(L+1) exactly.
- `make_chain_transformer_task` ("chain-transformer-1e-1" .. "-1e-4"): the same chain with the
  tiny Transformer policy, its reference fine-tuned on demonstrations sampled from the tabular
  chain reference. Its coverage is whatever the fine-tune learns (close to the tabular one):
  measure it with ``task.exact_eval``, it is not set.

Token layout of all three: pad 0, EOS 1, then the prompt tokens, then the response tokens. Prompt
tokens are prompt-only (suppressed: the policy never generates them), as is padding.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from xpo_jax.models.tabular import TabularPolicy
from xpo_jax.models.transformer import Transformer
from xpo_jax.tasks.base import Task, tiny_model_config
from xpo_jax.tasks.builtin import EOS_ID, PAD_ID, pick_prompts, prefix_match_reward

PRESET_COVERAGES = (1e-1, 1e-2, 1e-3, 1e-4)


def coverage_label(coverage: float) -> str:
    """1e-3 -> "1e-3" (the preset names' suffix)."""
    mantissa, exponent = f"{coverage:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _check_probability(name: str, value: float, low_open: bool = True):
    if not ((0.0 < value) if low_open else (0.0 <= value)) or not value < 1.0:
        raise ValueError(f"{name} must lie in {'(0' if low_open else '[0'}, 1); got {value!r}")


def _tabular_task(name: str, vocab: int, prompts: np.ndarray, max_new_tokens: int, reward_fn, logits: np.ndarray,
                  suppress_ids: tuple, description: str) -> Task:
    """A Task with the tabular policy and the explicit reference table `logits` ([V, V])."""
    return Task(name=name, vocab_size=vocab, eos_id=EOS_ID, pad_id=PAD_ID, prompts=prompts,
                prompt_mask=np.ones(prompts.shape, np.int32), max_new_tokens=max_new_tokens, reward_fn=reward_fn,
                model_config=tiny_model_config(vocab, prompts.shape[1] + max_new_tokens), model_class=TabularPolicy,
                reference_params={"logits": logits}, suppress_ids=suppress_ids, description=description)


# --------------------------------------------------------------------------------------------
# Contextual bandit


def bandit_arms(num_prompts: int, num_actions: int) -> tuple[np.ndarray, np.ndarray]:
    """(optimal [K], second best [K]) action indices: k mod A and (k + 1) mod A. Under a tabular
    policy actions are exchangeable, so a fixed rule loses nothing and is easy to check."""
    k = np.arange(num_prompts)
    return k % num_actions, (k + 1) % num_actions


def make_bandit_task(*, coverage: float, num_prompts: int = 8, num_actions: int = 16, second_best_mass: float = 0.8,
                     second_best_reward: float = 0.5, reward_scale: float = 4.0, name: str | None = None) -> Task:
    """A contextual bandit whose reference is good but not optimal.

    Tokens: pad 0, EOS 1, prompts 2 .. K+1 (one token each), actions K+2 .. K+A+1. A response is
    exactly one action: max_new_tokens = 1 and EOS, padding and the prompt tokens are suppressed,
    so exact evaluation enumerates the A actions and nothing else.

    Reward (times ``reward_scale``): 1 for the prompt's optimal action a*_k = k mod A,
    ``second_best_reward`` for its second-best b_k = (k+1) mod A, 0 for the other A-2.

    Reference (an explicit table, ``reference_params = {"logits": log p}``):
        pi_ref(a*_k | k) = coverage,  pi_ref(b_k | k) = second_best_mass,
        pi_ref(a | k) = (1 - coverage - second_best_mass) / (A - 2) for the others,
    so p_optimal of the reference is ``coverage`` exactly (to float32 rounding).

    Why this shape: pi_ref's mode is the second-best action, which beats everything else it
    usually samples. Online DPO samples both responses from pi_t: its pairs are mostly (b, b)
    (no signal) or (b, worse), which push b up and so a* -- seen once per ~1/coverage samples --
    further down: it can settle on b for a long time. XPO's bonus lowers the likelihood of what
    pi_ref samples (mostly b), which moves mass to rarely-seen actions, a* among them; once a*
    is sampled it wins most comparisons. The default reward_scale 4 (as hard-explore's 0..4)
    makes a Bradley-Terry oracle prefer a* to b with probability sigmoid(4 - 2) = 0.88 (in [0, 1]
    it would be sigmoid(0.5) = 0.62, nearly a coin flip), and puts the KL-regularised optimum
    pi* ∝ pi_ref exp(r / beta) on a* at beta = 0.1 for every preset coverage (at 1e-4:
    1e-4 e^40 against 0.8 e^20), so "P(optimal) >= 0.5" is reachable by the optimum itself.
    """
    _check_probability("coverage", coverage)
    _check_probability("second_best_mass", second_best_mass, low_open=False)
    if num_actions < 3 or num_prompts < 1:
        raise ValueError(f"need num_actions >= 3 and num_prompts >= 1; got {num_actions}, {num_prompts}")
    rest = 1.0 - coverage - second_best_mass
    if not rest > 0.0:
        raise ValueError(f"coverage + second_best_mass must be < 1; got {coverage} + {second_best_mass}")
    first_prompt, first_action = 2, 2 + num_prompts
    vocab = first_action + num_actions
    best, second = bandit_arms(num_prompts, num_actions)
    rows = np.arange(num_prompts)
    rewards = np.zeros((num_prompts, num_actions), np.float32)
    rewards[rows, second] = second_best_reward
    rewards[rows, best] = 1.0
    rewards *= reward_scale
    probs = np.full((num_prompts, num_actions), rest / (num_actions - 2))
    probs[rows, second] = second_best_mass
    probs[rows, best] = coverage
    table = np.zeros((vocab, vocab), np.float32)  # suppressed columns and unused rows stay 0
    table[first_prompt:first_action, first_action:] = np.log(probs)

    def reward_fn(prompts, prompt_mask, responses, response_mask):
        k = prompts[:, -1] - first_prompt
        a = responses[:, 0] - first_action
        ok = (a >= 0) & (a < num_actions) & (k >= 0) & (k < num_prompts) & (response_mask[:, 0] > 0)
        r = jnp.asarray(rewards)[jnp.clip(k, 0, num_prompts - 1), jnp.clip(a, 0, num_actions - 1)]
        return jnp.where(ok, r, 0.0)

    label = coverage_label(coverage)
    return _tabular_task(name or f"bandit-{label}", vocab, np.arange(first_prompt, first_action, dtype=np.int32)[:, None],
                         1, reward_fn, table, (EOS_ID,) + tuple(range(first_prompt, first_action)),
                         f"contextual bandit, tabular; pi_ref(optimal) = {label}, mode = second best")


# --------------------------------------------------------------------------------------------
# Chain


def chain_reference_table(vocab_size: int, start: int, chain: np.ndarray, distractors: np.ndarray,
                          q: float, stop_mass: float) -> np.ndarray:
    """The bigram reference of `make_chain_task` as probabilities [V, V] (row = previous token).

    Row of context c_j (c_0 = start, c_j = chain[j-1]), whose right next token t_j is chain[j]
    (j < L) or EOS (j = L): t_j gets q; for j < L, EOS gets stop_mass * (1 - q) and every other
    response token (chain or distractor) an equal share of (1 - stop_mass)(1 - q); for j = L every
    non-EOS response token an equal share of 1 - q. Distractor rows: EOS stop_mass, the rest
    equally. Other rows (pad, EOS) are never a context and are left uniform.
    """
    body = np.concatenate([chain, distractors])  # the response tokens besides EOS
    probs = np.full((vocab_size, vocab_size), 1.0 / vocab_size)
    contexts = np.concatenate([[start], chain])
    targets = np.concatenate([chain, [EOS_ID]])
    for c, t in zip(contexts, targets):
        probs[c] = 0.0
        others = body[body != t]
        if t == EOS_ID:
            probs[c, others] = (1.0 - q) / len(others)
        else:
            probs[c, EOS_ID] = stop_mass * (1.0 - q)
            probs[c, others] = (1.0 - stop_mass) * (1.0 - q) / len(others)
        probs[c, t] = q
    for d in distractors:
        probs[d] = 0.0
        probs[d, EOS_ID] = stop_mass
        probs[d, body] = (1.0 - stop_mass) / len(body)
    return probs


def _log(probs: np.ndarray) -> np.ndarray:
    """float32 log-probabilities, 0 where the probability is 0 (only suppressed columns, whose
    logit the model overrides): a finite table, which an optimiser's weight decay cannot turn
    into NaN."""
    return np.where(probs > 0, np.log(np.where(probs > 0, probs, 1.0)), 0.0).astype(np.float32)


def make_chain_task(*, coverage: float, length: int = 3, num_distractors: int = 2, stop_mass: float = 0.5,
                    reward_scale: float = 4.0, name: str | None = None) -> Task:
    """A chain: one prompt, the optimal response is L specific tokens then EOS.

    Tokens: pad 0, EOS 1, the prompt token 2 (suppressed), chain tokens 3 .. L+2, distractors
    L+3 .. L+D+2. max_new_tokens = L + 1. Optimal response y* = (3, 4, ..., L+2, EOS).

    Reward (times ``reward_scale``), as hard-explore: the matched prefix of y* over L + 1,
    r(y) = max{k : y_<k = y*_<k} / (L + 1): 0, 1/(L+1), ..., 1. Dense along the chain: each
    right step earns 1/(L+1), so a method can climb it step by step; coverage sets how rarely
    the reference takes each step.

    Reference: the tabular bigram ``chain_reference_table``: from each chain position the right
    next token has probability q = coverage^(1/(L+1)), so

        pi_ref(y*) = prod_{j=0..L} pi_ref(y*_j | y*_(j-1)) = q^(L+1) = coverage   (exactly);

    the rest goes to stopping early (EOS, ``stop_mass`` of it) and to the other response tokens
    (a wrong step ends the credit). Chain tokens are distinct, so each row of the table is one
    step of the chain. The policy is a bigram table too (``TabularPolicy``): pi* ∝ pi_ref
    exp(r / beta) depends on whether the whole prefix is right, which a bigram sees only
    through the previous token -- close to, not exactly in, the class (see models/tabular.py).
    """
    _check_probability("coverage", coverage)
    _check_probability("stop_mass", stop_mass, low_open=False)
    if length < 1 or num_distractors < 1:
        raise ValueError(f"need length >= 1 and num_distractors >= 1; got {length}, {num_distractors}")
    start = 2
    chain = np.arange(3, 3 + length, dtype=np.int32)
    distractors = np.arange(3 + length, 3 + length + num_distractors, dtype=np.int32)
    vocab = 3 + length + num_distractors
    q = coverage ** (1.0 / (length + 1))
    probs = chain_reference_table(vocab, start, chain, distractors, q, stop_mass)
    target = chain[None, :]

    def reward_fn(prompts, prompt_mask, responses, response_mask):
        b = responses.shape[0]
        want = jnp.broadcast_to(jnp.asarray(target), (b, length))
        return reward_scale * prefix_match_reward(responses, response_mask, want,
                                                  jnp.full((b,), length), EOS_ID)

    label = coverage_label(coverage)
    return _tabular_task(name or f"chain-{label}", vocab, np.array([[start]], np.int32), length + 1, reward_fn,
                         _log(probs), (start,), f"{length}-token chain, tabular bigram; pi_ref(optimal) = {label}")


def make_chain_transformer_task(*, coverage: float, name: str | None = None,
                                reference_steps: int = 300, **chain_options) -> Task:
    """`make_chain_task` with the tiny Transformer policy (``tiny_model_config``) instead of the
    table. Its reference is fine-tuned (``reference_steps`` Adam steps) on demonstrations sampled
    from the tabular chain reference by the sampler, so it imitates that reference: its
    pi_ref(y*) is near ``coverage`` but measured (``exact_eval``'s p_optimal of the reference),
    not set. The reward, prompts and suppressed ids are the tabular task's."""
    from xpo_jax import sampling

    tabular = make_chain_task(coverage=coverage, **chain_options)
    table_params = tabular.reference_params
    policy = tabular.make_model()
    prompts, prompt_mask, n = tabular.prompts, tabular.prompt_mask, tabular.max_new_tokens

    def demonstrations(key, batch_size):
        k_prompt, k_sample = jax.random.split(key)
        p, pm = pick_prompts(k_prompt, prompts, prompt_mask, batch_size)
        out = sampling.sample(policy.apply, table_params, p, pm, k_sample, max_new_tokens=n,
                              eos_id=EOS_ID, pad_id=PAD_ID)
        return p, pm, out.tokens, out.mask

    label = coverage_label(coverage)
    return dataclasses.replace(
        tabular,
        name=name or f"chain-transformer-{label}",
        model_class=Transformer,
        reference_params=None,
        demonstrations=demonstrations,
        reference_steps=reference_steps,
        description=f"chain, Transformer; reference fine-tuned on the tabular chain-{label}",
    )
