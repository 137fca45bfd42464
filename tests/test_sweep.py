"""Sweeps: the grid, one vmapped program == separate runs (XPO and online DPO in one program),
grid sharding, final parameters, labels-to-optimum, and `xpo-jax sweep`.

The tiny setup of the parallel tests (hard-explore prompts, random reference, batch 8) with 4
rounds and exact evaluation every 2. A cell of the vmapped (and device-sharded, padded) grid must
reproduce the plain jitted `train` of that cell, run on its own cheap sampling path (lambda = 1:
y~ from pi_ref only; lambda = 0: both responses from pi_t): same sampled tokens (hence identical
rewards) and parameters/evaluations equal to f32 rounding (rtol 1e-4 on J_beta, KL, reward).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os

import jax
import numpy as np
import pytest

from common import max_diff, parallel_test_config
from xpo_jax import reporting
from xpo_jax import sweeps as sw
from xpo_jax.cli import main as cli_main, parse_floats, parse_ints


def read_csv(path: str) -> dict:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.asarray([float(r[k]) for r in rows]) for k in rows[0]}

ROUNDS, EVERY = 4, 2
ALPHAS, BETAS, MIXES, SEEDS = [0.0, 0.05], [0.1], [1.0, 0.0], [0, 1]


def test_parse_and_grid():
    assert parse_ints("0-3") == [0, 1, 2, 3]
    assert parse_ints("0,3,5-6") == [0, 3, 5, 6]
    assert parse_floats("0,1e-3, 0.01") == [0.0, 1e-3, 0.01]
    for bad in ("", "a", "3-1", "1-"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_ints(bad)
    g = sw.make_grid([0, 1], [0.1, 0.2, 0.3], [7, 8])
    assert g["alpha"].shape == (12,)
    assert list(g["alpha"][:6]) == [0] * 6 and list(g["beta"][:4]) == pytest.approx([0.1, 0.1, 0.2, 0.2])
    assert list(g["seed"][:4]) == [7, 8, 7, 8] and set(g["mix"]) == {1.0}
    g = sw.make_grid([0], [0.1], [0, 1], mixes=[1, 0])
    assert list(g["mix"]) == [1, 1, 0, 0] and list(g["seed"]) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="betas"):
        sw.make_grid([0], [0.0], [0])
    with pytest.raises(ValueError, match="alphas is empty"):
        sw.make_grid([], [0.1], [0])
    with pytest.raises(ValueError, match="mixes"):
        sw.make_grid([0], [0.1], [0], mixes=[1.5])


def test_method_names_say_which_baseline():
    assert reporting.method_name(0, 0) == "online DPO"
    assert reporting.method_name(0, 1) == "ref-sampling DPO"
    assert reporting.method_name(0.01, 1) == "XPO alpha=0.01"
    assert reporting.method_name(0.01, 0) == "XPO alpha=0.01, y~ from pi_t"


def test_labels_until_and_first_round():
    curves = {"eval/p_optimal": np.array([[np.nan, 0.2, np.nan, 0.6], [np.nan, 0.95, np.nan, 0.99],
                                          [np.nan, 0.1, np.nan, 0.2]]),
              "labels": np.tile(np.array([8.0, 16, 24, 32]), (3, 1))}
    np.testing.assert_array_equal(sw.labels_until(curves, "eval/p_optimal", 0.5), [32, 16, np.nan])
    # P(optimal) is a mean over prompts: half of 8 prompts solved at 0.9995 each is 0.4998, which
    # counts as 0.5 (within THRESHOLD_TOLERANCE); 0.48 does not.
    steps = {"eval/p_optimal": np.array([[np.nan, 0.4998, 0.4998, 0.4998], [0.48, 0.48, 0.48, 0.9]]),
             "labels": np.tile(np.array([8.0, 16, 24, 32]), (2, 1))}
    assert sw.THRESHOLD_TOLERANCE == 0.01
    np.testing.assert_array_equal(sw.labels_until(steps, "eval/p_optimal", 0.5), [16, 32])
    np.testing.assert_array_equal(sw.labels_until(steps, "eval/p_optimal", 0.5, tolerance=0.0), [np.nan, 32])
    np.testing.assert_array_equal(sw.first_round(np.array([[0, 0, 1], [0, 0, 0]], bool)), [3, np.nan])


def _flags(cfg) -> list:
    """CLI flags reproducing cfg's pinned options."""
    out = []
    for k, v in cfg.to_dict().items():
        if k in ("name", "run_dir", "alpha", "beta", "seed", "exploration_mix"):
            continue
        if isinstance(v, dict):
            for name, value in v.items():
                out += ["--" + k.replace("_params", "-param"), f"{name}={value}"]
            continue
        v = "none" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))
        out += ["--" + k.replace("_", "-"), v]
    return out


