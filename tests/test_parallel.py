"""Parallel equivalence: one device, 8-way data parallel, 4x2 data x fsdp, pmap over 8, and two
real processes joined by jax.distributed all give the same parameters after 2 rounds, and the
jit + sharding paths sample identical tokens.

Tolerance. Every path computes the same f32 math with different reduction orders (sharded
matmuls and gradient all-reduces), so parameters agree to ~1e-6 after 2 AdamW steps of lr 3e-3
(each step moves a weight by up to ~lr): we assert max |difference| <= PARAM_ATOL = 5e-5, 1.7% of
one step, while the parameters themselves moved by ~6e-3. Sampled tokens must be identical
(partitionable threefry: a sharded draw is bit-identical to the unsharded one).

pmap cannot reproduce the one-device per-row noise (each device draws only its rows, from its own
key), so pmap is checked two ways: (a) its update on the identical labelled pairs the one-device
run sampled, and (b) its full round at temperature 0 (greedy sampling, no noise), where it must
match the one-device round exactly.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multihost_worker import flatten, parallel_test_config
from xpo_jax import parallel as par

PARAM_ATOL = 5e-5
ROUNDS = 2


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.fixture(scope="module")
def setup():
    from xpo_jax.train import build_run

    cfg = parallel_test_config(rounds=ROUNDS)
    run = build_run(cfg)
    key = jax.random.PRNGKey(cfg.seed)
    data_key = run.data_key(key)
    state0 = run.init_state(key, run.hparams())
    batches = [jax.device_get(run.task.sample_prompts(jax.random.fold_in(data_key, r), cfg.batch_size))
               for r in range(ROUNDS)]
    return dict(cfg=cfg, run=run, key=key, data_key=data_key, state0=state0, batches=batches)


def _run_sharded(setup, mesh, with_tokens=True):
    """ROUNDS sharded rounds from state0; returns (final state, [(y, y~) tokens per round],
    [states before each round], [metrics per round])."""
    sharded = par.shard_round(setup["run"], mesh)
    state = par.shard_state(setup["state0"], mesh)
    tokens, states, history = [], [], []
    for prompts, mask in setup["batches"]:
        p, m = par.shard_batch(mesh, prompts, mask)
        assert p.sharding == sharded.batch_sharding
        states.append(state)
        if with_tokens:  # make_pairs is the first half of round_fn: the round's own samples
            _, pairs = sharded.make_pairs(state, p, m)
            tokens.append((np.asarray(pairs.y.tokens), np.asarray(pairs.yt.tokens)))
        state, metrics = sharded.round_fn(state, p, m)
        history.append(jax.device_get(metrics))
    assert np.isfinite(float(metrics["loss"]))
    return state, tokens, states, history


@pytest.fixture(scope="module")
def one_device(setup):
    mesh = par.make_mesh(1, 1, devices=jax.devices()[:1])
    state, tokens, states, history = _run_sharded(setup, mesh)
    return dict(mesh=mesh, state=state, tokens=tokens, states=states, history=history)


# -- rules ------------------------------------------------------------------------------------


def test_make_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    m = par.make_mesh()
    assert dict(m.shape) == {"data": 8, "fsdp": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    m = par.make_mesh(fsdp=2)
    assert dict(m.shape) == {"data": 4, "fsdp": 2}
    m = par.make_mesh(2, 2, devices=jax.devices()[4:])
    assert [d.id for d in m.devices.flat] == [4, 5, 6, 7]
    assert dict(par.make_mesh(1, 1, devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match="fsdp=3 does not divide"):
        par.make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="devices=jax.devices"):
        par.make_mesh(2, 2)


def test_fsdp_spec_rule():
    P = jax.sharding.PartitionSpec
    assert par.fsdp_spec((32, 64), 2) == P(None, "fsdp")  # largest dim
    assert par.fsdp_spec((64, 32), 2) == P("fsdp", None)
    assert par.fsdp_spec((32, 32), 2) == P("fsdp", None)  # tie: first
    assert par.fsdp_spec((96, 64), 64) == P(None, "fsdp")  # largest divisible
    assert par.fsdp_spec((7, 32), 2) == P()  # small: replicated
    assert par.fsdp_spec((7, 32), 2, min_size=0) == P(None, "fsdp")
    assert par.fsdp_spec((32,), 2, min_size=0) == P()  # 1-D: replicated
    assert par.fsdp_spec((33, 35), 2, min_size=0) == P()  # nothing divisible
    assert par.fsdp_spec((32, 64), 1) == P()


def test_state_shardings_follow_params(setup):
    mesh = par.make_mesh(4, 2)
    state = par.shard_state(setup["state0"], mesh)
    P = jax.sharding.PartitionSpec
    down = ("model", "layers_0", "mlp", "down_proj", "kernel")
    get = lambda t: t[down[0]][down[1]][down[2]][down[3]][down[4]]
    assert get(state.params).sharding.spec == P("fsdp", None)
    assert get(state.ref_params).sharding.spec == P("fsdp", None)
    adam = [s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")][0]
    assert get(adam.mu).sharding.spec == P("fsdp", None) and get(adam.nu).sharding.spec == P("fsdp", None)
    assert state.params["lm_head"]["kernel"].sharding.spec == P()  # 32 x 7: small
    assert state.rng.sharding.spec == P() and state.hparams.alpha.sharding.spec == P()
    # Each device holds half of a sharded weight.
    shard = get(state.params).addressable_shards[0]
    assert shard.data.shape == (32, 32)


def test_host_batch_slice_and_shard_batch():
    mesh = par.make_mesh(4, 2)
    assert par.host_batch_slice(mesh, 16) == slice(0, 16)  # one process holds every row
    x = np.arange(16 * 3).reshape(16, 3)
    g = par.shard_batch(mesh, x)
    assert g.shape == (16, 3) and g.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(g), x)
    with pytest.raises(ValueError, match="not divisible"):
        par.host_batch_slice(mesh, 12)


def test_initialize_distributed_errors(monkeypatch):
    for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(ValueError, match="host:port"):
        par.initialize_distributed("localhost", 2, 0)
    with pytest.raises(ValueError, match="must be < num_processes"):
        par.initialize_distributed("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="process_id not given"):
        par.initialize_distributed("localhost:1234", 2)
    monkeypatch.setenv("JAX_PROCESS_ID", "x")
    with pytest.raises(ValueError, match="not an integer"):
        par.initialize_distributed("localhost:1234", 2)
    monkeypatch.delenv("JAX_PROCESS_ID")
    jax.devices()  # the backend is up in this process: too late to join a distributed run
    with pytest.raises(RuntimeError, match="must run before"):
        par.initialize_distributed("localhost:1234", 2, 0)


# -- equivalence ------------------------------------------------------------------------------


def test_one_device_moves(setup, one_device):
    moved = max_diff(one_device["state"].params, setup["state0"].params)
    assert moved > 100 * PARAM_ATOL, moved  # the comparison below is not vacuous
    assert int(one_device["state"].round) == ROUNDS


def test_data_parallel_8_matches_one_device(setup, one_device):
    # (Tokens: the batch is split over all 8 devices exactly as in the 4x2 test below.)
    state, _, _, history = _run_sharded(setup, par.make_mesh(8, 1), with_tokens=False)
    assert [m["task/reward"] for m in history] == [m["task/reward"] for m in one_device["history"]]
    assert max_diff(state.params, one_device["state"].params) <= PARAM_ATOL
    assert max_diff(state.opt_state, one_device["state"].opt_state) <= PARAM_ATOL
    np.testing.assert_array_equal(np.asarray(state.rng), np.asarray(one_device["state"].rng))


def test_data_fsdp_4x2_samples_identical_tokens(setup, one_device):
    """Sampling with FSDP-sharded weights and a batch over all 8 devices: the one-device tokens
    (the 4x2 parameters after 2 rounds are checked through sharded_train below)."""
    mesh = par.make_mesh(4, 2)
    sharded = par.shard_round(setup["run"], mesh)
    for (prompts, mask), before, (y1, yt1) in zip(setup["batches"], one_device["states"], one_device["tokens"]):
        state = par.shard_state(jax.device_get(before), mesh)
        _, pairs = sharded.make_pairs(state, *par.shard_batch(mesh, prompts, mask))
        assert pairs.y.tokens.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(pairs.y.tokens), y1)
        np.testing.assert_array_equal(np.asarray(pairs.yt.tokens), yt1)


def test_sharded_train_4x2_matches_one_device(setup, one_device, tmp_path):
    """make_train's pure train (lax.scan over rounds) jitted on a 4x2 mesh; then its sharded
    final state is checkpointed and restored onto other mesh shapes (8x1 and one device)."""
    from xpo_jax.checkpoint import Checkpointer

    run, cfg = setup["run"], setup["cfg"]
    mesh = par.make_mesh(4, 2)
    train = par.sharded_train(cfg, mesh, run)
    state, metrics = train(setup["key"], run.hparams())
    assert metrics["loss"].shape == (ROUNDS,)
    assert max_diff(state.params, one_device["state"].params) <= PARAM_ATOL
    kernel = state.params["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")

    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(ROUNDS, state, cfg.to_dict(), {"round": ROUNDS})
    for data, fsdp, devices in ((8, 1, None), (1, 1, jax.devices()[:1]), (2, 4, None)):
        target = par.make_mesh(data, fsdp, devices=devices)
        restored, saved_cfg, pos = ckpt.restore(par.abstract_state(run, target))
        assert pos == {"round": ROUNDS} and saved_cfg["task"] == cfg.task
        assert max_diff(restored.params, state.params) == 0.0
        assert max_diff(restored.opt_state, state.opt_state) == 0.0
        k = restored.params["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]
        assert k.sharding.mesh.shape == target.shape
        assert k.sharding.spec == par.fsdp_spec(k.shape, fsdp)
    ckpt.close()


def test_pmap_update_on_identical_pairs(setup, one_device):
    run = setup["run"]
    pm = par.pmap_round(setup["cfg"], run)
    n = len(pm.devices)
    assert n == 8
    sharded = par.shard_round(run, one_device["mesh"])
    state = par.replicate(setup["state0"], n)
    for (prompts, mask), before in zip(setup["batches"], one_device["states"]):
        # The one-device run's own pairs: make_pairs is the first half of its fused round.
        _, pairs = sharded.make_pairs(before, *par.shard_batch(one_device["mesh"], prompts, mask))
        pairs = jax.device_get(pairs)  # uncommitted: pmap places its arguments itself
        judgement = pm.oracle(pairs.judge_key, pairs.prompts, pairs.prompt_mask, pairs.y.tokens, pairs.y.mask,
                              pairs.yt.tokens, pairs.yt.mask)
        split_pairs = par.split_batch(pairs._replace(judge_key=None), n)._replace(
            judge_key=jnp.zeros((n, 2), jnp.uint32))  # unused by update
        state, metrics = pm.update(state, split_pairs, par.split_batch(judgement, n))
    assert max_diff(par.unreplicate(state.params), one_device["state"].params) <= PARAM_ATOL
    # Every device holds the same parameters (the update is psum-ed, not per device).
    leaves = jax.tree_util.tree_leaves(state.params)
    assert all(float(jnp.max(jnp.abs(x - x[0]))) == 0.0 for x in leaves)
    np.testing.assert_allclose(np.asarray(metrics["loss"]), float(metrics["loss"][0]))


def test_pmap_round_greedy_matches_one_device(setup, one_device):
    """Temperature 0: no sampling noise, so pmap's fused round must equal the one-device round
    (temperature is a traced hyperparameter: the same compiled one-device round)."""
    run = setup["run"]
    hp = run.hparams().replace(temperature=jnp.float32(0.0))
    state0 = run.init_state(setup["key"], hp)
    sharded = par.shard_round(run, one_device["mesh"])
    pm = par.pmap_round(setup["cfg"], run)
    n = len(pm.devices)
    one, rep = par.shard_state(state0, one_device["mesh"]), par.replicate(state0, n)
    for prompts, mask in setup["batches"]:
        one, m1 = sharded.round_fn(one, *par.shard_batch(one_device["mesh"], prompts, mask))
        rep, mp = pm.round_fn(rep, *par.split_batch((jnp.asarray(prompts), jnp.asarray(mask)), n))
    assert max_diff(one.params, state0.params) > 100 * PARAM_ATOL
    assert max_diff(par.unreplicate(rep.params), one.params) <= PARAM_ATOL
    np.testing.assert_allclose(float(mp["task/reward"][0]), float(m1["task/reward"]), rtol=1e-6)
    rng = np.asarray(rep.rng)
    assert (rng == rng[0]).all()  # the shared key stays replicated


# -- two real processes -----------------------------------------------------------------------

TWO_PROCESS_TEST = "test_two_processes_match_single_process"
TWO_PROCESS_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def two_process_run(request, tmp_path_factory):
    """Start the two worker processes when this module starts (they compile while the tests
    above run in this process), and kill them at the end whatever happened."""
    if not any(item.name == TWO_PROCESS_TEST for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("two_process")
    worker = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, worker, "--coordinator", f"localhost:{port}", "--num-processes", "2",
             "--process-id", str(i), "--out", str(out), "--data", "2", "--fsdp", "2", "--rounds", str(ROUNDS)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    run = dict(procs=procs, out=out, deadline=time.monotonic() + TWO_PROCESS_TIMEOUT_S)
    yield run
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.mark.multiprocess
def test_two_processes_match_single_process(setup, one_device, two_process_run):
    """Two Python processes x 2 CPU devices, joined by jax.distributed (gloo), on a 2x2
    data x fsdp mesh, running `train_sharded`: each feeds only its half of the batch. Same
    parameters, losses and sampled rewards as one process (the 2x2 program samples the same
    tokens as the 4x2 one above); the checkpoint both processes wrote restores here on one
    device."""
    from xpo_jax.checkpoint import Checkpointer

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
    assert "feeds rows 0:4 of 8" in logs[0] and "feeds rows 4:8 of 8" in logs[1]
    res = np.load(two_process_run["out"] / "result.npz")
    np.testing.assert_allclose(res["loss"], [m["loss"] for m in one_device["history"]], rtol=1e-5)
    np.testing.assert_array_equal(res["reward"], [m["task/reward"] for m in one_device["history"]])
    want = flatten(jax.device_get(one_device["state"].params))
    got = {k[len("param:"):]: res[k] for k in res.files if k.startswith("param:")}
    assert set(got) == set(want)
    assert max(float(np.max(np.abs(got[k] - want[k]))) for k in want) <= PARAM_ATOL
    ckpt = Checkpointer(str(two_process_run["out"] / "run" / "checkpoints"))
    assert ckpt.latest_round() == ROUNDS
    restored, saved_cfg, pos = ckpt.restore(par.abstract_state(setup["run"], one_device["mesh"]))
    ckpt.close()
    assert pos == {"round": ROUNDS} and saved_cfg == setup["cfg"].to_dict()
    restored = flatten(jax.device_get(restored.params))
    assert all(np.array_equal(restored[k], got[k]) for k in want)
