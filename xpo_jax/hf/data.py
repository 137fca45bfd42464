"""Prompt datasets: local JSONL / Parquet files -> TFDS array_record -> a host-side batch iterator.

Online preference optimisation only needs prompts (responses are sampled each round), so a
dataset here is a list of prompts, each either a plain string or a chat conversation (a list of
{role, content} messages ending with a user turn). The pipeline:

    build_prompt_dataset(files, data_dir)   TFDS builder `PromptFiles` writes array_record files
                                            once per distinct file content, read back through
                                            `as_data_source()` (random access, no TensorFlow)
    PromptIterator(source, batch_size, seed) deterministic, per-epoch shuffled, resumable batches
                                            of decoded rows (str | list[dict])

Accepted row layouts (JSONL objects or Parquet rows), tried in this order:
  - `messages`: a chat; kept up to and including the last user turn (later assistant turns are
    responses, not prompt). This also covers UltraFeedback, whose `messages` is [user, assistant].
  - `prompt` as a list of messages (TRL's conversational prompt-only format): same cut.
  - `chosen` as a list of messages containing a user turn (preference layouts without
    `messages`): same cut.
  - `prompt` as a non-empty string: a plain prompt (no chat template will be applied).

Chat prompts are stored as the JSON text of their messages with an `is_chat` flag, so they
round-trip exactly. TFDS writes array_record and reads it back without TensorFlow (checked with
tensorflow-datasets 4.9.10 and no `tensorflow` installed): `GeneratorBasedBuilder` serialises
examples with its own protobuf code, and `ArrayRecordDataSource` decodes them with numpy.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import tensorflow_datasets as tfds

Prompt = Union[str, list[dict[str, str]]]

SUPPORTED_EXTENSIONS = (".jsonl", ".parquet")
_SPLIT = "train"


# ---------------------------------------------------------------------------------------------
# Reading source files
# ---------------------------------------------------------------------------------------------


def _messages(value: Any, where: str, key: str) -> list[dict[str, str]]:
    """Validate a list of {role, content} messages and keep only those two fields."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: '{key}' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(
                f"{where}: '{key}'[{i}] is not a {{role, content}} message with string fields: {m!r:.100}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _up_to_last_user_turn(messages: list[dict[str, str]], where: str, key: str) -> list[dict[str, str]]:
    """The prompt part of a conversation: everything up to and including the last user turn."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError(f"{where}: '{key}' has no user turn, so there is no prompt to answer")
    return messages[: last_user + 1]


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def prompt_from_row(row: Any, where: str) -> Prompt:
    """Extract the prompt of one source row (see the module docstring for the layouts).

    `where` names the file and row for error messages, e.g. "prompts.jsonl: line 3".
    """
    prompt = _extract_prompt(row, where)
    _check_unicode(prompt, where)
    return prompt


def _check_unicode(prompt: Prompt, where: str) -> None:
    """Refuse text that cannot be stored as UTF-8: a lone surrogate, which JSON can spell as an
    escape ("\\ud800") and which would otherwise fail deep inside the TFDS writer."""
    texts = [prompt] if isinstance(prompt, str) else [v for m in prompt for v in m.values()]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{where}: the prompt text is not valid Unicode ({e.reason}: {text[e.start:e.end]!r} at "
                f"character {e.start}); fix or drop the row"
            ) from None


def _extract_prompt(row: Any, where: str) -> Prompt:
    if not isinstance(row, dict):
        raise ValueError(
            f"{where}: expected an object with a 'prompt' or 'messages' field, got {type(row).__name__}"
        )
    if row.get("messages") is not None:
        return _up_to_last_user_turn(_messages(row["messages"], where, "messages"), where, "messages")
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return _up_to_last_user_turn(_messages(prompt, where, "prompt"), where, "prompt")
    chosen = row.get("chosen")
    if _is_message_list(chosen):
        chosen = _messages(chosen, where, "chosen")
        if any(m["role"] == "user" for m in chosen):
            return _up_to_last_user_turn(chosen, where, "chosen")
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    raise ValueError(
        f"{where}: no prompt: expected a non-empty 'prompt' string or a 'messages' list of "
        f"{{role, content}} messages (row fields: {sorted(row)})"
    )


def _read_jsonl(path: Path) -> Iterator[Prompt]:
    # Read bytes and decode line by line, so that a decoding error names its line (a text-mode
    # file decodes in blocks, ahead of the line being parsed). A UTF-8 byte-order mark is allowed.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}: line {lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at byte {e.start + 1} of the "
                    f"line); a JSONL prompt file must be UTF-8 JSON, one object per line -- is it a "
                    f"binary file?"
                ) from None
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise ValueError(f"{where}: invalid JSON (nested too deeply to parse)") from None
            yield prompt_from_row(row, where)


def _read_parquet(path: Path) -> Iterator[Prompt]:
    try:
        import pyarrow.parquet as pq  # a tensorflow-datasets dependency; imported only when needed
    except ImportError as e:  # pragma: no cover - pyarrow ships with tfds
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
    import pyarrow as pa

    # pyarrow's errors (ArrowInvalid for a file that is not Parquet, OSError for corrupt pages,
    # UnicodeDecodeError for invalid strings) do not name the file; re-raise them with it.
    unreadable = (pa.ArrowException, OSError, UnicodeDecodeError)
    try:
        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
    except unreadable as e:
        raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    # Read only the prompt columns: preference sets also hold long `chosen`/`rejected` responses.
    columns = [c for c in ("prompt", "messages", "chosen") if c in names]
    if not columns:
        raise ValueError(f"{path}: no 'prompt', 'messages' or 'chosen' column (columns: {names})")
    row_index = 0
    batches = file.iter_batches(columns=columns)
    while True:
        try:
            batch = next(batches, None)
            rows = None if batch is None else batch.to_pylist()
        except unreadable as e:
            raise ValueError(
                f"{path}: corrupt Parquet data at or after row {row_index} ({type(e).__name__}: {e})"
            ) from None
        if rows is None:
            return
        for row in rows:
            yield prompt_from_row(row, f"{path}: row {row_index}")
            row_index += 1


def read_prompt_files(paths: Sequence[str | os.PathLike]) -> list[Prompt]:
    """All prompts of `paths`, in file then row order (JSONL lines are 1-based, Parquet rows 0-based)."""
    prompts: list[Prompt] = []
    for path in resolve_paths(paths):
        reader = _read_jsonl if path.suffix == ".jsonl" else _read_parquet
        prompts.extend(reader(path))
    return prompts


def resolve_paths(path_or_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand globs and check that every path is an existing file with a supported extension."""
    if isinstance(path_or_paths, (str, os.PathLike)):
        path_or_paths = [path_or_paths]
    if not path_or_paths:
        raise ValueError("no prompt files given")
    paths: list[Path] = []
    for p in path_or_paths:
        p = os.fspath(p)
        if not os.path.exists(p) and any(ch in p for ch in "*?["):
            matches = sorted(glob.glob(p))
            if not matches:
                raise FileNotFoundError(f"no prompt files match {p}")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(p))
    for path in paths:
        if path.is_dir():
            raise ValueError(
                f"{path} is a directory; pass the prompt files (or a glob such as {path}/*.parquet)"
            )
        if not path.exists():
            raise FileNotFoundError(f"prompt file not found: {path}")
        if path.suffix not in SUPPORTED_EXTENSIONS:
            raise ValueError(
                f"{path}: unsupported prompt file extension {path.suffix!r}; "
                f"expected one of {SUPPORTED_EXTENSIONS}"
            )
    return paths


