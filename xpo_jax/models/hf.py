"""Hugging Face checkpoints <-> xpo_jax parameters, through safetensors (no torch, no transformers).

Supported architectures (`architectures[0]` in config.json), registered in models/families.py:

    LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Gemma2ForCausalLM,
    Gemma3ForCausalLM (text-only, model_type gemma3_text)                       -> kind "causal_lm"
    LlamaForSequenceClassification, MistralForSequenceClassification,
    Qwen2ForSequenceClassification, Gemma2ForSequenceClassification,
    Gemma3TextForSequenceClassification  (num_labels = 1, a scalar reward)     -> kind "reward_model"

A "causal_lm" loads into `Transformer`, a "reward_model" into `RewardModel`; the parameter names
follow the mechanical map in transformer.py's module docstring (families.param_map spells it out).

    config_from_hf(hf_config)                  config.json (a dict) -> ModelConfig
    load_hf(path, dtype=None, shardings=None,  checkpoint dir -> (ModelConfig, params, kind),
            overrides=None)                    optionally straight into per-parameter shardings
    save_hf(path, config, params, kind=...)    params -> a dir transformers' from_pretrained loads

Both config.json dialects are read: transformers 4.x writes `rope_theta` and `rope_scaling` at the
top level and `torch_dtype`; transformers 5.x writes `rope_parameters` ({rope_type, rope_theta,
...}) and `dtype`. save_hf writes both, so either version loads its output.

Features we do not implement raise NotImplementedError naming the config key: hidden_act other than
silu (gelu_pytorch_tanh for Gemma), Llama's `attention_bias` (it also adds an o_proj bias) or
`mlp_bias`, RoPE types other than "default", "linear" and "llama3", `partial_rotary_factor` < 1,
quantized checkpoints, more than one label, Gemma 3's bidirectional attention.

Sliding-window attention (Mistral's `sliding_window`, Qwen2's `use_sliding_window`, Gemma 2 / 3's
local layers) is real masking (ModelConfig.sliding_window / layer_types): a query at slot t sees
keys at slots t - W < s <= t, slots counting padding as HF's cache positions do, in the full
forward and in the KV-cached decode alike.

Reward models and padding. HF's `*ForSequenceClassification` reads the score at "the rightmost
token that is not `pad_token_id`" (transformers >= 4.47; this handles left and right padding; a
batch of more than one row needs `pad_token_id` set in config.json). Our `RewardModel` reads it at
the last position where the attention mask is 1. The two agree whenever the last real token of a
row is not the pad token. They differ when pad_token_id == eos_token_id (common: Qwen and Llama
chat checkpoints pad with EOS) and a response ends with EOS: HF then scores the token before the
EOS, we score the EOS itself. save_hf writes `pad_token_id` only when given (`extra_config`).

Memory. load_hf reads one parameter at a time (safetensors' numpy API), converts it (dtype,
transpose), puts it on its device(s) and drops the host copy: the host never holds a second full
copy of the model. With `shardings` it reads only the slices each device holds
(`jax.make_array_from_callback` with a callback that slices the file), so a model larger than
any one device or host loads onto a pod. save_hf gathers one tensor at a time and streams it into
its file (the safetensors header is planned from the shapes), from any sharding, on any number
of processes (process 0 writes).

Stacked layers. With `ModelConfig.scan_layers` our per-layer parameters are stacked on a leading
[n_layers] axis; HF files always hold one tensor per layer. load_hf assembles a stacked parameter
(or the slice of it a device needs) from the per-layer tensors; save_hf writes one tensor per
layer. Choose it on loading with `overrides={"scan_layers": True}`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from xpo_jax.models import families, lora, quant
from xpo_jax.models.transformer import ModelConfig, RewardModel, Transformer

KINDS = ("causal_lm", "reward_model")

# architectures[0] -> (family name, kind), from the registry in models/families.py.
ARCHITECTURES: dict[str, tuple[str, str]] = {a: (f.name, k) for a, (f, k) in families.ARCHITECTURES.items()}

# Checkpoint tensors that carry no parameter: old Llama checkpoints saved RoPE's inverse
# frequencies as a buffer; we recompute them from rope_theta.
_IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)

# safetensors dtype names -> numpy dtypes (bf16 through ml_dtypes, which jax depends on).
_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
_ST_DTYPES = {np.dtype(v): k for k, v in _NP_DTYPES.items()}

# shardings= of load_hf: (our param path, its shape) -> where that parameter lives.
ShardingFn = Callable[[tuple, tuple], jax.sharding.Sharding]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# --------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------


def hf_architecture(hf_config: dict) -> tuple[str, str]:
    """(family, kind) of a config.json dict: family a name in models/families.py (e.g. "llama",
    "gemma2"), kind in KINDS.

    Uses `architectures[0]`; a config without `architectures` (written by a bare
    `Config().save_pretrained`) is taken as the causal LM of its `model_type`.
    """
    family, kind = _family(hf_config)
    return family.name, kind


def _family(hf_config: dict) -> tuple[families.Family, str]:
    archs = hf_config.get("architectures")
    if archs:
        if archs[0] not in families.ARCHITECTURES:
            raise ValueError(f"unsupported architecture {archs[0]!r}; supported: {sorted(ARCHITECTURES)}")
        return families.ARCHITECTURES[archs[0]]
    model_type = hf_config.get("model_type")
    if model_type not in families.MODEL_TYPES:
        raise ValueError(f"config has no 'architectures' and unsupported model_type {model_type!r}; "
                         f"supported: {sorted(ARCHITECTURES)}")
    return families.MODEL_TYPES[model_type], "causal_lm"


def _require(hf_config: dict, key: str):
    if hf_config.get(key) is None:
        raise ValueError(f"config.json lacks required key {key!r}")
    return hf_config[key]


def config_from_hf(hf_config: dict) -> ModelConfig:
    """ModelConfig (float32 compute and storage) of a config.json dict of a supported family.

    The shared keys (sizes, RoPE, norm eps, tying) are read here; the family's `read` adds its own
    (windows, soft-caps, ...) and its `fixed` block options (models/families.py). Keys the file
    leaves out take the HF config class defaults (`hf_defaults`). Raises ValueError for an
    unknown architecture or a missing required key, and NotImplementedError naming the key of a
    feature present in the config that we do not support.
    """
    family, kind = _family(hf_config)
    # Defaults fill absent keys only: an explicit null means "none" (e.g. no soft-capping).
    hf_config = {**family.hf_defaults, **hf_config}
    if hf_config.get("max_position_embeddings") is None:
        hf_config["max_position_embeddings"] = family.hf_defaults["max_position_embeddings"]
    if hf_config.get("quantization_config"):
        raise NotImplementedError("config key 'quantization_config': quantized checkpoints are "
                                  "not supported; use a float checkpoint")
    if hf_config.get("mlp_bias"):
        raise NotImplementedError("config key 'mlp_bias': MLP biases are not implemented")
    if kind == "reward_model":
        n_labels = len(hf_config["id2label"]) if hf_config.get("id2label") else hf_config.get("num_labels", 1)
        if n_labels != 1:
            raise NotImplementedError(f"config key 'id2label': {n_labels} labels; a reward model "
                                      "has exactly one (num_labels=1)")
    d_model = int(_require(hf_config, "hidden_size"))
    n_heads = int(_require(hf_config, "num_attention_heads"))
    for key in ("vocab_size", "num_hidden_layers", "intermediate_size"):
        _require(hf_config, key)
    extra = {**family.fixed, **family.read(hf_config)}
    if "rope_theta" not in extra:  # one RoPE for every layer (Gemma 3 reads its own pair)
        extra["rope_theta"], extra["rope_scaling"] = families.rope_from_hf(hf_config)
    fields = dict(
        vocab_size=int(hf_config["vocab_size"]),
        d_model=d_model,
        n_layers=int(hf_config["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf_config.get("num_key_value_heads") or n_heads),
        head_dim=int(hf_config.get("head_dim") or d_model // n_heads),
        mlp_dim=int(hf_config["intermediate_size"]),
        rms_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        max_seq_len=int(hf_config["max_position_embeddings"]),
        init_std=float(hf_config.get("initializer_range", 0.02)),
    )
    return ModelConfig(**fields, **extra).validate()


def config_to_hf(config: ModelConfig, kind: str = "causal_lm", dtype: Any = None) -> dict:
    """config.json for `config`, as the first family of models/families.py that expresses it
    exactly (Llama, Qwen2 with q/k/v bias, Mistral with a window on every layer, Gemma 2 / 3).
    `dtype` (default: the parameter dtype) is the tensors' dtype."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    family = families.family_of(config)
    arch = next(a for a, k in family.architectures.items() if k == kind)
    dtype_name = jnp.dtype(config.param_dtype if dtype is None else dtype).name
    rope = families.rope_to_hf(config.rope_theta, config.rope_scaling)
    hf = {
        "architectures": [arch],
        "model_type": family.name,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.mlp_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_eps,
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings,
        # transformers 5.x reads rope_parameters; 4.x reads rope_theta / rope_scaling.
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(rope) if config.rope_scaling is not None else None,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **family.write(config),
    }
    if kind == "reward_model":
        hf.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


