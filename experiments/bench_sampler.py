#!/usr/bin/env python3
"""Sampler throughput: xpo_jax `sample` vs HF transformers `generate`, side by side.

CPU part (always): generated tokens/s at batch 1, 8, 32 for the `bench-tiny` model (the `tiny`
Qwen2 shape of shared/bench/trl_xpo_round.py), prompt 64, 64 new tokens, min_new_tokens = 64 so
every response is full length, float32, temperature 1 (no top-k/top-p). The HF peer is
Qwen2ForCausalLM with the same config and the *same weights* (exported from our params by the
documented name map), `generate(do_sample=True, use_cache=True, min_new_tokens=N)`, run in a
subprocess with a torch interpreter. Before timing, the subprocess also runs one full forward on a
left-padded batch and reports the largest logit difference from ours: a check of the parameter
name map, the RoPE convention and the padding/position handling against HF.

    tokens/s = B * N / median(seconds per generate call)       (after warm-up, block_until_ready)
    decode step = (t(N new tokens) - t(1 new token)) / (N - 1)  (prefill and fixed costs cancel)

Accelerator part (`--gpu`, or automatically when JAX's default backend is gpu/tpu): `qwen2-0.5b`
in bfloat16 (parameters and compute), prompt 128, 128 new tokens; decode step time against the
memory floor

    floor = (bytes of parameters + bytes of the KV cache [all S slots, K and V, every layer])
            / bandwidth,   bandwidth = 2 * bytes / time of a large on-device copy (read + write).

The torch interpreter comes from $XPO_TORCH_PYTHON (default /tmp/trl-venv/bin/python);
`--make-torch-venv` creates /tmp/trl-venv with `python3 -m venv` + `pip install torch==2.13.0
transformers` when it is missing. `--skip-hf` runs our side only.

Writes experiments/results/bench_sampler[_TAG].json and .md. This file is also the HF worker
(`--hf-worker SPEC`): that mode imports only numpy/torch/transformers, never jax.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_TORCH_PYTHON = "/tmp/trl-venv/bin/python"
EOS_ID, PAD_ID = 1, 0  # as trl_xpo_round.py's tokenizer: <pad>=0, <eos>=1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-tiny")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per shape (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per shape (first compiles)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--hf-threads", default="0,1",
                   help="torch intra-op thread counts to time HF with (0 = torch's default); the "
                        "speed-up is taken against the fastest")
    p.add_argument("--make-torch-venv", action="store_true",
                   help="create /tmp/trl-venv (torch 2.13.0 CPU + transformers) if it is missing")
    p.add_argument("--gpu", action="store_true", help="also run the accelerator part")
    p.add_argument("--no-gpu", action="store_true", help="never run the accelerator part")
    p.add_argument("--gpu-preset", default="qwen2-0.5b")
    p.add_argument("--gpu-batches", default="1,16")
    p.add_argument("--gpu-prompt-len", type=int, default=128)
    p.add_argument("--gpu-new-tokens", type=int, default=128)
    p.add_argument("--gpu-scan-layers", default="1",
                   help="comma-separated 1/0: time the decoder with scanned layers (the preset's) and/or "
                        "unrolled (scanned layers slice each layer's weights out of the stack every step)")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _median_time(fn, warmup, repeats, sync):
    for _ in range(warmup):
        sync(fn(0))
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        sync(fn(i + 1))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# ------------------------------------------------------------------------------------------
# HF side (runs under the torch interpreter; no jax here)
# ------------------------------------------------------------------------------------------


def hf_worker(spec_path):
    import numpy as np
    import torch
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with open(spec_path) as f:
        spec = json.load(f)
    cfg = Qwen2Config(**spec["hf_config"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    w = np.load(spec["weights"])
    state = {k: torch.from_numpy(np.ascontiguousarray(w[k])) for k in w.files}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"weight names do not match HF: missing {missing}, unexpected {unexpected}")
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = None
    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "torch_threads": torch.get_num_threads(),
           "attn_implementation": model.config._attn_implementation}

    # Parity: full forward on a left-padded batch, positions cumsum(mask) - 1 as in generate.
    par = np.load(spec["parity"])
    ids = torch.from_numpy(par["tokens"].astype(np.int64))
    mask = torch.from_numpy(par["mask"].astype(np.int64))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float().numpy()
    real = par["mask"].astype(bool)
    out["parity_max_abs_logit_diff"] = float(np.abs(logits - par["logits"])[real].max())
    out["parity_max_abs_logit"] = float(np.abs(par["logits"][real]).max())

    P, N = spec["prompt_len"], spec["new_tokens"]
    default_threads = torch.get_num_threads()
    rows = []
    for threads in spec["threads"]:
        torch.set_num_threads(threads or default_threads)
        rng = np.random.default_rng(0)
        for B in spec["batches"]:
            prompts = torch.from_numpy(rng.integers(3, cfg.vocab_size, (B, P)).astype(np.int64))
            attn = torch.ones_like(prompts)

            def run(i):
                torch.manual_seed(i)
                with torch.inference_mode():
                    return model.generate(input_ids=prompts, attention_mask=attn, max_new_tokens=N,
                                          min_new_tokens=N, do_sample=True, temperature=1.0, top_k=0,
                                          top_p=1.0, use_cache=True)

            med, times = _median_time(run, spec["warmup"], spec["repeats"], lambda x: x)
            gen = run(0)
            assert gen.shape == (B, P + N), gen.shape
            rows.append({"batch": B, "threads": torch.get_num_threads(), "median_s": med,
                         "times_s": times, "tokens_per_s": B * N / med})
            print(f"[hf] B={B} threads={torch.get_num_threads()}: {B * N / med:.0f} tok/s ({med:.3f} s)",
                  flush=True)
    out["rows"] = rows
    with open(spec["out"], "w") as f:
        json.dump(out, f)


def hf_state_dict(params):
    """Our params -> HF Qwen2/Llama state dict (numpy), by the map in transformer.py's docstring."""
    import jax
    import numpy as np
    from flax.traverse_util import flatten_dict

    from xpo_jax.models import unstack_layer_params

    if "layers" in params.get("model", {}):  # the scan_layers layout: HF wants per-layer tensors
        params = unstack_layer_params(params, jax.tree.leaves(params["model"]["layers"])[0].shape[0])
    out = {}
    for path, leaf in flatten_dict(params).items():
        parts = []
        for p in path[:-1]:
            parts += p.split("_", 1) if p.startswith("layers_") else [p]
        leaf = np.asarray(leaf, np.float32)
        kind = path[-1]
        if kind == "kernel":
            leaf = leaf.T  # Linear: [in, out] -> torch [out, in]
        name = ".".join(parts + ["bias" if kind == "bias" else "weight"])
        out[name] = np.ascontiguousarray(leaf)
    return out


