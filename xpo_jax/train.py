"""Training on one device or any mesh: `make_train` (pure) and `Trainer` (the one host loop).

The PureJaxRL shape: `make_train(cfg, run, mesh=None)` returns a pure `train(key, hparams) ->
(state, metrics)` whose metrics are stacked per round (`lax.scan`); `jax.jit(jax.vmap(train))` runs
a grid of seeds and hyperparameters as one program. With a mesh, the state and each round's
prompts carry sharding constraints, so `jax.jit(train)` lays the run out on the mesh.

`Trainer(cfg, mesh=None).run()` drives the same round from Python for long runs, for a task or for
HF checkpoints, on one CPU, the devices of one host, or every device of a pod (every process runs
the same program; JAX's multi-controller runtime is the engine):

    output        <run_dir>/<name>/: config.json, metrics.jsonl (one line per round, TRL's metric
                  names), TensorBoard events, checkpoints/<round>/ (orbax), curve.png, summary.json
                  and summary.md. Process 0 writes everything but the checkpoints, which every
                  process writes together (so run_dir must be shared storage on several hosts).
    round 0       the evaluator's view of the reference (exact J_beta on tasks), before training
    checkpoints   the whole state, the config, every process's prompt-stream position and the
                  data's fingerprint; with a checksum of every array, verified on restore: a
                  checkpoint that fails is skipped (said so) and set aside as corrupt-<round>
    SIGTERM       finish the round, save, exit with EXIT_INTERRUPTED (75); a finished run exits 0;
                  SIGINT (Ctrl-C) the same, exit EXIT_SIGINT (130)
    lock          one process per run directory (xpo_jax.rundir): a second one refuses at once,
                  naming the holder; a stale lock (dead holder) is taken over
    NaN / inf     in the loss or gradient norm: stop at once without saving (NonFiniteLoss); the
                  last good checkpoint (restored or saved by this run) is untouched
    run names     a new run never lands on an earlier run's output (--resume or --overwrite)
    --resume      bitwise, onto any mesh shape; metrics.jsonl (and TensorBoard) are cut back to
                  the restored round, so every round appears exactly once
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
import weakref
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from xpo_jax import distributed as dist
from xpo_jax.config import TrainConfig, check_resumable
from xpo_jax.oracles import judge_scores
from xpo_jax.pairs import label
from xpo_jax.parallel import Layout, local_rows, make_mesh
from xpo_jax.reporting import plot_run_curves, read_metrics, run_summary, samples_markdown, write_summary
from xpo_jax.run import Run, build_run, check_layout
from xpo_jax.rundir import RunDirLock, RunDirLocked, check_os_path, check_run_files

Array = jax.Array

# Exit status of a run stopped by SIGTERM after saving (EX_TEMPFAIL: "try again", i.e. --resume).
EXIT_INTERRUPTED = 75
# ... and by SIGINT (Ctrl-C) after saving: the shell's usual 128 + SIGINT.
EXIT_SIGINT = 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLoss(RuntimeError):
    """A round produced a NaN or infinite loss; nothing from it was saved."""


# ----------------------------------------------------------------------------------------------
# The layout of a run
# ----------------------------------------------------------------------------------------------


def layout_for(cfg: TrainConfig) -> Layout:
    """The layout of `--data` x `--fsdp` x `--tensor`: one device when none is set on one
    process, every device (data = devices / (fsdp x tensor)) otherwise; checked against cfg."""
    if cfg.data is None and cfg.fsdp == 1 and cfg.tensor == 1 and jax.process_count() == 1:
        mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    else:
        n = jax.device_count()
        if cfg.data is None and n % (cfg.fsdp * cfg.tensor):
            raise ValueError(f"--fsdp={cfg.fsdp} x --tensor={cfg.tensor} does not divide the {n} devices")
        if cfg.data is not None and cfg.data * cfg.fsdp * cfg.tensor != n:
            raise ValueError(f"--data={cfg.data} x --fsdp={cfg.fsdp} x --tensor={cfg.tensor} = "
                             f"{cfg.data * cfg.fsdp * cfg.tensor} devices, but {n} are available")
        mesh = make_mesh(cfg.data, cfg.fsdp, cfg.tensor)
    layout = Layout(mesh)
    check_layout(cfg, layout)
    return layout


# ----------------------------------------------------------------------------------------------
# The pure program
# ----------------------------------------------------------------------------------------------


def in_graph_round(run: Run, layout: Optional[Layout] = None) -> Callable:
    """`(state, data_key, oracle) -> (state, metrics)`: the round with its prompts drawn inside the
    program (tasks), the state and the prompts constrained to `layout` (None: no constraints,
    wherever jit puts it). The one body of both `make_train`'s scan and the Trainer's step."""
    if not run.prompts.in_graph:
        raise ValueError("this run reads its prompts on the host (a prompt file): it has no pure "
                         "whole-run program; use Trainer")
    on_state, on_batch = (lambda s: s), (lambda x: x)
    if layout is not None:
        st = layout.state(run.state_shapes())
        on_state, on_batch = (lambda s: layout.constrain(s, st)), (lambda x: layout.constrain(x, layout.batch))

    def step(state, data_key, oracle):
        prompts, mask = run.prompts.batch(data_key, state.round)
        state, metrics = run.fns.round_fn(on_state(state), on_batch(prompts), on_batch(mask), oracle)
        return on_state(state), metrics

    return step


def make_train(cfg: TrainConfig, run: Optional[Run] = None, mesh: Any = None) -> Callable:
    """Pure `train(key, hparams) -> (final XPOState, metrics {name: [rounds]})`.

    `key` is a raw PRNG key (`jax.random.PRNGKey(seed)`), `hparams` a `Hyperparams` (traced):
    `jax.vmap(train)` over stacked keys and hyperparameters is a sweep in one program. The
    evaluator (`eval/*`, exact on tasks) runs every `eval_every` rounds and after the last;
    other rounds hold NaN. With `mesh` (a Mesh or a `Layout`), `jax.jit(train)` runs on it (the
    state by the parameter rules, prompts split over data x fsdp) and gives the one-device result
    to float rounding.
    """
    layout = None if mesh is None else Layout.of(mesh)  # None: no constraints (e.g. under a sweep's vmap)
    run = run or build_run(cfg, layout)
    if layout is not None:
        check_layout(cfg, layout)
    step = in_graph_round(run, layout)
    place = (lambda s: s) if layout is None else (lambda s, st=layout.state(run.state_shapes()): layout.constrain(s, st))
    R, every = cfg.rounds, cfg.eval_every
    evaluator = run.evaluator if run.evaluator is not None and run.evaluator.in_graph and every else None

    def train(key: Array, hparams):
        state = place(run.init_state(key, hparams))
        data_key = run.data_key(key)

        def body(state, _):
            state, metrics = step(state, data_key, run.oracle)
            if evaluator is not None:
                due = (state.round % every == 0) | (state.round == R)
                nan = {k: jnp.full((), jnp.nan, jnp.float32) for k in evaluator.keys}
                metrics.update(jax.lax.cond(due, evaluator, lambda s: nan, state))
            return state, metrics

        return jax.lax.scan(body, state, None, length=R)

    return train


# ----------------------------------------------------------------------------------------------
# The compiled programs of the host loop
# ----------------------------------------------------------------------------------------------


def _base_apart(fn: Callable) -> Callable:
    """`fn(state, *args) -> (state, out)` as `(state without ref_params, base, *args) -> (state
    without ref_params, out)`: a LoRA run's frozen base as an argument of its own, so donating the
    state never donates it, and one placed copy of the base serves every round."""
    def apart(state, base, *args):
        new, out = fn(state.replace(ref_params=base), *args)
        return new.replace(ref_params=None), out

    return apart


class Program:
    """The jitted, sharded programs of one run on one layout, each compiled once:

        init(key, hparams)                  -> state (placed by the parameter rules)
        step(state, data_key | prompts)     -> (state, metrics): one whole round (state donated)
        evaluate(state)                     -> eval metrics (in-graph evaluators)

    Tasks draw their prompts inside `step` from (data_key, round); host streams pass this
    process's rows, assembled into the global batch (`Layout.shard_batch`). With a host judge
    `step` is the two jitted halves with the judge on the host between them."""

    def __init__(self, run: Run, layout: Any):
        layout = Layout.of(layout)  # a Mesh or a Layout
        if run.layout is None:  # a Run built without one (build_run(cfg)) samples in this layout's decode form
            run = run.with_layout(layout)
        self.run, self.layout = run, layout
        shapes = run.state_shapes()
        st = self.state_sharding = layout.state(shapes)
        self.abstract_state = layout.abstract_state(shapes)
        rep, bs = layout.replicated, layout.batch
        self.ref_params = layout.place(run.ref_params)
        # LoRA: checkpoints hold the adapters and their optimiser state, not the frozen base (the
        # run's reference, rebuilt or reloaded on resume and checked against its fingerprint).
        # The programs take the base as an argument of its own, never donated (`_base_apart`):
        # the state's ref_params IS self.ref_params, one copy of the base on device (`_call`).
        self.lora = bool(run.cfg.lora_rank)
        self.saved_abstract = self.abstract_state.replace(ref_params=None) if self.lora else self.abstract_state
        apart = _base_apart if self.lora else (lambda fn: fn)
        sa = (st.replace(ref_params=None), st.ref_params) if self.lora else (st,)  # the state's in_shardings
        out = st.replace(ref_params=None) if self.lora else st
        self._state_args = (self.saved_abstract, self.abstract_state.ref_params) if self.lora else (self.abstract_state,)
        init = (lambda k, h, ref: run.init_state(k, h, ref).replace(ref_params=None)) if self.lora else run.init_state
        self._init = jax.jit(init, out_shardings=out)
        self.oracle = None
        if run.oracle is not None:
            self.oracle = layout.place(run.oracle)
            oracle_sh = layout.params(run.oracle)
        if run.prompts.in_graph:
            self._step = jax.jit(apart(in_graph_round(run, layout)), in_shardings=(*sa, rep, oracle_sh),
                                 out_shardings=(out, rep), donate_argnums=0)
        elif run.oracle is not None:
            self._step = jax.jit(apart(run.fns.round_fn), in_shardings=(*sa, bs, bs, oracle_sh),
                                 out_shardings=(out, rep), donate_argnums=0)
        else:
            self._pairs = jax.jit(apart(run.fns.make_pairs), in_shardings=(*sa, bs, bs), donate_argnums=0)
            self._update = jax.jit(apart(run.fns.update), out_shardings=(out, rep), donate_argnums=0)
            self.rm_params = layout.place(run.judge.rm_params)
            self._judge = jax.jit(self._score_and_label)
        ev = run.evaluator
        self._evaluate = jax.jit(ev, in_shardings=(st,), out_shardings=rep) if ev is not None and ev.in_graph else None

    def _score_and_label(self, rm_params, pairs, ry, rym, ryt, rytm):
        """The host judge's half inside the program: score the re-encoded pairs, judge, label."""
        run, cfg = self.run, self.run.cfg
        scores = run.judge.score(rm_params, jnp.concatenate([ry, ryt]), jnp.concatenate([rym, rytm]))
        B = ry.shape[0]
        judgement = judge_scores(pairs.judge_key, scores[:B], scores[B:], pairs.y.tokens, pairs.y.mask, pairs.yt.tokens,
                                 pairs.yt.mask, eos_id=run.eos_id, bradley_terry=cfg.bradley_terry,
                                 missing_eos_penalty=cfg.missing_eos_penalty, mask_identical=cfg.mask_identical)
        return label(pairs, judgement)

    def compile(self) -> dict:
        """Compile the round ahead of time on abstract inputs (nothing allocated) and check that
        it fits the devices' memory, before any state exists. Later calls use these
        executables, so a run compiles its round once, fresh or resumed (the restored state
        carries the same shardings). Returns {program: bytes per device}."""
        run, cfg = self.run, self.run.cfg
        sds = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
        batch = sds((cfg.batch_size, run.prompt_len), jnp.int32, self.layout.batch)
        state = self._state_args
        if run.prompts.in_graph:
            key = sds(jax.random.PRNGKey(0).shape, jnp.uint32, self.layout.replicated)
            programs = {"round": (self._step, (*state, key, self.oracle))}
        elif self.oracle is not None:
            programs = {"round": (self._step, (*state, batch, batch, self.oracle))}
        else:
            programs = {"make_pairs": (self._pairs, (*state, batch, batch))}
        need = {}
        for name, (fn, args) in programs.items():
            compiled = fn.lower(*args).compile()
            need[name] = _check_fits(compiled, name, cfg, self.layout.mesh)
            setattr(self, {"round": "_step", "make_pairs": "_pairs"}[name], compiled)
        return need

    def init(self, key: Array, hparams: Any) -> Any:
        state = self._init(key, hparams, self.ref_params)
        return state.replace(ref_params=self.ref_params) if self.lora else state

    def _call(self, fn: Callable, state: Any, *args) -> tuple[Any, Any]:
        """`fn(state, *args)` for a program built by `_base_apart` under LoRA: the state without its
        base (donated), the base apart (not donated), and the base put back into the new state."""
        if not self.lora:
            return fn(state, *args)
        new, out = fn(state.replace(ref_params=None), self.ref_params, *args)
        return new.replace(ref_params=self.ref_params), out

    def to_save(self, state: Any) -> Any:
        """What a checkpoint holds of `state`: all of it, or without the base under LoRA."""
        return state.replace(ref_params=None) if self.lora else state

    def from_saved(self, state: Any) -> Any:
        """A restored checkpoint (`to_save`'s form) as a full state: under LoRA with the program's
        base (never donated: `_base_apart`)."""
        return state.replace(ref_params=self.ref_params) if self.lora else state

    def step(self, state: Any, data_key: Array, round_idx: int) -> tuple[Any, dict]:
        run = self.run
        if run.prompts.in_graph:
            return self._call(self._step, state, data_key, self.oracle)
        layout, B = self.layout, run.cfg.batch_size
        texts, prompts, mask = run.prompts.next_local(layout.host_rows(B))
        prompts, mask = layout.shard_batch(prompts, mask, global_batch_size=B)
        if self.oracle is not None:
            state, metrics = self._call(self._step, state, prompts, mask, self.oracle)
        else:
            state, pairs = self._call(self._pairs, state, prompts, mask)
            local = [local_rows(a) for a in (pairs.y.tokens, pairs.y.mask, pairs.yt.tokens, pairs.yt.mask)]
            encoded = run.judge.encode(texts, local[0], local[1]) + run.judge.encode(texts, local[2], local[3])
            ry, rym, ryt, rytm = layout.shard_batch(*encoded, global_batch_size=B)
            state, metrics = self._call(self._update, state, self._judge(self.rm_params, pairs, ry, rym, ryt, rytm))
        metrics = dict(metrics)
        # Each process counts the rows it read: the run's counts are their sum (what one process
        # reading the whole batch counts).
        stats = run.prompts.stats
        truncated, dropped = dist.all_processes([stats["num_truncated"], stats["num_dropped"]]).sum(axis=0)
        metrics["data/num_truncated"] = float(truncated)
        metrics["data/num_dropped"] = float(dropped)
        return state, metrics

    @property
    def has_eval(self) -> bool:
        return self.run.evaluator is not None

    def evaluate(self, state: Any, round_idx: int) -> tuple[dict, list]:
        """(eval metrics, sample rows): an in-graph evaluator's jitted program, or a host-driven
        one's `evaluate(state, round_idx)` (e.g. held-out prompts of an HF run)."""
        if self._evaluate is not None:
            return {k: float(v) for k, v in dist.first_copy(self._evaluate(state)).items()}, []
        return self.run.evaluator.evaluate(state, round_idx)


