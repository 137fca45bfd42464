"""Build a tiny random policy and reward model in Hugging Face format, for end-to-end demos.

    python experiments/make_tiny_hf.py OUT_DIR [--prompts FILE] [--vocab-size N] [--seed S]

writes

    OUT_DIR/policy/        Qwen2ForCausalLM               config.json, model.safetensors, tokenizer
    OUT_DIR/reward_model/  Qwen2ForSequenceClassification config.json, model.safetensors, tokenizer

with our own code only (no torch, no transformers, no network): random weights from
`init_params` / `init_reward_params` written by `save_hf`, and a byte-level BPE tokenizer trained
on the prompt file with the `tokenizers` library. Both directories carry the same tokenizer
(tokenizer.json + tokenizer_config.json with a ChatML chat template, eos <|im_end|>, pad
<|endoftext|>), so `xpo-jax train --policy OUT_DIR/policy --reward-model OUT_DIR/reward_model
--prompts FILE` finds one in each. transformers can load them too (AutoModelForCausalLM,
AutoModelForSequenceClassification, AutoTokenizer).

The models are random: samples are gibberish and rewards arbitrary. The point is to exercise the
whole pipeline -- HF loading, chat templates, sampling, reward-model judging, training -- fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

from xpo_jax.models import ModelConfig, init_params, init_reward_params
from xpo_jax.models.hf import save_hf

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts_tiny.jsonl"

# ChatML (Qwen2-Instruct's template without the default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PAD, IM_START, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def prompt_texts(path: Path) -> list[str]:
    """Every string in a prompts .jsonl ({"prompt": str} or {"messages": [...]} rows), plus the
    role names, so the tokenizer learns the words the chat template writes too."""
    texts = ["system", "user", "assistant"]
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" in row:
                texts.append(row["prompt"])
            for message in row.get("messages", []):
                texts.append(message["content"])
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (as GPT-2 / Qwen2): any text encodes, no unknown token needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, IM_START, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok, out: Path, max_len: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHATML_TEMPLATE,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def tiny_config(vocab_size: int) -> ModelConfig:
    """Qwen2-flavoured (q/k/v bias), tied embeddings, 2 layers of width 64."""
    return ModelConfig(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=16, mlp_dim=128, rope_theta=10000.0, rms_eps=1e-6, qkv_bias=True,
                       tie_embeddings=True, max_seq_len=512).validate()


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    """Build both directories; returns (policy_dir, reward_model_dir)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                        help="prompts .jsonl to train the tokenizer on (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tok = train_tokenizer(prompt_texts(args.prompts), args.vocab_size)
    # The model's vocabulary is exactly the tokenizer's, so every sampled id decodes.
    config = tiny_config(tok.get_vocab_size(with_added_tokens=True))
    special_ids = {"bos_token_id": None, "eos_token_id": tok.token_to_id(EOS),
                   "pad_token_id": tok.token_to_id(PAD)}
    key_policy, key_reward = jax.random.split(jax.random.key(args.seed))

    policy_dir, reward_dir = args.out_dir / "policy", args.out_dir / "reward_model"
    save_hf(policy_dir, config, init_params(config, key_policy), extra_config=special_ids)
    # pad_token_id lets transformers' sequence classification find the last real token.
    save_hf(reward_dir, config, init_reward_params(config, key_reward), kind="reward_model",
            extra_config=special_ids)
    for d in (policy_dir, reward_dir):
        save_tokenizer(tok, d, config.max_seq_len)
        with open(d / "generation_config.json", "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": special_ids["eos_token_id"],
                       "pad_token_id": special_ids["pad_token_id"]}, f, indent=2)
    print(f"policy:       {policy_dir}\nreward model: {reward_dir}\n"
          f"vocab {config.vocab_size}, d_model {config.d_model}, {config.n_layers} layers")
    return policy_dir, reward_dir


if __name__ == "__main__":
    main(sys.argv[1:])
