"""Training: `make_train(cfg)` (pure, `lax.scan` over rounds, vmappable) and `Trainer` (host loop).

The PureJaxRL shape: `train = make_train(cfg)` returns a pure `train(key, hparams) -> (state,
metrics)` whose metrics are stacked per round; `jax.jit(jax.vmap(train))` runs a grid of seeds and
hyperparameters as one program. `Trainer(cfg).run()` drives the same round function from Python
for long runs: progress bar, JSONL + TensorBoard metrics, checkpoints, SIGTERM, NaN stop, summary
table and learning-curve plot.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from xpo_jax.config import TrainConfig, check_resumable
from xpo_jax.models.transformer import Transformer
from xpo_jax.oracles import reward_fn_oracle
from xpo_jax.round import RoundFns, make_optimizer, make_round
from xpo_jax.state import Hyperparams, XPOState, initial_state
from xpo_jax.tasks import Task, resolve_task

Array = jax.Array

EVAL_KEYS = ("eval/reward", "eval/kl", "eval/j_beta", "eval/p_optimal", "eval/j_star")


class NonFiniteLoss(RuntimeError):
    """A round produced a NaN or infinite loss; nothing from it was saved."""


@dataclasses.dataclass
class Run:
    """Everything built once on the host for a config: task, model, reference, round functions."""

    cfg: TrainConfig
    task: Task
    apply_fn: Callable
    ref_params: Any
    fns: RoundFns
    tx: Any
    max_new_tokens: int

    def hparams(self) -> Hyperparams:
        return Hyperparams.from_config(self.cfg)

    def init_state(self, key: Array, hparams: Hyperparams) -> XPOState:
        return initial_state(self.cfg, apply_fn=self.apply_fn, ref_params=self.ref_params, tx=self.tx, key=key,
                             hparams=hparams, prompt_len=self.task.prompt_len, max_new_tokens=self.max_new_tokens)

    def data_key(self, key: Array) -> Array:
        return jax.random.fold_in(key, 0x5EED)

    def prompts_for(self, data_key: Array, round_idx) -> tuple[Array, Array]:
        """The prompts of round `round_idx`: a pure function of (data_key, round), so a resumed
        run, or every host of a multi-host run, draws the same ones."""
        return self.task.sample_prompts(jax.random.fold_in(data_key, round_idx), self.cfg.batch_size)

    def round_with_prompts(self, state: XPOState, data_key: Array):
        """This round's prompts and the fused round, one program."""
        return self.fns.round_fn(state, *self.prompts_for(data_key, state.round))

    # -- the host loop's interface (also implemented by xpo_jax.hf_train.HFRun) ------------

    has_exact_eval = True

    def make_host_step(self, key: Array) -> Callable:
        """state -> (state, metrics): one jitted program per round, the state donated."""
        step = jax.jit(self.round_with_prompts, donate_argnums=0)
        data_key = self.data_key(key)
        return lambda state: step(state, data_key)

    def data_position(self) -> dict:
        return {}  # prompts are a function of state.round

    def restore_data_position(self, position: dict) -> None:
        pass

    def exact_eval(self, params: Any, beta: Array) -> dict:
        out = self.task.exact_eval(self.apply_fn, params, self.ref_params, beta)
        return {f"eval/{k}": out[k] for k in ("reward", "kl", "j_beta", "p_optimal", "j_star")}

    def evaluate(self, state: XPOState) -> dict:
        """Exact evaluation of the state's policy at the beta of its last completed round (the
        schedule clips round -1, the reference's evaluation, to round 0)."""
        _, beta = state.hparams.scheduled(state.round - 1, self.cfg.rounds)
        return self.exact_eval(state.params, beta)


def build_run(cfg: TrainConfig):
    """The Run for a config: a built-in task, or (with --policy) HF checkpoints and a prompt file."""
    cfg.validate()
    if cfg.policy is not None:
        from xpo_jax.hf_train import build_hf_run

        return build_hf_run(cfg)
    task = resolve_task(cfg.task)
    n = cfg.max_new_tokens or task.max_new_tokens
    if n > task.max_new_tokens:
        raise ValueError(f"--max-new-tokens={n} exceeds task {task.name!r}'s limit {task.max_new_tokens}")
    model = Transformer(task.model_config)
    ref_params = task.make_reference(jax.random.PRNGKey(cfg.reference_seed))
    oracle = reward_fn_oracle(
        task.reward_fn, eos_id=task.eos_id, bradley_terry=cfg.bradley_terry,
        missing_eos_penalty=cfg.missing_eos_penalty, mask_identical=cfg.mask_identical,
    )
    tx, schedule = make_optimizer(cfg)
    fns = make_round(
        cfg, apply_fn=model.apply, eos_id=task.eos_id, pad_id=task.pad_id, max_new_tokens=n, oracle=oracle,
        true_reward_fn=task.reward_fn, lr_schedule=schedule,
    )
    return Run(cfg, task, model.apply, ref_params, fns, tx, n)


