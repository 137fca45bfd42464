"""Losses against independent float64 numpy formulas, TRL's XPO formula, grads and transforms."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from xpo_jax.losses import LOSS_TYPES, dpo_loss, xpo_bonus, xpo_loss

# ------------------------------------------------------------------------------------------------
# Independent float64 references, written from the papers' formulas (not from losses.py).
# ------------------------------------------------------------------------------------------------


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_sig(x):
    return np.exp(np_logsig(x))


def ref_dpo(hw, hl, beta, loss_type, eps=0.0, tau=0.05):
    hw, hl = np.float64(hw), np.float64(hl)
    d = hw - hl
    if loss_type == "sigmoid":  # DPO / cDPO: expected BCE against the smoothed label
        return -(1 - eps) * np_logsig(beta * d) - eps * np_logsig(-beta * d)
    if loss_type == "ipo":  # IPO eq. 17, tau = beta
        return (d - 1.0 / (2 * beta)) ** 2
    if loss_type == "hinge":  # SLiC
        return np.maximum(0.0, 1.0 - beta * d)
    if loss_type == "robust":  # rDPO eq. 5: unbiased estimator under flip rate eps
        return ((1 - eps) * -np_logsig(beta * d) - eps * -np_logsig(-beta * d)) / (1 - 2 * eps)
    if loss_type == "exo_pair":  # KL(p_theta || p_label) over {w, l}
        eps = eps if eps > 0 else 1e-3
        qw, ql = np_sig(beta * d), np_sig(-beta * d)
        return qw * (np_logsig(beta * d) - np.log(1 - eps)) + ql * (np_logsig(-beta * d) - np.log(eps))
    if loss_type == "nca_pair":
        rw, rl = beta * hw, beta * hl
        return -np_logsig(rw) - 0.5 * np_logsig(-rw) - 0.5 * np_logsig(-rl)
    if loss_type == "sppo_hard":  # P(win) = 1: targets +-1/2 for beta * h
        return (hw - 1 / (2 * beta)) ** 2 + (hl + 1 / (2 * beta)) ** 2
    if loss_type == "aot_pair":
        z = beta * (np.sort(hw) - np.sort(hl))
        return -(1 - eps) * np_logsig(z) - eps * np_logsig(-z)
    if loss_type == "apo_zero":
        return (1 - np_sig(beta * hw)) + np_sig(beta * hl)
    if loss_type == "apo_down":
        return np_sig(beta * hw) + (1 - np_sig(beta * (hw - hl)))
    if loss_type == "discopop":
        z = beta * d
        mod = np_sig(z / tau)
        # exp(-z) * mod, multiplied in log space: float64 exp overflows past z < -709.
        return -np_logsig(z) * (1 - mod) + np.exp(-z + np_logsig(z / tau))
    raise ValueError(loss_type)


def trl_xpo_formula(mm, mr, rr, rm, chosen_mask, alpha, beta, loss_type):
    """A numpy transcription of TRL 1.13 XPOTrainer._compute_losses (sequence sums in, per-example out).

    mm = policy on policy samples, mr = policy on ref samples, rr = ref on ref, rm = ref on policy.
    """
    cm = np.where(chosen_mask, mm, mr)
    cr = np.where(chosen_mask, rm, rr)
    rjm = np.where(~chosen_mask, mm, mr)
    rjr = np.where(~chosen_mask, rm, rr)
    logits = (cm - cr) - (rjm - rjr)
    if loss_type == "sigmoid":
        dpo = -np_logsig(beta * logits)
    else:
        dpo = (logits - 1 / (2 * beta)) ** 2
    xpo = alpha * mr
    return dpo, xpo, np.mean(dpo + xpo)


# ------------------------------------------------------------------------------------------------

B = 16


def make_logratios(seed, scale=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    hw = rng.normal(0, 3 * scale, B).astype(dtype)
    hl = rng.normal(0, 3 * scale, B).astype(dtype)
    return hw, hl


@functools.lru_cache(maxsize=None)
def jitted_dpo(loss_type):
    return jax.jit(functools.partial(dpo_loss, loss_type=loss_type))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("scale", [0.1, 1.0, 50.0])
def test_dpo_loss_matches_float64_formula(loss_type, scale):
    hw, hl = make_logratios(1, scale)
    for beta, eps in [(0.1, 0.0), (0.5, 0.2), (2.0, 0.0)]:
        if loss_type in ("ipo", "sppo_hard", "hinge", "nca_pair", "apo_zero", "apo_down", "discopop"):
            eps = 0.0  # these losses take no label smoothing
        got = np.asarray(jitted_dpo(loss_type)(hw, hl, beta=beta, label_smoothing=eps))
        want = ref_dpo(hw, hl, beta, loss_type, eps)
        assert got.shape == (B,)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(want).max() * 1e-2))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_loss_float64_to_last_digits(loss_type):
    hw, hl = make_logratios(2, 5.0, np.float64)
    with jax.enable_x64(True):
        got = np.asarray(dpo_loss(jnp.asarray(hw), jnp.asarray(hl), beta=0.3, loss_type=loss_type, label_smoothing=0.1))
    eps = 0.1 if loss_type in ("sigmoid", "robust", "exo_pair", "aot_pair") else 0.0
    np.testing.assert_allclose(got, ref_dpo(hw, hl, 0.3, loss_type, eps), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_huge_margins_stay_finite(loss_type):
    hw = np.array([1e4, -1e4, 3e3, -3e3, 0.0, 1e-8], np.float32)
    hl = np.array([-1e4, 1e4, -3e3, 3e3, 0.0, 0.0], np.float32)
    out = np.asarray(dpo_loss(hw, hl, beta=1.0, loss_type=loss_type))
    assert np.all(np.isfinite(out)), (loss_type, out)
    g = jax.grad(lambda a: dpo_loss(a, jnp.asarray(hl), beta=1.0, loss_type=loss_type).sum())(jnp.asarray(hw))
    assert np.all(np.isfinite(np.asarray(g))), (loss_type, g)


def test_known_values_and_limits():
    # DPO at zero margin is log 2; with label smoothing it still is.
    z = jnp.zeros(3)
    np.testing.assert_allclose(dpo_loss(z, z, beta=0.1), np.log(2) * np.ones(3), rtol=1e-7)
    np.testing.assert_allclose(dpo_loss(z, z, beta=0.1, label_smoothing=0.3), np.log(2) * np.ones(3), rtol=1e-7)
    # IPO at zero margin: (1/(2 beta))^2 = 25 for beta=0.1.
    np.testing.assert_allclose(dpo_loss(z, z, beta=0.1, loss_type="ipo"), 25.0 * np.ones(3), rtol=1e-7)
    # Hinge is exactly 0 past margin 1/beta.
    assert float(dpo_loss(jnp.array([10.1]), jnp.array([0.0]), beta=0.1, loss_type="hinge")[0]) == 0.0
    # Large positive margin: the sigmoid loss vanishes; large negative: it grows linearly.
    np.testing.assert_allclose(dpo_loss(jnp.array([1e4]), jnp.array([0.0]), beta=1.0), [0.0], atol=1e-30)
    np.testing.assert_allclose(dpo_loss(jnp.array([-1e4]), jnp.array([0.0]), beta=1.0), [1e4], rtol=1e-7)
    # Robust DPO with eps=0 is DPO.
    hw, hl = make_logratios(3)
    np.testing.assert_allclose(
        dpo_loss(hw, hl, beta=0.2, loss_type="robust"), dpo_loss(hw, hl, beta=0.2), rtol=1e-6
    )
    # EXO with eps=0 uses eps=1e-3, as TRL does.
    np.testing.assert_allclose(
        dpo_loss(hw, hl, beta=0.2, loss_type="exo_pair"),
        dpo_loss(hw, hl, beta=0.2, loss_type="exo_pair", label_smoothing=1e-3),
        rtol=1e-6,
    )


def test_aot_pair_sorts_over_batch():
    hw = np.array([3.0, 1.0, 2.0], np.float32)
    hl = np.array([0.0, 2.0, 1.0], np.float32)
    got = dpo_loss(hw, hl, beta=1.0, loss_type="aot_pair")
    # sorted hw = [1, 2, 3], sorted hl = [0, 1, 2] -> margins all 1.
    np.testing.assert_allclose(got, -np_logsig(np.ones(3)), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# XPO
# ------------------------------------------------------------------------------------------------


def make_xpo_inputs(seed, n=B):
    rng = np.random.default_rng(seed)
    pi_y, pi_yt, ref_y, ref_yt = (rng.normal(-30, 8, n).astype(np.float32) for _ in range(4))
    y_wins = rng.random(n) < 0.5
    return dict(pi_y=pi_y, pi_ytilde=pi_yt, ref_y=ref_y, ref_ytilde=ref_yt, y_wins=y_wins)


xpo_jit = jax.jit(xpo_loss, static_argnames="loss_type")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_xpo_loss_matches_trl_formula(loss_type):
    x = make_xpo_inputs(4)
    alpha, beta = 1e-3, 0.1
    loss, m = xpo_jit(**x, alpha=alpha, beta=beta, loss_type=loss_type)
    dpo, xpo, mean = trl_xpo_formula(
        np.float64(x["pi_y"]), np.float64(x["pi_ytilde"]), np.float64(x["ref_ytilde"]), np.float64(x["ref_y"]),
        x["y_wins"], alpha, beta, loss_type,
    )
    np.testing.assert_allclose(m["loss/dpo"], dpo, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["loss/xpo"], xpo, rtol=1e-6)
    np.testing.assert_allclose(float(loss.mean()), mean, rtol=1e-5)


def test_xpo_metrics_by_hand():
    x = dict(
        pi_y=np.array([-10.0, -4.0], np.float32),
        pi_ytilde=np.array([-12.0, -3.0], np.float32),
        ref_y=np.array([-11.0, -5.0], np.float32),
        ref_ytilde=np.array([-10.0, -2.0], np.float32),
        y_wins=np.array([True, False]),
    )
    loss, m = xpo_jit(**x, alpha=0.5, beta=0.1)
    # example 0: y wins: h+ = 1, h- = -2; example 1: y~ wins: h+ = -1, h- = 1.
    np.testing.assert_allclose(m["rewards/chosen"], [0.1, -0.1], rtol=1e-6)
    np.testing.assert_allclose(m["rewards/rejected"], [-0.2, 0.1], rtol=1e-6)
    np.testing.assert_allclose(m["rewards/margins"], [0.3, -0.2], rtol=1e-5)
    np.testing.assert_allclose(m["rewards/accuracies"], [1.0, 0.0])
    np.testing.assert_allclose(m["logps/chosen"], [-10.0, -3.0])
    np.testing.assert_allclose(m["logps/rejected"], [-12.0, -4.0])
    np.testing.assert_allclose(m["loss/xpo"], [-6.0, -1.5])
    np.testing.assert_allclose(m["loss/dpo"], -np_logsig(np.array([0.3, -0.2])), rtol=1e-6)
    np.testing.assert_allclose(loss, m["loss/dpo"] + m["loss/xpo"], rtol=1e-6)


def test_alpha_zero_is_online_dpo_and_ties_go_to_y():
    x = make_xpo_inputs(5)
    loss, m = xpo_jit(**x, alpha=0.0, beta=0.1)
    hy = x["pi_y"] - x["ref_y"]
    hyt = x["pi_ytilde"] - x["ref_ytilde"]
    w = x["y_wins"]
    want = dpo_loss(np.where(w, hy, hyt), np.where(w, hyt, hy), beta=0.1)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert np.all(np.asarray(m["loss/xpo"]) == 0)
    # A tie judged as y_wins=True (the oracle's `>=`) puts y on the chosen side.
    tie = dict(x, y_wins=np.ones(B, bool))
    _, mt = xpo_jit(**tie, alpha=0.0, beta=0.1)
    np.testing.assert_allclose(mt["logps/chosen"], x["pi_y"])


def test_xpo_bonus_variants():
    pi = np.array([-5.0, -1.0, -20.0], np.float32)
    ref = np.array([-4.0, -3.0, -2.0], np.float32)
    np.testing.assert_allclose(xpo_bonus(pi, alpha=0.1), 0.1 * pi, rtol=1e-6)
    np.testing.assert_allclose(xpo_bonus(pi, alpha=0.1, ref_ytilde=ref), 0.1 * (pi - ref), rtol=1e-6)
    np.testing.assert_allclose(
        xpo_bonus(pi, alpha=0.1, ref_ytilde=ref, clip=1.5), 0.1 * np.clip(pi - ref, -1.5, 1.5), rtol=1e-6
    )
    n = np.array([5, 0, 10])
    np.testing.assert_allclose(xpo_bonus(pi, alpha=0.1, num_tokens=n), 0.1 * pi / np.maximum(n, 1), rtol=1e-6)
    # Sign: gradient descent on the bonus lowers log pi(y~).
    assert float(jax.grad(lambda p: xpo_bonus(p, alpha=1.0).sum())(jnp.asarray(pi))[0]) > 0
    # Clipped: no gradient once past the clip.
    g = jax.grad(lambda p: xpo_bonus(p, alpha=1.0, ref_ytilde=jnp.asarray(ref), clip=1.5).sum())(jnp.asarray(pi))
    np.testing.assert_allclose(g, [1.0, 0.0, 0.0])


def test_xpo_loss_with_clipped_bonus():
    x = make_xpo_inputs(6)
    loss, m = xpo_jit(**x, alpha=0.2, beta=0.1, bonus_clip=2.0)
    want = 0.2 * np.clip(x["pi_ytilde"] - x["ref_ytilde"], -2.0, 2.0)
    np.testing.assert_allclose(m["loss/xpo"], want, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grads_match_finite_differences(loss_type):
    hw, hl = make_logratios(7, 1.0, np.float64)
    if loss_type == "hinge":
        hw = hw + 20.0 * np.sign(hw - hl - 1 / 0.3)  # stay away from the kink at margin 1/beta
    with jax.enable_x64(True):
        f = lambda a, b: dpo_loss(a, b, beta=0.3, loss_type=loss_type, label_smoothing=0.1 if loss_type != "exo_pair" else 0.05)
        check_grads(f, (jnp.asarray(hw), jnp.asarray(hl)), order=2, modes=["rev", "fwd"], atol=1e-6, rtol=1e-6)
        x = {k: (jnp.asarray(v, jnp.float64) if v.dtype != bool else jnp.asarray(v)) for k, v in make_xpo_inputs(8).items()}

        def g(pi_y, pi_ytilde):
            return xpo_loss(**dict(x, pi_y=pi_y, pi_ytilde=pi_ytilde), alpha=0.01, beta=0.1)[0]

        check_grads(g, (x["pi_y"], x["pi_ytilde"]), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Transforms: jit, vmap, pmap, shard_map on 8 simulated devices
# ------------------------------------------------------------------------------------------------


def per_example_xpo(pi_y, pi_ytilde, ref_y, ref_ytilde, y_wins, alpha, beta):
    return xpo_loss(pi_y=pi_y, pi_ytilde=pi_ytilde, ref_y=ref_y, ref_ytilde=ref_ytilde, y_wins=y_wins, alpha=alpha, beta=beta)[0]


def test_same_results_under_jit_vmap_pmap_shard_map():
    n = jax.device_count()
    assert n == 8, "tests/conftest.py sets 8 simulated CPU devices"
    x = make_xpo_inputs(9, n=32)
    args = [x["pi_y"], x["pi_ytilde"], x["ref_y"], x["ref_ytilde"], x["y_wins"]]
    eager = np.asarray(per_example_xpo(*args, 0.01, 0.1))
    jitted = np.asarray(jax.jit(per_example_xpo)(*args, 0.01, 0.1))
    # vmap over single examples (each call sees a batch of one).
    vmapped = np.asarray(
        jax.vmap(lambda *a: per_example_xpo(*(v[None] for v in a), 0.01, 0.1)[0])(*args)
    )
    pmapped = np.asarray(
        jax.pmap(per_example_xpo, in_axes=(0, 0, 0, 0, 0, None, None))(
            *(v.reshape(n, -1) for v in args), 0.01, 0.1
        )
    ).reshape(-1)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded_args = [jax.device_put(v, NamedSharding(mesh, P("data"))) for v in args]
    smapped = jax.jit(
        jax.shard_map(
            lambda *a: per_example_xpo(*a, 0.01, 0.1),
            mesh=mesh,
            in_specs=(P("data"),) * 5,
            out_specs=P("data"),
        )
    )(*sharded_args)
    assert len(smapped.sharding.device_set) == n
    for got in (jitted, vmapped, pmapped, np.asarray(smapped)):
        np.testing.assert_allclose(got, eager, rtol=1e-6, atol=1e-7)
    # The batch mean reduced across devices equals the single-device mean.
    pm = jax.pmap(
        lambda *a: jax.lax.pmean(per_example_xpo(*a, 0.01, 0.1).mean(), "data"),
        axis_name="data",
        in_axes=(0,) * 5,
    )(*(v.reshape(n, -1) for v in args))
    np.testing.assert_allclose(np.asarray(pm), eager.mean(), rtol=1e-6)


def test_hyperparameter_grid_vmap_equals_loop_with_one_compilation():
    x = make_xpo_inputs(10)
    args = [x["pi_y"], x["pi_ytilde"], x["ref_y"], x["ref_ytilde"], x["y_wins"]]
    alphas = jnp.array([0.0, 1e-3, 1e-2, 1e-1], jnp.float32)
    betas = jnp.array([0.05, 0.1, 0.5, 1.0], jnp.float32)

    def mean_loss(alpha, beta):
        return per_example_xpo(*args, alpha, beta).mean()

    grid_fn = jax.jit(jax.vmap(jax.vmap(mean_loss, in_axes=(None, 0)), in_axes=(0, None)))
    grid = np.asarray(grid_fn(alphas, betas))
    one = jax.jit(mean_loss)
    loop = np.array([[float(one(a, b)) for b in betas] for a in alphas])
    np.testing.assert_allclose(grid, loop, rtol=1e-6)
    assert grid_fn._cache_size() == 1
    assert one._cache_size() == 1, "changing alpha/beta values must not recompile"
    # label smoothing is traced too.
    ls_fn = jax.jit(lambda e: dpo_loss(x["pi_y"], x["ref_y"], beta=0.1, label_smoothing=e))
    for e in (0.0, 0.1, 0.2):
        ls_fn(e)
    assert ls_fn._cache_size() == 1


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    hw, hl = make_logratios(11)
    with pytest.raises(ValueError, match=r"beta must lie in \(0.0, inf\], got 0"):
        dpo_loss(hw, hl, beta=0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(hw, hl, beta=-0.1)
    with pytest.raises(ValueError, match="beta must be finite"):
        dpo_loss(hw, hl, beta=float("nan"))
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        dpo_loss(hw, hl, beta=0.1, loss_type="dpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(hw, hl, beta=0.1, label_smoothing=0.5)
    with pytest.raises(AssertionError, match="one shape"):
        dpo_loss(hw, hl[:-1], beta=0.1)
    with pytest.raises(AssertionError, match="batch vector"):
        dpo_loss(hw[:, None], hl[:, None], beta=0.1)
    with pytest.raises(TypeError, match="share a dtype"):
        dpo_loss(hw, hl.astype(np.float16), beta=0.1)
    with pytest.raises(TypeError, match="floating"):
        dpo_loss(hw.astype(np.int32), hl.astype(np.int32), beta=0.1)
    x = make_xpo_inputs(12)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0.0, inf\], got -0.1"):
        xpo_loss(**x, alpha=-0.1, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        xpo_loss(**x, alpha=0.1, beta=0.0)
    with pytest.raises(TypeError, match="y_wins must be a bool"):
        xpo_loss(**dict(x, y_wins=x["y_wins"].astype(np.int32)), alpha=0.1, beta=0.1)
    with pytest.raises(AssertionError, match="one shape"):
        xpo_loss(**dict(x, ref_y=x["ref_y"][:-1]), alpha=0.1, beta=0.1)
    with pytest.raises(TypeError, match="share a dtype"):
        xpo_loss(**dict(x, ref_ytilde=x["ref_ytilde"].astype(np.float16)), alpha=0.1, beta=0.1)
    with pytest.raises(ValueError, match="clip needs ref_ytilde"):
        xpo_bonus(x["pi_ytilde"], alpha=0.1, clip=1.0)
    with pytest.raises(ValueError, match="clip"):
        xpo_bonus(x["pi_ytilde"], alpha=0.1, ref_ytilde=x["ref_ytilde"], clip=0.0)
    # Traced hyperparameters are not checked (no host round-trip) but still compute.
    out = jax.jit(lambda b: dpo_loss(hw, hl, beta=b))(0.1)
    assert np.all(np.isfinite(np.asarray(out)))
