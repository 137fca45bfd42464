"""The reference policy of a Task: its explicit parameters, or supervised fine-tuning on its
demonstrations, memoised in the process and cached on disk.

`make_reference(task, key)`:
  1. ``task.reference_params`` when the task has them (e.g. a tabular reference table);
  2. else, without demonstrations (or with ``reference_steps == 0``), the randomly initialised
     model ``task.init_params(split(key)[0])``;
  3. else `train_reference`: Adam on the demonstrations, loaded from the disk cache when a
     previous process already ran it.
Each result is memoised per (task, key) in this process.

Disk cache. A fine-tune costs seconds of compile and run per process, so its result is stored in
``$XPO_JAX_CACHE`` (default ``~/.cache/xpo_jax``; ``XPO_JAX_CACHE=off`` disables it) as
``reference-<task name>-<digest[:40]>.msgpack`` (`reference_cache_path`), where the digest is a
SHA-256 over everything that determines the result (`reference_digest`):

    the task's name, vocab_size, eos/pad ids, suppressed ids, prompts and mask, max_new_tokens,
    model class and model config, reference steps / batch size / learning rate, the
    demonstrations function (its code, defaults and closure values, and the same for the
    functions it reaches through globals, recursively), the source of the code that trains it
    (the model's module, this file, logprobs.py), the Python / jax / flax / optax / numpy
    versions, and the PRNG key.

``Task.reference_cache_key`` replaces everything but the PRNG key with an explicit string. A
demonstrations function that closes over an object with no stable content (whose repr shows a
memory address) has no reproducible digest: the task is then not cached on disk (with a
warning) unless it sets ``reference_cache_key``.

A file is written atomically (a temporary file in the same folder, then ``os.replace``) and
holds a SHA-256 of its payload; on load it is checked against that checksum and against the
model's parameter tree and shapes: a file that is corrupt, truncated or otherwise unreadable is
ignored with a warning, recomputed and rewritten, never trusted. Failing to write (read-only
folder) only warns.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import os
import re
import sys
import tempfile
import types
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from xpo_jax import logprobs
from xpo_jax.tasks.base import Task

Array = jax.Array

_REFERENCE_CACHE: dict = {}
CACHE_ENV = "XPO_JAX_CACHE"
_MAGIC = b"xpo_jax reference v1\n"
# Functions of these packages are identified by name (their versions are in the digest), not
# by walking their code.
_LIBRARIES = ("jax", "jaxlib", "numpy", "flax", "optax", "scipy", "builtins", "functools", "math",
              "operator", "itertools", "typing")


def _key_bytes(key: Array) -> bytes:
    """A hashable identity of a PRNG key (new-style typed keys and raw uint32 keys alike)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key).tobytes()


# --------------------------------------------------------------------------------------------
# The fine-tune


def sft_loss(apply_fn: Callable, params: Any, batch: tuple) -> Array:
    """Mean negative log-likelihood per response token (EOS included, padding excluded)."""
    prompts, prompt_mask, responses, response_mask = batch
    tokens = jnp.concatenate([prompts, responses], axis=1).astype(jnp.int32)
    mask = jnp.concatenate(
        [prompt_mask.astype(jnp.int32), response_mask.astype(jnp.int32)], axis=1
    )
    logits = apply_fn({"params": params}, tokens, mask)
    token_lp, _ = logprobs.completion_logprobs(logits, responses, response_mask)
    return -jnp.sum(token_lp) / jnp.maximum(jnp.sum(response_mask), 1)


def train_reference(task: Task, key: Array) -> tuple[Any, Array]:
    """Fine-tune a fresh ``task.make_model()`` on ``task.demonstrations`` with Adam:
    ``task.reference_steps`` steps of ``task.reference_batch_size`` fresh demonstrations each,
    minimising ``sft_loss``. Returns (params, per-step losses [steps]). Deterministic given
    ``key``. Uncached (no memo, no disk); ``make_reference`` caches it.
    """
    init_key, data_key = jax.random.split(key)
    # Initialised outside the compiled loop: with Transformer.init traced into the same
    # program, XLA's CPU compile took ~3x longer (13 s against 4 s, measured).
    params = task.init_params(init_key)
    if task.demonstrations is None or task.reference_steps == 0:
        return params, jnp.zeros((0,), jnp.float32)
    return _fine_tune(task, params, data_key)