# --------------------------------------------------------------------------------------------
# Parameter names
# --------------------------------------------------------------------------------------------


def _param_map(config: ModelConfig, kind: str) -> dict[str, families.Entry]:
    """HF tensor name -> Entry for every parameter of the model (models/families.py)."""
    return families.param_map(config, kind)


def _hf_shape(entry: families.Entry, shape: tuple) -> tuple:
    """Shape of the HF tensor of `entry`, given the shape of our (possibly stacked) parameter."""
    shape = tuple(shape[1:]) if entry.layer is not None else tuple(shape)
    return shape[::-1] if entry.transpose else shape


def _expected_shapes(config: ModelConfig, kind: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our param path -> shape, from the module itself (abstract init: no memory, no compute).

    Cross-checked against _param_map so a renamed parameter in transformer.py fails loudly here
    instead of loading a checkpoint half-way."""
    module = Transformer(config) if kind == "causal_lm" else RewardModel(config)
    tokens, mask = jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool)
    tree = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens, mask)["params"])
    shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}
    mapped = {e.path for e in _param_map(config, kind).values()}
    if mapped != set(shapes):
        raise RuntimeError(f"xpo_jax.models.hf is out of date with the model's parameters: "
                           f"unmapped {sorted(set(shapes) - mapped)}, stale {sorted(mapped - set(shapes))}")
    return shapes


def _float_dtype(dtype: Any, default: Any) -> np.dtype:
    dt = jnp.dtype(default if dtype is None else dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dt}")
    return dt


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _safe_open(file: Path):
    """`safe_open(file)` whose errors name the file (safetensors' own, e.g. on a truncated file,
    do not)."""
    from safetensors import safe_open

    try:
        return safe_open(file, framework="np")
    except Exception as e:  # noqa: BLE001 - SafetensorError and OS errors alike: name the file
        raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def _checkpoint_files(path: Path) -> dict[Path, list[str]]:
    """safetensors file -> the tensor names it holds (single file, or shards through the index)."""

    if (path / INDEX_FILE).exists():
        with open(path / INDEX_FILE, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[Path, list[str]] = {}
        for name, filename in weight_map.items():
            files.setdefault(path / filename, []).append(name)
        for file in files:
            if not file.exists():
                raise FileNotFoundError(f"{path / INDEX_FILE} names shard {file.name}, which is missing")
        return files
    if (path / SINGLE_FILE).exists():
        with _safe_open(path / SINGLE_FILE) as f:
            return {path / SINGLE_FILE: list(f.keys())}
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (only safetensors "
                            "checkpoints are supported; convert pytorch_model.bin with transformers)")


def _raw_tensor(file: Path, name: str) -> np.ndarray:
    """Read one tensor straight from the safetensors layout (u64 header length, JSON header, data).

    The fallback for safetensors releases whose numpy API cannot build bfloat16 arrays."""
    with open(file, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        info = json.loads(fh.read(header_len))[name]
        if info["dtype"] not in _NP_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has dtype {info['dtype']}, not a float type")
        start, end = info["data_offsets"]
        fh.seek(8 + header_len + start)
        data = fh.read(end - start)
    return np.frombuffer(data, dtype=_NP_DTYPES[info["dtype"]]).reshape(info["shape"])


def _read_slice(f, file: Path, name: str, index: tuple) -> np.ndarray:
    """`index` (a tuple of slices) of tensor `name` of the open safetensors file `f`: only those
    bytes are read (safetensors memory-maps the file and copies the slice)."""
    try:
        return f.get_slice(name)[index]
    except (TypeError, ValueError):  # e.g. "data type 'bfloat16' not understood" (old safetensors)
        return _raw_tensor(file, name)[index]  # reads the whole tensor: old releases only


def _key(index: tuple) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)  # slices are unhashable before 3.12


def load_hf(path: str | os.PathLike, *, dtype: Any = None, shardings: Optional[ShardingFn] = None,
            overrides: Optional[dict] = None, quantize: Optional[str] = None) -> tuple[ModelConfig, dict, str]:
    """Load a Hugging Face checkpoint directory (config.json + safetensors).

    Args:
      path: a directory with config.json and model.safetensors, or shards listed in
        model.safetensors.index.json (as `save_pretrained` writes them).
      dtype: storage dtype of the returned params (default float32, whatever the checkpoint
        holds: a bf16 checkpoint upcasts exactly). The returned config computes in the same dtype
        unless `overrides` says otherwise (e.g. {"dtype": "bfloat16"} over float32 params).
      shardings: None, to put every parameter whole on the default device; or a function
        `(param_path: tuple[str, ...], shape: tuple[int, ...]) -> jax.sharding.Sharding`, e.g.
        `lambda path, shape: NamedSharding(mesh, fsdp_spec(shape, mesh.shape["fsdp"]))`. Each
        parameter is then built by `jax.make_array_from_callback`, whose callback reads only the
        requested slice of the tensor from the file (the index swapped for a transposed kernel,
        assembled from per-layer tensors for a stacked one, converted slice by slice): no device
        and no host holds more of a tensor than its own shards of it. `param_path` and `shape`
        are those of the returned tree (stacked [n_layers, ...] with scan_layers: a rule must
        then leave the leading layer axis unsplit).
      overrides: ModelConfig fields set on the loaded config before the parameters are built,
        e.g. {"scan_layers": True, "remat": "block", "dtype": "bfloat16", "suppress_ids": (0,)}.
        With scan_layers the per-layer tensors are stacked. Not "param_dtype" (that is `dtype`).
      quantize: None, or "int8" / "nf4" (QLoRA's frozen base): every projection kernel (the
        modules LoRA can adapt) is read whole on the host, one layer at a time, quantized there
        (`quant.quantize`, from the `dtype` values) and placed as kernel_q / kernel_scale; a
        float copy of it never reaches a device.

    Returns:
      (config, params, kind): params is the "params" collection of `Transformer(config)` when kind
      is "causal_lm", of `RewardModel(config)` when kind is "reward_model".

    Raises:
      KeyError naming the HF tensor(s) missing from the checkpoint; ValueError for unexpected
      tensors (besides rotary inv_freq buffers, and lm_head.weight when embeddings are tied, which
      transformers also ignores), wrong shapes or non-float dtypes, bad overrides; and
      config_from_hf's errors. Names, shapes and dtypes are all checked, from the files' headers,
      before any tensor data is read.
    """

    path = Path(path)
    dt = _float_dtype(dtype, "float32")
    config, kind = _loaded_config(path, dt, overrides)
    names = _param_map(config, kind)
    shapes = _expected_shapes(config, kind)
    # Names, then shapes and dtypes, before reading any data: a wrong checkpoint fails fast.
    file_of = _check_names(path, config, kind, names)
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def handle(name):
            file = file_of[name]
            if file not in handles:
                handles[file] = stack.enter_context(_safe_open(file))
            return handles[file], file

        _check_headers(path, names, shapes, handle)
        read = _param_reader(names, shapes, handle, dt)
        flat = {}
        for param_path, shape in shapes.items():
            if quantize and param_path[-1] == "kernel" and param_path[-2] in lora.ADAPTABLE:
                flat.update(_place_quantized(param_path, shape, read, shardings, quantize))
            else:
                flat[param_path] = _place(param_path, shape, read, shardings)
    return config, traverse_util.unflatten_dict(flat), kind


def _loaded_config(path: Path, dt: np.dtype, overrides: Optional[dict]) -> tuple[ModelConfig, str]:
    """(ModelConfig with storage dtype `dt` and `overrides` applied, kind) of checkpoint `path`."""
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}")
    with open(path / "config.json", encoding="utf-8") as f:
        hf_config = json.load(f)
    _, kind = hf_architecture(hf_config)
    overrides = dict(overrides or {})
    bad = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if bad or "param_dtype" in overrides:
        raise ValueError(f"load_hf: overrides {sorted(bad | ({'param_dtype'} & set(overrides)))} are not "
                         "ModelConfig fields one may override (the storage dtype is dtype=)")
    config = dataclasses.replace(config_from_hf(hf_config), **{"dtype": dt.name, **overrides},
                                 param_dtype=dt.name).validate()
    return config, kind


def _check_names(path: Path, config: ModelConfig, kind: str, names: dict) -> dict[str, Path]:
    """HF tensor name -> its file, after checking the checkpoint holds exactly `names` (besides
    ignorable buffers and a tied head saved anyway, which transformers also ignores)."""
    files = _checkpoint_files(path)
    present = {name for file_names in files.values() for name in file_names}
    missing = sorted(set(names) - present)
    if missing:
        raise KeyError(f"{path}: checkpoint lacks {len(missing)} tensor(s) of a {kind}: "
                       f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    ignorable = {n for n in present if n.endswith(_IGNORABLE_SUFFIXES)}
    if kind == "causal_lm" and config.tie_embeddings:
        ignorable |= {"lm_head.weight"} & present  # a tied head saved anyway; HF re-ties it too
    extra = sorted(present - set(names) - ignorable)
    if extra:
        raise ValueError(f"{path}: checkpoint has {len(extra)} unexpected tensor(s) for a "
                         f"{kind} of this config.json: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    return {name: file for file, file_names in files.items() for name in file_names}


def _check_headers(path: Path, names: dict, shapes: dict, handle: Callable) -> None:
    """Every tensor's dtype (a float) and shape (this config's), from the files' headers only."""
    for name, e in names.items():
        info = handle(name)[0].get_slice(name)
        if info.get_dtype() not in _NP_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info.get_dtype()}, expected a "
                             "float type")
        want = _hf_shape(e, shapes[e.path])
        if tuple(info.get_shape()) != want:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(info.get_shape())}, "
                             f"expected {want} for this config.json")


