"""xpo_jax: online preference optimisation (XPO, online DPO, the DPO loss family) in pure JAX.

XPO: Xie, Foster, Krishnamurthy, Rosset, Awadallah, Rakhlin, "Exploratory Preference Optimization:
Harnessing Implicit Q*-Approximation for Sample-Efficient RLHF", arXiv 2405.21046.

Layers (each imports only those below it):

    low (import nothing of xpo_jax)
                  registry, parallel (mesh, Layout), distributed (multi-host), reporting
    pure core     losses, logprobs, sampling, oracles, pairs, state, round, models/
    data, reward  tasks/ (Task, exact evaluation, reference, built-in tasks, registry),
                  hf/ (tokenizer, prompt files through TFDS array_record, the HF run's pieces)
    driving       config, run (the Run and build_run), train (make_train, Trainer),
                  sweeps (sweep), cli
"""
from xpo_jax.config import TrainConfig
from xpo_jax.losses import (
    BONUSES, LOSS_TYPES, LOSSES, dpo_loss, register_bonus, register_loss, vmax_clip_bounds, xpo_bonus, xpo_loss,
)
from xpo_jax.pairs import LabelledPairs, Pairs
from xpo_jax.parallel import Layout, make_mesh
from xpo_jax.round import make_round
from xpo_jax.run import Run, build_run
from xpo_jax.sampling import sample
from xpo_jax.sweeps import sweep
from xpo_jax.train import Trainer, make_train

__version__ = "0.1.0"

__all__ = [
    "BONUSES", "LOSSES", "LOSS_TYPES", "LabelledPairs", "Layout", "Pairs", "Run", "TrainConfig", "Trainer",
    "build_run", "dpo_loss", "make_mesh", "make_round", "make_train", "register_bonus", "register_loss", "sample",
    "sweep", "vmax_clip_bounds", "xpo_bonus", "xpo_loss", "__version__",
]
