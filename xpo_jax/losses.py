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

Three losses couple the examples of a batch (they sort or average over axis 0): `aot`,
`aot_unpaired` and `bco_pair` (unless given `bco_delta`). Under `vmap` over examples or `shard_map`
they see only the examples of one call or one shard.
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
    "aot",
    "aot_unpaired",
    "bco_pair",
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
    ref_margins: Optional[Array] = None,
    bco_delta=None,
) -> Array:
    """Per-example DPO-family loss, [B] -> [B].

    Args:
      chosen_logratios: h(y_w) = log pi(y_w|x) - log pi_ref(y_w|x), shape [B].
      rejected_logratios: h(y_l), shape [B], same dtype.
      beta: inverse temperature / KL strength (> 0). Traced or concrete.
      loss_type: one of LOSS_TYPES (static).
      label_smoothing: eps, the assumed probability that a label is flipped (sigmoid, robust,
        exo_pair, aot, aot_unpaired); traced or concrete, in [0, 0.5).
      discopop_tau: temperature of DiscoPOP's mixing sigmoid (> 0).
      ref_margins: m_ref = log pi_ref(y_w|x) - log pi_ref(y_l|x), shape [B], same dtype. Required by
        `aot` (the log-ratios alone do not determine it); ignored by the other losses.
      bco_delta: scalar reward baseline of `bco_pair` (traced or concrete); None = the batch mean
        described there. Ignored by the other losses.

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
    aot       (AOT, Melnyk et al. 2024, arXiv 2406.05882, paired variant; TRL's "aot"): with the
               policy margins m = log pi(y_w) - log pi(y_l) = Delta + m_ref, each of m and m_ref
               sorted over the batch (axis 0) and d = sort(m) - sort(m_ref):
                                 -(1 - eps) s(beta d) - eps s(-beta d)
    aot_unpaired (AOT, unpaired variant; TRL's "aot_unpaired", called "aot_pair" in older TRL
               releases and in this module before it was renamed): h_w and h_l each sorted over
               the batch, d = sort(h_w) - sort(h_l), and the same expression as aot.
               Both AOT losses return values in sorted (rank) order, not in example order: only
               their batch mean is meaningful, so per-example weights do not line up with them.
    bco_pair  (TRL's "bco_pair", from BCO, Jung et al. 2024, arXiv 2404.04656), r = beta h:
                                 -s(r_w - delta) - s(-(r_l - delta))
               TRL 0.x takes delta as a running mean, over training steps, of the batch means of
               concat(r_w, r_l) (later TRL releases drop it: delta = 0). To stay pure we take
               delta = bco_delta when given (keep a running mean in the caller's state to match
               TRL 0.x, or pass 0.0) and otherwise stop_gradient(mean over the batch of
               concat(r_w, r_l)): TRL 0.x's value on its first step, detached as TRL's is.
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
    if ref_margins is not None:
        _check_logratio_pair(chosen_logratios, ref_margins, names=("chosen_logratios", "ref_margins"))
    elif loss_type == "aot":
        raise ValueError(
            "loss_type 'aot' needs ref_margins = log pi_ref(y_w|x) - log pi_ref(y_l|x), shape [B]: it sorts "
            "the reference margins, which chosen_logratios and rejected_logratios do not determine"
        )
    if bco_delta is not None:
        check_range("bco_delta", bco_delta)
        chex.assert_rank(bco_delta, 0, custom_message="bco_delta must be a scalar")

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
    if loss_type == "aot":
        # The policy margin is recovered as Delta + m_ref; sorting it and m_ref separately (not
        # their difference Delta, and not h_w and h_l) is what makes this the paired variant.
        z = beta * (jnp.sort(hw - hl + ref_margins, axis=0) - jnp.sort(ref_margins, axis=0))
        return -(1 - eps) * ls(z) - eps * ls(-z)
    if loss_type == "aot_unpaired":
        z = beta * (jnp.sort(hw, axis=0) - jnp.sort(hl, axis=0))
        return -(1 - eps) * ls(z) - eps * ls(-z)
    if loss_type == "bco_pair":
        rw, rl = beta * hw, beta * hl
        if bco_delta is None:
            # A baseline, not a learned quantity: TRL detaches its running mean, so no gradient.
            delta = jax.lax.stop_gradient(jnp.mean(jnp.concatenate([rw, rl])))
        else:
            delta = jnp.asarray(bco_delta, dtype)
        return -ls(rw - delta) - ls(-(rl - delta))
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


def vmax_clip_bounds(v_max, beta):
    """(clip_low, clip_high) = (-v_max / beta, v_max / beta), for `xpo_bonus` and `xpo_loss`.

    Xie et al. 2024 (XPO, arXiv 2405.21046) analyse a policy class whose log-ratios are bounded,
    |beta log pi(tau)/pi_ref(tau)| <= V_max for every policy in the class (the bounded density-ratio
    assumption behind their guarantees; V_max is of the order of the reward range R_max). Dividing
    by beta gives the window [-V_max/beta, V_max/beta] on log pi/pi_ref. Clipping the bonus's
    log-ratio of y~ to it enforces that bound where the bonus acts: a policy that has left the
    window on y~ gets no further push from the bonus. beta (and v_max) may be traced: the bounds
    are then traced too, and a sweep over beta neither recompiles nor needs concrete bounds.
    """
    check_range("v_max", v_max, low=0.0, low_open=True)
    check_range("beta", beta, low=0.0, low_open=True)
    return -v_max / beta, v_max / beta


def xpo_bonus(
    pi_ytilde: Array,
    *,
    alpha,
    ref_ytilde: Optional[Array] = None,
    clip=None,
    clip_low=None,
    clip_high=None,
    num_tokens: Optional[Array] = None,
) -> Array:
    """The XPO exploration term, per example [B] -> [B].

    Algorithm 1 of Xie et al. 2024 (XPO, arXiv 2405.21046) adds to the DPO objective

        alpha * log pi(y~|x),      y~ ~ pi_ref(.|x)   (Algorithm 2: any sampling policy pi~_t)

    which is what this returns by default (and what TRL's XPOTrainer computes). Sign: the term is
    *minimised*, so gradient descent lowers the policy's likelihood of the reference's own samples
    and pushes probability mass towards responses the reference rarely produces; that optimism is
    what makes XPO explore. alpha = 0 turns it off (online DPO). alpha is not multiplied by beta.

    Forms, with r = log pi(y~|x) - log pi_ref(y~|x):
      no ref_ytilde (default, TRL):  alpha * log pi(y~|x), unbounded.
      ref_ytilde, no bounds:         alpha * r, unclipped.
        These two differ by alpha * log pi_ref(y~|x), a constant of the policy: same gradient, the
        value only differs (the log-ratio form is 0 at pi = pi_ref).
      ref_ytilde and bounds:         alpha * min(max(r, clip_low), clip_high), the bounded form
        matching the paper's bounded log-ratio assumption (`vmax_clip_bounds` gives its window
        [-V_max/beta, V_max/beta]). The gradient is alpha * grad log pi(y~) inside the window and
        0 outside it.
        clip_low / clip_high: either may be None (unbounded on that side); Python numbers or
        scalar arrays, traced ones included. Concrete ones must be finite with clip_low < clip_high.
        clip=c is shorthand for (clip_low, clip_high) = (-c, c), c > 0; not with clip_low/high.
      num_tokens given: divide by max(num_tokens, 1), a length-normalised bonus.
    """
    check_range("alpha", alpha, low=0.0)
    if clip is not None:
        if clip_low is not None or clip_high is not None:
            raise ValueError(
                "xpo_bonus: pass clip (the symmetric window [-clip, clip]) or clip_low/clip_high, not both; "
                f"got clip={clip!r}, clip_low={clip_low!r}, clip_high={clip_high!r}"
            )
        check_range("clip", clip, low=0.0, low_open=True)
        clip_low, clip_high = -clip, clip
    for name, bound in (("clip_low", clip_low), ("clip_high", clip_high)):
        if bound is not None:
            check_range(name, bound)  # finite, when concrete
            chex.assert_rank(bound, 0, custom_message=f"{name} must be a scalar")
    low, high = _concrete(clip_low), _concrete(clip_high)
    if low is not None and high is not None and not low < high:
        raise ValueError(
            f"xpo_bonus: clip_low must be < clip_high, got clip_low={clip_low!r}, clip_high={clip_high!r}"
        )
    bounded = clip_low is not None or clip_high is not None
    if bounded and ref_ytilde is None:
        raise ValueError(
            "xpo_bonus: clip needs ref_ytilde (clip, clip_low and clip_high bound log pi/pi_ref of y~)"
        )
    if not jnp.issubdtype(jnp.asarray(pi_ytilde).dtype, jnp.floating):
        raise TypeError(f"pi_ytilde must be a floating array, got dtype {jnp.asarray(pi_ytilde).dtype}")
    chex.assert_rank(pi_ytilde, 1, custom_message="pi_ytilde must be a batch vector [B]")
    term = pi_ytilde
    if ref_ytilde is not None:
        _check_logratio_pair(pi_ytilde, ref_ytilde, names=("pi_ytilde", "ref_ytilde"))
        term = pi_ytilde - ref_ytilde
        if clip_low is not None:
            term = jnp.maximum(term, jnp.asarray(clip_low, term.dtype))
        if clip_high is not None:
            term = jnp.minimum(term, jnp.asarray(clip_high, term.dtype))
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
    bonus_clip_low=None,
    bonus_clip_high=None,
    bonus_logratio: bool = False,
    bonus_num_tokens: Optional[Array] = None,
    bco_delta=None,
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
      bonus_clip, bonus_clip_low, bonus_clip_high, bonus_num_tokens: forwarded to `xpo_bonus` as
        clip, clip_low, clip_high (traced or concrete) and num_tokens.
      bonus_logratio: static bool; True uses the log-ratio bonus alpha * log pi/pi_ref (y~)
        without clipping. Any clip bound implies the log-ratio form; with neither, the bonus is
        TRL's alpha * log pi(y~) (same gradient as the unclipped log-ratio, see `xpo_bonus`).
      bco_delta: forwarded to `dpo_loss` for loss_type "bco_pair". The reference margins that
        "aot" needs are computed here from ref_y, ref_ytilde and y_wins.

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
    if not isinstance(bonus_logratio, bool):
        raise TypeError(f"bonus_logratio must be a Python bool (static under jit), got {bonus_logratio!r}")

    h_y, h_yt = pi_y - ref_y, pi_ytilde - ref_ytilde
    chosen_h = jnp.where(y_wins, h_y, h_yt)
    rejected_h = jnp.where(y_wins, h_yt, h_y)
    # log pi_ref(y+) - log pi_ref(y-): only "aot" reads it (dpo_loss ignores it otherwise).
    ref_margins = jnp.where(y_wins, ref_y - ref_ytilde, ref_ytilde - ref_y)
    dpo = dpo_loss(
        chosen_h,
        rejected_h,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        ref_margins=ref_margins,
        bco_delta=bco_delta,
    )
    bounded = bonus_clip is not None or bonus_clip_low is not None or bonus_clip_high is not None
    bonus = xpo_bonus(
        pi_ytilde,
        alpha=alpha,
        ref_ytilde=ref_ytilde if (bonus_logratio or bounded) else None,
        clip=bonus_clip,
        clip_low=bonus_clip_low,
        clip_high=bonus_clip_high,
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