def _param_reader(names: dict, shapes: dict, handle: Callable, dt: np.dtype) -> Callable:
    """read(param_path, index): our parameter at `index` (a tuple of slices) as a host array of
    dtype dt: the index swapped for a transposed kernel, assembled from per-layer tensors for a
    stacked one; only the requested slices are read from the files."""
    members: dict[tuple, list[str]] = {}  # our path -> its HF tensor(s), in layer order
    for name, e in sorted(names.items(), key=lambda kv: kv[1].layer or 0):
        members.setdefault(e.path, []).append(name)

    def read(param_path, index):
        e = names[members[param_path][0]]
        index = tuple(index) + (slice(None),) * (len(shapes[param_path]) - len(index))

        def one(name, idx):
            x = _read_slice(*handle(name), name, idx[::-1] if e.transpose else idx)
            return np.ascontiguousarray(x.T if e.transpose else x, dtype=dt)

        if e.layer is None:
            return one(members[param_path][0], index)
        layers = range(len(members[param_path]))[index[0]]  # the stacked tensor's layer slice
        return np.stack([one(members[param_path][i], index[1:]) for i in layers])

    return read


def _place(param_path: tuple, shape: tuple, read: Callable, shardings: Optional[ShardingFn]) -> jax.Array:
    """One parameter on its device(s): whole on the default device, or built shard by shard."""
    if shardings is None:
        # One converted host copy of the whole tensor, onto the device, then dropped.
        return jnp.asarray(read(param_path, (slice(None),) * len(shape)))
    seen: dict[tuple, np.ndarray] = {}  # shards replicated over "data" are read once

    def callback(index):
        if _key(index) not in seen:
            seen[_key(index)] = read(param_path, index)
        return seen[_key(index)]

    return jax.make_array_from_callback(shape, shardings(param_path, shape), callback)


