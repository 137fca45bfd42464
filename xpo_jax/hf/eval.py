"""Held-out evaluation of an HF run against its reference, and the samples themselves.

    xpo-jax train --policy DIR --reward-model DIR --prompts FILE --eval-fraction 0.1 [--eval-every 10]
    xpo-jax train ... --eval-prompts HELD_OUT.jsonl [--eval-reward-model OTHER_RM]

The held-out prompts are `--eval-prompts` (the formats of `--prompts`) or the last
ceil(f * n) rows, in file order, of the n rows of `--prompts` (`--eval-fraction f`): the training
stream then reads a view of the first n - ceil(f * n) rows only (`Subset`), so it never serves a
held-out prompt.

At every evaluation (round 0, every --eval-every rounds, the last round) the policy answers every
held-out prompt x at --eval-temperature (0 = greedy; no top-k / top-p), y ~ pi(.|x), and the
reward model scores it. The reference's answers y_ref ~ pi_ref(.|x) and their scores are computed
once, at the first evaluation, and reused. Both use the same sampling keys (fixed for the whole
run: common random numbers, so a change between evaluations is the policy's, not the noise's),
so at round 0, where pi = pi_ref, every pair is a tie. With w_i = 1 on real rows, 0 on padding:

    eval/score        = mean_i r(x_i, y_i)              eval/ref_score = mean_i r(x_i, y_ref_i)
    eval/win_rate     = mean_i [r(x_i, y_i) > r(x_i, y_ref_i)] + 1/2 [r(x_i, y_i) = r(x_i, y_ref_i)]
    eval/bt_win_prob  = mean_i sigmoid(r(x_i, y_i) - r(x_i, y_ref_i))      (Bradley-Terry)
    eval/kl           = mean_i log pi(y_i|x_i) - log pi_ref(y_i|x_i)   (a KL(pi || pi_ref) estimate
                        at temperature 1; at another temperature the log-ratio on the tempered samples)
    eval/length, eval/eos_rate (and eval/ref_*) = mean response length and fraction ending in EOS

Scores are the reward model's raw outputs (no --missing-eos-penalty). The judge is the training
reward model, or `--eval-reward-model` (a second one, so that reward hacking of the training
model shows up). A judge that reads the policy's token ids scores inside the program; one with
another tokenizer is fed re-encoded text (`HostJudge.encode`) between the sampling program and
the scoring program: the one host step of an evaluation.

The program. The held-out set is padded to nb = ceil(E / b) batches of b = --eval-batch-size
(default --batch-size) rows ([nb, b, P]; padding rows repeat prompt 0 with weight 0) and one
jitted function maps over the batches (`lax.map`): sample, log pi and log pi_ref by full
forwards, score, and the means, for the whole set; only the metrics and the first
--eval-samples rows are read back. It runs on the training mesh: rows over data x fsdp (b must
split over them), the state as it arrives. b, hence the sampling noise, does not depend on the
mesh, so every mesh gives the one-device evaluation to float rounding.
The reference pass is the same executable called with (ref_params, ref_params), which is why
round 0 gives win rate 0.5 and KL 0 exactly (when --param-dtype equals --ref-dtype).

Multi-host: every process holds the whole held-out set (it is small) and builds the global
[nb, b, P] array with `jax.make_array_from_callback`, each of its devices taking its own rows;
every process runs the same program; the host judge re-encodes, in each process, only the rows
that process's devices hold.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from xpo_jax.distributed import first_copy
from xpo_jax.logprobs import completion_logprobs, has_eos
from xpo_jax.parallel import Layout
from xpo_jax.reporting import HELD_OUT_EVAL_KEYS, held_out_summary
from xpo_jax.round import completion_logits_fn, policy_params_fn
from xpo_jax.sampling import sample

if TYPE_CHECKING:  # the config is read, never imported at run time (it sits in a higher layer)
    from xpo_jax.config import TrainConfig

Array = jax.Array

EVAL_SEED = 0xE7A1  # folded into the run's seed: the evaluation's sampling keys


# ----------------------------------------------------------------------------------------------
# The held-out prompts (host side, checked before any weights are loaded)
# ----------------------------------------------------------------------------------------------


class Subset(Sequence):
    """Rows [start, stop) of a prompt source, itself a source (`PromptIterator` reads any
    sequence, batched through `__getitems__` when the source has it)."""

    def __init__(self, source: Sequence, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"prompt index {i} out of range for {len(self)} prompts")
        return self.source[self.start + i]

    def __getitems__(self, indices: Sequence[int]) -> list:
        idx = [self.start + int(i) for i in indices]
        if hasattr(self.source, "__getitems__"):
            return list(self.source.__getitems__(idx))
        return [self.source[i] for i in idx]


@dataclasses.dataclass
class HeldOut:
    """The encoded held-out prompts: `rows` (str or messages), tokens / mask [E, P] left-padded."""

    flag: str  # where they come from, for messages: "--eval-prompts=FILE" or "--eval-fraction=f"
    rows: list
    tokens: np.ndarray
    mask: np.ndarray


def check_eval_inputs(cfg: TrainConfig) -> None:
    """The evaluation's files exist (each error names the flag and the path)."""
    import glob

    for p in (p for p in (cfg.eval_prompts or "").split(",") if p):
        if not glob.glob(p):
            raise ValueError(f"--eval-prompts: no file matches {p!r}")
    if cfg.eval_reward_model is not None:
        if not os.path.isdir(cfg.eval_reward_model):
            raise ValueError(f"--eval-reward-model={cfg.eval_reward_model!r}: no such directory")
        if not os.path.exists(os.path.join(cfg.eval_reward_model, "config.json")):
            raise ValueError(f"--eval-reward-model={cfg.eval_reward_model!r}: no config.json in it")


