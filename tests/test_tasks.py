"""Tests for xpo_jax.tasks: enumeration, exact evaluation, rewards, reference policies (explicit,
fine-tuned, cached on disk), suppressed ids, the policy model of a task, the coverage families."""
import dataclasses
import functools
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xpo_jax import logprobs, sampling, tasks
from xpo_jax.models.tabular import TabularPolicy
from xpo_jax.models.transformer import SUPPRESSED_LOGIT, Transformer, init_params
from xpo_jax.tasks import reference as reference_module

EOS, PAD = tasks.EOS_ID, tasks.PAD_ID


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """This module's reference cache: a fresh folder, never the user's ~/.cache."""
    path = str(tmp_path_factory.mktemp("xpo_jax_cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(reference_module.CACHE_ENV, path)
        yield path


@pytest.fixture(scope="module")
def hard():
    return tasks.get_task("hard-explore")


@pytest.fixture(scope="module")
def apply_fn(hard):
    # One model object for the whole module, so jit caches keyed on apply_fn are reused.
    return Transformer(hard.model_config).apply


@pytest.fixture(scope="module")
def ref_params(hard):
    return tasks.make_reference(hard, jax.random.key(0))


@pytest.fixture(scope="module")
def random_params(hard):
    # A random policy far from uniform (init_std 1), so the checks below are not trivial.
    config = dataclasses.replace(hard.model_config, init_std=1.0)
    return init_params(config, jax.random.key(42))


@pytest.fixture(scope="module")
def evaluate(hard, apply_fn):
    return functools.partial(hard.exact_eval, apply_fn)  # compiled inside, once per apply_fn


@pytest.fixture(scope="module")
def response_logprobs(hard, apply_fn):
    return functools.partial(hard.response_logprobs, apply_fn)


def rewards_of(task, prompt_index, responses, mask):
    b = responses.shape[0]
    prompts = jnp.broadcast_to(task.prompts[prompt_index], (b, task.prompt_len))
    prompt_mask = jnp.broadcast_to(task.prompt_mask[prompt_index], (b, task.prompt_len))
    return np.asarray(task.reward_fn(prompts, prompt_mask, jnp.asarray(responses), jnp.asarray(mask)))


# ---------------------------------------------------------------------------------------------
# Enumeration


def test_enumeration_is_every_distinct_response_once():
    tokens, mask = tasks.enumerate_responses(vocab_size=4, eos_id=1, pad_id=0, max_new_tokens=3)
    # 3 non-EOS tokens (pad included): 1 + 3 + 9 with EOS, 27 without.
    assert tokens.shape == mask.shape == (1 + 3 + 9 + 27, 3)
    assert len({(tuple(t), tuple(m)) for t, m in zip(tokens, mask)}) == len(tokens)
    for t, m in zip(tokens, mask):
        n = int(m.sum())
        assert list(m) == [1] * n + [0] * (3 - n)  # right-padded mask
        assert EOS not in list(t[: n - 1])  # nothing after the first EOS is in the response
        if t[n - 1] == EOS:
            assert (t[n:] == PAD).all()  # canonical tail
        else:
            assert n == 3  # no EOS: cut at the length limit


def test_probabilities_sum_to_one(response_logprobs, random_params, ref_params):
    for params in (random_params, ref_params):
        total = np.exp(np.asarray(response_logprobs(params), np.float64)).sum(axis=1)
        np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_probabilities_sum_to_one_with_left_padded_prompts():
    copy = tasks.get_task("copy")
    assert (copy.prompt_mask == 0).any()  # the copy prompts really are left-padded
    params = init_params(dataclasses.replace(copy.model_config, init_std=1.0), jax.random.key(3))
    logp = copy.response_logprobs(Transformer(copy.model_config).apply, params)
    np.testing.assert_allclose(np.exp(np.asarray(logp, np.float64)).sum(1), 1.0, atol=1e-5)


def test_shared_prefix_forward_equals_a_direct_forward(
    hard, apply_fn, random_params, response_logprobs
):
    """response_logprobs scores M responses from (V-1)^(N-1) forwards; compare with one forward
    over concat(prompt, response) per response."""
    tokens, mask = hard.responses
    logp = response_logprobs(random_params)

    @jax.jit
    def direct(prompt, prompt_mask):
        m = tokens.shape[0]
        seq = jnp.concatenate([jnp.broadcast_to(prompt, (m, hard.prompt_len)), tokens], 1)
        seq_mask = jnp.concatenate([jnp.broadcast_to(prompt_mask, (m, hard.prompt_len)), mask], 1)
        logits = apply_fn({"params": random_params}, seq, seq_mask)
        return logprobs.completion_logprobs(logits, jnp.asarray(tokens), jnp.asarray(mask))[1]

    for k in (0, 5):
        np.testing.assert_allclose(
            logp[k], direct(hard.prompts[k], hard.prompt_mask[k]), rtol=1e-5, atol=1e-4
        )


# ---------------------------------------------------------------------------------------------
# Exact evaluation


def test_exact_eval_against_itself(evaluate, ref_params, random_params):
    out = evaluate(ref_params, ref_params, 0.5)
    assert set(out) == {"reward", "kl", "j_beta", "p_optimal", "j_star"}
    assert abs(float(out["kl"])) < 1e-5
    np.testing.assert_allclose(out["j_beta"], out["reward"], atol=1e-5)
    other = evaluate(random_params, ref_params, 0.5)
    assert float(other["kl"]) > 0.1
    np.testing.assert_allclose(
        other["j_beta"], other["reward"] - 0.5 * other["kl"], rtol=1e-5, atol=1e-6
    )
    # beta is traced: another value does not recompile and scales the KL term.
    np.testing.assert_allclose(
        evaluate(random_params, ref_params, 2.0)["j_beta"],
        other["reward"] - 2.0 * other["kl"], rtol=1e-5, atol=1e-5,
    )


def test_exact_eval_matches_monte_carlo_from_the_sampler(hard, apply_fn, ref_params, evaluate):
    """pi = the reference with perturbed weights. Sample n responses per prompt with the
    sampler and compare the sample means of r, log pi - log pi_ref and [optimal] with the exact
    values: each must lie within 5 standard errors (a false failure has probability ~6e-7 per
    quantity for a normal mean)."""
    leaves, treedef = jax.tree_util.tree_flatten(ref_params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    pi = jax.tree_util.tree_unflatten(
        treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    exact = {k: float(v) for k, v in evaluate(pi, ref_params, 0.1).items()}
    n = 1024  # per prompt; every prompt equally often = the uniform average
    prompts = jnp.repeat(jnp.asarray(hard.prompts), n, axis=0)
    prompt_mask = jnp.repeat(jnp.asarray(hard.prompt_mask), n, axis=0)

    @jax.jit
    def monte_carlo(key):
        out = sampling.sample(
            apply_fn, pi, prompts, prompt_mask, key, max_new_tokens=hard.max_new_tokens,
            eos_id=hard.eos_id, pad_id=hard.pad_id,
        )
        seq = jnp.concatenate([prompts, out.tokens], 1)
        seq_mask = jnp.concatenate([prompt_mask, out.mask], 1)
        ref_logits = apply_fn({"params": ref_params}, seq, seq_mask)
        log_ref = logprobs.completion_logprobs(ref_logits, out.tokens, out.mask)[1]
        reward = hard.reward_fn(prompts, prompt_mask, out.tokens, out.mask)
        return reward, out.logprobs.sum(1) - log_ref

    reward, log_ratio = (np.asarray(a, np.float64) for a in monte_carlo(jax.random.key(11)))
    optimal = (reward >= 4.0).astype(np.float64)  # hard-explore: reward 4 (all matched) iff optimal
    m = reward.size
    for name, x in (("reward", reward), ("kl", log_ratio), ("p_optimal", optimal)):
        se = max(x.std() / np.sqrt(m), 1e-4)
        assert abs(x.mean() - exact[name]) < 5 * se, (name, x.mean(), exact[name], se)
    assert exact["kl"] > 0.05  # the perturbation makes a real difference to compare


def test_exact_eval_is_fast_and_composes_with_jit_and_vmap(evaluate, ref_params, random_params):
    import time

    jax.block_until_ready(evaluate(ref_params, ref_params, 0.1))
    start = time.perf_counter()
    for beta in (0.1, 0.2, 0.3):
        jax.block_until_ready(evaluate(random_params, ref_params, beta))
    # Generous bound (the target is < 1 s; ~0.05 s measured) so a busy machine does not fail.
    assert (time.perf_counter() - start) / 3 < 2.0
    # Inside an outer jit, and vmapped over beta (a sweep), it gives the same numbers.
    betas = jnp.array([0.1, 0.3])
    swept = jax.jit(jax.vmap(lambda b: evaluate(random_params, ref_params, b)))(betas)
    for i, beta in enumerate((0.1, 0.3)):
        one = evaluate(random_params, ref_params, beta)
        for k in one:
            np.testing.assert_allclose(swept[k][i], one[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Rewards


def test_hard_explore_reward_by_hand(hard):
    # Reward = number of matched prefix tokens of (reversed prompt, EOS): 4 * (prefix / 4).
    k = 0
    t1, t2, t3 = (int(v) for v in hard.prompts[k][::-1])
    f = tasks.FILLER_ID
    cases = [
        ([t1, t2, t3, EOS], [1, 1, 1, 1], 4.0),
        ([t1, t2, t3, t3], [1, 1, 1, 1], 3.0),  # cut at the limit, no EOS
        ([t1, t2, f, EOS], [1, 1, 1, 1], 2.0),
        ([t1, f, t3, EOS], [1, 1, 1, 1], 1.0),  # prefix credit: t3 after a miss earns nothing
        ([t1, EOS, PAD, PAD], [1, 1, 0, 0], 1.0),
        ([f, t2, t3, EOS], [1, 1, 1, 1], 0.0),
        ([EOS, PAD, PAD, PAD], [1, 0, 0, 0], 0.0),
    ]
    responses = np.array([c[0] for c in cases], np.int32)
    mask = np.array([c[1] for c in cases], np.int32)
    np.testing.assert_allclose(rewards_of(hard, k, responses, mask), [c[2] for c in cases])


def test_copy_reward_by_hand():
    copy = tasks.get_task("copy")
    # A left-padded prompt [PAD, 4, 5] -> target 4 5 EOS; reward = positions right / 3.
    prompts = np.array([[PAD, 4, 5]] * 6, np.int32)
    prompt_mask = np.array([[0, 1, 1]] * 6, np.int32)
    responses = np.array(
        [[4, 5, EOS, PAD], [4, 6, EOS, PAD], [4, 5, 6, EOS], [5, 4, EOS, PAD],
         [EOS, PAD, PAD, PAD], [4, 5, 5, 5]], np.int32,
    )
    mask = np.array(
        [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]],
        np.int32,
    )
    r = copy.reward_fn(jnp.asarray(prompts), jnp.asarray(prompt_mask), jnp.asarray(responses),
                       jnp.asarray(mask))
    np.testing.assert_allclose(r, [1.0, 2 / 3, 2 / 3, 1 / 3, 0.0, 2 / 3], rtol=1e-6)


def test_reward_pieces():
    content, length = tasks.left_align(jnp.array([[0, 0, 7], [5, 6, 7]]), jnp.array([[0, 0, 1], [1, 1, 1]]))
    np.testing.assert_array_equal(content, [[7, -1, -1], [5, 6, 7]])
    np.testing.assert_array_equal(length, [1, 3])
    want = tasks.target_with_eos(content, length, 5, eos_id=1)
    np.testing.assert_array_equal(want, [[7, 1, -1, -1, -1], [5, 6, 7, 1, -1]])


# ---------------------------------------------------------------------------------------------
# Reference policies


def test_hard_explore_reference_rarely_finds_the_optimum(
    hard, ref_params, evaluate, response_logprobs
):
    out = evaluate(ref_params, ref_params, 0.1)
    assert float(out["p_optimal"]) < 1e-3
    # ...while most of its mass is on mediocre responses (partial credit, not optimal).
    logp = np.asarray(response_logprobs(ref_params))
    tokens, mask = hard.responses
    mediocre = [
        np.exp(logp[k])[(r > 0) & (r < 4)].sum()
        for k in range(hard.num_prompts)
        for r in [rewards_of(hard, k, tokens, mask)]
    ]
    assert np.mean(mediocre) > 0.5, mediocre
    assert 0.4 < float(out["reward"]) < 2.0  # of 4


def test_make_reference_is_cached_and_deterministic(hard, ref_params):
    assert tasks.make_reference(hard, jax.random.key(0)) is ref_params  # cached: the same object
    # A raw uint32 key with the same bits is the same key.
    assert tasks.make_reference(hard, jax.random.PRNGKey(0)) is ref_params
    again, losses = tasks.train_reference(hard, jax.random.key(0))  # uncached, recomputed
    assert losses.shape == (hard.reference_steps,)
    assert float(losses[-20:].mean()) < float(losses[:5].mean())  # it learned something
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, ref_params)


# ---------------------------------------------------------------------------------------------
# Prompts, registry, user tasks


def test_sample_prompts_uniform_and_jittable(hard):
    prompts, mask = jax.jit(hard.sample_prompts, static_argnums=1)(jax.random.key(0), 4000)
    assert prompts.shape == mask.shape == (4000, hard.prompt_len)
    counts = [(np.asarray(prompts) == p).all(1).sum() for p in hard.prompts]
    assert sum(counts) == 4000 and min(counts) > 400  # 500 expected each


def test_registry():
    assert tasks.DEFAULT_TASK == "hard-explore"
    assert {"hard-explore", "copy"} <= set(tasks.TASKS)
    assert tasks.get_task() is tasks.TASKS["hard-explore"]
    with pytest.raises(ValueError, match="unknown task 'nope'.*copy"):
        tasks.get_task("nope")
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_task(tasks.make_copy_task())
    assert tasks.register_task(tasks.TASKS["copy"]) is tasks.TASKS["copy"]  # same object: fine


def test_user_defined_task_in_a_few_lines():
    def reward(prompts, prompt_mask, responses, response_mask):
        return (responses[:, 0] == prompts[:, -1]).astype(jnp.float32)

    task = tasks.Task(
        name="echo-first", vocab_size=7, eos_id=1, pad_id=0,
        prompts=np.array([[2], [3], [4]]), prompt_mask=np.ones((3, 1)),
        max_new_tokens=2, reward_fn=reward,
    )
    apply_fn = task.make_model().apply
    assert isinstance(task.make_model(), Transformer) and task.make_model() is task.make_model()
    ref = tasks.make_reference(task, jax.random.key(0))  # no demonstrations: the random init
    params = init_params(dataclasses.replace(task.model_config, init_std=1.0), jax.random.key(1))
    out = jax.jit(functools.partial(task.exact_eval, apply_fn))(params, ref, 0.1)

    # Padding (0) is suppressed: 5 tokens besides EOS, so 1 + 5 + 25 responses.
    assert task.suppressed_ids == (0,) and task.responses[0].shape == (1 + 5 + 25, 2)
    # Brute force over explicit forwards: next-token distributions after [x] and [x, first].
    @jax.jit
    def next_token(params, seq):
        logits = apply_fn({"params": params}, seq, jnp.ones_like(seq))
        return jax.nn.softmax(logits[:, -1])

    after_x = {
        name: np.asarray(next_token(p, jnp.array([[2], [3], [4]])), np.float64)
        for name, p in (("pi", params), ("ref", ref))
    }
    pairs = jnp.array([[x, t] for x in (2, 3, 4) for t in range(7)])
    after_xt = {
        name: np.asarray(next_token(p, pairs), np.float64).reshape(3, 7, 7)
        for name, p in (("pi", params), ("ref", ref))
    }
    for dist in (*after_x.values(), *after_xt.values()):
        assert (dist[..., PAD] == 0).all()  # suppressed: exactly zero mass on padding
    reward_sum = kl = 0.0
    for i, x in enumerate((2, 3, 4)):
        # responses: [EOS], [t, EOS] and [t, u] (cut at the limit), t, u != EOS, pad
        responses = [(1,)] + [(t, u) for t in (2, 3, 4, 5, 6) for u in range(1, 7)]
        for first, *rest in responses:
            if not rest:
                pi, q = after_x["pi"][i, first], after_x["ref"][i, first]
            else:
                pi = after_x["pi"][i, first] * after_xt["pi"][i, first, rest[0]]
                q = after_x["ref"][i, first] * after_xt["ref"][i, first, rest[0]]
            reward_sum += pi * (first == x)
            kl += pi * np.log(pi / q)
    np.testing.assert_allclose(out["reward"], reward_sum / 3, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["kl"], kl / 3, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["p_optimal"], reward_sum / 3, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(prompts=np.array([[2, 0]]), prompt_mask=np.array([[1, 0]])), "left-padded"),
        (dict(eos_id=9), "eos_id=9"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=np.array([[7]])), r"\[0, 5\)"),
    ],
)
def test_task_validation(changes, words):
    fields = dict(
        name="bad", vocab_size=5, eos_id=1, pad_id=0, prompts=np.array([[2]]),
        prompt_mask=np.array([[1]]), max_new_tokens=2, reward_fn=lambda *a: a[2][:, 0] * 0.0,
    )
    fields.update(changes)
    with pytest.raises(ValueError, match=words):
        tasks.Task(**fields)


def test_j_star_is_the_kl_regularised_optimum(hard, ref_params, evaluate, response_logprobs):
    """j_star = beta log E_ref exp(r/beta) = J_beta(pi*) with pi* ∝ pi_ref exp(r/beta), and no
    policy beats it (here: the reference, and pi* itself computed in float64)."""
    beta = 0.1
    out = evaluate(ref_params, ref_params, beta)
    logq = np.asarray(response_logprobs(ref_params), np.float64)
    tokens, mask = hard.responses
    j_pi_star = []
    for k in range(hard.num_prompts):
        r = rewards_of(hard, k, tokens, mask).astype(np.float64)
        logits = logq[k] + r / beta
        pstar = np.exp(logits - logits.max())
        pstar /= pstar.sum()
        kl = np.sum(pstar * (np.log(pstar + 1e-300) - logq[k]))
        j_pi_star.append(np.sum(pstar * r) - beta * kl)
    np.testing.assert_allclose(out["j_star"], np.mean(j_pi_star), rtol=1e-4)
    assert float(out["j_beta"]) < float(out["j_star"])


def test_resolve_task_from_module_attribute(tmp_path, monkeypatch):
    (tmp_path / "my_xpo_tasks.py").write_text(
        "import jax.numpy as jnp, numpy as np\n"
        "from xpo_jax.tasks import Task\n"
        "def reward(p, pm, r, rm):\n"
        "    return (r[:, 0] == p[:, -1]).astype(jnp.float32)\n"
        "def make():\n"
        "    return Task(name='echo-first-test', vocab_size=6, eos_id=1, pad_id=0, prompts=np.array([[2], [3]]),\n"
        "                prompt_mask=np.ones((2, 1)), max_new_tokens=2, reward_fn=reward)\n"
        "not_a_task = 3\n"
    )
    monkeypatch.chdir(tmp_path)
    task = tasks.resolve_task("my_xpo_tasks:make")
    assert task.name == "echo-first-test" and tasks.get_task("echo-first-test") is task
    with pytest.raises(ValueError, match="is a int, expected a Task"):
        tasks.resolve_task("my_xpo_tasks:not_a_task")
    with pytest.raises(ValueError, match="cannot import 'nope'"):
        tasks.resolve_task("my_xpo_tasks:nope")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.resolve_task("nope")


# ---------------------------------------------------------------------------------------------
# The policy model of a task, explicit references


def test_explicit_reference_is_returned_without_fine_tuning(monkeypatch):
    task = tasks.get_task("bandit-1e-2")
    assert isinstance(task.make_model(), TabularPolicy)
    # Even with demonstrations, an explicit reference is returned as it is.
    chain = tasks.make_chain_transformer_task(coverage=0.1)
    task = dataclasses.replace(task, name="bandit-with-demos", demonstrations=chain.demonstrations)
    monkeypatch.setattr(reference_module, "_fine_tune", lambda *a: pytest.fail("fine-tuned"))
    ref = tasks.make_reference(task, jax.random.key(0))
    np.testing.assert_array_equal(ref["logits"], task.reference_params["logits"])
    assert isinstance(ref["logits"], jax.Array) and ref["logits"].dtype == jnp.float32
    assert tasks.make_reference(task, jax.random.key(0)) is ref


def test_explicit_reference_is_checked_against_the_model():
    task = tasks.get_task("bandit-1e-2")
    v = task.vocab_size
    good = task.reference_params["logits"]
    replace = functools.partial(dataclasses.replace, task)
    with pytest.raises(ValueError, match=rf"reference_params\['logits'\] has shape \(3, 3\); the "
                                         rf"TabularPolicy model expects \({v}, {v}\)"):
        replace(reference_params={"logits": np.zeros((3, 3))})
    with pytest.raises(ValueError, match=r"reference_params lacks \['logits'\]"):
        replace(reference_params={"table": good})
    with pytest.raises(ValueError, match=r"reference_params has \['extra'\], which the TabularPolicy"):
        replace(reference_params={"logits": good, "extra": np.zeros(2)})
    with pytest.raises(ValueError, match="of the Transformer model"):  # a table for a decoder
        replace(model_class=Transformer)
    # float64 tables are stored in the model's dtype
    assert replace(reference_params={"logits": np.float64(good)}).reference_params["logits"].dtype == np.float32


def test_init_params_follow_the_model_class():
    bandit = tasks.get_task("bandit-1e-1")
    p = bandit.init_params(jax.random.key(0))
    assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure({"logits": 0})
    assert p["logits"].shape == (bandit.vocab_size,) * 2
    hard = tasks.get_task("hard-explore")
    shapes = jax.tree_util.tree_map(lambda x: x.shape, hard.param_shapes())
    want = jax.tree_util.tree_map(lambda x: x.shape, init_params(hard.model_config, jax.random.key(0)))
    assert shapes == want


# ---------------------------------------------------------------------------------------------
# Suppressed ids


def echo_task(**changes):
    fields = dict(name="echo", vocab_size=6, eos_id=1, pad_id=0, prompts=np.array([[2], [3]]),
                  prompt_mask=np.ones((2, 1)), max_new_tokens=3,
                  reward_fn=lambda p, pm, r, rm: (r[:, 0] == p[:, -1]).astype(jnp.float32))
    return tasks.Task(**{**fields, **changes})


def test_suppressed_ids_reach_the_model_and_the_enumeration():
    task = echo_task(suppress_ids=(3,))
    assert task.suppressed_ids == (0, 3) and task.model_config.suppress_ids == (0, 3)
    tokens, mask = task.responses
    assert len(tokens) == 1 + 3 + 9 + 27  # tokens 2, 4, 5 besides EOS
    assert not np.isin(tokens[mask > 0], (0, 3)).any()
    # A random decoder far from uniform: the enumerated responses still carry all the mass.
    params = init_params(dataclasses.replace(task.model_config, init_std=1.0), jax.random.key(4))
    logp = np.asarray(task.response_logprobs(task.make_model().apply, params), np.float64)
    np.testing.assert_allclose(np.exp(logp).sum(1), 1.0, atol=1e-5)
    # replace() recomputes them from the new fields
    moved = dataclasses.replace(task, pad_id=5)
    assert moved.suppressed_ids == (3, 5) and moved.model_config.suppress_ids == (3, 5)
    assert echo_task(pad_id=1).suppressed_ids == ()  # pad == EOS: EOS stays generable
    with pytest.raises(ValueError, match=r"suppress_ids: 9 is not a token id in \[0, 6\)"):
        echo_task(suppress_ids=(9,))
    with pytest.raises(ValueError, match="leave no response token besides EOS"):
        echo_task(suppress_ids=(2, 3, 4, 5))


def test_policies_put_zero_mass_on_suppressed_ids(hard, apply_fn, ref_params):
    """Every next-token distribution a response can meet (each prompt x every enumerated prefix)
    gives exactly 0 to the suppressed ids: the trained hard-explore reference, explicit tabular
    references, and a far-from-uniform random policy of the copy task."""

    def suppressed_mass(task, params, model_apply):
        strings, _ = task._prefixes
        s, (k, p) = strings.shape[0], task.prompts.shape
        seq = np.concatenate([np.repeat(task.prompts, s, 0), np.tile(strings, (k, 1))], 1)
        mask = np.concatenate([np.repeat(task.prompt_mask, s, 0), np.ones((k * s, strings.shape[1]), int)], 1)
        probs = jax.jit(model_apply)({"params": params}, jnp.asarray(seq), jnp.asarray(mask))
        return float(jax.nn.softmax(probs)[:, p - 1:][..., list(task.suppressed_ids)].max())

    assert PAD in hard.suppressed_ids
    assert suppressed_mass(hard, ref_params, apply_fn) == 0.0
    for name in ("copy", "bandit-1e-3", "chain-1e-3"):
        task = tasks.get_task(name)
        assert PAD in task.suppressed_ids
        params = task.reference_params
        if params is None:
            params = jax.tree_util.tree_map(lambda x: 50 * x, task.init_params(jax.random.key(1)))
        assert suppressed_mass(task, params, task.make_model().apply) == 0.0, name
    # The sampler draws from these logits: padding's is the finite SUPPRESSED_LOGIT, exp() = 0.
    prompts = jnp.asarray(hard.prompts)
    logits = apply_fn({"params": ref_params}, prompts, jnp.ones_like(prompts))
    assert (np.asarray(logits)[..., PAD] == SUPPRESSED_LOGIT).all()


# ---------------------------------------------------------------------------------------------
# The reference cache on disk


def cache_task(**changes):
    """A fine-tuned reference that is cheap to compile: the chain's demonstrations, a table."""
    base = tasks.make_chain_transformer_task(coverage=0.1, reference_steps=20)
    fields = dict(name="cache-test", model_class=TabularPolicy, reference_batch_size=16)
    return dataclasses.replace(base, **{**fields, **changes})


def forget(task):
    """Drop ``task`` from the in-process memo (as a new process would start)."""
    for k in [k for k in reference_module._REFERENCE_CACHE if k[0] is task]:
        del reference_module._REFERENCE_CACHE[k]


@pytest.fixture
def fine_tunes(monkeypatch):
    """The names of the tasks fine-tuned during a test."""
    calls, real = [], reference_module._fine_tune

    def spy(task, params, key):
        calls.append(task.name)
        return real(task, params, key)

    monkeypatch.setattr(reference_module, "_fine_tune", spy)
    return calls


def assert_same_params(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_reference_is_cached_on_disk_and_loaded_without_fine_tuning(cache_dir, fine_tunes):
    task, key = cache_task(), jax.random.key(0)
    path = tasks.reference_cache_path(task, key)
    assert path.startswith(cache_dir) and "cache-test" in os.path.basename(path)
    assert not os.path.exists(path)
    first = tasks.make_reference(task, key)
    assert fine_tunes == ["cache-test"] and os.path.exists(path)
    assert not [f for f in os.listdir(cache_dir) if f.startswith(".tmp")]  # no temporary left
    forget(task)
    again = tasks.make_reference(task, key)  # from disk
    rebuilt = tasks.make_reference(cache_task(), key)  # a new Task (new closures), same content
    assert fine_tunes == ["cache-test"]
    assert_same_params(again, first)
    assert_same_params(rebuilt, first)
    assert_same_params(first, tasks.train_reference(task, key)[0])  # what it stands for


def test_reference_cache_is_shared_with_a_new_process(cache_dir):
    """Another interpreter (another string-hash seed) finds the same file and loads it without
    fine-tuning."""
    key = jax.random.key(0)
    first = tasks.make_reference(cache_task(), key)
    script = (
        "import dataclasses, jax, numpy as np\n"
        "from xpo_jax import tasks\n"
        "from xpo_jax.models.tabular import TabularPolicy\n"
        "from xpo_jax.tasks import reference\n"
        "def no(*a): raise SystemExit('fine-tuned')\n"
        "reference._fine_tune = no\n"
        "base = tasks.make_chain_transformer_task(coverage=0.1, reference_steps=20)\n"
        "task = dataclasses.replace(base, name='cache-test', model_class=TabularPolicy, reference_batch_size=16)\n"
        "print(tasks.reference_cache_path(task, jax.random.key(0)))\n"
        "np.save('out.npy', np.asarray(tasks.make_reference(task, jax.random.key(0))['logits']))\n"
    )
    env = {**os.environ, reference_module.CACHE_ENV: cache_dir, "PYTHONHASHSEED": "12345",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], cwd=cache_dir, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == tasks.reference_cache_path(cache_task(), key)
    np.testing.assert_array_equal(np.load(os.path.join(cache_dir, "out.npy")), first["logits"])


def test_every_ingredient_of_the_cache_key_changes_it(monkeypatch):
    from xpo_jax.tasks import coverage as coverage_module

    base, key = cache_task(), jax.random.key(0)
    digest = functools.partial(tasks.reference_digest, key=key)
    d0 = digest(base)
    assert digest(cache_task()) == d0  # content, not identity
    demos = base.demonstrations
    variants = {
        "name": cache_task(name="cache-test-2"),
        "vocab_size": cache_task(vocab_size=base.vocab_size + 1, model_config=None),
        "pad_id": cache_task(pad_id=base.vocab_size - 1),
        "eos_id": cache_task(eos_id=base.vocab_size - 1),
        "suppress_ids": cache_task(suppress_ids=(2, 7)),
        "prompts": cache_task(prompts=np.array([[3]])),
        "max_new_tokens": cache_task(max_new_tokens=3),
        "model_config": cache_task(model_config=dataclasses.replace(base.model_config, init_std=0.5)),
        "model_class": cache_task(model_class=Transformer),
        "reference_steps": cache_task(reference_steps=21),
        "reference_batch_size": cache_task(reference_batch_size=17),
        "reference_learning_rate": cache_task(reference_learning_rate=1e-3),
        "demonstrations code": cache_task(demonstrations=lambda k, b: demos(k, b)),
        "demonstrations closure": dataclasses.replace(
            base, demonstrations=tasks.make_chain_transformer_task(coverage=0.2).demonstrations),
    }
    digests = {name: digest(task) for name, task in variants.items()}
    digests["key"] = tasks.reference_digest(base, jax.random.key(1))
    with monkeypatch.context() as mp:  # a function the demonstrations call, through a global
        mp.setattr(coverage_module, "pick_prompts", lambda *a: None)
        digests["a global function"] = digest(base)
    with monkeypatch.context() as mp:  # the code that trains (model, reference.py, logprobs.py)
        mp.setattr(reference_module, "_code_version", lambda model_class: "edited")
        digests["code"] = digest(base)
    for name, d in digests.items():
        assert d != d0, name
    assert len(set(digests.values())) == len(digests)
    # An explicit key replaces the content (two different tasks share it), but not the PRNG key.
    mine = cache_task(reference_cache_key="mine")
    assert digest(mine) == digest(cache_task(name="other", reference_cache_key="mine")) != d0
    assert tasks.reference_digest(mine, jax.random.key(1)) != digest(mine)


def test_a_changed_ingredient_misses_the_cache(cache_dir, fine_tunes):
    key = jax.random.key(0)
    tasks.make_reference(cache_task(), key)
    changed = cache_task(reference_learning_rate=1e-2)
    tasks.make_reference(changed, key)
    assert fine_tunes[-1] == "cache-test" and os.path.exists(tasks.reference_cache_path(changed, key))
    assert tasks.reference_cache_path(changed, key) != tasks.reference_cache_path(cache_task(), key)
    n = len(fine_tunes)
    forget(changed)
    tasks.make_reference(changed, key)
    assert len(fine_tunes) == n  # now it is on disk too


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty", "wrong shapes"])
def test_a_corrupt_cache_file_is_recomputed_and_rewritten(damage, fine_tunes):
    task, key = cache_task(), jax.random.key(0)
    good = tasks.make_reference(task, key)
    path = tasks.reference_cache_path(task, key)
    data = open(path, "rb").read()
    if damage == "wrong shapes":  # a well-formed file whose parameters are not this model's
        reference_module._write(path, {"logits": np.zeros((3, 3), np.float32)})
    else:
        bad = {"flip": data[:-7] + bytes([data[-7] ^ 1]) + data[-6:], "truncate": data[: len(data) // 2],
               "garbage": b"\x00not a cache file" * 10, "empty": b""}[damage]
        open(path, "wb").write(bad)
    forget(task)
    n = len(fine_tunes)
    with pytest.warns(UserWarning, match="unreadable reference cache file"):
        again = tasks.make_reference(task, key)
    assert len(fine_tunes) == n + 1  # recomputed, not trusted
    assert_same_params(again, good)
    assert open(path, "rb").read() == data  # and rewritten
    forget(task)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tasks.make_reference(task, key)
    assert len(fine_tunes) == n + 1


def test_cache_off_and_demonstrations_without_stable_content(monkeypatch, tmp_path, fine_tunes):
    monkeypatch.setenv(reference_module.CACHE_ENV, "off")
    assert tasks.reference_cache_path(cache_task(), jax.random.key(0)) is None
    monkeypatch.setenv(reference_module.CACHE_ENV, str(tmp_path))
    demos, handle = cache_task().demonstrations, object()  # repr shows an address: no content

    def unstable(key, batch_size):
        assert handle is not None
        return demos(key, batch_size)

    with pytest.warns(UserWarning, match="not cached on disk"):
        assert tasks.reference_cache_path(cache_task(demonstrations=unstable), jax.random.key(0)) is None
    named = cache_task(demonstrations=unstable, reference_cache_key="unstable-demos-v1")
    assert tasks.reference_cache_path(named, jax.random.key(0)).startswith(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Coverage families


def np_softmax_rows(table, suppressed):
    logits = np.float64(table).copy()
    logits[:, list(suppressed)] = -np.inf
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


COVERAGE_PRESETS = [f"{family}-{label}" for family in ("bandit", "chain")
                    for label in ("1e-1", "1e-2", "1e-3", "1e-4")]


@pytest.mark.parametrize("name", COVERAGE_PRESETS)
def test_tabular_presets_have_exactly_the_requested_coverage(name):
    task = tasks.get_task(name)
    coverage = float(name.split("-", 1)[1])
    ref = tasks.make_reference(task, jax.random.key(0))
    out = task.exact_eval(task.make_model().apply, ref, ref, 0.1)
    np.testing.assert_allclose(float(out["p_optimal"]), coverage, rtol=1e-5)
    assert float(out["j_star"]) > float(out["j_beta"])  # the reference is not optimal


def test_bandit_rewards_and_reference_by_hand():
    k_, a_ = 3, 5
    task = tasks.make_bandit_task(coverage=0.03, num_prompts=k_, num_actions=a_, second_best_mass=0.6,
                                  second_best_reward=0.25, reward_scale=2.0, name="bandit-test")
    assert task.vocab_size == 2 + k_ + a_ and task.max_new_tokens == 1
    assert set(task.suppressed_ids) == {PAD, EOS, 2, 3, 4}  # pad, EOS, the prompt tokens
    tokens, mask = task.responses
    np.testing.assert_array_equal(tokens[:, 0], np.arange(5, 10))  # exactly the actions
    probs = np_softmax_rows(task.reference_params["logits"], task.suppressed_ids)
    for k in range(k_):
        best, second = k % a_, (k + 1) % a_  # the documented rule
        want_r = np.where(np.arange(a_) == best, 2.0, np.where(np.arange(a_) == second, 0.5, 0.0))
        np.testing.assert_allclose(rewards_of(task, k, tokens, mask), want_r)
        want_p = np.full(a_, (1 - 0.03 - 0.6) / 3)
        want_p[best], want_p[second] = 0.03, 0.6
        np.testing.assert_allclose(probs[2 + k, 5:], want_p, rtol=1e-6)
    assert rewards_of(task, 0, np.array([[5]]), np.array([[0]]))[0] == 0.0  # masked: no action
    ref = tasks.make_reference(task, jax.random.key(0))
    out = task.exact_eval(task.make_model().apply, ref, ref, 0.1)
    np.testing.assert_allclose(float(out["p_optimal"]), 0.03, rtol=1e-5)
    np.testing.assert_allclose(float(out["reward"]), 0.03 * 2.0 + 0.6 * 0.5, rtol=1e-5)
    with pytest.raises(ValueError, match="coverage \\+ second_best_mass must be < 1"):
        tasks.make_bandit_task(coverage=0.3, second_best_mass=0.7)


def test_chain_rewards_and_reference_by_hand():
    task = tasks.make_chain_task(coverage=0.02, length=2, num_distractors=3, stop_mass=0.4, reward_scale=1.0,
                                  name="chain-test")
    # pad 0, EOS 1, prompt 2, chain 3 4, distractors 5 6 7; responses up to 3 tokens
    assert task.vocab_size == 8 and task.max_new_tokens == 3 and task.suppressed_ids == (0, 2)
    cases = [([3, 4, EOS], [1, 1, 1], 1.0), ([3, 4, 4], [1, 1, 1], 2 / 3), ([3, EOS, PAD], [1, 1, 0], 1 / 3),
             ([5, 4, EOS], [1, 1, 1], 0.0), ([EOS, PAD, PAD], [1, 0, 0], 0.0), ([4, 3, EOS], [1, 1, 1], 0.0),
             ([3, 5, EOS], [1, 1, 1], 1 / 3)]
    np.testing.assert_allclose(rewards_of(task, 0, np.array([c[0] for c in cases]), np.array([c[1] for c in cases])),
                               [c[2] for c in cases], rtol=1e-6)
    q = 0.02 ** (1 / 3)
    probs = np_softmax_rows(task.reference_params["logits"], task.suppressed_ids)
    # row of the prompt token: 3 w.p. q, EOS 0.4(1-q), the other 4 response tokens 0.6(1-q)/4
    np.testing.assert_allclose(probs[2], [0, 0.4 * (1 - q), 0, q] + [0.6 * (1 - q) / 4] * 4, rtol=1e-6)
    np.testing.assert_allclose(probs[3], [0, 0.4 * (1 - q), 0, 0.6 * (1 - q) / 4, q] + [0.6 * (1 - q) / 4] * 3,
                               rtol=1e-6)
    np.testing.assert_allclose(probs[4], [0, q, 0] + [(1 - q) / 5] * 5, rtol=1e-6)  # last step: EOS
    np.testing.assert_allclose(probs[5], [0, 0.4, 0] + [0.6 / 5] * 5, rtol=1e-6)  # a distractor
    assert np.isclose(probs[2, 3] * probs[3, 4] * probs[4, EOS], 0.02, rtol=1e-6)
    # The exact evaluation's whole distribution is the Markov chain of these rows.
    ref = tasks.make_reference(task, jax.random.key(0))
    logp = np.asarray(task.response_logprobs(task.make_model().apply, ref), np.float64)[0]
    tokens, mask = task.responses
    want = [np.prod([probs[prev, t] for prev, t in zip([2, *row[:-1]], row)])
            for row in (list(t[: int(m.sum())]) for t, m in zip(tokens, mask))]
    np.testing.assert_allclose(np.exp(logp), want, rtol=2e-5, atol=1e-10)
    out = task.exact_eval(task.make_model().apply, ref, ref, 0.1)
    np.testing.assert_allclose(float(out["p_optimal"]), 0.02, rtol=1e-5)


def test_chain_transformer_demonstrations_follow_the_tabular_reference():
    """8192 demonstrations: right-padded responses after the prompt token, the first token
    distributed as the table's start row (chi-square) and y* as often as the coverage (0.1)."""
    from scipy import stats

    task = tasks.get_task("chain-transformer-1e-1")
    table = tasks.get_task("chain-1e-1")
    assert task.model_class is Transformer and task.reference_params is None
    assert task.suppressed_ids == table.suppressed_ids and task.prompts.tolist() == [[2]]
    n = 8192
    p, pm, y, ym = (np.asarray(a) for a in jax.jit(task.demonstrations, static_argnums=1)(jax.random.key(0), n))
    assert (p == 2).all() and (pm == 1).all() and y.shape == ym.shape == (n, 4)
    length = ym.sum(1)
    assert ((ym == (np.arange(4)[None] < length[:, None])).all() and (y[ym == 0] == PAD).all())
    ends = y[np.arange(n), length - 1]
    assert ((ends == EOS) | (length == 4)).all()  # each ends at its first EOS or at the limit
    probs = np_softmax_rows(table.reference_params["logits"], table.suppressed_ids)
    keep = [t for t in range(task.vocab_size) if t not in task.suppressed_ids]
    counts = np.bincount(y[:, 0], minlength=task.vocab_size)[keep]
    assert stats.chisquare(counts, probs[2, keep] * n).pvalue > 1e-6
    optimal = (y == [3, 4, 5, EOS]).all(1).mean()
    assert abs(optimal - 0.1) < 5 * np.sqrt(0.1 * 0.9 / n)


@pytest.mark.slow
def test_chain_transformer_reference_coverage_is_measured_near_the_target():
    task = tasks.get_task("chain-transformer-1e-2")
    ref = tasks.make_reference(task, jax.random.key(0))
    out = task.exact_eval(task.make_model().apply, ref, ref, 0.1)
    assert 0.005 < float(out["p_optimal"]) < 0.02  # fine-tuned to imitate pi_ref(y*) = 0.01
