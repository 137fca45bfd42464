"""Peak memory of chunked token log-probs against the naive full log-softmax.

    python experiments/bench_logprobs.py [--batch 8 --seq 512 --vocab 151936 --dtype float32]

Each variant runs in its own subprocess (so peak RSS is its own): it builds logits [B, T, V] on
the device, then computes log-probs of random tokens (forward, and forward + backward of their
sum). Reported: XLA's compiled temporary buffer size (`memory_analysis().temp_size_in_bytes`: the
peak of everything the program allocates besides its inputs and outputs). Process RSS is no use
here: building the logits already set the high-water mark. Both variants must agree to 1e-5.
Writes experiments/results/bench_logprobs.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def child(variant: str, B: int, T: int, V: int, dtype: str, grad: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xpo_jax.logprobs import token_logprobs

    def naive(logits, tokens):
        lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(lsm, tokens[..., None], axis=-1)[..., 0]

    fn = {"naive": naive, "chunked": token_logprobs}[variant]
    k1, k2 = jax.random.split(jax.random.key(0))
    logits = jax.jit(lambda k: jax.random.normal(k, (B, T, V), jnp.float32).astype(dtype))(k1)
    tokens = jax.random.randint(k2, (B, T), 0, V)
    logits.block_until_ready()
    if grad:
        f = jax.jit(jax.value_and_grad(lambda l, t: fn(l, t).sum()))
    else:
        f = jax.jit(fn)
    compiled = f.lower(logits, tokens).compile()
    mem = compiled.memory_analysis()
    out = compiled(logits, tokens)
    jax.block_until_ready(out)
    lp = out if not grad else out[0]
    return {
        "variant": variant,
        "grad": grad,
        "xla_temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
        "logits_bytes": int(logits.size * logits.dtype.itemsize),
        "checksum": float(np.asarray(lp).sum()) if not grad else float(np.asarray(lp)),
        "logprobs": [] if grad else np.asarray(lp).ravel().tolist(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--child", default=None)
    ap.add_argument("--grad", type=int, default=0)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.batch, a.seq, a.vocab, a.dtype, bool(a.grad))))
        return
    rows = []
    for grad in (0, 1):
        for variant in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "--child", variant, "--grad", str(grad), "--batch", str(a.batch),
                   "--seq", str(a.seq), "--vocab", str(a.vocab), "--dtype", a.dtype]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1]["variant"], "grad" if grad else "fwd", rows[-1]["xla_temp_bytes"], flush=True)
    import numpy as np

    naive_s, chunk_s = np.array(rows[0]["logprobs"]), np.array(rows[1]["logprobs"])
    max_diff = float(np.abs(naive_s - chunk_s).max())
    assert max_diff <= 1e-5, f"naive and chunked disagree by {max_diff}"
    rel_checksum = abs(rows[0]["checksum"] - rows[1]["checksum"]) / abs(rows[0]["checksum"])
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "shape": [a.batch, a.seq, a.vocab],
        "dtype": a.dtype,
        "max_abs_diff": max_diff,
        "rel_diff_checksum": rel_checksum,
        "command": "python experiments/bench_logprobs.py",
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "bench_logprobs.json"), "w") as f:
        json.dump({"meta": meta, "rows": [{k: v for k, v in r.items() if k != "logprobs"} for r in rows]}, f, indent=1)
    gib = 2**30
    lines = [
        f"# Token log-probs: peak memory, B={a.batch} T={a.seq} V={a.vocab} {a.dtype} logits",
        "",
        f"{meta['machine']}, {meta['date']}; logits themselves: {rows[0]['logits_bytes'] / gib:.2f} GiB.",
        "",
        "| variant | pass | XLA temp (GiB) |",
        "|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {'fwd+bwd' if r['grad'] else 'fwd'} | {r['xla_temp_bytes'] / gib:.3f} |"
        )
    lines += ["", f"Agreement: max |naive - chunked| over all {a.batch}x{a.seq} log-probs = {max_diff:.2e}; "
              f"relative difference of the full sums = {rel_checksum:.2e}."]
    with open(os.path.join(RESULTS, "bench_logprobs.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
