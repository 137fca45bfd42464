"""The pieces of an online XPO run on Hugging Face checkpoints: model, prompt stream, judge.

    xpo-jax train --policy DIR --reward-model DIR --prompts FILE.jsonl [--max-new-tokens 64 ...]

The policy checkpoint is both the starting policy and the frozen reference. Prompts are read
through TFDS (array_record, no TensorFlow) by a deterministic, resumable iterator; each process
of a multi-host run reads only its own rows of every global batch (`FilePrompts`), and every
process's position goes into each checkpoint. Prompts are encoded with the policy's tokenizer
(chat rows through its chat template), left-padded to --max-prompt-length.

The judge. When the reward model reads the policy's token ids (same vocabulary), it is a JAX
oracle inside the fused round: one XLA program per round. When it has its own tokenizer, token
ids mean different things to the two models (TRL's XPOTrainer then indexes out of range or
scores garbage, TRL issue #6955), so the round runs in its two jitted halves with `HostJudge`
between them: responses are decoded with the policy's tokenizer and the (prompt, response)
conversation is re-encoded with the reward model's own tokenizer and chat template.

Held-out evaluation (--eval-prompts, or --eval-fraction of --prompts that training then never
reads; optionally judged by a second reward model, --eval-reward-model): `xpo_jax.hf.eval`.

`build_hf_pieces` returns these pieces; `xpo_jax.run.build_run` assembles them into a Run.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable, Optional

import jax
import numpy as np

from xpo_jax.models.hf import load_hf
from xpo_jax.models.transformer import RewardModel, Transformer
from xpo_jax.oracles import reward_model_oracle
from xpo_jax.distributed import barrier
from xpo_jax.parallel import Layout
from xpo_jax.hf.tokenizer import TextTokenizer

if TYPE_CHECKING:  # the config is read, never imported at run time (it sits in a higher layer)
    from xpo_jax.config import TrainConfig

Array = jax.Array

DEFAULT_MAX_NEW_TOKENS = 64


def same_vocabulary(a: TextTokenizer, b: TextTokenizer) -> bool:
    """True when both tokenizers map every string to the same ids (same vocab and specials)."""
    return a.vocab_size == b.vocab_size and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


class FilePrompts:
    """A host prompt stream: `next_local(rows)` encodes this process's rows of the next global
    batch. Position: (epoch, index) of the iterator plus the truncation counters, one vector per
    process (`position` / `restore`).

    With truncation="drop", over-long prompts are replaced from this process's share of the
    following reads, so the batch shape (and the compiled round) never changes; the rows beyond
    a full batch in the last read are skipped. Without drops every process's rows are exactly its
    slice of the one-process batch. A full pass over the data with no prompt that fits is an
    error, not an endless loop."""

    in_graph = False

    def __init__(self, iterator: Any, tokenizer: TextTokenizer, cfg: TrainConfig, fingerprint: str):
        self.iterator = iterator
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.fingerprint = fingerprint  # sha256 of the prompt files' contents
        self.num_prompts = len(iterator.source)
        self.stats = {"num_truncated": 0, "num_dropped": 0}

    def next_local(self, rows: slice) -> tuple[list, np.ndarray, np.ndarray]:
        """(prompt rows, tokens [b, P], mask [b, P]) for this process's `rows` of the batch."""
        want = rows.stop - rows.start
        kept_rows, toks, masks, read_since_kept = [], [], [], 0
        while len(kept_rows) < want:
            batch = self.iterator.next_rows(rows)
            t, m, stats = self.tokenizer.encode_prompts(batch, max_prompt_length=self.cfg.max_prompt_length,
                                                        truncation=self.cfg.truncation)
            self.stats["num_truncated"] += stats["num_truncated"]
            self.stats["num_dropped"] += stats["num_dropped"]
            read_since_kept = 0 if stats["kept"] else read_since_kept + len(batch)
            if read_since_kept >= self.num_prompts:
                raise ValueError(
                    f"--truncation drop: no prompt of a full pass over --prompts={self.cfg.prompts!r} fits "
                    f"--max-prompt-length={self.cfg.max_prompt_length}; raise it or use --truncation left")
            kept_rows += [batch[i] for i in stats["kept"]]
            toks.append(t)
            masks.append(m)
        return kept_rows[:want], np.concatenate(toks)[:want], np.concatenate(masks)[:want]

    def position(self) -> list[int]:
        s = self.iterator.state()
        return [int(s["epoch"]), int(s["index"]), self.stats["num_truncated"], self.stats["num_dropped"]]

    def restore(self, position: list[int]) -> None:
        epoch, index, truncated, dropped = (int(v) for v in position)
        self.iterator.restore({"epoch": epoch, "index": index})
        self.stats = {"num_truncated": truncated, "num_dropped": dropped}


