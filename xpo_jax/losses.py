"""Pure per-example preference losses: the DPO family, the XPO exploration bonus, and XPO itself.

Every function takes batch-first arrays and returns one value per example; reductions are left to
the caller, so the same code runs under `jit`, `vmap`, `grad`, `pmap` and `shard_map`.
Hyperparameters (beta, alpha, a loss's own parameters) may be Python numbers or traced arrays:
they are used only as array operands, so changing them never recompiles and a sweep over them is
a `vmap`. Only the choice of loss and bonus form is static (Python).

Notation. For a prompt x and a response y, the *log-ratio* of a response is

    h(y) = log pi(y|x) - log pi_ref(y|x)          (sequence log-probs: sums over response tokens)

and a preference pair is (y_w, y_l) = (chosen, rejected). Most losses are functions of the margin
Delta = h(y_w) - h(y_l).

Registries. Each loss is one function registered with `@register_loss(name)`:

    @register_loss("my_margin")
    def my_margin(chosen_logratios, rejected_logratios, *, beta, gamma=0.5):
        return -jax.nn.log_sigmoid(beta * (chosen_logratios - rejected_logratios) - gamma)

Its keyword-only arguments other than `beta` (and `ref_margins`, which the round supplies when
the function asks for it) are its hyperparameters, their defaults the defaults: the online round
passes them as traced arrays (`TrainConfig.loss_params`, `--loss-param gamma=0.3`), so a sweep over
them is one compiled program. `--loss-type mymodule:my_margin` names a user's loss without
registering it. Bonus forms (`register_bonus`) work the same way on (log pi(y~), log pi_ref(y~)).

Three losses couple the examples of a batch (they sort or average over axis 0): `aot`,
`aot_unpaired` and `bco_pair` (unless batch_baseline = 0). Under `vmap` over examples or
`shard_map` they see only the examples of one call or one shard.
"""
from __future__ import annotations

import dataclasses
import inspect
import numbers
from typing import Any, Callable, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from xpo_jax.registry import Registry

Array = jax.Array

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


def _check_logratio_pair(a: Array, b: Array, names=("chosen_logratios", "rejected_logratios")) -> None:
    for name, x in zip(names, (a, b)):
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {jnp.asarray(x).dtype}")
    if jnp.asarray(a).dtype != jnp.asarray(b).dtype:
        raise TypeError(f"{names[0]} and {names[1]} must share a dtype, got {a.dtype} and {b.dtype}")
    chex.assert_rank(a, 1, custom_message=f"{names[0]} must be a batch vector [B]")
    chex.assert_equal_shape((a, b), custom_message=f"{names[0]} and {names[1]} must have one shape")


# ----------------------------------------------------------------------------------------------
# The registries
# ----------------------------------------------------------------------------------------------

# Arguments the caller supplies, not hyperparameters of the function.
_LOSS_INPUTS = ("beta", "ref_margins")
_BONUS_INPUTS = ("beta",)


