"""Pure per-example preference losses: the DPO family, the XPO exploration bonus, and XPO itself.

Every function takes batch-first arrays and returns one value per example; reductions are left to
the caller, so the same code runs under `jit`, `vmap`, `grad`, `pmap` and `shard_map`.
Hyperparameters (beta, alpha, label_smoothing, ...) may be Python numbers or traced arrays: they
are used only as array operands, so changing them never recompiles and a sweep over them is a
`vmap`. Only `loss_type` is a static (Python) choice.

Notation. For a prompt x and a response y, the *log-ratio* of a response is

    h(y) = log pi(y|x) - log pi_ref(y|x)          (sequence log-probs: sums over response tokens)

and a preference pair is (y_w, y_l) = (chosen, rejected). Most losses are functions of the margin
Delta = h(y_w) - h(y_l).
"""
from __future__ import annotations

import numbers
from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "sppo_hard",
    "aot_pair",
    "apo_zero",
    "apo_down",
    "discopop",
)

# EXO needs a strictly positive target probability for the losing side; TRL substitutes 1e-3 when
# label_smoothing is 0 and so do we (the EXO paper uses a small epsilon).
EXO_DEFAULT_EPS = 1e-3


# ----------------------------------------------------------------------------------------------
# Argument checks. Values are checked only when concrete: a traced hyperparameter (inside jit or
# vmap) cannot be inspected without a host round-trip, and checking it there would defeat the
# point of tracing it.
# ----------------------------------------------------------------------------------------------


