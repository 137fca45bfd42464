"""The built-in tasks ("hard-explore", "copy") and the reward pieces they share.

- "hard-explore": the target is the prompt reversed, then EOS; reward = the number of target
  tokens matched as a prefix (0..4 by default). The demonstrations that train pi_ref know the
  first zero, one or two target tokens and write a filler token for the rest, so pi_ref puts most
  of its mass on mediocre responses and about 1e-4 on the optimal one: finding it takes
  exploration.
- "copy": the target is the prompt itself, then EOS; reward = fraction of target positions
  matched. Demonstrations are noisy copies, so pi_ref already finds the optimum often; a sanity
  task on which every method should succeed.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from xpo_jax.tasks.base import Task

Array = jax.Array

# Reward pieces shared by the built-in tasks


def left_align(prompts: Array, prompt_mask: Array) -> tuple[Array, Array]:
    """Move each row's real tokens to the front: (content [B, P] padded with -1, lengths [B])."""
    real = prompt_mask > 0
    # A stable argsort on "is padding" puts the real tokens first, in their original order.
    order = jnp.argsort(~real, axis=1, stable=True)
    content = jnp.take_along_axis(jnp.where(real, prompts, -1), order, axis=1)
    return content, real.sum(axis=1)


def target_with_eos(target: Array, length: Array, width: int, eos_id: int) -> Array:
    """[B, width]: target[:, :length] then EOS at ``length``, then -1 (matches no token)."""
    cols = jnp.arange(width)[None, :]
    padded = jnp.pad(target, ((0, 0), (0, max(0, width - target.shape[1]))), constant_values=-1)
    padded = padded[:, :width]
    return jnp.where(cols < length[:, None], padded, jnp.where(cols == length[:, None], eos_id, -1))


def positional_match_reward(
    responses: Array, response_mask: Array, target: Array, length: Array, eos_id: int
) -> Array:
    """(1 / (L+1)) sum_{t <= L} [y_t = (target, EOS)_t]: fraction of the L+1 positions right."""
    want = target_with_eos(target, length, responses.shape[1], eos_id)
    hit = (responses == want) & (response_mask > 0)
    return hit.sum(axis=1) / (length + 1.0)


def prefix_match_reward(
    responses: Array, response_mask: Array, target: Array, length: Array, eos_id: int
) -> Array:
    """(1 / (L+1)) max{k : y_<k = (target, EOS)_<k}: the matched prefix, as a fraction."""
    want = target_with_eos(target, length, responses.shape[1], eos_id)
    hit = (responses == want) & (response_mask > 0)
    prefix = jnp.cumprod(hit.astype(jnp.int32), axis=1).sum(axis=1)
    return prefix / (length + 1.0)


# Built-in tasks

PAD_ID, EOS_ID = 0, 1
VOCAB_SIZE = 7  # pad, EOS and 5 content tokens 2..6
FIRST_CONTENT = 2


def _content_tokens(key: Array, shape: tuple) -> Array:
    return jax.random.randint(key, shape, FIRST_CONTENT, VOCAB_SIZE)


def pick_prompts(key: Array, prompts: np.ndarray, prompt_mask: np.ndarray, batch_size: int):
    idx = jax.random.randint(key, (batch_size,), 0, prompts.shape[0])
    return jnp.asarray(prompts)[idx], jnp.asarray(prompt_mask)[idx]


def _finish(body: Array, length: Array, width: int) -> tuple[Array, Array]:
    """Right-padded response of ``body[:, :length]`` then EOS, and its mask."""
    cols = jnp.arange(width)[None, :]
    body = jnp.pad(body, ((0, 0), (0, width - body.shape[1])), constant_values=PAD_ID)
    tokens = jnp.where(cols < length[:, None], body, jnp.where(cols == length[:, None], EOS_ID, PAD_ID))
    return tokens.astype(jnp.int32), (cols <= length[:, None]).astype(jnp.int32)


def reverse_target(prompts: Array, prompt_mask: Array) -> tuple[Array, Array]:
    """The prompt's real tokens reversed, left-aligned, and their number.

    Reversing a left-padded row puts its real tokens, reversed, at the front."""
    content = jnp.where(prompt_mask > 0, prompts, -1)[:, ::-1]
    return content, (prompt_mask > 0).sum(axis=1)


FILLER_ID = FIRST_CONTENT  # hard-explore: the demonstrators' "don't know" token, never a target


def _builtin_task(name, prompts, prompt_mask, max_new_tokens, reward_fn, demonstrations, description) -> Task:
    """A Task over the built-in token layout (pad 0, EOS 1, content 2..6)."""
    return Task(name=name, vocab_size=VOCAB_SIZE, eos_id=EOS_ID, pad_id=PAD_ID, prompts=prompts,
                prompt_mask=prompt_mask, max_new_tokens=max_new_tokens, reward_fn=reward_fn,
                demonstrations=demonstrations, description=description)


