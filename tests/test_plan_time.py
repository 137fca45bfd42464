"""experiments/plan_time.py on a toy shape: the fused round compiled ahead of time on 8 simulated
CPU devices (data 1 x fsdp 8), its collectives classified, its FLOPs and bytes checked against
XLA's own cost analysis, and the ideal's parameter counts against the models'."""
import dataclasses
import importlib.util
import json
import os

import jax
import pytest

from xpo_jax import hlo
from xpo_jax import parallel as par
from xpo_jax.models.transformer import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DEV, BATCH, PROMPT, NEW = 8, 8, 4, 3
# Dimensions chosen apart from each other (and from the activations') so that a shape names one
# thing: a weight shard [6, 48] cannot be mistaken for an activation.
TOY = ModelConfig(vocab_size=96, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, mlp_dim=80,
                  max_seq_len=32, scan_layers=True)


def _plan_time(name="plan_time"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def toy():
    if jax.device_count() < N_DEV:
        pytest.skip(f"needs {N_DEV} devices")
    pt = _plan_time()
    mesh = par.make_mesh(1, N_DEV, devices=jax.devices()[:N_DEV])
    lowered, parts = pt.pm.lower_round(TOY, mesh, batch=BATCH, prompt_len=PROMPT, new_tokens=NEW, remat="block",
                                       **pt.pm.PRECISIONS["bf16"])
    compiled, _ = pt.pm.compile_lowered(lowered, {"xla_backend_optimization_level": 0})
    text = compiled.as_text()
    return pt, compiled, text, parts, hlo.traffic(text, trip_count=hlo.round_trip_counts(NEW))


def test_classification(toy):
    _, _, _, _, t = toy
    phases = {c.phase for c in t.collectives}
    assert phases <= set(hlo.PHASE_CLASS), phases
    assert "training" in phases and "reward model" in phases, phases
    assert set(t.bytes_by_class) == set(hlo.CLASSES)
    assert sum(t.bytes_by_class.values()) == t.collective_bytes > 0
    for c in t.collectives:
        sampling = [l for l in c.loops if l.sampling]
        if sampling:
            # The decode loop: no trip count XLA could prove, counted at max_new_tokens - 1, written
            # in sampling.py; a layer scan inside it runs n_layers times per step.
            (s,) = sampling
            # (the loop's condition runs once more than its body)
            assert s.known_trip_count is None and s.trip == NEW - 1 + (s.kind == "condition")
            assert s.stack[0].file.endswith("sampling.py")
            assert s.op_name.endswith("_sample_jit)/while")
            assert c.phase == "sampling loop" and c.cls == "sampling_loops"
            inner = c.loops[c.loops.index(s) + 1:]
            assert all(l.known_trip_count is not None for l in inner if l.kind != "branch")
            if any("_run_layers" in l.op_name for l in inner):
                assert c.count % (TOY.n_layers * (NEW - 1)) == 0
        if "transpose(" in c.op_name:  # the backward pass
            assert c.phase == "training"
        if c.phase == "training":
            assert any(f.function.endswith("update.<locals>.step") for f in c.stack) or "jvp(" in c.op_name \
                or "transpose(" in c.op_name
    # Counting the decode loops max_new_tokens times (issue 17's convention) changes only them.
    tn = hlo.traffic(toy[2], trip_count=hlo.round_trip_counts(NEW, sampling_trips=NEW))
    assert tn.bytes_by_class["training"] == t.bytes_by_class["training"]
    assert tn.bytes_by_class["other"] == t.bytes_by_class["other"]
    # (bodies N / (N - 1) times more, the loop conditions' collectives (N + 1) / N times)
    a, b = t.bytes_by_class["sampling_loops"], tn.bytes_by_class["sampling_loops"]
    assert a < b and b * (NEW - 1) <= a * NEW


def test_weights_and_plan_measure(toy):
    pt, compiled, text, parts, t = toy
    st = parts["state"]
    weights = hlo.weight_shapes(st.params) | hlo.weight_shapes(st.ref_params)
    q = st.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, H*dh], stacked
    assert tuple(q.shape[1:]) in weights
    assert hlo.is_tile(q.sharding.shard_shape(q.shape)[1:], q.shape[1:], N_DEV)
    found = hlo.weight_gathers_in_sampling_loops(t, weights)
    assert found == [], [c.describe() for c in found]  # issue 17: the decode layout
    m = pt.measure(text, compiled.cost_analysis(), parts, NEW)
    assert m["bytes_by_class"] == t.bytes_by_class
    assert m["weight_gathers_in_sampling_loops"] == len(found)
    assert sum(m["weight_bytes_by_class"].values()) <= m["collective_bytes"]
    # With every loop run once our count is XLA's (FLOPs with XLA's reduce-window rule).
    assert m["once_xla_flops"] == pytest.approx(m["xla_flops"], rel=0.02)
    assert m["once_hbm_bytes"] == pytest.approx(m["xla_bytes"], rel=0.05)
    # Loops multiplied out: more work than one pass of each body.
    assert m["flops"] > m["once_flops"] and m["hbm_bytes"] > m["once_hbm_bytes"]
    e = pt.estimate(dict(m, devices=N_DEV))
    for chip, c in pt.CHIPS.items():
        assert e[f"s_{chip}"] == pytest.approx(max(m["flops"] / c["flops"], m["hbm_bytes"] / c["hbm"],
                                                   m["wire_bytes"] / c["ici"]))


