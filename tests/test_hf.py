"""Tests for xpo_jax.models.hf: config parsing, safetensors load/save, and parity with transformers.

The parity tests build tiny random models with transformers (no hub), so they need torch and
transformers; they skip without them (see the `hf` fixture). The rest needs neither.
All comparisons are float32 with max abs difference < 1e-4.
"""
import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from xpo_jax.models import (ModelConfig, RewardModel, Transformer, get_config, init_params,
                            init_reward_params, stack_layer_params, unstack_layer_params)
from xpo_jax.models import hf as hf_module
from xpo_jax.models.hf import _raw_tensor, config_from_hf, load_hf, save_hf
from xpo_jax.models.transformer import Llama3RopeScaling
from xpo_jax.parallel import fsdp_spec, make_mesh

ATOL = 1e-4
PAD = 0
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf():
    """(torch, transformers), or skip the test -- except under CI (CI=true), which installs both:
    there a missing install must fail loudly, not skip the parity tests without anyone noticing."""
    if os.environ.get("CI"):
        import torch
        import transformers
    else:
        torch = pytest.importorskip("torch")
        transformers = pytest.importorskip("transformers")
    torch.set_grad_enabled(False)
    return torch, transformers


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _batch(vocab_size, seed=0):
    """tokens, mask [3, 10]: a full row, a left-padded prompt, and a left-padded prompt followed
    by a right-padded response (the layout the trainer feeds the model). Real tokens avoid PAD so
    HF's pad-token search agrees with the mask."""
    rng = np.random.default_rng(seed)
    mask = np.array([[1] * 10, [0] * 3 + [1] * 7, [0] * 4 + [1] * 4 + [0] * 2], np.int32)
    tokens = np.where(mask == 1, rng.integers(1, vocab_size, mask.shape), PAD).astype(np.int32)
    return tokens, mask