def split_prompts(cfg: TrainConfig, source: Sequence, tokenizer) -> tuple[Sequence, Optional[HeldOut]]:
    """(the training source, the held-out prompts or None). With --eval-fraction f the last
    ceil(f * n) rows are held out and training reads `Subset(source, 0, n - ceil(f * n))`."""
    if cfg.eval_prompts is not None:
        from xpo_jax.hf.data import read_prompt_files

        flag = f"--eval-prompts={cfg.eval_prompts!r}"
        try:
            rows = read_prompt_files([p for p in cfg.eval_prompts.split(",") if p])
        except (OSError, ValueError) as e:
            raise ValueError(f"{flag}: {e}") from e
        return source, _encode(cfg, flag, rows, tokenizer)
    if not cfg.eval_fraction:
        return source, None
    n = len(source)
    n_eval = math.ceil(cfg.eval_fraction * n)
    n_train = n - n_eval
    flag = f"--eval-fraction={cfg.eval_fraction}"
    if n_train < cfg.batch_size:
        raise ValueError(f"{flag} holds out {n_eval} of the {n} prompts of --prompts, leaving {n_train} for "
                         f"training: fewer than one batch (--batch-size={cfg.batch_size}); lower it")
    return Subset(source, 0, n_train), _encode(cfg, flag, Subset(source, n_train, n).__getitems__(range(n_eval)), tokenizer)


def _encode(cfg: TrainConfig, flag: str, rows: Sequence, tokenizer) -> HeldOut:
    rows = list(rows)
    if not rows:
        raise ValueError(f"{flag}: no prompts in it")
    try:
        tokens, mask, stats = tokenizer.encode_prompts(rows, max_prompt_length=cfg.max_prompt_length,
                                                       truncation=cfg.truncation)
    except ValueError as e:  # e.g. a prompt that encodes to no tokens
        raise ValueError(f"{flag}: {e}") from e
    if not stats["kept"]:
        raise ValueError(f"{flag}: no usable prompt: all {len(rows)} are longer than --max-prompt-length="
                         f"{cfg.max_prompt_length} (--truncation drop); raise it or use --truncation left")
    return HeldOut(flag, [rows[i] for i in stats["kept"]], tokens, mask)


