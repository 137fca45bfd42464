"""Tests for xpo_jax.tasks: enumeration, exact evaluation, rewards, reference policies."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xpo_jax import logprobs, sampling, tasks
from xpo_jax.models.transformer import Transformer, init_params

EOS, PAD = tasks.EOS_ID, tasks.PAD_ID


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
    apply_fn = Transformer(task.model_config).apply
    ref = tasks.make_reference(task, jax.random.key(0))  # no demonstrations: the random init
    params = init_params(dataclasses.replace(task.model_config, init_std=1.0), jax.random.key(1))
    out = jax.jit(functools.partial(task.exact_eval, apply_fn))(params, ref, 0.1)

    assert task.responses[0].shape == (1 + 6 + 36, 2)
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
    reward_sum = kl = 0.0
    for i, x in enumerate((2, 3, 4)):
        # responses: [EOS], [t, EOS] and [t, u] (cut at the limit), t, u != EOS
        responses = [(1,)] + [(t, u) for t in (0, 2, 3, 4, 5, 6) for u in range(7)]
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
