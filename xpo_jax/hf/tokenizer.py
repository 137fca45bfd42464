"""Text <-> token ids for Hugging Face checkpoints, without transformers.

`TextTokenizer.from_dir(path)` reads a checkpoint directory the way transformers'
`AutoTokenizer` does for fast tokenizers:

  tokenizer.json         the tokenizer itself (the Rust `tokenizers` library)
  tokenizer_config.json  chat_template, bos/eos/pad/unk tokens (strings or AddedToken dicts)
  special_tokens_map.json  special tokens missing from tokenizer_config.json
  chat_template.jinja    the chat template when tokenizer_config.json has none (newer checkpoints)
  generation_config.json extra end-of-sequence ids (e.g. Llama 3's <|eot_id|>), in `eos_ids`

Chat templates are rendered as in transformers' `apply_chat_template`: a sandboxed jinja2
environment with trim_blocks / lstrip_blocks, the loopcontrols extension, a `raise_exception`
global, a JSON `tojson` filter and `strftime_now`, with the special tokens as variables. A
rendered chat is tokenized without adding special tokens (the template writes them itself);
a plain string prompt is tokenized with them (e.g. Llama's BOS) and gets no template.

Prompts go to the model left-padded to a fixed length (`encode_prompts`): one static shape
for every batch, so the jitted sampler compiles once.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Union

import numpy as np

Message = dict[str, str]
Prompt = Union[str, Sequence[Message]]

TRUNCATION_MODES = ("left", "drop")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_content(value: Any) -> str | None:
    """A special token from a config: a string, an AddedToken dict ({"content": ...}) or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path` ({} when the file is absent); bad content raises ValueError
    naming the file."""
    if not path.exists():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}: invalid JSON (nested too deeply to parse)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def _compile_chat_template(template: str):
    """Compile like transformers: sandboxed, trimmed blocks, raise_exception/tojson/strftime_now."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes (<, >, &, '), which would change tool schemas in prompts.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


class TextTokenizer:
    """A Hugging Face fast tokenizer plus its chat template and special tokens.

    Attributes:
      vocab_size: tokens known to the tokenizer, added tokens included. A model's embedding
        table may be larger (padded, e.g. Qwen2), never smaller.
      bos_id, eos_id: ids of the configured BOS / EOS tokens, or None.
      pad_id: the pad token's id, falling back to eos_id when no pad token is set (as HF
        generation does); None only when neither exists.
      eos_ids: every id that ends a response: eos_id plus generation_config.json's
        eos_token_id(s), in that order, without duplicates.
      chat_template: the jinja2 source, or None for a base model.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        extra_eos_ids: Sequence[int] = (),
        name: str = "tokenizer",
    ):
        """Wrap a `tokenizers.Tokenizer`; `name` identifies it in error messages (the directory)."""
        self.tokenizer = tokenizer
        self.name = name
        self.chat_template = chat_template
        self.special_tokens = {
            key: tok
            for key, tok in zip(_SPECIAL_TOKENS, (bos_token, eos_token, pad_token, unk_token))
            if tok is not None
        }
        self.bos_id = self._special_id("bos_token")
        self.eos_id = self._special_id("eos_token")
        pad_id = self._special_id("pad_token")
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        eos_ids = ([self.eos_id] if self.eos_id is not None else []) + [int(i) for i in extra_eos_ids]
        self.eos_ids = tuple(dict.fromkeys(eos_ids))
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._template = None
        if chat_template:
            import jinja2

            try:
                self._template = _compile_chat_template(chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"{name}: the chat template does not compile (line {e.lineno}: {e.message})") from e

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.name}: {key} {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> TextTokenizer:
        """Load `tokenizer.json` and the configs next to it (see the module docstring)."""
        from tokenizers import Tokenizer

        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.exists():
            raise FileNotFoundError(f"no tokenizer.json in {path} (only fast tokenizers are supported)")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception without the path
            raise ValueError(f"{tokenizer_file}: not a valid tokenizer.json ({e})") from None
        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file)
        special_file = path / "special_tokens_map.json"
        special_map = _read_json(special_file)
        tokens = {}
        for key in _SPECIAL_TOKENS:
            source, value = (config_file, config[key]) if key in config else (special_file, special_map.get(key))
            tokens[key] = _token_content(value)
            if tokens[key] is not None and not isinstance(tokens[key], str):
                raise ValueError(f"{source}: {key} must be a token string or an AddedToken "
                                 f"{{\"content\": ...}} object, got {value!r:.100}")

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            if not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                       and isinstance(t.get("template"), str) for t in template):
                raise ValueError(f"{config_file}: chat_template must be a string or a list of "
                                 f"{{\"name\", \"template\"}} strings, got {template!r:.200}")
            named = {t["name"]: t["template"] for t in template}
            if "default" not in named:
                raise ValueError(f"{path}: no 'default' among the named chat templates {sorted(named)}")
            template = named["default"]
        elif template is not None and not isinstance(template, str):
            raise ValueError(f"{config_file}: chat_template must be a string, got {template!r:.100}")
        if template is None and (path / "chat_template.jinja").exists():
            template = _read_text(path / "chat_template.jinja")

        gen_file = path / "generation_config.json"
        gen_eos = _read_json(gen_file).get("eos_token_id")
        extra_eos = [] if gen_eos is None else [gen_eos] if not isinstance(gen_eos, list) else gen_eos
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        for i in extra_eos:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size:
                raise ValueError(f"{gen_file}: eos_token_id must be a token id or a list of them, in "
                                 f"[0, {vocab_size}); got {gen_eos!r:.100}")
        return cls(
            tokenizer,
            chat_template=template,
            extra_eos_ids=extra_eos,
            name=str(path),
            **tokens,
        )

    # -- text <-> ids ----------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` runs the tokenizer's post-processor (e.g. BOS)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list or a 1-D array), dropping special tokens by default."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the checkpoint's chat template (a string, not tokenized).

        `add_generation_prompt` appends the header that opens the assistant's turn, so sampling
        continues as the assistant. Template errors (`raise_exception`) raise jinja2's TemplateError.
        """
        if self._template is None:
            raise ValueError(
                f"{self.name} has no chat template, so it cannot render chat messages; "
                "use plain string prompts or an instruction-tuned checkpoint"
            )
        if isinstance(messages, str) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError(
                f"chat messages must be a list of {{role, content}} dicts, got {messages!r:.100}"
            )
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Ids of one prompt: a plain string as is, a message list through the chat template."""
        if isinstance(prompt, str):
            return self.encode(prompt)
        # The template already writes BOS and friends; adding them again would double BOS.
        return self.encode(self.apply_chat_template(prompt), add_special_tokens=False)

    def encode_prompts(
        self, rows: Sequence[Prompt], *, max_prompt_length: int, truncation: str = "left"
    ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """Encode a batch of prompts, left-padded to exactly `max_prompt_length`.

        Args:
          rows: prompts, each a plain string or a list of {role, content} messages.
          max_prompt_length: P, the fixed prompt width.
          truncation: for prompts longer than P, "left" keeps their last P tokens (the end of a
            prompt is what the response follows); "drop" removes them from the batch.

        Returns:
          tokens: [B, P] int32, left-padded with pad_id (B = rows kept).
          mask: [B, P] int32, 1 on prompt tokens, 0 on padding.
          stats: {"num_prompts": rows given, "num_truncated", "num_dropped"} for metrics, and
            "kept": the indices of the rows in `tokens`, in order (all of them unless dropped).
        """
        is_int = isinstance(max_prompt_length, (int, np.integer)) and not isinstance(max_prompt_length, bool)
        if not is_int or max_prompt_length <= 0:
            raise ValueError(f"max_prompt_length must be a positive int, got {max_prompt_length!r}")
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"unknown truncation mode {truncation!r}; expected one of {TRUNCATION_MODES}")
        if self.pad_id is None:
            raise ValueError(f"{self.name} has neither a pad nor an eos token to pad prompts with")
        width = int(max_prompt_length)
        kept: list[list[int]] = []
        kept_rows: list[int] = []
        num_truncated = num_dropped = 0
        for i, row in enumerate(rows):
            ids = self.encode_prompt(row)
            if not ids:
                raise ValueError(f"prompt {i} encodes to no tokens: {row!r:.100}")
            if len(ids) > width:
                if truncation == "drop":
                    num_dropped += 1
                    continue
                ids = ids[-width:]
                num_truncated += 1
            kept.append(ids)
            kept_rows.append(i)
        tokens = np.full((len(kept), width), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(kept), width), dtype=np.int32)
        for b, ids in enumerate(kept):
            tokens[b, width - len(ids) :] = ids
            mask[b, width - len(ids) :] = 1
        stats = {"num_prompts": len(rows), "num_truncated": num_truncated, "num_dropped": num_dropped,
                 "kept": kept_rows}
        return tokens, mask, stats

    def __repr__(self) -> str:
        return (
            f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, chat_template={'yes' if self.chat_template else 'no'})"
        )