@functools.partial(jax.jit, static_argnums=0)
def _fine_tune(task: Task, params: Any, key: Array) -> tuple[Any, Array]:
    """The SFT loop as one ``lax.scan`` (compiled once per task)."""
    apply_fn = task.make_model().apply
    optimizer = optax.adam(task.reference_learning_rate)

    def step(carry, step_key):
        params, opt_state = carry
        batch = task.demonstrations(step_key, task.reference_batch_size)
        loss, grads = jax.value_and_grad(functools.partial(sft_loss, apply_fn))(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(
        step, (params, optimizer.init(params)), jax.random.split(key, task.reference_steps)
    )
    return params, losses


def make_reference(task: Task, key: Array) -> Any:
    """Reference-policy parameters (see the module docstring for the three cases), memoised per
    (task, key) in this process; a fine-tune is also cached on disk across processes."""
    memo_key = (task, _key_bytes(key))
    if memo_key not in _REFERENCE_CACHE:
        if task.reference_params is not None:
            params = jax.tree_util.tree_map(jnp.asarray, task.reference_params)
        elif task.demonstrations is None or task.reference_steps == 0:
            params = train_reference(task, key)[0]  # the random init: nothing worth storing
        else:
            params = _load_or_train(task, key)
        _REFERENCE_CACHE[memo_key] = params
    return _REFERENCE_CACHE[memo_key]


# --------------------------------------------------------------------------------------------
# The disk cache


def cache_dir() -> Optional[str]:
    """``$XPO_JAX_CACHE`` (default ``~/.cache/xpo_jax``), or None when set to "off"."""
    path = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "xpo_jax")
    return None if path.lower() == "off" else path


def reference_cache_path(task: Task, key: Array) -> Optional[str]:
    """Where ``make_reference(task, key)`` is cached on disk, or None (cache off, or the task has
    no reproducible digest)."""
    folder = cache_dir()
    digest = reference_digest(task, key)
    if folder is None or digest is None:
        return None
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", task.name)[:64]
    return os.path.join(folder, f"reference-{name}-{digest[:40]}.msgpack")


def _load_or_train(task: Task, key: Array) -> Any:
    path = reference_cache_path(task, key)
    if path is not None and os.path.exists(path):
        try:
            return _read(path, task)
        except Exception as e:  # noqa: BLE001 -- any unreadable file is recomputed, never trusted
            warnings.warn(f"ignoring the unreadable reference cache file {path} ({e}); "
                          f"fine-tuning again", stacklevel=3)
    params = train_reference(task, key)[0]
    if path is not None:
        _write(path, params)
    return params


def _read(path: str, task: Task) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    head = len(_MAGIC)
    if data[:head] != _MAGIC:
        raise ValueError("not a reference cache file")
    digest, payload = data[head:head + 32], data[head + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch")
    params = serialization.msgpack_restore(payload)
    params = task.checked_params(params, f"cache file of task {task.name!r}")
    want = jax.tree_util.tree_structure(task.param_shapes())
    if jax.tree_util.tree_structure(params) != want:
        raise ValueError(f"parameter tree {jax.tree_util.tree_structure(params)} != {want}")
    return jax.tree_util.tree_map(jnp.asarray, params)


def _write(path: str, params: Any) -> None:
    payload = serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, jax.device_get(params)))
    folder = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".msgpack")
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + hashlib.sha256(payload).digest() + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not write the reference cache file {path} ({e})", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------
# The digest


class _Unstable(Exception):
    """An object whose content cannot be fingerprinted reproducibly across processes."""


def reference_digest(task: Task, key: Array) -> Optional[str]:
    """SHA-256 hex digest of everything that determines ``train_reference(task, key)`` (module
    docstring), or None when the demonstrations have no reproducible fingerprint."""
    h = hashlib.sha256()
    if task.reference_cache_key is not None:
        parts = [("explicit", task.reference_cache_key)]
    else:
        try:
            demos = _fingerprint(task.demonstrations, set())
        except _Unstable as e:
            warnings.warn(f"task {task.name!r}: its reference is not cached on disk: the "
                          f"demonstrations depend on {e}, which has no stable content; set "
                          f"Task.reference_cache_key to cache it", stacklevel=3)
            return None
        parts = [
            ("name", task.name), ("vocab_size", task.vocab_size), ("eos_id", task.eos_id),
            ("pad_id", task.pad_id), ("suppressed_ids", task.suppressed_ids),
            ("prompts", _fingerprint(task.prompts, set())),
            ("prompt_mask", _fingerprint(task.prompt_mask, set())),
            ("max_new_tokens", task.max_new_tokens),
            ("model_class", _qualname(task.model_class)), ("model_config", repr(task.model_config)),
            ("reference_steps", task.reference_steps),
            ("reference_batch_size", task.reference_batch_size),
            ("reference_learning_rate", repr(float(task.reference_learning_rate))),
            ("demonstrations", demos), ("code", _code_version(task.model_class)),
        ]
    parts.append(("key", _key_bytes(key).hex()))
    for label, value in parts:
        h.update(label.encode() + b"=" + (value if isinstance(value, bytes) else str(value).encode()) + b"\n")
    return h.hexdigest()


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