def _positions(mask):
    """RoPE positions as xpo_jax computes them (what HF generate passes for left padding)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _hf_out(hf, model, tokens, mask):
    torch, _ = hf
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(_positions(mask), dtype=torch.long))
    return out.logits.float().numpy()


def _randomize(hf, model, seed=0):
    """Random values in every tensor: HF's init leaves biases at 0 and norm scales at 1, which
    would hide a wrong mapping of exactly those tensors."""
    torch, _ = hf
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        p.copy_((1 + 0.1 * noise) if name.endswith("norm.weight") else 0.2 * noise)
    return model


def _hf_model(hf, cls_name, config_name=None, **cfg):
    """A random transformers model from a config (eager attention: no fused-kernel differences);
    config_name defaults to the class's family + "Config" (e.g. Gemma3ForCausalLM needs
    "Gemma3TextConfig")."""
    _, transformers = hf
    family = cls_name.split("For")[0]
    config_cls = getattr(transformers, config_name or family + "Config")
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config = config_cls(**{**base, **cfg})
    config._attn_implementation = "eager"
    return _randomize(hf, getattr(transformers, cls_name)(config).eval())


def _our_logits(config, params, tokens, mask):
    return np.asarray(Transformer(config).apply({"params": params}, tokens, mask))


def _our_rewards(config, params, tokens, mask):
    return np.asarray(RewardModel(config).apply({"params": params}, tokens, mask))


def _assert_close_on_mask(ours, theirs, mask):
    real = mask.astype(bool)
    np.testing.assert_array_less(np.abs(ours[real] - theirs[real]).max(), ATOL)


def _flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


# --------------------------------------------------------------------------------------------
# transformers checkpoint -> load_hf: logits / rewards agree
# --------------------------------------------------------------------------------------------


def test_llama_causal_lm_parity(hf, tmp_path):
    # GQA, untied head, llama3 RoPE scaling with a small original context so that the scaled,
    # smoothed and unscaled frequency bands all occur at head_dim 8.
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    model = _hf_model(hf, "LlamaForCausalLM", rope_parameters=rope, rms_norm_eps=1e-5,
                      max_position_embeddings=1024)
    model.save_pretrained(tmp_path)
    config, params, kind = load_hf(tmp_path)
    assert kind == "causal_lm"
    assert config.rope_scaling == Llama3RopeScaling(4.0, 1.0, 4.0, 256)
    assert (config.rope_theta, config.rms_eps, config.qkv_bias, config.tie_embeddings) == (
        500000.0, 1e-5, False, False)
    tokens, mask = _batch(config.vocab_size)
    _assert_close_on_mask(_our_logits(config, params, tokens, mask),
                          _hf_out(hf, model, tokens, mask), mask)


def test_qwen2_causal_lm_parity_sharded(hf, tmp_path):
    # q/k/v bias, tied embeddings, checkpoint split into several shards plus an index.
    model = _hf_model(hf, "Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1e6)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    config, params, kind = load_hf(tmp_path)
    assert kind == "causal_lm" and config.qkv_bias and config.tie_embeddings
    assert "lm_head" not in params and config.rope_theta == 1e6
    tokens, mask = _batch(config.vocab_size, seed=1)
    _assert_close_on_mask(_our_logits(config, params, tokens, mask),
                          _hf_out(hf, model, tokens, mask), mask)


def test_mistral_causal_lm_parity(hf, tmp_path):
    # head_dim 16 != hidden / heads = 8; the window (128) is masking, not a length cap.
    model = _hf_model(hf, "MistralForCausalLM", head_dim=16, sliding_window=128)
    model.save_pretrained(tmp_path)
    config, params, _ = load_hf(tmp_path)
    assert (config.head_dim, config.max_seq_len, config.sliding_window) == (16, 256, 128)
    tokens, mask = _batch(config.vocab_size, seed=2)
    _assert_close_on_mask(_our_logits(config, params, tokens, mask),
                          _hf_out(hf, model, tokens, mask), mask)


def test_qwen2_reward_model_parity_right_and_left_padded(hf, tmp_path):
    model = _hf_model(hf, "Qwen2ForSequenceClassification", num_labels=1, pad_token_id=PAD)
    model.save_pretrained(tmp_path)
    config, params, kind = load_hf(tmp_path)
    assert kind == "reward_model" and set(params) == {"model", "score"}
    rng = np.random.default_rng(3)
    lengths = np.array([10, 7, 4])
    right = (np.arange(10)[None] < lengths[:, None]).astype(np.int32)
    for mask in (right, right[:, ::-1].copy()):  # right-padded, then left-padded
        tokens = np.where(mask == 1, rng.integers(1, config.vocab_size, mask.shape), PAD).astype(np.int32)
        theirs = _hf_out(hf, model, tokens, mask)[:, 0]
        np.testing.assert_array_less(np.abs(_our_rewards(config, params, tokens, mask) - theirs).max(), ATOL)


def test_bf16_checkpoint_loads(hf, tmp_path):
    torch, _ = hf
    model = _hf_model(hf, "LlamaForCausalLM").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="np") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}

    config, params, _ = load_hf(tmp_path)  # default: upcast to float32, exactly
    assert params["model"]["norm"]["scale"].dtype == jnp.float32 and config.param_dtype == "float32"
    np.testing.assert_array_equal(params["model"]["layers_1"]["mlp"]["up_proj"]["kernel"],
                                  sd["model.layers.1.mlp.up_proj.weight"].T)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)

    config, params, _ = load_hf(tmp_path, dtype="bfloat16")
    assert config.param_dtype == config.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
    np.testing.assert_array_equal(np.asarray(params["model"]["embed_tokens"]["embedding"], np.float32),
                                  sd["model.embed_tokens.weight"])


# --------------------------------------------------------------------------------------------
# save_hf -> transformers from_pretrained: logits / rewards agree
# --------------------------------------------------------------------------------------------


def _random_config(**overrides):
    return get_config("test", vocab_size=97, init_std=0.2, **overrides)


def _noisy_norms(params, key):
    """init_params sets RMSNorm scales to 1 and biases to 0; perturb them so the export of those
    tensors is actually tested."""
    flat = traverse_util.flatten_dict(params)
    for i, (path, x) in enumerate(sorted(flat.items())):
        if path[-1] in ("scale", "bias"):
            noise = 0.1 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
            flat[path] = x + noise
    return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_save_hf_round_trip_causal_lm(hf, tmp_path, family):
    _, transformers = hf
    if family == "qwen2":  # q/k/v bias, untied head, written as shards
        config, shard_size = _random_config(), 16_000
    else:  # no bias, tied embeddings, llama3 RoPE scaling
        config = _random_config(qkv_bias=False, tie_embeddings=True,
                                rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 128))
        shard_size = None
    params = _noisy_norms(init_params(config, jax.random.key(0)), jax.random.key(1))
    save_hf(tmp_path, config, params, shard_size=shard_size)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard_size is not None)

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(model).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[family]
    tokens, mask = _batch(config.vocab_size, seed=4)
    _assert_close_on_mask(_our_logits(config, params, tokens, mask),
                          _hf_out(hf, model, tokens, mask), mask)

    config2, params2, kind = load_hf(tmp_path)  # and back: the same config and exactly the same params
    assert kind == "causal_lm" and config2 == config
    flat, flat2 = _flat(params), _flat(params2)
    assert flat.keys() == flat2.keys()
    for k in flat:
        np.testing.assert_array_equal(flat[k], flat2[k])


def test_save_hf_round_trip_reward_model(hf, tmp_path):
    _, transformers = hf
    config = _random_config(qkv_bias=False)  # exported as LlamaForSequenceClassification
    params = _noisy_norms(init_reward_params(config, jax.random.key(0)), jax.random.key(1))
    save_hf(tmp_path, config, params, kind="reward_model", extra_config={"pad_token_id": PAD})
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    tokens, mask = _batch(config.vocab_size, seed=5)
    mask[2, 8:] = 1  # right-aligned real tokens in every row: HF and we read the same position
    tokens = np.where(mask == 1, np.maximum(tokens, 1), PAD).astype(np.int32)
    theirs = _hf_out(hf, model, tokens, mask)[:, 0]
    np.testing.assert_array_less(np.abs(_our_rewards(config, params, tokens, mask) - theirs).max(), ATOL)


def test_save_hf_bf16(hf, tmp_path):
    torch, transformers = hf
    config = _random_config()
    params = init_params(config, jax.random.key(0))
    save_hf(tmp_path, config, params, dtype="bfloat16")
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["torch_dtype"] == hf_config["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16
    want = np.asarray(params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]).astype(ml_dtypes.bfloat16)
    got = model.model.layers[0].self_attn.q_proj.weight.float().numpy()
    np.testing.assert_array_equal(got, want.astype(np.float32).T)


# --------------------------------------------------------------------------------------------
# Checkpoint errors (no torch needed)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A small Qwen2-style checkpoint written by save_hf: (dir, config, params)."""
    config = _random_config()
    params = init_params(config, jax.random.key(0))
    save_hf(tmp_path, config, params)
    return tmp_path, config, params


