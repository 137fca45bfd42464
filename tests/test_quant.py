"""QLoRA (issue 20 item 2): the frozen base's projections as int8 / NF4 codes (xpo_jax.models.quant),
dequantized inside LoraDense; a QLoRA run trains only the adapters on the quantized base, starts at
the reference, leaves the base's bytes alone and on data 2 x fsdp 2 x tensor 2 equals one device."""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import host, max_diff, no_plots, parallel_test_config, trained_run_fixtures  # noqa: F401 (autouse fixture)

from xpo_jax import hlo, parallel as par
from xpo_jax.cli import main as cli_main
from xpo_jax.config import TrainConfig
from xpo_jax.models import lora, quant
from xpo_jax.models.hf import load_hf, save_hf
from xpo_jax.models.lora import LoraDense
from xpo_jax.models.transformer import get_config, init_params
from xpo_jax.parallel import Layout
from xpo_jax.round import completion_logits_fn, policy_params_fn
from xpo_jax.tasks import make_reference
from xpo_jax.train import Trainer

RNG = np.random.default_rng(0)
CFG = parallel_test_config(lora_rank=4, lora_alpha=8.0, rounds=2, base_dtype="nf4")


def unpack_nf4(codes: np.ndarray) -> np.ndarray:
    """The NF4 indices [..., in, out] of packed codes [..., in / 2, out] (low nibble: even rows)."""
    q = np.stack([codes & 15, codes >> 4], axis=-2)
    return q.reshape(*codes.shape[:-2], 2 * codes.shape[-2], codes.shape[-1])


def test_int8_round_trip_within_half_a_step():
    w = RNG.normal(size=(3, 40, 24)).astype(np.float32)  # stacked [L, in, out]
    w[1, :, 5] = 0.0  # an all-zero column: scale 0, codes 0
    codes, scale = quant.quantize(w, "int8")
    assert codes.dtype == np.int8 and codes.shape == w.shape and scale.shape == (3, 1, 24)
    s = scale.astype(np.float64)
    np.testing.assert_array_equal(scale, (np.abs(w).max(axis=1, keepdims=True) / 127.0).astype(np.float32))
    assert np.all(np.abs(w - codes * s) <= s / 2)  # float64: exactly half a step at most
    np.testing.assert_array_equal(quant.dequantize(codes, scale), codes.astype(np.float32) * scale)
    assert quant.kernel_shape(codes) == w.shape


def test_nf4_codes_are_the_nearest_values_and_pack_exactly():
    w = RNG.normal(size=(2, 128, 12)).astype(np.float32)
    codes, scale = quant.quantize(w, "nf4")
    assert codes.dtype == np.uint8 and codes.shape == (2, 64, 12) and scale.shape == (2, 2, 12)  # blocks of 64
    q = unpack_nf4(codes)
    absmax = np.abs(w.reshape(2, 2, 64, 12)).max(axis=2)
    np.testing.assert_array_equal(scale, absmax.astype(np.float32))
    x = (w.reshape(2, 2, 64, 12) / absmax[:, :, None].astype(np.float64)).reshape(w.shape)
    dist = np.abs(x[..., None] - quant.NF4.astype(np.float64))  # [..., 16]
    np.testing.assert_allclose(np.take_along_axis(dist, q[..., None].astype(int), -1)[..., 0], dist.min(-1),
                               rtol=0, atol=1e-12)
    repacked = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).astype(np.uint8)
    np.testing.assert_array_equal(repacked, codes)  # the packing round trip
    want = (quant.NF4[q].reshape(2, 2, 64, 12) * scale[:, :, None]).reshape(w.shape)
    np.testing.assert_array_equal(quant.dequantize(codes, scale), want)
    assert quant.kernel_shape(codes) == w.shape
    assert quant.quantize(w[:, :32], "nf4")[1].shape == (2, 1, 12)  # 64 does not divide 32: blocks of gcd = 32
    with pytest.raises(ValueError, match="nf4: q_proj has 33 inputs"):
        quant.quantize(w[0, :33], "nf4", "q_proj")


@pytest.mark.parametrize("kind,dtype", [("int8", jnp.float32), ("nf4", jnp.bfloat16)])
def test_lora_dense_dequantizes_like_dense(kind, dtype):
    """LoraDense on (kernel_q, kernel_scale) is nn.Dense on the dequantized kernel; with adapters
    it adds (x A) B as on a float kernel."""
    w, bias = RNG.normal(size=(64, 16)).astype(np.float32), RNG.normal(size=(16,)).astype(np.float32)
    codes, scale = quant.quantize(w, kind)
    x = jnp.asarray(RNG.normal(size=(2, 3, 64)), jnp.float32)
    deq = {"kernel": quant.dequantize(codes, scale), "bias": bias}
    q = {quant.CODES: codes, quant.SCALE: scale, "bias": bias}
    ours, dense = LoraDense(16, dtype=dtype), nn.Dense(16, dtype=dtype)
    np.testing.assert_array_equal(ours.apply({"params": q}, x), dense.apply({"params": deq}, x))
    ad = {"lora_a": RNG.normal(size=(64, 2)).astype(np.float32), "lora_b": RNG.normal(size=(2, 16)).astype(np.float32)}
    np.testing.assert_array_equal(ours.apply({"params": {**q, **ad}}, x), ours.apply({"params": {**deq, **ad}}, x))


