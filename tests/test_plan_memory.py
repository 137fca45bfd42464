"""experiments/plan_memory.py's core on a toy shape: the fused round compiled ahead of time on
abstract sharded inputs (8 simulated CPU devices, set by conftest), memory read per device."""
import importlib.util
import os

import jax
import pytest

from xpo_jax import parallel as par
from xpo_jax.models.transformer import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan_module():
    spec = importlib.util.spec_from_file_location("plan_memory", os.path.join(ROOT, "experiments", "plan_memory.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TOY = ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128,
                  max_seq_len=32, scan_layers=True)


def _plan(n, **kw):
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices")
    mesh = par.make_mesh(1, n, devices=jax.devices()[:n])
    # LLVM optimisation off: halves the compile, memory_analysis is the same.
    return _plan_module().plan(TOY, mesh, batch=8, prompt_len=4, new_tokens=2,
                               compiler_options={"xla_backend_optimization_level": 0}, **kw)


def test_plan_memory_toy():
    f32_8 = _plan(8)
    for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "total_bytes"):
        assert f32_8[k] > 0, (k, f32_8)
    assert f32_8["total_bytes"] == (f32_8["argument_bytes"] + f32_8["output_bytes"] + f32_8["temp_bytes"]
                                    - f32_8["alias_bytes"])
    # Donation: the new state is written into the old one's buffers.
    assert f32_8["alias_bytes"] >= 0.9 * f32_8["output_bytes"]
    # The reference stored in bfloat16 instead of float32: fewer argument bytes per device.
    bf16_ref = _plan(8, ref_dtype="bfloat16")
    assert bf16_ref["argument_bytes"] < f32_8["argument_bytes"]
    # FSDP over 8 devices instead of 2: each device holds a smaller slice of the state.
    f32_2 = _plan(2)
    assert f32_8["argument_bytes"] < f32_2["argument_bytes"]
    assert f32_8["global_state_bytes"] == f32_2["global_state_bytes"]


def test_plan_memory_lora_rows_toy():
    """LoRA mode of lower_round: the trained bytes are the adapters, an nf4 base takes fewer
    argument bytes than a bfloat16 one."""
    from xpo_jax.models import lora
    from xpo_jax.models.transformer import init_params

    bf16 = _plan(8, lora_rank=4, ref_dtype="bfloat16")
    nf4 = _plan(8, lora_rank=4, ref_dtype="bfloat16", base_dtype="nf4")
    base = jax.eval_shape(lambda: init_params(TOY, jax.random.PRNGKey(0)))
    assert bf16["global_trained_bytes"] == nf4["global_trained_bytes"] == lora.tree_bytes(
        lora.adapter_shapes(base, 4, lora.DEFAULT_TARGETS))
    assert nf4["global_base_bytes"] < bf16["global_base_bytes"] and nf4["argument_bytes"] < bf16["argument_bytes"]
