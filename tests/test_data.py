"""Tests for xpo_jax.hf.data: TFDS array_record prompt datasets (no TensorFlow) and PromptIterator."""
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from xpo_jax.hf.data import PromptDataSource, PromptIterator, build_prompt_dataset, num_examples, prompt_from_row

REPO = Path(__file__).resolve().parents[1]
U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, columns):
    pq.write_table(pa.table(columns), path)
    return path


def prepared_configs(data_dir):
    """Config names with a complete prepared version (TFDS renames it into place when done)."""
    return sorted(p.parents[1].name for p in Path(data_dir).glob("prompt_files/*/1.0.0/dataset_info.json"))


# ---------------------------------------------------------------------------------------------
# Building and reading
# ---------------------------------------------------------------------------------------------


def test_jsonl_round_trip_without_tensorflow(tmp_path):
    rows = [
        {"prompt": "Say hi."},
        {"messages": [S("Be brief."), U("2+2?")]},
        {"prompt": "ünïcödé ✓ and \"quotes\"\nnewline"},
        {"messages": [U("a"), A("b"), U("c"), A("d")]},  # trailing answer is not prompt
    ]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    source = build_prompt_dataset(src, tmp_path / "tfds")
    assert isinstance(source, PromptDataSource)
    assert len(source) == source.num_examples == num_examples(source) == 4
    expected = ["Say hi.", [S("Be brief."), U("2+2?")], rows[2]["prompt"], [U("a"), A("b"), U("c")]]
    assert list(source) == expected
    assert source[1] == [S("Be brief."), U("2+2?")]
    assert source.__getitems__([3, 0]) == [[U("a"), A("b"), U("c")], "Say hi."]
    with pytest.raises(IndexError):
        source[4]
    # Stored as array_record, read back through TFDS' data source, and TF was never needed.
    (config,) = prepared_configs(tmp_path / "tfds")
    assert config.startswith("p-")
    files = list((tmp_path / "tfds" / "prompt_files" / config / "1.0.0").glob("*.array_record*"))
    assert files
    assert type(source.raw).__name__ == "ArrayRecordDataSource"
    assert "tensorflow" not in sys.modules
    # The prepared data also opens by name with plain TFDS.
    raw = tfds.data_source(f"prompt_files/{config}", data_dir=str(tmp_path / "tfds"), split="train")
    assert len(raw) == 4 and raw[0]["prompt"] == b"Say hi." and not raw[0]["is_chat"]
    assert "tensorflow" not in sys.modules


def test_parquet_plain_and_messages(tmp_path):
    plain = write_parquet(tmp_path / "plain.parquet", {"prompt": ["one", "two"], "extra": [1, 2]})
    chat = write_parquet(tmp_path / "chat.parquet", {"messages": [[U("x")], [S("s"), U("y"), A("z")]]})
    source = build_prompt_dataset([plain, chat], tmp_path / "tfds", name="mixed")
    assert list(source) == ["one", "two", [U("x")], [S("s"), U("y")]]
    assert prepared_configs(tmp_path / "tfds")[0].startswith("mixed-")


def test_ultrafeedback_layout(tmp_path):
    # The column layout of HuggingFaceH4/ultrafeedback_binarized (train_prefs).
    q1, q2 = "How do I boil an egg?", "Name a prime."
    table = {
        "prompt": [q1, q2],
        "prompt_id": ["a1", "b2"],
        "chosen": [[U(q1), A("Boil it 7 minutes.")], [U(q2), A("7")]],
        "rejected": [[U(q1), A("No idea.")], [U(q2), A("8")]],
        "messages": [[U(q1), A("Boil it 7 minutes.")], [U(q2), A("7")]],
        "score_chosen": [8.0, 9.0],
        "score_rejected": [2.0, 1.0],
    }
    source = build_prompt_dataset(write_parquet(tmp_path / "uf.parquet", table), tmp_path / "tfds")
    assert list(source) == [[U(q1)], [U(q2)]]
    # Without `messages`, the prompt comes from `chosen` up to its last user turn.
    del table["messages"]
    source = build_prompt_dataset(write_parquet(tmp_path / "uf2.parquet", table), tmp_path / "tfds")
    assert list(source) == [[U(q1)], [U(q2)]]