def hash_files(paths: Sequence[Path]) -> str:
    """sha256 over the files' contents, in order: the dataset's identity (not names or mtimes)."""
    digest = hashlib.sha256()
    for path in paths:
        file_digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                file_digest.update(chunk)
        # Hash per-file digests so that moving bytes between files changes the result.
        digest.update(file_digest.digest())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The TFDS builder
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class PromptFilesConfig(tfds.core.BuilderConfig):
    """One prepared prompt dataset: its source files (the config name carries their hash)."""

    sources: tuple[str, ...] = ()


class PromptFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder turning local JSONL / Parquet prompt files into one `train` split.

    Features: `prompt` (text; the JSON of the messages for chat rows) and `is_chat` (bool).
    Examples keep file then row order (`disable_shuffling`): shuffling is the iterator's job,
    and a stable order makes `source[i]` mean row i. Not registered in the TFDS registry
    (`skip_registration`): configs are made per file set by `build_prompt_dataset`, and the
    prepared data can still be opened by name with `tfds.data_source("prompt_files/<config>",
    data_dir=...)`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Prompt text plus is_chat flag, file order."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Prompts read from local JSONL / Parquet files.",
            features=tfds.features.FeaturesDict(
                {"prompt": tfds.features.Text(), "is_chat": tfds.features.Scalar(dtype=np.bool_)}
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        if not isinstance(config, PromptFilesConfig) or not config.sources:
            raise ValueError("PromptFiles needs a PromptFilesConfig with sources; use build_prompt_dataset")
        # Read (and validate) everything before TFDS opens its writers, so a bad row fails fast
        # with our error and an empty file set is refused instead of producing an empty split.
        prompts = read_prompt_files(config.sources)
        if not prompts:
            raise ValueError(f"empty prompt dataset: no rows in {', '.join(config.sources)}")
        return {_SPLIT: self._generate_examples(prompts)}

    def _generate_examples(self, prompts: list[Prompt]):
        for i, prompt in enumerate(prompts):
            is_chat = not isinstance(prompt, str)
            text = json.dumps(prompt, ensure_ascii=False) if is_chat else prompt
            yield i, {"prompt": text, "is_chat": is_chat}


def decode_example(example: dict[str, Any]) -> Prompt:
    """A stored example (as returned by a TFDS data source) -> str or list of messages."""
    text = example["prompt"]
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return json.loads(text) if bool(example["is_chat"]) else text


class PromptDataSource(Sequence):
    """Random-access prompts: wraps a TFDS data source and decodes its examples.

    `source[i]` is prompt i (a str or a list of {role, content} dicts); `raw` is the TFDS
    `ArrayRecordDataSource` underneath.
    """

    def __init__(self, raw: Any):
        self.raw = raw

    @property
    def num_examples(self) -> int:
        return len(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> Prompt:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"prompt index {index} out of range for {len(self)} prompts")
        return decode_example(self.raw[index])

    def __getitems__(self, indices: Sequence[int]) -> list[Prompt]:
        """Batched read (one array_record call for the whole batch)."""
        return [decode_example(e) for e in self.raw.__getitems__([int(i) for i in indices])]

    def __iter__(self) -> Iterator[Prompt]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"PromptDataSource({self.raw!r}, num_examples={len(self)})"


_NAME_OK = re.compile(r"^[A-Za-z0-9_.]+$")


def build_prompt_dataset(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    data_dir: str | os.PathLike,
    *,
    name: str | None = None,
) -> PromptDataSource:
    """Prepare (once) and open a prompt dataset made from local JSONL / Parquet files.

    Args:
      path_or_paths: one file, a glob (e.g. "data/train-*.parquet") or a list of them; rows are
        concatenated in the given order.
      data_dir: TFDS data directory; the dataset lands in
        `data_dir/prompt_files/<name>-<content hash>/1.0.0/` as array_record files.
      name: dataset name (letters, digits, '_' and '.'); defaults to the first file's stem.

    Idempotent: the config name includes a hash of the files' contents, so an unchanged file set
    reuses the prepared data and any change produces (and prepares) a new config. Old versions
    are left in place. On several hosts sharing `data_dir`, prepare on one host first.

    Returns:
      A `PromptDataSource`: `len()`, `num_examples`, `source[i]` -> decoded prompt.
    """
    paths = resolve_paths(path_or_paths)
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_.]", "_", paths[0].stem) or "prompts"
    elif not _NAME_OK.match(name):
        raise ValueError(f"dataset name {name!r} may only contain letters, digits, '_' and '.'")
    digest = hash_files(paths)
    config = PromptFilesConfig(
        name=f"{name}-{digest[:16]}",
        description=f"Prompts from {', '.join(map(str, paths))} (sha256 {digest}).",
        sources=tuple(str(p) for p in paths),
    )
    builder = PromptFiles(data_dir=os.fspath(data_dir), config=config, file_format="array_record")
    builder.download_and_prepare(file_format="array_record")  # returns at once when prepared
    return PromptDataSource(builder.as_data_source(split=_SPLIT))


