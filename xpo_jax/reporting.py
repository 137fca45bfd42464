"""Reporting: what a run and a sweep write for people to read. The names of the evaluation
metrics, metrics logs, summaries, learning-curve plots, the sweep's CSV, heatmap and curves.
Host-side numpy and matplotlib only; nothing here trains, and it imports nothing of xpo_jax (so
every layer may read the metric names from here).
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

# The evaluation metrics, by evaluator. Exact (tasks, every response enumerated):
EXACT_EVAL_KEYS = ("eval/reward", "eval/kl", "eval/j_beta", "eval/p_optimal", "eval/j_star")
# Held-out (HF runs): the policy's responses against the reference's, scored by a reward model.
HELD_OUT_EVAL_KEYS = ("eval/score", "eval/ref_score", "eval/win_rate", "eval/bt_win_prob", "eval/kl", "eval/length",
                      "eval/eos_rate", "eval/ref_length", "eval/ref_eos_rate")
# A sweep's per-cell columns taken from the exact evaluation after the last round.
FINAL_EVAL = {k.split("/", 1)[1]: k for k in EXACT_EVAL_KEYS}

# Sweep outputs: CSV column order (columns missing from a table are left out; a sweep's own loss
# and bonus hyperparameters go after "mix").
CSV_COLUMNS = ("alpha", "beta", "mix", "seed", "j_beta", "reward", "kl", "p_optimal", "j_star", "j_beta_late",
               "ref_j_beta", "ref_reward", "ref_p_optimal", "ref_kl", "ref_j_star", "sampled_reward", "first_optimal_round", "labels_to_p50",
               "labels_to_p90")


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl. A torn last line (a kill mid-write) is skipped; a bad line
    anywhere else is an error naming the file and line."""
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if all(not rest.strip() for rest in lines[i + 1:]):
                break  # the last line, cut short
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e})") from None
    return rows


def samples_markdown(rows: list[dict], width: int = 300) -> str:
    """A markdown table of sample rows (one column per key; long text cut to `width`)."""
    if not rows:
        return ""
    keys = list(rows[0])
    cell = lambda v: (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", "\\|").replace("\n", " ")[:width]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def run_summary(rows: list[dict]) -> dict:
    """Summary entries of a run's metrics rows: the exact evaluation of the reference (round 0)
    and of the final policy, and the last round's training scores and timing."""
    summary: dict = {}
    evals = [r for r in rows if "eval/j_beta" in r]
    if evals:
        first, last = evals[0], evals[-1]
        summary.update({
            "reference_j_beta": first["eval/j_beta"], "final_j_beta": last["eval/j_beta"],
            "reference_reward": first["eval/reward"], "final_reward": last["eval/reward"],
            "final_kl": last["eval/kl"], "reference_p_optimal": first["eval/p_optimal"],
            "final_p_optimal": last["eval/p_optimal"], "best_j_beta": max(r["eval/j_beta"] for r in evals),
            "optimal_j_beta": last["eval/j_star"],
        })
    train_rows = [r for r in rows if "loss" in r]
    if train_rows:
        summary["final_model_scores"] = train_rows[-1]["objective/model_scores"]
        summary["final_kl_estimate"] = train_rows[-1]["objective/kl"]
        summary["seconds"] = train_rows[-1]["time/elapsed_s"]
        summary["seconds_per_round"] = summary["seconds"] / max(len(train_rows), 1)
    return summary


def held_out_summary(rows: list[dict], samples: list[dict], about: dict) -> tuple[dict, str]:
    """(summary entries, markdown) of the held-out evaluations in `rows`: the table at the first
    and last evaluated round and three samples side by side (reference and policy) at the last.
    `about`: eval_prompts, eval_judge, eval_temperature, eval_source (the flag they came from)."""
    ev = [r for r in rows if "eval/win_rate" in r]
    if not ev:
        return {}, ""
    first, last = ev[0], ev[-1]
    entries = {k: about[k] for k in ("eval_prompts", "eval_judge", "eval_temperature")}
    entries.update({"reference_eval_score": first["eval/ref_score"], "final_eval_score": last["eval/score"],
                    "final_eval_win_rate": last["eval/win_rate"], "final_eval_bt_win_prob": last["eval/bt_win_prob"],
                    "final_eval_kl": last["eval/kl"], "best_eval_win_rate": max(r["eval/win_rate"] for r in ev)})
    cols = (("score", "eval/score"), ("ref score", "eval/ref_score"), ("win rate", "eval/win_rate"),
            ("BT win prob", "eval/bt_win_prob"), ("KL", "eval/kl"), ("length", "eval/length"),
            ("ref length", "eval/ref_length"), ("EOS rate", "eval/eos_rate"), ("ref EOS rate", "eval/ref_eos_rate"))
    table = ["| round | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    table += [f"| {r['round']} | " + " | ".join(f"{r[k]:.4f}" for _, k in cols) + " |"
              for r in ([first, last] if last is not first else [first])]
    text = (f"### Held-out evaluation: {about['eval_prompts']} prompts ({about['eval_source']}), judged by "
            f"{about['eval_judge']}, temperature {about['eval_temperature']:g}\n\n" + "\n".join(table))
    shown = [s for s in samples if s.get("round") == last["round"]][:3]
    if shown:
        side = [{"prompt": s["prompt"], "reference": f"{s['reference']} ({s['reference_score']:.3f})",
                 f"policy (round {last['round']})": f"{s['policy']} ({s['policy_score']:.3f})"} for s in shown]
        text += f"\n\n### Samples at round {last['round']} (score in brackets)\n\n" + samples_markdown(side)
    return entries, text


def write_summary(out_dir: str, summary: dict, extra_markdown: str = "") -> str:
    """summary.json and summary.md (a two-column table, then `extra_markdown`); returns the
    markdown."""
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    table = ["| metric | value |", "|---|---|"] + [
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()
    ]
    text = "\n".join(table) + (f"\n\n{extra_markdown.strip()}" if extra_markdown else "")
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text + "\n")
    return text


