"""The Task: a synthetic preference task with a JAX reward and exact evaluation by enumeration.

A task is everything an online-preference run needs besides the algorithm: a finite prompt set
(sampled uniformly), a pure JAX reward ``r(x, y)``, a tiny policy architecture, a way to build the
reference policy pi_ref (supervised fine-tuning on demonstrations), and an exact evaluation of a
policy pi against pi_ref:

    reward    = E_x E_{y ~ pi(.|x)} r(x, y)
    kl        = E_x KL(pi(.|x) || pi_ref(.|x)) = E_x sum_y pi(y|x) [log pi(y|x) - log pi_ref(y|x)]
    j_beta    = reward - beta * kl                      (the KL-regularised objective XPO optimises)
    p_optimal = E_x sum_{y in argmax_y r(x, y)} pi(y|x)
    j_star    = max_pi J_beta = E_x beta log sum_y pi_ref(y|x) exp(r(x, y) / beta)
                (attained by pi*(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta); the ceiling of j_beta)

"Exact" means every response is enumerated: with vocabulary V and at most N new tokens, a
response is either k < N non-EOS tokens followed by EOS, or N non-EOS tokens (cut at the length
limit). That is sum_{k<N} (V-1)^k + (V-1)^N responses, each with probability

    pi(y|x) = prod_{t < |y|} pi(y_t | x, y_<t)      (|y| includes the EOS when there is one)

and these sum to 1 for any model (the test checks it). Suppressed ids (``Task.suppressed_ids``:
the pad id and any the task adds) have probability exactly 0 under the model, so they are left
out of the enumeration (V-1 above is then the number of tokens neither EOS nor suppressed); the
rest still sum to 1. A task that suppresses EOS has only full-length responses.

Cost. A causal LM's distribution of response token j depends only on the tokens before it, so
one forward over each of the S = (V-1)^(N-1) full-length non-EOS strings gives every next-token
distribution any response needs; each of the M responses then gathers its log-probs from the
string that shares its prefix. The default task (V = 7, N = 4, 8 prompts) evaluates 8 x 216
sequences of 6 tokens per model instead of 8 x 1555 responses: ~0.05 s on 2 CPU cores.

Everything on a Task is pure JAX; the reference policy is built by `xpo_jax.tasks.reference`
(the explicit ``reference_params`` when the task has them, else a fine-tune on demonstrations).
The policy architecture is ``task.make_model()``: ``model_class(model_config)``, a `Transformer`
by default or a `TabularPolicy` (``xpo_jax.models.tabular``) for bandit-like tasks.

Writing your own task takes a few lines::

    def reward(prompts, prompt_mask, responses, response_mask):   # [B] float32, pure JAX
        return (responses[:, 0] == prompts[:, -1]).astype(jnp.float32)

    task = Task(name="echo-first", vocab_size=6, eos_id=1, pad_id=0,
                prompts=np.array([[2], [3], [4]]), prompt_mask=np.ones((3, 1)),
                max_new_tokens=3, reward_fn=reward)
    metrics = task.exact_eval(task.make_model().apply, params, ref_params, 0.1)

The built-in tasks are in `xpo_jax.tasks.builtin`.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from xpo_jax.models.transformer import ModelConfig, Transformer, get_config

Array = jax.Array

# reward_fn(prompts [B,P], prompt_mask [B,P], responses [B,N], response_mask [B,N]) -> [B] float32
RewardFn = Callable[[Array, Array, Array, Array], Array]
# demonstrations(key, batch_size) -> (prompts [B,P], prompt_mask, responses [B,N], response_mask)
DemoFn = Callable[[Array, int], tuple]

# More enumerated sequences than this (prompts x responses) and exact evaluation stops being
# cheap; the task is then too big for this module's purpose.
MAX_ENUMERATED = 2_000_000
# Sequences per forward pass in exact_eval; bounds activation memory for larger tasks.
EVAL_CHUNK = 16_384


def tiny_model_config(vocab_size: int, max_seq_len: int) -> ModelConfig:
    """The policy/reference architecture of the built-in tasks: the "test" preset (d_model 32,
    2 layers, 4 heads) with the task's vocabulary, so one online round compiles in seconds and
    runs in milliseconds on a CPU."""
    return get_config("test", vocab_size=vocab_size, max_seq_len=max_seq_len)


# --------------------------------------------------------------------------------------------
# Enumeration and exact log-probabilities


def response_alphabet(vocab_size: int, eos_id: int, suppress_ids=()) -> np.ndarray:
    """The tokens a response is made of besides EOS: neither EOS nor suppressed, ascending."""
    banned = set(int(i) for i in suppress_ids) | {eos_id}
    return np.array([t for t in range(vocab_size) if t not in banned], np.int32)


def enumerate_responses(
    vocab_size: int, eos_id: int, pad_id: int, max_new_tokens: int, suppress_ids=()
) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct response, as right-padded (tokens [M, N] int32, mask [M, N] int32).

    With A = ``response_alphabet`` (neither EOS nor in ``suppress_ids``): responses of k < N
    tokens are k tokens of A, then EOS, then pad (the canonical tail); responses of N tokens have
    no EOS. M = sum_{k<N} |A|^k + |A|^N, or |A|^N when EOS itself is suppressed.
    """
    n = max_new_tokens
    alphabet = response_alphabet(vocab_size, eos_id, suppress_ids)
    lengths = range(n + 1) if eos_id not in set(suppress_ids) else [n]
    count = sum(len(alphabet) ** k for k in lengths)
    if count > MAX_ENUMERATED:
        raise ValueError(
            f"{count} responses (vocab_size={vocab_size}, max_new_tokens={n}) is too many to "
            f"enumerate (limit {MAX_ENUMERATED}); use a smaller vocabulary or shorter responses"
        )
    tokens, masks = [], []
    for k in lengths:
        strings = list(itertools.product(alphabet, repeat=k))
        body = np.array(strings, np.int32).reshape(len(strings), k)
        tok = np.full((body.shape[0], n), pad_id, np.int32)
        tok[:, :k] = body
        mask = np.zeros((body.shape[0], n), np.int32)
        if k < n:
            tok[:, k] = eos_id
            mask[:, : k + 1] = 1
        else:
            mask[:] = 1
        tokens.append(tok)
        masks.append(mask)
    return np.concatenate(tokens), np.concatenate(masks)


