"""The Run: everything built once on the host for a config, for a task or for HF checkpoints.

`build_run(cfg, layout=None)` is the one builder. The trainer (`xpo_jax.train`), the pure
training program (`make_train`) and sweeps read a Run through this contract and nothing else:

    cfg            the validated TrainConfig
    apply_fn       the policy module's `apply` (a module with `hidden`, `head`, `init_cache`,
                   `prefill` and `decode`: the decoder, or any policy of that interface)
    ref_params     the frozen reference parameters; the policy starts as a copy of them (LoRA:
                   the frozen base the adapters sit on; --base-dtype int8 / nf4: its
                   projection kernels quantized on the host, `xpo_jax.models.quant`)
    prompt_len, max_new_tokens    the static shapes of a round: prompts [B, P], responses [B, N]
    eos_id, pad_id the response tokens' end and padding
    tx, fns        derived from cfg: the optax optimiser, and `RoundFns` (make_pairs, update,
                   round_fn(state, prompts, mask, oracle)); `with_config(cfg)` rebuilds them for
                   a config that differs only in what the round reads (a sweep's)
    oracle         the JAX oracle (a pytree: a reward model's parameters are its leaves, traced
                   and sharded like any input), or None when the judge runs on the host
    judge          the host judge (a reward model with its own tokenizer) when oracle is None
    prompts        where a round's prompts come from. `in_graph` sources (built-in and user
                   tasks) are a pure function `batch(data_key, round)`, so a whole run can be one
                   `lax.scan`; host streams (prompt files) are read on the host, each process
                   reading only its own rows, with a position that goes into every checkpoint
    evaluator      what `eval/*` measures, or None: the exact evaluation of a task (pure, also
                   inside `make_train`), or a held-out evaluation of an HF run (host-driven)
    task           the Task of a task run, else None
    bonus_defaults the run's own defaults of bonus hyperparameters (a task's reward range as the
                   "vmax" bonus's v_max)

Layering: this module sits above the pure core (round, state, oracles, models), the tasks and
the HF pieces, and below the trainer and the command line.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from xpo_jax.config import TrainConfig
from xpo_jax.models.lora import adaptable_kernels, check_rank, init_adapters, target_kernels
from xpo_jax.models.quant import quantize_base
from xpo_jax.models.transformer import Transformer, stack_layer_params
from xpo_jax.oracles import reward_fn_oracle
from xpo_jax.parallel import Layout
from xpo_jax.reporting import EXACT_EVAL_KEYS
from xpo_jax.round import RoundFns, make_optimizer, make_round, policy_params_fn
from xpo_jax.state import Hyperparams, XPOState, initial_state
from xpo_jax.tasks import Task, make_reference, resolve_task

Array = jax.Array
LORA_SALT = 0x10BA  # folded into the run's key for the adapters' initialisation

# Settings that change what the round computes (or where a run writes), not what a Run was built
# from: `Run.with_config` accepts a config that differs from the run's own only in these.
ROUND_SETTINGS = frozenset({
    "alpha", "alpha_end", "beta", "beta_end", "seed", "exploration_mix", "exploration_sampling", "loss_type",
    "loss_params", "bonus", "bonus_params", "temperature", "top_k", "top_p", "learning_rate", "lr_scale",
    "warmup_rounds", "weight_decay", "max_grad_norm", "updates_per_round", "micro_batches", "replay_capacity",
    "replay_batch_size", "eval_every", "name", "run_dir", "progress", "tensorboard", "checkpoint_every",
    "keep_checkpoints", "resume", "overwrite"})


@dataclasses.dataclass(frozen=True)
class TaskPrompts:
    """A task's prompts: round r's batch is a pure function of (data_key, r), so a resumed run
    and every host of a multi-host run draw the same batch, and the draw can sit inside the
    compiled round."""

    task: Task
    batch_size: int
    in_graph = True

    def batch(self, data_key: Array, round_idx) -> tuple[Array, Array]:
        return self.task.sample_prompts(jax.random.fold_in(data_key, round_idx), self.batch_size)


@dataclasses.dataclass(frozen=True)
class ExactEval:
    """Exact evaluation of a task's policy against the reference (every response enumerated):
    `eval/reward`, `eval/kl`, `eval/j_beta`, `eval/p_optimal`, `eval/j_star`. Pure: it runs
    inside `make_train`'s scan as well as from the host loop."""

    task: Task
    apply_fn: Callable
    num_rounds: int
    policy_fn: Optional[Callable] = None  # (params, ref_params) -> the policy's tree (round.policy_params_fn)
    in_graph = True
    keys = EXACT_EVAL_KEYS

    def __call__(self, state: XPOState) -> dict:
        """At the beta of the state's last completed round (the schedule clips round -1, the
        reference's own evaluation, to round 0)."""
        _, beta = state.hparams.scheduled(state.round - 1, self.num_rounds)
        params = state.params if self.policy_fn is None else self.policy_fn(state.params, state.ref_params)
        out = self.task.exact_eval(self.apply_fn, params, state.ref_params, beta)
        return {f"eval/{k.split('/', 1)[1]}": out[k.split("/", 1)[1]] for k in self.keys}