def _place_quantized(param_path: tuple, shape: tuple, read: Callable, shardings: Optional[ShardingFn],
                     kind: str) -> dict:
    """{codes path: kernel_q, scale path: kernel_scale} of one kernel, quantized on the host one
    layer at a time (a stacked kernel's float copy is never whole), then placed like parameters."""
    name = "/".join(param_path)
    if len(shape) == 3:  # stacked [L, in, out]
        parts = [quant.quantize(read(param_path, (slice(i, i + 1),)), kind, name) for i in range(shape[0])]
        codes, scale = (np.concatenate([p[j] for p in parts]) for j in (0, 1))
    else:
        codes, scale = quant.quantize(read(param_path, (slice(None),) * len(shape)), kind, name)
    out = {}
    for leaf, x in ((quant.CODES, codes), (quant.SCALE, scale)):
        path = param_path[:-1] + (leaf,)
        out[path] = jnp.asarray(x) if shardings is None else jax.make_array_from_callback(
            x.shape, shardings(path, x.shape), lambda idx, x=x: x[idx])
    return out


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


class _Dequantized:
    """A quantized kernel as save_hf reads it: its float shape, and one layer (or the whole
    kernel) dequantized on demand, so the export never holds the whole float base."""

    def __init__(self, codes: Any, scale: Any):
        self.codes, self.scale, self.shape = codes, scale, quant.kernel_shape(codes)

    def __getitem__(self, layer: int) -> np.ndarray:
        return np.asarray(quant.dequantize(_host_value(self.codes[layer]), _host_value(self.scale[layer])))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        w = np.asarray(quant.dequantize(_host_value(self.codes), _host_value(self.scale)))
        return w if dtype is None else w.astype(dtype)