def num_examples(source: Sequence[Any]) -> int:
    """Number of prompts in a data source (a `PromptDataSource`, a TFDS source or a list)."""
    return len(source)


# ---------------------------------------------------------------------------------------------
# Host-side batching
# ---------------------------------------------------------------------------------------------


class PromptIterator:
    """Endless, deterministic, resumable batches of prompts.

    Epoch e visits the prompts in the order `np.random.default_rng([seed, e]).permutation(n)`
    (or 0..n-1 without shuffling): a pure function of (seed, epoch), so the position
    `state() == {"epoch": e, "index": i}` (i = prompts of epoch e already served) is all a
    checkpoint needs to resume exactly. With `drop_remainder` the last `n % batch_size` prompts
    of each epoch's order are skipped (they are different prompts each epoch); without it the
    last batch of an epoch is smaller. Every host of a multi-host run builds the same iterator
    and reads only its own rows of each batch with `next_rows(host_slice)`.

    Args:
      source: any sequence of prompts (a `PromptDataSource`, a list of str / message lists).
      batch_size: prompts per batch (> 0; <= len(source) when drop_remainder).
      seed: non-negative int for the shuffle.
      shuffle: reshuffle every epoch; False serves the source order.
      drop_remainder: keep every batch exactly `batch_size` long (static shapes for jit).
      num_epochs: stop (StopIteration) after this many epochs; None iterates forever.
      state: a `state()` dict to resume from.
    """

    def __init__(
        self,
        source: Sequence[Prompt],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
        state: dict[str, int] | None = None,
    ):
        n = len(source)
        if n == 0:
            raise ValueError("PromptIterator: the prompt source is empty")
        if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if drop_remainder and batch_size > n:
            raise ValueError(
                f"batch_size {batch_size} is larger than the dataset ({n} prompts) with drop_remainder=True, "
                "so no batch could ever be produced"
            )
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None, got {num_epochs!r}")
        self.source = source
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.num_epochs = num_epochs
        # Prompts served per epoch: the remainder is never served when it is dropped.
        self._epoch_size = n - n % self.batch_size if drop_remainder else n
        self._epoch = 0
        self._index = 0
        self._order_epoch = -1
        self._order = np.arange(n)
        if state is not None:
            self.restore(state)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self._epoch:  # cache: one permutation per epoch, not per batch
            n = len(self.source)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self._epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = self._epoch
        return self._order

    def state(self) -> dict[str, int]:
        """The position: {"epoch": e, "index": prompts of epoch e already served}."""
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: dict[str, Any]) -> None:
        """Move to a position saved by `state()` (values may be numpy scalars from a checkpoint)."""
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"iterator state must be a dict with int 'epoch' and 'index', got {state!r}"
            ) from None
        if epoch < 0 or not 0 <= index < self._epoch_size:
            raise ValueError(
                f"iterator state {state!r} is out of range for {len(self.source)} prompts, "
                f"batch_size {self.batch_size}, drop_remainder={self.drop_remainder}"
            )
        self._epoch, self._index = epoch, index

    def __iter__(self) -> PromptIterator:
        return self

    def __next__(self) -> list[Prompt]:
        """The next global batch (`next_rows(slice(None))`)."""
        return self.next_rows(slice(None))

    def next_rows(self, rows: slice) -> list[Prompt]:
        """Rows `rows` of the next global batch, reading only those rows from the source.

        The position advances by the whole global batch, exactly as `__next__` does, so every
        host of a multi-host run -- each calling `next_rows(its own slice)` on an iterator built
        with the same arguments -- stays at the same `state()`, and the hosts' slices put
        together are the batch `__next__` would return. `rows` is applied to the batch as a
        Python slice (e.g. `parallel.host_batch_slice(mesh, batch_size)`); a slice past the end
        of a short last batch (drop_remainder=False) yields fewer or no rows. Raises
        StopIteration after `num_epochs` epochs, on every host at the same call.
        """
        if not isinstance(rows, slice):
            raise TypeError(f"rows must be a slice of the global batch, got {type(rows).__name__} {rows!r}")
        for name in ("start", "stop", "step"):
            v = getattr(rows, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool)):
                raise TypeError(f"rows.{name} must be an int or None, got {v!r} in {rows!r}")
        if rows.step == 0:
            raise ValueError(f"rows {rows!r}: slice step cannot be zero")
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        stop = min(self._index + self.batch_size, self._epoch_size)
        indices = self._epoch_order()[self._index : stop][rows]
        self._index = stop
        if self._index >= self._epoch_size:
            # Roll over now, so that state() after the last batch of an epoch reads (e+1, 0).
            self._epoch, self._index = self._epoch + 1, 0
        if len(indices) == 0:
            return []
        if hasattr(self.source, "__getitems__"):
            return list(self.source.__getitems__([int(i) for i in indices]))
        return [self.source[int(i)] for i in indices]
