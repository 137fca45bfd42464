"""Test set-up: 8 simulated CPU devices for the multi-device tests.

XLA reads XLA_FLAGS once, when the backend starts, so it must be set before jax is imported.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