@dataclasses.dataclass
class HostJudge:
    """A reward model with its own tokenizer, between the round's jitted halves: `encode` (host)
    re-tokenises (prompt, response) for it; `score` (pure) runs it."""

    tokenizer: TextTokenizer
    rm_tokenizer: TextTokenizer
    rm_apply: Callable
    rm_params: Any
    width: int  # fixed re-encoded length: one compilation

    def encode(self, rows: list, responses: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Re-encode (prompt, response) with the reward model's tokenizer, left-padded."""
        texts = []
        for row, ids, m in zip(rows, responses, mask):
            reply = self.tokenizer.decode(ids[m > 0], skip_special_tokens=True)
            if isinstance(row, str):
                texts.append(self.rm_tokenizer.encode(row + reply))
            elif self.rm_tokenizer.chat_template:
                conv = list(row) + [{"role": "assistant", "content": reply}]
                texts.append(self.rm_tokenizer.encode(self.rm_tokenizer.apply_chat_template(conv, add_generation_prompt=False),
                                                      add_special_tokens=False))
            else:
                texts.append(self.rm_tokenizer.encode("\n".join(t["content"] for t in row) + reply))
        tok = np.full((len(texts), self.width), self.rm_tokenizer.pad_id, np.int32)
        msk = np.zeros((len(texts), self.width), np.int32)
        for i, ids in enumerate(texts):
            ids = ids[-self.width:]
            tok[i, self.width - len(ids):] = ids
            msk[i, self.width - len(ids):] = 1
        return tok, msk

    def score(self, rm_params: Any, tokens: Array, mask: Array) -> Array:
        return self.rm_apply({"params": rm_params}, tokens, mask)


@dataclasses.dataclass
class HFPieces:
    apply_fn: Callable
    ref_params: Any
    tokenizer: TextTokenizer
    max_new_tokens: int
    oracle: Optional[Callable]
    judge: Optional[HostJudge]
    prompts: FilePrompts
    evaluator: Any = None


def _check_dir(flag: str, path: str, need: tuple[str, ...]) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"--{flag}={path!r}: no such directory")
    for f in need:
        if not os.path.exists(os.path.join(path, f)):
            raise ValueError(f"--{flag}={path!r}: no {f} in it")


def check_hf_inputs(cfg: TrainConfig) -> None:
    """What can be checked about the files before anything is loaded: directories, config.json,
    tokenizer.json and the prompt files exist (each error names the flag and the path)."""
    _check_dir("policy", cfg.policy, ("config.json", "tokenizer.json"))
    _check_dir("reward-model", cfg.reward_model, ("config.json", "tokenizer.json"))
    for p in (p for p in cfg.prompts.split(",") if p):
        import glob

        if not glob.glob(p):
            raise ValueError(f"--prompts: no file matches {p!r}")
    from xpo_jax.hf.eval import check_eval_inputs

    check_eval_inputs(cfg)


def _load(flag: str, path: str, want_kind: str, sharding_fn: Optional[Callable], dtype: str, overrides: dict,
          quantize: Optional[str] = None):
    """A checkpoint straight into its shardings (`sharding_fn`), stored in `dtype` (its projection
    kernels quantized with `quantize`: QLoRA), with the run's ModelConfig overrides (compute dtype,
    remat, scan_layers); errors name the flag."""
    try:
        config, params, kind = load_hf(path, dtype=dtype, shardings=sharding_fn, overrides=overrides,
                                       quantize=quantize)
    except (OSError, KeyError, ValueError, NotImplementedError) as e:
        raise ValueError(f"--{flag}={path!r}: {e}") from e
    if kind != want_kind:
        raise ValueError(f"--{flag}={path!r} holds a {kind}, expected a {want_kind}")
    return config, params