def test_bad_base_dtype_is_one_clear_line(capsys):
    for bad, match in [(dict(base_dtype="fp8"), r"--base-dtype='fp8': expected one of auto, float32, bfloat16, "
                                                 r"int8, nf4"),
                       (dict(base_dtype="nf4"), r"--base-dtype='nf4': a quantized base cannot be trained: it needs "
                                                r"--lora-rank > 0"),
                       (dict(base_dtype="float32", ref_dtype="bfloat16"), "--base-dtype='float32': contradicts")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad).validate()
    assert cli_main(["train", "--base-dtype", "int4", "--lora-rank", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--base-dtype='int4': expected one of" in err[0], err


# -- a QLoRA run ----------------------------------------------------------------------------------


run, trained = trained_run_fixtures(CFG, "qlora")  # two rounds on one device, saved at the end


def test_state_is_adapters_on_a_quantized_base(run):
    shapes = run.state_shapes()
    dtypes = {str(x.dtype) for p, x in jax.tree_util.tree_flatten_with_path(shapes.ref_params)[0]
              if jax.tree_util.keystr(p).endswith(f"'{quant.CODES}']")}
    assert dtypes == {"uint8"}
    assert not any(jax.tree_util.keystr(p).endswith("['kernel']") and "proj" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_flatten_with_path(shapes.ref_params)[0])  # no float projection
    adapters = lora.adapter_shapes(run.ref_params, CFG.lora_rank, lora.DEFAULT_TARGETS)
    assert lora.tree_bytes(shapes.params) == lora.tree_bytes(adapters)
    assert lora.tree_bytes(shapes.opt_state) - 2 * lora.tree_bytes(adapters) < 64  # Adam's mu, nu (+ counters)
    float_base = make_reference(run.task, jax.random.PRNGKey(CFG.reference_seed))  # what auto would store
    assert lora.tree_bytes(run.ref_params) < 0.7 * lora.tree_bytes(float_base)
    # the same kernels, quantized: dequantized within half an NF4 step of the block's absmax
    assert max_diff(quant.dequantized(run.ref_params), float_base) < 0.2


def test_round_0_policy_is_the_reference(run):
    state = jax.jit(run.init_state)(jax.random.PRNGKey(0), run.hparams(), run.ref_params)
    policy = policy_params_fn(CFG)(state.params, state.ref_params)
    tokens = jnp.asarray(run.task.prompts[:4]).astype(jnp.int32)
    mask = jnp.asarray(run.task.prompt_mask[:4])
    logits = jax.jit(completion_logits_fn(run.apply_fn, 2))
    np.testing.assert_array_equal(logits(policy, tokens, mask), logits(run.ref_params, tokens, mask))


def test_training_moves_only_adapters_and_resume_refuses_another_base(run, trained):
    state = trained["state"]
    assert max_diff(state.ref_params, run.ref_params) == 0.0  # the codes and scales unchanged
    b = [x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0] if "lora_b" in jax.tree_util.keystr(p)]
    assert all(np.any(x != 0) for x in b)
    other = dataclasses.replace(run, ref_params=jax.tree_util.tree_map_with_path(
        lambda p, x: x * 1.01 if quant.SCALE in jax.tree_util.keystr(p) else x, run.ref_params))
    with pytest.raises(ValueError, match="lora-base-params changed"):
        Trainer(dataclasses.replace(trained["cfg"], resume=True, rounds=3), run=other).run()
    assert os.path.isdir(os.path.join(trained["cfg"].run_dir, "one", "checkpoints", "2"))
    # one copy of the base on device: the state's ref_params are the program's placed arrays, alive
    t = trained["trainer"]
    pairs = zip(jax.tree_util.tree_leaves(t.state.ref_params), jax.tree_util.tree_leaves(t.program.ref_params))
    assert all(a is b and not a.is_deleted() for a, b in pairs)


def test_mesh_2x2x2_equals_one_device(run, trained, tmp_path):
    """Codes and scales split as their kernels (tensor and fsdp), the decode layout leaves them
    quantized: the run on data 2 x fsdp 2 x tensor 2 ends where the one-device run does (1e-4)."""
    mesh = par.make_mesh(2, 2, 2)
    cfg = dataclasses.replace(CFG, run_dir=str(tmp_path), name="mesh")
    t = Trainer(cfg, mesh=mesh, run=run.with_layout(Layout(mesh)))
    t.run()
    assert max_diff(host(t.state.params), trained["state"].params) < 1e-4
    q = t.program.state_sharding.ref_params["model"]["layers_0"]["self_attn"]["q_proj"]
    assert "tensor" in str(q[quant.CODES].spec) and "tensor" in str(q[quant.SCALE].spec)  # columns
    weights = hlo.weight_shapes(t.program.abstract_state.ref_params, min_size=256)  # the tiny codes too
    assert hlo.weight_gathers_in_sampling_loops(t.program._step.as_text(), weights) == []


def test_quantized_sharding_rules():
    P = jax.sharding.PartitionSpec
    lay = Layout(par.make_mesh(2, 2, 2))
    path = lambda s: tuple(jax.tree_util.DictKey(k) for k in s.split("/"))
    spec = lambda s, shape: lay.param_spec(path(s), shape)
    dspec = lambda s, shape: lay.decode_spec(path(s), shape)
    # o_proj (rows over tensor), nf4 of a [4096, 4096] kernel: codes [2048, 4096], scales [64, 4096]
    assert spec("model/layers/self_attn/o_proj/kernel_q", (2, 2048, 4096)) == P(None, "tensor", "fsdp")
    assert spec("model/layers/self_attn/o_proj/kernel_scale", (2, 64, 4096)) == P(None, "tensor", "fsdp")
    assert spec("model/layers/mlp/up_proj/kernel_scale", (2, 1, 4096)) == P(None, None, "tensor")  # int8: columns
    assert dspec("model/layers/mlp/down_proj/kernel_q", (2, 7168, 4096)) == P(None, ("fsdp", "tensor"))
    assert dspec("model/layers/mlp/down_proj/kernel_scale", (2, 224, 4096)) == P(None, ("fsdp", "tensor"))
    assert dspec("model/layers/mlp/down_proj/kernel_scale", (2, 2, 4096)) == P()  # whole: every shard's scales
    # training: the codes are gathered over fsdp (tensor split kept) before they are dequantized
    codes = jax.device_put(jnp.zeros((64, 32), jnp.uint8), jax.sharding.NamedSharding(lay.mesh, P("tensor", "fsdp")))
    with lay.activations(par.TRAIN):
        pinned = jax.jit(lambda c: par.pin_codes_gathered(c, ("model", "o_proj", quant.CODES)))(codes)
    assert pinned.sharding.spec == P("tensor")
    decoded = jax.jit(lambda t: lay.decode_params(t, jnp.bfloat16))(
        {"o_proj": {quant.CODES: jnp.zeros((64, 32), jnp.uint8), quant.SCALE: jnp.ones((1, 32))}})
    assert decoded["o_proj"][quant.CODES].dtype == jnp.uint8 and decoded["o_proj"][quant.SCALE].dtype == jnp.float32


def test_hf_load_quantizes_on_the_host_and_save_writes_the_dequantized_base(tmp_path):
    """load_hf(quantize=) gives quantize_base's codes and scales (whole, or straight into their
    shardings on a 2 x 2 x 2 mesh); save_hf of a quantized base + adapters writes W_deq + s A B."""
    config = get_config("test", scan_layers=True)
    base = host(jax.jit(init_params, static_argnums=0)(config, jax.random.PRNGKey(1)))
    save_hf(tmp_path / "float", config, base)
    want = quant.quantize_base(base, lora.adaptable_kernels(base), "nf4")
    _, q, _ = load_hf(tmp_path / "float", overrides={"scan_layers": True}, quantize="nf4")
    assert jax.tree_util.tree_structure(q) == jax.tree_util.tree_structure(want) and max_diff(q, want) == 0.0
    shardings = Layout(par.make_mesh(2, 2, 2)).param_fn()
    _, sharded, _ = load_hf(tmp_path / "float", overrides={"scan_layers": True}, quantize="nf4", shardings=shardings)
    assert max_diff(sharded, want) == 0.0
    ad = lora.init_adapters(q, 4, lora.DEFAULT_TARGETS, jax.random.PRNGKey(2))
    ad = jax.tree_util.tree_map(lambda x: x + 0.1, ad)  # lora_b nonzero
    save_hf(tmp_path / "merged", config, q, adapters=ad, lora_alpha=8.0)
    _, merged, _ = load_hf(tmp_path / "merged", overrides={"scan_layers": True})
    assert max_diff(merged, lora.merged(q, ad, 2.0)) < 1e-6