@dataclasses.dataclass(frozen=True)
class Term:
    """A registered loss or bonus form: the function, its hyperparameters and their defaults
    (`REQUIRED` where the function has none), and whether it reads the reference margins."""

    name: str
    fn: Callable
    params: Mapping[str, Any]
    needs_ref_margins: bool = False

    def resolved(self, given: Optional[Mapping[str, Any]] = None) -> dict:
        """Every hyperparameter of this term: its default, or the value in `given`. ValueError
        naming an unknown or missing one."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise ValueError(f"{self.name!r} has no hyperparameter {', '.join(map(repr, unknown))} (its "
                             f"hyperparameters: {known})")
        out = {k: given.get(k, v) for k, v in self.params.items()}
        missing = [k for k, v in out.items() if v is REQUIRED]
        if missing:
            raise ValueError(f"{self.name!r} needs a value for {', '.join(map(repr, missing))}")
        return out


REQUIRED = inspect.Parameter.empty  # a hyperparameter without a default


def _term(fn: Callable, name: str, inputs: tuple) -> Term:
    """A Term from a function's signature: its keyword-only arguments other than `inputs` are
    the hyperparameters (defaults from the signature)."""
    if not callable(fn):
        raise ValueError(f"{name!r} is a {type(fn).__name__}, expected a function")
    sig = inspect.signature(fn)
    kw = {p.name: p for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
    if "beta" not in kw:
        raise ValueError(f"{name!r}: the function must take beta as a keyword-only argument (def f(a, b, *, beta, ...))")
    params = {k: p.default for k, p in kw.items() if k not in inputs}
    return Term(name, fn, params, needs_ref_margins="ref_margins" in kw)


def _as_term(inputs: tuple) -> Callable[[Any, str], Term]:
    def convert(obj, spec):
        return obj if isinstance(obj, Term) else getattr(obj, "xpo_term", None) or _term(obj, spec, inputs)

    return convert


LOSSES: Registry[Term] = Registry("loss_type", _as_term(_LOSS_INPUTS))
BONUSES: Registry[Term] = Registry("bonus", _as_term(_BONUS_INPUTS))


def _registrar(registry: Registry, inputs: tuple, name: Optional[str], overwrite: bool) -> Callable:
    def add(fn):
        term = _term(fn, name or fn.__name__, inputs)
        registry.add(term.name, term, overwrite=overwrite)
        fn.xpo_term = term  # so "module:function" finds the registered term
        return fn

    return add


def register_loss(name: Optional[str] = None, *, overwrite: bool = False) -> Callable:
    """Decorator: register `fn(chosen_logratios, rejected_logratios, *, beta, [ref_margins],
    **hyperparameters) -> [B]` as the loss `name` (default: the function's name)."""
    return _registrar(LOSSES, _LOSS_INPUTS, name, overwrite)


def register_bonus(name: Optional[str] = None, *, overwrite: bool = False) -> Callable:
    """Decorator: register `fn(pi_ytilde, ref_ytilde, *, beta, **hyperparameters) -> [B]` (the
    bonus before alpha) as the bonus form `name`."""
    return _registrar(BONUSES, _BONUS_INPUTS, name, overwrite)


def resolve_loss(loss_type: str) -> Term:
    """A registered loss by name, or a user's function as "module:function"."""
    return LOSSES.resolve(loss_type)


def resolve_bonus(bonus: str) -> Term:
    """A registered bonus form by name, or a user's function as "module:function"."""
    return BONUSES.resolve(bonus)


def check_params(term: Term, params: Optional[Mapping[str, Any]] = None, beta: float = 0.1) -> dict:
    """`term.resolved(params)`, then the function traced once on a tiny abstract batch with the
    values concrete, so that its own range checks (`check_range`) refuse a bad value now, before
    anything compiles. Abstract (`eval_shape`): validation must not start JAX's backend, which a
    multi-process run initialises only after `initialize_distributed()`."""
    values = term.resolved(params)
    z = jax.ShapeDtypeStruct((2,), np.float32)

    def run(hw, hl, margins):
        extra = {"ref_margins": margins} if term.needs_ref_margins else {}
        return term.fn(hw, hl, beta=beta, **extra, **values)

    jax.eval_shape(run, z, z, z)
    return values


# ----------------------------------------------------------------------------------------------
# The DPO family: one function per loss. hw, hl = chosen and rejected log-ratios h(y_w), h(y_l);
# s = log sigmoid. All terms use log-sigmoid and sigmoid, never log(sigmoid(.)), so large margins
# neither overflow nor produce NaN.
# ----------------------------------------------------------------------------------------------


def _pair(hw: Array, hl: Array, beta) -> Array:
    """Shape and dtype checks of a loss's inputs (first lines of every loss); beta as an array."""
    _check_logratio_pair(hw, hl)
    check_range("beta", beta, low=0.0, low_open=True)
    return jnp.asarray(beta, hw.dtype)


def _smoothing(label_smoothing, dtype) -> Array:
    check_range("label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    return jnp.asarray(label_smoothing, dtype)


_ls = jax.nn.log_sigmoid


def _smoothed_bce(z: Array, eps: Array) -> Array:
    return -(1 - eps) * _ls(z) - eps * _ls(-z)


@register_loss("sigmoid")
def sigmoid_loss(hw, hl, *, beta, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290); conservative DPO / cDPO when eps > 0
    (Mitchell 2023), eps = label_smoothing in [0, 0.5):

        -(1 - eps) s(beta Delta) - eps s(-beta Delta)
    """
    b = _pair(hw, hl, beta)
    return _smoothed_bce(b * (hw - hl), _smoothing(label_smoothing, hw.dtype))


@register_loss("ipo")
def ipo_loss(hw, hl, *, beta):
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17; beta plays tau):  (Delta - 1/(2 beta))^2.
    Not length-normalised here: pass per-token log-ratios for TRL DPOTrainer's variant."""
    b = _pair(hw, hl, beta)
    return (hw - hl - 1 / (2 * b)) ** 2


@register_loss("hinge")
def hinge_loss(hw, hl, *, beta):
    """SLiC (Zhao et al. 2023, arXiv 2305.10425):  max(0, 1 - beta Delta)."""
    b = _pair(hw, hl, beta)
    return jax.nn.relu(1 - b * (hw - hl))


@register_loss("robust")
def robust_loss(hw, hl, *, beta, label_smoothing=0.0):
    """rDPO (Chowdhury et al. 2024, arXiv 2403.00409, eq. 5), eps = label_smoothing, the flip rate:

        [-(1 - eps) s(beta Delta) + eps s(-beta Delta)] / (1 - 2 eps)
    """
    b = _pair(hw, hl, beta)
    eps = _smoothing(label_smoothing, hw.dtype)
    z = b * (hw - hl)
    return (-(1 - eps) * _ls(z) + eps * _ls(-z)) / (1 - 2 * eps)


@register_loss("exo_pair")
def exo_pair_loss(hw, hl, *, beta, label_smoothing=0.0):
    """EXO (Ji et al. 2024, arXiv 2402.00856, eq. 16), eps = label_smoothing (1e-3 when 0, as TRL):

        q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps),
        q_w = sigmoid(beta Delta), q_l = sigmoid(-beta Delta)
    """
    b = _pair(hw, hl, beta)
    eps = _smoothing(label_smoothing, hw.dtype)
    eps = jnp.where(eps == 0, jnp.asarray(EXO_DEFAULT_EPS, hw.dtype), eps)
    z = b * (hw - hl)
    return jax.nn.sigmoid(z) * (_ls(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (_ls(-z) - jnp.log(eps))


@register_loss("nca_pair")
def nca_pair_loss(hw, hl, *, beta):
    """NCA (Chen et al. 2024, arXiv 2402.05369), r = beta h:  -s(r_w) - s(-r_w)/2 - s(-r_l)/2."""
    b = _pair(hw, hl, beta)
    rw, rl = b * hw, b * hl
    return -_ls(rw) - 0.5 * _ls(-rw) - 0.5 * _ls(-rl)


@register_loss("sppo_hard")
def sppo_hard_loss(hw, hl, *, beta):
    """SPPO (Wu et al. 2024, arXiv 2405.00675), hard labels P(win) = 1, P(lose) = 0:

        (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2
    """
    b = _pair(hw, hl, beta)
    return (hw - 0.5 / b) ** 2 + (hl + 0.5 / b) ** 2


@register_loss("aot")
def aot_loss(hw, hl, *, beta, ref_margins, label_smoothing=0.0):
    """AOT (Melnyk et al. 2024, arXiv 2406.05882), paired variant (TRL's "aot"). With the policy
    margins m = log pi(y_w) - log pi(y_l) = Delta + m_ref, m_ref = log pi_ref(y_w) - log
    pi_ref(y_l) (`ref_margins` [B]), each sorted over the batch (axis 0), d = sort(m) -
    sort(m_ref):   -(1 - eps) s(beta d) - eps s(-beta d).
    Returns values in sorted (rank) order: only the batch mean is meaningful."""
    b = _pair(hw, hl, beta)
    if ref_margins is None:
        raise ValueError(
            "loss_type 'aot' needs ref_margins = log pi_ref(y_w|x) - log pi_ref(y_l|x), shape [B]: it sorts "
            "the reference margins, which chosen_logratios and rejected_logratios do not determine")
    _check_logratio_pair(hw, ref_margins, names=("chosen_logratios", "ref_margins"))
    # The policy margin is recovered as Delta + m_ref; sorting it and m_ref separately (not their
    # difference Delta, and not h_w and h_l) is what makes this the paired variant.
    d = jnp.sort(hw - hl + ref_margins, axis=0) - jnp.sort(ref_margins, axis=0)
    return _smoothed_bce(b * d, _smoothing(label_smoothing, hw.dtype))


@register_loss("aot_unpaired")
def aot_unpaired_loss(hw, hl, *, beta, label_smoothing=0.0):
    """AOT, unpaired variant (TRL's "aot_unpaired", "aot_pair" in older TRL releases): h_w and
    h_l each sorted over the batch, d = sort(h_w) - sort(h_l), and the expression of `aot_loss`.
    Returns values in sorted (rank) order: only the batch mean is meaningful."""
    b = _pair(hw, hl, beta)
    d = jnp.sort(hw, axis=0) - jnp.sort(hl, axis=0)
    return _smoothed_bce(b * d, _smoothing(label_smoothing, hw.dtype))


@register_loss("bco_pair")
def bco_pair_loss(hw, hl, *, beta, batch_baseline=1.0, delta=0.0):
    """TRL's "bco_pair", from BCO (Jung et al. 2024, arXiv 2404.04656), r = beta h:

        -s(r_w - d) - s(-(r_l - d)),   d = w * stop_gradient(mean(concat(r_w, r_l))) + (1 - w) * delta

    with w = batch_baseline in [0, 1]. TRL 0.x takes d as a running mean over training steps of
    the batch means of concat(r_w, r_l), detached; w = 1 (default) is its value on the first step
    (pure: no state), w = 0 a fixed baseline `delta` (keep a running mean in your own state and
    pass it, or 0 as later TRL releases do)."""
    b = _pair(hw, hl, beta)
    check_range("batch_baseline", batch_baseline, low=0.0, high=1.0)
    check_range("delta", delta)
    rw, rl = b * hw, b * hl
    w = jnp.asarray(batch_baseline, hw.dtype)
    # A baseline, not a learned quantity: TRL detaches it, so no gradient flows through it.
    d = w * jax.lax.stop_gradient(jnp.mean(jnp.concatenate([rw, rl]))) + (1 - w) * jnp.asarray(delta, hw.dtype)
    return -_ls(rw - d) - _ls(-(rl - d))


@register_loss("apo_zero")
def apo_zero_loss(hw, hl, *, beta):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7):
    1 - sigmoid(beta h_w) + sigmoid(beta h_l)."""
    b = _pair(hw, hl, beta)
    return 1 - jax.nn.sigmoid(b * hw) + jax.nn.sigmoid(b * hl)


@register_loss("apo_down")
def apo_down_loss(hw, hl, *, beta):
    """APO-down (arXiv 2408.06266, eq. 8):  sigmoid(beta h_w) + 1 - sigmoid(beta (h_w - h_l))."""
    b = _pair(hw, hl, beta)
    return jax.nn.sigmoid(b * hw) + 1 - jax.nn.sigmoid(b * (hw - hl))


@register_loss("discopop")
def discopop_loss(hw, hl, *, beta, tau=0.05):
    """DiscoPOP / LRML (Chris Lu et al. 2024, arXiv 2406.08414, eq. 5), z = beta Delta, tau > 0:

        -s(z) (1 - sigmoid(z/tau)) + exp(-z) sigmoid(z/tau)

    computed as exp(-z + s(z/tau)) so a very negative z does not give inf * 0."""
    b = _pair(hw, hl, beta)
    check_range("tau", tau, low=0.0, low_open=True)
    z = b * (hw - hl)
    t = jnp.asarray(tau, hw.dtype)
    return -_ls(z) * jax.nn.sigmoid(-z / t) + jnp.exp(-z + _ls(z / t))


# The built-in losses, in registration order. `LOSSES.names()` also lists users' losses.
LOSS_TYPES = LOSSES.names()


def _scalars(params: Mapping[str, Any]) -> dict:
    """Hyperparameters are scalars (one value per call; a sweep vmaps over them)."""
    for k, v in params.items():
        if np.ndim(v) != 0:
            raise ValueError(f"{k} must be a scalar, got shape {np.shape(v)}")
    return dict(params)


def dpo_loss(chosen_logratios: Array, rejected_logratios: Array, *, beta, loss_type: str = "sigmoid",
             ref_margins: Optional[Array] = None, **loss_params) -> Array:
    """Per-example DPO-family loss [B] -> [B]: the registered `loss_type` (a name of LOSSES, or
    "module:function") with its hyperparameters `loss_params` (traced or concrete; each loss's
    docstring gives its formula, paper and hyperparameters).

    Args:
      chosen_logratios: h(y_w) = log pi(y_w|x) - log pi_ref(y_w|x), shape [B].
      rejected_logratios: h(y_l), shape [B], same dtype.
      beta: inverse temperature / KL strength (> 0). Traced or concrete.
      ref_margins: m_ref = log pi_ref(y_w|x) - log pi_ref(y_l|x), [B]: passed to losses that
        take it (`aot`), ignored by the others.
      **loss_params: the loss's own hyperparameters (e.g. label_smoothing=0.1 for sigmoid);
        one it does not declare is an error naming its hyperparameters.
    """
    term = resolve_loss(loss_type)
    params = _scalars(term.resolved(loss_params))
    extra = {"ref_margins": ref_margins} if term.needs_ref_margins else {}
    return term.fn(chosen_logratios, rejected_logratios, beta=beta, **extra, **params)


# ----------------------------------------------------------------------------------------------
# XPO: the exploration bonus forms and the loss
# ----------------------------------------------------------------------------------------------


def _bonus_inputs(pi_ytilde: Array, ref_ytilde: Array) -> None:
    _check_logratio_pair(pi_ytilde, ref_ytilde, names=("pi_ytilde", "ref_ytilde"))


@register_bonus("logprob")
def logprob_bonus(pi_ytilde, ref_ytilde, *, beta):
    """log pi(y~|x): Algorithm 1's term as written, and TRL XPOTrainer's. Unbounded."""
    _bonus_inputs(pi_ytilde, ref_ytilde)
    return pi_ytilde


@register_bonus("logratio")
def logratio_bonus(pi_ytilde, ref_ytilde, *, beta):
    """log pi(y~|x) - log pi_ref(y~|x): the same gradient as `logprob` (they differ by a constant
    of the policy), 0 at pi = pi_ref."""
    _bonus_inputs(pi_ytilde, ref_ytilde)
    return pi_ytilde - ref_ytilde


@register_bonus("clip")
def clip_bonus(pi_ytilde, ref_ytilde, *, beta, clip_low=-1.0, clip_high=1.0):
    """min(max(log pi/pi_ref(y~), clip_low), clip_high): the bounded form. Its gradient is
    grad log pi(y~) inside the window and 0 outside it (a policy that has left the window on y~
    gets no further push from the bonus). Bounds finite with clip_low < clip_high."""
    _bonus_inputs(pi_ytilde, ref_ytilde)
    check_range("clip_low", clip_low)
    check_range("clip_high", clip_high)
    low, high = _concrete(clip_low), _concrete(clip_high)
    if low is not None and high is not None and not np.all(low < high):
        raise ValueError(f"clip_low must be < clip_high, got clip_low={clip_low!r}, clip_high={clip_high!r}")
    r = pi_ytilde - ref_ytilde
    return jnp.minimum(jnp.maximum(r, jnp.asarray(clip_low, r.dtype)), jnp.asarray(clip_high, r.dtype))


@register_bonus("vmax")
def vmax_bonus(pi_ytilde, ref_ytilde, *, beta, v_max=REQUIRED):
    """The log-ratio clipped to the paper's window [-V_max/beta, V_max/beta] (`vmax_clip_bounds`);
    v_max > 0 is the reward range (a task run takes its own when none is given)."""
    low, high = vmax_clip_bounds(v_max, beta)
    return clip_bonus(pi_ytilde, ref_ytilde, beta=beta, clip_low=low, clip_high=high)


def vmax_clip_bounds(v_max, beta):
    """(clip_low, clip_high) = (-v_max / beta, v_max / beta).

    Xie et al. 2024 (XPO, arXiv 2405.21046) analyse a policy class whose log-ratios are bounded,
    |beta log pi(tau)/pi_ref(tau)| <= V_max for every policy in the class (the bounded density-ratio
    assumption behind their guarantees; V_max is of the order of the reward range R_max). Dividing
    by beta gives the window [-V_max/beta, V_max/beta] on log pi/pi_ref. beta (and v_max) may be
    traced: the bounds are then traced too, and a sweep over beta neither recompiles nor needs
    concrete bounds.
    """
    check_range("v_max", v_max, low=0.0, low_open=True)
    check_range("beta", beta, low=0.0, low_open=True)
    return -v_max / beta, v_max / beta


def xpo_bonus(pi_ytilde: Array, ref_ytilde: Array, *, alpha, beta, bonus: str = "logprob", **bonus_params) -> Array:
    """The XPO exploration term, per example [B] -> [B]:  alpha * bonus(y~).

    Algorithm 1 of Xie et al. 2024 (XPO, arXiv 2405.21046) adds to the DPO objective

        alpha * log pi(y~|x),      y~ ~ pi_ref(.|x)   (Algorithm 2: any sampling policy pi~_t)

    (`bonus="logprob"`, TRL's XPOTrainer). Sign: the term is *minimised*, so gradient descent
    lowers the policy's likelihood of the reference's own samples and pushes probability mass
    towards responses the reference rarely produces; that optimism is what makes XPO explore.
    alpha = 0 turns it off. alpha is not multiplied by beta. `bonus` names a registered form
    (logprob, logratio, clip, vmax: see their docstrings) or "module:function";
    `bonus_params` are its hyperparameters (traced or concrete).
    """
    check_range("alpha", alpha, low=0.0)
    if not jnp.issubdtype(jnp.asarray(pi_ytilde).dtype, jnp.floating):
        raise TypeError(f"pi_ytilde must be a floating array, got dtype {jnp.asarray(pi_ytilde).dtype}")
    chex.assert_rank(pi_ytilde, 1, custom_message="pi_ytilde must be a batch vector [B]")
    term = resolve_bonus(bonus)
    value = term.fn(pi_ytilde, ref_ytilde, beta=beta, **_scalars(term.resolved(bonus_params)))
    return jnp.asarray(alpha, value.dtype) * value


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
    loss_params: Optional[Mapping[str, Any]] = None,
    bonus: str = "logprob",
    bonus_params: Optional[Mapping[str, Any]] = None,
) -> tuple[Array, dict[str, Array]]:
    """Per-example XPO loss (Xie et al. 2024, arXiv 2405.21046, Algorithm 1), with metrics.

    y is the policy's sample and y~ the exploration sample (from pi_ref in Algorithm 1). The
    oracle's verdict `y_wins` (ties count as y winning, as in TRL) orders the pair:

        (y+, y-) = (y, y~) if y_wins else (y~, y)
        loss = dpo_loss(h(y+), h(y-); beta, loss_type, loss_params)  +  alpha * bonus(y~)

    i.e. for the sigmoid loss and the default bonus

        alpha * log pi(y~|x) - log sigmoid(beta [log pi/pi_ref (y+) - log pi/pi_ref (y-)]).

    alpha = 0 with y~ drawn from pi_t is online DPO (with y~ from pi_ref it is reference-sampling
    DPO). The bonus always acts on y~, whichever side of the pair it lands. All log-probs are
    sequence log-probs (sums over response tokens, EOS included, padding excluded). As in TRL's
    XPOTrainer, the IPO variant is not length-normalised here.

    Args:
      pi_y, pi_ytilde: log pi(y|x), log pi(y~|x) under the policy being trained, [B].
      ref_y, ref_ytilde: the same under the reference policy, [B] (no gradient is taken through
        them by this function's callers; it does not stop gradients itself).
      y_wins: [B] bool, True where the oracle preferred y over y~.
      alpha, beta: traced or concrete hyperparameters.
      loss_type, loss_params: the DPO-family loss and its hyperparameters (`dpo_loss`); the
        reference margins that "aot" needs are computed here from ref_y, ref_ytilde and y_wins.
      bonus, bonus_params: the bonus form and its hyperparameters (`xpo_bonus`).

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
    # log pi_ref(y+) - log pi_ref(y-): only losses that ask for it read it ("aot").
    ref_margins = jnp.where(y_wins, ref_y - ref_ytilde, ref_ytilde - ref_y)
    dpo = dpo_loss(chosen_h, rejected_h, beta=beta, loss_type=loss_type, ref_margins=ref_margins, **(loss_params or {}))
    bonus_value = xpo_bonus(pi_ytilde, ref_ytilde, alpha=alpha, beta=beta, bonus=bonus, **(bonus_params or {}))
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
        "loss/xpo": bonus_value,
    }
    return dpo + bonus_value, metrics