def _host_value(x: Any) -> np.ndarray:
    """One (possibly sharded, possibly multi-process) array as a whole numpy array on this host.
    Every process must call it, in the same order, when the array spans processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _write_safetensors(file: Path, tensors: list[tuple[str, tuple, np.dtype]],
                       fetch: Callable[[str], np.ndarray], write: bool) -> None:
    """Stream `tensors` (name, shape, dtype) into a safetensors file, one tensor in memory at a time.

    The layout (u64 little-endian header length, JSON header padded to 8 bytes with spaces, then
    the tensors' bytes back to back at the header's `data_offsets`) needs only shapes for the
    header, so it is written first and each tensor's bytes follow as `fetch(name)` produces
    them. `fetch` runs on every process (it may gather across processes); only where `write`
    does anything touch the file."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers requires "format"
    offset = 0
    for name, shape, dt in tensors:
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with (open(file, "wb") if write else contextlib.nullcontext()) as fh:
        if write:
            fh.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dt in tensors:
            x = fetch(name)
            if tuple(x.shape) != tuple(shape) or x.dtype != dt:
                raise RuntimeError(f"save_hf: {name} came out {x.shape} {x.dtype}, planned {shape} {dt}")
            if write:
                np.ascontiguousarray(x).tofile(fh)
            del x