def config_vocab_size(path: str) -> Optional[int]:
    """`vocab_size` of a checkpoint's config.json (read without loading anything else)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("vocab_size")
    except (OSError, ValueError):
        return None


def eval_rm_tokenizer(cfg: TrainConfig, tokenizer):
    """The --eval-reward-model's own tokenizer, or None when it has none and reads the policy's
    ids (same vocabulary size). Another vocabulary without a tokenizer cannot be scored: its ids
    mean other tokens, and nothing says how to re-encode the text for it."""
    from xpo_jax.hf.tokenizer import TextTokenizer

    path = cfg.eval_reward_model
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        try:
            return TextTokenizer.from_dir(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"--eval-reward-model={path!r}: {e}") from e
    theirs, ours = config_vocab_size(path), config_vocab_size(cfg.policy)
    if theirs is None or theirs != ours:
        raise ValueError(f"--eval-reward-model={path!r} has no tokenizer.json and its vocabulary ({theirs} ids) "
                         f"differs from the policy's ({ours}): its token ids would be scored as garbage. Add the "
                         "reward model's tokenizer.json (its text is then re-encoded for it)")
    return None


# ----------------------------------------------------------------------------------------------
# The judge of the evaluation
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalJudge:
    """A reward model scoring the evaluation: `apply({"params": params}, tokens, mask) -> [B]`.
    `host` (a `HostJudge`) when it has another tokenizer: the text is re-encoded for it on the
    host; None when it reads the policy's ids (scored inside the program)."""

    apply: Callable
    params: Any
    name: str  # its directory, for the summary
    host: Any = None


# ----------------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------------


class Responses(NamedTuple):
    """One pass over the held-out set, every leaf [nb, b, ...] with rows over data x fsdp."""

    tokens: Array    # [nb, b, N] int32
    mask: Array      # [nb, b, N] int32
    logp: Array      # [nb, b] log pi(y|x) of the sampling parameters (a full forward)
    ref_logp: Array  # [nb, b] log pi_ref(y|x)
    score: Array     # [nb, b] the judge's score


@dataclasses.dataclass
class _OnMesh:
    """The placed inputs and the jitted programs, on the run's layout."""

    x: Array
    xm: Array
    keys: Array
    w: Array
    rm_params: Any
    dummy: Responses
    run: Callable  # (params, ref_params, ref: Responses) -> (Responses, (metrics, samples))


def prompt_text(row: Any) -> str:
    """A prompt for people: a plain string as is, a chat as `role: content` lines."""
    if isinstance(row, str):
        return row
    return "\n".join(f"{m['role']}: {m['content']}" for m in row)