def _concrete(x) -> Optional[np.ndarray]:
    """x as a numpy array if its value is known at trace time, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, (numbers.Number, np.ndarray, np.generic, jax.Array)):
        return np.asarray(x)
    return None


def check_range(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> None:
    """Raise ValueError naming `name` when a concrete `value` leaves [low, high] (or open ends)."""
    v = _concrete(value)
    if v is None:
        return
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    bad = np.zeros(v.shape, bool)
    if low is not None:
        bad |= (v <= low) if low_open else (v < low)
    if high is not None:
        bad |= (v >= high) if high_open else (v > high)
    if np.any(bad):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def _check_logratio_pair(a: Array, b: Array, names=("chosen_logratios", "rejected_logratios")) -> None:
    for name, x in zip(names, (a, b)):
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {jnp.asarray(x).dtype}")
    if jnp.asarray(a).dtype != jnp.asarray(b).dtype:
        raise TypeError(f"{names[0]} and {names[1]} must share a dtype, got {a.dtype} and {b.dtype}")
    chex.assert_rank(a, 1, custom_message=f"{names[0]} must be a batch vector [B]")
    chex.assert_equal_shape((a, b), custom_message=f"{names[0]} and {names[1]} must have one shape")


# ----------------------------------------------------------------------------------------------
# DPO family
# ----------------------------------------------------------------------------------------------


def dpo_loss(
    chosen_logratios: Array,
    rejected_logratios: Array,
    *,
    beta,
    loss_type: str = "sigmoid",
    label_smoothing=0.0,
    discopop_tau=0.05,
) -> Array:
    """Per-example DPO-family loss, [B] -> [B].

    Args:
      chosen_logratios: h(y_w) = log pi(y_w|x) - log pi_ref(y_w|x), shape [B].
      rejected_logratios: h(y_l), shape [B], same dtype.
      beta: inverse temperature / KL strength (> 0). Traced or concrete.
      loss_type: one of LOSS_TYPES (static).
      label_smoothing: eps, the assumed probability that a label is flipped (sigmoid, robust,
        exo_pair, aot_pair); traced or concrete, in [0, 0.5).
      discopop_tau: temperature of DiscoPOP's mixing sigmoid (> 0).

    With Delta = h(y_w) - h(y_l), s = log sigmoid and eps = label_smoothing:

    sigmoid   (DPO, Rafailov et al. 2023, arXiv 2305.18290; conservative DPO / cDPO when eps > 0,
               Mitchell 2023):   -(1 - eps) s(beta Delta) - eps s(-beta Delta)
    ipo       (Azar et al. 2023, arXiv 2310.12036, eq. 17; beta plays tau):
                                 (Delta - 1/(2 beta))^2
               Not length-normalised here: pass per-token log-ratios for TRL DPOTrainer's variant.
    hinge     (SLiC, Zhao et al. 2023, arXiv 2305.10425):   max(0, 1 - beta Delta)
    robust    (rDPO, Chowdhury et al. 2024, arXiv 2403.00409, eq. 5):
                                 [-(1 - eps) s(beta Delta) + eps s(-beta Delta)] / (1 - 2 eps)
    exo_pair  (EXO, Ji et al. 2024, arXiv 2402.00856, eq. 16; eps defaults to 1e-3 when 0):
                                 q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps),
               with q_w = sigmoid(beta Delta), q_l = sigmoid(-beta Delta)
    nca_pair  (NCA, Chen et al. 2024, arXiv 2402.05369), r = beta h:
                                 -s(r_w) - s(-r_w)/2 - s(-r_l)/2
    sppo_hard (SPPO, Wu et al. 2024, arXiv 2405.00675, hard labels P(win)=1, P(lose)=0):
                                 (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2
    aot_pair  (AOT, Melnyk et al. 2024, arXiv 2406.05882, paired variant; TRL's aot_unpaired):
               h_w and h_l are each sorted over the batch (axis 0) and d = sort(h_w) - sort(h_l):
                                 -(1 - eps) s(beta d) - eps s(-beta d)
               This one couples the examples of a batch: under shard_map it sorts per shard.
    apo_zero  (APO, D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7):
                                 1 - sigmoid(beta h_w) + sigmoid(beta h_l)
    apo_down  (APO, eq. 8):      sigmoid(beta h_w) + 1 - sigmoid(beta (h_w - h_l))
    discopop  (DiscoPOP / LRML, Chris Lu et al. 2024, arXiv 2406.08414, eq. 5), z = beta Delta:
                                 -s(z) (1 - sigmoid(z/tau)) + exp(-z) sigmoid(z/tau)
               computed as exp(-z + s(z/tau)) so a very negative z does not give inf * 0.

    All terms use log-sigmoid and sigmoid, never log(sigmoid(.)), so large margins neither
    overflow nor produce NaN.
    """
    _check_loss_type(loss_type)
    check_range("beta", beta, low=0.0, low_open=True)
    check_range("discopop_tau", discopop_tau, low=0.0, low_open=True)
    smoothing_high = 0.5
    check_range("label_smoothing", label_smoothing, low=0.0, high=smoothing_high, high_open=True)
    _check_logratio_pair(chosen_logratios, rejected_logratios)

    hw, hl = chosen_logratios, rejected_logratios
    dtype = hw.dtype
    beta = jnp.asarray(beta, dtype)
    eps = jnp.asarray(label_smoothing, dtype)
    ls = jax.nn.log_sigmoid

    if loss_type == "sigmoid":
        z = beta * (hw - hl)
        return -(1 - eps) * ls(z) - eps * ls(-z)
    if loss_type == "ipo":
        return (hw - hl - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return jax.nn.relu(1 - beta * (hw - hl))
    if loss_type == "robust":
        z = beta * (hw - hl)
        return (-(1 - eps) * ls(z) + eps * ls(-z)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        eps = jnp.where(eps == 0, jnp.asarray(EXO_DEFAULT_EPS, dtype), eps)
        z = beta * (hw - hl)
        return jax.nn.sigmoid(z) * (ls(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (ls(-z) - jnp.log(eps))
    if loss_type == "nca_pair":
        rw, rl = beta * hw, beta * hl
        return -ls(rw) - 0.5 * ls(-rw) - 0.5 * ls(-rl)
    if loss_type == "sppo_hard":
        return (hw - 0.5 / beta) ** 2 + (hl + 0.5 / beta) ** 2
    if loss_type == "aot_pair":
        z = beta * (jnp.sort(hw, axis=0) - jnp.sort(hl, axis=0))
        return -(1 - eps) * ls(z) - eps * ls(-z)
    if loss_type == "apo_zero":
        return 1 - jax.nn.sigmoid(beta * hw) + jax.nn.sigmoid(beta * hl)
    if loss_type == "apo_down":
        return jax.nn.sigmoid(beta * hw) + 1 - jax.nn.sigmoid(beta * (hw - hl))
    if loss_type == "discopop":
        z = beta * (hw - hl)
        tau = jnp.asarray(discopop_tau, dtype)
        return -ls(z) * jax.nn.sigmoid(-z / tau) + jnp.exp(-z + ls(z / tau))
    raise AssertionError(loss_type)  # unreachable: _check_loss_type covers LOSS_TYPES


# ----------------------------------------------------------------------------------------------
# XPO
# ----------------------------------------------------------------------------------------------


def xpo_bonus(
    pi_ytilde: Array,
    *,
    alpha,
    ref_ytilde: Optional[Array] = None,
    clip=None,
    num_tokens: Optional[Array] = None,
) -> Array:
    """The XPO exploration term, per example [B] -> [B].

    Algorithm 1 of Xie et al. 2024 (XPO, arXiv 2405.21046) adds to the DPO objective

        alpha * log pi(y~|x),      y~ ~ pi_ref(.|x)   (Algorithm 2: any sampling policy pi~_t)

    which is what this returns by default (and what TRL's XPOTrainer computes). Sign: the term is
    *minimised*, so gradient descent lowers the policy's likelihood of the reference's own samples
    and pushes probability mass towards responses the reference rarely produces; that optimism is
    what makes XPO explore. alpha = 0 turns it off (online DPO). alpha is not multiplied by beta.

    Variants:
      ref_ytilde given: use the log-ratio log pi(y~|x) - log pi_ref(y~|x) instead of log pi(y~|x)
        (same gradient; the value is centred at 0 for pi = pi_ref).
      clip given (requires ref_ytilde): alpha * clip(log pi/pi_ref (y~), -clip, clip), the bounded
        form of the bonus used in the paper's analysis; the gradient vanishes once the policy has
        moved `clip` nats from the reference on y~.
      num_tokens given: divide by max(num_tokens, 1), a length-normalised bonus.
    """
    check_range("alpha", alpha, low=0.0)
    if clip is not None:
        check_range("clip", clip, low=0.0, low_open=True)
        if ref_ytilde is None:
            raise ValueError("xpo_bonus: clip needs ref_ytilde (it clips log pi/pi_ref of y~)")
    if not jnp.issubdtype(jnp.asarray(pi_ytilde).dtype, jnp.floating):
        raise TypeError(f"pi_ytilde must be a floating array, got dtype {jnp.asarray(pi_ytilde).dtype}")
    chex.assert_rank(pi_ytilde, 1, custom_message="pi_ytilde must be a batch vector [B]")
    term = pi_ytilde
    if ref_ytilde is not None:
        _check_logratio_pair(pi_ytilde, ref_ytilde, names=("pi_ytilde", "ref_ytilde"))
        term = pi_ytilde - ref_ytilde
        if clip is not None:
            c = jnp.asarray(clip, term.dtype)
            term = jnp.clip(term, -c, c)
    if num_tokens is not None:
        chex.assert_shape(num_tokens, pi_ytilde.shape, custom_message="num_tokens must be [B]")
        term = term / jnp.maximum(jnp.asarray(num_tokens, term.dtype), 1)
    return jnp.asarray(alpha, term.dtype) * term


def xpo_loss(
    *,
    pi_y: Array,
    pi_ytilde: Array,
    ref_y: Array,
    ref_ytilde: Array,
    y_wins: Array,
    alpha,
    beta,
    loss_type: str = "sigmoid",
    label_smoothing=0.0,
    bonus_clip=None,
    bonus_num_tokens: Optional[Array] = None,
) -> tuple[Array, dict[str, Array]]:
    """Per-example XPO loss (Xie et al. 2024, arXiv 2405.21046, Algorithm 1), with metrics.

    y is the policy's sample and y~ the exploration sample (from pi_ref in Algorithm 1). The
    oracle's verdict `y_wins` (ties count as y winning, as in TRL) orders the pair:

        (y+, y-) = (y, y~) if y_wins else (y~, y)
        loss = dpo_loss(h(y+), h(y-); beta, loss_type)  +  alpha * log pi(y~|x)

    i.e. for the sigmoid loss

        alpha * log pi(y~|x) - log sigmoid(beta [log pi/pi_ref (y+) - log pi/pi_ref (y-)]).

    alpha = 0 is online DPO. The bonus always acts on y~, whichever side of the pair it lands.
    All log-probs are sequence log-probs (sums over response tokens, EOS included, padding
    excluded). As in TRL's XPOTrainer, the IPO variant is not length-normalised here.

    Args:
      pi_y, pi_ytilde: log pi(y|x), log pi(y~|x) under the policy being trained, [B].
      ref_y, ref_ytilde: the same under the reference policy, [B] (no gradient is taken through
        them by this function's callers; it does not stop gradients itself).
      y_wins: [B] bool, True where the oracle preferred y over y~.
      alpha, beta, label_smoothing: traced or concrete hyperparameters.
      bonus_clip, bonus_num_tokens: forwarded to `xpo_bonus` (clip and length-normalisation).

    Returns:
      (loss [B], metrics) with per-example metrics [B] under TRL's names: `rewards/chosen`,
      `rewards/rejected` (beta * log-ratios), `rewards/margins`, `rewards/accuracies` (margin > 0),
      `logps/chosen`, `logps/rejected` (the *policy's* log-probs; TRL logs policy + reference by
      mistake), `loss/dpo`, `loss/xpo`. Average them (with any weights) in the caller.
    """
    for name, x in (("pi_ytilde", pi_ytilde), ("ref_y", ref_y), ("ref_ytilde", ref_ytilde)):
        _check_logratio_pair(pi_y, x, names=("pi_y", name))
    y_wins = jnp.asarray(y_wins)
    if y_wins.dtype != jnp.bool_:
        raise TypeError(f"y_wins must be a bool array, got dtype {y_wins.dtype}")
    chex.assert_shape(y_wins, pi_y.shape, custom_message="y_wins must be [B] like pi_y")

    h_y, h_yt = pi_y - ref_y, pi_ytilde - ref_ytilde
    chosen_h = jnp.where(y_wins, h_y, h_yt)
    rejected_h = jnp.where(y_wins, h_yt, h_y)
    dpo = dpo_loss(chosen_h, rejected_h, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    bonus = xpo_bonus(
        pi_ytilde,
        alpha=alpha,
        ref_ytilde=ref_ytilde if bonus_clip is not None else None,
        clip=bonus_clip,
        num_tokens=bonus_num_tokens,
    )
    b = jnp.asarray(beta, h_y.dtype)
    r_chosen, r_rejected = b * chosen_h, b * rejected_h
    metrics = {
        "rewards/chosen": r_chosen,
        "rewards/rejected": r_rejected,
        "rewards/margins": r_chosen - r_rejected,
        "rewards/accuracies": (r_chosen > r_rejected).astype(h_y.dtype),
        "logps/chosen": jnp.where(y_wins, pi_y, pi_ytilde),
        "logps/rejected": jnp.where(y_wins, pi_ytilde, pi_y),
        "loss/dpo": dpo,
        "loss/xpo": bonus,
    }
    return dpo + bonus, metrics
