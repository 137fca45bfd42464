"""alpha x beta x seed sweeps as one compiled program: `jax.vmap` of the pure `train`.

The hyperparameters live in the state as arrays (`Hyperparams`), so every cell of a grid runs
the same XLA program: `jax.jit(jax.vmap(train))(keys [G, 2], hparams [G])` compiles once and
runs G independent online runs side by side (PureJaxRL's habit). With `devices`, the grid axis G
is split over a 1-D mesh of those devices (cells never talk to each other, so this is pure data
parallelism over runs; G is padded to a multiple of the device count and the padding dropped).

    final, curves = xpo_jax.sweep(cfg, alphas=[0, 1e-3, 1e-2], betas=[0.05, 0.1], seeds=range(8))
    # (the module is callable: xpo_jax.sweep(...) is xpo_jax.sweep.sweep(...))
    final["j_beta"]        # [G] exact J_beta of each cell's final policy
    curves["eval/j_beta"]  # [G, R] per round (NaN between evaluations)

Command line (writes <run_dir>/<name>/sweep.csv, heatmap.png, curves.png, curves.npz, sweep.json):

    xpo-jax sweep --alphas 0,1e-3,1e-2 --betas 0.05,0.1 --seeds 0-7 --rounds 100 [any train flag]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import sys
import time
import types
from typing import Any, Optional, Sequence

import numpy as np

# Final metrics per cell: CSV column -> metric of make_train (eval/* at the last round).
FINAL_EVAL = {"j_beta": "eval/j_beta", "reward": "eval/reward", "kl": "eval/kl", "p_optimal": "eval/p_optimal",
              "j_star": "eval/j_star"}
CSV_COLUMNS = ("alpha", "beta", "seed", "j_beta", "reward", "kl", "p_optimal", "j_star", "j_beta_late", "ref_j_beta",
               "ref_reward", "ref_p_optimal", "sampled_reward")


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------


def make_grid(alphas: Sequence[float], betas: Sequence[float], seeds: Sequence[int]) -> dict:
    """Every (alpha, beta, seed) cell, alpha-major then beta then seed: {"alpha", "beta", "seed"}
    -> [G] arrays, G = len(alphas) * len(betas) * len(seeds)."""
    alphas, betas, seeds = list(alphas), list(betas), list(seeds)
    for name, v in (("alphas", alphas), ("betas", betas), ("seeds", seeds)):
        if not v:
            raise ValueError(f"sweep: {name} is empty")
    if any(not (a >= 0 and np.isfinite(a)) for a in alphas):
        raise ValueError(f"sweep: alphas must be finite and >= 0, got {alphas}")
    if any(not (b > 0 and np.isfinite(b)) for b in betas):
        raise ValueError(f"sweep: betas must be finite and > 0, got {betas}")
    a, b, s = np.meshgrid(np.asarray(alphas, np.float32), np.asarray(betas, np.float32),
                          np.asarray(seeds, np.int64), indexing="ij")
    return {"alpha": a.ravel(), "beta": b.ravel(), "seed": s.ravel()}


def grid_inputs(cfg: Any, grid: dict):
    """(keys [G, 2] uint32, Hyperparams with [G] leaves) for `jax.vmap(train)`.

    alpha and beta come from the grid; alpha_end / beta_end are the cell's own value (constant),
    or cfg.alpha_end / cfg.beta_end for every cell when set (a schedule from the swept start).
    temperature, lr_scale and label_smoothing are cfg's, broadcast."""
    import jax
    import jax.numpy as jnp

    from xpo_jax.state import Hyperparams

    G = grid["alpha"].shape[0]
    full = lambda v: jnp.full((G,), v, jnp.float32)
    alpha, beta = jnp.asarray(grid["alpha"]), jnp.asarray(grid["beta"])
    hp = Hyperparams.create(
        alpha=alpha, beta=beta, temperature=full(cfg.temperature), lr_scale=full(cfg.lr_scale),
        label_smoothing=full(cfg.label_smoothing),
        alpha_end=alpha if cfg.alpha_end is None else full(cfg.alpha_end),
        beta_end=beta if cfg.beta_end is None else full(cfg.beta_end),
    )
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(grid["seed"], jnp.uint32))
    return keys, hp


def sweep_config(cfg: Any) -> Any:
    """cfg as a sweep runs it: exact evaluation at least after the last round."""
    if getattr(cfg, "policy", None) is not None:
        raise ValueError("sweep: --policy runs have no exact evaluation; sweeps need a built-in task (--task)")
    if not cfg.eval_every:
        cfg = dataclasses.replace(cfg, eval_every=cfg.rounds)
    return cfg.validate()


# ----------------------------------------------------------------------------------------------
# The program
# ----------------------------------------------------------------------------------------------


