"""xpo_jax: online preference optimisation (XPO, online DPO, the DPO loss family) in pure JAX.

XPO: Xie, Foster, Krishnamurthy, Rosset, Awadallah, Rakhlin, "Exploratory Preference Optimization:
Harnessing Implicit Q*-Approximation for Sample-Efficient RLHF", arXiv 2405.21046.
"""
from xpo_jax import logprobs, losses, parallel, sweep
from xpo_jax.losses import LOSS_TYPES, dpo_loss, xpo_bonus, xpo_loss

__version__ = "0.1.0"

__all__ = ["LOSS_TYPES", "dpo_loss", "xpo_bonus", "xpo_loss", "logprobs", "losses", "parallel", "sweep", "__version__"]