def _rewrite(path, edit):
    """Rewrite model.safetensors with `edit(tensors dict)` applied."""
    file = path / "model.safetensors"
    with safe_open(file, framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor_names_it(saved):
    path, _, _ = saved
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(path)


def test_unexpected_tensor_names_it_but_inv_freq_is_ignored(saved):
    path, config, params = saved
    _rewrite(path, lambda t: t.update({
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
    load_hf(path)  # old checkpoints carry RoPE buffers: harmless
    _rewrite(path, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(4, np.float32)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        load_hf(path)


def test_wrong_shape_names_tensor(saved):
    path, _, _ = saved
    _rewrite(path, lambda t: t.update({"model.norm.weight": np.ones(7, np.float32)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(7,\)"):
        load_hf(path)


def test_unknown_architecture_names_it(saved):
    path, _, _ = saved
    hf_config = json.loads((path / "config.json").read_text())
    hf_config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_hf(path)


def test_no_safetensors_is_a_clear_error(saved):
    path, _, _ = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf(path)


def test_save_hf_rejects_params_of_another_config(saved, tmp_path):
    _, config, params = saved
    with pytest.raises(KeyError, match="score/kernel"):
        save_hf(tmp_path / "rm", config, params, kind="reward_model")
    with pytest.raises(ValueError, match="shape"):
        save_hf(tmp_path / "wide", dataclasses.replace(config, mlp_dim=32), params)


def test_raw_bf16_reader_matches_safetensors(tmp_path):
    # The fallback for safetensors releases whose numpy API cannot build bfloat16 arrays.
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    y = np.arange(4, dtype=np.float32)
    save_file({"x": x, "y": y}, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    got = _raw_tensor(tmp_path / "t.safetensors", "x")
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.view(np.uint16), x.view(np.uint16))
    np.testing.assert_array_equal(_raw_tensor(tmp_path / "t.safetensors", "y"), y)


def test_sharded_save_and_load_without_torch(tmp_path):
    config = _random_config(tie_embeddings=True)
    params = init_params(config, jax.random.key(2))
    save_hf(tmp_path, config, params, shard_size=10_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    assert len(set(index["weight_map"].values())) > 2
    _, params2, _ = load_hf(tmp_path)
    for (k, a), (k2, b) in zip(sorted(_flat(params).items()), sorted(_flat(params2).items())):
        assert k == k2
        np.testing.assert_array_equal(a, b)
    save_hf(tmp_path, config, params)  # re-saving unsharded removes the old shards and index
    assert not list(tmp_path.glob("model-*")) and not (tmp_path / "model.safetensors.index.json").exists()
    load_hf(tmp_path)


# --------------------------------------------------------------------------------------------
# Loading straight into shardings; saving sharded params; scan_layers
# --------------------------------------------------------------------------------------------


def _fsdp_rule(mesh):
    """load_hf's `shardings`: xpo_jax.parallel's FSDP rule, except that a stacked (scan_layers)
    parameter keeps its leading layer axis whole and is split as one of its layers would be."""
    f = mesh.shape["fsdp"]

    def rule(path, shape):
        if "layers" in path:  # model/layers/... (stacked); the unrolled ones are layers_{i}
            return NamedSharding(mesh, P(None, *fsdp_spec(shape[1:], f)))
        return NamedSharding(mesh, P(*fsdp_spec(shape, f)))

    return rule


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Qwen2-style checkpoint (q/k/v bias, untied head, vocab 97) written by save_hf."""
    path = tmp_path_factory.mktemp("ckpt")
    config = _random_config()
    save_hf(path, config, _noisy_norms(init_params(config, jax.random.key(5)), jax.random.key(6)))
    return path


@pytest.mark.parametrize("data,fsdp,scan", [(4, 2, False), (1, 8, True)])
def test_sharded_load_matches_unsharded(checkpoint, data, fsdp, scan):
    mesh = make_mesh(data, fsdp)
    overrides = {"scan_layers": scan}
    config, whole, _ = load_hf(checkpoint, overrides=overrides)
    config2, sharded, _ = load_hf(checkpoint, shardings=_fsdp_rule(mesh), overrides=overrides)
    assert config2 == config and config.scan_layers == scan
    flat, flat_sharded = traverse_util.flatten_dict(whole), traverse_util.flatten_dict(sharded)
    assert flat.keys() == flat_sharded.keys()
    for k, x in flat.items():
        np.testing.assert_array_equal(np.asarray(flat_sharded[k]), x, err_msg=str(k))
        assert flat_sharded[k].sharding == _fsdp_rule(mesh)(k, x.shape)

    # Memory: each device holds 1/fsdp of the split weights (of every byte, counted shard by shard).
    split = [x for x in flat_sharded.values() if not x.sharding.is_fully_replicated]
    total = sum(x.nbytes for x in split)
    assert total > 0.8 * sum(x.nbytes for x in flat_sharded.values())  # the large weights are split
    for device in mesh.devices.flat:
        resident = sum(s.data.nbytes for x in split for s in x.addressable_shards if s.device == device)
        assert abs(resident - total / fsdp) <= 0.1 * total / fsdp, (device, resident, total)

    tokens, mask = _batch(config.vocab_size, seed=7)
    tokens, mask = np.tile(tokens, (8, 1))[:8], np.tile(mask, (8, 1))[:8]  # 8 rows: one per device
    forward = jax.jit(Transformer(config).apply)
    with jax.set_mesh(mesh):
        got = np.asarray(forward({"params": sharded}, tokens, mask))
    _assert_close_on_mask(got, np.asarray(forward({"params": whole}, tokens, mask)), mask)


def test_sharded_load_reads_slices_only(checkpoint, monkeypatch):
    """Every read of a split weight returns 1/fsdp of it: the callback slices the file; the
    stacked (scan_layers) tensors are assembled from slices of the per-layer tensors; and the
    bfloat16 conversion happens slice by slice."""
    reads = []
    real = hf_module._read_slice

    def spy(f, file, name, index):
        x = real(f, file, name, index)
        reads.append((name, x.size, f.get_slice(name).get_shape()))
        return x

    monkeypatch.setattr(hf_module, "_read_slice", spy)
    mesh = make_mesh(1, 8)
    _, params, _ = load_hf(checkpoint, dtype="bfloat16", shardings=_fsdp_rule(mesh),
                           overrides={"scan_layers": True})
    up = [(size, math.prod(shape)) for name, size, shape in reads if name == "model.layers.1.mlp.up_proj.weight"]
    assert len(up) == 8 and all(size == full // 8 for size, full in up)  # one slice per device
    for name, size, shape in reads:
        if math.prod(shape) >= 1024:  # fsdp_spec splits these (vocab 97 splits on d_model)
            assert size == math.prod(shape) // 8, name
    monkeypatch.undo()
    kernel = params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16 and kernel.sharding.spec == P(None, None, "fsdp")
    _, whole, _ = load_hf(checkpoint)
    np.testing.assert_array_equal(np.asarray(kernel)[1], np.asarray(whole["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]).astype(ml_dtypes.bfloat16))


def test_save_sharded_params_writes_the_same_files(checkpoint, tmp_path, monkeypatch):
    """save_hf of a sharded tree gathers one tensor at a time: the files are byte-identical to
    those of the unsharded tree. A process other than 0 gathers but writes nothing."""
    mesh = make_mesh(4, 2)
    config, sharded, _ = load_hf(checkpoint, shardings=_fsdp_rule(mesh))
    _, whole, _ = load_hf(checkpoint)
    save_hf(tmp_path / "whole", config, whole, shard_size=20_000)
    save_hf(tmp_path / "sharded", config, sharded, shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert len(files) > 3 and files == sorted(p.name for p in (tmp_path / "sharded").iterdir())
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "sharded" / name).read_bytes(), name
    # Our streamed files read back exactly (also by safetensors' own reader, through load_hf).
    _, again, _ = load_hf(tmp_path / "sharded")
    for k, x in _flat(whole).items():
        np.testing.assert_array_equal(_flat(again)[k], x)
    gathered = []
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(hf_module, "_host_value", lambda x: gathered.append(x.shape) or np.asarray(x))
    save_hf(tmp_path / "not_lead", config, sharded)
    assert not (tmp_path / "not_lead").exists() and len(gathered) == len(hf_module._param_map(config, "causal_lm"))


def test_scan_layers_hf_round_trip(hf, tmp_path):
    """A scan_layers model exports HF's per-layer tensors (transformers loads them and agrees)
    and loads back stacked, or unrolled, exactly."""
    _, transformers = hf
    config = _random_config(scan_layers=True)
    params = _noisy_norms(init_params(config, jax.random.key(8)), jax.random.key(9))
    assert params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    save_hf(tmp_path, config, params, shard_size=20_000)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens, mask = _batch(config.vocab_size, seed=8)
    _assert_close_on_mask(_our_logits(config, params, tokens, mask), _hf_out(hf, model, tokens, mask), mask)

    config2, params2, _ = load_hf(tmp_path, overrides={"scan_layers": True})
    assert config2 == config
    for k, x in _flat(params).items():
        np.testing.assert_array_equal(_flat(params2)[k], x)
    config3, unrolled, _ = load_hf(tmp_path)
    assert not config3.scan_layers
    want = _flat(unstack_layer_params(params, config.n_layers))
    assert want.keys() == _flat(unrolled).keys()
    for k, x in want.items():
        np.testing.assert_array_equal(_flat(unrolled)[k], x)
    assert _flat(stack_layer_params(unrolled, 2)).keys() == _flat(params).keys()


def test_load_hf_overrides(checkpoint):
    config, _, _ = load_hf(checkpoint, overrides={"dtype": "bfloat16", "remat": "block", "suppress_ids": [0]})
    assert (config.dtype, config.param_dtype, config.remat, config.suppress_ids) == ("bfloat16", "float32", "block", (0,))
    with pytest.raises(ValueError, match="param_dtype"):
        load_hf(checkpoint, overrides={"param_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="nope"):
        load_hf(checkpoint, overrides={"nope": 1})
    with pytest.raises(ValueError, match="remat"):
        load_hf(checkpoint, overrides={"remat": "sometimes"})


# --------------------------------------------------------------------------------------------
# config_from_hf on hand-written config.json dicts (both transformers dialects)
# --------------------------------------------------------------------------------------------


def _qwen25_v4_config(**overrides):
    """Qwen2.5-0.5B-Instruct's config.json, as transformers 4.x wrote it."""
    c = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
         "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768,
         "max_window_layers": 21, "num_attention_heads": 14, "num_hidden_layers": 24,
         "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
         "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
         "use_sliding_window": False, "vocab_size": 151936, "rope_scaling": None}
    c.update(overrides)
    return c


def test_config_qwen25_v4_dialect():
    assert config_from_hf(_qwen25_v4_config()) == ModelConfig(
        vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
        mlp_dim=4864, rope_theta=1e6, rms_eps=1e-6, qkv_bias=True, tie_embeddings=True,
        max_seq_len=32768)


def test_config_llama32_v4_and_v5_dialects_agree():
    v4 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
          "intermediate_size": 8192, "num_attention_heads": 32, "num_hidden_layers": 16,
          "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
          "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True,
          "vocab_size": 128256, "attention_bias": False, "mlp_bias": False,
          "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": 500000.0}
    want = ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                       head_dim=64, mlp_dim=8192, rope_theta=500000.0, rms_eps=1e-5, qkv_bias=False,
                       tie_embeddings=True, max_seq_len=131072,
                       rope_scaling=Llama3RopeScaling(32.0, 1.0, 4.0, 8192))
    assert config_from_hf(v4) == config_from_hf(v5) == want


def test_config_sliding_window_is_masking_per_layer():
    # The window is attention masking (tests/test_gemma.py checks it against transformers);
    # max_seq_len stays max_position_embeddings.
    mistral = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
               "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100,
               "max_position_embeddings": 32768, "sliding_window": 4096}
    c = config_from_hf(mistral)
    assert (c.max_seq_len, c.sliding_window, c.sliding_layers()) == (32768, 4096, (True, True))
    c = config_from_hf({**mistral, "sliding_window": None})
    assert (c.sliding_window, c.sliding_layers()) == (None, (False, False))
    # Qwen2: only when use_sliding_window is on, and then the layers from max_window_layers on.
    c = config_from_hf(_qwen25_v4_config(use_sliding_window=True, sliding_window=1024, max_window_layers=22))
    assert (c.max_seq_len, c.sliding_window) == (32768, 1024)
    assert c.sliding_layers() == (False,) * 22 + (True,) * 2
    c = config_from_hf(_qwen25_v4_config(use_sliding_window=True, sliding_window=1024, max_window_layers=24))
    assert c.sliding_window is None and not any(c.sliding_layers())
    assert config_from_hf(_qwen25_v4_config(sliding_window=1024)).sliding_window is None


@pytest.mark.parametrize("overrides, key", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_parameters"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"architectures": ["LlamaForCausalLM"], "attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ({"architectures": ["Qwen2ForSequenceClassification"], "id2label": {"0": "a", "1": "b"}}, "id2label"),
])
def test_config_unsupported_features_name_the_key(overrides, key):
    with pytest.raises(NotImplementedError, match=key):
        config_from_hf(_qwen25_v4_config(**overrides))


def test_config_unknown_architecture_and_missing_key():
    with pytest.raises(ValueError, match="PhiForCausalLM"):
        config_from_hf(_qwen25_v4_config(architectures=["PhiForCausalLM"]))
    bad = _qwen25_v4_config()
    del bad["num_hidden_layers"]
    with pytest.raises(ValueError, match="num_hidden_layers"):
        config_from_hf(bad)


# --------------------------------------------------------------------------------------------
# experiments/make_tiny_hf.py
# --------------------------------------------------------------------------------------------


def test_make_tiny_hf(tmp_path):
    from xpo_jax.hf.tokenizer import TextTokenizer

    spec = importlib.util.spec_from_file_location("make_tiny_hf", REPO / "experiments/make_tiny_hf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    policy_dir, reward_dir = script.main([str(tmp_path)])

    config, params, kind = load_hf(policy_dir)
    rm_config, rm_params, rm_kind = load_hf(reward_dir)
    assert (kind, rm_kind) == ("causal_lm", "reward_model")
    for d in (policy_dir, reward_dir):
        tok = TextTokenizer.from_dir(d)
        assert tok.vocab_size == config.vocab_size == rm_config.vocab_size
        assert tok.chat_template and tok.eos_id is not None and tok.pad_id is not None
        hf_config = json.loads((Path(d) / "config.json").read_text())
        assert (hf_config["eos_token_id"], hf_config["pad_token_id"]) == (tok.eos_id, tok.pad_id)
    prompts = [[{"role": "user", "content": "Write a haiku about autumn leaves."}], "Hello there"]
    tokens, mask, _ = tok.encode_prompts(prompts, max_prompt_length=24)
    assert tok.decode(tokens[0]).count("autumn") == 1
    logits = _our_logits(config, params, tokens, mask)
    rewards = _our_rewards(rm_config, rm_params, tokens, mask)
    assert logits.shape == (2, 24, config.vocab_size) and np.isfinite(logits).all()
    assert rewards.shape == (2,) and np.isfinite(rewards).all()
