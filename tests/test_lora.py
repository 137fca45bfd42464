"""LoRA policies (issue 20 items 1 and 3): the adapters are the trained state, the base is the
reference (one copy), checkpoints hold the adapters and a fingerprint of the base, the policy on
a 2 x 2 x 2 mesh equals one device, and the export (merged, or peft's layout) gives our logits."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import host, max_diff, no_plots, parallel_test_config, trained_run_fixtures  # noqa: F401 (autouse fixture)

from xpo_jax import parallel as par
from xpo_jax.config import TrainConfig
from xpo_jax.models import lora
from xpo_jax.models.hf import load_hf, save_hf, save_peft_adapter
from xpo_jax.models.transformer import Transformer, get_config, init_params
from xpo_jax.parallel import Layout
from xpo_jax.round import completion_logits_fn, policy_params_fn
from xpo_jax.run import build_run
from xpo_jax.train import Trainer

RANK, ALPHA = 4, 8.0
CFG = parallel_test_config(lora_rank=RANK, lora_alpha=ALPHA, rounds=2)


run, trained = trained_run_fixtures(CFG, "lora")  # two rounds on one device, saved at the end


def test_config_validation_and_targets(run):
    for bad, match in [(dict(lora_rank=-1), "lora-rank"), (dict(lora_alpha=0.0), "lora-alpha"),
                       (dict(lora_targets="("), "lora-targets")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad).validate()
    with pytest.raises(ValueError, match=r"--lora-targets='nothing_here' matches no kernel.*q_proj"):
        lora.target_kernels(run.ref_params, "nothing_here")
    with pytest.raises(ValueError, match="LoRA adapts the decoder's projections, but this run's policy is "
                                         "TabularPolicy"):
        build_run(TrainConfig(task="bandit-1e-1", lora_rank=2))
    only_q = lora.target_kernels(run.ref_params, r"layers_0/self_attn/q_proj")
    assert list(only_q) == ["model/layers_0/self_attn/q_proj/kernel"]
    every = lora.target_kernels(run.ref_params, lora.DEFAULT_TARGETS)
    smallest = min(min(shape[-2:]) for shape in every.values())
    lora.check_rank(every, smallest)  # full rank is allowed
    with pytest.raises(ValueError, match=rf"--lora-rank={smallest + 1}: exceeds min\(in, out\) = {smallest} of model/"):
        lora.check_rank(every, smallest + 1)


def test_state_holds_only_adapters(run):
    """params and Adam's moments are the adapters' shapes; the base is the reference, and the
    LoRA run's base is the full fine-tuning run's reference, byte for byte."""
    shapes = run.state_shapes()
    want = lora.adapter_shapes(run.ref_params, RANK, lora.DEFAULT_TARGETS)
    assert jax.tree_util.tree_structure(shapes.params) == jax.tree_util.tree_structure(want)
    assert lora.tree_bytes(shapes.params) == lora.tree_bytes(want) < lora.tree_bytes(run.ref_params) / 4
    adapter_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(want)}
    opt = [tuple(x.shape) for x in jax.tree_util.tree_leaves(shapes.opt_state)]
    assert {s for s in opt if s} <= adapter_shapes
    assert sum(np.prod(s) for s in opt if s) == 2 * sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(want))
    full = build_run(dataclasses.replace(CFG, lora_rank=0))
    assert max_diff(full.ref_params, run.ref_params) == 0.0


def test_policy_at_round_0_is_the_reference_and_ref_logprobs_are_the_base(run):
    """Round 0: lora_b = 0, so the policy's logits are the base's (float rounding of x A 0 is
    exact: the same logits). The reference of the round is the base tree through the same
    module: bitwise the base model's log-probs (one compiled program, called twice)."""
    state = jax.jit(run.init_state)(jax.random.PRNGKey(0), run.hparams(), run.ref_params)
    policy = policy_params_fn(CFG)(state.params, state.ref_params)
    tokens = jnp.asarray(run.task.prompts[:4]).astype(jnp.int32)
    mask = jnp.asarray(run.task.prompt_mask[:4])
    logits = jax.jit(completion_logits_fn(run.apply_fn, 2))
    base = Transformer(run.apply_fn.__self__.config)  # a separately built model of the same config
    np.testing.assert_array_equal(logits(state.ref_params, tokens, mask), logits(run.ref_params, tokens, mask))
    ref_model = jax.jit(completion_logits_fn(base.apply, 2))(run.ref_params, tokens, mask)
    np.testing.assert_allclose(logits(policy, tokens, mask), ref_model, rtol=0, atol=1e-6)
    b = [x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0] if "lora_b" in jax.tree_util.keystr(p)]
    assert all(not np.any(np.asarray(x)) for x in b)


def test_training_moves_only_adapters(run, trained):
    state = trained["state"]
    assert max_diff(state.ref_params, run.ref_params) == 0.0  # base bytes unchanged
    b = [x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0] if "lora_b" in jax.tree_util.keystr(p)]
    assert all(np.any(x != 0) for x in b)  # every adapter moved


