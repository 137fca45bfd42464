"""Every training option in one frozen dataclass, validated before anything compiles, and the
command-line flags generated from it (`--alpha 1e-3 --beta 0.1 --rounds 200 ...`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import typing
from typing import Optional

from xpo_jax.losses import BONUSES, LOSSES, REQUIRED, check_params, resolve_bonus, resolve_loss

FLOAT_DTYPES = ("float32", "bfloat16")
# --base-dtype: the frozen base's storage. auto = --ref-dtype (or --param-dtype); int8 / nf4 = its
# projection kernels quantized (QLoRA, xpo_jax.models.quant), the rest in the float storage.
QUANTIZED_BASE = ("int8", "nf4")
BASE_DTYPES = ("auto",) + FLOAT_DTYPES + QUANTIZED_BASE
REMAT_MODES = ("none", "block", "matmuls")
EXPLORATION_SAMPLING = ("auto", "mixture")
# A run name is a folder under --run-dir, never a path: no '/', no '..', no hidden names.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
NAME_MAX_LEN = 200
INT32_MAX = 2**31 - 1
# LoRA's default targets: the attention and MLP projections (xpo_jax.models.lora.DEFAULT_TARGETS).
LORA_TARGETS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Options of an online XPO run. Field comments are the CLI help."""

    # -- run ------------------------------------------------------------------------------
    name: str = "xpo"  # run name: output goes to <run_dir>/<name>/
    run_dir: str = "runs"  # parent folder of runs
    task: str = "hard-explore"  # built-in task (xpo_jax.tasks.TASKS) or "module:attribute"
    data: Optional[int] = None  # mesh: data-parallel size (None: all devices / --fsdp, or 1 device when --fsdp is 1)
    fsdp: int = 1  # mesh: large weights split over this many devices (the batch over data x fsdp)
    tensor: int = 1  # mesh: tensor-parallel size (attention heads, MLP hidden units and the vocabulary split over it)
    rounds: int = 200  # online rounds (sample, judge, update)
    seed: int = 0  # seeds the policy's sampling, the oracle and the replay draws
    reference_seed: int = 0  # seeds the reference policy's fine-tune
    # -- real models (instead of --task) ----------------------------------------------------
    policy: Optional[str] = None  # HF checkpoint dir (Llama/Qwen2/Mistral): policy and reference
    reward_model: Optional[str] = None  # HF *ForSequenceClassification dir: the judge
    prompts: Optional[str] = None  # JSONL/Parquet prompt file(s) (comma-separated)
    max_prompt_length: int = 256  # prompts are left-padded/truncated to this many tokens
    truncation: str = "left"  # over-long prompts: "left" (keep the end) or "drop"
    fuse_judge: Optional[bool] = None  # judge inside the round (None: when the vocabularies match)
    eval_prompts: Optional[str] = None  # held-out JSONL/Parquet prompt file(s) for eval/* of an HF run (comma-separated)
    eval_fraction: float = 0.0  # hold out the last ceil(f * n) rows of --prompts for eval/* (training never reads them)
    eval_temperature: float = 0.7  # sampling temperature of the held-out evaluation (0 = greedy; no top-k/top-p)
    eval_batch_size: Optional[int] = None  # held-out prompts per batch of the evaluation program (None: --batch-size)
    eval_samples: int = 4  # the first this many held-out prompts: responses written to samples.jsonl each evaluation
    eval_reward_model: Optional[str] = None  # a second reward model that scores eval/* (training keeps --reward-model)
    # -- algorithm ------------------------------------------------------------------------
    alpha: float = 0.005  # XPO exploration coefficient (0 = no bonus; online DPO is --alpha 0 --exploration-mix 0)
    alpha_end: Optional[float] = None  # linear schedule to this value at the last round
    beta: float = 0.1  # KL strength of the DPO loss
    beta_end: Optional[float] = None  # linear schedule to this value at the last round
    loss_type: str = "sigmoid"  # DPO-family loss: a name of xpo_jax.losses.LOSSES or module:function
    loss_params: dict = dataclasses.field(default_factory=dict)  # the loss's hyperparameters, --loss-param name=value (repeat the flag)
    bonus: str = "clip"  # XPO bonus on y~: logprob (TRL: log pi), logratio (log pi/pi_ref), clip, vmax, or module:function
    bonus_params: dict = dataclasses.field(default_factory=dict)  # the bonus form's hyperparameters, --bonus-param name=value (clip: clip_low=-1, clip_high=1; vmax: v_max, default the task's reward range)
    exploration_mix: float = 1.0  # lambda: y~ from pi_ref with this probability, else from pi_t (1 = XPO Alg. 1, 0 = online DPO)
    exploration_sampling: str = "auto"  # auto (cheap paths for mix 0 / 1) or mixture (always the traced mixture: sweeps)
    # -- sampling -------------------------------------------------------------------------
    batch_size: int = 32  # prompts per round
    temperature: float = 1.0  # sampling temperature of y and y~
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_new_tokens: Optional[int] = None  # default: the task's
    min_new_tokens: int = 0  # EOS is forbidden before this many tokens
    # -- oracle ---------------------------------------------------------------------------
    bradley_terry: bool = True  # sample the preference from sigmoid(r(y) - r(y~)) (false: r(y) >= r(y~), TRL)
    missing_eos_penalty: Optional[float] = None  # subtracted from scores of responses without EOS
    mask_identical: bool = False  # drop pairs whose two responses are identical
    # -- optimiser ------------------------------------------------------------------------
    learning_rate: float = 3e-4  # AdamW peak learning rate
    lr_scale: float = 1.0  # traced multiplier of the learning rate (for sweeps)
    warmup_rounds: int = 0  # linear warm-up, in optimiser steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # global-norm clipping (0 = off)
    updates_per_round: int = 1  # K optimiser steps per round (on the fresh batch, or on K fresh replay minibatches)
    micro_batches: int = 1  # gradient accumulation: split each batch into this many
    replay_capacity: int = 0  # keep every labelled pair so far, up to this many (0 = TRL: train on the fresh batch only)
    replay_batch_size: int = 0  # with replay: each of the K steps draws this many pairs from all pairs so far
    # -- precision and memory -------------------------------------------------------------
    compute_dtype: str = "float32"  # activations and matmuls: float32 or bfloat16 (logits and losses stay float32)
    param_dtype: str = "float32"  # the policy's master weights (and Adam's moments)
    ref_dtype: Optional[str] = None  # the frozen reference's storage (None: --param-dtype)
    reward_dtype: Optional[str] = None  # the reward model's storage, HF runs (None: --param-dtype)
    remat: str = "none"  # rematerialise decoder blocks in the training backward: none, block, matmuls
    scan_layers: bool = False  # nn.scan over the decoder layers (one compiled layer: faster compiles)
    # -- LoRA -------------------------------------------------------------------------------
    lora_rank: int = 0  # LoRA adapters of this rank train; the base (= the reference) stays frozen (0 = off: full fine-tuning)
    lora_alpha: float = 16.0  # LoRA scale numerator: the adapters' output is scaled by alpha / rank
    lora_targets: str = LORA_TARGETS  # regex searched in the kernels' parameter paths: which projections get adapters
    base_dtype: str = "auto"  # the frozen base's storage: auto (--ref-dtype), float32, bfloat16, or int8 / nf4 (QLoRA: quantized projections, needs --lora-rank)
    # -- logging / checkpoints ------------------------------------------------------------
    eval_every: int = 10  # eval/* every this many rounds: exact J_beta on tasks, held-out eval on HF runs (0 = off)
    checkpoint_every: int = 50  # save every this many rounds (0 = only at the end)
    keep_checkpoints: int = 2  # checkpoints kept on disk
    resume: bool = False  # continue from <run_dir>/<name>/checkpoints
    accept_changed_models: bool = False  # --resume although a model file changed since the checkpoint (recorded in it)
    overwrite: bool = False  # start afresh, deleting <run_dir>/<name>'s checkpoints and metrics
    tensorboard: bool = True  # write TensorBoard events (needs tensorboardX)
    progress: bool = True  # tqdm progress bar

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad field; return self. A config is checked once:
        later calls (build_run, Trainer) return at once."""
        if getattr(self, "_validated", False):
            return self
        self._check()
        object.__setattr__(self, "_validated", True)  # frozen: not a field, never serialised
        return self

    def _check(self) -> None:
        def bad(field, why):
            raise ValueError(f"--{field.replace('_', '-')}={getattr(self, field)!r}: {why}")

        self._check_int_ranges(bad)
        for f in ("rounds", "batch_size", "updates_per_round", "micro_batches", "keep_checkpoints"):
            if getattr(self, f) < 1:
                bad(f, "must be >= 1")
        for f in ("eval_every", "checkpoint_every", "warmup_rounds", "replay_capacity", "replay_batch_size", "top_k"):
            if getattr(self, f) < 0:
                bad(f, "must be >= 0")
        for f in ("alpha", "alpha_end", "weight_decay", "max_grad_norm", "temperature"):
            v = getattr(self, f)
            if v is not None and not (v >= 0 and v < float("inf")):
                bad(f, "must be finite and >= 0")
        for f in ("beta", "beta_end", "learning_rate", "lr_scale"):
            v = getattr(self, f)
            if v is not None and not (v > 0 and v < float("inf")):
                bad(f, "must be finite and > 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        for f in ("compute_dtype", "param_dtype", "ref_dtype", "reward_dtype"):
            v = getattr(self, f)
            if v is not None and v not in FLOAT_DTYPES:
                bad(f, f"expected one of {', '.join(FLOAT_DTYPES)}")
        if self.remat not in REMAT_MODES:
            bad("remat", f"expected one of {', '.join(REMAT_MODES)}")
        self._check_terms(bad)
        if not 0.0 <= self.exploration_mix <= 1.0:
            bad("exploration_mix", "must be in [0, 1] (the probability that y~ comes from pi_ref)")
        if self.exploration_sampling not in EXPLORATION_SAMPLING:
            bad("exploration_sampling", f"expected one of {', '.join(EXPLORATION_SAMPLING)}")
        if self.min_new_tokens < 0:
            bad("min_new_tokens", "must be >= 0")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            bad("min_new_tokens", f"must be <= --max-new-tokens={self.max_new_tokens}")
        if self.missing_eos_penalty is not None and not self.missing_eos_penalty >= 0:
            bad("missing_eos_penalty", "must be >= 0 (it is subtracted from the score)")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            bad("max_new_tokens", "must be >= 1")
        if self.batch_size % self.micro_batches:
            bad("micro_batches", f"must divide --batch-size={self.batch_size}")
        if self.replay_batch_size and not self.replay_capacity:
            bad("replay_batch_size", "needs --replay-capacity > 0")
        if self.replay_capacity and not self.replay_batch_size:
            bad("replay_capacity", "needs --replay-batch-size > 0 (pairs per optimiser step)")
        if self.replay_batch_size % self.micro_batches:
            bad("micro_batches", f"must divide --replay-batch-size={self.replay_batch_size}")
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            bad("name", "must be a plain name: letters, digits, '_', '-', '.', not starting with '.' (no paths)")
        if len(self.name) > NAME_MAX_LEN:
            raise ValueError(f"--name: {len(self.name)} characters; at most {NAME_MAX_LEN} (the OS limits a file name "
                             "to 255 bytes, and the run's lock file adds to it)")
        if not isinstance(self.run_dir, str) or not self.run_dir.strip():
            bad("run_dir", "must be a non-empty path")
        if "\x00" in self.run_dir:
            bad("run_dir", "contains a NUL character, which no path may hold")
        if self.fsdp < 1:
            bad("fsdp", "must be >= 1")
        if self.data is not None and self.data < 1:
            bad("data", "must be >= 1 (or unset: all devices / --fsdp)")
        if self.tensor < 1:
            bad("tensor", "must be >= 1")
        if self.resume and self.overwrite:
            bad("overwrite", "contradicts --resume (continue the run, or delete it and start afresh: pick one)")
        if self.replay_capacity and self.replay_capacity < self.batch_size:
            bad("replay_capacity", f"must be 0 or >= --batch-size={self.batch_size} (a round inserts a batch)")
        self._check_inputs(bad)
        self._check_lora(bad)

    def _check_lora(self, bad) -> None:
        """--lora-*: rank an int >= 1 (0 = off), alpha finite > 0, targets a regular expression
        (whether it matches a kernel is checked against the model in build_run)."""
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            bad("lora_rank", "must be an int >= 1 (or 0: no adapters, full fine-tuning)")
        if not (isinstance(self.lora_alpha, (int, float)) and 0 < self.lora_alpha < float("inf")):
            bad("lora_alpha", "must be finite and > 0")
        try:
            re.compile(self.lora_targets)
        except (re.error, TypeError) as e:
            bad("lora_targets", f"is not a regular expression ({e})")
        if self.base_dtype not in BASE_DTYPES:
            bad("base_dtype", f"expected one of {', '.join(BASE_DTYPES)}")
        if self.base_dtype in QUANTIZED_BASE and not self.lora_rank:
            bad("base_dtype", "a quantized base cannot be trained: it needs --lora-rank > 0 (adapters on the frozen "
                "base), or use --base-dtype auto, float32 or bfloat16")
        if self.base_dtype in FLOAT_DTYPES and self.ref_dtype not in (None, self.base_dtype):
            bad("base_dtype", f"contradicts --ref-dtype={self.ref_dtype!r} (both set the base's storage: set one)")

    def base_float_dtype(self) -> str:
        """The float storage of the frozen base (the reference): --base-dtype when it is a float,
        else --ref-dtype, else --param-dtype (of a quantized base: the leaves not quantized)."""
        return self.base_dtype if self.base_dtype in FLOAT_DTYPES else self.ref_dtype or self.param_dtype

    def base_quantization(self) -> Optional[str]:
        """int8 or nf4 for a QLoRA run (--base-dtype), else None."""
        return self.base_dtype if self.base_dtype in QUANTIZED_BASE else None

    def _check_int_ranges(self, bad) -> None:
        """Integers the program stores as int32 (rounds, step counts, sizes) must fit it; seeds are
        32 bits (jax.random.PRNGKey folds a larger seed onto a smaller one: two runs would silently
        be one). Checked before any comparison, so a non-integer is named too."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("seed", "reference_seed"):
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**32:
                    bad(f.name, "must be an integer in [0, 2^32) (a PRNG seed is 32 bits: a larger or negative one "
                                "would silently equal another seed)")
            elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT32_MAX:
                bad(f.name, f"must be at most {INT32_MAX} (the program counts it in int32)")
        if self.rounds * self.updates_per_round > INT32_MAX:
            bad("rounds", f"x --updates-per-round={self.updates_per_round} optimiser steps exceed {INT32_MAX} (int32)")

    def _check_inputs(self, bad) -> None:
        """Where prompts and rewards come from: a task, or HF checkpoints with their prompt files and
        held-out evaluation."""
        if not 0.0 <= self.eval_fraction < 1.0:
            bad("eval_fraction", "must be in [0, 1) (the fraction of --prompts held out for evaluation)")
        if self.eval_fraction and self.eval_prompts is not None:
            bad("eval_fraction", "contradicts --eval-prompts (hold out part of --prompts, or give a held-out file: pick one)")
        if not (self.eval_temperature >= 0 and math.isfinite(self.eval_temperature)):
            bad("eval_temperature", "must be finite and >= 0 (0 = greedy)")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            bad("eval_batch_size", "must be >= 1 (or unset: --batch-size)")
        if self.eval_samples < 0:
            bad("eval_samples", "must be >= 0")
        if self.eval_reward_model is not None and self.eval_prompts is None and not self.eval_fraction:
            bad("eval_reward_model", "needs a held-out set to score: --eval-prompts or --eval-fraction")
        if self.policy is None and (self.eval_prompts is not None or self.eval_fraction or self.eval_reward_model is not None):
            bad("policy", "is required with --eval-prompts / --eval-fraction / --eval-reward-model (tasks evaluate exactly)")
        if self.policy is not None:
            for f in ("reward_model", "prompts"):
                if getattr(self, f) is None:
                    bad(f, "is required with --policy")
            if self.max_prompt_length < 1:
                bad("max_prompt_length", "must be >= 1")
            if self.truncation not in ("left", "drop"):
                bad("truncation", "expected 'left' or 'drop'")
            return
        if self.reward_model is not None or self.prompts is not None:
            bad("policy", "is required with --reward-model / --prompts")
        from xpo_jax.tasks import TASKS, resolve_task  # late: tasks imports the model

        try:
            resolve_task(self.task)
        except ValueError as e:
            bad("task", f"expected one of {', '.join(sorted(TASKS))} or module:attribute ({e})")

    def _check_terms(self, bad) -> None:
        """The loss and the bonus form resolve, and their hyperparameters are theirs and in range."""
        for field, params_field, resolve, registry in (("loss_type", "loss_params", resolve_loss, LOSSES),
                                                       ("bonus", "bonus_params", resolve_bonus, BONUSES)):
            params = getattr(self, params_field)
            if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
                raise ValueError(f"--{params_field.replace('_params', '-param')}: {params!r} is not a mapping of "
                                 "hyperparameter names to numbers")
            try:
                resolve(getattr(self, field))
            except ValueError as e:
                names = ", ".join(registry.names())
                why = f" ({e})" if ":" in str(getattr(self, field)) else ""
                bad(field, f"expected one of {names} or module:function{why}")
        self.check_hyperparameters()

    def check_hyperparameters(self, loss_params: Optional[dict] = None, bonus_params: Optional[dict] = None) -> None:
        """ValueError naming the flag unless the loss's and the bonus form's hyperparameters (cfg's,
        updated by the given ones) are theirs, finite and in range: each term's function runs once on
        a tiny concrete batch, so its own checks decide. A task run supplies the bonus's required
        values (the "vmax" form's v_max) itself."""
        for params_field, resolve, name, over in (("loss_params", resolve_loss, self.loss_type, loss_params),
                                                  ("bonus_params", resolve_bonus, self.bonus, bonus_params)):
            flag = "--" + params_field.replace("_params", "-param")
            given = {**getattr(self, params_field), **(over or {})}
            for k, v in given.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"{flag} {k}={v!r}: must be a finite number")
            term = resolve(name)
            if params_field == "bonus_params" and self.policy is None:
                given = {**{k: 1.0 for k, v in term.params.items() if v is REQUIRED}, **given}
            try:
                check_params(term, given, beta=self.beta)
            except (ValueError, TypeError) as e:
                shown = " ".join(f"{k}={v!r}" for k, v in given.items()) or "(none given)"
                raise ValueError(f"{flag} {shown}: {e}") from None

    def resolved_loss_params(self) -> dict:
        """Every hyperparameter of the loss: cfg.loss_params over the loss's declared defaults."""
        return resolve_loss(self.loss_type).resolved(self.loss_params)

    def resolved_bonus_params(self, defaults: Optional[dict] = None) -> dict:
        """Every hyperparameter of the bonus form: cfg.bonus_params over `defaults` (a run's own,
        e.g. a task's reward range as v_max) over the declared defaults."""
        term = resolve_bonus(self.bonus)
        run_defaults = {k: v for k, v in (defaults or {}).items() if k in term.params}
        return term.resolved({**run_defaults, **self.bonus_params})

    def model_overrides(self) -> dict:
        """The ModelConfig fields this run sets on the policy (and reference) model."""
        return {"dtype": self.compute_dtype, "remat": self.remat, "scan_layers": self.scan_layers}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