# ----------------------------------------------------------------------------------------------
# Host loop
# ----------------------------------------------------------------------------------------------


class _Loop:
    """The mutable state of one `Trainer.run` call, shared by its step and hooks."""

    def __init__(self, ckpt: Any):
        self.ckpt = ckpt
        self.state: Any = None
        self.data_key: Any = None
        self.start = self.end = self.last_saved = 0
        self.last_good: Optional[int] = None  # the newest checkpoint known to verify (restored or saved here)
        self.log = self.writer = self.bar = None
        self.old_handlers: dict = {}  # signal -> the handler to put back
        self.t0 = self.t_offset = 0.0


class Trainer:
    """The host loop (see the module docstring): `Trainer(cfg, mesh=None).run()`.

    `mesh`: a `jax.sharding.Mesh` (`xpo_jax.parallel.make_mesh`) or a `Layout`; default: cfg's
    --data x --fsdp x --tensor (`layout_for`). Everything that can be checked before the slow
    build (the run directory, the layout, resume compatibility) is checked in the constructor."""

    def __init__(self, cfg: TrainConfig, mesh: Any = None, run: Optional[Run] = None):
        self.cfg = cfg.validate()
        self.out = os.path.join(cfg.run_dir, cfg.name)
        self.lead = jax.process_index() == 0
        self.layout = layout_for(cfg) if mesh is None else Layout.of(mesh)
        check_layout(cfg, self.layout)
        self.lock = RunDirLock(self.out)
        weakref.finalize(self, self.lock.release)  # a Trainer dropped without running frees its directory
        self._claim_run_dir()  # before the (slow) build: a clash is reported at once
        try:
            self.run_ = run or build_run(cfg, self.layout)
            self.models = self._model_fingerprints()
            self.accepted_changes: list = []  # model changes accepted by --accept-changed-models, saved along
            self._check_inputs_unchanged()  # before anything compiles
            self.program = Program(self.run_, self.layout)
        except BaseException:
            self.lock.release()
            raise
        self._stop_signal: Optional[int] = None
        self.interrupted = False
        self.memory: Optional[dict] = None  # bytes per device of each compiled program

    # -- the run directory ----------------------------------------------------------------

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.out, "checkpoints")

    def _claim_run_dir(self) -> None:
        """A new run never lands on an earlier run's output (orbax would refuse to save over its
        checkpoints only at the end of training): refuse unless --resume or --overwrite. Also
        check that the run directory can be written, before anything is built."""
        cfg, out = self.cfg, self.out
        check_os_path("--run-dir", cfg.run_dir)
        probe = _existing_ancestor(out)
        if not os.path.isdir(probe):
            raise ValueError(f"--run-dir={cfg.run_dir!r}: {probe} is a file, not a directory")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ValueError(f"--run-dir={cfg.run_dir!r}: {probe} is not writable")
        check_run_files(out)  # no symlinks, no directory where a file belongs
        self._lock_run_dir()
        try:
            self._claim_locked()
        except BaseException:
            self.lock.release()
            raise

    def _lock_run_dir(self) -> None:
        """Process 0 takes the run directory's lock (xpo_jax.rundir); every process refuses alike."""
        error: Optional[Exception] = None
        if self.lead:
            try:
                self.lock.acquire()
            except (RunDirLocked, OSError) as e:
                error = e
        if dist.any_process(error is not None):
            self.lock.release()
            if isinstance(error, OSError):
                raise ValueError(f"--run-dir={self.cfg.run_dir!r}: cannot create the lock {self.lock.path}: "
                                 f"{error.strerror or error}") from None
            raise error or RunDirLocked(f"{self.out} is in use by another process (see process 0's message)")

    def _claim_locked(self) -> None:
        cfg, out = self.cfg, self.out
        earlier = _has_checkpoints(self.ckpt_dir) or os.path.exists(os.path.join(out, "metrics.jsonl"))
        if cfg.resume and _has_checkpoints(self.ckpt_dir):
            from xpo_jax.checkpoint import Checkpointer

            ckpt = Checkpointer(self.ckpt_dir)
            try:
                check_resumable(ckpt.saved_config(), cfg.to_dict())
            finally:
                ckpt.close()
        if cfg.resume or not earlier:
            return
        if not cfg.overwrite:
            raise ValueError(
                f"{out} holds an earlier run's output: pass --resume to continue it, --overwrite to start afresh "
                f"(deletes its checkpoints and metrics), or another --name")
        if self.lead:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            for f in os.listdir(out):
                if f in ("metrics.jsonl", "summary.json", "summary.md", "curve.png") or f.startswith("events.out.tfevents"):
                    os.remove(os.path.join(out, f))
        dist.barrier("xpo_jax:overwrite")

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    # -- the loop: one step, then small hooks ----------------------------------------------

    def run(self, stop_after: Optional[int] = None) -> dict:
        """Train until cfg.rounds (or `stop_after` rounds in this call, for tests); returns the
        summary. Raises NonFiniteLoss on a NaN/inf loss without saving that round. After SIGTERM
        the summary has "interrupted": True (and `self.interrupted` is set).

        Each round is `_step` (the compiled round, the finiteness check, the evaluator when due)
        followed by the hooks `_log`, `_show_progress` and `_checkpoint` (which also acts on a
        signal); `_open` restores or initialises the state and opens the outputs, `_close`
        closes them on every path."""
        self._lock_run_dir()  # held since the constructor; taken again by a second run() of this Trainer
        try:
            return self._run(stop_after)
        finally:
            self.lock.release()

    def _run(self, stop_after: Optional[int]) -> dict:
        if self.memory is None:  # before any state or file exists: a round that cannot fit is refused here
            self.memory = self.program.compile()
        loop = self._open(stop_after)
        try:
            if loop.start == 0 and self.program.has_eval and self.cfg.eval_every:
                self._log(loop, {"round": 0, **self._evaluate(loop.state, 0, loop.writer)})
            for r in range(loop.start + 1, loop.end + 1):
                m = self._step(loop, r)
                self._log(loop, m)
                self._show_progress(loop, m)
                if self._checkpoint(loop, r):
                    break
        finally:
            self._close(loop)
        self.state = loop.state
        summary = self._summarise(loop.last_saved) if self.lead else {"rounds": loop.last_saved}
        summary["interrupted"] = self.interrupted
        if self.interrupted:
            summary["signal"] = int(dist.all_processes([self._stop_signal or 0]).max())  # the one received
        return summary

    def _open(self, stop_after: Optional[int]) -> "_Loop":
        """The loop's state: the checkpointer, the restored (or fresh) state, the trimmed metrics
        file and TensorBoard writer, the progress bar, the signal handler."""
        from xpo_jax.checkpoint import Checkpointer

        cfg, run = self.cfg, self.run_
        if self.lead:
            os.makedirs(self.out, exist_ok=True)
        dist.barrier("xpo_jax:run-dir")
        loop = _Loop(Checkpointer(self.ckpt_dir, keep=cfg.keep_checkpoints))
        try:  # a failure here must still close what is open (orbax's threads would keep the process alive)
            key = jax.random.PRNGKey(cfg.seed)
            loop.data_key = self.layout.place(run.data_key(key), self.layout.replicated)
            loop.state, loop.start = self._restore(loop.ckpt)
            loop.last_good = loop.start if loop.state is not None else None
            if loop.state is None:
                loop.state = self.program.init(key, run.hparams())
            loop.last_saved = loop.start
            loop.end = cfg.rounds if stop_after is None else min(cfg.rounds, loop.start + stop_after)
            if self.lead:
                check_run_files(self.out)  # the run dir may have changed since the constructor checked it
                self._open_outputs(loop)
            loop.bar = self._progress(loop.start)
        except BaseException:
            self._close(loop)
            raise
        # SIGINT (Ctrl-C) as SIGTERM: finish the round, save, exit (130 from the CLI rather than 75)
        loop.old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        loop.t0 = time.perf_counter()
        return loop

    def _restore(self, ckpt) -> tuple[Any, int]:
        """(state, round) of the newest checkpoint that verifies under --resume, else (None, 0).
        Newer checkpoints that fail are set aside (kept as corrupt-<round>) and said so."""
        cfg = self.cfg
        if not cfg.resume:
            return None, 0
        restored = ckpt.restore_latest_good(self.program.saved_abstract)
        if restored is None:
            print(f"--resume: no checkpoint in {ckpt.directory}; starting at round 1", flush=True)
            return None, 0
        state, saved_cfg, data, note = restored
        state = self.program.from_saved(state)
        check_resumable(saved_cfg, cfg.to_dict())
        start = int(data["round"])
        self._restore_prompts(data)
        self._check_models(data)
        if ckpt.skipped:  # newer checkpoints that do not verify: keep them, out of the way
            moved = ckpt.set_aside(ckpt.skipped) if self.lead else []
            dist.barrier("xpo_jax:set-aside")
            ckpt.reload()
            note += f"; set aside as {', '.join(moved)}" if moved else ""
        if note:
            print(note, flush=True)
        print(f"resumed from {ckpt.directory}/{start} (round {start} of {cfg.rounds})", flush=True)
        return state, start

    def _open_outputs(self, loop: "_Loop") -> None:
        """Process 0: metrics.jsonl and samples.jsonl cut back to the start round, config.json,
        a TensorBoard writer replaying the kept rows; the clock continues from the last kept row."""
        log_path = os.path.join(self.out, "metrics.jsonl")
        kept = _trim_metrics(log_path, loop.start)
        _trim_metrics(os.path.join(self.out, "samples.jsonl"), loop.start)
        loop.t_offset = kept[-1].get("time/elapsed_s", 0.0) if kept else 0.0
        with open(os.path.join(self.out, "config.json"), "w") as f:
            f.write(self.cfg.to_json())
        loop.writer = self._tensorboard(kept)
        loop.log = open(log_path, "a")

    def _close(self, loop: "_Loop") -> None:
        for sig, handler in loop.old_handlers.items():
            signal.signal(sig, handler)
        for f in (loop.log, loop.writer, loop.bar):
            if f is not None:
                f.close()
        loop.ckpt.close()

    def _step(self, loop: "_Loop", r: int) -> dict:
        """Round r: the compiled round, refused when its loss or gradient norm is not finite
        (nothing of it saved), plus the evaluator's metrics when due; host floats."""
        cfg = self.cfg
        loop.state, metrics = self.program.step(loop.state, loop.data_key, r - 1)
        m = {k: float(v) for k, v in dist.first_copy(metrics).items()}
        if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm")):
            where = (f"the last good checkpoint (round {loop.last_good}) is untouched" if loop.last_good is not None
                     else "no checkpoint was saved yet")
            raise NonFiniteLoss(f"round {r}: loss={m['loss']}, grad_norm={m['grad_norm']}; stopping without "
                                f"saving it: {where}.")
        if self.program.has_eval and cfg.eval_every and (r % cfg.eval_every == 0 or r == cfg.rounds):
            m.update(self._evaluate(loop.state, r, loop.writer))
        m["round"] = r
        m["time/elapsed_s"] = loop.t_offset + time.perf_counter() - loop.t0
        return m

    def _log(self, loop: "_Loop", m: dict) -> None:
        self._write(loop.log, loop.writer, m)

    @staticmethod
    def _show_progress(loop: "_Loop", m: dict) -> None:
        if loop.bar is None:
            return
        loop.bar.update(1)
        post = {"reward": m.get("task/reward", m["objective/model_scores"]), "kl": m["objective/kl"]}
        if "eval/j_beta" in m:
            post["J"] = m["eval/j_beta"]
        if "eval/win_rate" in m:
            post["win"] = m["eval/win_rate"]
        loop.bar.set_postfix({k: f"{v:.3f}" for k, v in post.items()})

    def _checkpoint(self, loop: "_Loop", r: int) -> bool:
        """Save round r when due, at the last round of this call, or on a signal (any process's);
        True when a signal asks the loop to stop (after saving)."""
        cfg = self.cfg
        stop = dist.any_process(self._stop_signal is not None)
        due = cfg.checkpoint_every and r % cfg.checkpoint_every == 0
        if due or r == loop.end or stop:
            loop.ckpt.save(r, self.program.to_save(loop.state), cfg.to_dict(), self._data_position(r))
            loop.last_saved = loop.last_good = r
        if stop:
            self.interrupted = True
            if self.lead:
                print(f"\nsignal: saved round {r} to {loop.ckpt.directory}; exiting (resume with --resume)", flush=True)
        return bool(stop)

    # -- prompt-stream positions ----------------------------------------------------------

    def _data_position(self, r: int) -> dict:
        data = {"round": r}
        if self.models is not None:
            data["model_fingerprints"] = self.models
            data["accepted_model_changes"] = self.accepted_changes
        prompts = self.run_.prompts
        if not prompts.in_graph:
            data["prompts"] = dist.all_processes(prompts.position()).tolist()  # one row per process
            data["prompt_fingerprint"] = prompts.fingerprint
        return data

    def _check_inputs_unchanged(self) -> None:
        """--resume of a prompt-file / HF run: the prompt files and the model files must be those
        the latest checkpoint was saved with (sha256s), checked from the checkpoint's JSON before
        anything compiles (and again on the checkpoint actually restored)."""
        if not self.cfg.resume or self.run_.prompts.in_graph or not _has_checkpoints(self.ckpt_dir):
            return
        from xpo_jax.checkpoint import Checkpointer

        ckpt = Checkpointer(self.ckpt_dir)
        try:
            saved = ckpt.saved_data()
        except Exception:  # noqa: BLE001 - an unreadable checkpoint: restore_latest_good decides
            return
        finally:
            ckpt.close()
        self._check_fingerprint(saved.get("prompt_fingerprint"))
        self._check_models(saved, quiet=True)

    def _model_fingerprints(self) -> Optional[dict]:
        """HF runs: the model files' sha256s. A LoRA task run: its base's (built from the seed,
        so its bytes are fingerprinted: a resume onto another base is refused)."""
        if self.cfg.policy is None:
            if not self.cfg.lora_rank:
                return None
            from xpo_jax.models.lora import base_fingerprint, tree_bytes

            return {"task": {"path": f"task:{self.cfg.task}", "files": {
                "lora-base-params": [tree_bytes(self.run_.ref_params), base_fingerprint(self.run_.ref_params)]}}}
        from xpo_jax.hf.run import model_fingerprints

        return model_fingerprints(self.cfg)

    def _check_models(self, data: dict, quiet: bool = False) -> None:
        """The model files against the checkpoint's fingerprints (HF runs): a change (or missing
        fingerprints) is refused naming the file, unless --accept-changed-models, which records
        the change in the checkpoints saved from then on."""
        if self.models is None:
            return
        from xpo_jax.hf.run import changed_models

        changes = changed_models(data.get("model_fingerprints"), self.models)
        self.accepted_changes = list(data.get("accepted_model_changes") or [])
        if not changes:
            return
        if not self.cfg.accept_changed_models:
            raise ValueError(f"--resume: the models differ from the checkpoint's: {'; '.join(changes)}. Restore the "
                             "files, start a new run, or pass --accept-changed-models to train on with them (recorded "
                             "in the checkpoint)")
        self.accepted_changes.append({"round": int(data.get("round", 0)), "changes": changes})
        if not quiet and self.lead:
            print(f"warning: --accept-changed-models: {'; '.join(changes)}", flush=True)

    def _check_fingerprint(self, saved: Optional[str]) -> None:
        now = self.run_.prompts.fingerprint
        if saved is not None and saved != now:
            raise ValueError(f"--resume: the prompt files (--prompts={self.cfg.prompts!r}) changed since the checkpoint "
                             f"was saved (sha256 {saved[:12]}... now {now[:12]}...); the saved position would point "
                             "into different data. Restore the files, or start a new run")

    def _restore_prompts(self, data: dict) -> None:
        prompts = self.run_.prompts
        if prompts.in_graph:
            return
        self._check_fingerprint(data.get("prompt_fingerprint"))
        rows = data["prompts"]
        if len(rows) == jax.process_count():
            prompts.restore(rows[jax.process_index()])
        elif all(r == rows[0] for r in rows):
            prompts.restore(rows[0])  # another process count, but every position the same
        else:
            raise ValueError(f"--resume with {jax.process_count()} processes onto a checkpoint of {len(rows)} whose "
                             f"prompt positions differ ({rows}): resume with {len(rows)} processes")

    # -- output ---------------------------------------------------------------------------

    def _tensorboard(self, replay: list):
        """A fresh events file holding `replay` (the metrics kept on resume), so TensorBoard shows
        every round once, like metrics.jsonl."""
        if not self.cfg.tensorboard:
            return None
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # e.g. a device image without it: say so, keep training
            print("tensorboardX is not installed: no TensorBoard events (metrics.jsonl has everything)")
            return None
        for f in os.listdir(self.out):
            if f.startswith("events.out.tfevents"):
                os.remove(os.path.join(self.out, f))
        writer = SummaryWriter(self.out)
        for m in replay:
            self._write(None, writer, m)
        return writer

    def _progress(self, start: int):
        if not self.cfg.progress or not self.lead:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.rounds, initial=start, desc=self.cfg.name, unit="round")

    def _evaluate(self, state: Any, r: int, writer) -> dict:
        """The evaluator's metrics at round r; its sample rows go to samples.jsonl and to
        TensorBoard as a text table (process 0)."""
        metrics, samples = self.program.evaluate(state, r)
        if samples and self.lead:
            with open(os.path.join(self.out, "samples.jsonl"), "a") as f:
                f.writelines(json.dumps({"round": r, **row}) + "\n" for row in samples)
            if writer is not None:
                writer.add_text("samples", samples_markdown(samples), r)
        return metrics

    @staticmethod
    def _write(log, writer, m: dict) -> None:
        if log is not None:
            log.write(json.dumps(m) + "\n")
            log.flush()
        if writer is not None:
            for k, v in m.items():
                if k != "round":
                    writer.add_scalar(k, v, m["round"])

    def _summarise(self, last_round: int) -> dict:
        check_run_files(self.out)  # again before the summaries: a link made during the run is refused too
        rows = read_metrics(os.path.join(self.out, "metrics.jsonl"))
        cfg = self.cfg
        what = {"task": cfg.task} if cfg.policy is None else {"policy": cfg.policy, "reward_model": cfg.reward_model}
        summary = {"name": cfg.name, **what, "rounds": last_round, **run_summary(rows)}
        extra = ""
        ev = self.run_.evaluator
        if ev is not None and hasattr(ev, "summarise"):  # e.g. held-out tables and samples of an HF run
            samples_path = os.path.join(self.out, "samples.jsonl")
            samples = read_metrics(samples_path) if os.path.exists(samples_path) else []
            entries, extra = ev.summarise(rows, samples)
            summary.update(entries)
        print(write_summary(self.out, summary, extra))
        name = cfg.task if cfg.policy is None else os.path.basename(cfg.policy.rstrip("/"))
        plot_run_curves(rows, os.path.join(self.out, "curve.png"), title=f"{cfg.name} on {name}")
        return summary


