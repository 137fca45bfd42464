"""Trainer and make_train: exact resume, NaN stop, SIGTERM checkpoint, CLI validation, outputs."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from xpo_jax.checkpoint import Checkpointer
from xpo_jax.cli import main as cli_main
from xpo_jax.config import TrainConfig
from xpo_jax.run import build_run
from xpo_jax.train import NonFiniteLoss, Trainer, make_train

CFG = TrainConfig(rounds=6, batch_size=8, eval_every=3, checkpoint_every=3, progress=False, tensorboard=True)


@pytest.fixture(scope="module")
def run():
    return build_run(CFG)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def straight(run, tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    t = Trainer(dataclasses.replace(CFG, run_dir=str(d), name="s"), run=run)
    summary = t.run()
    return t, summary, d / "s"


def test_outputs_and_summary(straight):
    t, summary, out = straight
    for f in ("config.json", "metrics.jsonl", "curve.png", "summary.json", "summary.md"):
        assert (out / f).exists(), f
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert rows[0]["round"] == 0 and "eval/j_beta" in rows[0]  # the reference's exact J_beta
    assert [r["round"] for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
    assert "eval/j_beta" in rows[3] and "eval/j_beta" in rows[6] and "eval/j_beta" not in rows[2]
    for key in ("loss", "objective/kl", "objective/entropy", "grad_norm", "learning_rate", "rewards/margins",
                "val/model_contain_eos_token", "objective/scores_margin", "task/reward"):
        assert np.isfinite(rows[1][key]), key
    assert summary["rounds"] == 6 and np.isfinite(summary["final_j_beta"])
    assert Checkpointer(str(out / "checkpoints")).latest_round() == 6


def test_a_new_run_never_lands_on_an_earlier_runs_checkpoints(run, straight):
    _, _, out = straight
    cfg = dataclasses.replace(CFG, run_dir=str(out.parent), name=out.name)
    with pytest.raises(ValueError, match="holds an earlier run's output: pass --resume"):
        Trainer(cfg, run=run)
    assert Checkpointer(str(out / "checkpoints")).latest_round() == 6  # untouched
    Trainer(dataclasses.replace(cfg, overwrite=True, rounds=1, eval_every=0), run=run)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_pure_train_equals_host_loop(run, straight):
    """make_train's lax.scan and the Trainer's Python loop run the same rounds."""
    t, _, _ = straight
    train = jax.jit(make_train(CFG, run))
    state, metrics = train(jax.random.PRNGKey(CFG.seed), run.hparams())
    # Two compiled programs (the scan, and the Trainer's round in its decode layout): float rounding,
    # which six Adam steps can amplify on a parameter with a tiny gradient (Adam normalises it).
    for a, b in zip(leaves(state.params), leaves(t.state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert metrics["loss"].shape == (6,)
    ev = np.asarray(metrics["eval/j_beta"])
    assert np.isnan(ev[0]) and np.isfinite(ev[2]) and np.isfinite(ev[5])


def test_exact_resume_is_bitwise(run, straight, tmp_path):
    t_straight, _, _ = straight
    cfg = dataclasses.replace(CFG, run_dir=str(tmp_path), name="r")
    Trainer(cfg, run=run).run(stop_after=3)
    assert Checkpointer(str(tmp_path / "r" / "checkpoints")).latest_round() == 3
    resumed = Trainer(dataclasses.replace(cfg, resume=True), run=run)
    resumed.run()
    for a, b in zip(leaves(resumed.state), leaves(t_straight.state)):
        np.testing.assert_array_equal(a, b)
    rows = [json.loads(l) for l in open(tmp_path / "r" / "metrics.jsonl")]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]


def test_resume_rejects_a_different_config(run, tmp_path):
    cfg = dataclasses.replace(CFG, run_dir=str(tmp_path), name="c", eval_every=0)
    Trainer(cfg, run=run).run(stop_after=1)
    with pytest.raises(ValueError, match=r"differ from the checkpoint.s: --alpha was \S+, now 0.5"):
        Trainer(dataclasses.replace(cfg, resume=True, alpha=0.5), run=run).run()


def test_nan_stops_and_keeps_last_good_checkpoint(run, tmp_path):
    cfg = dataclasses.replace(CFG, run_dir=str(tmp_path), name="n", eval_every=0, checkpoint_every=2)
    t = Trainer(cfg, run=run)
    real_step = t.program.step
    calls = []

    def poisoned(state, *args):
        state, m = real_step(state, *args)
        calls.append(1)
        if len(calls) == 3:
            m = dict(m, loss=m["loss"] * float("nan"))
        return state, m

    t.program.step = poisoned
    ck = tmp_path / "n" / "checkpoints"
    with pytest.raises(NonFiniteLoss, match=r"round 3: loss=nan.*last good checkpoint \(round 2\)"):
        t.run()
    assert Checkpointer(str(ck)).latest_round() == 2
    assert sorted(p.name for p in ck.iterdir() if p.name.isdigit()) == ["2"]


def test_cli_rejects_bad_values_before_compiling(capsys):
    for argv, msg in [
        (["train", "--beta", "0"], "--beta=0.0: must be finite and > 0"),
        (["train", "--alpha", "-1"], "--alpha=-1.0: must be finite and >= 0"),
        (["train", "--top-p", "1.5"], "--top-p=1.5: must be in (0, 1]"),
        (["train", "--loss-type", "dpo"], "--loss-type='dpo': expected one of"),
        (["train", "--batch-size", "10", "--micro-batches", "3"], "must divide --batch-size=10"),
        (["train", "--task", "nope"], "--task='nope': expected one of"),
    ]:
        t0 = time.perf_counter()
        assert cli_main(argv) == 2
        assert msg in capsys.readouterr().err
        assert time.perf_counter() - t0 < 2.0
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--rounds", "many"])
    assert e.value.code == 2


def test_sigterm_on_a_mesh_saves_exits_75_and_resumes(tmp_path):
    """`xpo-jax train --data 4 --fsdp 2` (8 simulated devices, inherited from conftest): SIGTERM
    finishes the round, saves it, exits with 75; --resume continues from exactly that round."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    base = [sys.executable, "-m", "xpo_jax", "train", "--batch-size", "8", "--eval-every", "0", "--checkpoint-every",
            "0", "--run-dir", str(tmp_path), "--name", "sig", "--progress", "false", "--data", "4", "--fsdp", "2",
            "--tensorboard", "false"]  # tensorboardX's import costs each process seconds
    proc = subprocess.Popen(base + ["--rounds", "100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or sum(1 for _ in open(metrics)) < 3):
        time.sleep(0.5)
    assert metrics.exists(), proc.communicate(timeout=5)[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert "signal: saved round" in out
    last = [json.loads(l) for l in open(metrics)][-1]["round"]
    assert Checkpointer(str(tmp_path / "sig" / "checkpoints")).latest_round() == last
    again = subprocess.run(base + ["--rounds", str(last + 2), "--resume"], env=env, capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {tmp_path / 'sig' / 'checkpoints'}/{last}" in again.stdout
    assert [json.loads(l)["round"] for l in open(metrics)] == list(range(1, last + 3))
