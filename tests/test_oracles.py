"""Tests for xpo_jax.oracles."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xpo_jax import oracles

EOS, PAD = 1, 0


def first_token_reward(prompts, prompt_mask, responses, response_mask):
    """r = value of the first response token (a reward we can set by hand)."""
    return responses[:, 0].astype(jnp.float32)


def batch(y, yt, y_mask=None, yt_mask=None, prompts=None):
    y, yt = jnp.asarray(y, jnp.int32), jnp.asarray(yt, jnp.int32)
    y_mask = jnp.ones_like(y) if y_mask is None else jnp.asarray(y_mask, jnp.int32)
    yt_mask = jnp.ones_like(yt) if yt_mask is None else jnp.asarray(yt_mask, jnp.int32)
    if prompts is None:
        prompts = jnp.full((y.shape[0], 2), 5, jnp.int32)
    prompts = jnp.asarray(prompts, jnp.int32)
    return prompts, jnp.ones_like(prompts), y, y_mask, yt, yt_mask


def test_deterministic_ties_go_to_y():
    oracle = oracles.reward_fn_oracle(first_token_reward, eos_id=EOS)
    args = batch([[3, EOS], [2, EOS], [4, EOS]], [[3, EOS], [4, EOS], [2, EOS]])
    j = oracle(jax.random.key(0), *args)
    np.testing.assert_array_equal(j.y_wins, [True, False, True])
    np.testing.assert_allclose(j.scores_y, [3, 2, 4])
    np.testing.assert_allclose(j.scores_ytilde, [3, 4, 2])
    np.testing.assert_allclose(j.valid, [1, 1, 1])
    assert j.y_wins.dtype == jnp.bool_ and j.scores_y.dtype == jnp.float32
    assert j.valid.dtype == jnp.float32


def test_bradley_terry_win_rate_matches_sigmoid_of_gap():
    # n pairs per reward gap; y's first token sets r(y), y~'s sets r(y~).
    n = 20_000
    gaps = [(2, 2), (3, 2), (2, 4), (6, 2)]  # gaps 0, 1, -2, 4
    y = jnp.repeat(jnp.asarray([[a, EOS] for a, _ in gaps]), n, axis=0)
    yt = jnp.repeat(jnp.asarray([[b, EOS] for _, b in gaps]), n, axis=0)
    oracle = jax.jit(oracles.reward_fn_oracle(first_token_reward, eos_id=EOS, bradley_terry=True))
    wins = np.asarray(oracle(jax.random.key(1), *batch(y, yt)).y_wins).reshape(len(gaps), n)
    for (a, b), w in zip(gaps, wins):
        p = 1.0 / (1.0 + math.exp(-(a - b)))
        z = (w.sum() - n * p) / math.sqrt(n * p * (1 - p))
        # |z| < 4.5 fails by chance with probability ~7e-6 per gap under a correct sampler.
        assert abs(z) < 4.5, (a - b, w.mean(), p, z)


def test_bradley_terry_uses_the_key():
    oracle = oracles.reward_fn_oracle(first_token_reward, eos_id=EOS, bradley_terry=True)
    args = batch(jnp.full((256, 2), 3), jnp.full((256, 2), 3))
    a = oracle(jax.random.key(0), *args).y_wins
    b = oracle(jax.random.key(0), *args).y_wins
    c = oracle(jax.random.key(1), *args).y_wins
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_missing_eos_penalty_judges_the_response_only():
    # Both prompts contain EOS; TRL's `eos in prompt+completion` would not penalise y.
    prompts = [[EOS, 5], [EOS, 5]]
    y = [[6, 6, 6], [6, EOS, PAD]]  # row 0 never stops; row 1 stops
    y_mask = [[1, 1, 1], [1, 1, 0]]
    yt = [[2, EOS, PAD], [2, 3, EOS]]
    yt_mask = [[1, 1, 0], [1, 1, 1]]
    oracle = oracles.reward_fn_oracle(first_token_reward, eos_id=EOS, missing_eos_penalty=10.0)
    j = oracle(jax.random.key(0), *batch(y, yt, y_mask, yt_mask, prompts))
    np.testing.assert_allclose(j.scores_y, [6 - 10, 6])
    np.testing.assert_allclose(j.scores_ytilde, [2, 2])
    np.testing.assert_array_equal(j.y_wins, [False, True])


def test_eos_under_mask_zero_does_not_count():
    # An EOS token sitting in the padded tail (mask 0) is not part of the response.
    y, y_mask = [[6, 6, EOS]], [[1, 1, 0]]
    oracle = oracles.reward_fn_oracle(first_token_reward, eos_id=EOS, missing_eos_penalty=1.5)
    j = oracle(jax.random.key(0), *batch(y, [[2, EOS, PAD]], y_mask, [[1, 1, 0]]))
    np.testing.assert_allclose(j.scores_y, [6 - 1.5])
    np.testing.assert_allclose(j.scores_ytilde, [2])


def test_mask_identical():
    y = [[4, 3, EOS, PAD], [4, 3, EOS, PAD], [4, 3, EOS, PAD], [4, 3, 2, EOS]]
    y_mask = [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    yt = [[4, 3, EOS, 7], [4, 2, EOS, PAD], [4, 3, EOS, EOS], [4, 3, 2, EOS]]
    yt_mask = [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    # row 0: same under mask, different padding -> identical; row 1: a token differs;
    # row 2: different lengths; row 3: identical.
    args = batch(y, yt, y_mask, yt_mask)
    j = oracles.reward_fn_oracle(first_token_reward, eos_id=EOS, mask_identical=True)(
        jax.random.key(0), *args
    )
    np.testing.assert_allclose(j.valid, [0, 1, 1, 0])
    j = oracles.reward_fn_oracle(first_token_reward, eos_id=EOS)(jax.random.key(0), *args)
    np.testing.assert_allclose(j.valid, [1, 1, 1, 1])


def test_reward_fn_sees_prompt_and_response():
    def reward(prompts, prompt_mask, responses, response_mask):
        # last prompt token + number of response tokens
        return (prompts[:, -1] + response_mask.sum(-1)).astype(jnp.float32)

    args = batch([[2, EOS, PAD]], [[2, 2, EOS]], [[1, 1, 0]], [[1, 1, 1]], prompts=[[PAD, 7]])
    j = oracles.reward_fn_oracle(reward, eos_id=EOS)(jax.random.key(0), *args)
    np.testing.assert_allclose(j.scores_y, [9])
    np.testing.assert_allclose(j.scores_ytilde, [10])
    assert not bool(j.y_wins[0])


def test_oracle_under_jit_as_argument_and_closure():
    oracle = oracles.reward_fn_oracle(
        first_token_reward, eos_id=EOS, missing_eos_penalty=0.5, mask_identical=True
    )
    args = batch([[3, EOS], [2, 2]], [[3, EOS], [2, EOS]])
    eager = oracle(jax.random.key(0), *args)
    as_arg = jax.jit(lambda o, k, *a: o(k, *a))(oracle, jax.random.key(0), *args)
    closed = jax.jit(lambda k, *a: oracle(k, *a))(jax.random.key(0), *args)
    for out in (as_arg, closed):
        for a, b in zip(eager, out):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(eager.scores_y, [3, 1.5])
    np.testing.assert_array_equal(eager.y_wins, [True, False])
    np.testing.assert_allclose(eager.valid, [0, 1])


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(eos_id=1, missing_eos_penalty=-1.0), ValueError, "-1.0"),
        (dict(eos_id=1, missing_eos_penalty=float("nan")), ValueError, "nan"),
        (dict(eos_id=1, missing_eos_penalty="big"), TypeError, "'big'"),
        (dict(eos_id=-3), ValueError, "-3"),
        (dict(eos_id=1.5), ValueError, "1.5"),
        (dict(eos_id=1, bradley_terry="yes"), TypeError, "'yes'"),
        (dict(eos_id=1, mask_identical=1), TypeError, "1"),
    ],
)
def test_bad_options_raise_naming_the_value(kwargs, error, words):
    with pytest.raises(error, match=words):
        oracles.reward_fn_oracle(first_token_reward, **kwargs)


def test_negative_penalty_message_says_why():
    with pytest.raises(ValueError, match=">= 0.*subtracted"):
        oracles.reward_model_oracle(lambda v, t, m: t[:, 0], {}, eos_id=1, missing_eos_penalty=-2)


def test_reward_model_oracle_with_a_fake_model_stacks_pairs():
    # A stand-in reward model: last masked-in token of concat(prompt, response). Checks the
    # layout (prompt then response, one 2B batch) without needing the transformer.
    def apply_fn(variables, tokens, mask):
        assert tokens.shape[0] == 2 * 3
        last = mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
        return variables["params"]["w"] * jnp.take_along_axis(tokens, last[:, None], 1)[:, 0]

    y = [[3, 4, EOS], [5, PAD, PAD], [2, EOS, PAD]]
    y_mask = [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    yt = [[6, PAD, PAD], [5, 6, 7], [2, 3, 4]]
    yt_mask = [[1, 0, 0], [1, 1, 1], [1, 1, 1]]
    params = {"w": jnp.float32(2.0)}
    oracle = oracles.reward_model_oracle(apply_fn, params, eos_id=EOS)
    j = oracle(jax.random.key(0), *batch(y, yt, y_mask, yt_mask))
    np.testing.assert_allclose(j.scores_y, [2 * EOS, 2 * 5, 2 * EOS])
    np.testing.assert_allclose(j.scores_ytilde, [2 * 6, 2 * 7, 2 * 4])
    # params are the oracle's pytree leaves
    assert jax.tree_util.tree_leaves(oracle) == [params["w"]]


def test_reward_model_oracle_matches_direct_apply_and_reads_the_last_real_token():
    from xpo_jax.models.transformer import RewardModel, get_config, init_reward_params

    config = get_config("test", vocab_size=16, max_seq_len=16)
    rm = RewardModel(config)
    params = init_reward_params(config, jax.random.key(0))
    # Make the scores far from zero so differences are visible.
    params = jax.tree_util.tree_map(lambda p: p * 20.0 if p.ndim == 2 else p, params)
    prompts = jnp.asarray([[PAD, 4, 5], [6, 7, 8], [PAD, PAD, 9]], jnp.int32)
    prompt_mask = (prompts != PAD).astype(jnp.int32)
    y = jnp.asarray([[3, EOS, PAD, PAD], [2, 2, 2, 2], [EOS, PAD, PAD, PAD]], jnp.int32)
    y_mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], jnp.int32)
    yt = jnp.asarray([[3, 3, EOS, PAD], [10, EOS, PAD, PAD], [11, 12, EOS, PAD]], jnp.int32)
    yt_mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]], jnp.int32)
    oracle = oracles.reward_model_oracle(rm.apply, params, eos_id=EOS, missing_eos_penalty=0.0)
    judge = jax.jit(lambda o, *a: o(*a))  # the oracle (with its params) as a traced argument
    j = judge(oracle, jax.random.key(0), prompts, prompt_mask, y, y_mask, yt, yt_mask)

    @jax.jit
    def direct(resp, mask):
        return rm.apply(
            {"params": params},
            jnp.concatenate([prompts, resp], 1),
            jnp.concatenate([prompt_mask, mask], 1),
        )

    np.testing.assert_allclose(j.scores_y, direct(y, y_mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(j.scores_ytilde, direct(yt, yt_mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(j.y_wins, np.asarray(j.scores_y) >= np.asarray(j.scores_ytilde))
    # The score is read at the last real token: extra right padding (any token under mask 0)
    # changes nothing, while changing that token does.
    pad_cols = jnp.full((3, 2), 13, jnp.int32)
    j_padded = judge(
        oracle, jax.random.key(0), prompts, prompt_mask,
        jnp.concatenate([y, pad_cols], 1), jnp.pad(y_mask, ((0, 0), (0, 2))),
        jnp.concatenate([yt, pad_cols], 1), jnp.pad(yt_mask, ((0, 0), (0, 2))),
    )
    np.testing.assert_allclose(j_padded.scores_y, j.scores_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(j_padded.scores_ytilde, j.scores_ytilde, rtol=1e-5, atol=1e-5)
    y_changed = y.at[0, 1].set(4)  # row 0's last real token (was EOS)
    j_changed = judge(oracle, jax.random.key(0), prompts, prompt_mask, y_changed, y_mask, yt, yt_mask)
    assert abs(float(j_changed.scores_y[0]) - float(j.scores_y[0])) > 1e-4