def make_hard_explore_task(
    *,
    name: str = "hard-explore",
    num_prompts: int = 8,
    prompt_len: int = 3,
    prefix_probs: tuple = (0.25, 0.5, 0.25),
    noise: float = 0.002,
    seed: int = 0,
    reward_scale: float = 4.0,
) -> Task:
    """The hard-exploration task (see the module docstring).

    Tokens: pad 0, EOS 1, a filler token 2 and letters 3..6. Prompts: ``num_prompts`` distinct
    strings of ``prompt_len`` letters. Target: the prompt reversed, then EOS (L = prompt_len,
    N = L + 1). Reward: ``reward_scale`` times the matched prefix of (target, EOS) over L + 1;
    with the default scale 4 = L + 1 that is the number of matched tokens, 0, 1, ..., 4.

    Why the scale: the preference oracle is Bradley-Terry, P(y > y~) = sigmoid(r(y) - r(y~)), as in
    the XPO paper. With rewards in [0, 1] every preference is nearly a coin flip; with 0..4 a
    one-token improvement wins 73% of the time, and J_beta's optimum at beta = 0.1 puts 97% of its
    mass on the optimal response (J* = 2.885 against the reference's 1.022).

    Demonstrations: a demonstrator who knows the first k target tokens, k < L drawn with
    ``prefix_probs`` (len L), writes them, fills the rest with the filler token, then EOS; with
    probability ``noise`` each filler is replaced by a uniform letter. Demonstrations earn
    k / (L+1) and, without noise, are never optimal. pi_ref learns "after what I know, filler":
    most of its mass sits on mediocre responses, and the optimal one needs the L-th target
    token where pi_ref has only ever seen filler (pi_ref(optimal) < 1e-3).
    """
    if len(prefix_probs) != prompt_len or not math.isclose(sum(prefix_probs), 1.0):
        raise ValueError(
            f"prefix_probs must have prompt_len={prompt_len} entries summing to 1; "
            f"got {prefix_probs!r}"
        )
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must lie in [0, 1]; got {noise!r}")
    first_letter = FILLER_ID + 1
    n_letters = VOCAB_SIZE - first_letter
    if num_prompts > n_letters**prompt_len:
        raise ValueError(f"only {n_letters ** prompt_len} distinct prompts of length {prompt_len}")
    rng = np.random.default_rng(seed)
    codes = rng.choice(n_letters**prompt_len, size=num_prompts, replace=False)
    prompts = np.stack(
        [first_letter + (codes // n_letters**i) % n_letters for i in range(prompt_len)], axis=1
    ).astype(np.int32)
    prompt_mask = np.ones_like(prompts)
    # numpy, not jnp: building the task at import must not start JAX's backend (that would make
    # jax.distributed.initialize impossible afterwards).
    prefix_logits = np.log(np.asarray(prefix_probs, np.float32))

    def reward_fn(prompts, prompt_mask, responses, response_mask):
        target, length = reverse_target(prompts, prompt_mask)
        return reward_scale * prefix_match_reward(responses, response_mask, target, length, EOS_ID)

    def demonstrations(key, batch_size):
        k_prompt, k_prefix, k_noise, k_letter = jax.random.split(key, 4)
        p, pm = pick_prompts(k_prompt, prompts, prompt_mask, batch_size)
        target = reverse_target(p, pm)[0][:, :prompt_len]
        known = jax.random.categorical(k_prefix, prefix_logits, shape=(batch_size,))[:, None]
        shape = (batch_size, prompt_len)
        letters = jax.random.randint(k_letter, shape, first_letter, VOCAB_SIZE)
        filler = jnp.where(jax.random.bernoulli(k_noise, noise, shape), letters, FILLER_ID)
        body = jnp.where(jnp.arange(prompt_len)[None, :] < known, target, filler)
        tokens, mask = _finish(body, jnp.full((batch_size,), prompt_len), prompt_len + 1)
        return p, pm, tokens, mask

    return _builtin_task(name, prompts, prompt_mask, prompt_len + 1, reward_fn, demonstrations,
                         "reverse the prompt; pi_ref knows 1-2 tokens, optimum has prob < 1e-3")


def make_copy_task(
    *, name: str = "copy", num_prompts: int = 8, max_prompt_len: int = 3, noise: float = 0.3,
    seed: int = 1,
) -> Task:
    """The easy task: copy the prompt (1..max_prompt_len tokens, left-padded), then EOS.

    Reward: fraction of the L+1 target positions matched. Demonstrations: the target with each
    token replaced, with probability ``noise``, by a uniform content token.
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must lie in [0, 1]; got {noise!r}")
    n_content = VOCAB_SIZE - FIRST_CONTENT
    rng = np.random.default_rng(seed)
    seen, rows = set(), []
    while len(rows) < num_prompts:
        length = int(rng.integers(1, max_prompt_len + 1))
        row = tuple(int(t) for t in rng.integers(FIRST_CONTENT, VOCAB_SIZE, size=length))
        if row not in seen:
            seen.add(row)
            rows.append(row)
        if len(seen) >= sum(n_content**k for k in range(1, max_prompt_len + 1)):
            break
    prompts = np.full((len(rows), max_prompt_len), PAD_ID, np.int32)
    prompt_mask = np.zeros_like(prompts)
    for i, row in enumerate(rows):
        prompts[i, max_prompt_len - len(row):] = row
        prompt_mask[i, max_prompt_len - len(row):] = 1
    width = max_prompt_len + 1

    def reward_fn(prompts, prompt_mask, responses, response_mask):
        target, length = left_align(prompts, prompt_mask)
        return positional_match_reward(responses, response_mask, target, length, EOS_ID)

    def demonstrations(key, batch_size):
        k_prompt, k_noise, k_tok = jax.random.split(key, 3)
        p, pm = pick_prompts(k_prompt, prompts, prompt_mask, batch_size)
        target, length = left_align(p, pm)
        flip = jax.random.bernoulli(k_noise, noise, target.shape)
        body = jnp.where(flip, _content_tokens(k_tok, target.shape), target)
        tokens, mask = _finish(body, length, width)
        return p, pm, tokens, mask

    return _builtin_task(name, prompts, prompt_mask, width, reward_fn, demonstrations,
                         "copy the prompt; noisy demonstrations, pi_ref often optimal")