def test_prompt_layouts():
    where = "f.jsonl: line 1"
    assert prompt_from_row({"prompt": "p"}, where) == "p"
    # TRL standard preference rows: string prompt, string completions -> plain prompt.
    assert prompt_from_row({"prompt": "p", "chosen": "c", "rejected": "r"}, where) == "p"
    # TRL conversational: prompt is a message list; chosen holds only the answer.
    assert prompt_from_row({"prompt": [U("q")], "chosen": [A("c")]}, where) == [U("q")]
    # String prompt with answer-only chosen: the string prompt wins.
    assert prompt_from_row({"prompt": "p", "chosen": [A("c")]}, where) == "p"
    # Extra message fields are dropped.
    assert prompt_from_row({"messages": [{"role": "user", "content": "q", "name": "n"}]}, where) == [U("q")]


def test_several_files_and_glob(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / f"part-{i}.jsonl", [{"prompt": f"{i}-{j}"} for j in range(2)])
    source = build_prompt_dataset(str(tmp_path / "part-*.jsonl"), tmp_path / "tfds", name="parts")
    assert list(source) == [f"{i}-{j}" for i in range(3) for j in range(2)]


def test_shipped_tiny_prompts(tmp_path):
    source = build_prompt_dataset(REPO / "experiments" / "data" / "prompts_tiny.jsonl", tmp_path / "tfds")
    prompts = list(source)
    assert len(prompts) == 64
    chats = [p for p in prompts if isinstance(p, list)]
    assert 0 < len(chats) < 64
    assert all(c[-1]["role"] == "user" for c in chats)


