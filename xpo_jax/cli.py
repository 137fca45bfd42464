"""The command line: `xpo-jax train | sweep | demo` (also `python -m xpo_jax ...`).

    xpo-jax train [--data D --fsdp F] [every TrainConfig flag]         one run, any mesh
    xpo-jax train --distributed ...                                     every process of a pod
    xpo-jax sweep --alphas 0,0.01 --betas 0.1 --seeds 0-7 [flags]       a grid as one program
    xpo-jax demo                                                        the losses on random numbers

Exit status: 0 finished; 2 bad input (one line naming the flag or file, before anything
compiles where it can be known); 3 stopped on a NaN/inf loss (nothing saved for that round);
75 stopped by SIGTERM after saving (resume with --resume); 130 stopped by SIGINT (Ctrl-C) after
saving, or before the first round with nothing to save.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from typing import Optional, Sequence

# "--learning-rate -1e-3": argparse takes "-1e-3" for a flag (its negative-number pattern has no
# exponents), so such values are glued to their flag ("--learning-rate=-1e-3") before parsing.
_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf|-nan", re.IGNORECASE)


def _glue_negative_numbers(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    for tok in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_NUMBER.fullmatch(tok):
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def _error(command: str, e: BaseException) -> int:
    """One line on stderr (a multi-line message, e.g. from a library, is joined), exit status 2."""
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    print(f"xpo-jax {command}: error: {msg}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (TPU pod, GPU cluster): run the same command in every process")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run (jax.distributed; implied by the three flags below; on a Cloud TPU "
                        "pod, SLURM, Open MPI or Kubernetes nothing else is needed)")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0 ($JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None, help="$JAX_NUM_PROCESSES")
    g.add_argument("--process-id", type=int, default=None, help="$JAX_PROCESS_ID")


def _join_distributed(args) -> None:
    if args.distributed or any(v is not None for v in (args.coordinator_address, args.num_processes, args.process_id)):
        from xpo_jax.distributed import initialize_distributed

        info = initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        print(f"process {info['process_index']} of {info['process_count']}: {info['local_device_count']} local "
              f"of {info['device_count']} {info['platform']} devices", flush=True)


def check_backend() -> None:
    """ValueError naming $JAX_PLATFORMS when JAX has no usable backend (e.g. a platform that is not
    there), instead of a traceback at the first array."""
    import jax

    try:
        jax.devices()
    except RuntimeError as e:
        plat = os.environ.get("JAX_PLATFORMS")
        where = f"JAX_PLATFORMS={plat!r}: " if plat else ""
        raise ValueError(f"{where}no usable JAX backend ({e})") from None


def _train(args) -> int:
    from xpo_jax.config import config_from_args

    cfg = config_from_args(args)
    try:
        cfg.validate()
        _join_distributed(args)  # before anything touches a device
        check_backend()
    except (ValueError, RuntimeError) as e:
        return _error("train", e)
    import jax

    lead = jax.process_index() == 0
    if lead:
        print("config:\n" + cfg.to_json(), flush=True)
    from xpo_jax.train import EXIT_INTERRUPTED, EXIT_SIGINT, NonFiniteLoss, Trainer

    try:
        trainer = Trainer(cfg)
        summary = trainer.run()
    except NonFiniteLoss as e:
        print(f"xpo-jax train: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # Ctrl-C before the loop (building, compiling): nothing to save yet
        print("xpo-jax train: interrupted before the first round; nothing was saved", file=sys.stderr)
        return EXIT_SIGINT
    except (ValueError, OSError) as e:
        return _error("train", e)
    if summary.get("interrupted"):
        return EXIT_SIGINT if summary.get("signal") == signal.SIGINT else EXIT_INTERRUPTED
    if lead:
        print(f"wrote {cfg.run_dir}/{cfg.name}/ (metrics.jsonl, checkpoints/, curve.png, summary.md)")
        if "final_j_beta" in summary:
            print(f"exact J_beta: reference {summary['reference_j_beta']:.4f} -> final {summary['final_j_beta']:.4f}")
    return 0


# ----------------------------------------------------------------------------------------------
# sweep
# ----------------------------------------------------------------------------------------------


def parse_floats(s: str) -> list:
    """"0,1e-3,0.01" -> [0.0, 0.001, 0.01]."""
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def parse_ints(s: str) -> list:
    """"0-7" -> [0..7]; "0,3,5-6" -> [0, 3, 5, 6]."""
    out = []
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise argparse.ArgumentTypeError(f"empty range {part!r}")
            out.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part):
            out.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"expected seeds like '0-7' or '0,3,5-6', got {s!r}")
    if not out:
        raise argparse.ArgumentTypeError(f"no seeds in {s!r}")
    return out


def parse_param_values(s: str) -> tuple[str, list]:
    """"gamma=0,0.5,1" -> ("gamma", [0.0, 0.5, 1.0]): one swept --loss-param / --bonus-param."""
    name, eq, values = s.partition("=")
    if not eq or not name.strip():
        raise argparse.ArgumentTypeError(f"expected name=v1,v2,..., got {s!r}")
    return name.strip(), parse_floats(values)


def _swept_params(pairs: Optional[list], flag: str) -> tuple[dict, dict]:
    """({name: values} swept, {name: value} fixed) of the repeated --loss-param / --bonus-param."""
    swept: dict = {}
    for name, values in pairs or []:
        if name in swept:
            raise ValueError(f"{flag} {name} given twice")
        if not values:
            raise ValueError(f"{flag} {name}=: no values")
        swept[name] = values
    return ({k: v for k, v in swept.items() if len(v) > 1}, {k: v[0] for k, v in swept.items() if len(v) == 1})


def _sweep(args) -> int:
    import dataclasses

    from xpo_jax.config import TrainConfig, config_from_args
    from xpo_jax.sweeps import claim_sweep_dir, make_grid, sweep_config

    cfg = config_from_args(args, base=TrainConfig(name="sweep"))
    try:
        loss_grid, loss_fixed = _swept_params(args.loss_param, "--loss-param")
        bonus_grid, bonus_fixed = _swept_params(args.bonus_param, "--bonus-param")
        cfg = dataclasses.replace(cfg, loss_params=loss_fixed, bonus_params=bonus_fixed)
        alphas = args.alphas if args.alphas is not None else [cfg.alpha]
        betas = args.betas if args.betas is not None else [cfg.beta]
        seeds = args.seeds if args.seeds is not None else [cfg.seed]
        mixes = args.mixes if args.mixes is not None else [cfg.exploration_mix]
        cfg = sweep_config(cfg, mixes)
        make_grid(alphas, betas, seeds, mixes, loss_grid, bonus_grid)
        for flag, grid in (("loss_params", loss_grid), ("bonus_params", bonus_grid)):
            for name, values in grid.items():
                for v in values:
                    cfg.check_hyperparameters(**{flag: {name: v}})
        if args.grid_devices < 0:
            raise ValueError(f"--grid-devices={args.grid_devices}: must be >= 0")
        bad_seeds = [s for s in seeds if not 0 <= s < 2**32]
        if bad_seeds:
            raise ValueError(f"--seeds: {bad_seeds[:3]} outside [0, 2^32) (a PRNG seed is 32 bits)")
        cfg.validate()
        check_backend()
        import jax

        local = jax.local_devices()
        if args.grid_devices > len(local):
            raise ValueError(f"--grid-devices={args.grid_devices} but only {len(local)} local devices")
        lock = claim_sweep_dir(cfg)  # last: nothing below refuses before the sweep runs
    except (ValueError, OSError) as e:
        return _error("sweep", e)
    try:
        return _run_sweep(cfg, args, devices=local[: args.grid_devices or len(local)], grids=(
            alphas, betas, seeds, mixes, loss_grid, bonus_grid))
    finally:
        lock.release()


def _run_sweep(cfg, args, devices, grids) -> int:
    import numpy as np

    from xpo_jax.reporting import summary_table, write_sweep_outputs
    from xpo_jax.sweeps import sweep

    alphas, betas, seeds, mixes, loss_grid, bonus_grid = grids
    swept = {"alphas": alphas, "betas": betas, "mixes": mixes, **loss_grid, **bonus_grid, "seeds": seeds}
    G = int(np.prod([len(v) for v in swept.values()]))
    print(f"sweep: {' x '.join(f'{len(v)} {k}' for k, v in swept.items())} = {G} runs of {cfg.rounds} rounds "
          f"on {cfg.task}, one program on {len(devices)} {devices[0].platform} device(s)", flush=True)
    t0 = time.perf_counter()
    final, curves = sweep(cfg, alphas, betas, seeds, mixes=mixes, loss_params=loss_grid, bonus_params=bonus_grid,
                          devices=devices if len(devices) > 1 else None)
    seconds = time.perf_counter() - t0
    out = os.path.join(cfg.run_dir, cfg.name)
    paths = write_sweep_outputs(out, cfg, final, curves, info={
        "alphas": alphas, "betas": betas, "mixes": mixes, "loss_params": loss_grid, "bonus_params": bonus_grid,
        "seeds": seeds, "seconds": seconds, "devices": len(devices), "platform": devices[0].platform,
        "compiled_programs": final.pop("compiled_programs"),
    })
    print(summary_table(final))
    print(f"{G} runs in {seconds:.1f} s (compile included); wrote {', '.join(paths.values())}")
    return 0


# ----------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------


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
        print(f"  {lt:12s} {float(dpo_loss(hw, hl, beta=0.1, loss_type=lt, ref_margins=ref_y - ref_yt).mean()): .6f}")
    return 0


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from xpo_jax.config import add_config_flags

    parser = argparse.ArgumentParser(prog="xpo-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    t = sub.add_parser("train", help="online XPO: a built-in task (default hard-explore), a user task, or HF "
                                     "checkpoints; on one device or a --data x --fsdp mesh")
    add_config_flags(t)
    _add_distributed_flags(t)
    t.set_defaults(func=_train)
    s = sub.add_parser(
        "sweep", help="alpha x beta x lambda x loss-hyperparameter x seed grid of online runs as one vmapped program",
        description="Run every (alpha, beta, mix, loss and bonus hyperparameters, seed) cell of an online XPO run in "
                    "one compiled program (jax.vmap of the pure train) and write <run-dir>/<name>/sweep.csv, "
                    "heatmap.png, curves.png, curves.npz and sweep.json.",
    )
    s.add_argument("--alphas", type=parse_floats, default=None, help="comma-separated (default: --alpha)")
    s.add_argument("--betas", type=parse_floats, default=None, help="comma-separated (default: --beta)")
    s.add_argument("--mixes", type=parse_floats, default=None,
                   help="exploration mixes lambda = P(y~ from pi_ref), comma-separated: 1 = XPO / reference-sampling "
                        "DPO, 0 = online DPO (default: --exploration-mix)")
    s.add_argument("--seeds", type=parse_ints, default=None, help="e.g. 0-7 or 0,3,5 (default: --seed)")
    s.add_argument("--loss-param", type=parse_param_values, action="append", default=None, metavar="NAME=V1,V2",
                   help="a hyperparameter of --loss-type: one value, or several (a grid axis); repeat the flag")
    s.add_argument("--bonus-param", type=parse_param_values, action="append", default=None, metavar="NAME=V1,V2",
                   help="a hyperparameter of --bonus: one value, or several (a grid axis); repeat the flag")
    s.add_argument("--grid-devices", type=int, default=0,
                   help="shard the grid over this many local devices (0 = all; 1 = no sharding)")
    add_config_flags(s, skip=("loss_params", "bonus_params"))
    s.set_defaults(func=_sweep)
    d = sub.add_parser("demo", help="evaluate the XPO and DPO-family losses on random inputs")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The program (`argv` None: sys.argv; as a program, it ends even when a library left a thread
    behind) or, with `argv`, a call that returns the exit status (tests)."""
    parser = build_parser()
    args = parser.parse_args(_glue_negative_numbers(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        args = parser.parse_args(["demo"])
    if argv is None:
        quiet_library_logs()
    rc = args.func(args)
    if argv is None:
        end_process(rc)
    return rc


def quiet_library_logs() -> None:
    """orbax logs a failed background save as an ERROR with a traceback from each of its threads;
    the error reaches the user as the one line this CLI prints, so absl's log shows only FATAL."""
    import logging

    logging.getLogger("absl").setLevel(logging.CRITICAL)


def end_process(rc: int) -> None:
    """Exit with `rc` now when a non-daemon thread is still alive (e.g. orbax's background save
    threads after a failed save: the interpreter would wait for them forever): flush, release the
    run-directory locks, then `os._exit`. Without such threads, return (a normal exit)."""
    import threading

    if all(t.daemon or t is threading.main_thread() for t in threading.enumerate()):
        return
    from xpo_jax.rundir import release_all

    release_all()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
