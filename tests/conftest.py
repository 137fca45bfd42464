"""Test set-up: 8 simulated CPU devices for the multi-device tests, and a compilation cache.

XLA reads XLA_FLAGS once, when the backend starts, so it must be set before jax is imported.
"""
import os
import tempfile

# --xla_backend_optimization_level=0: LLVM emits unoptimised code for the CPU, which halves the
# compile that dominates these tiny-model tests (the HLO, its fusion and partitioning are the same;
# only the machine code differs, so results agree to float rounding, as across any two programs).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
# XLA's CPU client sizes its thread pools max(cores, devices): 8 threads here. A program's
# independent collectives run concurrently and each blocks a thread until every device arrives,
# so 8 simulated devices on 8 threads can starve and deadlock (seen on 2 cores: 7 threads in an
# all-gather, 4 in a while loop's all-reduce; XLA aborts after 40 s). NPROC sizes those pools.
os.environ.setdefault("NPROC", "32")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile time dominates these tests. A persistent cache, fresh for each session (so a stale
# entry can never hide a change), lets identical programs built by different tests or by the
# subprocesses some tests start (they inherit the variable) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="xpo_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Reference fine-tunes are cached on disk (xpo_jax.tasks.reference): a fresh folder per session,
# so tests never read (or leave) a user's cache.
os.environ.setdefault("XPO_JAX_CACHE", tempfile.mkdtemp(prefix="xpo_jax_ref_cache_"))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

# The longest files first (xdist hands whole files to whichever worker is free, in collection
# order): a long file collected last would otherwise run alone at the end. Measured per-file
# times, 2-core sandbox, 2026-12-04 (after QLoRA's tests); files not listed keep their order after these.
LONGEST_FIRST = ("test_parallel.py", "test_faults.py", "test_round.py", "test_hf_run.py", "test_sweep.py",
                 "test_readme.py", "test_quant.py", "test_lora.py", "test_train.py", "test_tasks.py",
                 "test_hf_eval.py", "test_transformer.py", "test_sampling.py", "test_plan_memory.py",
                 "test_plan_time.py", "test_hf.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable
