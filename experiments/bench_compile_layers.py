"""Compile time (and activation memory, step time) of a training step: unrolled vs nn.scan layers,
and remat none / block / matmuls.

    python experiments/bench_compile_layers.py [--layers 24 32 --d-model 256 --batch 8
                                                --prompt 64 --new 64 --run-layers 24]

The step is what the round differentiates: forward over concat(prompt, completion), the LM head on
the last N+1 positions (`round.completion_logits_fn`), chunked completion log-probs
(`logprobs.completion_logprobs`), loss = -mean sequence log-prob, and its gradient. Inputs are
`jax.ShapeDtypeStruct`s (no weights exist), and each cell runs in a fresh subprocess without the
persistent compilation cache, so every compile starts from nothing. Reported per cell:

    lower_s    trace + lower to StableHLO   (jax.jit(step).lower(...))
    compile_s  XLA compile                  (.compile())
               both: the minimum over --repeats fresh processes (the machine is shared, so the
               minimum is the least disturbed measurement), wall time; compile_cpu_s is the
               process CPU time (all threads) of the compile, less sensitive to other jobs
    temp_MiB   XLA's temporary buffers of the compiled step (`memory_analysis()`): the peak of
               what it allocates besides inputs and outputs, i.e. activations and gradients'
               scratch -- what remat trades against recomputation
    GFLOP      XLA's cost analysis of the compiled step (unrolled rows only: it counts a while
               loop's body once, so for nn.scan it is not the step's total); shows remat's recompute
    step_s     median wall time of 5 steps after a warm-up (first repeat only, at --run-layers;
               random weights)

The "matmuls" policy is measured twice: dots_with_no_batch_dims_saveable (projections only, the
default in REMAT_POLICIES) and checkpoint_dots (also the attention's batched matmuls, i.e. the
[B, H, T, T] scores). Writes experiments/results/bench_compile_layers.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
VARIANTS = [("none", None), ("block", None), ("matmuls", "dots_with_no_batch_dims_saveable"),
            ("matmuls", "checkpoint_dots")]


def _step(layers: int, scan: bool, remat: str, policy: str | None, a):
    """(config, jitted value_and_grad step, abstract params, abstract tokens) of one cell."""
    import jax
    import jax.numpy as jnp

    from xpo_jax.logprobs import completion_logprobs
    from xpo_jax.models import transformer
    from xpo_jax.models.transformer import Transformer, get_config, init_params
    from xpo_jax.round import completion_logits_fn

    # An alternative "matmuls" policy, measured without editing the library; read when traced.
    transformer.REMAT_POLICIES["matmuls"] = getattr(
        jax.checkpoint_policies, policy or "dots_with_no_batch_dims_saveable")
    config = get_config("bench-tiny", n_layers=layers, d_model=a.d_model, scan_layers=scan, remat=remat)
    module = Transformer(config)
    B, P, N = a.batch, a.prompt, a.new
    logits_fn = completion_logits_fn(module.apply, N)

    def loss(params, tokens, mask):
        _, lp = completion_logprobs(logits_fn(params, tokens, mask), tokens[:, -N:], mask[:, -N:])
        return -jnp.mean(lp)

    params = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    return config, jax.jit(jax.value_and_grad(loss)), params, jax.ShapeDtypeStruct((B, P + N), jnp.int32)


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def child(layers: int, scan: bool, remat: str, policy: str | None, a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xpo_jax.models.transformer import init_params

    config, step, params, tok = _step(layers, scan, remat, policy, a)
    B, P, N = a.batch, a.prompt, a.new
    t0 = time.perf_counter()
    lowered = step.lower(params, tok, tok)
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    mem = compiled.memory_analysis()
    row = {"layers": layers, "scan": scan, "remat": remat, "policy": policy or "", "lower_s": t1 - t0,
           "compile_s": t2 - t1, "compile_cpu_s": c2 - c1,
           "temp_MiB": mem.temp_size_in_bytes / 2**20 if mem is not None else None,
           "gflops": (_flops(compiled) or 0) / 1e9,
           "n_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))}
    if layers in a.run_layers and a.run:
        real = jax.jit(lambda k: init_params(config, k))(jax.random.key(0))
        rng = np.random.default_rng(0)
        tokens = jnp.asarray(rng.integers(0, config.vocab_size, (B, P + N)), jnp.int32)
        mask = jnp.ones((B, P + N), jnp.int32)
        jax.block_until_ready(compiled(real, tokens, mask))
        times = []
        for _ in range(5):
            t = time.perf_counter()
            value, _ = jax.block_until_ready(compiled(real, tokens, mask))
            times.append(time.perf_counter() - t)
        row["step_s"] = float(np.median(times))
        row["loss"] = float(value)
    return row


def interleaved(a) -> list[dict]:
    """Step time of the remat variants with scanned layers, in one process, calls interleaved
    (variant 1, 2, 3, 4, 1, 2, ...) so that a burst of load from other jobs hits all alike;
    reported: the minimum and the median over --step-rounds rounds."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xpo_jax.models.transformer import init_params

    layers = a.run_layers[0] if a.run_layers else a.layers[0]
    cells = []
    for remat, policy in VARIANTS:
        config, step, params, tok = _step(layers, True, remat, policy, a)
        cells.append((remat, policy, step.lower(params, tok, tok).compile()))
    real = jax.jit(lambda k: init_params(config, k))(jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, tok.shape), jnp.int32)
    mask = jnp.ones(tok.shape, jnp.int32)
    times = [[] for _ in cells]
    values = []
    for r in range(a.step_rounds + 1):
        for i, (_, _, compiled) in enumerate(cells):
            t = time.perf_counter()
            value, grads = jax.block_until_ready(compiled(real, tokens, mask))
            if r:  # round 0 warms up
                times[i].append(time.perf_counter() - t)
            elif i == 0:
                values.append((value, grads))
            else:
                # Same function: remat changes only what is kept for the backward pass.
                diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in
                           zip(jax.tree.leaves(grads), jax.tree.leaves(values[0][1])))
                values.append(diff)
    return [{"layers": layers, "scan": True, "remat": remat, "policy": policy or "",
             "step_min_s": min(t), "step_median_s": float(np.median(t)),
             "max_grad_diff_vs_none": 0.0 if i == 0 else values[i]}
            for i, ((remat, policy, _), t) in enumerate(zip(cells, times))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[24, 32])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--run-layers", type=int, nargs="*", default=[24])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-rounds", type=int, default=7)
    ap.add_argument("--interleaved-only", action="store_true",
                    help="only the interleaved step-time comparison (merged into existing results)")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.render:
        with open(os.path.join(RESULTS, "bench_compile_layers.json")) as f:
            render(json.load(f))
        return
    if a.child:
        layers, scan, remat, policy = json.loads(a.child)
        print(json.dumps(child(layers, scan, remat, policy, a)))
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false")
    if a.child is None and os.environ.get("_BENCH_INTERLEAVED") == "1":
        print(json.dumps(interleaved(a)))
        return
    # The interleaved comparison, in a subprocess of its own (fresh, without the cache).
    cmd = [sys.executable, __file__, "--d-model", str(a.d_model), "--batch", str(a.batch), "--prompt",
           str(a.prompt), "--new", str(a.new), "--run-layers", *map(str, a.run_layers), "--layers",
           *map(str, a.layers), "--step-rounds", str(a.step_rounds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**env, "_BENCH_INTERLEAVED": "1"})
    steps = json.loads(out.stdout.strip().splitlines()[-1])
    for row in steps:
        print(json.dumps(row), flush=True)
    rows = []
    if a.interleaved_only:
        with open(os.path.join(RESULTS, "bench_compile_layers.json")) as f:
            rows = json.load(f)["rows"]
    for layers in ([] if a.interleaved_only else a.layers):
        for scan in (False, True):
            for remat, policy in VARIANTS:
                samples = []
                for r in range(a.repeats):
                    cmd = [sys.executable, __file__, "--child", json.dumps([layers, scan, remat, policy]),
                           "--d-model", str(a.d_model), "--batch", str(a.batch), "--prompt", str(a.prompt),
                           "--new", str(a.new), "--run-layers", *map(str, a.run_layers), "--run", str(int(r == 0))]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                    samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    samples[-1]["load_avg_1m"] = os.getloadavg()[0]
                row = dict(samples[0])
                for k in ("lower_s", "compile_s", "compile_cpu_s"):
                    row[k] = min(s[k] for s in samples)
                    row[k + "_samples"] = [s[k] for s in samples]
                row["load_avg_1m"] = max(s["load_avg_1m"] for s in samples)
                rows.append(row)
                print(json.dumps(row), flush=True)

    import jax

    meta = {
        "machine": f"{platform.machine()} {platform.processor() or 'CPU'}, {os.cpu_count()} cores "
                   f"({platform.platform()}), jax {jax.__version__}",
        "date": datetime.date.today().isoformat(),
        "command": "python experiments/bench_compile_layers.py " + " ".join(sys.argv[1:]),
        "shape": {"d_model": a.d_model, "batch": a.batch, "prompt": a.prompt, "new": a.new,
                  "preset": "bench-tiny (heads 4, kv heads 2, head_dim 64, mlp 688, vocab 4096)"},
    }
    os.makedirs(RESULTS, exist_ok=True)
    data = {"meta": meta, "args": vars(a), "rows": rows, "step_interleaved": steps}
    with open(os.path.join(RESULTS, "bench_compile_layers.json"), "w") as f:
        json.dump(data, f, indent=2)
    render(data)