def save_hf(path: str | os.PathLike, config: ModelConfig, params: dict, *, kind: str = "causal_lm",
            dtype: Any = None, shard_size: Optional[int] = None,
            extra_config: Optional[dict] = None, adapters: Optional[dict] = None,
            lora_alpha: Optional[float] = None) -> None:
    """Write `params` as a Hugging Face checkpoint directory that transformers loads with
    `AutoModelForCausalLM` (kind "causal_lm") or `AutoModelForSequenceClassification`
    (kind "reward_model").

    Args:
      path: output directory (created; existing config.json / safetensors files are overwritten).
      config, params: the model and its "params" collection (`Transformer` or `RewardModel`);
        with config.scan_layers the stacked parameters are written as HF's per-layer tensors.
        Params may be sharded over devices and processes.
      kind: "causal_lm" or "reward_model".
      dtype: tensor dtype in the files (default config.param_dtype); also written as
        `torch_dtype` / `dtype` in config.json.
      shard_size: at most this many bytes per file: model-0000i-of-0000n.safetensors plus
        model.safetensors.index.json (a tensor larger than shard_size gets a shard of its own).
        None writes one model.safetensors.
      extra_config: entries merged into config.json last, e.g. {"pad_token_id": 0,
        "eos_token_id": 2} (HF's sequence classification needs pad_token_id for batches).

    Memory: one HF tensor at a time is gathered to the host (`process_allgather` for arrays that
    span processes), converted and streamed to its file; the host never holds more. With several
    processes every process must call save_hf (the gathers are collective) and only process 0
    writes files; all return once the files are complete.

    Tied embeddings (config.tie_embeddings) write no lm_head tensor, as transformers does.

    LoRA: with `adapters` (a LoRA run's `state.params`; `params` then the base, its
    `ref_params`) and `lora_alpha`, each adapted kernel is written merged, W + (alpha / r) A B
    (in float32 on the host, one tensor at a time, then cast to `dtype`); `save_peft_adapter`
    writes the adapters alone in peft's layout instead. A quantized base (QLoRA, `params` with
    kernel_q / kernel_scale) is written dequantized, W_deq (+ (alpha / r) A B): the merged model
    carries the quantization error (the adapters were trained on W_deq, not on the original W).
    """
    dt = _float_dtype(dtype, config.param_dtype)
    hf_config = config_to_hf(config, kind, dt)
    hf_config.update(extra_config or {})
    names = _param_map(config, kind)
    shapes = _expected_shapes(config, kind)
    flat = traverse_util.flatten_dict(params)
    for p in [p for p in flat if p[-1] == quant.CODES]:  # a QLoRA base: written dequantized
        flat[p[:-1] + ("kernel",)] = _Dequantized(flat.pop(p), flat.pop(p[:-1] + (quant.SCALE,)))
    delta = _lora_delta(adapters, lora_alpha, flat)
    for param_path, shape in shapes.items():
        if param_path not in flat:
            raise KeyError(f"params lack {'/'.join(param_path)} (a {kind} of this config)")
        if tuple(flat[param_path].shape) != shape:
            raise ValueError(f"params {'/'.join(param_path)} has shape {flat[param_path].shape}, "
                             f"expected {shape}")
    extra = sorted("/".join(p) for p in set(flat) - set(shapes))
    if extra:
        raise ValueError(f"params have entries that are not part of a {kind}: {extra}")

    # Plan the shards from shapes alone, so file names (which include the shard count) and every
    # file's header are known before any tensor is copied to the host.
    shards: list[list[str]] = [[]]
    size = 0
    for name, e in names.items():
        nbytes = math.prod(shapes[e.path]) * dt.itemsize // (config.n_layers if e.layer is not None else 1)
        if shard_size is not None and shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes

    def fetch(name):
        e = names[name]
        x = flat[e.path]
        x = _host_value(x if e.layer is None else x[e.layer])  # one layer of a stacked tensor
        d = delta(e.path, e.layer)
        x = (x.astype(np.float32) + d if d is not None else x).astype(dt)
        return x.T if e.transpose else x

    lead = jax.process_index() == 0
    path = Path(path)
    if lead:
        path.mkdir(parents=True, exist_ok=True)
        for stale in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)  # a mix of old and new shards would load the wrong tensors
    if shard_size is None:
        filenames = [SINGLE_FILE]
    else:
        filenames = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for filename, shard in zip(filenames, shards):
        planned = [(name, _hf_shape(names[name], shapes[names[name].path]), dt) for name in shard]
        _write_safetensors(path / filename, planned, fetch, lead)
        for name, shape, _ in planned:
            weight_map[name] = filename
            total += math.prod(shape) * dt.itemsize
    if lead:
        if shard_size is not None:
            with open(path / INDEX_FILE, "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(path / "config.json", "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
    if jax.process_count() > 1:  # nobody reads the checkpoint before process 0 has written it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"xpo_jax save_hf {path}")


# ----------------------------------------------------------------------------------------------
# LoRA adapters: merged into the kernels, or in peft's layout
# ----------------------------------------------------------------------------------------------

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _lora_delta(adapters: Optional[dict], lora_alpha: Optional[float], flat: dict) -> Callable:
    """(kernel path, layer or None) -> the float32 numpy (alpha / r) A @ B [in, out] to add to that
    kernel, or None where it has no adapter. Checks the adapters against the base's kernels."""
    if adapters is None:
        return lambda path, layer: None
    if lora_alpha is None or not lora_alpha > 0:
        raise ValueError(f"save_hf: adapters need lora_alpha > 0 (the run's --lora-alpha), got {lora_alpha!r}")
    pairs = _adapter_pairs(adapters, flat)

    def delta(path, layer):
        if path not in pairs:
            return None
        a, b = pairs[path]
        a, b = (_host_value(x if layer is None else x[layer]).astype(np.float32) for x in (a, b))
        return (lora_alpha / a.shape[-1]) * (a @ b)

    return delta


def _adapter_pairs(adapters: dict, flat_base: dict) -> dict:
    """{kernel path: (lora_a, lora_b)} of an adapter tree, each checked against its kernel
    [..., in, out]: lora_a [..., in, r], lora_b [..., r, out]."""
    flat = traverse_util.flatten_dict(adapters)
    pairs = {}
    for p in flat:
        if p[-1] not in (lora.LORA_A, lora.LORA_B):
            raise ValueError(f"adapters hold {'/'.join(p)}: expected only {lora.LORA_A} / {lora.LORA_B} leaves")
        kernel = p[:-1] + ("kernel",)
        a, b = flat.get(p[:-1] + (lora.LORA_A,)), flat.get(p[:-1] + (lora.LORA_B,))
        w = flat_base.get(kernel)
        if w is None or a is None or b is None:
            raise ValueError(f"adapters {'/'.join(p[:-1])}: need lora_a, lora_b and a base kernel at {'/'.join(kernel)}")
        if a.shape[:-1] != w.shape[:-1] or b.shape[-1] != w.shape[-1] or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"adapters {'/'.join(p[:-1])}: lora_a {a.shape} / lora_b {b.shape} do not fit the "
                             f"kernel {w.shape} (expected [..., in, r] and [..., r, out])")
        pairs[kernel] = (a, b)
    return pairs


