"""XPO vs online DPO and reference-sampling DPO on hard-explore: an alpha x beta x seed grid.

    python experiments/sweep_alpha_beta.py                 # 5 alphas x 4 betas x 8 seeds, defaults
    python experiments/sweep_alpha_beta.py --rounds 100 --alphas 0,0.01 --betas 0.1 --seeds 0-3

Every option not swept is TrainConfig's default at the time of the run (read, not copied: the
defaults are the tuned XPO run of BUILD_NOTES.md). The grid is fixed, so the results file can be
reproduced: alphas {0, 0.005, 0.01, 0.02, 0.05} with y~ from pi_ref (lambda = 1; alpha = 0 there is
reference-sampling DPO, which the first version of this study mislabelled "online DPO"), plus
online DPO itself (alpha = 0, lambda = 0: both responses from pi_t), betas {0.05, 0.1, 0.2, 0.4},
seeds 0-7. Two programs (`jax.jit(jax.vmap(train))`, `xpo_jax.sweep`): the lambda = 1 grid and the
online-DPO cells. Note that a different grid size
changes f32 rounding in the batched program, and over 200 chaotic rounds that changes the
per-seed trajectories (not their statistics): see the .md's Discussion.

Writes experiments/results/sweep_alpha_beta.{csv,md,json,npz}, sweep_alpha_beta_heatmap.png
(final exact J_beta, reward, KL, P(optimal), seed means) and sweep_alpha_beta_curves.png
(exact J_beta learning curves per alpha, seed mean ± std, one panel per beta). The .md has the
tables and what they show (data-driven), and keeps a hand-written "## Discussion" section across
reruns.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
RESULTS = os.path.join(HERE, "results")
PREFIX = os.path.join(RESULTS, "sweep_alpha_beta")
ALPHAS = (0.0, 0.005, 0.01, 0.02, 0.05)
BETAS = (0.05, 0.1, 0.2, 0.4)
T_975 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}  # two-sided 5% critical t, by dof


def paired(final, metric, alpha, beta, base=(0.0, 0.0), mix=1.0):
    """Paired-over-seeds difference of `metric` between XPO (alpha, mix, beta) and the baseline
    method `base` = (alpha, mix) at beta (default online DPO): (mean diff, standard error, wins, n,
    significant at 5% two-sided)."""
    import numpy as np

    def cell(a, m):
        sel = (final["alpha"] == np.float32(a)) & (final["beta"] == np.float32(beta)) & (final["mix"] == np.float32(m))
        order = np.argsort(final["seed"][sel])
        return np.asarray(final[metric])[sel][order]

    x, y = cell(alpha, mix), cell(*base)
    d = x - y
    n = len(d)
    mean = float(np.mean(d))
    se = float(np.std(d, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    t = mean / se if se > 0 else (float("inf") if mean else 0.0)
    crit = T_975.get(n - 1, 1.96)
    return mean, se, int(np.sum(d > 0)), n, bool(n > 1 and abs(t) > crit)


def write_markdown(path, cfg, final, alphas, betas, seeds, timing, machine, date=None):
    import numpy as np

    from xpo_jax.reporting import method_name, seed_table

    def table(metric, fmt="{:.3f}", what=""):
        methods, b_, mean, std = seed_table(final, metric)
        rows = ["| method \\ beta | " + " | ".join(f"{b:g}" for b in b_) + " |", "|---|" + "---|" * len(b_)]
        for i, method in enumerate(methods):
            rows.append(f"| {method_name(*method)} | "
                        + " | ".join(f"{fmt.format(mean[i, j])} ± {fmt.format(std[i, j])}" for j in range(len(b_)))
                        + " |")
        return [f"**{what}** (mean ± std over {len(seeds)} seeds)", ""] + rows + [""]

    f32 = lambda b: float(np.float32(b))  # dictionary keys: betas as stored (float32)
    ref_j = {f32(b): float(np.mean(final["ref_j_beta"][final["beta"] == np.float32(b)])) for b in betas}
    j_star = {f32(b): float(np.mean(final["j_star"][final["beta"] == np.float32(b)])) for b in betas}
    lines = [
        "# XPO vs online DPO and reference-sampling DPO on hard-explore: alpha x beta x seed sweep", "",
        f"{machine}, {date or datetime.date.today().isoformat()}, jax {timing['jax']}. Command: `{timing['command']}`", "",
        f"{len(alphas)} alphas x {len(betas)} betas x {len(seeds)} seeds = {len(alphas) * len(betas) * len(seeds)} "
        f"online runs of {cfg.rounds} rounds "
        f"with y~ from pi_ref, plus {len(betas)} x {len(seeds)} online-DPO runs (both responses from pi_t) "
        f"(batch {cfg.batch_size}, lr {cfg.learning_rate:g}, Bradley-Terry oracle: {cfg.bradley_terry}, bonus "
        f"{cfg.bonus} {cfg.resolved_bonus_params()}; every other option TrainConfig's "
        f"default), as two vmapped programs: compile {timing['compile_s']:.0f} s, run {timing['run_s']:.0f} s "
        f"(wall {timing['wall_s']:.0f} s with the reference fine-tune). Exact evaluation by enumerating every "
        "response. Files: `sweep_alpha_beta.csv` (one row per run), `sweep_alpha_beta_heatmap.png`, "
        "`sweep_alpha_beta_curves.png`, `sweep_alpha_beta.npz` (per-round curves).", "",
        "Reference policy and optimum per beta: "
        + "; ".join(f"beta {b:g}: J_beta(pi_ref) {ref_j[f32(b)]:.3f}, J* {j_star[f32(b)]:.3f}" for b in betas) + ".",
        "",
    ]
    lines += table("j_beta", what="Final exact J_beta = E[r] - beta KL")
    if "j_beta_late" in final:
        lines += table("j_beta_late", what=f"Exact J_beta averaged over the evaluations of the last quarter "
                                           f"(rounds > {cfg.rounds - cfg.rounds // 4}), less noisy than the last one")
    lines += table("p_optimal", fmt="{:.3g}", what="Final P(optimal response)")
    lines += table("reward", what="Final exact E[r] (0..4)")
    lines += table("kl", what="Final KL(pi || pi_ref)")

    # XPO minus each baseline, paired over seeds (same seed = same prompts and initial key).
    def diff_table(metric, label, base, base_name):
        out = [f"**XPO minus {base_name}, paired over seeds: {label}** (mean difference ± standard error, seeds "
               "where XPO is higher; * = paired t-test significant at 5%)", "",
               "| alpha \\ beta | " + " | ".join(f"{b:g}" for b in betas) + " |", "|---|" + "---|" * len(betas)]
        groups = ([], [], [])
        for a in alphas:
            if a == 0:
                continue
            cells = []
            for b in betas:
                m, se, wins, n, sig = paired(final, metric, a, b, base)
                cells.append(f"{m:+.3f} ± {se:.3f} ({wins}/{n}){'*' if sig else ''}")
                groups[0 if sig and m > 0 else 1 if sig and m < 0 else 2].append((a, b, m, wins, n))
            out.append(f"| {a:g} | " + " | ".join(cells) + " |")
        return out + [""], groups

    ONLINE, REF = (0.0, 0.0), (0.0, 1.0)
    t, (better, worse, tie) = diff_table("j_beta", "final exact J_beta", ONLINE, "online DPO")
    lines += t
    t, (better_r, worse_r, _) = diff_table("j_beta", "final exact J_beta", REF, "reference-sampling DPO")
    lines += t
    if "j_beta_late" in final:
        t, (better_l, worse_l, _) = diff_table("j_beta_late", "J_beta over the last quarter", ONLINE, "online DPO")
        lines += t

    # Data-driven summary.
    def fmt_cells(cs):
        return ", ".join(f"(alpha {a:g}, beta {b:g}: {m:+.3f}, {w}/{n})" for a, b, m, w, n in cs) or "none"

    methods, b_, mean, _ = seed_table(final, "j_beta")
    best = np.unravel_index(np.nanargmax(mean), mean.shape)
    row = {m: i for i, m in enumerate(methods)}
    lines += ["## What it shows", "",
              f"- Best cell by mean final J_beta: {method_name(*methods[best[0]])}, beta {b_[best[1]]:g} "
              f"({mean[best]:.3f}; J* there is {j_star[f32(b_[best[1]])]:.3f})."]
    for j, b in enumerate(b_):
        col = mean[:, j]
        k = int(np.nanargmax(col))
        lines.append(f"- beta {b:g}: online DPO {col[row[ONLINE]]:.3f}, reference-sampling DPO {col[row[REF]]:.3f}, "
                     f"best {method_name(*methods[k])} ({col[k]:.3f}), pi_ref {ref_j[f32(b)]:.3f}, J* {j_star[f32(b)]:.3f}.")
    lines += [f"- XPO significantly above online DPO (paired, 5%): {fmt_cells(better)}.",
              f"- XPO significantly below online DPO: {fmt_cells(worse)}.",
              "- No significant difference from online DPO: "
              + (", ".join(f"({a:g}, {b:g})" for a, b, *_ in tie) or "none") + " (alpha, beta).",
              f"- Against reference-sampling DPO (the baseline the first version of this study used): significantly "
              f"above in {fmt_cells(better_r)}; significantly below in {fmt_cells(worse_r)}."]
    if "j_beta_late" in final:
        lines += [f"- Over the last quarter's evaluations: XPO significantly above online DPO in {fmt_cells(better_l)}; "
                  f"significantly below in {fmt_cells(worse_l)}."]
    lines.append("")
    # P(optimal): the exploration the bonus is for.
    po = []
    for a in alphas:
        if a:
            for b in betas:
                m, se, wins, n, sig = paired(final, "p_optimal", a, b, ONLINE)
                po.append((a, b, m, wins, n, sig))
    up = [(a, b, m, w, n) for a, b, m, w, n, s in po if s and m > 0]
    down = [(a, b, m, w, n) for a, b, m, w, n, s in po if s and m < 0]
    lines += [f"- P(optimal response), XPO minus online DPO: significantly higher in {fmt_cells(up)}; significantly "
              f"lower in {fmt_cells(down)}.", ""]

    discussion = ""
    if os.path.exists(path):
        old = open(path).read()
        if "\n## Discussion" in old:
            discussion = old[old.index("\n## Discussion") + 1:]
    with open(path, "w") as f:
        f.write("\n".join(lines) + ("\n" + discussion if discussion else ""))


def main() -> int:
    from xpo_jax.cli import parse_floats, parse_ints

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", type=parse_floats, default=None)
    ap.add_argument("--betas", type=parse_floats, default=None)
    ap.add_argument("--seeds", type=parse_ints, default=parse_ints("0-7"))
    ap.add_argument("--rounds", type=int, default=None, help="default: TrainConfig's")
    ap.add_argument("--eval-every", type=int, default=None, help="default: TrainConfig's")
    ap.add_argument("--from-saved", action="store_true",
                    help="rewrite the CSV, figures and .md from the saved .npz/.json without running")
    a = ap.parse_args()

    import dataclasses

    import jax
    import numpy as np

    from xpo_jax.config import TrainConfig
    from xpo_jax.run import build_run
    from xpo_jax.sweeps import finalise, grid_inputs, make_grid, make_sweep_fn, reference_eval, sweep_config

    if a.from_saved:
        return rewrite_from_saved()
    t_wall = time.perf_counter()
    base = TrainConfig(task="hard-explore", name="sweep_alpha_beta", progress=False, tensorboard=False)
    over = {k: v for k, v in (("rounds", a.rounds), ("eval_every", a.eval_every)) if v is not None}
    alphas = a.alphas if a.alphas is not None else list(ALPHAS)
    betas = a.betas if a.betas is not None else list(BETAS)
    seeds = a.seeds
    compile_s = run_s = 0.0
    parts = []
    # lambda = 1 (y~ from pi_ref): XPO and reference-sampling DPO; then online DPO (alpha 0, lambda 0).
    for part_alphas, mix in ((alphas, 1.0), ([0.0], 0.0)):
        cfg = sweep_config(dataclasses.replace(base, **over), [mix])
        grid = make_grid(part_alphas, betas, seeds, [mix])
        print(f"{len(grid['alpha'])} runs (lambda {mix:g}) of {cfg.rounds} rounds, one program", flush=True)
        run = build_run(cfg)
        keys, hp = grid_inputs(cfg, grid)
        fn = make_sweep_fn(cfg, run)
        t = time.perf_counter()
        compiled = fn.lower(keys, hp).compile()
        compile_s += time.perf_counter() - t
        t = time.perf_counter()
        _, curves = jax.device_get(jax.block_until_ready(compiled(keys, hp)))
        run_s += time.perf_counter() - t
        curves = {k: np.asarray(v) for k, v in curves.items()}
        parts.append((grid, curves, reference_eval(run, grid["beta"])))
    print(f"compiled in {compile_s:.1f} s, ran in {run_s:.1f} s", flush=True)
    join = lambda dicts: {k: np.concatenate([d[k] for d in dicts]) for k in dicts[0]}
    grid, curves, ref = (join([p[i] for p in parts]) for i in range(3))
    final = finalise(grid, curves, ref)
    wall_s = time.perf_counter() - t_wall

    d = jax.devices()[0]
    machine = (f"CPU {platform.machine()}, {os.cpu_count()} cores" if d.platform == "cpu"
               else f"{d.device_kind} ({d.platform})")
    timing = {"compile_s": compile_s, "run_s": run_s, "wall_s": wall_s, "jax": jax.__version__,
              "command": "python experiments/sweep_alpha_beta.py " + " ".join(sys.argv[1:]),
              "load_average": os.getloadavg()}
    os.makedirs(RESULTS, exist_ok=True)
    keep = [k for k in curves if k.startswith("eval/") or k in ("task/reward", "objective/kl", "loss")]
    np.savez_compressed(PREFIX + ".npz", **{k.replace("/", "__"): curves[k] for k in keep},
                        **{"final__" + k: v for k, v in final.items()})
    with open(PREFIX + ".json", "w") as f:
        json.dump({"config": cfg.to_dict(), "alphas": alphas, "betas": betas, "seeds": seeds, "machine": machine,
                   "date": datetime.date.today().isoformat(), **timing}, f, indent=1)
    write_reports(cfg, final, curves, alphas, betas, seeds, timing, machine)
    return 0


def rewrite_from_saved() -> int:
    import numpy as np

    from xpo_jax.config import TrainConfig
    from xpo_jax.sweeps import finalise

    saved = json.load(open(PREFIX + ".json"))
    npz = np.load(PREFIX + ".npz")
    curves = {k.replace("__", "/"): npz[k] for k in npz.files if not k.startswith("final__")}
    old = {k[len("final__"):]: npz[k] for k in npz.files if k.startswith("final__")}
    grid = {k: old[k] for k in ("alpha", "beta", "mix", "seed")}
    final = finalise(grid, curves, {k: v for k, v in old.items() if k.startswith("ref_")})
    cfg = TrainConfig.from_dict(saved["config"])
    timing = {k: saved[k] for k in ("compile_s", "run_s", "wall_s", "jax", "command")}
    write_reports(cfg, final, curves, saved["alphas"], saved["betas"], saved["seeds"], timing, saved["machine"],
                  date=saved["date"])
    return 0


def write_reports(cfg, final, curves, alphas, betas, seeds, timing, machine, date=None):
    from xpo_jax.reporting import plot_heatmap, plot_sweep_curves, write_csv

    write_csv(PREFIX + ".csv", final)
    title = f"hard-explore, {cfg.rounds} rounds"
    plot_heatmap(final, PREFIX + "_heatmap.png", title=title,
                 panels=(("j_beta", "exact J_beta (final)"), ("reward", "exact E[r] (final)"),
                         ("kl", "KL(pi || pi_ref)"), ("p_optimal", "P(optimal response)")))
    plot_sweep_curves(final, curves, PREFIX + "_curves.png", title=f"exact J_beta per round, {title}")
    write_markdown(PREFIX + ".md", cfg, final, alphas, betas, seeds, timing, machine, date=date)
    print(open(PREFIX + ".md").read())


if __name__ == "__main__":
    sys.exit(main())