def make_train(cfg: TrainConfig, run: Optional[Run] = None) -> Callable:
    """Pure `train(key, hparams) -> (final XPOState, metrics {name: [rounds]})`.

    `key` is a raw PRNG key (`jax.random.PRNGKey(seed)`), `hparams` a `Hyperparams` (traced):
    `jax.vmap(train)` over stacked keys and hyperparameters is a sweep in one program. Exact
    evaluation (`eval/*`) runs every `eval_every` rounds and after the last; other rounds hold NaN.
    """
    run = run or build_run(cfg)
    R, every = cfg.rounds, cfg.eval_every

    def train(key: Array, hparams: Hyperparams):
        state = run.init_state(key, hparams)
        data_key = run.data_key(key)

        def body(state, _):
            state, metrics = run.round_with_prompts(state, data_key)
            if every:
                due = (state.round % every == 0) | (state.round == R)
                nan = {k: jnp.full((), jnp.nan, jnp.float32) for k in EVAL_KEYS}
                metrics.update(jax.lax.cond(due, run.evaluate, lambda s: nan, state))
            return state, metrics

        return jax.lax.scan(body, state, None, length=R)

    return train


# ----------------------------------------------------------------------------------------------
# Host loop
# ----------------------------------------------------------------------------------------------


class Trainer:
    """Long runs from Python: the jitted fused round, logging, checkpoints, SIGTERM, NaN stop.

    Output in <run_dir>/<name>/: config.json, metrics.jsonl (one line per round), events.* for
    TensorBoard, checkpoints/<round>/, curve.png, summary.json and summary.md.
    """

    def __init__(self, cfg: TrainConfig, run: Optional[Run] = None):
        self.cfg = cfg.validate()
        self.out = os.path.join(cfg.run_dir, cfg.name)
        self._claim_run_dir()  # before the (slow) build: a clash is reported at once
        self.run_ = run or build_run(cfg)
        self._stop_signal: Optional[int] = None
        self._step = self.run_.make_host_step(jax.random.PRNGKey(cfg.seed))
        self._eval = jax.jit(self.run_.evaluate) if self.run_.has_exact_eval else None

    # -- pieces ---------------------------------------------------------------------------

    def _claim_run_dir(self) -> None:
        """Refuse to start a new run on top of an earlier run's checkpoints (orbax would refuse
        to save over them only at the end of training), unless --resume or --overwrite."""
        ckpt_dir = os.path.join(self.out, "checkpoints")
        earlier = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
        if not earlier or self.cfg.resume:
            return
        if not self.cfg.overwrite:
            raise ValueError(
                f"{self.out} holds checkpoints of an earlier run: pass --resume to continue it, "
                f"--overwrite to start afresh (deletes them), or another --name"
            )
        import shutil

        shutil.rmtree(ckpt_dir)
        for f in os.listdir(self.out):
            if f == "metrics.jsonl" or f.startswith("events.out.tfevents"):
                os.remove(os.path.join(self.out, f))

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def _evaluate(self, state: XPOState) -> dict:
        return {k: float(v) for k, v in jax.device_get(self._eval(state)).items()}

    def _should_eval(self, r: int) -> bool:
        every = self.cfg.eval_every if self._eval is not None else 0
        return bool(every) and (r % every == 0 or r == self.cfg.rounds)

    # -- the loop -------------------------------------------------------------------------

    def run(self, stop_after: Optional[int] = None) -> dict:
        """Train until cfg.rounds (or `stop_after` rounds in this call, for tests); returns the
        summary. Raises NonFiniteLoss on a NaN/inf loss without saving that round."""
        from xpo_jax.checkpoint import Checkpointer

        cfg, run = self.cfg, self.run_
        os.makedirs(self.out, exist_ok=True)
        ckpt = Checkpointer(os.path.join(self.out, "checkpoints"), keep=cfg.keep_checkpoints)
        key = jax.random.PRNGKey(cfg.seed)
        state = run.init_state(key, run.hparams())
        start = 0
        if cfg.resume and ckpt.latest_round() is not None:
            state, saved_cfg, data = ckpt.restore(state)
            check_resumable(saved_cfg, cfg.to_dict())
            start = int(data["round"])
            run.restore_data_position(data)
            print(f"resumed from {ckpt.directory}/{start} (round {start} of {cfg.rounds})", flush=True)
        elif os.path.exists(os.path.join(self.out, "metrics.jsonl")):
            os.remove(os.path.join(self.out, "metrics.jsonl"))  # a run that never saved: start the log afresh
        with open(os.path.join(self.out, "config.json"), "w") as f:
            f.write(cfg.to_json())

        writer = self._tensorboard()
        log = open(os.path.join(self.out, "metrics.jsonl"), "a")
        bar = self._progress(start)
        old_handler = signal.signal(signal.SIGTERM, self._on_signal)
        if start == 0 and self._eval is not None and cfg.eval_every:
            ref_eval = self._evaluate(state)
            self._write(log, writer, {"round": 0, **ref_eval})
        last_saved = start
        end = cfg.rounds if stop_after is None else min(cfg.rounds, start + stop_after)
        t0 = time.perf_counter()
        try:
            for r in range(start + 1, end + 1):
                state, metrics = self._step(state)
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm")):
                    raise NonFiniteLoss(
                        f"round {r}: loss={m['loss']}, grad_norm={m['grad_norm']}; stopping. The last good "
                        f"checkpoint (round {ckpt.latest_round()}) is untouched."
                    )
                if self._should_eval(r):
                    m.update(self._evaluate(state))
                m["round"] = r
                m["time/elapsed_s"] = time.perf_counter() - t0
                self._write(log, writer, m)
                if bar is not None:
                    bar.update(1)
                    post = {"reward": m.get("task/reward", m["objective/model_scores"]), "kl": m["objective/kl"]}
                    if "eval/j_beta" in m:
                        post["J"] = m["eval/j_beta"]
                    bar.set_postfix({k: f"{v:.3f}" for k, v in post.items()})
                due = cfg.checkpoint_every and r % cfg.checkpoint_every == 0
                if due or r == end or self._stop_signal is not None:
                    ckpt.save(r, state, cfg.to_dict(), {"round": r, **run.data_position()})
                    last_saved = r
                if self._stop_signal is not None:
                    print(f"\nsignal {self._stop_signal}: saved round {r} to {ckpt.directory}; exiting", flush=True)
                    break
        finally:
            signal.signal(signal.SIGTERM, old_handler)
            log.close()
            if writer is not None:
                writer.close()
            if bar is not None:
                bar.close()
            ckpt.close()
        self.state = state
        summary = self._summarise(last_saved)
        return summary

    # -- output ---------------------------------------------------------------------------

    def _tensorboard(self):
        if not self.cfg.tensorboard:
            return None
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # e.g. a device image without it: say so, keep training
            print("tensorboardX is not installed: no TensorBoard events (metrics.jsonl has everything)")
            return None
        return SummaryWriter(self.out)

    def _progress(self, start: int):
        if not self.cfg.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.rounds, initial=start, desc=self.cfg.name, unit="round")

    @staticmethod
    def _write(log, writer, m: dict) -> None:
        log.write(json.dumps(m) + "\n")
        log.flush()
        if writer is not None:
            for k, v in m.items():
                if k != "round":
                    writer.add_scalar(k, v, m["round"])

    def _summarise(self, last_round: int) -> dict:
        rows = read_metrics(os.path.join(self.out, "metrics.jsonl"))
        evals = [r for r in rows if "eval/j_beta" in r]
        what = {"task": self.cfg.task} if self.cfg.policy is None else {"policy": self.cfg.policy, "reward_model": self.cfg.reward_model}
        summary = {"name": self.cfg.name, **what, "rounds": last_round}
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
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        table = ["| metric | value |", "|---|---|"] + [
            f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()
        ]
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write("\n".join(table) + "\n")
        print("\n".join(table))
        plot_curves(rows, os.path.join(self.out, "curve.png"), title=f"{self.cfg.name} on {self.cfg.task if self.cfg.policy is None else os.path.basename(self.cfg.policy.rstrip('/'))}")
        return summary


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(rows: list[dict], path: str, title: str = "") -> None:
    """Learning curves: exact J_beta / reward / KL (eval rows) and the sampled reward per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
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
    if tr:
        x = [r["round"] for r in tr]
        if "task/reward" in tr[0]:
            axes[1].plot(x, [r["task/reward"] for r in tr], lw=0.8, label="reward of policy samples")
        axes[1].plot(x, [r["objective/kl"] for r in tr], lw=0.8, label="KL estimate")
    for ax, t in zip(axes, ("exact objective", "per round", "exploration")):
        ax.set_title(t)
        ax.set_xlabel("round")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