def test_checkpoint_holds_adapters_and_refuses_another_base(run, trained):
    ckpt = os.path.join(trained["cfg"].run_dir, "one", "checkpoints", "2")
    data = json.load(open(os.path.join(ckpt, "data", "metadata")))
    base = data["model_fingerprints"]["task"]["files"]["lora-base-params"]
    assert base == [lora.tree_bytes(run.ref_params), lora.base_fingerprint(run.ref_params)]
    meta = json.load(open(os.path.join(ckpt, "state", "_METADATA")))
    names = list(meta["tree_metadata"])  # "('params', 'model', ...)": no array under ref_params (an empty node)
    assert not [n for n in names if n.startswith("('ref_params', ")] and any("lora_a" in n for n in names)
    other = dataclasses.replace(run, ref_params=jax.tree_util.tree_map(lambda x: x * 1.01, run.ref_params))
    with pytest.raises(ValueError, match="lora-base-params changed"):
        Trainer(dataclasses.replace(trained["cfg"], resume=True, rounds=3), run=other).run()


def test_mesh_2x2x2_equals_one_device(run, trained, tmp_path):
    """A LoRA run on data 2 x fsdp 2 x tensor 2 (decode layout, adapter rules) ends where the
    one-device run does (1e-4)."""
    mesh = par.make_mesh(2, 2, 2)
    cfg = dataclasses.replace(CFG, run_dir=str(tmp_path), name="mesh")
    t = Trainer(cfg, mesh=mesh, run=run.with_layout(Layout(mesh)))
    t.run()
    assert max_diff(host(t.state.params), trained["state"].params) < 1e-4
    spec = t.program.state_sharding.params["model"]["layers_0"]["self_attn"]["q_proj"]["lora_b"].spec
    assert "tensor" in str(spec)  # split as its kernel's columns


def test_adapter_sharding_rules():
    P = jax.sharding.PartitionSpec
    lay = Layout(par.make_mesh(2, 2, 2))
    spec = lambda path, shape: lay.param_spec(tuple(jax.tree_util.DictKey(k) for k in path.split("/")), shape)
    dspec = lambda path, shape: lay.decode_spec(tuple(jax.tree_util.DictKey(k) for k in path.split("/")), shape)
    assert spec("model/layers_0/self_attn/q_proj/lora_b", (4, 64)) == P(None, "tensor")  # columns
    assert spec("model/layers_0/self_attn/q_proj/lora_a", (32, 4)) == P()  # small: whole
    assert spec("model/layers_0/mlp/down_proj/lora_a", (128, 4)) == P("tensor")  # rows
    assert spec("model/layers/mlp/down_proj/lora_b", (2, 4, 32)) == P()
    assert dspec("model/layers/self_attn/o_proj/lora_a", (2, 64, 4)) == P(None, ("fsdp", "tensor"))


# -- export -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapted():
    """A tiny Llama-like decoder (scanned layers) with random adapters, lora_b nonzero."""
    config = get_config("test", init_std=0.3, qkv_bias=False, scan_layers=True)
    base = jax.jit(init_params, static_argnums=0)(config, jax.random.PRNGKey(1))  # jitted: one compile, not many
    ad = jax.jit(lambda k: lora.init_adapters(base, RANK, "q_proj|v_proj|down_proj", k))(jax.random.PRNGKey(2))
    ad = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(jax.random.PRNGKey(3), x.shape) * 0.2 if "lora_b" in jax.tree_util.keystr(p)
        else x, ad)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (2, 7)), jnp.int32)
    mask = jnp.ones_like(tokens)
    forward = jax.jit(lambda p: Transformer(config).apply({"params": p}, tokens, mask))  # one compile per tree
    ours = forward(lora.with_adapters(base, ad, ALPHA / RANK))
    return dict(config=config, base=base, adapters=ad, tokens=tokens, mask=mask, logits=np.asarray(ours),
                forward=forward)


def test_merged_export_equals_our_adapted_forward(adapted, tmp_path):
    a = adapted
    save_hf(tmp_path, a["config"], a["base"], adapters=a["adapters"], lora_alpha=ALPHA)
    config, params, _ = load_hf(tmp_path, overrides={"scan_layers": True})
    assert config == a["config"]
    out = a["forward"](params)  # the exported file through our loader
    np.testing.assert_allclose(out, a["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(a["forward"](lora.merged(a["base"], a["adapters"], ALPHA / RANK)), a["logits"],
                               atol=1e-4, rtol=0)
    assert np.max(np.abs(out - a["forward"](a["base"]))) > 1e-2  # the adapters do change the model


def test_peft_loads_the_adapter_with_our_logits(adapted, tmp_path):
    """peft (installed by the test command) on the HF base gives our adapted logits (1e-4)."""
    import peft
    import torch
    import transformers

    a = adapted
    save_hf(tmp_path / "base", a["config"], a["base"])
    save_peft_adapter(tmp_path / "adapter", a["config"], a["adapters"], lora_alpha=ALPHA,
                      base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert (cfg["peft_type"], cfg["r"], cfg["target_modules"]) == ("LORA", RANK, ["down_proj", "q_proj", "v_proj"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32,
                                                              attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(a["tokens"]), dtype=torch.long)).logits.float().numpy()
    np.testing.assert_allclose(out, a["logits"], atol=1e-4, rtol=0)