def render(data: dict) -> None:
    """Write bench_compile_layers.md from the JSON results (`--render` redoes just this)."""
    meta, a, rows, steps = data["meta"], argparse.Namespace(**data["args"]), data["rows"], data["step_interleaved"]
    lines = [
        f"# Training-step compile time: unrolled vs scanned layers, remat (d_model {a.d_model})",
        "",
        f"{meta['machine']}; {meta['date']}; `{meta['command']}`.",
        f"Step: value_and_grad of -mean completion log-prob, B={a.batch}, prompt {a.prompt} + "
        f"{a.new} new tokens, {meta['shape']['preset']}. Fresh process per row, no compilation "
        f"cache; lower and compile: minimum of {a.repeats} processes. The machine was shared with "
        "other jobs (load: the highest 1-minute load average seen for the row, on 2 cores): wall "
        "times are noisy; compile CPU (process CPU time, all of XLA's threads) much less so.",
        "",
        "| layers | layers as | remat | policy | lower (s) | compile (s) | compile CPU (s) | XLA temp (MiB) | GFLOP | step (s) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = f"{r['step_s']:.3f}" if "step_s" in r else "-"
        gflop = "-" if r["scan"] else f"{r['gflops']:.1f}"
        lines.append(f"| {r['layers']} | {'nn.scan' if r['scan'] else 'unrolled'} | {r['remat']} | "
                     f"{r['policy'] or '-'} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | "
                     f"{r['compile_cpu_s']:.2f} | {r['temp_MiB']:.1f} | {gflop} | {step} | {r['load_avg_1m']:.1f} |")
    # Summary: time to a compiled step (lower wall + compile CPU), unrolled / nn.scan.
    cell = {(r["layers"], r["scan"], r["remat"], r["policy"]): r for r in rows}
    lines += ["", "Trace + compile (lower wall + compile CPU, seconds), unrolled vs nn.scan:", "",
              "| layers | remat | policy | unrolled | nn.scan | unrolled / scan |", "|---|---|---|---|---|---|"]
    for (layers, scan, remat, policy), r in cell.items():
        if scan or (layers, True, remat, policy) not in cell:
            continue
        u = r["lower_s"] + r["compile_cpu_s"]
        sc = cell[(layers, True, remat, policy)]
        v = sc["lower_s"] + sc["compile_cpu_s"]
        lines.append(f"| {layers} | {remat} | {policy or '-'} | {u:.2f} | {v:.2f} | {u / v:.2f} |")
    lines += [
        "",
        f"Step time of the remat variants, nn.scan, {steps[0]['layers']} layers, one process, calls "
        f"interleaved over {a.step_rounds} rounds (so load bursts hit every variant alike):",
        "",
        "| remat | policy | step min (s) | step median (s) | max abs grad diff vs none |",
        "|---|---|---|---|---|",
    ]
    for r in steps:
        lines.append(f"| {r['remat']} | {r['policy'] or '-'} | {r['step_min_s']:.3f} | "
                     f"{r['step_median_s']:.3f} | {r['max_grad_diff_vs_none']:.1e} |")
    with open(os.path.join(RESULTS, "bench_compile_layers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
