"""Sweeps: the grid, one vmapped program == separate runs, grid sharding, and `xpo-jax sweep`.

The tiny setup of the parallel tests (hard-explore prompts, random reference, batch 8) with 4
rounds and exact evaluation every 2. A cell of the vmapped (and device-sharded, padded) grid must
reproduce the plain jitted `train` of that cell: same sampled tokens (hence identical rewards)
and parameters/evaluations equal to f32 rounding (rtol 1e-4 on J_beta, KL, reward).
"""
from __future__ import annotations

import argparse
import csv
import os

import jax
import numpy as np
import pytest

from common import parallel_test_config
from xpo_jax import sweep as sw

ROUNDS, EVERY = 4, 2
ALPHAS, BETAS, SEEDS = [0.0, 0.05], [0.1], [0, 1, 2]


def test_parse_and_grid():
    assert sw.parse_ints("0-3") == [0, 1, 2, 3]
    assert sw.parse_ints("0,3,5-6") == [0, 3, 5, 6]
    assert sw.parse_floats("0,1e-3, 0.01") == [0.0, 1e-3, 0.01]
    for bad in ("", "a", "3-1", "1-"):
        with pytest.raises(argparse.ArgumentTypeError):
            sw.parse_ints(bad)
    g = sw.make_grid([0, 1], [0.1, 0.2, 0.3], [7, 8])
    assert g["alpha"].shape == (12,)
    assert list(g["alpha"][:6]) == [0] * 6 and list(g["beta"][:4]) == pytest.approx([0.1, 0.1, 0.2, 0.2])
    assert list(g["seed"][:4]) == [7, 8, 7, 8]
    with pytest.raises(ValueError, match="betas"):
        sw.make_grid([0], [0.0], [0])
    with pytest.raises(ValueError, match="alphas is empty"):
        sw.make_grid([], [0.1], [0])


def _flags(cfg) -> list:
    """CLI flags reproducing cfg's pinned options."""
    out = []
    for k, v in cfg.to_dict().items():
        if k in ("name", "run_dir", "alpha", "beta", "seed"):
            continue
        v = "none" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))
        out += ["--" + k.replace("_", "-"), v]
    return out


@pytest.fixture(scope="module")
def cli_sweep(tmp_path_factory):
    """`xpo-jax sweep` on 2 alphas x 1 beta x 3 seeds = 6 cells, the grid sharded over 4
    devices (padded to 8)."""
    cfg = parallel_test_config(rounds=ROUNDS, eval_every=EVERY)
    run_dir = tmp_path_factory.mktemp("sweeps")
    argv = ["--alphas", "0,0.05", "--betas", "0.1", "--seeds", "0-2", "--grid-devices", "4",
            "--run-dir", str(run_dir), "--name", "grid", *_flags(cfg)]
    assert sw.main_sweep(argv) == 0
    return cfg, os.path.join(run_dir, "grid")


def test_cli_writes_csv_and_figures(cli_sweep):
    cfg, out = cli_sweep
    for f in ("sweep.csv", "heatmap.png", "curves.png", "curves.npz", "sweep.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    with open(os.path.join(out, "sweep.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert list(rows[0])[:7] == ["alpha", "beta", "seed", "j_beta", "reward", "kl", "p_optimal"]
    assert [(float(r["alpha"]), int(r["seed"])) for r in rows] == [(a, s) for a in ALPHAS for s in SEEDS]
    for r in rows:
        assert all(np.isfinite(float(v)) for v in r.values())
        assert float(r["j_beta"]) == pytest.approx(float(r["reward"]) - 0.1 * float(r["kl"]), abs=1e-5)
    npz = np.load(os.path.join(out, "curves.npz"))
    assert npz["eval__j_beta"].shape == (6, ROUNDS)
    assert np.isnan(npz["eval__j_beta"][:, 0]).all() and np.isfinite(npz["eval__j_beta"][:, 1]).all()


def test_cells_equal_separate_runs(cli_sweep):
    """A cell of the sharded, vmapped grid == the plain jitted train of that cell."""
    from xpo_jax.state import Hyperparams
    from xpo_jax.run import build_run
    from xpo_jax.train import make_train

    cfg, out = cli_sweep
    final = sw.read_csv(os.path.join(out, "sweep.csv"))
    curves = np.load(os.path.join(out, "curves.npz"))
    run = build_run(cfg)
    train = jax.jit(make_train(cfg, run))
    for i in (1, 5):  # (alpha 0, seed 1) and (alpha 0.05, seed 2)
        alpha, beta, seed = final["alpha"][i], final["beta"][i], int(final["seed"][i])
        hp = Hyperparams.create(alpha=alpha, beta=beta, temperature=cfg.temperature, lr_scale=cfg.lr_scale,
                                label_smoothing=cfg.label_smoothing)
        _, m = jax.device_get(train(jax.random.PRNGKey(seed), hp))
        np.testing.assert_array_equal(curves["task__reward"][i], m["task/reward"])
        for k in ("eval/j_beta", "eval/kl", "eval/reward"):
            np.testing.assert_allclose(curves[k.replace("/", "__")][i], m[k], rtol=1e-4, atol=1e-6)
        assert final["j_beta"][i] == pytest.approx(float(m["eval/j_beta"][-1]), rel=1e-4, abs=1e-6)


def test_sweep_api_unsharded(cli_sweep):
    """`sweep()` without devices on a sub-grid gives the CLI's (sharded) numbers for its cells."""
    cfg, out = cli_sweep
    ref = sw.read_csv(os.path.join(out, "sweep.csv"))
    assert callable(sw)  # xpo_jax.sweep(...) is xpo_jax.sweep.sweep(...)
    final, curves = sw(cfg, [0.05], [0.1], [0, 2])
    assert curves["loss"].shape == (2, ROUNDS)
    assert set(sw.CSV_COLUMNS) <= set(final)
    for j, i in enumerate((3, 5)):
        assert final["seed"][j] == ref["seed"][i]
        assert final["sampled_reward"][j] == pytest.approx(ref["sampled_reward"][i], abs=1e-6)
        assert final["j_beta"][j] == pytest.approx(ref["j_beta"][i], rel=1e-4, abs=1e-6)
    assert "0.05" in sw.summary_table(final)