@pytest.fixture(scope="module")
def cli_sweep(tmp_path_factory):
    """`xpo-jax sweep` on 2 alphas x 1 beta x 2 mixes x 2 seeds = 8 cells (XPO, online DPO,
    reference-sampling DPO and XPO with y~ from pi_t), the grid sharded over 3 devices (padded
    to 9)."""
    cfg = parallel_test_config(rounds=ROUNDS, eval_every=EVERY)
    run_dir = tmp_path_factory.mktemp("sweeps")
    argv = ["sweep", "--alphas", "0,0.05", "--betas", "0.1", "--mixes", "1,0", "--seeds", "0-1", "--grid-devices",
            "3", "--run-dir", str(run_dir), "--name", "grid", *_flags(cfg)]
    assert cli_main(argv) == 0
    return cfg, os.path.join(run_dir, "grid")


def test_cli_writes_csv_figures_and_params(cli_sweep):
    cfg, out = cli_sweep
    for f in ("sweep.csv", "heatmap.png", "curves.png", "curves.npz", "sweep.json", "params.npz"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    with open(os.path.join(out, "sweep.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert list(rows[0])[:8] == ["alpha", "beta", "mix", "seed", "j_beta", "reward", "kl", "p_optimal"]
    assert [(float(r["alpha"]), float(r["mix"]), int(r["seed"])) for r in rows] == [
        (a, m, s) for a in ALPHAS for m in MIXES for s in SEEDS]
    for r in rows:
        assert all(np.isfinite(float(r[k])) for k in ("j_beta", "reward", "kl", "p_optimal", "ref_j_beta"))
        assert float(r["j_beta"]) == pytest.approx(float(r["reward"]) - 0.1 * float(r["kl"]), abs=1e-5)
    npz = np.load(os.path.join(out, "curves.npz"))
    assert npz["eval__j_beta"].shape == (8, ROUNDS)
    assert np.isnan(npz["eval__j_beta"][:, 0]).all() and np.isfinite(npz["eval__j_beta"][:, 1]).all()
    np.testing.assert_array_equal(npz["labels"][0], [8, 16, 24, 32])  # batch 8 per round
    # y~ from pi_ref exactly when lambda = 1
    np.testing.assert_array_equal(npz["val__yt_from_ref"].mean(1), [1, 1, 0, 0, 1, 1, 0, 0])
    params = np.load(os.path.join(out, "params.npz"))
    assert all(v.shape[0] == 8 for v in params.values())


@pytest.mark.parametrize("i", [2, 5])
def test_cells_equal_separate_runs(cli_sweep, i):
    """A cell of the sharded, vmapped mixture grid == the plain jitted train of that cell on its
    own cheap sampling path: online DPO (both from pi_t, seed 0) and XPO (y~ from pi_ref, seed 1).
    (Reference-sampling DPO and XPO with y~ from pi_t take the same two paths.)"""
    from xpo_jax.run import build_run
    from xpo_jax.train import make_train

    cfg, out = cli_sweep
    final = read_csv(os.path.join(out, "sweep.csv"))
    curves = np.load(os.path.join(out, "curves.npz"))
    params = np.load(os.path.join(out, "params.npz"))
    alpha, beta, mix, seed = final["alpha"][i], final["beta"][i], final["mix"][i], int(final["seed"][i])
    cell_cfg = dataclasses.replace(cfg, alpha=float(alpha), beta=float(beta), exploration_mix=float(mix))
    run = build_run(cell_cfg)
    assert run.fns is not None
    state, m = jax.device_get(jax.jit(make_train(cell_cfg, run))(jax.random.PRNGKey(seed), run.hparams()))
    # the vmapped grid and the plain train are two compiled programs: float32 rounding, not bitwise
    np.testing.assert_allclose(curves["task__reward"][i], m["task/reward"], rtol=1e-6, atol=1e-6)
    for k in ("eval/j_beta", "eval/kl", "eval/reward"):
        np.testing.assert_allclose(curves[k.replace("/", "__")][i], m[k], rtol=1e-4, atol=1e-6)
    assert final["j_beta"][i] == pytest.approx(float(m["eval/j_beta"][-1]), rel=1e-4, abs=1e-6)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert max_diff([params[k][i] for k in flat], list(flat.values())) <= 5e-5


def test_sweep_api_unsharded(cli_sweep):
    """`sweep()` without devices on a sub-grid gives the CLI's (sharded) numbers for its cells."""
    cfg, out = cli_sweep
    import xpo_jax

    ref = read_csv(os.path.join(out, "sweep.csv"))
    assert xpo_jax.sweep is sw.sweep  # an ordinary function of an ordinary module
    final, curves = xpo_jax.sweep(cfg, [0.05], [0.1], [0, 1], mixes=[1.0, 0.0])
    assert final.pop("compiled_programs") == 1
    assert curves["loss"].shape == (4, ROUNDS)
    assert set(reporting.CSV_COLUMNS) <= set(final)
    for j, i in enumerate((4, 5, 6, 7)):
        assert final["seed"][j] == ref["seed"][i] and final["mix"][j] == ref["mix"][i]
        assert final["sampled_reward"][j] == pytest.approx(ref["sampled_reward"][i], abs=1e-6)
        assert final["j_beta"][j] == pytest.approx(ref["j_beta"][i], rel=1e-4, abs=1e-6)
    assert jax.tree_util.tree_leaves(final["params"])[0].shape[0] == 4


def test_sweep_with_a_built_run_honours_lambda():
    """`run=` reuses a Run built for the plain config; the sweep's mixture over lambda must still
    decide where y~ comes from in every cell (lambda = 0: online DPO, y~ from pi_t)."""
    from xpo_jax.run import build_run

    cfg = parallel_test_config(rounds=2, eval_every=2)
    final, curves = sw.sweep(cfg, [0.0], [0.1], [0], mixes=[1.0, 0.0], run=build_run(cfg))
    np.testing.assert_array_equal(curves["val/yt_from_ref"].mean(1), [1.0, 0.0])
    with pytest.raises(ValueError, match="built for another config: batch_size differ"):
        sw.sweep(cfg, [0.0], [0.1], [0], run=build_run(dataclasses.replace(cfg, batch_size=16)))


USER_LOSS = '''
import jax


def margin_loss(chosen, rejected, *, beta, gamma=0.0):
    """-log sigmoid(beta * (h_w - h_l) - gamma): DPO asking for a margin gamma (as SimPO's gamma)."""
    return -jax.nn.log_sigmoid(beta * (chosen - rejected) - gamma)
'''


@pytest.fixture(scope="module")
def user_loss_sweep(tmp_path_factory):
    """`xpo-jax sweep --loss-type userloss:margin_loss --loss-param gamma=0,2`: a user's loss, from
    a module of the user's, swept over its own hyperparameter."""
    import sys

    where = tmp_path_factory.mktemp("userloss")
    (where / "userloss.py").write_text(USER_LOSS)
    sys.path.insert(0, str(where))
    cfg = parallel_test_config(rounds=3, eval_every=3, loss_type="userloss:margin_loss")
    run_dir = tmp_path_factory.mktemp("loss_sweep")
    argv = ["sweep", "--alphas", "0.05", "--betas", "0.1", "--seeds", "0", "--loss-param", "gamma=0,2",
            "--run-dir", str(run_dir), "--name", "ls", *_flags(cfg)]
    assert cli_main(argv) == 0
    return cfg, os.path.join(run_dir, "ls")


def test_user_loss_sweep_cell_equals_a_separate_run(user_loss_sweep, i=1):
    import json

    from xpo_jax.run import build_run
    from xpo_jax.train import make_train

    cfg, out = user_loss_sweep
    final = read_csv(os.path.join(out, "sweep.csv"))
    with open(os.path.join(out, "sweep.json")) as f:
        info = json.load(f)
    assert info["compiled_programs"] == 1 and info["loss_params"] == {"gamma": [0.0, 2.0]}
    assert list(final)[:5] == ["alpha", "beta", "mix", "gamma", "seed"]
    np.testing.assert_array_equal(final["gamma"], [0.0, 2.0])
    curves = np.load(os.path.join(out, "curves.npz"))
    cell = dataclasses.replace(cfg, alpha=0.05, beta=0.1, loss_params={"gamma": float(final["gamma"][i])})
    run = build_run(cell)
    state, m = jax.device_get(jax.jit(make_train(cell, run))(jax.random.PRNGKey(0), run.hparams()))
    for k in ("loss", "loss/dpo", "eval/j_beta", "eval/kl"):
        np.testing.assert_allclose(curves[k.replace("/", "__")][i], m[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # gamma changes the loss: the cells differ (the comparison above is not vacuous).
    assert not np.allclose(curves["loss__dpo"][0], curves["loss__dpo"][1])


def test_sweep_refuses_bad_loss_params_before_compiling(tmp_path, capsys):
    argv = ["sweep", "--seeds", "0", "--loss-param", "label_smoothing=0.1,0.7", "--run-dir", str(tmp_path),
            "--rounds", "1"]
    assert cli_main(argv) == 2
    assert "label_smoothing must lie in [0.0, 0.5)" in capsys.readouterr().err
    assert cli_main(["sweep", "--loss-param", "gama=0.1,0.2", "--run-dir", str(tmp_path)]) == 2
    assert "'sigmoid' has no hyperparameter 'gama'" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