# Options that may change when a run is resumed; any other difference would silently mix two runs.
RESUME_MAY_DIFFER = frozenset(
    {"rounds", "resume", "overwrite", "progress", "tensorboard", "checkpoint_every", "keep_checkpoints", "eval_every",
     # where the run lives and how it is laid out on devices: a renamed or copied run dir, and a
     # resume onto another mesh shape, continue the same run
     "name", "run_dir", "data", "fsdp", "tensor", "eval_samples",
     # an explicit acceptance of changed model files, recorded in the checkpoints it saves
     "accept_changed_models"}
)


def check_resumable(saved: dict, now: dict) -> None:
    """Raise ValueError naming each setting in which `now` differs from the checkpoint's `saved`
    (a key the checkpoint predates counts as its default)."""
    defaults = TrainConfig().to_dict()
    diff = [(k, saved.get(k, defaults.get(k)), v) for k, v in now.items()
            if k not in RESUME_MAY_DIFFER and saved.get(k, defaults.get(k)) != v]
    if diff:
        flags = ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, a, b in diff)
        raise ValueError(f"--resume with settings that differ from the checkpoint's: {flags}. Resume with the "
                         "checkpoint's settings, or start a new run (--name or --overwrite)")


# ----------------------------------------------------------------------------------------------
# CLI flags from the dataclass
# ----------------------------------------------------------------------------------------------


