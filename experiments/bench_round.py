"""Seconds per online XPO round, ours against TRL's XPOTrainer on the same work, side by side.

    python experiments/bench_round.py                  # CPU: bench-tiny, B=8, P=64, N=64
    python experiments/bench_round.py --preset qwen2-0.5b --batch 16 --prompt-len 128 \\
        --new-tokens 128 --dtype bfloat16              # GPU shape of the issue

Same work as ../shared/bench/trl_xpo_round.py: a policy, a frozen reference and a reward model
(a sequence-classification model of the policy's shape), random weights; each round samples B
completions from the policy and B from the reference, every one exactly N tokens (EOS forbidden
before N, as TRL's `min_new_tokens`), scores both with the reward model, computes policy
(grad) and reference log-probs, the DPO + XPO loss, and one AdamW step. Ours is the fused round:
one XLA program per round, the state donated.

TRL runs in a subprocess with the interpreter in $XPO_TORCH_PYTHON (torch 2.13.0 + trl 1.13.0;
`--setup-trl` creates /tmp/trl-venv with them) and the script in $XPO_TRL_BENCH (default
../shared/bench/trl_xpo_round.py, or .bench/trl_xpo_round.py on the device machine). `--trl-json`
takes a result measured earlier instead (named in the output). Writes
experiments/results/bench_round_<preset>.{json,md}.
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
RESULTS = os.path.join(HERE, "results")
TRL_PRESET = {"bench-tiny": "tiny", "qwen2-0.5b": "small"}


def machine() -> str:
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"CPU {platform.machine()}, {os.cpu_count()} cores"
    return f"{d.device_kind} ({d.platform})"


def time_ours(a) -> dict:
    import jax
    import jax.numpy as jnp

    from xpo_jax.config import TrainConfig
    from xpo_jax.models.transformer import RewardModel, Transformer, get_config, init_params, init_reward_params
    from xpo_jax.oracles import reward_model_oracle
    from xpo_jax.round import make_optimizer, make_round
    from xpo_jax.state import Hyperparams, XPOState

    scan = {} if a.scan_layers is None else {"scan_layers": bool(a.scan_layers)}
    mc = get_config(a.preset, dtype=a.dtype, param_dtype="float32", max_seq_len=a.prompt_len + a.new_tokens, **scan)
    model, rm = Transformer(mc), RewardModel(mc)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = init_params(mc, k[0])
    rm_params = init_reward_params(mc, k[1])
    eos, pad = 1, 0
    # TRL's settings: lr 1e-6, alpha 1e-5, beta 0.1, sigmoid loss, deterministic judge, no clip.
    cfg = TrainConfig(batch_size=a.batch, learning_rate=1e-6, alpha=1e-5, beta=0.1, bonus="logprob",
                      bradley_terry=False, max_grad_norm=1.0, rounds=10**6, min_new_tokens=a.new_tokens)
    tx, sched = make_optimizer(cfg)
    oracle = reward_model_oracle(rm.apply, rm_params, eos_id=eos)
    fns = make_round(cfg, apply_fn=model.apply, eos_id=eos, pad_id=pad, max_new_tokens=a.new_tokens,
                     lr_schedule=sched)
    hp = Hyperparams.create(alpha=cfg.alpha, beta=cfg.beta)
    state = XPOState.create_xpo(apply_fn=model.apply, params=params,
                                ref_params=jax.tree.map(jnp.copy, params), tx=tx,
                                rng=jax.random.PRNGKey(1), hparams=hp)
    prompts = jax.random.randint(k[2], (a.batch, a.prompt_len), 2, mc.vocab_size)
    mask = jnp.ones_like(prompts)
    jitted = jax.jit(fns.round_fn, donate_argnums=0)
    step = lambda state, prompts, mask: jitted(state, prompts, mask, oracle)  # RM params: traced inputs
    t0 = time.perf_counter()
    state, m = step(state, prompts, mask)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(a.warmup - 1):
        state, m = step(state, prompts, mask)
    jax.block_until_ready(m)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        state, m = step(state, prompts, mask)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "impl": "xpo_jax", "per_step_s": [round(t, 5) for t in times], "median_step_s": med,
        "prompts_per_s": a.batch / med, "first_call_s": compile_s, "loss": float(m["loss"]),
        "model_length": float(m["val/model_length"]), "jax": jax.__version__, "device": machine(),
    }


def time_trl(a) -> dict:
    if a.trl_json:
        with open(a.trl_json) as f:
            out = json.loads(f.read().strip().splitlines()[-1])
        out["source"] = f"earlier measurement {a.trl_json}"
        return out
    py = os.environ.get("XPO_TORCH_PYTHON", "/tmp/trl-venv/bin/python")
    if a.setup_trl and not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", "/tmp/trl-venv"], check=True)
        pip = ["/tmp/trl-venv/bin/pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["trl==1.13.0", "requests"], check=True)
        py = "/tmp/trl-venv/bin/python"
    script = os.environ.get("XPO_TRL_BENCH")
    if not script:
        for cand in (os.path.join(ROOT, "..", "shared", "bench", "trl_xpo_round.py"), os.path.join(ROOT, ".bench", "trl_xpo_round.py")):
            if os.path.exists(cand):
                script = cand
                break
    if not script or not os.path.exists(py):
        raise SystemExit(f"TRL side needs $XPO_TORCH_PYTHON (tried {py}) and the harness (tried {script}); "
                         "use --setup-trl, or --trl-json FILE with an earlier measurement")
    out_file = os.path.join("/tmp", f"trl_round_{a.preset}.json")
    cmd = [py, script, "--preset", TRL_PRESET[a.preset], "--batch", str(a.batch), "--prompt-len", str(a.prompt_len),
           "--new-tokens", str(a.new_tokens), "--steps", str(a.steps), "--grad-ckpt", "0", "--out", out_file]
    if a.dtype == "bfloat16":
        cmd += ["--bf16", "1", "--param-dtype", "bfloat16"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out_file) as f:
        out = json.loads(f.read())
    out["source"] = "measured in this run"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-tiny", choices=sorted(TRL_PRESET))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scan-layers", type=int, choices=[0, 1], default=None,
                    help="override the preset's scan_layers (0: unrolled decoder layers)")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument("--trl-json", default=None)
    ap.add_argument("--setup-trl", action="store_true")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--floor-s", type=float, default=None, help="the issue's floor for this shape, for the table")
    a = ap.parse_args()
    ours = time_ours(a)
    print(json.dumps(ours), flush=True)
    trl = None if a.skip_trl else time_trl(a)
    ratio = trl["median_step_s"] / ours["median_step_s"] if trl else None
    meta = {"date": datetime.date.today().isoformat(), "machine": ours["device"], "shape": vars(a),
            "command": "python experiments/bench_round.py " + " ".join(sys.argv[1:])}
    os.makedirs(RESULTS, exist_ok=True)
    tag = a.preset + ("" if ours["device"].startswith("CPU") else "_gpu") + (f"_{a.tag}" if a.tag else "")
    with open(os.path.join(RESULTS, f"bench_round_{tag}.json"), "w") as f:
        json.dump({"meta": meta, "ours": ours, "trl": trl, "speedup": ratio}, f, indent=1)
    lines = [
        f"# Online XPO round: {a.preset}, B={a.batch}, P={a.prompt_len}, N={a.new_tokens}, {a.dtype}",
        "", f"{meta['machine']}, {meta['date']}. Command: `{meta['command']}`", "",
        "| impl | s/round (median) | prompts/s | note |", "|---|---|---|---|",
        f"| xpo_jax (fused round, jit) | {ours['median_step_s']:.3f} | {ours['prompts_per_s']:.1f} | first call incl. compile {ours['first_call_s']:.1f} s |",
    ]
    if trl:
        lines.append(f"| TRL 1.13 XPOTrainer (KV cache on, grad-ckpt 0) | {trl['median_step_s']:.3f} | {trl['prompts_per_s']:.1f} | {trl['source']} |")
        lines += ["", f"Speed-up over TRL: **{ratio:.2f}x**."]
    if a.floor_s:
        lines.append(f"Floor (issue's estimate): {a.floor_s} s/round; ours is {ours['median_step_s'] / a.floor_s:.1f}x the floor.")
    with open(os.path.join(RESULTS, f"bench_round_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
