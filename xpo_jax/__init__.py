"""xpo_jax: online preference optimisation (XPO, online DPO, the DPO loss family) in pure JAX.

XPO: Xie, Foster, Krishnamurthy, Rosset, Awadallah, Rakhlin, "Exploratory Preference Optimization:
Harnessing Implicit Q*-Approximation for Sample-Efficient RLHF", arXiv 2405.21046.

Layers (each imports only those below it):

    pure core     losses, logprobs, sampling, oracles, state, round, models/, parallel (mesh rules)
    data, reward  tasks/ (Task, exact evaluation, reference, built-in tasks, registry),
                  hf/ (tokenizer, prompt files through TFDS array_record, the HF run's pieces)
    driving       run (the Run and build_run), train (make_train, Trainer), sweep, reporting, cli
"""
from xpo_jax import sweep
from xpo_jax.config import TrainConfig
from xpo_jax.losses import LOSS_TYPES, dpo_loss, vmax_clip_bounds, xpo_bonus, xpo_loss
from xpo_jax.round import make_round
from xpo_jax.run import Run, build_run
from xpo_jax.sampling import sample
from xpo_jax.train import Trainer, make_train

__version__ = "0.1.0"

__all__ = [
    "LOSS_TYPES", "Run", "TrainConfig", "Trainer", "build_run", "dpo_loss", "make_round", "make_train", "sample",
    "sweep", "vmax_clip_bounds", "xpo_bonus", "xpo_loss", "__version__",
]