def save_peft_adapter(path: str | os.PathLike, config: ModelConfig, adapters: dict, *, lora_alpha: float,
                      base_model_name_or_path: Optional[str] = None, dtype: Any = None) -> None:
    """Write a LoRA run's adapters in peft's layout (`PeftModel.from_pretrained(hf_model, path)`):
    adapter_model.safetensors with `base_model.model.<HF module>.lora_A.weight` [r, in] and
    `.lora_B.weight` [out, r] (torch Linear orientation: A^T, B^T of ours) per adapted
    projection, and adapter_config.json (peft_type LORA, r, lora_alpha, target_modules, task_type
    CAUSAL_LM, bias none, fan_in_fan_out false). peft scales by lora_alpha / r, as we do.
    `dtype`: of the tensors (default the adapters' own, which must be float32 or bfloat16)."""
    if not (isinstance(lora_alpha, (int, float)) and lora_alpha > 0):
        raise ValueError(f"save_peft_adapter: lora_alpha must be > 0 (the run's --lora-alpha), got {lora_alpha!r}")
    names = _param_map(config, "causal_lm")
    flat_base = {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in _expected_shapes(config, "causal_lm").items()}
    pairs = _adapter_pairs(adapters, flat_base)
    tensors, ranks = {}, set()
    for name, e in names.items():
        if e.path in pairs:
            a, b = pairs[e.path]
            ranks.add(int(a.shape[-1]))
            module = name[:-len(".weight")]
            tensors[f"base_model.model.{module}.lora_A.weight"] = (a, e.layer)
            tensors[f"base_model.model.{module}.lora_B.weight"] = (b, e.layer)
    if len(ranks) != 1:
        raise ValueError(f"save_peft_adapter: the adapters must share one rank (peft's r), got {sorted(ranks)}")
    dt = _float_dtype(dtype, next(iter(pairs.values()))[0].dtype)
    _write_peft(Path(path), tensors, dt, _peft_config(names, pairs, ranks.pop(), lora_alpha, base_model_name_or_path))


