"""alpha x beta x lambda x (loss and bonus hyperparameters) x seed sweeps as one compiled program:
`jax.vmap` of the pure `train`.

The hyperparameters live in the state as arrays (`Hyperparams`), so every cell of a grid runs
the same XLA program: `jax.jit(jax.vmap(train))(keys [G, 2], hparams [G])` compiles once and
runs G independent online runs side by side (PureJaxRL's habit). With `devices`, the grid axis G
is split over a 1-D mesh of those devices (cells never talk to each other, so this is pure data
parallelism over runs; G is padded to a multiple of the device count and the padding dropped).

    from xpo_jax import sweep
    final, curves = sweep(cfg, alphas=[0, 1e-3, 1e-2], betas=[0.05, 0.1], seeds=range(8),
                          mixes=[1.0, 0.0], loss_params={"label_smoothing": [0.0, 0.1]})
    final["j_beta"]        # [G] exact J_beta of each cell's final policy
    final["params"]        # the final policy parameters, every leaf [G, ...]
    curves["eval/j_beta"]  # [G, R] per round (NaN between evaluations)

The exploration mix lambda (P(y~ from pi_ref)) is a grid axis like alpha and beta, so XPO
(alpha > 0, lambda = 1), online DPO (alpha = 0, lambda = 0) and reference-sampling DPO (alpha = 0,
lambda = 1) are cells of one program; `alphas=[0], mixes=[0]` is online DPO, not `alphas=[0]`
alone (that keeps y~ from pi_ref). So are the hyperparameters a loss or bonus form declares
(`xpo_jax.losses`): a user's own loss, registered or named "module:function", sweeps its own
hyperparameter in one program.

Command line (`xpo_jax.cli`; writes <run_dir>/<name>/sweep.csv, heatmap.png, curves.png,
curves.npz, sweep.json through `xpo_jax.reporting`):

    xpo-jax sweep --alphas 0,1e-3,1e-2 --betas 0.05,0.1 --seeds 0-7 --rounds 100 [any train flag]
    xpo-jax sweep --loss-type mylosses:margin --loss-param gamma=0,0.5,1 --seeds 0-3
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xpo_jax.reporting import FINAL_EVAL
from xpo_jax.run import Run, build_run
from xpo_jax.rundir import RunDirLock, check_os_path, check_run_files
from xpo_jax.state import Hyperparams
from xpo_jax.train import make_train

# A threshold of an exact-evaluation curve counts as reached within this tolerance (see
# `labels_until`): P(optimal) is a mean over a task's prompts, so 4 solved prompts of 8 give
# 0.4998 rather than 0.5 for as long as each sits at 0.9995.
THRESHOLD_TOLERANCE = 0.01
GRID_AXES = ("alpha", "beta", "mix", "seed")


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------


def _values(name: str, v: Any) -> list:
    v = [v] if np.ndim(v) == 0 else list(v)
    if not v:
        raise ValueError(f"sweep: {name} is empty")
    return v


def make_grid(alphas: Sequence[float], betas: Sequence[float], seeds: Sequence[int],
              mixes: Sequence[float] = (1.0,), loss_params: Optional[Mapping[str, Sequence[float]]] = None,
              bonus_params: Optional[Mapping[str, Sequence[float]]] = None) -> dict:
    """Every cell: alpha-major, then beta, then mix, then each loss hyperparameter, then each bonus
    hyperparameter (in the order given), then seed. Returns {"alpha", "beta", "mix", <each
    hyperparameter's name>, "seed"} -> [G] arrays, G = the product of the lengths."""
    alphas, betas, seeds, mixes = (_values(n, v) for n, v in (("alphas", alphas), ("betas", betas), ("seeds", seeds),
                                                              ("mixes", mixes)))
    params = {**{k: _values(f"loss_params[{k!r}]", v) for k, v in (loss_params or {}).items()}}
    for k, v in (bonus_params or {}).items():
        if k in params:
            raise ValueError(f"sweep: {k!r} is both a loss and a bonus hyperparameter: rename one")
        params[k] = _values(f"bonus_params[{k!r}]", v)
    clash = sorted(set(params) & set(GRID_AXES))
    if clash:
        raise ValueError(f"sweep: a hyperparameter may not be called {clash} (a grid axis of that name exists)")
    if any(not (a >= 0 and np.isfinite(a)) for a in alphas):
        raise ValueError(f"sweep: alphas must be finite and >= 0, got {alphas}")
    if any(not (b > 0 and np.isfinite(b)) for b in betas):
        raise ValueError(f"sweep: betas must be finite and > 0, got {betas}")
    if any(not 0 <= m <= 1 for m in mixes):
        raise ValueError(f"sweep: mixes (P(y~ from pi_ref)) must lie in [0, 1], got {mixes}")
    for k, v in params.items():
        if any(not np.isfinite(x) for x in v):
            raise ValueError(f"sweep: {k} values must be finite, got {v}")
    axes = [np.asarray(alphas, np.float32), np.asarray(betas, np.float32), np.asarray(mixes, np.float32),
            *(np.asarray(v, np.float32) for v in params.values()), np.asarray(seeds, np.int64)]
    cells = np.meshgrid(*axes, indexing="ij")
    names = ["alpha", "beta", "mix", *params, "seed"]
    return {n: c.ravel() for n, c in zip(names, cells)}


def grid_inputs(cfg: Any, grid: dict, bonus_defaults: Optional[dict] = None):
    """(keys [G, 2] uint32, Hyperparams with [G] leaves) for `jax.vmap(train)`.

    alpha and beta come from the grid; alpha_end / beta_end are the cell's own value (constant),
    or cfg.alpha_end / cfg.beta_end for every cell when set (a schedule from the swept start).
    The loss's and bonus form's hyperparameters are the grid's where it has them, else cfg's (or
    the declared defaults, or `bonus_defaults`), broadcast; so are temperature and lr_scale."""
    G = grid["alpha"].shape[0]
    full = lambda v: jnp.full((G,), v, jnp.float32)
    per_cell = lambda resolved: {k: jnp.asarray(grid[k]) if k in grid else full(v) for k, v in resolved.items()}
    alpha, beta = jnp.asarray(grid["alpha"]), jnp.asarray(grid["beta"])
    hp = Hyperparams.create(
        alpha=alpha, beta=beta, temperature=full(cfg.temperature), lr_scale=full(cfg.lr_scale),
        alpha_end=alpha if cfg.alpha_end is None else full(cfg.alpha_end),
        beta_end=beta if cfg.beta_end is None else full(cfg.beta_end),
        exploration_mix=jnp.asarray(grid["mix"]) if "mix" in grid else full(cfg.exploration_mix),
        loss_params=per_cell(cfg.resolved_loss_params()), bonus_params=per_cell(cfg.resolved_bonus_params(bonus_defaults)),
    )
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(grid["seed"], jnp.uint32))
    return keys, hp


