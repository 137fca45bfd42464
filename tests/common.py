"""Shared tiny set-ups of the tests (importable without side effects)."""
from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(ROOT, "experiments", "data", "prompts_tiny.jsonl")
TASK_NAME = "parallel-test"


def parallel_test_config(**overrides):
    """The tiny run of the parallel and sweep tests: hard-explore's model and prompts, a randomly
    initialised reference (reference_steps=0: no fine-tune to compile), batch 8, 2 rounds, the
    deterministic oracle (r(y) >= r(y~); sampling is the only randomness), lr 3e-3."""
    import dataclasses

    from xpo_jax.config import TrainConfig
    from xpo_jax.tasks import TASKS, get_task, register_task

    if TASK_NAME not in TASKS:
        register_task(dataclasses.replace(get_task("hard-explore"), name=TASK_NAME, reference_steps=0))
    # Every option that shapes the math is pinned here, so retuned TrainConfig defaults never
    # change what the parallel tests compare.
    kw = dict(
        task=TASK_NAME, batch_size=8, rounds=2, seed=0, reference_seed=0, eval_every=0, checkpoint_every=0,
        progress=False, tensorboard=False,
        alpha=0.05, alpha_end=None, beta=0.1, beta_end=None, loss_type="sigmoid", loss_params={},
        bonus="logprob", exploration_mix=1.0, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=None,
        bradley_terry=False, missing_eos_penalty=None, mask_identical=False,
        learning_rate=3e-3, lr_scale=1.0, warmup_rounds=0, weight_decay=0.0, max_grad_norm=1.0,
        updates_per_round=1, micro_batches=1, replay_capacity=0, replay_batch_size=0,
    )
    kw.update(overrides)
    return TrainConfig(**kw)


def hf_test_config(policy, reward_model, run_dir, name, **overrides):
    """A tiny HF run (experiments/make_tiny_hf.py checkpoints, experiments/data/prompts_tiny.jsonl)."""
    from xpo_jax.config import TrainConfig

    opts = dict(rounds=2, batch_size=4, max_new_tokens=8, max_prompt_length=48, progress=False, tensorboard=False,
                eval_every=0, checkpoint_every=0)
    return TrainConfig(policy=str(policy), reward_model=str(reward_model), prompts=PROMPTS, run_dir=str(run_dir),
                       name=name, **{**opts, **overrides})


def make_tiny_hf(out, *extra):
    """experiments/make_tiny_hf.py OUT [extra...] -> (policy dir, reward-model dir)."""
    spec = importlib.util.spec_from_file_location("make_tiny_hf", os.path.join(ROOT, "experiments", "make_tiny_hf.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([str(out), *extra])


def flatten(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def max_diff(a, b) -> float:
    import jax
    import numpy as np

    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def host(tree):
    """`tree` as numpy arrays on the host."""
    import jax
    import numpy as np

    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def train_on_one_device(cfg, run, run_dir) -> dict:
    """`cfg` (with `run`) trained by a Trainer on one device in `run_dir`/one, saved at the end:
    dict(trainer, cfg, state on the host)."""
    import dataclasses

    import jax

    from xpo_jax import parallel as par
    from xpo_jax.train import Trainer

    cfg = dataclasses.replace(cfg, run_dir=str(run_dir), name="one")
    t = Trainer(cfg, mesh=par.make_mesh(1, 1, devices=jax.devices()[:1]), run=run)
    t.run()
    return dict(trainer=t, cfg=cfg, state=host(t.state))


def trained_run_fixtures(cfg, name: str):
    """Module fixtures (`run, trained = trained_run_fixtures(CFG, "lora")`): `run`, the built Run of
    `cfg`; `trained`, `train_on_one_device` of it in a fresh folder."""
    @pytest.fixture(scope="module")
    def run():
        from xpo_jax.run import build_run

        return build_run(cfg)

    @pytest.fixture(scope="module")
    def trained(run, tmp_path_factory):
        return train_on_one_device(cfg, run, tmp_path_factory.mktemp(name))

    return run, trained


@pytest.fixture(scope="module", autouse=True)
def no_plots():
    """curve.png is not under test where this is imported (autouse) and costs seconds per run."""
    from xpo_jax import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "plot_run_curves", lambda *a, **k: None)
        yield