def _peft_config(names: dict, pairs: dict, rank: int, lora_alpha: float, base: Optional[str]) -> dict:
    """adapter_config.json: target_modules the short module names (q_proj, ...) when every layer
    of each is adapted, else the full HF module names of the adapted ones."""
    adapted = sorted(n[:-len(".weight")] for n, e in names.items() if e.path in pairs)
    short = sorted({n.split(".")[-1] for n in adapted})
    every = all(sum(n.endswith(f".{m}.weight") for n in names) == sum(a.endswith(f".{m}") for a in adapted)
                for m in short)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": float(lora_alpha),
            "target_modules": short if every else adapted, "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "base_model_name_or_path": base, "inference_mode": True,
            "use_rslora": False, "modules_to_save": None, "init_lora_weights": True}


def _write_peft(path: Path, tensors: dict, dt: np.dtype, adapter_config: dict) -> None:
    """Stream the peft tensors (transposed to torch's [out, in]) and write adapter_config.json;
    process 0 writes, every process gathers."""
    def fetch(name):
        x, layer = tensors[name]
        return _host_value(x if layer is None else x[layer]).astype(dt).T

    def shape(name):
        x, layer = tensors[name]
        return tuple(x.shape[1:] if layer is not None else x.shape)[::-1]

    lead = jax.process_index() == 0
    if lead:
        path.mkdir(parents=True, exist_ok=True)
    _write_safetensors(path / PEFT_WEIGHTS, [(n, shape(n), dt) for n in tensors], fetch, lead)
    if lead:
        with open(path / PEFT_CONFIG, "w", encoding="utf-8") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"xpo_jax save_peft_adapter {path}")