@functools.lru_cache(maxsize=None)
def _code_version(model_class: Any) -> str:
    """Hash of the source that trains a reference (the model's module, this file, logprobs.py)
    and of the library versions, so an edit or an upgrade misses the cache."""
    import flax

    h = hashlib.sha256(repr((sys.version_info[:2], jax.__version__, flax.__version__,
                             optax.__version__, np.__version__)).encode())
    for obj in (model_class, sys.modules[__name__], logprobs):
        try:
            with open(inspect.getsourcefile(obj), "rb") as f:
                h.update(f.read())
        except (TypeError, OSError):
            h.update(_qualname(obj).encode())
    return h.hexdigest()


def _fingerprint(obj: Any, seen: set) -> bytes:
    """A byte string identifying ``obj`` by content, equal across processes: values, arrays and
    dataclasses (configs, Flax modules) by value; functions by code, defaults, closure values
    and the functions and values they read as globals (recursively); library functions by name
    and closure values; modules and classes by name. Raises _Unstable for an object known only
    by identity (its repr shows a memory address)."""
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return f"{type(obj).__name__}:{obj!r}".encode()
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        a = np.asarray(obj)
        return f"array:{a.dtype}:{a.shape}:".encode() + hashlib.sha256(a.tobytes()).digest()
    if id(obj) in seen:
        return b"<cycle>"
    seen = seen | {id(obj)}
    rec = functools.partial(_fingerprint, seen=seen)
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__}(".encode() + b",".join(rec(x) for x in obj) + b")"
    if isinstance(obj, dict):
        items = sorted((rec(k), rec(v)) for k, v in obj.items())
        return b"dict(" + b",".join(k + b":" + v for k, v in items) + b")"
    if isinstance(obj, types.ModuleType):
        return f"module:{obj.__name__}".encode()
    if isinstance(obj, functools.partial):
        return b"partial(" + rec(obj.func) + rec(obj.args) + rec(obj.keywords) + b")"
    if isinstance(obj, types.MethodType):
        return b"method(" + rec(obj.__func__) + rec(obj.__self__) + b")"
    if isinstance(obj, type):
        return f"class:{_qualname(obj)}".encode()
    if dataclasses.is_dataclass(obj):  # configs, Flax modules: by their fields
        fields = [(f.name, rec(getattr(obj, f.name))) for f in dataclasses.fields(obj)
                  if f.name not in ("parent", "name")]  # a Flax module's place in a tree
        return f"{_qualname(type(obj))}(".encode() + b",".join(n.encode() + b"=" + v for n, v in fields) + b")"
    if callable(obj) and _is_library(obj):  # by name, and by the values a closure holds
        cells = getattr(obj, "__closure__", None) or ()
        return f"named:{_qualname(obj)}".encode() + rec(tuple(_cell_value(c) for c in cells))
    if not isinstance(obj, types.FunctionType) and callable(getattr(obj, "__wrapped__", None)):
        return b"wrapped(" + rec(obj.__wrapped__) + b")"  # jax.jit and functools.wraps wrappers
    if isinstance(obj, types.FunctionType):
        code = obj.__code__
        parts = [_code_bytes(code), rec(obj.__defaults__), rec(obj.__kwdefaults__)]
        parts += [rec(_cell_value(c)) for c in obj.__closure__ or ()]
        for name in sorted(_global_names(code)):
            if name in obj.__globals__:
                parts.append(name.encode() + b"=" + rec(obj.__globals__[name]))
        return b"function(" + b",".join(parts) + b")"
    text = repr(obj)
    if re.search(r"0x[0-9a-fA-F]{6,}", text):
        raise _Unstable(text[:80])
    return f"{_qualname(type(obj))}:{text}".encode()


def _is_library(obj: Any) -> bool:
    """A function (or jitted function) of a library in _LIBRARIES, or a builtin."""
    if isinstance(obj, types.BuiltinFunctionType):
        return True
    if not (isinstance(obj, types.FunctionType) or hasattr(obj, "__wrapped__")):
        return False  # an instance: fingerprinted by content, not by its class's module
    return (getattr(obj, "__module__", None) or "").split(".")[0] in _LIBRARIES


def _cell_value(cell) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (a closure variable not assigned yet)
        return "<empty cell>"


def _code_bytes(code: types.CodeType) -> bytes:
    """Bytecode, constants (nested code objects recursively) and names of a code object."""
    return (b"code(" + code.co_code + b"|" + b",".join(_const_bytes(c) for c in code.co_consts)
            + b"|" + ",".join(code.co_names).encode() + b")")


def _const_bytes(c: Any) -> bytes:
    if isinstance(c, types.CodeType):
        return _code_bytes(c)
    if isinstance(c, (tuple, frozenset)):  # a frozenset's order depends on the string hash seed
        items = [_const_bytes(x) for x in c]
        return b"(" + b",".join(sorted(items) if isinstance(c, frozenset) else items) + b")"
    return repr(c).encode()


def _global_names(code: types.CodeType) -> set:
    """Names a code object (and the functions nested in it) may read as globals."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names