def build_hf_pieces(cfg: TrainConfig, layout: Layout) -> HFPieces:
    """Tokenizers, prompts, the policy (also the reference) and reward model loaded straight into
    `layout`'s shardings, the judge (fused or on the host) and the held-out evaluation."""
    from xpo_jax.hf.data import PromptIterator, build_prompt_dataset, hash_files, resolve_paths
    from xpo_jax.hf.eval import EvalJudge, HeldOutEval, eval_rm_tokenizer, split_prompts

    check_hf_inputs(cfg)
    sharding_fn = layout.param_fn()
    tok = TextTokenizer.from_dir(cfg.policy)
    rm_tok = TextTokenizer.from_dir(cfg.reward_model)
    # The prompts before the weights: a held-out set that is empty, or that leaves no training
    # batch, fails here (each error names its flag), before anything is loaded or compiled.
    paths = resolve_paths([p for p in cfg.prompts.split(",") if p])
    data_dir = os.path.join(cfg.run_dir, cfg.name, "data")
    if jax.process_index() == 0:  # prepare once (shared storage), then every process opens it
        build_prompt_dataset(paths, data_dir)
    barrier("xpo_jax:prompt-dataset")
    full = build_prompt_dataset(paths, data_dir)
    check_templates(cfg, full, tok, rm_tok)
    source, held_out = split_prompts(cfg, full, tok)
    if held_out is not None:
        layout.check_batch(cfg.eval_batch_size or cfg.batch_size, "--eval-batch-size")
        check_held_out_disjoint(cfg, source, held_out)
    eval_rm_tok = eval_rm_tokenizer(cfg, tok) if cfg.eval_reward_model else None
    # The policy checkpoint is the reference: stored in --ref-dtype; the policy's master copy is
    # made from it in --param-dtype when the state is initialised.
    pol_cfg, params = _load("policy", cfg.policy, "causal_lm", sharding_fn, cfg.base_float_dtype(),
                            cfg.model_overrides(), cfg.base_quantization())
    check_finite("policy", cfg.policy, params)
    rm_cfg, rm_params = _load("reward-model", cfg.reward_model, "reward_model", sharding_fn,
                              cfg.reward_dtype or cfg.param_dtype,
                              {"dtype": cfg.compute_dtype, "scan_layers": cfg.scan_layers})
    check_finite("reward-model", cfg.reward_model, rm_params)
    for flag, t, c in (("policy", tok, pol_cfg), ("reward-model", rm_tok, rm_cfg)):
        if t.vocab_size > c.vocab_size:
            raise ValueError(f"--{flag}={getattr(cfg, flag.replace('-', '_'))!r}: the tokenizer has {t.vocab_size} "
                             f"tokens but the model only {c.vocab_size} embeddings")
    shared = same_vocabulary(tok, rm_tok) and rm_cfg.vocab_size == pol_cfg.vocab_size
    fused = shared if cfg.fuse_judge is None else cfg.fuse_judge
    if fused and not shared:
        raise ValueError(
            f"--fuse-judge: the reward model's tokenizer ({cfg.reward_model}) differs from the policy's "
            f"({cfg.policy}); its ids would be scored as garbage. Leave --fuse-judge unset to judge on the host.")
    n = cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    need = cfg.max_prompt_length + n
    if pol_cfg.max_seq_len < need:
        raise ValueError(f"--max-prompt-length + --max-new-tokens = {need} exceeds the policy's max_seq_len "
                         f"{pol_cfg.max_seq_len}")
    model, rm = Transformer(pol_cfg), RewardModel(rm_cfg)
    oracle = judge = None
    if fused:
        oracle = reward_model_oracle(rm.apply, rm_params, eos_id=tok.eos_id, bradley_terry=cfg.bradley_terry,
                                     missing_eos_penalty=cfg.missing_eos_penalty, mask_identical=cfg.mask_identical)
    else:
        judge = HostJudge(tok, rm_tok, rm.apply, rm_params, width=cfg.max_prompt_length + 4 * n)
    iterator = PromptIterator(source, cfg.batch_size, seed=cfg.seed)  # without the held-out rows
    prompts = FilePrompts(iterator, tok, cfg, fingerprint=hash_files(paths))
    evaluator = None
    if held_out is not None:
        # The evaluation's judge: --eval-reward-model, else the training reward model; inside
        # the program when it reads the policy's ids, else through re-encoded text (HostJudge).
        ev_judge = EvalJudge(rm.apply, rm_params, cfg.reward_model, None if fused else judge)
        if cfg.eval_reward_model:
            ev_cfg, ev_params = _load("eval-reward-model", cfg.eval_reward_model, "reward_model", sharding_fn,
                                      cfg.reward_dtype or cfg.param_dtype,
                                      {"dtype": cfg.compute_dtype, "scan_layers": cfg.scan_layers})
            check_finite("eval-reward-model", cfg.eval_reward_model, ev_params)
            if eval_rm_tok is not None and eval_rm_tok.vocab_size > ev_cfg.vocab_size:
                raise ValueError(f"--eval-reward-model={cfg.eval_reward_model!r}: the tokenizer has "
                                 f"{eval_rm_tok.vocab_size} tokens but the model only {ev_cfg.vocab_size} embeddings")
            ev_rm = RewardModel(ev_cfg)
            same = ev_cfg.vocab_size == pol_cfg.vocab_size and (eval_rm_tok is None or same_vocabulary(tok, eval_rm_tok))
            ev_host = None if same else HostJudge(tok, eval_rm_tok, ev_rm.apply, ev_params,
                                                  width=cfg.max_prompt_length + 4 * n)
            ev_judge = EvalJudge(ev_rm.apply, ev_params, cfg.eval_reward_model, ev_host)
        evaluator = HeldOutEval(cfg, layout, apply_fn=model.apply, tokenizer=tok, held_out=held_out, judge=ev_judge,
                                max_new_tokens=n)
    return HFPieces(model.apply, params, tok, n, oracle, judge, prompts, evaluator)


