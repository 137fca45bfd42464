"""Online XPO on real models: a Hugging Face policy, a reward model and a prompt file.

    xpo-jax train --policy DIR --reward-model DIR --prompts FILE.jsonl [--max-new-tokens 64 ...]

The policy checkpoint is both the starting policy and the frozen reference. Prompts are read
through TFDS (array_record, no TensorFlow) by a deterministic, resumable iterator whose position
goes into every checkpoint; they are encoded with the policy's tokenizer (chat rows through its
chat template), left-padded to --max-prompt-length.

The judge. When the reward model reads the policy's token ids (same vocabulary), it runs inside
the fused round: one XLA program per round. When it has its own tokenizer, token ids mean
different things to the two models (TRL's XPOTrainer then indexes out of range or scores garbage,
TRL issue #6955), so the round runs in its two jitted halves with the judge between them on the
host: responses are decoded with the policy's tokenizer and the (prompt, response) conversation is
re-encoded with the reward model's own tokenizer and chat template before scoring.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from xpo_jax.config import TrainConfig
from xpo_jax.models.hf import load_hf
from xpo_jax.models.transformer import RewardModel, Transformer
from xpo_jax.oracles import judge_scores, reward_model_oracle
from xpo_jax.round import RoundFns, make_optimizer, make_round
from xpo_jax.state import Hyperparams, XPOState, initial_state
from xpo_jax.tokenizer import TextTokenizer

Array = jax.Array

DEFAULT_MAX_NEW_TOKENS = 64


def same_vocabulary(a: TextTokenizer, b: TextTokenizer) -> bool:
    """True when both tokenizers map every string to the same ids (same vocab and specials)."""
    return a.vocab_size == b.vocab_size and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


@dataclasses.dataclass
class HFRun:
    """The `Run` interface of xpo_jax.train for checkpoint directories and a prompt file."""

    cfg: TrainConfig
    apply_fn: Callable
    ref_params: Any
    fns: RoundFns
    tx: Any
    max_new_tokens: int
    tokenizer: TextTokenizer
    rm_tokenizer: TextTokenizer
    rm_apply: Callable
    rm_params: Any
    iterator: Any
    fused: bool
    prompt_stats: dict = dataclasses.field(default_factory=lambda: {"num_truncated": 0, "num_dropped": 0})

    has_exact_eval = False
    task = None

    def hparams(self) -> Hyperparams:
        return Hyperparams.from_config(self.cfg)

    def init_state(self, key: Array, hparams: Hyperparams) -> XPOState:
        return initial_state(self.cfg, apply_fn=self.apply_fn, ref_params=self.ref_params, tx=self.tx, key=key,
                             hparams=hparams, prompt_len=self.cfg.max_prompt_length, max_new_tokens=self.max_new_tokens)

    # -- prompts ---------------------------------------------------------------------------

    def next_prompts(self) -> tuple[list, np.ndarray, np.ndarray]:
        """A full batch of encoded prompts; with truncation="drop", over-long ones are skipped and
        replaced from the stream, so the batch shape (and the compiled round) never changes."""
        B, rows, toks, masks = self.cfg.batch_size, [], [], []
        while len(rows) < B:
            batch = next(self.iterator)
            t, m, stats = self.tokenizer.encode_prompts(batch, max_prompt_length=self.cfg.max_prompt_length,
                                                        truncation=self.cfg.truncation)
            self.prompt_stats["num_truncated"] += stats["num_truncated"]
            self.prompt_stats["num_dropped"] += stats["num_dropped"]
            rows += [batch[i] for i in stats["kept"]]
            toks.append(t)
            masks.append(m)
        return rows[:B], np.concatenate(toks)[:B], np.concatenate(masks)[:B]

    def data_position(self) -> dict:
        return {"iterator": self.iterator.state(), "prompt_stats": dict(self.prompt_stats)}

    def restore_data_position(self, position: dict) -> None:
        self.iterator.restore(position["iterator"])
        self.prompt_stats = dict(position.get("prompt_stats", self.prompt_stats))

    # -- judging on the host ---------------------------------------------------------------

    def _rm_inputs(self, rows: list, responses: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
        width = self.cfg.max_prompt_length + 4 * self.max_new_tokens  # fixed: one compilation
        tok = np.full((len(texts), width), self.rm_tokenizer.pad_id, np.int32)
        msk = np.zeros((len(texts), width), np.int32)
        for i, ids in enumerate(texts):
            ids = ids[-width:]
            tok[i, width - len(ids):] = ids
            msk[i, width - len(ids):] = 1
        return tok, msk

    def make_host_step(self, key: Array) -> Callable:
        cfg, fns = self.cfg, self.fns
        round_fn = jax.jit(fns.round_fn, donate_argnums=0)
        make_pairs = jax.jit(fns.make_pairs, donate_argnums=0)
        update = jax.jit(fns.update, donate_argnums=0)
        score = jax.jit(lambda p, t, m: self.rm_apply({"params": p}, t, m))
        judge = jax.jit(lambda k, sy, syt, y, ym, yt, ytm: judge_scores(
            k, sy, syt, y, ym, yt, ytm, eos_id=self.tokenizer.eos_id, bradley_terry=cfg.bradley_terry,
            missing_eos_penalty=cfg.missing_eos_penalty, mask_identical=cfg.mask_identical))

        def step(state):
            rows, prompts, mask = self.next_prompts()
            if self.fused:
                state, metrics = round_fn(state, prompts, mask)
            else:
                state, pairs = make_pairs(state, prompts, mask)
                y, ym = np.asarray(pairs.y.tokens), np.asarray(pairs.y.mask)
                yt, ytm = np.asarray(pairs.yt.tokens), np.asarray(pairs.yt.mask)
                sy = score(self.rm_params, *self._rm_inputs(rows, y, ym))
                syt = score(self.rm_params, *self._rm_inputs(rows, yt, ytm))
                judgement = judge(pairs.judge_key, sy, syt, pairs.y.tokens, pairs.y.mask, pairs.yt.tokens, pairs.yt.mask)
                state, metrics = update(state, pairs, judgement)
            metrics = dict(metrics)
            metrics["data/num_truncated"] = jnp.float32(self.prompt_stats["num_truncated"])
            metrics["data/num_dropped"] = jnp.float32(self.prompt_stats["num_dropped"])
            return state, metrics

        return step


def build_hf_run(cfg: TrainConfig) -> HFRun:
    from xpo_jax.data import PromptIterator, build_prompt_dataset

    cfg.validate()
    pol_cfg, params, kind = load_hf(cfg.policy)
    if kind != "causal_lm":
        raise ValueError(f"--policy={cfg.policy!r} holds a {kind}, expected a *ForCausalLM checkpoint")
    rm_cfg, rm_params, rm_kind = load_hf(cfg.reward_model)
    if rm_kind != "reward_model":
        raise ValueError(f"--reward-model={cfg.reward_model!r} holds a {rm_kind}, expected a *ForSequenceClassification checkpoint")
    tok = TextTokenizer.from_dir(cfg.policy)
    rm_tok = TextTokenizer.from_dir(cfg.reward_model)
    shared = same_vocabulary(tok, rm_tok) and rm_cfg.vocab_size == pol_cfg.vocab_size
    fused = shared if cfg.fuse_judge is None else cfg.fuse_judge
    if fused and not shared:
        raise ValueError(
            f"--fuse-judge: the reward model's tokenizer ({cfg.reward_model}) differs from the policy's "
            f"({cfg.policy}); its ids would be scored as garbage. Leave --fuse-judge unset to judge on the host."
        )
    n = cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    need = cfg.max_prompt_length + n
    if pol_cfg.max_seq_len < need:
        raise ValueError(f"--max-prompt-length + --max-new-tokens = {need} exceeds the policy's max_seq_len {pol_cfg.max_seq_len}")
    model, rm = Transformer(pol_cfg), RewardModel(rm_cfg)
    oracle = reward_model_oracle(rm.apply, rm_params, eos_id=tok.eos_id, bradley_terry=cfg.bradley_terry,
                                 missing_eos_penalty=cfg.missing_eos_penalty, mask_identical=cfg.mask_identical) if fused else None
    tx, schedule = make_optimizer(cfg)
    fns = make_round(cfg, apply_fn=model.apply, eos_id=tok.eos_id, pad_id=tok.pad_id, max_new_tokens=n,
                     oracle=oracle, lr_schedule=schedule)
    files = [p for p in cfg.prompts.split(",") if p]
    source = build_prompt_dataset(files, os.path.join(cfg.run_dir, cfg.name, "data"))
    it = PromptIterator(source, cfg.batch_size, seed=cfg.seed)
    return HFRun(cfg, model.apply, params, fns, tx, n, tok, rm_tok, rm.apply, rm_params, it, fused)