def test_idempotent_and_rebuild_on_change(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    data_dir = tmp_path / "tfds"
    build_prompt_dataset(src, data_dir)
    (config,) = prepared_configs(data_dir)
    record = next((data_dir / "prompt_files" / config / "1.0.0").glob("*.array_record*"))
    stamp = record.stat().st_mtime_ns
    os.utime(src)  # touching the file (new mtime, same bytes) must not rebuild
    source = build_prompt_dataset(src, data_dir)
    assert list(source) == ["a", "b"]
    assert prepared_configs(data_dir) == [config] and record.stat().st_mtime_ns == stamp

    write_jsonl(src, [{"prompt": "a"}, {"prompt": "c"}, {"prompt": "d"}])
    source = build_prompt_dataset(src, data_dir)
    assert list(source) == ["a", "c", "d"]
    assert len(prepared_configs(data_dir)) == 2


def test_failed_build_leaves_nothing_prepared(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"text": "no prompt"}])
    with pytest.raises(ValueError, match="line 2: no prompt"):
        build_prompt_dataset(src, tmp_path / "tfds")
    assert prepared_configs(tmp_path / "tfds") == []
    assert not list((tmp_path / "tfds").rglob("*.array_record*"))
    write_jsonl(src, [{"prompt": "a"}, {"prompt": "b"}])
    assert list(build_prompt_dataset(src, tmp_path / "tfds")) == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_file_errors(tmp_path):
    data_dir = tmp_path / "tfds"
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_prompt_dataset(missing, data_dir)
    with pytest.raises(FileNotFoundError, match="no prompt files match"):
        build_prompt_dataset(str(tmp_path / "*.parquet"), data_dir)
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\nhi\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}: unsupported prompt file extension '.csv'")):
        build_prompt_dataset(csv, data_dir)
    with pytest.raises(ValueError, match="is a directory"):
        build_prompt_dataset(tmp_path, data_dir)
    with pytest.raises(ValueError, match="no prompt files given"):
        build_prompt_dataset([], data_dir)
    with pytest.raises(ValueError, match="dataset name 'bad/name'"):
        build_prompt_dataset(write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a"}]), data_dir, name="bad/name")


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=re.escape(f"empty prompt dataset: no rows in {empty}")):
        build_prompt_dataset(empty, tmp_path / "tfds")
    assert prepared_configs(tmp_path / "tfds") == []


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "hi"}, r"line 2: no prompt: expected a non-empty 'prompt' string .* fields: \['text'\]\)"),
        ({"prompt": "   "}, "line 2: no prompt"),
        ({"messages": []}, "line 2: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"line 2: 'messages'\[0\] is not a \{role, content\} message"),
        ({"messages": [S("s"), A("a")]}, "line 2: 'messages' has no user turn"),
        ({"prompt": [A("a")]}, "line 2: 'prompt' has no user turn"),
        (["not", "an", "object"], "line 2: expected an object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(ValueError, match=re.escape(str(src)) + ": " + message):
        build_prompt_dataset(src, tmp_path / "tfds")


def test_invalid_json_and_parquet_errors(tmp_path):
    src = tmp_path / "broken.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=re.escape(f"{src}: line 2: invalid JSON")):
        build_prompt_dataset(src, tmp_path / "tfds")
    no_cols = write_parquet(tmp_path / "nocols.parquet", {"text": ["a"]})
    with pytest.raises(ValueError, match=re.escape(f"{no_cols}: no 'prompt', 'messages' or 'chosen' column")):
        build_prompt_dataset(no_cols, tmp_path / "tfds")
    bad_row = write_parquet(tmp_path / "badrow.parquet", {"prompt": ["a", None, "c"]})
    with pytest.raises(ValueError, match=re.escape(f"{bad_row}: row 1: no prompt")):
        build_prompt_dataset(bad_row, tmp_path / "tfds")


def test_binary_jsonl_names_file_and_line(tmp_path):
    """A gzipped (or otherwise binary) file named .jsonl: a ValueError naming file and line, not a
    raw UnicodeDecodeError."""
    import gzip
    gz = tmp_path / "prompts.jsonl"
    gz.write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 50))
    with pytest.raises(ValueError, match=re.escape(f"{gz}: line 1: not UTF-8 text (byte 0x8b")):
        build_prompt_dataset(gz, tmp_path / "tfds")
    # The bad line is the one named, also after good lines.
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{mixed}: line 2: not UTF-8 text (byte 0xe9")):
        build_prompt_dataset(mixed, tmp_path / "tfds")
    assert prepared_configs(tmp_path / "tfds") == []


def test_utf8_bom_is_accepted(tmp_path):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "h\u00e9"}\n'.encode())
    assert list(build_prompt_dataset(src, tmp_path / "tfds")) == ["h\u00e9"]


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a\\ud800b"}\n', r"line 1: the prompt text is not valid Unicode \(surrogates not allowed"),
    ('{"messages": [{"role": "user", "content": "\\udfff"}]}\n', "line 1: the prompt text is not valid Unicode"),
    ("[" * 100_000 + "]" * 100_000 + "\n", r"line 1: invalid JSON \(nested too deeply"),
], ids=["lone-surrogate-prompt", "lone-surrogate-message", "deep-nesting"])
def test_malformed_jsonl_names_file_and_line(tmp_path, text, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(src)) + ": " + message):
        build_prompt_dataset(src, tmp_path / "tfds")