def plot_run_curves(rows: list[dict], path: str, title: str = "") -> None:
    """Learning curves. A task: exact J_beta / reward / KL (eval rows), the sampled reward per
    round, P(optimal). An HF run with a held-out evaluation: win rate against the reference,
    reward-model scores (policy vs reference) and KL per evaluated round, the per-round training
    scores and KL estimate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = [r for r in rows if "eval/win_rate" in r]
    names = ("held-out win rate vs reference", "held-out reward-model score", "KL(pi || pi_ref)", "per round") \
        if held else ("exact objective", "per round", "exploration")
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 3.6))
    ev = [r for r in rows if "eval/j_beta" in r]
    tr = [r for r in rows if "loss" in r]
    if ev:
        x = [r["round"] for r in ev]
        axes[0].plot(x, [r["eval/j_beta"] for r in ev], "o-", label="exact J_beta")
        axes[0].plot(x, [r["eval/reward"] for r in ev], "s--", label="exact E[r]")
        axes[0].axhline(ev[0]["eval/j_beta"], color="grey", lw=0.8, ls=":", label="reference J_beta")
        axes[0].plot(x, [r["eval/j_star"] for r in ev], color="k", lw=0.8, ls="--", label="optimal J_beta")
        axes[2].plot(x, [r["eval/p_optimal"] for r in ev], "o-", label="P(optimal response)")
        axes[2].set_yscale("log")
    if held:
        x = [r["round"] for r in held]
        axes[0].plot(x, [r["eval/win_rate"] for r in held], "o-", label="win rate (ties 1/2)")
        axes[0].plot(x, [r["eval/bt_win_prob"] for r in held], "s--", label="Bradley-Terry P(win)")
        axes[0].axhline(0.5, color="grey", lw=0.8, ls=":", label="reference (0.5)")
        axes[0].set_ylim(-0.02, 1.02)
        axes[1].plot(x, [r["eval/score"] for r in held], "o-", label="policy")
        axes[1].plot(x, [r["eval/ref_score"] for r in held], color="grey", ls=":", label="reference")
        axes[2].plot(x, [r["eval/kl"] for r in held], "o-", label="held-out log pi/pi_ref")
    per_round = axes[3] if held else axes[1]
    if tr:
        x = [r["round"] for r in tr]
        if "task/reward" in tr[0]:
            per_round.plot(x, [r["task/reward"] for r in tr], lw=0.8, label="reward of policy samples")
        elif held:
            per_round.plot(x, [r["objective/model_scores"] for r in tr], lw=0.8, label="score of y (policy)")
            per_round.plot(x, [r["objective/ytilde_scores"] for r in tr], lw=0.8, label="score of y~ (exploration)")
        (axes[2] if held else per_round).plot(x, [r["objective/kl"] for r in tr], lw=0.8, label="KL estimate (training)")
    for ax, t in zip(axes, names):
        ax.set_title(t)
        ax.set_xlabel("round")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------------------------


def csv_columns(final: dict) -> list[str]:
    """The sweep table's columns: CSV_COLUMNS present in `final`, with any other per-cell column
    (a swept loss or bonus hyperparameter) after "mix"."""
    G = final["alpha"].shape[0]
    extra = [k for k, v in final.items() if k not in CSV_COLUMNS and np.shape(v) == (G,)]
    cols = [c for c in CSV_COLUMNS if c in final]
    at = cols.index("mix") + 1 if "mix" in cols else 2
    return cols[:at] + extra + cols[at:]


def write_csv(path: str, final: dict) -> None:
    cols = csv_columns(final)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i in range(final["alpha"].shape[0]):
            w.writerow([_fmt(final[c][i], c) for c in cols])


def _fmt(v, col: str) -> str:
    if col == "seed":
        return str(int(v))
    return f"{float(v):.6g}"


def method_name(alpha: float, mix: float) -> str:
    """The baseline a cell is, named exactly: online DPO draws both responses from pi_t (lambda =
    0), reference-sampling DPO draws y~ from pi_ref (lambda = 1), XPO adds the bonus (alpha > 0)."""
    if alpha == 0:
        return {0.0: "online DPO", 1.0: "ref-sampling DPO"}.get(float(mix), f"DPO, lambda={mix:g}")
    tail = {1.0: "", 0.0: ", y~ from pi_t"}.get(float(mix), f", lambda={mix:g}")
    return f"XPO alpha={alpha:g}{tail}"


def _methods(final: dict) -> list:
    mix = np.asarray(final.get("mix", np.ones_like(final["alpha"])))
    return sorted({(float(a), float(m)) for a, m in zip(final["alpha"], mix)}, key=lambda am: (am[0] > 0, am[0], -am[1]))


def _select(final: dict, method: tuple) -> np.ndarray:
    mix = np.asarray(final.get("mix", np.ones_like(final["alpha"])))
    return (final["alpha"] == np.float32(method[0])) & (mix == np.float32(method[1]))


def seed_table(final: dict, metric: str) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """(methods [(alpha, mix)], betas [Bt], mean [M, Bt], std [M, Bt]) of `metric` over seeds."""
    methods = _methods(final)
    betas = np.unique(final["beta"])
    mean = np.full((len(methods), len(betas)), np.nan)
    std = np.full_like(mean, np.nan)
    for i, method in enumerate(methods):
        for j, b in enumerate(betas):
            v = np.asarray(final[metric])[_select(final, method) & (final["beta"] == b)]
            mean[i, j], std[i, j] = np.nanmean(v), np.nanstd(v)
    return methods, betas, mean, std


HEATMAP_PANELS = (("j_beta", "exact J_beta (final)"), ("reward", "exact E[r] (final)"), ("kl", "KL(pi || pi_ref)"))


def plot_heatmap(final: dict, path: str, title: str = "", panels: Sequence = HEATMAP_PANELS) -> None:
    """Final exact J_beta, true reward and KL (or `panels`: (metric, title) pairs) averaged over
    seeds; rows the methods (alpha, lambda), columns beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, t) for m, t in panels if m in final]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 0.5 * len(_methods(final)) + 2.4))
    for ax, (metric, t) in zip(np.atleast_1d(axes), panels):
        methods, betas, mean, std = seed_table(final, metric)
        im = ax.imshow(mean, aspect="auto", cmap="viridis" if metric != "kl" else "magma")
        for i in range(mean.shape[0]):
            for j in range(mean.shape[1]):
                ax.text(j, i, f"{mean[i, j]:.3g}\n±{std[i, j]:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if mean[i, j] < np.nanmean(mean) else "black")
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(methods)), [method_name(*m) for m in methods], fontsize=7)
        ax.set_xlabel("beta")
        ax.set_title(t, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    n_seeds = len(np.unique(final["seed"]))
    fig.suptitle(f"{title} (mean ± std over {n_seeds} seeds)".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep_curves(final: dict, curves: dict, path: str, metric: str = "eval/j_beta", title: str = "") -> None:
    """Learning curves of `metric` per method (alpha, lambda; seed mean ± std band), one panel per
    beta, with pi_ref's value (dotted) and the optimum J* (dashed) when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(curves[metric])
    R = y.shape[1]
    rounds = np.arange(1, R + 1)
    evaluated = ~np.all(np.isnan(y), axis=0)
    methods, betas = _methods(final), np.unique(final["beta"])
    fig, axes = plt.subplots(1, len(betas), figsize=(4.4 * len(betas), 3.6), squeeze=False, sharey=False)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(methods)))
    for ax, b in zip(axes[0], betas):
        for method, c in zip(methods, colors):
            sel = _select(final, method) & (final["beta"] == b)
            v = y[sel][:, evaluated]
            x = rounds[evaluated]
            if metric == "eval/j_beta" and "ref_j_beta" in final:  # round 0: the policy is pi_ref
                v = np.concatenate([np.asarray(final["ref_j_beta"])[sel][:, None], v], axis=1)
                x = np.concatenate([[0], x])
            m, s = np.nanmean(v, 0), np.nanstd(v, 0)
            ax.plot(x, m, "-", color=c, lw=1.4, label=method_name(*method))
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


def write_sweep_outputs(out_dir: str, cfg: Any, final: dict, curves: dict, info: Optional[dict] = None) -> dict:
    """sweep.csv, heatmap.png, curves.png, curves.npz, params.npz (the final policies) and
    sweep.json in `out_dir`; returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, v) for k, v in (("csv", "sweep.csv"), ("heatmap", "heatmap.png"),
                                                       ("curves", "curves.png"), ("npz", "curves.npz"),
                                                       ("json", "sweep.json"))}
    write_csv(paths["csv"], final)
    title = f"{cfg.name}: {cfg.task}, {cfg.rounds} rounds"
    plot_heatmap(final, paths["heatmap"], title=title)
    if "eval/j_beta" in curves:
        plot_sweep_curves(final, curves, paths["curves"], title=title)
    table = {k: v for k, v in final.items() if k != "params"}
    np.savez_compressed(paths["npz"], **{k.replace("/", "__"): v for k, v in curves.items()},
                        **{"final__" + k: v for k, v in table.items()})
    if "params" in final:  # every cell's final policy, leaves [G, ...] under their tree paths
        import jax

        paths["params"] = os.path.join(out_dir, "params.npz")
        flat = jax.tree_util.tree_flatten_with_path(final["params"])[0]
        np.savez_compressed(paths["params"], **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
    with open(paths["json"], "w") as f:
        json.dump({"config": cfg.to_dict(), "cells": int(final["alpha"].shape[0]), **(info or {})}, f, indent=1)
    return paths


def summary_table(final: dict, metric: str = "j_beta") -> str:
    """Markdown: mean ± std over seeds of `metric`, rows the methods, columns beta."""
    methods, betas, mean, std = seed_table(final, metric)
    lines = [f"| {metric}: method \\ beta | " + " | ".join(f"{b:g}" for b in betas) + " |",
             "|---|" + "---|" * len(betas)]
    for i, method in enumerate(methods):
        lines.append(f"| {method_name(*method)} | "
                     + " | ".join(f"{mean[i, j]:.4f} ± {std[i, j]:.4f}" for j in range(len(betas))) + " |")
    return "\n".join(lines)