def device_memory_bytes(device) -> Optional[int]:
    """What one device can hold: its allocator's limit (GPU, TPU), or for CPU devices the host's
    available memory shared by the process's local devices; None when unknown. `device` must be
    one of this process's (another process's device has no memory stats here)."""
    try:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    except Exception:  # noqa: BLE001 - a backend without memory stats: fall back below
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return None
        return avail // max(1, jax.local_device_count())
    return None


def _check_fits(compiled: Any, name: str, cfg: TrainConfig, mesh: jax.sharding.Mesh) -> int:
    """Bytes per device the compiled program needs (arguments + outputs + temporaries, less what
    donation aliases); ValueError naming the batch size when that exceeds the device's memory."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    need = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    # One of this process's devices of the mesh: on several hosts, device 0 belongs to process 0.
    device = next((d for d in mesh.devices.flat if d.process_index == jax.process_index()), mesh.devices.flat[0])
    have = device_memory_bytes(device)
    if jax.process_count() > 1:  # every process decides alike (a refusal on one host alone would hang the rest)
        mib = dist.all_processes([-1 if have is None else have >> 20])[:, 0]  # MiB: int32-safe
        known = [int(x) for x in mib if x >= 0]
        have = min(known) << 20 if known else None
    if have is not None and need > have:
        gib = 2.0 ** 30
        raise ValueError(
            f"--batch-size={cfg.batch_size}: one {name} program needs {need / gib:.2f} GiB per device (arguments "
            f"{m.argument_size_in_bytes / gib:.2f}, temporaries {m.temp_size_in_bytes / gib:.2f}) but a "
            f"{device.platform} device has {have / gib:.2f} GiB; lower --batch-size (or "
            f"--max-new-tokens / --max-prompt-length), raise --micro-batches, or add devices (--data / --fsdp)")
    return need


def _existing_ancestor(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return p


def _has_checkpoints(ckpt_dir: str) -> bool:
    return os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))


def _trim_metrics(path: str, last_round: int) -> list[dict]:
    """Keep the rows of rounds <= last_round (a resumed run repeats the rounds after its
    checkpoint; a fresh run keeps none), dropping a torn last line; rewrite the file atomically.
    Returns the rows kept."""
    if not os.path.exists(path):
        return []
    kept = [r for r in read_metrics(path) if r.get("round", 0) <= last_round] if last_round > 0 else []
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    return kept