class HeldOutEval:
    """Host-driven evaluator of an HF run (see the module docstring):
    `evaluate(state, round_idx) -> (metrics, sample rows)` and `summarise(rows, samples)`."""

    in_graph = False
    keys = HELD_OUT_EVAL_KEYS

    def __init__(self, cfg: TrainConfig, layout: Layout, *, apply_fn: Callable, tokenizer: Any, held_out: HeldOut, judge: EvalJudge,
                 max_new_tokens: int):
        self.cfg, self.apply_fn, self.tokenizer, self.held_out, self.judge = cfg, apply_fn, tokenizer, held_out, judge
        self.layout = layout
        layout.check_batch(cfg.eval_batch_size or cfg.batch_size, "--eval-batch-size")
        # [nb, b, ...] arrays: the b rows of each batch over data x fsdp.
        self.rows = NamedSharding(layout.mesh, P(None, *layout.batch.spec))
        self.N = max_new_tokens
        self.num_prompts = len(held_out.rows)
        self.num_samples = min(cfg.eval_samples, self.num_prompts)
        self.key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), EVAL_SEED)
        self._on: Optional[_OnMesh] = None
        self.ref: Optional[Responses] = None  # the reference's pass, computed once
        self.seconds: list[float] = []  # wall time of each evaluation (the first includes compiling)

    # -- the programs ---------------------------------------------------------------------

    def _generate(self, params, ref_params, x, xm, keys):
        """[nb, b, ...] responses of `params` and both log-probs, one batch at a time (lax.map)."""
        rows = self.layout.batch
        logits_fn = completion_logits_fn(self.apply_fn, self.N)
        tok = self.tokenizer

        def logp(p, x, xm, y, ym):
            tokens, mask = jnp.concatenate([x, y], 1), jnp.concatenate([xm, ym], 1)
            return completion_logprobs(logits_fn(p, tokens, mask), y, ym)[1]

        def one(batch):
            x, xm, key = batch
            x, xm = (jax.lax.with_sharding_constraint(a, rows) for a in (x, xm))  # each batch over data x fsdp
            c = sample(self.apply_fn, params, x, xm, key, max_new_tokens=self.N, temperature=self.cfg.eval_temperature,
                       eos_id=tok.eos_id, pad_id=tok.pad_id)
            ym = c.mask.astype(jnp.int32)
            return c.tokens, ym, logp(params, x, xm, c.tokens, ym), logp(ref_params, x, xm, c.tokens, ym)

        y, ym, lp, lp_ref = jax.lax.map(one, (x, xm, keys))
        return Responses(y, ym, lp, lp_ref, jnp.zeros(lp.shape, jnp.float32))

    def _score_fused(self, rm_params, x, xm, out: Responses):
        """The judge on concat(prompt, response) in the policy's ids, one batch at a time."""
        def one(batch):
            x, xm, y, ym = batch
            return self.judge.apply({"params": rm_params}, jnp.concatenate([x, y], 1),
                                    jnp.concatenate([xm.astype(jnp.int32), ym], 1)).astype(jnp.float32)

        return jax.lax.map(one, (x, xm, out.tokens, out.mask))

    def _score_encoded(self, rm_params, rt, rtm):
        return jax.lax.map(lambda b: self.judge.apply({"params": rm_params}, *b).astype(jnp.float32), (rt, rtm))

    def _report(self, out: Responses, ref: Responses, w: Array):
        """The metrics (module docstring) and the first `num_samples` rows of both passes."""
        mean = lambda v: jnp.sum(v * w) / jnp.sum(w)
        flat = lambda a: a.reshape((-1,) + a.shape[2:])
        eos_id = self.tokenizer.eos_id
        d = out.score - ref.score
        eos = lambda r: has_eos(flat(r.tokens), flat(r.mask), eos_id).astype(jnp.float32).reshape(w.shape)
        metrics = {
            "eval/score": mean(out.score), "eval/ref_score": mean(ref.score),
            "eval/win_rate": mean(jnp.where(d > 0, 1.0, jnp.where(d == 0, 0.5, 0.0))),
            "eval/bt_win_prob": mean(jax.nn.sigmoid(d)),
            "eval/kl": mean(out.logp - out.ref_logp),
            "eval/length": mean(out.mask.sum(-1).astype(jnp.float32)), "eval/eos_rate": mean(eos(out)),
            "eval/ref_length": mean(ref.mask.sum(-1).astype(jnp.float32)), "eval/ref_eos_rate": mean(eos(ref)),
        }
        k = self.num_samples
        samples = tuple(flat(a)[:k] for a in (out.tokens, out.mask, out.score, ref.tokens, ref.mask, ref.score))
        return metrics, samples

    def _build(self) -> _OnMesh:
        """Place the held-out set on the layout and jit the programs (compiled at their first call)."""
        # b does not depend on the mesh: nor do the sampling keys and noise, so any mesh gives
        # the one-device evaluation.
        E, b = self.num_prompts, self.cfg.eval_batch_size or self.cfg.batch_size
        nb = -(-E // b)
        pad = nb * b - E
        # Padding rows repeat prompt 0 (the sampler needs real prompts) and weigh 0 in the means.
        x = np.concatenate([self.held_out.tokens, np.repeat(self.held_out.tokens[:1], pad, 0)]).reshape(nb, b, -1)
        xm = np.concatenate([self.held_out.mask, np.repeat(self.held_out.mask[:1], pad, 0)]).reshape(nb, b, -1)
        w = (np.arange(nb * b) < E).astype(np.float32).reshape(nb, b)
        layout, rows, rep = self.layout, self.rows, self.layout.replicated
        keys = np.asarray(jax.random.split(self.key, nb))
        N = self.N
        zeros = lambda: Responses(jnp.zeros((nb, b, N), jnp.int32), jnp.zeros((nb, b, N), jnp.int32),
                                  *(jnp.zeros((nb, b), jnp.float32) for _ in range(3)))
        dummy = jax.jit(zeros, out_shardings=rows)()
        on = dict(x=layout.place(x, rows), xm=layout.place(xm, rows), keys=layout.place(keys, rep),
                  w=layout.place(w, rows), rm_params=layout.place(self.judge.params), dummy=dummy)
        outs = (rows, rep)
        if self.judge.host is None:
            def fused(params, ref_params, rm_params, x, xm, keys, w, ref):
                out = self._generate(params, ref_params, x, xm, keys)
                out = out._replace(score=self._score_fused(rm_params, x, xm, out))
                return out, self._report(out, ref, w)

            program = jax.jit(fused, out_shardings=outs)

            def run(params, ref_params, ref):
                o = self._on
                return program(params, ref_params, o.rm_params, o.x, o.xm, o.keys, o.w, ref)
        else:
            generate = jax.jit(self._generate, out_shardings=rows)

            def finish(rm_params, rt, rtm, out, ref, w):
                out = out._replace(score=self._score_encoded(rm_params, rt, rtm))
                return out, self._report(out, ref, w)

            finish = jax.jit(finish, out_shardings=outs)

            def run(params, ref_params, ref):
                o = self._on
                out = generate(params, ref_params, o.x, o.xm, o.keys)
                rt, rtm = self._encode_local(out, rows)  # the documented host step
                return finish(o.rm_params, rt, rtm, out, ref, o.w)

        return _OnMesh(run=run, **on)

    def _encode_local(self, out: Responses, rows: NamedSharding) -> tuple[Array, Array]:
        """Re-encode, for the host judge, the (prompt, response) rows this process's devices
        hold; the global [nb, b, W] arrays are built from them (no process reads another's)."""
        nb, b, N = out.tokens.shape
        y, ym = np.zeros((nb, b, N), np.int32), np.zeros((nb, b, N), np.int32)
        held = np.zeros((nb, b), bool)
        for s, sm in zip(out.tokens.addressable_shards, out.mask.addressable_shards):
            y[s.index], ym[sm.index] = np.asarray(s.data), np.asarray(sm.data)
            held[s.index[:2]] = True
        flat = np.flatnonzero(held.reshape(-1))
        prompts = [self.held_out.rows[i] if i < self.num_prompts else self.held_out.rows[0] for i in flat]
        host = self.judge.host
        t, m = host.encode(prompts, y.reshape(nb * b, N)[flat], ym.reshape(nb * b, N)[flat])
        rt = np.full((nb * b, host.width), host.rm_tokenizer.pad_id, np.int32)
        rtm = np.zeros((nb * b, host.width), np.int32)
        rt[flat], rtm[flat] = t, m
        return self.layout.place(rt.reshape(nb, b, -1), rows), self.layout.place(rtm.reshape(nb, b, -1), rows)

    # -- the evaluator's interface ----------------------------------------------------------

    def evaluate(self, state: Any, round_idx: int) -> tuple[dict, list]:
        """(eval/* metrics, sample rows) of `state` (placed on the run's layout)."""
        t0 = time.perf_counter()
        if self._on is None:
            self._on = self._build()
        if self.ref is None:  # the reference's pass: the same executable as the policy's
            self.ref = self._on.run(state.ref_params, state.ref_params, self._on.dummy)[0]
        # LoRA: the policy is the base with the adapters (a second compile: another tree)
        policy = policy_params_fn(self.cfg)(state.params, state.ref_params)
        _, (metrics, samples) = self._on.run(policy, state.ref_params, self.ref)
        metrics, samples = first_copy((metrics, samples))
        metrics = {k: float(v) for k, v in metrics.items()}
        self.seconds.append(time.perf_counter() - t0)
        return metrics, self._sample_rows(*samples)

    def _sample_rows(self, y, ym, score, y_ref, ym_ref, score_ref) -> list[dict]:
        decode = lambda ids, m: self.tokenizer.decode(ids[m > 0], skip_special_tokens=True)
        return [{"prompt": prompt_text(self.held_out.rows[i]), "policy": decode(y[i], ym[i]),
                 "reference": decode(y_ref[i], ym_ref[i]), "policy_score": float(score[i]),
                 "reference_score": float(score_ref[i])} for i in range(len(y))]

    def summarise(self, rows: list[dict], samples: list[dict]) -> tuple[dict, str]:
        """Summary entries and markdown of the evaluations in `rows` (`reporting.held_out_summary`)."""
        about = {"eval_prompts": self.num_prompts, "eval_judge": self.judge.name,
                 "eval_temperature": self.cfg.eval_temperature, "eval_source": self.held_out.flag}
        return held_out_summary(rows, samples, about)