def _field_comments(cls) -> dict:
    """Field name -> trailing `# comment` in the class source (the flags' help text)."""
    import inspect

    out = {}
    for line in inspect.getsource(cls).splitlines():
        s = line.strip()
        if ":" in s and "#" in s and not s.startswith("#"):
            name = s.split(":", 1)[0].strip()
            out[name] = s.split("#", 1)[1].strip()
    return out


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def _optional(conv):
    def parse(s: str):
        return None if s.strip().lower() in ("none", "") else conv(s)

    parse.__name__ = conv.__name__
    return parse


def parse_param(s: str) -> tuple[str, float]:
    """"name=value" -> (name, float(value)): one --loss-param / --bonus-param."""
    name, eq, value = s.partition("=")
    if not eq or not name.strip():
        raise argparse.ArgumentTypeError(f"expected name=value, got {s!r}")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name.strip()}={value!r}: expected a number") from None


def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig, skip: tuple = ()) -> None:
    """One `--flag` per field (fields in `skip` excepted); defaults come from the dataclass (None =
    keep the default). A mapping field (loss_params) is a repeatable `--loss-param name=value`."""
    hints = typing.get_type_hints(cls)
    helps = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        t = hints[f.name]
        help_text = helps.get(f.name, "")
        if t is dict:
            flag = "--" + f.name.replace("_params", "_param").replace("_", "-")
            parser.add_argument(flag, dest=f.name, type=parse_param, action="append", default=argparse.SUPPRESS,
                                metavar="NAME=VALUE", help=help_text)
            continue
        optional = typing.get_origin(t) is typing.Union and type(None) in typing.get_args(t)
        base = [a for a in typing.get_args(t) if a is not type(None)][0] if optional else t
        conv = _parse_bool if base is bool else base
        if optional:
            conv = _optional(conv)
        flag = "--" + f.name.replace("_", "-")
        kwargs = dict(type=conv, default=argparse.SUPPRESS, help=f"{help_text} (default {f.default!r})")
        if base is bool:
            kwargs.update(nargs="?", const=True)
        parser.add_argument(flag, dest=f.name, **kwargs)


def config_from_args(args: argparse.Namespace, cls=TrainConfig, base: Optional[TrainConfig] = None):
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: (dict(v) if isinstance(v, list) else v) for k, v in vars(args).items() if k in names}
    return dataclasses.replace(base or cls(), **overrides)