@dataclasses.dataclass
class Run:
    """See the module docstring for the contract."""

    cfg: TrainConfig
    apply_fn: Callable
    ref_params: Any
    prompt_len: int
    max_new_tokens: int
    eos_id: int
    pad_id: int
    oracle: Optional[Callable]
    prompts: Any
    judge: Any = None
    evaluator: Any = None
    task: Optional[Task] = None
    extras: dict = dataclasses.field(default_factory=dict)  # kind-specific pieces (tokenizer, ...)
    true_reward_fn: Optional[Callable] = None  # a task's reward: the `task/reward` metric
    optimal_reward_fn: Optional[Callable] = None  # a task's best reward per prompt: `explore/*`
    bonus_defaults: dict = dataclasses.field(default_factory=dict)
    layout: Optional[Layout] = None  # the round's decode layout and activation pins (None: none)
    tx: Any = dataclasses.field(init=False)
    lr_schedule: Callable = dataclasses.field(init=False)
    fns: RoundFns = dataclasses.field(init=False)

    def __post_init__(self):
        self.tx, self.lr_schedule = make_optimizer(self.cfg)
        self.fns = self._make_round()

    def _make_round(self) -> RoundFns:
        return make_round(self.cfg, apply_fn=self.apply_fn, eos_id=self.eos_id, pad_id=self.pad_id,
                          max_new_tokens=self.max_new_tokens, true_reward_fn=self.true_reward_fn,
                          optimal_reward_fn=self.optimal_reward_fn, lr_schedule=self.lr_schedule, layout=self.layout)

    def with_layout(self, layout: Optional[Layout]) -> "Run":
        """This run with its round sampling in `layout`'s decode form. The optimiser object is kept:
        it is part of the state's tree structure, so states made by either run stay interchangeable."""
        new = copy.copy(self)
        new.layout = layout
        new.fns = new._make_round()
        return new

    def with_config(self, cfg: TrainConfig) -> "Run":
        """This run's built pieces (reference, task, prompts, oracle) with the round of `cfg`,
        which may differ from the run's own config only in ROUND_SETTINGS."""
        cfg.validate()
        now, was = cfg.to_dict(), self.cfg.to_dict()
        other = sorted(k for k in now if now[k] != was[k] and k not in ROUND_SETTINGS)
        if other:
            raise ValueError(f"this Run was built for another config: {', '.join(other)} differ (build it with "
                             "build_run for this config)")
        return dataclasses.replace(self, cfg=cfg)

    def hparams(self) -> Hyperparams:
        return Hyperparams.from_config(self.cfg, self.bonus_defaults)

    def init_state(self, key: Array, hparams: Hyperparams, ref_params: Any = None) -> XPOState:
        """Round 0: the policy is a copy of the reference. Pass `ref_params` explicitly under jit
        (a closed-over array would be baked into the program as a constant)."""
        ref_params = self.ref_params if ref_params is None else ref_params
        return initial_state(self.cfg, apply_fn=self.apply_fn, ref_params=ref_params, tx=self.tx, key=key,
                             hparams=hparams, prompt_len=self.prompt_len, max_new_tokens=self.max_new_tokens,
                             param_dtype=self.cfg.param_dtype, params=self.init_adapters(key, ref_params))

    def init_adapters(self, key: Array, ref_params: Any = None) -> Any:
        """A LoRA run's initial adapters for the base `ref_params` (from the run's key: lora_a
        random, lora_b zeros), or None without --lora-rank (the policy starts as a copy of the
        reference)."""
        cfg = self.cfg
        if not cfg.lora_rank:
            return None
        base = self.ref_params if ref_params is None else ref_params
        return init_adapters(base, cfg.lora_rank, cfg.lora_targets, jax.random.fold_in(key, LORA_SALT),
                             dtype=cfg.param_dtype)

    def state_shapes(self, hparams: Optional[Hyperparams] = None) -> XPOState:
        """The state's shapes and dtypes (`jax.ShapeDtypeStruct` leaves), nothing materialised."""
        hp = self.hparams() if hparams is None else hparams
        return jax.eval_shape(self.init_state, jax.random.PRNGKey(0), hp, self.ref_params)

    def data_key(self, key: Array) -> Array:
        return jax.random.fold_in(key, 0x5EED)


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def check_layout(cfg: TrainConfig, layout: Layout) -> None:
    """A config against its layout (the one place): every batch the run makes splits over the
    layout's batch shards. ValueError naming the flag."""
    layout.check_batch(cfg.batch_size, "--batch-size")
    if cfg.policy is not None and (cfg.eval_prompts or cfg.eval_fraction):
        layout.check_batch(cfg.eval_batch_size or cfg.batch_size, "--eval-batch-size")


