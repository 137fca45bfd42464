"""One process of the real multi-process test (tests/test_parallel.py starts two of these).

    python tests/multihost_worker.py --coordinator localhost:PORT --num-processes 2 --process-id I \
        --out DIR [--data 2 --fsdp 2 --rounds 2]

Each process sees its own CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=K set by
the parent), joins the others with `initialize_distributed` (gloo CPU collectives), builds a
data x fsdp mesh over every process's devices, places the state, feeds only its own rows of each
round's batch (`host_prompts` -> `jax.make_array_from_process_local_data`), runs the library's
sharded host loop (`train_sharded`: the sharded round, then an orbax checkpoint that both
processes write into DIR/run/checkpoints), and process 0 writes the gathered final parameters and
each round's loss and sampled reward to DIR/result.npz for the parent to compare with the
single-process run.

Also importable (without side effects) for `parallel_test_config()`, the shared tiny setup.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

TASK_NAME = "parallel-test"


def parallel_test_config(**overrides):
    """The tiny run of the parallel tests: hard-explore's model and prompts, a randomly
    initialised reference (reference_steps=0: no fine-tune to compile), batch 8, 2 rounds, the
    deterministic oracle (r(y) >= r(y~); sampling is the only randomness), lr 3e-3."""
    import dataclasses

    from xpo_jax.config import TrainConfig
    from xpo_jax.tasks import TASKS, get_task, register_task

    if TASK_NAME not in TASKS:
        register_task(dataclasses.replace(get_task("hard-explore"), name=TASK_NAME, reference_steps=0))
    # Every option that shapes the math is pinned here, so retuned TrainConfig defaults never
    # change what the parallel tests compare (nor make the parent and the workers disagree).
    kw = dict(
        task=TASK_NAME, batch_size=8, rounds=2, seed=0, reference_seed=0, eval_every=0, checkpoint_every=0,
        progress=False, tensorboard=False,
        alpha=0.05, alpha_end=None, beta=0.1, beta_end=None, loss_type="sigmoid", label_smoothing=0.0,
        bonus_clip=None, exploration_policy="ref", temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=None,
        bradley_terry=False, missing_eos_penalty=None, mask_identical=False,
        learning_rate=3e-3, lr_scale=1.0, warmup_rounds=0, weight_decay=0.0, max_grad_norm=1.0,
        updates_per_round=1, micro_batches=1, replay_capacity=0, replay_batch_size=0,
    )
    kw.update(overrides)
    return TrainConfig(**kw)


def flatten(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", type=int, default=None)
    ap.add_argument("--fsdp", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    # First, before anything touches a JAX device.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from xpo_jax.parallel import initialize_distributed

    info = initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    print(f"[{args.process_id}] joined: {info}", flush=True)

    import jax
    import numpy as np

    from xpo_jax import parallel as par
    from xpo_jax.train import build_run

    cfg = parallel_test_config(rounds=args.rounds, checkpoint_every=0)
    run = build_run(cfg)
    mesh = par.make_mesh(args.data, args.fsdp)
    rows = par.host_batch_slice(mesh, cfg.batch_size)
    print(f"[{args.process_id}] mesh {dict(mesh.shape)}, feeds rows {rows.start}:{rows.stop} of {cfg.batch_size}",
          flush=True)
    # The library's host loop on the mesh; out_dir: every process takes part in the orbax
    # checkpoint written after the last round (the parent restores it on one device).
    state, history = par.train_sharded(cfg, mesh, run, out_dir=os.path.join(args.out, "run"), verbose=False)
    params = par.gather(state.params)
    loss = history[-1]["loss"]
    if jax.process_index() == 0:
        np.savez(os.path.join(args.out, "result.npz"), loss=np.asarray([m["loss"] for m in history]),
                 reward=np.asarray([m["task/reward"] for m in history]),
                 **{"param:" + k: np.asarray(v) for k, v in flatten(params).items()})
    print(f"[{args.process_id}] done in {time.perf_counter() - t0:.1f} s, last loss {loss:.6f}", flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