def test_unreadable_parquet_names_file(tmp_path):
    data_dir = tmp_path / "tfds"
    good = write_parquet(tmp_path / "good.parquet", {"prompt": [f"prompt {i} " * 20 for i in range(500)]})
    data = good.read_bytes()
    cases = {
        "random.parquet": os.urandom(2000),
        "text.parquet": b"prompt\nhello\n",
        "empty.parquet": b"",
        "truncated.parquet": data[: len(data) // 2],
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable Parquet file (ArrowInvalid")):
            build_prompt_dataset(path, data_dir)
    # Valid footer, corrupt data pages: the error comes while reading rows.
    corrupt = bytearray(data)
    corrupt[100:400] = b"\xff" * 300
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=re.escape(f"{path}: corrupt Parquet data at or after row 0")):
        build_prompt_dataset(path, data_dir)
    assert prepared_configs(data_dir) == []


# ---------------------------------------------------------------------------------------------
# PromptIterator
# ---------------------------------------------------------------------------------------------


def take(it, k):
    return [next(it) for _ in range(k)]


def test_iterator_over_tfds_source(tmp_path):
    rows = [{"prompt": f"p{i}"} if i % 3 else {"messages": [U(f"m{i}")]} for i in range(10)]
    source = build_prompt_dataset(write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "tfds")
    it = PromptIterator(source, 4, seed=3)
    batches = take(it, 2)
    assert all(len(b) == 4 for b in batches)
    order = np.random.default_rng([3, 0]).permutation(10)
    assert batches[0] + batches[1] == [source[int(i)] for i in order[:8]]
    assert it.state() == {"epoch": 1, "index": 0}  # 10 % 4 = 2 prompts dropped, epoch over
    assert "tensorflow" not in sys.modules


def test_determinism_and_per_epoch_reshuffle():
    source = [f"p{i}" for i in range(12)]
    a = take(PromptIterator(source, 4, seed=7), 9)
    b = take(PromptIterator(source, 4, seed=7), 9)
    c = take(PromptIterator(source, 4, seed=8), 9)
    assert a == b and a != c
    epochs = [sum(a[3 * e : 3 * e + 3], []) for e in range(3)]
    for epoch in epochs:  # every epoch is a permutation of the whole set ...
        assert sorted(epoch) == sorted(source)
    assert epochs[0] != epochs[1] != epochs[2]  # ... in a new order


def test_no_shuffle_and_remainder():
    source = list(range(10))
    it = PromptIterator(source, 4, seed=0, shuffle=False, drop_remainder=False)
    assert take(it, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]
    it = PromptIterator(source, 4, seed=0, shuffle=False, drop_remainder=True)
    assert take(it, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    # A shuffled epoch without drop_remainder still serves every prompt exactly once.
    it = PromptIterator(source, 4, seed=1, drop_remainder=False, num_epochs=1)
    assert sorted(sum(list(it), [])) == source


def test_num_epochs_stops():
    it = PromptIterator(list(range(6)), 3, seed=0, num_epochs=2)
    assert len(list(it)) == 4
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_exact_resume(drop_remainder):
    source = [f"p{i}" for i in range(11)]
    kwargs = dict(seed=5, drop_remainder=drop_remainder)
    uninterrupted = take(PromptIterator(source, 3, **kwargs), 12)

    it = PromptIterator(source, 3, **kwargs)
    head = take(it, 5)
    saved = json.loads(json.dumps(it.state()))  # as a checkpoint would store it
    resumed = PromptIterator(source, 3, state=saved, **kwargs)
    assert head + take(resumed, 7) == uninterrupted

    # restore() on a fresh iterator, with numpy scalars as an orbax checkpoint returns them.
    other = PromptIterator(source, 3, **kwargs)
    other.restore({k: np.int64(v) for k, v in saved.items()})
    assert take(other, 7) == uninterrupted[5:]


def test_iterator_errors():
    source = list(range(5))
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bad!r}"):
            PromptIterator(source, bad, seed=0)
    with pytest.raises(ValueError, match=r"batch_size 6 is larger than the dataset \(5 prompts\)"):
        PromptIterator(source, 6, seed=0)
    assert take(PromptIterator(source, 6, seed=0, drop_remainder=False), 1)[0].__len__() == 5
    with pytest.raises(ValueError, match="the prompt source is empty"):
        PromptIterator([], 1, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        PromptIterator(source, 1, seed=-1)
    with pytest.raises(ValueError, match="num_epochs must be positive"):
        PromptIterator(source, 1, seed=0, num_epochs=0)
    it = PromptIterator(source, 2, seed=0)
    with pytest.raises(ValueError, match="must be a dict with int 'epoch' and 'index'"):
        it.restore({"epoch": 0})
    with pytest.raises(ValueError, match="out of range for 5 prompts"):
        it.restore({"epoch": 0, "index": 4})  # only 4 of 5 are served per epoch with batch 2


class SpySource(list):
    """A list (so: `__getitem__` only) that records every index read."""

    def __init__(self, items):
        super().__init__(items)
        self.reads = []

    def __getitem__(self, i):
        self.reads.append([i])
        return super().__getitem__(i)


class BatchedSpySource(SpySource):
    """Also has the batched `__getitems__` (as `PromptDataSource`): one recorded read per call."""

    def __getitems__(self, indices):
        self.reads.append(list(indices))
        return [list.__getitem__(self, i) for i in indices]


def _splits(batch_size, rng):
    """A random split of range(batch_size) into contiguous slices (some empty, one open-ended)."""
    cuts = sorted(rng.integers(0, batch_size + 1, size=rng.integers(1, 4)).tolist())
    bounds = [0] + cuts + [None]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("drop_remainder", [True, False])
@pytest.mark.parametrize("source_cls", [BatchedSpySource, SpySource])
def test_next_rows_hosts_together_read_the_batch(source_cls, drop_remainder):
    """Three "hosts", each with its own iterator (same seed, same resumed state) and its own
    fixed slice: together they read the one-iterator batch, over several epochs; their states
    always agree with it; and each reads only its own rows from the source."""
    n, batch_size = 23, 5
    kwargs = dict(seed=4, drop_remainder=drop_remainder, state={"epoch": 1, "index": 5})
    whole = PromptIterator([f"p{i}" for i in range(n)], batch_size, **kwargs)
    hosts = [slice(0, 2), slice(2, 3), slice(3, None)]
    sources = [source_cls([f"p{i}" for i in range(n)]) for _ in hosts]
    its = [PromptIterator(src, batch_size, **kwargs) for src in sources]
    for step in range(20):  # 4 epochs
        start, order = whole.state()["index"], whole._epoch_order().copy()
        batch = next(whole)
        parts = [it.next_rows(rows) for it, rows in zip(its, hosts)]
        assert sum(parts, []) == batch, step
        assert all(it.state() == whole.state() for it in its), step
        for src, rows in zip(sources, hosts):
            want = [int(i) for i in order[start : start + len(batch)][rows]]
            if source_cls is BatchedSpySource:
                assert src.reads == ([want] if want else []), step
            else:
                assert src.reads == [[i] for i in want], step
            src.reads.clear()
    assert whole.state()["epoch"] >= 5


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_next_rows_any_contiguous_split(drop_remainder):
    """For random splits of each batch into contiguous slices, iterators created from the same
    state and each reading one slice return, concatenated, the one-iterator batch."""
    n, batch_size = 17, 6
    rng = np.random.default_rng(1)
    source = [f"p{i}" for i in range(n)]
    kwargs = dict(seed=11, drop_remainder=drop_remainder)
    whole = PromptIterator(source, batch_size, **kwargs)
    for step in range(15):  # several epochs
        state = whole.state()
        batch = next(whole)
        split = _splits(batch_size, rng)
        spies = [BatchedSpySource(source) for _ in split]
        parts = []
        for spy, rows in zip(spies, split):
            it = PromptIterator(spy, batch_size, state=state, **kwargs)
            parts.append(it.next_rows(rows))
            assert it.state() == whole.state()
            assert spy.reads == ([[source.index(p) for p in parts[-1]]] if parts[-1] else [])
        assert sum(parts, []) == batch, (step, split)
    assert whole.state()["epoch"] >= 4


def test_next_equals_next_rows_of_everything():
    source = [f"p{i}" for i in range(10)]
    a = PromptIterator(source, 3, seed=2, drop_remainder=False, num_epochs=2)
    b = PromptIterator(source, 3, seed=2, drop_remainder=False, num_epochs=2)
    assert list(a) == [b.next_rows(slice(None)) for _ in range(8)]
    with pytest.raises(StopIteration):
        b.next_rows(slice(0, 1))


def test_next_rows_reads_only_its_rows_over_tfds(tmp_path, monkeypatch):
    rows = [{"prompt": f"p{i}"} for i in range(9)]
    source = build_prompt_dataset(write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "tfds")
    reads = []
    real = source.raw.__getitems__
    monkeypatch.setattr(source.raw, "__getitems__", lambda idx: reads.append(list(idx)) or real(idx),
                        raising=False)
    it = PromptIterator(source, 4, seed=0)
    order = np.random.default_rng([0, 0]).permutation(9)
    assert it.next_rows(slice(1, 3)) == [f"p{i}" for i in order[1:3]]
    assert reads == [[int(i) for i in order[1:3]]]
    assert it.state() == {"epoch": 0, "index": 4}


def test_next_rows_errors():
    it = PromptIterator(list(range(6)), 3, seed=0)
    for bad in ([0, 1], 1, range(2)):
        with pytest.raises(TypeError, match="rows must be a slice"):
            it.next_rows(bad)
    with pytest.raises(TypeError, match=r"rows.stop must be an int or None, got 1.5"):
        it.next_rows(slice(0, 1.5))
    with pytest.raises(ValueError, match="step cannot be zero"):
        it.next_rows(slice(0, 2, 0))
    assert it.state() == {"epoch": 0, "index": 0}  # a refused call does not advance
