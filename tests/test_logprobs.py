import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xpo_jax.logprobs import (
    completion_logprobs,
    has_eos,
    response_mask,
    token_logprobs,
)


def np_logsoftmax(x):
    x = np.float64(x)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def make(seed, B=3, T=37, V=50, scale=5.0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(0, scale, (B, T, V))).astype(np.float32)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    return logits, tokens


@pytest.mark.parametrize("chunk", [4, 10, 37, 128])
def test_token_logprobs_match_float64(chunk):
    logits, tokens = make(0)
    got = np.asarray(jax.jit(lambda l, t: token_logprobs(l, t, chunk_size=chunk))(logits, tokens))
    want = np.take_along_axis(np_logsoftmax(logits), tokens[..., None], -1)[..., 0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_bf16_logits_upcast_per_chunk():
    logits, tokens = make(1)
    lb = jnp.asarray(logits, jnp.bfloat16)
    got = token_logprobs(lb, tokens, chunk_size=8)
    want = np.take_along_axis(np_logsoftmax(np.asarray(lb.astype(jnp.float32))), tokens[..., None], -1)[..., 0]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_chunked_gradient_equals_naive():
    logits, tokens = make(2, T=21)
    w = np.random.default_rng(3).normal(size=tokens.shape).astype(np.float32)

    def naive(l):
        lp = jnp.take_along_axis(jax.nn.log_softmax(l, -1), tokens[..., None], -1)[..., 0]
        return (lp * w).sum()

    def chunked(l):
        return (token_logprobs(l, tokens, chunk_size=4) * w).sum()

    np.testing.assert_allclose(jax.grad(chunked)(logits), jax.grad(naive)(logits), rtol=1e-5, atol=1e-6)


def test_response_mask_keeps_eos_and_masks_after():
    eos, pad = 2, 0
    toks = np.array(
        [
            [5, 6, 2, 0, 0],  # EOS at 2, right-padded
            [5, 2, 7, 2, 9],  # garbage after the first EOS is masked
            [5, 6, 7, 8, 9],  # no EOS: all kept
            [2, 0, 0, 0, 0],  # immediate EOS
            [5, 6, 0, 0, 0],  # cut without EOS, right-padded
        ]
    )
    want = np.array(
        [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    )
    np.testing.assert_array_equal(response_mask(toks, eos, pad), want)
    # pad == eos (a common convention): the first EOS ends the response.
    np.testing.assert_array_equal(response_mask(np.array([[5, 2, 2, 2]]), 2, 2), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(has_eos(toks, want, eos), [True, True, False, True, False])
    # EOS outside the mask does not count.
    assert not bool(has_eos(np.array([[5, 2]]), np.array([[1, 0]]), 2)[0])


def test_sequence_and_completion_logprobs_left_and_right_padding():
    """Right-padded responses after a (left-padded, fixed-width) prompt: only response tokens under
    the mask count, read from the logits one position earlier. The prompt's padding does not enter
    here (the model's positions handle it; tests/test_transformer.py checks that)."""
    rng = np.random.default_rng(4)
    B, P, N, V = 2, 4, 5, 11
    logits = rng.normal(0, 2, (B, P + N, V)).astype(np.float32)
    completion = np.array([[6, 7, 2, 0, 0], [6, 2, 0, 0, 0]])
    cmask = response_mask(completion, eos_id=2, pad_id=0)
    lp_tok, lp_seq = completion_logprobs(logits, completion, cmask)
    ls = np_logsoftmax(logits)
    for b in range(B):
        want = sum(ls[b, P - 1 + t, completion[b, t]] for t in range(N) if cmask[b, t])
        np.testing.assert_allclose(lp_seq[b], want, rtol=1e-6)
    assert np.all(np.asarray(lp_tok)[np.asarray(cmask) == 0] == 0)


def test_bad_shapes():
    logits, tokens = make(5)
    with pytest.raises(AssertionError):
        token_logprobs(logits, tokens[:, :-1])
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        token_logprobs(logits, tokens, chunk_size=0)
    with pytest.raises(ValueError, match="need a prompt"):
        completion_logprobs(logits[:, :5], tokens[:, :5], np.ones((3, 5)))