def prefix_index(
    tokens: np.ndarray, mask: np.ndarray, vocab_size: int, eos_id: int, suppress_ids=()
) -> np.ndarray:
    """[M] for each enumerated response, the index (in ``itertools.product`` order over
    ``response_alphabet``) of the length N-1 string that starts with the response's first
    min(len, N-1) non-EOS tokens, completed with the first alphabet token. One forward over that
    string scores the response: the logits after its first j tokens are the distribution of the
    response's token j."""
    alphabet = response_alphabet(vocab_size, eos_id, suppress_ids)
    rank = np.zeros(vocab_size, np.int64)
    rank[alphabet] = np.arange(len(alphabet))
    n = tokens.shape[1]
    body = (mask > 0) & (tokens != eos_id)
    digits = np.where(body, rank[tokens], 0)[:, : n - 1]
    weights = len(alphabet) ** np.arange(n - 2, -1, -1, dtype=np.int64)
    return (digits @ weights).astype(np.int32)


# --------------------------------------------------------------------------------------------
# The Task interface


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A synthetic online-preference task (see the module docstring).

    Fields:
      name: registry name.
      vocab_size, eos_id, pad_id: token space of prompts and responses.
      prompts, prompt_mask: [K, P] the finite prompt set (left-padded, every row non-empty);
        training samples it uniformly and exact_eval averages over it uniformly.
      max_new_tokens: N, the response length limit.
      reward_fn: pure JAX ``(prompts, prompt_mask, responses, response_mask) -> [B] float32``.
      model_config: policy/reference architecture; default ``tiny_model_config``. Its
        ``suppress_ids`` is always replaced by the task's ``suppressed_ids``.
      model_class: the policy module, built as ``model_class(model_config)`` by ``make_model``:
        ``Transformer`` (default) or ``TabularPolicy``; any module with the same methods.
      demonstrations: optional pure JAX ``(key, batch_size) -> (prompts, prompt_mask, responses,
        response_mask)`` on which ``make_reference`` fine-tunes; without it (and without
        ``reference_params``) the reference is the randomly initialised model.
      reference_params: optional explicit reference parameters (the "params" collection of
        ``make_model()``, e.g. ``{"logits": table}`` for a tabular policy). ``make_reference``
        returns them instead of fine-tuning. Checked against the model's parameter shapes here.
      reference_steps, reference_batch_size, reference_learning_rate: the fine-tune (Adam).
      reference_cache_key: optional string that replaces the content hash of the task in the
        key of the on-disk reference cache (``xpo_jax.tasks.reference``); the PRNG key is still
        part of the key.
      suppress_ids: token ids the policy never generates, besides padding (e.g. prompt-only
        tokens). ``suppressed_ids`` = these plus ``pad_id`` (unless pad_id == eos_id); they go
        into ``model_config.suppress_ids``, so sampling, training log-probs and exact evaluation
        see one distribution, and exact evaluation leaves them out of its enumeration.
        Demonstrations must not contain them (their log-likelihood is ~ -1e9).
      description: one line for the CLI.

    Equality and hashing are by identity (eq=False), so a Task can be a static argument of
    ``jax.jit`` even though it holds numpy arrays.
    """

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int
    prompts: np.ndarray
    prompt_mask: np.ndarray
    max_new_tokens: int
    reward_fn: RewardFn
    model_config: Optional[ModelConfig] = None
    model_class: Callable[[ModelConfig], Any] = Transformer
    demonstrations: Optional[DemoFn] = None
    reference_params: Optional[Any] = None
    reference_steps: int = 300
    reference_batch_size: int = 64
    reference_learning_rate: float = 3e-3
    reference_cache_key: Optional[str] = None
    suppress_ids: tuple = ()
    description: str = ""

    def __post_init__(self):
        # Frozen dataclass: normalise fields with object.__setattr__.
        prompts = np.asarray(self.prompts)
        prompt_mask = np.asarray(self.prompt_mask)
        set_ = functools.partial(object.__setattr__, self)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task.name must be a non-empty string; got {self.name!r}")
        where = f"Task {self.name!r}"
        for field in ("vocab_size", "eos_id", "pad_id", "max_new_tokens"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{where}: {field} must be an int; got {v!r}")
        if self.vocab_size < 2:
            raise ValueError(f"{where}: vocab_size must be >= 2; got {self.vocab_size}")
        for field in ("eos_id", "pad_id"):
            v = getattr(self, field)
            if not 0 <= v < self.vocab_size:
                raise ValueError(f"{where}: {field}={v} is outside [0, {self.vocab_size})")
        if self.max_new_tokens < 1:
            raise ValueError(f"{where}: max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if prompts.ndim != 2 or prompts.shape[0] < 1 or prompts.shape[1] < 1:
            raise ValueError(f"{where}: prompts must be [K, P] with K, P >= 1; got {prompts.shape}")
        if not np.issubdtype(prompts.dtype, np.integer):
            raise ValueError(f"{where}: prompts must hold integer token ids; got {prompts.dtype}")
        if prompt_mask.shape != prompts.shape:
            raise ValueError(
                f"{where}: prompt_mask shape {prompt_mask.shape} != prompts shape {prompts.shape}"
            )
        if prompts.min() < 0 or prompts.max() >= self.vocab_size:
            raise ValueError(f"{where}: prompt token ids must lie in [0, {self.vocab_size})")
        real = prompt_mask > 0
        # Left padding: once a row's mask turns on it stays on, and the last column is real, so
        # the logits at column P-1 predict the first response token for every row.
        if np.any(real[:, :-1] & ~real[:, 1:]) or not real[:, -1].all():
            raise ValueError(f"{where}: prompts must be left-padded and non-empty")
        if not callable(self.reward_fn):
            raise ValueError(f"{where}: reward_fn must be callable; got {self.reward_fn!r}")
        if self.demonstrations is not None and not callable(self.demonstrations):
            raise ValueError(f"{where}: demonstrations must be callable or None")
        seq_len = prompts.shape[1] + self.max_new_tokens
        config = self.model_config
        if config is None:
            config = tiny_model_config(self.vocab_size, seq_len)
        if config.vocab_size != self.vocab_size:
            raise ValueError(
                f"{where}: model_config.vocab_size={config.vocab_size} != vocab_size="
                f"{self.vocab_size}"
            )
        if config.max_seq_len < seq_len:
            raise ValueError(
                f"{where}: model_config.max_seq_len={config.max_seq_len} < prompt length + "
                f"max_new_tokens = {seq_len}"
            )
        if self.reference_steps < 0 or self.reference_batch_size < 1:
            raise ValueError(f"{where}: reference_steps must be >= 0, reference_batch_size >= 1")
        if self.reference_cache_key is not None and not isinstance(self.reference_cache_key, str):
            raise ValueError(f"{where}: reference_cache_key must be a string or None")
        if not callable(self.model_class):
            raise ValueError(f"{where}: model_class must be callable; got {self.model_class!r}")
        suppress = tuple(self.suppress_ids)
        for i in suppress:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.vocab_size:
                raise ValueError(f"{where}: suppress_ids: {i!r} is not a token id in [0, {self.vocab_size})")
        set_("suppress_ids", tuple(int(i) for i in suppress))
        if not len(response_alphabet(self.vocab_size, self.eos_id, self.suppressed_ids)):
            raise ValueError(f"{where}: suppress_ids leave no response token besides EOS")
        set_("prompts", prompts.astype(np.int32))
        set_("prompt_mask", real.astype(np.int32))
        set_("model_config", dataclasses.replace(config, suppress_ids=self.suppressed_ids).validate())
        if self.reference_params is not None:
            set_("reference_params", self.checked_params(self.reference_params, where))

    # -- shapes ---------------------------------------------------------------------------

    @property
    def num_prompts(self) -> int:
        return self.prompts.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.prompts.shape[1]

    @property
    def suppressed_ids(self) -> tuple[int, ...]:
        """Token ids the policy never generates: ``suppress_ids`` plus ``pad_id`` (padding is
        never a token of a response; unless pad_id == eos_id, which must stay generable)."""
        ids = set(self.suppress_ids) | ({self.pad_id} if self.pad_id != self.eos_id else set())
        return tuple(sorted(ids))

    @functools.cached_property
    def responses(self) -> tuple[np.ndarray, np.ndarray]:
        """Every distinct response (tokens [M, N], mask [M, N]); see ``enumerate_responses``."""
        return enumerate_responses(self.vocab_size, self.eos_id, self.pad_id, self.max_new_tokens,
                                   self.suppressed_ids)

    @functools.cached_property
    def _prefixes(self) -> tuple[np.ndarray, np.ndarray]:
        """(strings [S, N-1]: every string of length N-1 over the response alphabet, index [M]
        into it)."""
        n = self.max_new_tokens
        ids = self.suppressed_ids
        alphabet = response_alphabet(self.vocab_size, self.eos_id, ids)
        strings = np.array(list(itertools.product(alphabet, repeat=n - 1)), np.int32)
        strings = strings.reshape(len(alphabet) ** (n - 1), n - 1)
        tokens, mask = self.responses
        return strings, prefix_index(tokens, mask, self.vocab_size, self.eos_id, ids)

    # -- the policy model -----------------------------------------------------------------

    def make_model(self, **overrides):
        """The policy (and reference) module: ``model_class(model_config)``, one object per task
        so jit caches keyed on its ``apply`` are shared by every caller. ``overrides`` replace
        ModelConfig fields that do not change the function (a run's dtype, remat, scan_layers)
        and give a new module; a policy that has no use for one (a table) ignores it."""
        if overrides:
            return self.model_class(dataclasses.replace(self.model_config, **overrides).validate())
        return self._model

    @functools.cached_property
    def _model(self):
        return self.model_class(self.model_config)

    def init_params(self, key: Array) -> Any:
        """Random parameters of ``make_model()`` (the "params" collection)."""
        dummy = jnp.zeros((1, 1), jnp.int32)
        return self.make_model().init(key, dummy, jnp.ones((1, 1), bool))["params"]

    def param_shapes(self) -> Any:
        """The model's parameters as ``jax.ShapeDtypeStruct`` leaves (nothing computed)."""
        return jax.eval_shape(self.init_params, jax.ShapeDtypeStruct((2,), jnp.uint32))

    def checked_params(self, params: Any, where: str) -> Any:
        """``params`` as host arrays of the model's dtypes, after checking that its tree and
        shapes are the model's; ValueError naming the first mismatch."""
        want = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_flatten_with_path(self.param_shapes())[0]}
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        got = {jax.tree_util.keystr(k): v for k, v in leaves}
        model = getattr(self.model_class, "__name__", str(self.model_class))
        for name in sorted(set(want) - set(got)):
            raise ValueError(f"{where}: reference_params lacks {name} {tuple(want[name].shape)} of "
                             f"the {model} model")
        for name in sorted(set(got) - set(want)):
            raise ValueError(f"{where}: reference_params has {name}, which the {model} model lacks")
        out = []
        for path, value in leaves:
            name = jax.tree_util.keystr(path)
            value = np.asarray(value)
            if value.shape != want[name].shape:
                raise ValueError(f"{where}: reference_params{name} has shape {value.shape}; the "
                                 f"{model} model expects {tuple(want[name].shape)}")
            out.append(value.astype(want[name].dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    # -- training-time pieces -------------------------------------------------------------

    def sample_prompts(self, key: Array, batch_size: int) -> tuple[Array, Array]:
        """``batch_size`` prompts drawn uniformly with replacement: ([B, P] int32, [B, P] int32).
        Pure and jittable (``batch_size`` static)."""
        idx = jax.random.randint(key, (batch_size,), 0, self.num_prompts)
        return jnp.asarray(self.prompts)[idx], jnp.asarray(self.prompt_mask)[idx]

    # -- exact evaluation -----------------------------------------------------------------

    def response_logprobs(self, apply_fn: Callable, params: Any) -> Array:
        """[K, M] log pi(y_m | x_k) for every prompt and every enumerated response
        (``self.responses``). Compiled once per (task, apply_fn)."""
        return _response_logprobs_jit(self, apply_fn, params)

    def exact_eval(
        self, apply_fn: Callable, params: Any, ref_params: Any, beta: Any
    ) -> dict[str, Array]:
        """Exact reward, KL(pi || pi_ref), j_beta = reward - beta * kl and p_optimal of the
        policy ``params`` (formulas in the module docstring) as float32 scalars.

        ``apply_fn`` is the model's apply (``Transformer(task.model_config).apply``); it and
        the task are static, so the evaluation compiles once per (task, apply_fn) whether
        called from Python or inside jit/vmap. ``beta`` may be traced.
        """
        return _exact_eval_jit(self, apply_fn, params, ref_params, beta)

    def _exact_eval(self, apply_fn, params, ref_params, beta):
        tokens, mask = (jnp.asarray(a) for a in self.responses)

        def per_prompt(prompt, prompt_mask):
            logp = self._prompt_logprobs(apply_fn, params, prompt, prompt_mask)
            logq = self._prompt_logprobs(apply_fn, ref_params, prompt, prompt_mask)
            m = tokens.shape[0]
            reward = self.reward_fn(
                jnp.broadcast_to(prompt, (m,) + prompt.shape),
                jnp.broadcast_to(prompt_mask, (m,) + prompt.shape),
                tokens,
                mask,
            ).astype(jnp.float32)
            prob = jnp.exp(logp)
            optimal = reward >= jnp.max(reward)  # every response attaining the maximum
            # max_pi J_beta = beta * log E_ref[exp(r / beta)], attained by pi* ∝ pi_ref exp(r/beta)
            j_star = beta * jax.nn.logsumexp(logq + reward / beta)
            return jnp.stack(
                [
                    jnp.sum(prob * reward),
                    jnp.sum(prob * (logp - logq)),
                    jnp.sum(jnp.where(optimal, prob, 0.0)),
                    j_star,
                ]
            )

        reward, kl, p_optimal, j_star = jnp.mean(self._map_prompts(per_prompt), axis=0)
        return dict(reward=reward, kl=kl, j_beta=reward - beta * kl, p_optimal=p_optimal, j_star=j_star)

    def _prompt_logprobs(self, apply_fn: Callable, params: Any, prompt: Array, prompt_mask: Array):
        """[M] log pi(y_m | x) for one prompt x [P], from a forward over the S = (V-1)^(N-1)
        full-length non-EOS strings only (not all M ~ (V-1)^N responses).

        A causal LM's logits after the first j response tokens depend on those tokens only, so
        the forward over a string s gives, at response step j, the next-token distribution of
        every response whose first j tokens agree with s. Response m is scored on the string
        ``prefix_index`` picked for it:  log pi(y_m|x) = sum_{j < |y_m|} lp[s(m), j, y_mj].
        """
        strings, index = self._prefixes
        tokens, mask = self.responses
        s, n, p = strings.shape[0], self.max_new_tokens, self.prompt_len
        seq = jnp.concatenate([jnp.broadcast_to(prompt, (s, p)), jnp.asarray(strings)], axis=1)
        seq_mask = jnp.concatenate(
            [jnp.broadcast_to(prompt_mask, (s, p)), jnp.ones(strings.shape, prompt_mask.dtype)],
            axis=1,
        )
        logits = apply_fn({"params": params}, seq.astype(jnp.int32), seq_mask)
        # Column p-1+j holds the distribution of response token j, j = 0..n-1.
        lp = jax.nn.log_softmax(logits[:, p - 1 : p - 1 + n].astype(jnp.float32), axis=-1)
        picked = lp[jnp.asarray(index)[:, None], jnp.arange(n)[None, :], jnp.asarray(tokens)]
        return jnp.sum(jnp.where(jnp.asarray(mask) > 0, picked, 0.0), axis=1)

    def _map_prompts(self, fn: Callable) -> Array:
        """Stack ``fn(prompt [P], prompt_mask [P])`` over the K prompts; several prompts per
        forward (vmap) up to about EVAL_CHUNK sequences, then a sequential loop (lax.map)."""
        strings, _ = self._prefixes
        m = self.responses[0].shape[0]
        if m * self.num_prompts > MAX_ENUMERATED:
            raise ValueError(
                f"task {self.name!r}: {self.num_prompts} prompts x {m} responses is too many "
                f"to enumerate (limit {MAX_ENUMERATED})"
            )
        return jax.lax.map(
            lambda xs: fn(*xs),
            (jnp.asarray(self.prompts), jnp.asarray(self.prompt_mask)),
            batch_size=max(1, min(self.num_prompts, EVAL_CHUNK // strings.shape[0])),
        )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _exact_eval_jit(task: Task, apply_fn: Callable, params, ref_params, beta):
    return task._exact_eval(apply_fn, params, ref_params, beta)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _response_logprobs_jit(task: Task, apply_fn: Callable, params):
    return task._map_prompts(lambda p, pm: task._prompt_logprobs(apply_fn, params, p, pm))