def hf_config_kwargs(c):
    # As shared/bench/trl_xpo_round.py builds its Qwen2Config.
    return dict(hidden_size=c.d_model, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                num_key_value_heads=c.n_kv_heads, intermediate_size=c.mlp_dim,
                vocab_size=c.vocab_size, tie_word_embeddings=c.tie_embeddings,
                max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta,
                rms_norm_eps=c.rms_eps, hidden_act="silu", use_sliding_window=False,
                pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None, attention_dropout=0.0)


def torch_python(make_venv):
    py = os.environ.get("XPO_TORCH_PYTHON", DEFAULT_TORCH_PYTHON)
    if os.path.exists(py):
        return py
    if not make_venv:
        raise SystemExit(f"no torch interpreter at {py}: set XPO_TORCH_PYTHON, pass "
                         "--make-torch-venv, or --skip-hf")
    venv = os.path.dirname(os.path.dirname(DEFAULT_TORCH_PYTHON))
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = os.path.join(venv, "bin", "pip")
    subprocess.run([pip, "install", "torch==2.13.0", "--index-url",
                    "https://download.pytorch.org/whl/cpu"], check=True)
    subprocess.run([pip, "install", "transformers"], check=True)
    return DEFAULT_TORCH_PYTHON


def run_hf(args, config, params, batches, tmp):
    import jax
    import numpy as np

    from xpo_jax.models import Transformer

    np.savez(os.path.join(tmp, "w.npz"), **hf_state_dict(params))
    rng = np.random.default_rng(1)
    T = 24
    tokens = rng.integers(3, config.vocab_size, (3, T)).astype(np.int32)
    mask = np.ones((3, T), np.int32)
    mask[0, :5] = 0  # left-padded prompt
    mask[1, -4:] = 0  # right-padded response
    mask[2, :3] = 0
    mask[2, -2:] = 0
    cpu = jax.devices("cpu")[0]
    logits = np.asarray(jax.jit(Transformer(config).apply)({"params": jax.device_put(params, cpu)},
                                                            jax.device_put(tokens, cpu), jax.device_put(mask, cpu)))
    np.savez(os.path.join(tmp, "parity.npz"), tokens=tokens, mask=mask, logits=logits)
    spec = dict(hf_config=hf_config_kwargs(config), weights=os.path.join(tmp, "w.npz"),
                parity=os.path.join(tmp, "parity.npz"), batches=batches, prompt_len=args.prompt_len,
                new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
                threads=[int(t) for t in args.hf_threads.split(",")], out=os.path.join(tmp, "hf.json"))
    with open(os.path.join(tmp, "spec.json"), "w") as f:
        json.dump(spec, f)
    py = torch_python(args.make_torch_venv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([py, os.path.abspath(__file__), "--hf-worker", os.path.join(tmp, "spec.json")],
                   check=True, env=env)
    with open(spec["out"]) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------
# Our side
# ------------------------------------------------------------------------------------------


def time_sampler(config, params, B, P, N, warmup, repeats, device, seed=0):
    """(median seconds for N tokens, for 1 token, all N-token times) at batch B on `device`."""
    import jax
    import numpy as np

    from xpo_jax.models import Transformer
    from xpo_jax.sampling import sample

    model = Transformer(config)
    # Committed inputs pin the computation to `device` (the CPU part stays on the CPU even on a
    # machine whose default backend is a GPU).
    params = jax.device_put(params, device)
    prompts = jax.device_put(np.random.default_rng(seed).integers(3, config.vocab_size, (B, P)).astype(np.int32),
                             device)
    mask = jax.device_put(np.ones((B, P), np.int32), device)

    def run(n):
        return lambda i: sample(model.apply, params, prompts, mask, jax.random.key(i), max_new_tokens=n,
                                temperature=1.0, eos_id=EOS_ID, pad_id=PAD_ID, min_new_tokens=n)

    med, times = _median_time(run(N), warmup, repeats, jax.block_until_ready)
    med1, _ = _median_time(run(1), warmup, repeats, jax.block_until_ready)
    out = run(N)(0)
    assert int(out.lengths.min()) == N, "min_new_tokens should force full-length responses"
    return med, med1, times


def copy_bandwidth(nbytes=1 << 30):
    """Device memory bandwidth in bytes/s from a large jitted copy (reads and writes nbytes)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    med, _ = _median_time(lambda i: f(x), 2, 10, jax.block_until_ready)
    return 2 * nbytes / med


def gpu_part(args):
    import dataclasses

    import jax

    from xpo_jax.models import get_config, init_params

    bw = copy_bandwidth()
    P, N = args.gpu_prompt_len, args.gpu_new_tokens
    rows = []
    for scan in [bool(int(v)) for v in args.gpu_scan_layers.split(",")]:
        config = dataclasses.replace(get_config(args.gpu_preset, dtype="bfloat16", param_dtype="bfloat16"),
                                     scan_layers=scan)
        params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
        param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
        for B in [int(b) for b in args.gpu_batches.split(",")]:
            med, med1, times = time_sampler(config, params, B, P, N, args.warmup, args.repeats, jax.devices()[0])
            S = P + N - 1
            kv_bytes = 2 * config.n_layers * B * config.n_kv_heads * S * config.head_dim * 2  # bf16
            step = (med - med1) / (N - 1)
            floor = (param_bytes + kv_bytes) / bw
            rows.append(dict(batch=B, scan_layers=scan, median_s=med, prefill_plus_1_s=med1, times_s=times,
                             tokens_per_s=B * N / med, decode_step_ms=1e3 * step,
                             floor_ms=1e3 * floor, step_over_floor=step / floor,
                             param_bytes=int(param_bytes), kv_bytes=int(kv_bytes)))
            print(f"[gpu] scan_layers={scan} B={B}: {B * N / med:.0f} tok/s, step {1e3 * step:.3f} ms, "
                  f"floor {1e3 * floor:.3f} ms", flush=True)
        del params
    return dict(preset=args.gpu_preset, dtype="bfloat16", prompt_len=P, new_tokens=N,
                device=str(jax.devices()[0].device_kind), bandwidth_GBps=bw / 1e9, rows=rows)


def main(argv=None):
    args = parse_args(argv)
    if args.hf_worker:
        return hf_worker(args.hf_worker)

    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    from xpo_jax.models import get_config, init_params

    backend = jax.default_backend()
    config = get_config(args.preset, dtype="float32", param_dtype="float32")
    with jax.default_device(jax.devices("cpu")[0]):
        params = init_params(config, jax.random.key(0))
    batches = [int(b) for b in args.batches.split(",")]
    P, N = args.prompt_len, args.new_tokens
    result = dict(bench="bench_sampler", date=datetime.datetime.now().isoformat(timespec="seconds"),
                  load_avg_1min_start=os.getloadavg()[0],
                  machine=(f"{platform.machine()} {_cpu_model()}, {os.cpu_count()} cores; xpo_jax CPU rows on "
                           f"the JAX CPU device (default backend: {backend})"),
                  versions=dict(python=platform.python_version(), jax=jax.__version__,
                                jaxlib=__import__("jaxlib").__version__, flax=__import__("flax").__version__,
                                numpy=np.__version__),
                  config=dict(preset=args.preset, prompt_len=P, new_tokens=N, min_new_tokens=N,
                              temperature=1.0, dtype="float32", repeats=args.repeats, warmup=args.warmup))
    ours = []
    for B in batches:
        med, med1, times = time_sampler(config, params, B, P, N, args.warmup, args.repeats,
                                        jax.devices("cpu")[0])
        ours.append(dict(batch=B, median_s=med, times_s=times, tokens_per_s=B * N / med,
                         decode_step_ms=1e3 * (med - med1) / (N - 1), prefill_plus_1_s=med1))
        print(f"[xpo_jax] B={B}: {B * N / med:.0f} tok/s ({med:.3f} s)", flush=True)
    result["xpo_jax"] = ours
    if not args.skip_hf:
        with tempfile.TemporaryDirectory(prefix="bench_sampler_") as tmp:
            hf = run_hf(args, config, params, batches, tmp)
        result["hf"] = hf
        print(f"[parity] max |logit diff| vs HF on a padded batch: {hf['parity_max_abs_logit_diff']:.2e}")
    run_gpu = (args.gpu or backend in ("gpu", "tpu")) and not args.no_gpu
    if run_gpu:
        result["accelerator"] = gpu_part(args)

    result["load_avg_1min_end"] = os.getloadavg()[0]
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "bench_sampler" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


def markdown(r):
    c = r["config"]
    lines = [f"# Sampler throughput ({r['date']})", "",
             f"Machine: {r['machine']} (1-min load average {r['load_avg_1min_start']:.1f} at start, "
             f"{r['load_avg_1min_end']:.1f} at end: other jobs share these cores). Model `{c['preset']}` "
             f"float32, prompt {c['prompt_len']}, {c['new_tokens']} new tokens (min_new_tokens = "
             f"{c['min_new_tokens']}, all full length), temperature 1; generated tokens/s = B*N / median "
             f"of {c['repeats']} runs after {c['warmup']} warm-up.", ""]
    hf_rows = r.get("hf", {}).get("rows", [])
    threads = sorted({row["threads"] for row in hf_rows}, reverse=True)
    head = "| batch | xpo_jax tok/s | xpo_jax decode step ms |"
    head += "".join(f" HF generate tok/s ({t} thr) |" for t in threads)
    head += " speed-up vs best HF |" if hf_rows else ""
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for row in r["xpo_jax"]:
        line = f"| {row['batch']} | {row['tokens_per_s']:.0f} | {row['decode_step_ms']:.2f} |"
        hs = [h for h in hf_rows if h["batch"] == row["batch"]]
        for t in threads:
            line += "".join(f" {h['tokens_per_s']:.0f} |" for h in hs if h["threads"] == t) or " - |"
        if hs:
            best = max(h["tokens_per_s"] for h in hs)
            line += f" {row['tokens_per_s'] / best:.1f}x |"
        lines.append(line)
    if "hf" in r:
        h = r["hf"]
        lines += ["", f"HF peer: torch {h['torch']}, transformers {h['transformers']}, attention "
                      f"`{h['attn_implementation']}`, Qwen2ForCausalLM with the same config and weights, "
                      "`generate(do_sample=True, temperature=1, top_k=0, top_p=1, use_cache=True, "
                      f"min_new_tokens=N)`. Parity check: max |logit diff| vs xpo_jax "
                      f"{h['parity_max_abs_logit_diff']:.2e} on a left- and right-padded batch "
                      f"(max |logit| {h['parity_max_abs_logit']:.2f})."]
    if "accelerator" in r:
        a = r["accelerator"]
        lines += ["", f"## Accelerator: {a['device']}, `{a['preset']}` bf16, prompt {a['prompt_len']}, "
                      f"{a['new_tokens']} new tokens; copy bandwidth {a['bandwidth_GBps']:.0f} GB/s", "",
                  "| batch | layers | tok/s | decode step ms | memory floor ms | step / floor |",
                  "|---|---|---|---|---|---|"]
        for row in a["rows"]:
            layers = "scanned" if row.get("scan_layers", True) else "unrolled"
            lines.append(f"| {row['batch']} | {layers} | {row['tokens_per_s']:.0f} | {row['decode_step_ms']:.3f} | "
                         f"{row['floor_ms']:.3f} | {row['step_over_floor']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