def make_sweep_fn(cfg: Any, run: Any = None, devices: Optional[Sequence] = None):
    """`fn(keys [G, 2], hparams [G]) -> metrics {name: [G, R]}`: `jax.jit(jax.vmap(train))`,
    the final states dropped. With `devices` (more than one), the G axis is sharded over a 1-D
    mesh "grid" of them: G must then be a multiple of len(devices) (`sweep` pads)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from xpo_jax.train import build_run, make_train

    cfg = sweep_config(cfg)
    run = run or build_run(cfg)
    train = make_train(cfg, run)

    def metrics_only(keys, hparams):
        return jax.vmap(train)(keys, hparams)[1]

    devices = list(devices) if devices is not None else []
    if len(devices) <= 1:
        return jax.jit(metrics_only)
    mesh = Mesh(np.asarray(devices, dtype=object), ("grid",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("grid"))
    fn = jax.jit(metrics_only, in_shardings=(rows, rows), out_shardings=rows)

    def call(keys, hparams):
        with jax.set_mesh(mesh):
            return fn(keys, hparams)

    call.jitted, call.mesh = fn, mesh
    return call


def _pad(tree, n: int):
    """Repeat the last cell so the leading axis is a multiple of n."""
    import jax
    import jax.numpy as jnp

    G = jax.tree_util.tree_leaves(tree)[0].shape[0]
    extra = (-G) % n
    if not extra:
        return tree
    return jax.tree_util.tree_map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], extra, 0)], 0), tree)


def reference_eval(run: Any, betas: np.ndarray) -> dict:
    """Exact metrics of pi_ref itself at each beta: {"ref_" + name: [len(betas)]}."""
    import jax
    import jax.numpy as jnp

    unique, index = np.unique(np.asarray(betas, np.float32), return_inverse=True)
    out = jax.jit(jax.vmap(lambda b: run.exact_eval(run.ref_params, b)))(jnp.asarray(unique))
    return {"ref_" + k.split("/", 1)[1]: np.asarray(v)[index] for k, v in out.items()}


def sweep(cfg: Any, alphas: Sequence[float], betas: Sequence[float], seeds: Sequence[int], *,
          devices: Optional[Sequence] = None, run: Any = None) -> tuple[dict, dict]:
    """Run every (alpha, beta, seed) cell of cfg's online run as one vmapped program.

    Returns (final, curves):
      final:  {"alpha", "beta", "seed", "j_beta", "reward", "kl", "p_optimal", "j_star" (exact,
              final policy), "j_beta_late" (mean exact J_beta over the evaluations in the last
              quarter of the rounds), "ref_j_beta", "ref_reward", "ref_p_optimal" (pi_ref at the
              cell's beta), "sampled_reward" (mean reward of the policy's samples over the last
              10% of rounds)} -> [G] numpy arrays, cells alpha-major (see `make_grid`);
      curves: every per-round metric of `make_train` -> [G, R] numpy arrays (eval/* are NaN
              between evaluations).
    `devices`: shard the grid over these devices (None or one device: no sharding).
    cfg.seed and cfg.alpha/beta are ignored (the grid gives them); cfg.eval_every = 0 becomes
    "evaluate after the last round only".
    """
    import jax

    from xpo_jax.train import build_run

    cfg = sweep_config(cfg)
    run = run or build_run(cfg)
    grid = make_grid(alphas, betas, seeds)
    G = grid["alpha"].shape[0]
    keys, hp = grid_inputs(cfg, grid)
    n = len(devices) if devices is not None else 1
    fn = make_sweep_fn(cfg, run, devices)
    if n > 1:
        keys, hp = _pad((keys, hp), n)
    curves = {k: np.asarray(v)[:G] for k, v in jax.device_get(fn(keys, hp)).items()}
    return finalise(grid, curves, reference_eval(run, grid["beta"])), curves


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
    return final


# ----------------------------------------------------------------------------------------------
# Outputs: CSV, heatmap, learning curves
# ----------------------------------------------------------------------------------------------


def write_csv(path: str, final: dict) -> None:
    cols = [c for c in CSV_COLUMNS if c in final]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i in range(final["alpha"].shape[0]):
            w.writerow([_fmt(final[c][i], c) for c in cols])


def _fmt(v, col: str) -> str:
    if col == "seed":
        return str(int(v))
    return f"{float(v):.6g}"


def read_csv(path: str) -> dict:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.asarray([float(r[k]) for r in rows]) for k in rows[0]}


def seed_table(final: dict, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(alphas [A], betas [Bt], mean [A, Bt], std [A, Bt]) of `metric` over seeds."""
    alphas = np.unique(final["alpha"])
    betas = np.unique(final["beta"])
    mean = np.full((len(alphas), len(betas)), np.nan)
    std = np.full_like(mean, np.nan)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            sel = (final["alpha"] == a) & (final["beta"] == b)
            v = np.asarray(final[metric])[sel]
            mean[i, j], std[i, j] = np.mean(v), np.std(v)
    return alphas, betas, mean, std


HEATMAP_PANELS = (("j_beta", "exact J_beta (final)"), ("reward", "exact E[r] (final)"), ("kl", "KL(pi || pi_ref)"))


def plot_heatmap(final: dict, path: str, title: str = "", panels: Sequence = HEATMAP_PANELS) -> None:
    """Final exact J_beta, true reward and KL (or `panels`: (metric, title) pairs) averaged over
    seeds; rows alpha, columns beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, t) for m, t in panels if m in final]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 0.5 * len(np.unique(final["alpha"])) + 2.4))
    for ax, (metric, t) in zip(np.atleast_1d(axes), panels):
        alphas, betas, mean, std = seed_table(final, metric)
        im = ax.imshow(mean, aspect="auto", cmap="viridis" if metric != "kl" else "magma")
        for i in range(mean.shape[0]):
            for j in range(mean.shape[1]):
                ax.text(j, i, f"{mean[i, j]:.3g}\n±{std[i, j]:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if mean[i, j] < np.nanmean(mean) else "black")
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("beta")
        ax.set_ylabel("alpha (0 = online DPO)")
        ax.set_title(t, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    n_seeds = len(np.unique(final["seed"]))
    fig.suptitle(f"{title} (mean ± std over {n_seeds} seeds)".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(final: dict, curves: dict, path: str, metric: str = "eval/j_beta", title: str = "") -> None:
    """Learning curves of `metric` per alpha (seed mean ± std band), one panel per beta, with
    pi_ref's value (dotted) and the optimum J* (dashed) when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(curves[metric])
    R = y.shape[1]
    rounds = np.arange(1, R + 1)
    evaluated = ~np.all(np.isnan(y), axis=0)
    alphas, betas = np.unique(final["alpha"]), np.unique(final["beta"])
    fig, axes = plt.subplots(1, len(betas), figsize=(4.4 * len(betas), 3.6), squeeze=False, sharey=False)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(alphas)))
    for ax, b in zip(axes[0], betas):
        for a, c in zip(alphas, colors):
            sel = (final["alpha"] == a) & (final["beta"] == b)
            v = y[sel][:, evaluated]
            x = rounds[evaluated]
            if metric == "eval/j_beta" and "ref_j_beta" in final:  # round 0: the policy is pi_ref
                v = np.concatenate([np.asarray(final["ref_j_beta"])[sel][:, None], v], axis=1)
                x = np.concatenate([[0], x])
            m, s = np.nanmean(v, 0), np.nanstd(v, 0)
            ax.plot(x, m, "-", color=c, lw=1.4, label=f"alpha={a:g}" + (" (DPO)" if a == 0 else ""))
            ax.fill_between(x, m - s, m + s, color=c, alpha=0.18, lw=0)
        sel_b = final["beta"] == b
        if metric == "eval/j_beta" and "ref_j_beta" in final:
            ax.axhline(float(np.mean(final["ref_j_beta"][sel_b])), color="grey", ls=":", lw=1, label="pi_ref")
        if metric == "eval/j_beta" and "j_star" in final:
            ax.axhline(float(np.mean(final["j_star"][sel_b])), color="k", ls="--", lw=0.8, label="optimum J*")
        ax.set_title(f"beta = {b:g}")
        ax.set_xlabel("round")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out_dir: str, cfg: Any, final: dict, curves: dict, info: Optional[dict] = None) -> dict:
    """sweep.csv, heatmap.png, curves.png, curves.npz and sweep.json in `out_dir`; returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, v) for k, v in (("csv", "sweep.csv"), ("heatmap", "heatmap.png"),
                                                       ("curves", "curves.png"), ("npz", "curves.npz"),
                                                       ("json", "sweep.json"))}
    write_csv(paths["csv"], final)
    title = f"{cfg.name}: {cfg.task}, {cfg.rounds} rounds"
    plot_heatmap(final, paths["heatmap"], title=title)
    if "eval/j_beta" in curves:
        plot_curves(final, curves, paths["curves"], title=title)
    np.savez_compressed(paths["npz"], **{k.replace("/", "__"): v for k, v in curves.items()},
                        **{"final__" + k: v for k, v in final.items()})
    with open(paths["json"], "w") as f:
        json.dump({"config": cfg.to_dict(), "cells": int(final["alpha"].shape[0]), **(info or {})}, f, indent=1)
    return paths


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_floats(s: str) -> list:
    """"0,1e-3,0.01" -> [0.0, 0.001, 0.01]."""
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def parse_ints(s: str) -> list:
    """"0-7" -> [0..7]; "0,3,5-6" -> [0, 3, 5, 6]."""
    out = []
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise argparse.ArgumentTypeError(f"empty range {part!r}")
            out.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part):
            out.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"expected seeds like '0-7' or '0,3,5-6', got {s!r}")
    if not out:
        raise argparse.ArgumentTypeError(f"no seeds in {s!r}")
    return out


def add_sweep_parser(subparsers) -> None:
    """Register `sweep` (every TrainConfig flag plus --alphas/--betas/--seeds/--grid-devices)."""
    from xpo_jax.config import add_config_flags

    p = subparsers.add_parser(
        "sweep", help="alpha x beta x seed grid of online runs as one vmapped program",
        description="Run every (alpha, beta, seed) cell of an online XPO run in one compiled program "
                    "(jax.vmap of the pure train) and write <run-dir>/<name>/sweep.csv, heatmap.png, "
                    "curves.png, curves.npz and sweep.json.",
    )
    p.add_argument("--alphas", type=parse_floats, default=None, help="comma-separated (default: --alpha)")
    p.add_argument("--betas", type=parse_floats, default=None, help="comma-separated (default: --beta)")
    p.add_argument("--seeds", type=parse_ints, default=None, help="e.g. 0-7 or 0,3,5 (default: --seed)")
    p.add_argument("--grid-devices", type=int, default=0,
                   help="shard the grid over this many local devices (0 = all; 1 = no sharding)")
    add_config_flags(p)
    p.set_defaults(func=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    from xpo_jax.config import TrainConfig, config_from_args

    cfg = config_from_args(args, base=TrainConfig(name="sweep"))
    try:
        cfg = sweep_config(cfg)
        alphas = args.alphas if args.alphas is not None else [cfg.alpha]
        betas = args.betas if args.betas is not None else [cfg.beta]
        seeds = args.seeds if args.seeds is not None else [cfg.seed]
        make_grid(alphas, betas, seeds)
        if args.grid_devices < 0:
            raise ValueError(f"--grid-devices={args.grid_devices}: must be >= 0")
    except ValueError as e:
        print(f"xpo-jax sweep: error: {e}", file=sys.stderr)
        return 2
    import jax

    local = jax.local_devices()
    if args.grid_devices > len(local):
        print(f"xpo-jax sweep: error: --grid-devices={args.grid_devices} but only {len(local)} local devices",
              file=sys.stderr)
        return 2
    devices = local[: args.grid_devices or len(local)]
    G = len(alphas) * len(betas) * len(seeds)
    print(f"sweep: {len(alphas)} alphas x {len(betas)} betas x {len(seeds)} seeds = {G} runs of {cfg.rounds} rounds "
          f"on {cfg.task}, one program on {len(devices)} {devices[0].platform} device(s)", flush=True)
    t0 = time.perf_counter()
    final, curves = sweep(cfg, alphas, betas, seeds, devices=devices if len(devices) > 1 else None)
    seconds = time.perf_counter() - t0
    out = os.path.join(cfg.run_dir, cfg.name)
    paths = write_outputs(out, cfg, final, curves, info={
        "alphas": alphas, "betas": betas, "seeds": seeds, "seconds": seconds, "devices": len(devices),
        "platform": devices[0].platform,
    })
    print(summary_table(final))
    print(f"{G} runs in {seconds:.1f} s (compile included); wrote {', '.join(paths.values())}")
    return 0


def summary_table(final: dict, metric: str = "j_beta") -> str:
    """Markdown: mean ± std over seeds of `metric`, rows alpha, columns beta."""
    alphas, betas, mean, std = seed_table(final, metric)
    lines = [f"| {metric}: alpha \\ beta | " + " | ".join(f"{b:g}" for b in betas) + " |",
             "|---|" + "---|" * len(betas)]
    for i, a in enumerate(alphas):
        lines.append(f"| {a:g}{' (DPO)' if a == 0 else ''} | "
                     + " | ".join(f"{mean[i, j]:.4f} ± {std[i, j]:.4f}" for j in range(len(betas))) + " |")
    return "\n".join(lines)


def main_sweep(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m xpo_jax.sweep --alphas ... ` (the same as `xpo-jax sweep ...`)."""
    parser = argparse.ArgumentParser(prog="xpo-jax")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sweep_parser(sub)
    args = parser.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


class _CallableModule(types.ModuleType):
    """`xpo_jax.sweep(cfg, alphas, betas, seeds)` calls `sweep` while `xpo_jax.sweep` stays this
    module (so `from xpo_jax.sweep import ...` and `import xpo_jax.sweep` keep working)."""

    def __call__(self, *args, **kwargs):
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main_sweep())