def build_run(cfg: TrainConfig, layout: Any = None) -> Run:
    """The Run for `cfg`: a built-in or user task (`--task`), or HF checkpoints and a prompt
    file (`--policy`). HF checkpoints load straight into `layout`'s shardings (a Layout or a
    Mesh; default one device); the round follows the layout (`make_round(layout=)`)."""
    cfg.validate()
    if cfg.policy is not None:
        run = _build_hf_run(cfg, Layout.of(layout))
    else:
        run = _build_task_run(cfg)
    if cfg.lora_rank:
        check_lora(run)
    # The round samples in the layout's decode layout and pins activations by rows.
    return run if layout is None else dataclasses.replace(run, layout=Layout.of(layout))


def check_lora_model(cfg: TrainConfig, module: Any) -> None:
    """A LoRA run needs the decoder (its projections carry the adapters): ValueError otherwise,
    before the reference is built."""
    if cfg.lora_rank and not isinstance(module, Transformer):
        raise ValueError(f"--lora-rank={cfg.lora_rank}: LoRA adapts the decoder's projections, but this run's "
                         f"policy is {type(module).__name__} (task {cfg.task!r}); use a transformer task or --policy")


def check_lora(run: Run) -> None:
    """The built run's policy is the decoder, --lora-targets matches at least one of its kernels
    (ValueError naming the pattern) and --lora-rank does not exceed any targeted kernel's rank."""
    check_lora_model(run.cfg, getattr(run.apply_fn, "__self__", None))
    check_rank(target_kernels(run.ref_params, run.cfg.lora_targets), run.cfg.lora_rank)