# ----------------------------------------------------------------------------------------------
# Checks on what was loaded, before anything compiles
# ----------------------------------------------------------------------------------------------

MODEL_FLAGS = ("policy", "reward_model", "eval_reward_model")


def model_files(path: str) -> list[str]:
    """The files whose bytes are a checkpoint's weights: every *.safetensors and its index."""
    names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") or f.endswith(".safetensors.index.json"))
    return [os.path.join(path, f) for f in names]


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprints(cfg: TrainConfig) -> dict:
    """{flag: {"path": dir, "files": {name: [size, sha256]}}} of every model a run depends on
    (policy, reward model, eval reward model): saved with each checkpoint, compared on --resume
    (a file changed in place under the same path would otherwise be trained on silently)."""
    out = {}
    for field in MODEL_FLAGS:
        path = getattr(cfg, field)
        if path is None:
            continue
        files = {os.path.basename(f): [os.path.getsize(f), _sha256(f)] for f in model_files(path)}
        out[field] = {"path": os.path.abspath(path), "files": files}
    return out


def changed_models(saved: Optional[dict], now: dict) -> list[str]:
    """What differs between two `model_fingerprints`, one phrase per file, naming flag and file;
    a checkpoint without fingerprints is one phrase too (it cannot be verified)."""
    if not isinstance(saved, dict) or not saved:
        return ["the checkpoint records no model fingerprints, so its models cannot be verified"]
    changes = []
    for field, entry in now.items():
        flag = "--" + field.replace("_", "-")
        was = (saved.get(field) or {}).get("files")
        if was is None:
            changes.append(f"{flag}: not recorded in the checkpoint")
            continue
        for name in sorted(set(was) | set(entry["files"])):
            a, b = was.get(name), entry["files"].get(name)
            where = os.path.join(entry["path"], name)
            if a is None:
                changes.append(f"{flag}: {where} is new")
            elif b is None:
                changes.append(f"{flag}: {where} is gone")
            elif list(a) != list(b):
                changes.append(f"{flag}: {where} changed (size {a[0]} -> {b[0]}, sha256 {str(a[1])[:12]}... -> "
                               f"{b[1][:12]}...)")
    return changes


