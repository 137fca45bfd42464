"""How much of the time plan's HBM traffic is the CPU compiler's: one round, compiled per backend.

    python experiments/hbm_backends.py                    # on this machine's default backend
    python experiments/hbm_backends.py --report           # the .md from the JSON files present

experiments/plan_time.py reads FLOPs and HBM bytes from the per-device HLO that XLA's CPU backend
compiles (the only backend that simulates 64 devices here). Its rows come out HBM-bound at many
times the ideal bytes (plan_time.md). A TPU or GPU compiler fuses differently (bf16 kept in bf16,
larger fusions, cuBLAS / Mosaic kernels), so those bytes need not carry over. This script compiles
one plan row on ONE device (`plan_time.child`: the same `plan_memory.lower_round`) on whichever
backend JAX runs on, and records our reader's numbers (`xpo_jax.hlo.traffic`: loops multiplied
out) and XLA's own `cost_analysis()` (each loop body counted once), beside the row's ideal
(`plan_time.ideal`). Run once on the CPU and once on a GPU; `--report` puts them side by side.
The GPU's HLO text is kept (gzip) so it can be read again without the device.

Writes experiments/results/hbm_backends_<backend>.json (+ .hlo.txt.gz) and hbm_backends.md.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import gzip
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import plan_time as pt  # noqa: E402

RESULTS = pt.RESULTS
GB = 1e9
# bench_round.py's GPU shape (Qwen2-0.5B, B 16, P 128, N 128, bf16 compute), no remat as there.
# The H200's ceilings as measured on this workplace's machine (/work/.library/device/KINDS.md,
# 2026-10-28 and 2026-11-04): a bf16 8192^3 matmul through PyTorch, a device-to-device copy.
H200 = dict(flops=788e12, hbm=4.3e12, source="788 TFLOP/s bf16 matmul, 4.3 TB/s copy")
SPEC = dict(pt.row("Qwen2-0.5B", 1, batch=16, prompt=128, new=128), remat="none", opt=None)


def measure_here(spec: dict) -> dict:
    import jax

    spec = dict(spec)
    backend = jax.default_backend()
    hlo_path = os.path.join(RESULTS, f"hbm_backends_{backend}.hlo.txt")
    spec["hlo_out"] = hlo_path
    if backend == "cpu":
        spec["opt"] = 0  # the plan's setting: LLVM's level, the HLO is the same
    t0 = time.perf_counter()
    r = pt.child(spec)
    r["wall_s"] = time.perf_counter() - t0
    with open(hlo_path, "rb") as f, gzip.open(hlo_path + ".gz", "wb") as g:
        g.write(f.read())
    os.remove(hlo_path)
    r.pop("hlo_out", None)
    r.pop("top", None)
    r.update(backend=backend, device=jax.devices()[0].device_kind, date=datetime.date.today().isoformat(),
             ideal=pt.ideal(spec["model"], 1, spec["batch"], spec["prompt"], spec["new"]))
    return r


def reread(r: dict) -> dict:
    """Our reader's numbers from the row's kept HLO text (so a fix to xpo_jax.hlo applies to
    runs made before it, without the device)."""
    from xpo_jax import hlo

    path = os.path.join(RESULTS, f"hbm_backends_{r['backend']}.hlo.txt.gz")
    if os.path.exists(path):
        with gzip.open(path, "rt") as f:
            module = hlo.parse(f.read())
        t = hlo.traffic(module, trip_count=hlo.round_trip_counts(r["new"]))
        r = dict(r, hbm_bytes=t.hbm_bytes, flops=t.flops)
    return r


def measured_round() -> dict | None:
    """bench_round.py's measured GPU round at the same shape, if it has been run."""
    path = os.path.join(RESULTS, "bench_round_qwen2-0.5b_gpu.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def report() -> str:
    runs = []
    for p in sorted(glob.glob(os.path.join(RESULTS, "hbm_backends_*.json"))):
        with open(p) as f:
            runs.append(reread(json.load(f)))
    if not runs:
        raise SystemExit("no hbm_backends_*.json yet: run the script on a backend first")
    s, ideal = runs[0], runs[0]["ideal"]
    lines = ["# One round's memory traffic as each backend compiles it",
             "", f"`{s['model']}`, 1 device, B {s['batch']}, P {s['prompt']}, N {s['new']}, {s['precision']} "
                 f"compute (f32 master weights and Adam), remat {s['remat']}: bench_round.py's GPU shape. "
                 "Command: `python experiments/hbm_backends.py` on each machine, then `--report` (which "
                 "re-reads the kept HLO with the current xpo_jax.hlo).", "",
             "| backend (device, date, jax) | HBM GB (ours: loops x trips) | HBM / ideal | TFLOP (ours) "
             "| XLA bytes accessed GB (loops once) | XLA TFLOP (loops once) | compile s |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['backend']} ({r['device']}, {r['date']}, jax {r['jax']}) | {r['hbm_bytes'] / GB:,.1f} | "
                     f"{r['hbm_bytes'] / ideal['hbm_bytes']:.1f}x | {r['flops'] / 1e12:,.2f} | "
                     f"{r['xla_bytes'] / GB:,.2f} | {r['xla_flops'] / 1e12:,.3f} | {r['compile_s']:.0f} |")
    lines += ["", f"Ideal (plan_time.ideal, no code of ours): HBM {ideal['hbm_bytes'] / GB:,.1f} GB, "
                  f"{ideal['flops'] / 1e12:,.2f} TFLOP per round. XLA's GPU cost analysis leaves out the "
                  "cuBLAS matmuls (custom-calls); our reader counts them from their dot dimensions."]
    by = {r["backend"]: r for r in runs}
    if "cpu" in by and "gpu" in by:
        c, g = by["cpu"], by["gpu"]
        lines += ["", f"The CPU compile moves **{c['hbm_bytes'] / g['hbm_bytes']:.2f}x** the GPU compile's HBM "
                      "bytes for the same round: the time plan's HBM column (CPU-compiled) overstates what a "
                      "GPU would move by about that much."]
    bench = measured_round()
    if bench and "gpu" in by:
        g, t = by["gpu"], bench["ours"]["median_step_s"]
        hbm_s, flop_s = g["hbm_bytes"] / H200["hbm"], g["flops"] / H200["flops"]
        ideal_s = max(ideal["hbm_bytes"] / H200["hbm"], ideal["flops"] / H200["flops"])
        lines += ["", f"Measured on {bench['meta']['machine']} ({bench['meta']['date']}, bench_round.py): "
                      f"**{t:.3f} s** per round. Roofline on the H200's measured ceilings ({H200['source']}): "
                      f"the GPU compile's bytes {hbm_s:.3f} s, its FLOPs {flop_s:.3f} s; the ideal "
                      f"{ideal_s:.3f} s. The round runs at {t / ideal_s:.1f}x the ideal and "
                      f"{t / max(hbm_s, flop_s):.1f}x its own roofline: the rest is the decode loops' "
                      "per-token latency (bench_sampler_gpu.md: a decode step takes about 5x its memory floor)."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "hbm_backends.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", action="store_true", help="only rewrite hbm_backends.md from the JSON files")
    a = p.parse_args(argv)
    if not a.report:
        r = measure_here(SPEC)
        with open(os.path.join(RESULTS, f"hbm_backends_{r['backend']}.json"), "w") as f:
            json.dump(r, f, indent=1)
        print(f"[hbm_backends] {r['backend']}: HBM {r['hbm_bytes'] / GB:.1f} GB, XLA bytes {r['xla_bytes'] / GB:.2f} GB, "
              f"compile {r['compile_s']:.0f} s", flush=True)
    print(report())


if __name__ == "__main__":
    main()
