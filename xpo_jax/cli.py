"""Command line: `xpo-jax train | demo` (also `python -m xpo_jax ...`)."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xpo_jax.losses import LOSS_TYPES, dpo_loss, xpo_loss

    rng = np.random.default_rng(args.seed)
    B = 8
    pi_y, pi_yt, ref_y, ref_yt = (jnp.asarray(rng.normal(-20, 3, B), jnp.float32) for _ in range(4))
    y_wins = jnp.asarray(rng.random(B) < 0.5)
    print(f"xpo_jax demo on jax {jax.__version__} ({jax.default_backend()}), batch of {B} random pairs")
    loss, m = jax.jit(xpo_loss, static_argnames="loss_type")(
        pi_y=pi_y, pi_ytilde=pi_yt, ref_y=ref_y, ref_ytilde=ref_yt, y_wins=y_wins, alpha=1e-3, beta=0.1
    )
    print(f"xpo_loss (alpha=1e-3, beta=0.1): mean {float(loss.mean()):.6f}")
    for k, v in m.items():
        print(f"  {k:20s} {float(v.mean()): .6f}")
    hw, hl = pi_y - ref_y, pi_yt - ref_yt
    print("dpo_loss by loss_type (beta=0.1):")
    for lt in LOSS_TYPES:
        print(f"  {lt:10s} {float(dpo_loss(hw, hl, beta=0.1, loss_type=lt).mean()): .6f}")
    return 0


def _train(args) -> int:
    from xpo_jax.config import config_from_args

    cfg = config_from_args(args)
    try:
        cfg.validate()
    except ValueError as e:  # before anything is built or compiled
        print(f"xpo-jax train: error: {e}", file=sys.stderr)
        return 2
    print("config:\n" + cfg.to_json(), flush=True)
    from xpo_jax.train import NonFiniteLoss, Trainer

    try:
        trainer = Trainer(cfg)
    except ValueError as e:  # e.g. an earlier run's checkpoints in the way
        print(f"xpo-jax train: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = trainer.run()
    except NonFiniteLoss as e:
        print(f"xpo-jax train: {e}", file=sys.stderr)
        return 3
    print(f"wrote {cfg.run_dir}/{cfg.name}/ (metrics.jsonl, checkpoints/, curve.png, summary.md)")
    if "final_j_beta" in summary:
        print(f"exact J_beta: reference {summary['reference_j_beta']:.4f} -> final {summary['final_j_beta']:.4f}")
    return 0


def main(argv=None) -> int:
    from xpo_jax.config import add_config_flags

    parser = argparse.ArgumentParser(prog="xpo-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    t = sub.add_parser("train", help="online XPO on a built-in task (the defaults: hard-explore)")
    add_config_flags(t)
    t.set_defaults(func=_train)
    from xpo_jax.sweep import add_sweep_parser

    add_sweep_parser(sub)
    p = sub.add_parser("demo", help="evaluate the XPO and DPO-family losses on random inputs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        args = parser.parse_args(["demo"])
    return args.func(args)
