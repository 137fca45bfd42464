"""When does XPO's exploration bonus find the optimum that online DPO misses, and at what cost?

    python experiments/exploration_study.py                 # the full study (~1-2 h on 2 CPU cores)
    python experiments/exploration_study.py --quick         # a smoke run of the whole pipeline
    python experiments/exploration_study.py --report-only   # re-analyse the saved cells

Task families with a coverage knob (`xpo_jax.tasks.coverage`; pi_ref(optimal) = coverage): a
one-step contextual bandit and a 3-token chain, both with a tabular policy and an exact
reference, and the same chain with the tiny Transformer policy (its reference fine-tuned on the
tabular chain's samples). For each (family, coverage) a few programs, each one vmapped sweep
(`xpo_jax.sweep`) over alpha x lambda x 16 seeds:

    fresh/clip      TRL's update (one step on the fresh batch), bonus log-ratio clipped to +-1:
                    alpha in {0, 0.01, 0.1, 1} x lambda in {1, 0}: XPO, XPO with y~ from pi_t,
                    reference-sampling DPO (alpha 0, lambda 1) and online DPO (alpha 0, lambda 0)
    fresh/vmax      the paper's bound, log-ratio clipped to [-V_max/beta, V_max/beta] (XPO only)
    fresh/logprob   TRL's unbounded alpha log pi(y~) (XPO only)
    alg1/clip       Algorithm 1's update: every pair so far kept, K = 4 optimiser steps per round
                    on fresh minibatches of 32 drawn from them; the same 8 methods as fresh/clip

Every cell records the exact P(optimal) every 10 rounds, the labels (oracle queries) used, and
the first round an optimal response was sampled. Labels-to-optimum is the labels used until the
exact P(optimal) first reached 0.5; cells that never did are censored at the run's labels. XPO is
compared with online DPO under the same update, seed by seed (the seed fixes the prompts and the
initial draws), by a Wilcoxon signed-rank test on the censored log labels, and on final J_beta.

Writes experiments/results/exploration_study.{md,csv,json} and exploration_study_*.png; the cells
are cached in experiments/results/exploration_study_cells.jsonl (one line per program), so an
interrupted study resumes where it stopped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "experiments", "results")
PREFIX = os.path.join(RESULTS, "exploration_study")
CELLS = PREFIX + "_cells.jsonl"

COVERAGES = (1e-1, 1e-2, 1e-3, 1e-4)
ALPHAS = (0.0, 0.01, 0.1, 1.0)
XPO_ALPHAS = (0.01, 0.1, 1.0)
BETA = 0.1
BATCH = 32
EVAL_EVERY = 10

# family -> (rounds per coverage, learning rate, coverages, alphas of the XPO cells)
FAMILIES = {
    "bandit": dict(rounds={1e-1: 300, 1e-2: 400, 1e-3: 600, 1e-4: 900}, lr=0.05, coverages=COVERAGES,
                   alphas=XPO_ALPHAS),
    "chain": dict(rounds={1e-1: 300, 1e-2: 400, 1e-3: 600, 1e-4: 900}, lr=0.05, coverages=COVERAGES,
                  alphas=XPO_ALPHAS),
    "chain-transformer": dict(rounds={1e-2: 400, 1e-3: 600}, lr=1e-3, coverages=(1e-2, 1e-3), alphas=(0.1,)),
}
# program -> (TrainConfig overrides, whether the baselines (alpha 0) and lambda = 0 cells run in it)
PROGRAMS = {
    "fresh/clip": (dict(bonus="clip", bonus_params={"clip_low": -1.0, "clip_high": 1.0}), True),
    "fresh/vmax": (dict(bonus="vmax"), False),
    "fresh/logprob": (dict(bonus="logprob"), False),
    "alg1/clip": (dict(bonus="clip", bonus_params={"clip_low": -1.0, "clip_high": 1.0}, updates_per_round=4,
                       replay_batch_size=BATCH), True),
}
TRANSFORMER_PROGRAMS = ("fresh/clip", "alg1/clip")


def task_for(family: str, coverage: float):
    from xpo_jax.tasks import get_task
    from xpo_jax.tasks.coverage import coverage_label

    return get_task(f"{family}-{coverage_label(coverage)}")


def run_program(family: str, coverage: float, program: str, seeds: list, rounds: int, quick: bool) -> dict:
    """One vmapped sweep; returns its cells as lists (JSON-able)."""
    from xpo_jax.config import TrainConfig
    from xpo_jax.sweeps import sweep

    spec = FAMILIES[family]
    overrides, with_baselines = PROGRAMS[program]
    overrides = dict(overrides)
    if "replay_batch_size" in overrides:
        overrides["replay_capacity"] = rounds * BATCH  # every pair of the run
    task = task_for(family, coverage)
    cfg = TrainConfig(task=task.name, rounds=rounds, batch_size=BATCH, learning_rate=spec["lr"], beta=BETA,
                      eval_every=EVAL_EVERY, progress=False, tensorboard=False, **overrides)
    alphas = ((0.0,) if with_baselines else ()) + tuple(spec["alphas"])
    mixes = (1.0, 0.0) if with_baselines else (1.0,)
    t0 = time.perf_counter()
    final, curves = sweep(cfg, alphas=alphas, betas=[BETA], seeds=seeds, mixes=mixes)
    seconds = time.perf_counter() - t0
    keep = ("alpha", "mix", "seed", "j_beta", "reward", "kl", "p_optimal", "j_star", "ref_j_beta", "ref_p_optimal",
            "first_optimal_round", "labels_to_p50", "labels_to_p90")
    cells = {k: np.asarray(final[k]).tolist() for k in keep}
    every = curves["eval/p_optimal"]
    evaluated = ~np.all(np.isnan(every), axis=0)
    return dict(family=family, coverage=coverage, program=program, rounds=rounds, seconds=seconds,
                max_labels=float(curves["labels"][0, -1]), cells=cells,
                curve_rounds=(np.flatnonzero(evaluated) + 1).tolist(),
                p_optimal_curves=np.round(every[:, evaluated], 5).tolist())


def load_cells() -> list:
    if not os.path.exists(CELLS):
        return []
    with open(CELLS) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------


def method_of(alpha: float, mix: float) -> str:
    from xpo_jax.reporting import method_name

    return method_name(alpha, mix)


def censored(labels: np.ndarray, max_labels: float) -> np.ndarray:
    """Labels to P(optimal) >= 0.5, with never-reached cells set just past the run's labels."""
    return np.where(np.isnan(labels), 2.0 * max_labels, labels)


