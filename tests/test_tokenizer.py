"""Tests for xpo_jax.hf.tokenizer on a tiny byte-level BPE tokenizer trained here (no network)."""
import json
import re

import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from xpo_jax.hf.tokenizer import TextTokenizer

# Qwen2-Instruct's ChatML template (default system prompt when none is given).
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant.",
    "What is the capital of France? Paris is the capital of France.",
    "Write a haiku about the sea, then explain it in one sentence.",
    "system user assistant",
]


def _train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def trained():
    return _train_tokenizer()


def _write_dir(path, tok, config=None, **files):
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (path / name.replace("__", ".")).write_text(text)
    return path


@pytest.fixture
def chat_tok(tmp_path, trained):
    config = {
        "chat_template": QWEN2_TEMPLATE,
        "bos_token": None,
        # An AddedToken dict, as older checkpoints store it.
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "rstrip": False},
        "pad_token": "<|endoftext|>",
    }
    return TextTokenizer.from_dir(_write_dir(tmp_path / "chat", trained, config))


@pytest.fixture
def base_tok(tmp_path, trained):
    # No tokenizer_config.json at all: no template, no pad token.
    return TextTokenizer.from_dir(
        _write_dir(tmp_path / "base", trained, None, special_tokens_map__json={"eos_token": "<|endoftext|>"})
    )


def test_special_tokens_and_vocab(chat_tok, trained):
    assert chat_tok.eos_id == trained.token_to_id("<|im_end|>")
    assert chat_tok.pad_id == trained.token_to_id("<|endoftext|>")
    assert chat_tok.bos_id is None
    assert chat_tok.eos_ids == (chat_tok.eos_id,)
    assert chat_tok.vocab_size == trained.get_vocab_size(with_added_tokens=True)
    assert chat_tok.chat_template == QWEN2_TEMPLATE


def test_pad_falls_back_to_eos(base_tok, trained):
    assert base_tok.eos_id == trained.token_to_id("<|endoftext|>")
    assert base_tok.pad_id == base_tok.eos_id
    assert base_tok.chat_template is None


@pytest.mark.parametrize("text", ["The quick brown fox.", "  Spaces,\ttabs\nand ünïcödé ✓ 42", ""])
def test_round_trip(chat_tok, text):
    ids = chat_tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert chat_tok.decode(ids) == text
    assert chat_tok.decode(np.asarray(ids, np.int32)) == text