def weights_moved_in_sampling_loops(t, weights) -> list:
    """Every collective inside a decode loop that moves a block of a weight (any kind)."""
    return [c for c in t.collectives if c.in_sampling_loop and hlo.moves_weight(c, weights)]


def test_no_weight_moves_inside_the_decode_loops(toy):
    """Issue 17, item 2: the weights are moved into the decode layout before the loops; inside
    them only activation-sized collectives remain. fsdp only (the fixture, data 1 x fsdp 8), and
    data 2 x fsdp 2 x tensor 2 with one KV head (tensor > KV heads: replicated over tensor)."""
    pt, _, _, parts, t = toy
    st = parts["state"]
    weights = hlo.weight_shapes(st.params) | hlo.weight_shapes(st.ref_params) | hlo.weight_shapes(parts["reward_params"])
    loops = [c for c in t.collectives if c.in_sampling_loop]
    assert loops and weights_moved_in_sampling_loops(t, weights) == [], [c.describe() for c in loops]
    mesh = par.make_mesh(2, 2, 2, devices=jax.devices()[:N_DEV])
    mqa = dataclasses.replace(TOY, n_kv_heads=1)
    lowered, parts = pt.pm.lower_round(mqa, mesh, batch=BATCH, prompt_len=PROMPT, new_tokens=NEW, remat="block",
                                       **pt.pm.PRECISIONS["bf16"])
    text = pt.pm.compile_lowered(lowered, {"xla_backend_optimization_level": 0})[0].as_text()
    t = hlo.traffic(text, trip_count=hlo.round_trip_counts(NEW))
    st = parts["state"]
    weights = hlo.weight_shapes(st.params) | hlo.weight_shapes(st.ref_params) | hlo.weight_shapes(parts["reward_params"])
    assert hlo.weight_gathers_in_sampling_loops(t, weights) == []
    assert weights_moved_in_sampling_loops(t, weights) == []
    # The largest collective inside the loops is activation-sized: at most a step's logits
    # [B, V] or hidden states in float32, far below a weight matrix's bytes x the loop count.
    biggest = max(c.bytes for c in t.collectives if c.in_sampling_loop)
    assert biggest <= BATCH * max(TOY.vocab_size, TOY.mlp_dim) * 4, biggest


def test_ideal_counts_the_models_parameters():
    """The ideal is computed from the published configs alone; its parameter count must be the
    real models' (our init of the same config, abstract: nothing is materialised)."""
    from xpo_jax.models.transformer import init_params

    pt = _plan_time()
    for name in pt.pm.MODELS:
        cfg = dataclasses.replace(pt.pm.model_config(name), scan_layers=True)
        shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))
        n = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
        assert pt.model_counts(name)["params"] == n, name
    i = pt.ideal("Llama-3-8B", 64, 64, 512, 256)
    assert i["weights_bytes"] == 2 * pt.model_counts("Llama-3-8B")["params"]
    assert i["ici_bytes"] == pytest.approx(63 / 64 * 5 * i["weights_bytes"])
    # Issue 17's arithmetic: ~10 PFLOP for the round (with remat); without remat ~8.5 PFLOP.
    assert 7e15 < i["flops"] * 64 < 10e15


def test_rows():
    pt = _plan_time()
    rows = pt.all_rows()
    ids = [pt.row_id(r) for r in rows]
    assert len(set(ids)) == len(ids)
    for model in pt.pm.MODELS:
        for n in pt.DEVICES:
            ts = sorted(r["tensor"] for r in rows if r["model"] == model and r["devices"] == n
                        and r["batch"] == pt.BATCH)
            assert ts == [1, pt.TENSOR[model]], (model, n, ts)
    for model, t in pt.TENSOR.items():
        m = pt.pm.MODELS[model]
        assert m["n_heads"] % t == 0 and m["mlp_dim"] % t == 0


def test_reader_on_a_real_gpu_compile_agrees_with_the_cpu_compile():
    """experiments/results keeps the HLO of one round compiled by XLA's CPU and by its GPU backend
    (H200, experiments/hbm_backends.py). Our reader must count the same FLOPs in both (the GPU's
    matmuls are cuBLAS custom-calls) and charge the GPU's asynchronous weight-slice fusions their
    slices, not the whole layer stack per decode step (which read 17 TB where the round moves ~1)."""
    hb = _plan_time("hbm_backends")
    runs = {b: hb.reread(json.load(open(os.path.join(hb.RESULTS, f"hbm_backends_{b}.json")))) for b in ("cpu", "gpu")}
    cpu, gpu = runs["cpu"], runs["gpu"]
    ideal = cpu["ideal"]
    assert abs(gpu["flops"] / cpu["flops"] - 1) < 0.05 and abs(gpu["flops"] / ideal["flops"] - 1) < 0.1
    assert ideal["hbm_bytes"] < gpu["hbm_bytes"] < min(cpu["hbm_bytes"], 5 * ideal["hbm_bytes"])