def paired_test(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples (1.0 when all pairs are equal)."""
    from scipy.stats import wilcoxon

    d = np.asarray(a, float) - np.asarray(b, float)
    if np.all(d == 0):
        return 1.0
    return float(wilcoxon(a, b, zero_method="zsplit").pvalue)


def summarise(programs: list) -> list:
    """One row per (family, coverage, program, method) with the seed statistics and, for XPO
    methods, the paired comparison with online DPO under the same update."""
    baselines = {}
    for p in programs:
        c = {k: np.asarray(v, float) for k, v in p["cells"].items()}
        if p["program"] in ("fresh/clip", "alg1/clip"):
            update = p["program"].split("/")[0]
            sel = (c["alpha"] == 0) & (c["mix"] == 0)
            order = np.argsort(c["seed"][sel])
            baselines[(p["family"], p["coverage"], update)] = {k: v[sel][order] for k, v in c.items()}
    rows = []
    for p in programs:
        c = {k: np.asarray(v, float) for k, v in p["cells"].items()}
        update = p["program"].split("/")[0]
        base = baselines.get((p["family"], p["coverage"], update))
        for alpha, mix in sorted({(a, m) for a, m in zip(c["alpha"], c["mix"])}):
            if p["program"] not in ("fresh/clip", "alg1/clip") and alpha == 0:
                continue
            sel = (c["alpha"] == alpha) & (c["mix"] == mix)
            order = np.argsort(c["seed"][sel])
            cell = {k: v[sel][order] for k, v in c.items()}
            lab = censored(cell["labels_to_p50"], p["max_labels"])
            row = dict(family=p["family"], coverage=p["coverage"], program=p["program"], alpha=alpha, mix=mix,
                       method=method_of(alpha, mix), seeds=int(sel.sum()), max_labels=p["max_labels"],
                       reached=int(np.sum(~np.isnan(cell["labels_to_p50"]))),
                       median_labels=float(np.median(lab)), j_beta=float(np.mean(cell["j_beta"])),
                       j_beta_std=float(np.std(cell["j_beta"])), kl=float(np.mean(cell["kl"])),
                       p_optimal=float(np.mean(cell["p_optimal"])), j_star=float(np.mean(cell["j_star"])),
                       ref_j_beta=float(np.mean(cell["ref_j_beta"])))
            if base is not None and not (alpha == 0 and mix == 0):
                base_lab = censored(base["labels_to_p50"], p["max_labels"])
                row["dpo_median_labels"] = float(np.median(base_lab))
                row["labels_ratio"] = row["median_labels"] / row["dpo_median_labels"]
                row["labels_p"] = paired_test(np.log(lab), np.log(base_lab))
                row["j_beta_vs_dpo"] = float(np.mean(cell["j_beta"] - base["j_beta"]))
                row["j_beta_p"] = paired_test(cell["j_beta"], base["j_beta"])
            rows.append(row)
    return rows


def fmt_labels(v: float, max_labels: float) -> str:
    return "never" if v >= 2 * max_labels else f"{v:.0f}"


def write_report(programs: list, rows: list, meta: dict) -> None:
    import csv

    os.makedirs(RESULTS, exist_ok=True)
    cols = list(rows[0]) + [k for k in ("dpo_median_labels", "labels_ratio", "labels_p", "j_beta_vs_dpo", "j_beta_p")
                            if k not in rows[0]]
    with open(PREFIX + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    with open(PREFIX + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        "# Exploration study: XPO against online DPO and reference-sampling DPO",
        "",
        f"Machine: {meta['machine']}; date {meta['date']}; command `{meta['command']}`; "
        f"{meta['seconds'] / 60:.0f} min of sweeps. beta = {BETA}, batch {BATCH} pairs per round (= labels per round), "
        f"Bradley-Terry oracle, exact P(optimal) every {EVAL_EVERY} rounds, {meta['seeds']} seeds per cell. "
        "Labels-to-optimum: oracle labels used until the exact P(optimal) first reached 0.5 (median over seeds; "
        "`never` = not within the run). Ratio: XPO's median over online DPO's under the same update; p: Wilcoxon "
        "signed-rank, paired by seed, on log labels (censored at twice the run's labels) and on final J_beta.",
        "",
    ]
    for fam in FAMILIES:
        fam_rows = [r for r in rows if r["family"] == fam]
        if not fam_rows:
            continue
        lines += [f"## {fam}", ""]
        for cov in sorted({r["coverage"] for r in fam_rows}, reverse=True):
            cr = [r for r in fam_rows if r["coverage"] == cov]
            lines += [f"### pi_ref(optimal) = {cov:g} ({cr[0]['max_labels']:.0f} labels per run; J* = {cr[0]['j_star']:.3f}, "
                      f"pi_ref's J_beta {cr[0]['ref_j_beta']:.3f})", "",
                      "| update/bonus | method | reached P>=0.5 | median labels | ratio vs online DPO | p (labels) | "
                      "final J_beta | J_beta - DPO | p (J_beta) | KL | P(optimal) |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in cr:
                line = (f"| {r['program']} | {r['method']} | {r['reached']}/{r['seeds']} | "
                        f"{fmt_labels(r['median_labels'], r['max_labels'])} | ")
                jb = f"{r['j_beta']:.3f} ± {r['j_beta_std']:.3f} | "
                if "labels_p" in r:
                    line += f"{r['labels_ratio']:.2f} | {r['labels_p']:.3g} | {jb}{r['j_beta_vs_dpo']:+.3f} | {r['j_beta_p']:.3g} | "
                else:
                    line += f" |  | {jb} |  | "
                lines.append(line + f"{r['kl']:.2f} | {r['p_optimal']:.3f} |")
            lines.append("")
    lines += ["## Answer", "", meta.get("answer", "(written after the study ran: see BUILD_NOTES.md)"), ""]
    with open(PREFIX + ".md", "w") as f:
        f.write("\n".join(lines))
    plot(programs)


def plot(programs: list) -> None:
    """Per family: median labels-to-optimum against coverage for each method (fresh/clip and
    alg1/clip), and P(optimal) learning curves at the lowest coverage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for fam in FAMILIES:
        ps = [p for p in programs if p["family"] == fam]
        if not ps:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        for ax, prog in zip(axes[:2], ("fresh/clip", "alg1/clip")):
            by_method = {}
            for p in (p for p in ps if p["program"] == prog):
                c = {k: np.asarray(v, float) for k, v in p["cells"].items()}
                for a, m in sorted({(a, m) for a, m in zip(c["alpha"], c["mix"])}):
                    sel = (c["alpha"] == a) & (c["mix"] == m)
                    med = np.median(censored(c["labels_to_p50"][sel], p["max_labels"]))
                    by_method.setdefault(method_of(a, m), []).append((p["coverage"], med, p["max_labels"]))
            for name, pts in by_method.items():
                pts.sort()
                x = [q[0] for q in pts]
                y = [min(q[1], 1.5 * q[2]) for q in pts]
                ax.plot(x, y, "o-" if "XPO" in name else "s--", label=name, lw=1.3)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("pi_ref(optimal)")
            ax.set_ylabel("median labels to P(optimal) >= 0.5")
            ax.set_title(f"{fam}: {prog} (above the runs' labels = never)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        low = min(p["coverage"] for p in ps)
        for p in (p for p in ps if p["coverage"] == low and p["program"] == "fresh/clip"):
            c = {k: np.asarray(v, float) for k, v in p["cells"].items()}
            curves = np.asarray(p["p_optimal_curves"])
            x = np.asarray(p["curve_rounds"]) * BATCH
            for a, m in sorted({(a, m) for a, m in zip(c["alpha"], c["mix"])}):
                sel = (c["alpha"] == a) & (c["mix"] == m)
                y = curves[sel]
                axes[2].plot(x, np.median(y, 0), label=method_of(a, m), lw=1.3)
                axes[2].fill_between(x, np.percentile(y, 25, 0), np.percentile(y, 75, 0), alpha=0.15)
        axes[2].set_xlabel("labels")
        axes[2].set_ylabel("exact P(optimal) (median, IQR)")
        axes[2].set_title(f"{fam}, pi_ref(optimal) = {low:g}, fresh/clip", fontsize=9)
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(f"{PREFIX}_{fam}.png", dpi=100)
        plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 seeds, 40 rounds, two coverages: a pipeline check")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    global PREFIX, CELLS
    if args.quick:
        PREFIX = os.path.join(RESULTS, "exploration_study_quick")
        CELLS = PREFIX + "_cells.jsonl"
    seeds = list(range(2 if args.quick else args.seeds))
    done = {(p["family"], p["coverage"], p["program"]) for p in load_cells()}
    t_start = time.perf_counter()
    if not args.report_only:
        for fam in args.families.split(","):
            spec = FAMILIES[fam]
            coverages = spec["coverages"][:2] if args.quick else spec["coverages"]
            programs = TRANSFORMER_PROGRAMS if fam == "chain-transformer" else tuple(PROGRAMS)
            for cov in coverages:
                for prog in programs:
                    if (fam, cov, prog) in done:
                        continue
                    rounds = 40 if args.quick else spec["rounds"][cov]
                    out = run_program(fam, cov, prog, seeds, rounds, args.quick)
                    print(f"{fam} {cov:g} {prog}: {out['seconds']:.0f} s", flush=True)
                    with open(CELLS, "a") as f:
                        f.write(json.dumps(out) + "\n")
    programs = load_cells()
    if not programs:
        print("no cells yet")
        return 1
    rows = summarise(programs)
    meta = dict(machine=f"{platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'})",
                date=datetime.date.today().isoformat(),
                command="python experiments/exploration_study.py " + " ".join(
                    a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"),
                seconds=sum(p["seconds"] for p in programs), seeds=len(seeds),
                wall_s_this_call=time.perf_counter() - t_start)
    answer_path = PREFIX + "_answer.md"
    if os.path.exists(answer_path):
        meta["answer"] = open(answer_path).read().strip()
    write_report(programs, rows, meta)
    print(open(PREFIX + ".md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