def test_decode_skips_special_tokens(chat_tok):
    ids = chat_tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert chat_tok.tokenizer.token_to_id("<|im_start|>") in ids  # parsed as one special token
    assert chat_tok.decode(ids) == "user\nhi"
    assert chat_tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_chat_template_exact(chat_tok):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert chat_tok.apply_chat_template(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert chat_tok.apply_chat_template(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )


def test_template_variables_and_raise_exception(tmp_path, trained):
    # bos/eos reach the template; trim_blocks/lstrip_blocks apply; raise_exception raises.
    template = (
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "  {% if m['role'] == 'assistant' and loop.last %}\n"
        "{{ raise_exception('last turn must be user') }}{% endif %}\n"
        "[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    config = {"chat_template": template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    tok = TextTokenizer.from_dir(_write_dir(tmp_path / "t", trained, config))
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>\n[user] hi<|im_end|>\n[assistant]"
    with pytest.raises(jinja2.TemplateError, match="last turn must be user"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_template_from_jinja_file_and_generation_config(tmp_path, trained):
    # Qwen2-Instruct style: generation_config lists <|im_end|> and <|endoftext|> as stops.
    endoftext, im_end = trained.token_to_id("<|endoftext|>"), trained.token_to_id("<|im_end|>")
    d = _write_dir(
        tmp_path / "j", trained, {"eos_token": "<|endoftext|>"},
        chat_template__jinja=QWEN2_TEMPLATE,
        generation_config__json={"eos_token_id": [im_end, endoftext]},
    )
    tok = TextTokenizer.from_dir(d)
    assert tok.chat_template == QWEN2_TEMPLATE
    assert tok.eos_ids == (endoftext, im_end)  # eos_id first, no duplicates


def test_encode_prompt_plain_vs_chat(chat_tok):
    assert chat_tok.encode_prompt("hello") == chat_tok.encode("hello")
    msgs = [{"role": "user", "content": "hello"}]
    ids = chat_tok.encode_prompt(msgs)
    assert chat_tok.decode(ids, skip_special_tokens=False) == chat_tok.apply_chat_template(msgs)


def test_no_chat_template_errors(base_tok):
    with pytest.raises(ValueError, match="has no chat template"):
        base_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="has no chat template"):
        base_tok.encode_prompts([[{"role": "user", "content": "hi"}]], max_prompt_length=8)
    # Plain prompts still work without a template.
    tokens, mask, _ = base_tok.encode_prompts(["hi"], max_prompt_length=8)
    assert mask.sum() == len(base_tok.encode("hi"))


def test_encode_prompts_left_padding(chat_tok):
    rows = ["The fox.", [{"role": "user", "content": "Paris?"}], "dog"]
    expect = [chat_tok.encode_prompt(r) for r in rows]
    width = max(map(len, expect)) + 3
    tokens, mask, stats = chat_tok.encode_prompts(rows, max_prompt_length=width)
    assert tokens.shape == mask.shape == (3, width)
    assert tokens.dtype == np.int32 and mask.dtype == np.int32
    for b, ids in enumerate(expect):
        pad = width - len(ids)
        assert tokens[b, :pad].tolist() == [chat_tok.pad_id] * pad
        assert tokens[b, pad:].tolist() == ids
        assert mask[b].tolist() == [0] * pad + [1] * len(ids)
    assert stats == {"num_prompts": 3, "num_truncated": 0, "num_dropped": 0, "kept": [0, 1, 2]}


def test_truncation_left_and_drop(chat_tok):
    long = "The quick brown fox jumps over the lazy dog. " * 3
    short = "dog"
    long_ids = chat_tok.encode(long)
    width = len(chat_tok.encode(short)) + 2
    assert len(long_ids) > width

    rows = [long, short, long]
    tokens, mask, stats = chat_tok.encode_prompts(rows, max_prompt_length=width, truncation="left")
    assert tokens.shape == (3, width)
    assert tokens[0].tolist() == long_ids[-width:]  # keeps the end of the prompt
    assert mask[0].all() and mask[2].all()
    assert stats == {"num_prompts": 3, "num_truncated": 2, "num_dropped": 0, "kept": [0, 1, 2]}

    tokens, mask, stats = chat_tok.encode_prompts(rows, max_prompt_length=width, truncation="drop")
    assert tokens.shape == (1, width)
    assert tokens[0][mask[0] == 1].tolist() == chat_tok.encode(short)
    assert stats == {"num_prompts": 3, "num_truncated": 0, "num_dropped": 2, "kept": [1]}

    # A prompt of exactly max_prompt_length is neither truncated nor dropped.
    exact = chat_tok.encode_prompts([long], max_prompt_length=len(long_ids), truncation="drop")
    assert exact[2]["num_dropped"] == 0 and exact[0][0].tolist() == long_ids


def test_encode_prompts_errors(chat_tok):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"max_prompt_length must be a positive int, got {bad!r}"):
            chat_tok.encode_prompts(["hi"], max_prompt_length=bad)
    with pytest.raises(ValueError, match="unknown truncation mode 'right'"):
        chat_tok.encode_prompts(["hi"], max_prompt_length=4, truncation="right")
    with pytest.raises(ValueError, match="prompt 1 encodes to no tokens"):
        chat_tok.encode_prompts(["hi", ""], max_prompt_length=4)
    with pytest.raises(ValueError, match="list of {role, content} dicts"):
        chat_tok.apply_chat_template([{"content": "no role"}])


def test_from_dir_errors(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        TextTokenizer.from_dir(tmp_path / "missing")
    d = _write_dir(tmp_path / "bad", trained, {"eos_token": "<|not_a_token|>"})
    with pytest.raises(ValueError, match=re.escape("eos_token '<|not_a_token|>' is not in the vocabulary")):
        TextTokenizer.from_dir(d)
    d = _write_dir(tmp_path / "named", trained, {"chat_template": [{"name": "tool_use", "template": "x"}]})
    with pytest.raises(ValueError, match="no 'default' among the named chat templates"):
        TextTokenizer.from_dir(d)
    named = {"chat_template": [{"name": "default", "template": QWEN2_TEMPLATE}]}
    d = _write_dir(tmp_path / "named_ok", trained, named)
    assert TextTokenizer.from_dir(d).chat_template == QWEN2_TEMPLATE


def test_no_eos_no_pad(tmp_path, trained):
    tok = TextTokenizer.from_dir(_write_dir(tmp_path / "none", trained, {}))
    assert tok.eos_id is None and tok.pad_id is None and tok.eos_ids == ()
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        tok.encode_prompts(["hi"], max_prompt_length=4)


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", "{not json", r"tokenizer.json: not a valid tokenizer.json \(key must be a string"),
    ("tokenizer.json", b"\x1f\x8b\x08\x00\xff\xfe", r"tokenizer.json: not a valid tokenizer.json \(stream did not contain valid UTF-8"),
    ("tokenizer.json", "", r"tokenizer.json: not a valid tokenizer.json \(EOF while parsing"),
    ("tokenizer_config.json", "{", r"tokenizer_config.json: invalid JSON \(Expecting property name .* at line 1 column 2\)"),
    ("tokenizer_config.json", b"\xff\xfe{}", r"tokenizer_config.json: not UTF-8 text \(byte 0xff at offset 0\)"),
    ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json: expected a JSON object, got list"),
    ("special_tokens_map.json", '{"eos_token": ', "special_tokens_map.json: invalid JSON"),
    ("generation_config.json", "{'eos_token_id': 1}", "generation_config.json: invalid JSON"),
    ("chat_template.jinja", b"\xff{{ messages }}", r"chat_template.jinja: not UTF-8 text \(byte 0xff"),
], ids=["tok-bad-json", "tok-binary", "tok-empty", "config-bad-json", "config-binary", "config-list",
        "special-map-bad-json", "generation-bad-json", "template-binary"])
def test_malformed_files_name_the_path(tmp_path, trained, name, content, message):
    """A malformed checkpoint file raises ValueError naming that file, not a bare JSONDecodeError,
    UnicodeDecodeError or the tokenizers library's path-less Exception."""
    d = _write_dir(tmp_path / "ckpt", trained, None)
    target = d / name
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=re.escape(str(target)) + ": " + message.split(": ", 1)[1]):
        TextTokenizer.from_dir(d)


@pytest.mark.parametrize("files, message", [
    ({"tokenizer_config__json": {"eos_token": 5}},
     r"tokenizer_config.json: eos_token must be a token string or an AddedToken"),
    ({"special_tokens_map__json": {"pad_token": ["<|endoftext|>"]}},
     r"special_tokens_map.json: pad_token must be a token string"),
    ({"tokenizer_config__json": {"chat_template": 5}}, r"tokenizer_config.json: chat_template must be a string, got 5"),
    ({"tokenizer_config__json": {"chat_template": [{"template": "x"}]}},
     r"tokenizer_config.json: chat_template must be a string or a list of \{\"name\", \"template\"\}"),
    ({"generation_config__json": {"eos_token_id": "2"}}, r"generation_config.json: eos_token_id must be a token id"),
    ({"generation_config__json": {"eos_token_id": [2, 1.5]}}, r"generation_config.json: eos_token_id .* got \[2, 1.5\]"),
    ({"generation_config__json": {"eos_token_id": 10 ** 6}}, r"generation_config.json: eos_token_id .* in \[0, \d+\); got 1000000"),
])
def test_bad_config_values_name_the_file(tmp_path, trained, files, message):
    d = _write_dir(tmp_path / "ckpt", trained, None, **files)
    with pytest.raises(ValueError, match=re.escape(str(d)) + "/" + message):
        TextTokenizer.from_dir(d)


def test_tokenizer_json_directory_and_bad_template(tmp_path, trained):
    d = _write_dir(tmp_path / "dir", trained, None)
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{d / 'tokenizer.json'}: not a valid tokenizer.json")):
        TextTokenizer.from_dir(d)
    d = _write_dir(tmp_path / "tmpl", trained, None, chat_template__jinja="{% for %}")
    with pytest.raises(ValueError, match=re.escape(f"{d}: the chat template does not compile (line 1: ")):
        TextTokenizer.from_dir(d)