def _build_task_run(cfg: TrainConfig) -> Run:
    task = resolve_task(cfg.task)
    n = cfg.max_new_tokens or task.max_new_tokens
    if n > task.max_new_tokens:
        raise ValueError(f"--max-new-tokens={n} exceeds task {task.name!r}'s limit {task.max_new_tokens}")
    model = task.make_model(**cfg.model_overrides())  # the decoder, or the task's own policy module
    check_lora_model(cfg, model)
    model_config = model.config
    ref_params = cast(make_reference(task, jax.random.PRNGKey(cfg.reference_seed)), cfg.base_float_dtype())
    if model_config.scan_layers and isinstance(model, Transformer):
        ref_params = stack_layer_params(ref_params, model_config.n_layers)
    if cfg.base_quantization():  # on the host, then onto the device once (quant.quantize_base)
        kernels = adaptable_kernels(ref_params)
        ref_params = jax.tree_util.tree_map(jnp.asarray, quantize_base(ref_params, kernels, cfg.base_quantization()))
    oracle = reward_fn_oracle(
        task.reward_fn, eos_id=task.eos_id, bradley_terry=cfg.bradley_terry,
        missing_eos_penalty=cfg.missing_eos_penalty, mask_identical=cfg.mask_identical,
    )
    if cfg.min_new_tokens > n:
        raise ValueError(f"--min-new-tokens={cfg.min_new_tokens} exceeds the {n} new tokens of task {task.name!r}")
    best, r_min, r_max = reward_table(task)
    return Run(cfg=cfg, apply_fn=model.apply, ref_params=ref_params, prompt_len=task.prompt_len, max_new_tokens=n,
               eos_id=task.eos_id, pad_id=task.pad_id, oracle=oracle, prompts=TaskPrompts(task, cfg.batch_size),
               evaluator=ExactEval(task, model.apply, cfg.rounds, policy_params_fn(cfg)), task=task, true_reward_fn=task.reward_fn,
               optimal_reward_fn=optimal_reward_fn(task, best), bonus_defaults={"v_max": r_max - r_min})


def cast(tree: Any, dtype: str) -> Any:
    """Every floating leaf of `tree` in `dtype` (storage precision of a frozen model)."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def reward_table(task: Task) -> tuple[np.ndarray, float, float]:
    """(best reward of each task prompt [K], the smallest and the largest reward of any response),
    by enumerating every response: the optimum the `explore/*` metrics compare with, and the
    reward range V_max of the paper's log-ratio bound (bonus "vmax")."""
    tokens, mask = (jnp.asarray(a) for a in task.responses)

    def per_prompt(prompt, prompt_mask):
        m = tokens.shape[0]
        r = task.reward_fn(jnp.broadcast_to(prompt, (m,) + prompt.shape),
                           jnp.broadcast_to(prompt_mask, (m,) + prompt.shape), tokens, mask)
        return jnp.max(r), jnp.min(r)

    best, worst = jax.device_get(jax.jit(jax.vmap(per_prompt))(jnp.asarray(task.prompts), jnp.asarray(task.prompt_mask)))
    return np.asarray(best, np.float32), float(np.min(worst)), float(np.max(best))


def optimal_reward_fn(task: Task, best: np.ndarray) -> Callable:
    """(prompts [B, P], mask) -> [B]: the best attainable reward of each row's prompt (a row is
    matched to the task's prompt table by its tokens and mask)."""
    table, table_mask, best = (jnp.asarray(a) for a in (task.prompts, task.prompt_mask, best))

    def fn(prompts, prompt_mask):
        same = jnp.all((prompts[:, None, :] == table[None]) & ((prompt_mask[:, None, :] > 0) == (table_mask[None] > 0)), -1)
        return best[jnp.argmax(same, axis=-1)]

    return fn


def _build_hf_run(cfg: TrainConfig, layout: Layout) -> Run:
    from xpo_jax.hf.run import build_hf_pieces

    p = build_hf_pieces(cfg, layout)
    return Run(cfg=cfg, apply_fn=p.apply_fn, ref_params=p.ref_params, prompt_len=cfg.max_prompt_length,
               max_new_tokens=p.max_new_tokens, eos_id=p.tokenizer.eos_id, pad_id=p.tokenizer.pad_id, oracle=p.oracle,
               prompts=p.prompts, judge=p.judge, evaluator=p.evaluator, extras={"tokenizer": p.tokenizer})