def sweep_config(cfg: Any, mixes: Optional[Sequence[float]] = None) -> Any:
    """cfg as a sweep runs it: exact evaluation at least after the last round, and the traced
    exploration mixture unless every cell samples y~ the same cheap way (all lambda = 1 or all 0)."""
    if getattr(cfg, "policy", None) is not None:
        raise ValueError("sweep: --policy runs have no exact evaluation; sweeps need a built-in task (--task)")
    if not cfg.eval_every:
        cfg = dataclasses.replace(cfg, eval_every=cfg.rounds)
    if mixes is not None:
        distinct = set(float(m) for m in mixes)
        if len(distinct) == 1 and distinct <= {0.0, 1.0}:
            cfg = dataclasses.replace(cfg, exploration_mix=distinct.pop())
        else:
            cfg = dataclasses.replace(cfg, exploration_sampling="mixture")
    return cfg.validate()


# ----------------------------------------------------------------------------------------------
# The program
# ----------------------------------------------------------------------------------------------


def make_sweep_fn(cfg: Any, run: Optional[Run] = None, devices: Optional[Sequence] = None):
    """`fn(keys [G, 2], hparams [G]) -> (final params [G, ...], metrics {name: [G, R]})`:
    `jax.jit(jax.vmap(train))`, the rest of the final states dropped. With `devices` (more than
    one), the G axis is sharded over a 1-D mesh "grid" of them: G must then be a multiple of
    len(devices) (`sweep` pads). `cfg` must be `sweep_config`'s; `run` one built for it (or for a
    config that differs only in what `Run.with_config` accepts)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    cfg = cfg.validate()
    run = build_run(cfg) if run is None else run.with_config(cfg)
    train = make_train(cfg, run)

    def metrics_only(keys, hparams):
        state, metrics = jax.vmap(train)(keys, hparams)
        return state.params, metrics

    devices = list(devices) if devices is not None else []
    if len(devices) <= 1:
        return jax.jit(metrics_only)
    mesh = Mesh(np.asarray(devices, dtype=object), ("grid",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("grid"))
    return jax.jit(metrics_only, in_shardings=(rows, rows), out_shardings=rows)


def _pad(tree, n: int):
    """Repeat the last cell so the leading axis is a multiple of n."""
    G = jax.tree_util.tree_leaves(tree)[0].shape[0]
    extra = (-G) % n
    if not extra:
        return tree
    return jax.tree_util.tree_map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], extra, 0)], 0), tree)


def reference_eval(run: Run, betas: np.ndarray) -> dict:
    """Exact metrics of pi_ref itself at each beta: {"ref_" + name: [len(betas)]}."""
    unique, index = np.unique(np.asarray(betas, np.float32), return_inverse=True)
    task = run.task
    out = jax.jit(jax.vmap(lambda b: task.exact_eval(run.apply_fn, run.ref_params, run.ref_params, b)))(
        jnp.asarray(unique))
    return {"ref_" + k: np.asarray(out[k])[index] for k in FINAL_EVAL}


def sweep(cfg: Any, alphas: Sequence[float], betas: Sequence[float], seeds: Sequence[int], *,
          mixes: Optional[Sequence[float]] = None, loss_params: Optional[Mapping[str, Sequence[float]]] = None,
          bonus_params: Optional[Mapping[str, Sequence[float]]] = None, devices: Optional[Sequence] = None,
          run: Optional[Run] = None) -> tuple[dict, dict]:
    """Run every (alpha, beta, mix, loss and bonus hyperparameters, seed) cell of cfg's online run
    as one vmapped program.

    Returns (final, curves):
      final:  {"alpha", "beta", "mix", <each swept hyperparameter>, "seed", "j_beta", "reward",
              "kl", "p_optimal", "j_star" (exact, final policy), "j_beta_late" (mean exact J_beta
              over the evaluations in the last quarter of the rounds), "ref_j_beta", "ref_reward",
              "ref_p_optimal" (pi_ref at the cell's beta), "sampled_reward" (mean reward of the
              policy's samples over the last 10% of rounds), "first_optimal_round" (the first
              round whose y or y~ was an optimal response; NaN if none), "labels_to_p50",
              "labels_to_p90" (labels used until the exact P(optimal) first came within
              THRESHOLD_TOLERANCE of 0.5 / 0.9, at the evaluation resolution; NaN if never)} -> [G]
              numpy arrays, cells ordered as `make_grid`; "params", the final policy parameters
              (every leaf [G, ...]); "compiled_programs", how many programs the sweep compiled (1);
      curves: every per-round metric of `make_train` -> [G, R] numpy arrays (eval/* are NaN
              between evaluations).
    `mixes`: lambda values, P(y~ from pi_ref) (default: cfg.exploration_mix). `loss_params` /
    `bonus_params`: {name: values} of the loss's / bonus form's own hyperparameters (the others
    keep cfg's values). `devices`: shard the grid over these devices (None or one device: no
    sharding). `run`: a Run built for cfg (reused: the reference is not rebuilt); the sweep's
    round (its lambda path and hyperparameters) is rebuilt on it. cfg.seed, alpha, beta,
    exploration_mix and the swept hyperparameters are ignored (the grid gives them);
    cfg.eval_every = 0 becomes "evaluate after the last round only".
    """
    mixes = [cfg.exploration_mix] if mixes is None else list(mixes)
    cfg = sweep_config(cfg, mixes)
    grid = make_grid(alphas, betas, seeds, mixes, loss_params, bonus_params)
    for name, values in (loss_params or {}).items():  # each value the loss accepts, before compiling
        for v in values:
            cfg.check_hyperparameters(loss_params={name: float(v)})
    for name, values in (bonus_params or {}).items():
        for v in values:
            cfg.check_hyperparameters(bonus_params={name: float(v)})
    run = build_run(cfg) if run is None else run.with_config(cfg)
    G = grid["alpha"].shape[0]
    keys, hp = grid_inputs(cfg, grid, run.bonus_defaults)
    n = len(devices) if devices is not None else 1
    fn = make_sweep_fn(cfg, run, devices)
    if n > 1:
        keys, hp = _pad((keys, hp), n)
    params, metrics = jax.device_get(fn(keys, hp))
    curves = {k: np.asarray(v)[:G] for k, v in metrics.items()}
    final = finalise(grid, curves, reference_eval(run, grid["beta"]))
    final["params"] = jax.tree_util.tree_map(lambda x: np.asarray(x)[:G], params)
    final["compiled_programs"] = fn._cache_size()
    return final, curves


def first_round(hit: np.ndarray) -> np.ndarray:
    """[G, R] bool -> [G] float: the first round (1-based) where `hit` holds, NaN if never."""
    any_hit = hit.any(axis=1)
    return np.where(any_hit, hit.argmax(axis=1) + 1.0, np.nan)


def labels_until(curves: dict, metric: str, threshold: float, tolerance: float = THRESHOLD_TOLERANCE) -> np.ndarray:
    """[G]: labels used until `metric` (an evaluation curve, NaN between evaluations) first came
    within `tolerance` of `threshold` (>= threshold - tolerance); NaN if it never did. The
    tolerance keeps a mean over a task's prompts that moves in steps of 1/(prompts) from missing a
    threshold by a hair of rounding (half of 8 prompts solved at 0.9995 is 0.4998)."""
    r = first_round(np.nan_to_num(curves[metric], nan=-np.inf) >= threshold - tolerance)
    labels = curves["labels"]
    idx = np.nan_to_num(r, nan=1).astype(int) - 1
    return np.where(np.isnan(r), np.nan, np.take_along_axis(labels, idx[:, None], axis=1)[:, 0])


def finalise(grid: dict, curves: dict, ref: dict) -> dict:
    """The per-cell final table from the grid, the [G, R] curves and pi_ref's metrics."""
    final = {k: np.asarray(v) for k, v in grid.items()}
    R = next(iter(curves.values())).shape[1]
    for col, key in FINAL_EVAL.items():
        if key in curves:
            final[col] = curves[key][:, -1]
    for k, v in ref.items():
        final[k] = v
    if "eval/j_beta" in curves:  # less noisy than one evaluation: the mean over the last quarter
        late = curves["eval/j_beta"][:, -max(1, R // 4):]
        if np.isfinite(late).any(axis=1).all():
            final["j_beta_late"] = np.nanmean(late, axis=1)
    if "task/reward" in curves:
        final["sampled_reward"] = np.mean(curves["task/reward"][:, -max(1, R // 10):], axis=1)
    if "explore/y_optimal" in curves:
        final["first_optimal_round"] = first_round((curves["explore/y_optimal"] > 0) | (curves["explore/yt_optimal"] > 0))
    if "eval/p_optimal" in curves and "labels" in curves:
        final["labels_to_p50"] = labels_until(curves, "eval/p_optimal", 0.5)
        final["labels_to_p90"] = labels_until(curves, "eval/p_optimal", 0.9)
    return final


# ----------------------------------------------------------------------------------------------
# The sweep's directory: the same name rules as a run's
# ----------------------------------------------------------------------------------------------

SWEEP_OUTPUTS = ("sweep.csv", "sweep.json", "heatmap.png", "curves.png", "curves.npz", "params.npz")


def claim_sweep_dir(cfg: Any) -> RunDirLock:
    """Lock `<run_dir>/<name>` for a sweep (returned; release it when done) after the checks a run
    gets: a path the OS accepts, no symlinked or wrong-kind files, and no earlier sweep's output
    unless --overwrite (which deletes it here). --resume is refused: a sweep is one compiled
    program with no checkpoints, so there is nothing to continue. ValueError naming the flag."""
    out = os.path.join(cfg.run_dir, cfg.name)
    if cfg.resume:
        raise ValueError("--resume: a sweep is one compiled program without checkpoints, so it cannot be continued; "
                         "run it again with --overwrite, or under another --name")
    check_os_path("--run-dir", cfg.run_dir)
    check_run_files(out)
    lock = RunDirLock(out)
    lock.acquire()
    try:
        earlier = [f for f in SWEEP_OUTPUTS if os.path.exists(os.path.join(out, f))]
        if earlier and not cfg.overwrite:
            raise ValueError(f"{out} holds an earlier sweep's output ({', '.join(earlier)}): pass --overwrite to "
                             "replace it, or another --name")
        for f in earlier:
            os.remove(os.path.join(out, f))
    except BaseException:
        lock.release()
        raise
    return lock
