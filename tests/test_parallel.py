"""One trainer on any mesh: the sharding rules, the Trainer on 1 device / 4x2 / 8x1 meshes, resume
onto another mesh shape, make_train on a mesh, pmap, and two real processes (jax.distributed)
training tiny HF checkpoints and resuming them.

Tolerance. Every path computes the same f32 math with different reduction orders (sharded
matmuls and gradient all-reduces), so parameters agree to ~1e-6 after 2 AdamW steps of lr 3e-3
(each step moves a weight by up to ~lr): we assert max |difference| <= PARAM_ATOL = 5e-5, 1.7% of
one step, while the parameters themselves moved by ~6e-3. Sampled tokens must be identical
(partitionable threefry: a sharded draw is bit-identical to the unsharded one), so the sampled
rewards are equal exactly.

pmap cannot reproduce the one-device per-row noise (each device draws only its rows, from its own
key), so pmap is checked two ways: (a) its update on the identical labelled pairs the one-device
run sampled, and (b) its full round at temperature 0 (greedy sampling, no noise).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import flatten, hf_test_config, make_tiny_hf, max_diff, parallel_test_config
from xpo_jax import distributed as dist
from xpo_jax import parallel as par
from xpo_jax.parallel import Layout
from xpo_jax.checkpoint import Checkpointer
from xpo_jax.run import build_run
from xpo_jax.train import Trainer, make_train

PARAM_ATOL = 5e-5
ROUNDS = 2


def rows_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_metrics(a: list, b: list, rtol=1e-4, atol=1e-5):
    assert [r["round"] for r in a] == [r["round"] for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            if k.startswith("time/") or k == "rewards/accuracies":
                continue  # wall time; and margin > 0, a step at 0 where round 1's margins sit (pi = pi_ref)
            if k in ("task/reward", "val/model_length"):
                assert ra[k] == rb[k], (k, ra[k], rb[k])  # identical tokens (a task reward is exact)
            else:
                np.testing.assert_allclose(ra[k], rb[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def setup():
    cfg = parallel_test_config(rounds=ROUNDS, checkpoint_every=1)
    run = build_run(cfg)
    key = jax.random.PRNGKey(cfg.seed)
    return dict(cfg=cfg, run=run, key=key, state0=run.init_state(key, run.hparams()))


def train_on(setup, mesh, run_dir, name="p", decode_layout=False, **overrides):
    """`decode_layout`: the shared run's round rebuilt for the mesh's layout (decode layout and
    activation pins, as `build_run(cfg, layout)` makes it)."""
    import dataclasses

    cfg = dataclasses.replace(setup["cfg"], run_dir=str(run_dir), name=name, **overrides)
    run = setup["run"] if not overrides else None
    if run is not None and decode_layout:
        run = dataclasses.replace(run, layout=Layout(mesh))
    t = Trainer(cfg, mesh=mesh, run=run)
    t.run()
    return t, rows_of(os.path.join(run_dir, name))


@pytest.fixture(scope="module")
def one_device(setup, tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    t, rows = train_on(setup, par.make_mesh(1, 1, devices=jax.devices()[:1]), d)
    return dict(trainer=t, rows=rows, dir=d)


# -- rules ------------------------------------------------------------------------------------


def test_make_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    m = par.make_mesh()
    assert dict(m.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    m = par.make_mesh(fsdp=2)
    assert dict(m.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert dict(par.make_mesh(fsdp=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    m = par.make_mesh(2, 2, devices=jax.devices()[4:])
    assert [d.id for d in m.devices.flat] == [4, 5, 6, 7]
    assert dict(par.make_mesh(1, 1, devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="fsdp=3 x tensor=1 does not divide"):
        par.make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="devices=jax.devices"):
        par.make_mesh(2, 2)
    with pytest.raises(ValueError, match="tensor must be an int >= 1, got 0"):
        par.make_mesh(tensor=0)


def spec(layout, path, shape):
    return layout.param_spec(tuple(jax.tree_util.DictKey(k) for k in path.split("/")), shape)


def test_parameter_rules_fsdp_and_tensor():
    P = jax.sharding.PartitionSpec
    fs = lambda shape, n, **kw: P(*par.fsdp_spec(shape, n, **kw))
    assert fs((32, 64), 2) == P(None, "fsdp")  # largest dim
    assert fs((64, 32), 2) == P("fsdp", None)
    assert fs((32, 32), 2) == P("fsdp", None)  # tie: first
    assert fs((96, 64), 64) == P(None, "fsdp")  # largest divisible
    assert fs((7, 32), 2) == P(None, None)  # small: replicated
    assert fs((7, 32), 2, min_size=0) == P(None, "fsdp")
    assert fs((32,), 2, min_size=0) == P(None)  # 1-D: replicated
    assert fs((33, 35), 2, min_size=0) == P(None, None)  # nothing divisible
    assert fs((32, 64), 1) == P(None, None)
    assert fs((4, 32, 64), 2, stacked=True) == P(None, None, "fsdp")  # never the layer axis
    # Megatron over "tensor", then FSDP on what remains (2 x 2 x 2 mesh).
    lay = Layout(par.make_mesh(2, 2, 2))
    assert spec(lay, "model/layers_0/self_attn/q_proj/kernel", (32, 64)) == P("fsdp", "tensor")  # columns
    assert spec(lay, "model/layers_0/self_attn/o_proj/kernel", (64, 32)) == P("tensor", "fsdp")  # rows
    assert spec(lay, "model/layers_0/mlp/up_proj/kernel", (32, 128)) == P("fsdp", "tensor")
    assert spec(lay, "model/layers_0/mlp/down_proj/kernel", (128, 32)) == P("tensor", "fsdp")
    assert spec(lay, "model/embed_tokens/embedding", (64, 32)) == P("tensor", "fsdp")  # the vocabulary
    assert spec(lay, "lm_head/kernel", (32, 64)) == P("fsdp", "tensor")
    assert spec(lay, "model/layers/self_attn/q_proj/kernel", (2, 32, 64)) == P(None, "fsdp", "tensor")  # stacked
    assert spec(lay, "model/layers_0/self_attn/q_proj/bias", (64,)) == P()  # biases and norms replicated
    assert spec(lay, "model/layers_0/input_layernorm/scale", (32,)) == P()
    assert spec(lay, "model/layers_0/self_attn/k_proj/kernel", (32, 3)) == P()  # 3 columns: not split by 2
    assert spec(lay, "score/kernel", (32, 1)) == P()


def test_decode_layout_rules():
    """The decode layout: Megatron over fsdp x tensor together where the product divides, else
    the larger single axis that does, else replicated; never over data; cast before the move."""
    P = jax.sharding.PartitionSpec
    dspec = lambda lay, path, shape: lay.decode_spec(tuple(jax.tree_util.DictKey(k) for k in path.split("/")), shape)
    lay = Layout(par.make_mesh(2, 2, 2))
    both = ("fsdp", "tensor")
    assert dspec(lay, "model/layers/self_attn/q_proj/kernel", (2, 32, 64)) == P(None, None, both)  # columns
    assert dspec(lay, "model/layers/self_attn/o_proj/kernel", (2, 64, 32)) == P(None, both)  # rows
    assert dspec(lay, "model/layers_0/mlp/down_proj/kernel", (128, 32)) == P(both)
    assert dspec(lay, "model/embed_tokens/embedding", (64, 32)) == P(both)
    assert dspec(lay, "model/layers_0/self_attn/k_proj/kernel", (32, 6)) == P(None, "fsdp")  # 6: by 2, not 4
    assert dspec(lay, "model/layers_0/self_attn/k_proj/kernel", (32, 3)) == P()
    assert dspec(lay, "model/layers_0/self_attn/q_proj/bias", (64,)) == P()
    assert dspec(lay, "score/kernel", (32, 1)) == P()
    wide = Layout(par.make_mesh(1, 2, 4))  # tensor 4 is the larger single axis
    assert dspec(wide, "lm_head/kernel", (32, 12)) == P(None, "tensor")
    assert dspec(wide, "lm_head/kernel", (32, 16)) == P(None, both)
    one = Layout.of(None)
    params = {"lm_head": {"kernel": jnp.ones((4, 6), jnp.float32)}, "ids": jnp.arange(3)}
    out = one.decode_params(params, jnp.bfloat16)
    assert out["lm_head"]["kernel"].dtype == jnp.bfloat16 and out["ids"].dtype == params["ids"].dtype
    with pytest.raises(ValueError, match="mode must be"):
        with lay.activations("sampling"):
            pass


def test_state_shardings_follow_params(setup):
    layout = Layout(par.make_mesh(4, 2))
    state = layout.place(setup["state0"], layout.state(setup["state0"]))
    P = jax.sharding.PartitionSpec
    down = ("model", "layers_0", "mlp", "down_proj", "kernel")
    get = lambda t: t[down[0]][down[1]][down[2]][down[3]][down[4]]
    assert get(state.params).sharding.spec == P("fsdp")
    assert get(state.ref_params).sharding.spec == P("fsdp")
    adam = [s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")][0]
    assert get(adam.mu).sharding.spec == P("fsdp") and get(adam.nu).sharding.spec == P("fsdp")
    assert state.params["lm_head"]["kernel"].sharding.spec == P()  # 32 x 7: small
    assert state.rng.sharding.spec == P() and state.hparams.alpha.sharding.spec == P()
    shard = get(state.params).addressable_shards[0]
    assert shard.data.shape == (32, 32)  # each device holds half of a sharded weight


def test_host_rows_shard_batch_and_local_rows():
    layout = Layout(par.make_mesh(4, 2))
    assert layout.host_rows(16) == slice(0, 16)  # one process holds every row
    x = np.arange(16 * 3).reshape(16, 3)
    g = layout.shard_batch(x)
    assert g.shape == (16, 3) and g.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(g), x)
    np.testing.assert_array_equal(par.local_rows(g), x)
    with pytest.raises(ValueError, match="--batch-size=12 must be divisible by the mesh's 8 batch shards"):
        layout.host_rows(12)
    # With a tensor axis, the rows split over data x fsdp only; every tensor device holds them whole.
    lay = Layout(par.make_mesh(2, 2, 2))
    assert lay.batch_shards == 4
    g = lay.shard_batch(x[:8])
    assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}


def test_initialize_distributed_errors(monkeypatch):
    for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(ValueError, match="host:port"):
        dist.initialize_distributed("localhost", 2, 0)
    with pytest.raises(ValueError, match="must be < num_processes"):
        dist.initialize_distributed("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="process_id not given"):
        dist.initialize_distributed("localhost:1234", 2)
    monkeypatch.setenv("JAX_PROCESS_ID", "x")
    with pytest.raises(ValueError, match="not an integer"):
        dist.initialize_distributed("localhost:1234", 2)
    monkeypatch.delenv("JAX_PROCESS_ID")
    jax.devices()  # the backend is up in this process: too late to join a distributed run
    with pytest.raises(RuntimeError, match="must run before"):
        dist.initialize_distributed("localhost:1234", 2, 0)


def test_mesh_and_batch_errors_come_before_building(setup, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(setup["cfg"], run_dir=str(tmp_path), batch_size=12)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="--batch-size=12 must be divisible by the mesh's 8 batch shards"):
        Trainer(cfg, mesh=par.make_mesh(4, 2))
    with pytest.raises(ValueError, match="--batch-size"):
        Trainer(dataclasses.replace(cfg, data=4, fsdp=2))
    with pytest.raises(ValueError, match="--data=3 x --fsdp=2 x --tensor=1 = 6 devices, but 8"):
        Trainer(dataclasses.replace(cfg, batch_size=12, data=3, fsdp=2))
    with pytest.raises(ValueError, match="--batch-size=12 must be divisible by the mesh's 8 batch shards"):
        Trainer(dataclasses.replace(cfg, data=2, fsdp=4, tensor=1))
    assert time.perf_counter() - t0 < 2.0
    assert not os.listdir(tmp_path)


# -- the one trainer on several meshes --------------------------------------------------------


def test_one_device_moves(setup, one_device):
    moved = max_diff(one_device["trainer"].state.params, setup["state0"].params)
    assert moved > 100 * PARAM_ATOL, moved  # the comparisons below are not vacuous
    assert int(one_device["trainer"].state.round) == ROUNDS


def test_trainer_on_2x2x2_mesh_with_tensor_matches_one_device(setup, one_device, tmp_path):
    """data 2 x fsdp 2 x tensor 2: Megatron splits over "tensor", the decode layout and the
    activations pinned by rows change nothing but where the arithmetic runs: the same metrics
    and parameters as one device."""
    t, rows = train_on(setup, par.make_mesh(2, 2, 2), tmp_path, decode_layout=True)
    assert_same_metrics(rows, one_device["rows"])
    assert max_diff(t.state.params, one_device["trainer"].state.params) <= PARAM_ATOL
    kernel = t.state.params["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_resume_onto_other_mesh_shapes(setup, one_device, tmp_path):
    """A 4x2 run stopped after round 1 resumes on data 2 x fsdp 2 x tensor 2 (and the one-device
    run's round-1 checkpoint on 8x1, from a copied run folder): the same final parameters, every
    round logged once."""
    import dataclasses

    cfg = dataclasses.replace(setup["cfg"], run_dir=str(tmp_path), name="m")
    first = Trainer(cfg, mesh=par.make_mesh(4, 2), run=setup["run"])
    first.run(stop_after=1)
    kernel = first.state.params["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert dict(kernel.sharding.mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    resumed = Trainer(dataclasses.replace(cfg, resume=True), mesh=par.make_mesh(2, 2, 2), run=setup["run"])
    resumed.run()
    assert max_diff(resumed.state.params, one_device["trainer"].state.params) <= PARAM_ATOL
    assert max_diff(resumed.state.opt_state, one_device["trainer"].state.opt_state) <= PARAM_ATOL
    assert [r["round"] for r in rows_of(tmp_path / "m")] == [1, 2]
    assert_same_metrics(rows_of(tmp_path / "m"), one_device["rows"])

    other = tmp_path / "other"
    shutil.copytree(one_device["dir"] / "p", other / "p")  # a copied run dir resumes too
    shutil.rmtree(other / "p" / "checkpoints" / str(ROUNDS))
    t = Trainer(dataclasses.replace(cfg, run_dir=str(other), name="p", resume=True), mesh=par.make_mesh(8, 1),
                run=setup["run"])
    t.run()
    assert max_diff(t.state.params, one_device["trainer"].state.params) <= PARAM_ATOL


def test_make_train_on_a_mesh_matches_the_trainer(setup, one_device):
    run, cfg = setup["run"], setup["cfg"]
    state, metrics = jax.jit(make_train(cfg, run, par.make_mesh(4, 2)))(setup["key"], run.hparams())
    assert metrics["loss"].shape == (ROUNDS,)
    assert max_diff(state.params, one_device["trainer"].state.params) <= PARAM_ATOL
    # Two compiled programs (the meshed scan, the one-device Trainer): the batch mean is reduced in
    # another order, so equal to float32 rounding, not bitwise.
    np.testing.assert_allclose(np.asarray(metrics["task/reward"]), [r["task/reward"] for r in one_device["rows"]],
                               rtol=1e-6, atol=1e-6)
    kernel = state.params["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_sharded_sampling_draws_the_one_device_tokens(setup):
    run = setup["run"]
    prompts, mask = jax.device_get(run.prompts.batch(run.data_key(setup["key"]), 0))
    tokens = []
    meshes = (par.make_mesh(1, 1, devices=jax.devices()[:1]), par.make_mesh(4, 2), par.make_mesh(2, 2, 2),
              par.make_mesh(1, 2, 4))  # the last two in the decode layout (tensor 4 > the 2 KV heads)
    for i, mesh in enumerate(meshes):
        layout = Layout(mesh)
        st, bs = layout.state(run.state_shapes()), layout.batch
        fns = run.fns if i < 2 else dataclasses.replace(run, layout=layout).fns
        f = jax.jit(fns.make_pairs, in_shardings=(st, bs, bs))
        _, pairs = f(layout.place(setup["state0"], st), *layout.shard_batch(prompts, mask))
        tokens.append((np.asarray(pairs.y.tokens), np.asarray(pairs.yt.tokens)))
    for other in tokens[1:]:
        np.testing.assert_array_equal(tokens[0][0], other[0])
        np.testing.assert_array_equal(tokens[0][1], other[1])


# -- two real processes -----------------------------------------------------------------------

TWO_PROCESS_TEST = "test_two_processes_train_and_resume_hf_checkpoints"
TWO_PROCESS_TIMEOUT_S = 420
HF_ROUNDS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="module", autouse=True)
def two_process_run(request, tmp_path_factory):
    """Start the two processes when this module starts (they compile while the tests above run
    here), and kill them at the end whatever happened. Each process runs the README's command
    twice: 2 rounds, then --resume to round 3."""
    if not any(item.name == TWO_PROCESS_TEST for item in request.session.items):
        yield None
        return
    policy, rm = make_tiny_hf(tmp_path_factory.mktemp("tiny_hf_2p"))
    out = tmp_path_factory.mktemp("two_process")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    cfg = hf_test_config(policy, rm, out, "mh", batch_size=8, checkpoint_every=1)
    common = ["--policy", cfg.policy, "--reward-model", cfg.reward_model, "--prompts", cfg.prompts,
              "--batch-size", "8", "--max-new-tokens", "8", "--max-prompt-length", "48", "--progress", "false",
              "--tensorboard", "false", "--eval-every", "0", "--checkpoint-every", "1", "--run-dir", str(out),
              "--name", "mh", "--data", "2", "--fsdp", "2", "--num-processes", "2"]
    ports = (_free_port(), _free_port())
    procs = []
    for i in range(2):
        first = [sys.executable, "-m", "xpo_jax", "train", *common, "--rounds", "2", "--process-id", str(i),
                 "--coordinator-address", f"localhost:{ports[0]}"]
        second = [sys.executable, "-m", "xpo_jax", "train", *common, "--rounds", str(HF_ROUNDS), "--resume",
                  "--process-id", str(i), "--coordinator-address", f"localhost:{ports[1]}"]
        script = " && ".join(" ".join(map(_quote, c)) for c in (first, second))
        procs.append(subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    run = dict(procs=procs, out=out, cfg=cfg, deadline=time.monotonic() + TWO_PROCESS_TIMEOUT_S, dirs=(policy, rm))
    yield run
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(str(s))


@pytest.mark.multiprocess
def test_two_processes_train_and_resume_hf_checkpoints(two_process_run, tmp_path):
    """Two Python processes x 2 CPU devices, joined by jax.distributed (gloo), on a 2x2 data x fsdp
    mesh, each reading only its half of every batch of the prompt file: the same metrics as one
    process on one device (the global batch is the one-process batch), process 0 alone writes the
    log, and the run resumes from the checkpoint both processes wrote (with both positions)."""
    import dataclasses

    procs, deadline = two_process_run["procs"], two_process_run["deadline"]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"multi-process run exceeded {TWO_PROCESS_TIMEOUT_S} s:\n"
                    + "\n".join(p.communicate()[0][-3000:] for p in procs))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    assert "process 0 of 2" in logs[0] and "process 1 of 2" in logs[1]
    assert "resumed from" in logs[0] and "resumed from" in logs[1]
    out = two_process_run["out"] / "mh"
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [1, 2, 3]

    cfg = dataclasses.replace(two_process_run["cfg"], run_dir=str(tmp_path), name="single", rounds=HF_ROUNDS)
    single = Trainer(cfg, mesh=par.make_mesh(1, 1, devices=jax.devices()[:1]))
    single.run()
    assert_same_metrics(rows, rows_of(tmp_path / "single"), rtol=2e-4, atol=2e-5)

    ckpt = Checkpointer(str(out / "checkpoints"))
    restored, _, data, _ = ckpt.restore_latest_good(single.program.abstract_state)
    ckpt.close()
    assert data["round"] == HF_ROUNDS and len(data["prompts"]) == 2  # one position per process
    got, want = flatten(jax.device_get(restored.params)), flatten(jax.device_get(single.state.params))
    assert max(float(np.max(np.abs(got[k] - want[k]))) for k in want) <= PARAM_ATOL
