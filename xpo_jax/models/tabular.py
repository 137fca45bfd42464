"""A tabular policy: a softmax over a table of logits indexed by the previous token (no network).

    pi(y_t | x, y_<t) = softmax(table[c_t])[y_t],   c_t = the last real token before y_t

The context c_t is the last token of the prompt for the first response token and the previous
response token after that: a bigram (first-order Markov) model over tokens. Parameters:
{"logits": table [V, V] float32}, row = context token, column = next token.

What the table means:
  one-step tasks (single-token prompts, one response token): row x is exactly pi(. | x), so the
    policy class is every policy over (prompt, action), with no function approximation --
    the setting in which XPO's and online DPO's theory can be checked directly;
  multi-token responses: a Markov chain. pi(y | x) = prod_t table-softmax[y_(t-1), y_t] (y_(-1) =
    the prompt's last token), e.g. the probability of a chain of distinct tokens is the product
    of one entry per row. The class is the bigram policies: a policy whose next token depends on
    more than the previous token (e.g. on whether the whole prefix so far was right) is outside
    it, so in general pi* ∝ pi_ref exp(r / beta) is only approximately representable.

Same module interface as `Transformer`, so the sampler (`init_cache`, `prefill`, `decode`), the
round (`hidden`, `head`) and exact evaluation (`__call__`) use it unchanged. Its `config` is a
`ModelConfig` of which only `vocab_size`, `max_seq_len`, `suppress_ids` and `init_std` are read:
suppressed ids get `SUPPRESSED_LOGIT` exactly as in `Transformer._logits`, and the sampler reads
the vocabulary and length limit from it. The "hidden state" is the context token id [B, T]
(int32) and the "cache" is the context of the next step, [B] int32.

Masks: a position whose mask is 0 is skipped (as the sampler treats zeros in a prompt), so the
context is the last *real* token at or before a position; left padding never becomes a context.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from xpo_jax.models.transformer import ModelConfig, suppress

Array = jax.Array


def context_tokens(tokens: Array, mask: Array) -> Array:
    """[B, T] int32: the last real token at or before each position (the table row that predicts
    the next token); positions before the first real token get the pad-row 0 (never read)."""
    real = mask.astype(bool)
    idx = jnp.where(real, jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :], -1)
    idx = jax.lax.cummax(idx, axis=1)
    ctx = jnp.take_along_axis(tokens.astype(jnp.int32), jnp.maximum(idx, 0), axis=1)
    return jnp.where(idx >= 0, ctx, 0)


class TabularPolicy(nn.Module):
    """Softmax over a [V, V] logit table indexed by the previous token (module docstring)."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.logits = self.param("logits", nn.initializers.normal(c.init_std),
                                 (c.vocab_size, c.vocab_size), jnp.float32)

    def _check_len(self, n: int, what: str):
        if n > self.config.max_seq_len:
            raise ValueError(f"{what} of {n} exceeds the model's max_seq_len {self.config.max_seq_len}")

    def head(self, h: Array) -> Array:
        """Context ids [...] -> float32 logits [..., V]: the table's rows, suppressed ids set to
        SUPPRESSED_LOGIT (the only place logits are made)."""
        return suppress(self.logits[h], self.config)

    def hidden(self, tokens: Array, mask: Array) -> Array:
        """The "hidden state" of each position: its context token id, [B, T] int32."""
        self._check_len(tokens.shape[1], "a sequence")
        return context_tokens(tokens, mask)

    def __call__(self, tokens: Array, mask: Array) -> Array:
        """tokens int32 [B, T], mask [B, T] -> logits [B, T, V] float32 (position t predicts t+1)."""
        return self.head(self.hidden(tokens, mask))

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> Array:
        """The context of the next step, [B] int32 (reads no parameters; `dtype` is ignored)."""
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        self._check_len(max_len, "a cache")
        return jnp.zeros((batch_size,), jnp.int32)

    def prefill(self, tokens: Array, mask: Array, cache: Array):
        """A left-padded prompt [B, P] -> (logits [B, V] of the first new token, cache)."""
        ctx = context_tokens(tokens, mask)[:, -1]
        return self.head(ctx), ctx

    def decode(self, tokens: Array, cache: Array):
        """One token per row, tokens [B] -> (logits [B, V] of the next token, cache)."""
        ctx = tokens.astype(jnp.int32)
        return self.head(ctx), ctx


def init_tabular_params(config: ModelConfig, key: Array) -> dict:
    """Random parameters of `TabularPolicy(config)`: logits ~ N(0, init_std^2)."""
    config.validate()
    return TabularPolicy(config).init(key, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))["params"]