def check_finite(flag: str, path: str, params: Any) -> None:
    """ValueError naming the tensor and its file when a loaded checkpoint holds NaN or inf (it
    would train, then stop at round 1 blaming the loss). One small jitted reduction per leaf."""
    import jax.numpy as jnp

    finite = jax.jit(lambda x: jnp.all(jnp.isfinite(x)))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    bad = [jax.tree_util.keystr(k) for k, x in flat
           if jnp.issubdtype(x.dtype, jnp.floating) and not bool(finite(x))]
    if not bad:
        return
    where = _non_finite_tensors(path)
    named = ", ".join(f"{t} in {f}" for t, f in where[:3]) if where else f"parameter {bad[0]}"
    raise ValueError(f"--{flag}={path!r}: non-finite weights (NaN or inf): {named}"
                     f"{f' and {len(where) - 3} more' if len(where) > 3 else ''}; the checkpoint is damaged")


def _non_finite_tensors(path: str) -> list[tuple[str, str]]:
    """(tensor name, file) of each tensor with a NaN or inf in the checkpoint's safetensors files
    (read again only on this failure path, to name what the file calls it)."""
    from safetensors import safe_open

    found = []
    for f in model_files(path):
        if not f.endswith(".safetensors"):
            continue
        try:
            with safe_open(f, framework="flax") as st:
                for name in st.keys():
                    x = st.get_tensor(name)
                    if np.issubdtype(np.dtype(x.dtype), np.floating) and not bool(np.isfinite(np.asarray(x, np.float32)).all()):
                        found.append((name, os.path.basename(f)))
        except Exception:  # noqa: BLE001 - naming is best effort: the caller still names the parameter
            continue
    return found


def check_templates(cfg: TrainConfig, source: Any, tok: TextTokenizer, rm_tok: TextTokenizer) -> None:
    """Render the first prompt with the policy's chat template (and the reward model's, which
    judges through text when the vocabularies differ), so a chat prompt file with a base model,
    or a template the sandbox rejects, fails here, naming the flag, not after compiling."""
    import jinja2

    first = source[0] if len(source) else None
    if first is None or isinstance(first, str):
        return
    for flag, t in (("policy", tok), ("reward-model", rm_tok)):
        if flag == "reward-model" and not t.chat_template:
            continue  # the host judge joins the turns as plain text then
        try:
            t.apply_chat_template(list(first) + ([{"role": "assistant", "content": "ok"}] if flag != "policy" else []),
                                  add_generation_prompt=flag == "policy")
        except (ValueError, jinja2.TemplateError) as e:
            if flag == "reward-model" and same_vocabulary(tok, rm_tok):
                continue  # the fused judge reads token ids, never its own template
            msg = " ".join(str(e).split())
            raise ValueError(f"--{flag}={getattr(cfg, flag.replace('-', '_'))!r}: cannot render the chat prompts of "
                             f"--prompts={cfg.prompts!r} ({type(e).__name__}: {msg})") from None


def prompt_key(row: Any) -> str:
    """A prompt's content as one comparable string (messages as canonical JSON)."""
    import json

    return row if isinstance(row, str) else json.dumps(row, sort_keys=True, ensure_ascii=False)


def check_held_out_disjoint(cfg: TrainConfig, train_source: Any, held_out: Any) -> None:
    """ValueError with the count when held-out prompts also occur among the training prompts, by
    content (held out means never trained on)."""
    n = len(train_source)
    rows = train_source.__getitems__(range(n)) if hasattr(train_source, "__getitems__") else list(train_source)
    seen = {prompt_key(r) for r in rows}
    overlap = sum(prompt_key(r) in seen for r in held_out.rows)
    if overlap:
        raise ValueError(f"{held_out.flag}: {overlap} of its {len(held_out.rows)} prompts also occur among the "
                         f"{n} training prompts of --prompts (by content); held-out prompts must never be trained "
                         "on: remove them from one of the files")
