"""A pod plan by simulation: per-device memory of the fused XPO round at real model shapes.

    nice -n 5 python experiments/plan_memory.py [--budget-min 60] [--fresh]
    python experiments/plan_memory.py --report          # rewrite the .md/.json from the JSONL

Compiles `make_round(...).round_fn` -- two samplings over a KV cache (policy and reference: XPO's
exploration_mix = 1), the reward-model oracle, the reference forward, the policy forward and
backward, the loss and AdamW -- ahead of time with `jax.jit(...).lower(...)` on
`jax.ShapeDtypeStruct` inputs that carry their target shardings, so no weight is ever
materialised, and reads `compiled.memory_analysis()` per device:

    argument   the donated state (policy f32 master weights, Adam mu/nu, reference), the reward
               model's parameters, the prompts
    output     the new state and the metrics
    temp       XLA's temporary buffers: activations, gradients, KV caches, gathered FSDP weights
    alias      output bytes that reuse donated argument buffers (the state, with donate_argnums=0)
    total      argument + output + temp - alias (what `xpo_jax.train._check_fits` checks)

Shapes: the published HF config.json values (see MODELS). The reward model is a policy-shaped
`*ForSequenceClassification` (our `RewardModel`: the policy's trunk and a D -> 1 `score` head), the
common RLHF set-up (e.g. a reward model fine-tuned from the SFT policy). The reference has the
policy's shape (the policy starts as a copy of it). Batch 64 prompts of 512 tokens, 256 new
tokens (the KV cache holds 767 slots; the training forwards run over 2 x 64 sequences of 768).

Mesh: data = 1 x fsdp = N. The batch is split over data x fsdp jointly (`parallel.batch_sharding`),
so every device holds 64 / N rows whatever the split; fsdp = N also splits every large weight,
its Adam moments, the reference and the reward model N ways, while data > 1 would replicate them
over the data axis: for memory, all-FSDP is the minimum (a data axis buys less communication
per step, not memory).

Each row is one fresh subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N and
JAX_PLATFORMS=cpu, no compilation cache; finished rows go to
experiments/results/plan_memory.jsonl as they complete, and a rerun skips them (resume). The rows
run smallest model first within each device count (64 devices, the target's, then 8, then 32; see
`all_rows`), and rows that do not fit --budget-min are left out (and listed). Writes
experiments/results/plan_memory.{md,json}.

What-if rows ("pinned"): the same round with the decoder's token ids, masks and hidden states
constrained to the batch sharding at compile time (`_batch_constrained_layers`), the library change
the report recommends. `--breakdown ROW` prints XLA's largest buffers of one row.

What a CPU compile can tell about a TPU/GPU. The argument, output and alias bytes are the sizes of
the sharded inputs and outputs: they are exact up to the accelerator's layout padding (TPU tiles
pad minor dimensions to multiples of 128 / 8, GPU layouts barely). The temporaries are an
estimate: they come from the CPU backend's own fusion decisions, buffer assignment and
scheduling, and the CPU backend has no memory-space assignment, no TPU/GPU latency-hiding
scheduler (which overlaps the FSDP all-gathers with compute and keeps more than one layer's
gathered weights alive), and it may widen bfloat16 dots to float32. A TPU or GPU compile of the
same program can need more or less; the rows say which configurations are comfortably inside a
device, which are marginal, and which are out by far.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
JSONL = os.path.join(RESULTS, "plan_memory.jsonl")
GIB = 2.0 ** 30

# Published config.json values (HF hub): vocab, d_model, layers, heads, kv heads, mlp, tied
# embeddings, q/k/v bias, rope theta, RMSNorm eps, max positions. head_dim = d_model / heads.
MODELS: dict[str, dict] = {
    "Qwen2-0.5B": dict(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, mlp_dim=4864,
                       tie_embeddings=True, qkv_bias=True, rope_theta=1e6, rms_eps=1e-6, max_seq_len=131072),
    "Qwen2.5-1.5B": dict(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, mlp_dim=8960,
                         tie_embeddings=True, qkv_bias=True, rope_theta=1e6, rms_eps=1e-6, max_seq_len=131072),
    "Llama-3.2-3B": dict(vocab_size=128256, d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, mlp_dim=8192,
                         tie_embeddings=True, qkv_bias=False, rope_theta=500000.0, rms_eps=1e-5, max_seq_len=131072,
                         rope_scaling=(32.0, 1.0, 4.0, 8192)),
    "Llama-3-8B": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_dim=14336,
                       tie_embeddings=False, qkv_bias=False, rope_theta=500000.0, rms_eps=1e-5, max_seq_len=8192),
}

# Storage / compute precisions. "bf16": float32 master weights and Adam moments, bfloat16
# compute, reference and reward model (logits, losses, softmax and norms stay float32).
PRECISIONS: dict[str, dict] = {
    "f32": dict(compute_dtype="float32", param_dtype="float32", ref_dtype="float32", reward_dtype="float32"),
    "bf16": dict(compute_dtype="bfloat16", param_dtype="float32", ref_dtype="bfloat16", reward_dtype="bfloat16"),
}
DEVICES = (8, 32, 64)
# (precision, remat, micro-batches): the f32 baseline, then the bf16 variants.
VARIANTS = (("f32", "none", 1), ("bf16", "none", 1), ("bf16", "block", 1), ("bf16", "matmuls", 1))
DEVICE_GIB = {"v5e": 16, "v4": 32, "H100": 80, "v5p": 95}
BATCH, PROMPT, NEW = 64, 512, 256
# LoRA / QLoRA rows: rank 16 on the default targets over a base stored as (--base-dtype)
LORA_RANK, LORA_SMALL_BATCH = 16, 8
LORA_BASES = {"bf16": "bfloat16", "int8": "int8", "nf4": "nf4"}


def model_config(name: str, **overrides):
    """The ModelConfig of MODELS[name] (scan_layers on: one compiled layer, see
    experiments/results/bench_compile_layers.md), with `overrides` (dtype, param_dtype, remat)."""
    from xpo_jax.models.transformer import Llama3RopeScaling, ModelConfig

    spec = dict(MODELS[name])
    rs = spec.pop("rope_scaling", None)
    spec["head_dim"] = spec["d_model"] // spec["n_heads"]
    return ModelConfig(**spec, rope_scaling=None if rs is None else Llama3RopeScaling(*rs), scan_layers=True,
                       **overrides).validate()


def lower_round(config, mesh, *, batch: int, prompt_len: int, new_tokens: int, compute_dtype: str = "float32",
                param_dtype: str = "float32", ref_dtype: str = "float32", reward_dtype: str = "float32",
                remat: str = "none", micro_batches: int = 1, reward_config=None,
                constrain_activations: bool = False, lora_rank: int = 0, base_dtype: str = "auto"):
    """Lower the fused round for `config` (the policy's ModelConfig; its dtype fields are replaced
    by the arguments) on `mesh`, on abstract sharded inputs. Returns (lowered, parts): parts holds
    the abstract state and reward-model parameters (ShapeDtypeStructs carrying their shardings,
    for reading which collectives move weights), the global sizes and lower_s.

    The reward model is `RewardModel(reward_config or config)` stored in `reward_dtype`; the
    reference is the policy's shape stored in `ref_dtype`; the policy's master weights and Adam's
    moments are `param_dtype`. Nothing is materialised: every input is a ShapeDtypeStruct.

    `constrain_activations` (a what-if, not the library's behaviour): the decoder's token ids and
    mask and every layer's input and output hidden states [B, T, D] are pinned to the batch
    sharding (rows over data x fsdp) with `with_sharding_constraint`, by wrapping
    `Decoder.__call__` / `Decoder.extend` / `DecoderLayer.__call__` for this compile only.
    Without it XLA's sharding propagation is free to lay activations out as it likes.

    `lora_rank` > 0: a LoRA run (default targets), as the library builds it: the state's params
    and Adam's moments are the adapters (`lora.init_adapters`, `param_dtype`), its ref_params the
    frozen base in `ref_dtype`, or with `base_dtype` int8 / nf4 its projections quantized
    (`quant.quantize_base` on the abstract shapes: QLoRA)."""
    import jax
    import jax.numpy as jnp

    from xpo_jax import parallel as par
    from xpo_jax.config import TrainConfig
    from xpo_jax.models.transformer import RewardModel, Transformer, init_params, init_reward_params
    from xpo_jax.oracles import reward_model_oracle
    from xpo_jax.round import make_optimizer, make_round
    from xpo_jax.state import Hyperparams, initial_state

    from xpo_jax.models import lora, quant

    cfg = TrainConfig(batch_size=batch, max_new_tokens=new_tokens, max_prompt_length=prompt_len,
                      micro_batches=micro_batches, compute_dtype=compute_dtype, param_dtype=param_dtype,
                      ref_dtype=ref_dtype, reward_dtype=reward_dtype, remat=remat, scan_layers=True,
                      exploration_mix=1.0, bonus="clip", bradley_terry=True, lora_rank=lora_rank,
                      base_dtype=base_dtype).validate()
    pol = dataclasses.replace(config, dtype=compute_dtype, param_dtype=ref_dtype, remat=remat, scan_layers=True)
    rm_cfg = dataclasses.replace(reward_config or config, dtype=compute_dtype, param_dtype=reward_dtype,
                                 remat="none", scan_layers=True)
    model, rm = Transformer(pol), RewardModel(rm_cfg)
    tx, schedule = make_optimizer(cfg)
    eos_id, pad_id = 1, 0
    layout = par.Layout(mesh)
    fns = make_round(cfg, apply_fn=model.apply, eos_id=eos_id, pad_id=pad_id, max_new_tokens=new_tokens,
                     lr_schedule=schedule, layout=layout)

    key0 = jax.random.PRNGKey(0)
    ref_shapes = float_shapes = jax.eval_shape(lambda k: init_params(pol, k), key0)  # stored in ref_dtype
    if cfg.base_quantization():
        ref_shapes = quant.quantize_base(ref_shapes, lora.adaptable_kernels(ref_shapes), cfg.base_quantization())
    rm_shapes = jax.eval_shape(lambda k: init_reward_params(rm_cfg, k), key0)
    hp = Hyperparams.from_config(cfg)
    adapters = lambda key, ref: (lora.init_adapters(ref, lora_rank, cfg.lora_targets, key, param_dtype)
                                 if lora_rank else None)
    init = lambda key, hparams, ref: initial_state(cfg, apply_fn=model.apply, ref_params=ref, tx=tx, key=key,
                                                   hparams=hparams, prompt_len=prompt_len, max_new_tokens=new_tokens,
                                                   param_dtype=param_dtype, params=adapters(key, ref))
    state_shapes = jax.eval_shape(init, key0, hp, ref_shapes)
    st = layout.state(state_shapes)
    state = layout.abstract_state(state_shapes)
    rm_sh = layout.params(rm_shapes)
    rm_params = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                       rm_shapes, rm_sh)
    oracle = reward_model_oracle(rm.apply, rm_params, eos_id=eos_id, bradley_terry=True)
    oracle_sh = layout.params(oracle)
    rep, bs = layout.replicated, layout.batch
    prompts = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=bs)
    step = jax.jit(fns.round_fn, in_shardings=(st, bs, bs, oracle_sh), out_shardings=(st, rep), donate_argnums=0)

    t0 = time.perf_counter()
    with _batch_constrained_layers(mesh if constrain_activations else None):
        lowered = step.lower(state, prompts, prompts, oracle)
    nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
    parts = dict(
        state=state, reward_params=rm_params, lower_s=time.perf_counter() - t0,
        # Whole (unsharded) sizes, for reading the per-device numbers against.
        global_state_bytes=nbytes(state_shapes), global_reward_model_bytes=nbytes(rm_shapes),
        global_params=int(sum(x.size for x in jax.tree_util.tree_leaves(float_shapes))),
        global_base_bytes=nbytes(ref_shapes), global_trained_bytes=nbytes(state_shapes.params),
    )
    return lowered, parts


def compile_lowered(lowered, compiler_options: dict | None = None):
    """(compiled, dict(compile_s, compile_cpu_s)): `lowered.compile`, timed (wall and this
    process's CPU seconds)."""
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = lowered.compile(compiler_options=compiler_options)
    return compiled, dict(compile_s=time.perf_counter() - t0, compile_cpu_s=time.process_time() - c0)


def memory_of(compiled) -> dict:
    """`compiled.memory_analysis()` per device, in bytes, with total = argument + output + temp -
    alias (what `xpo_jax.train._check_fits` checks)."""
    m = compiled.memory_analysis()
    out = dict(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
               temp_bytes=int(m.temp_size_in_bytes), alias_bytes=int(m.alias_size_in_bytes),
               generated_code_bytes=int(m.generated_code_size_in_bytes))
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def plan(config, mesh, *, batch: int, prompt_len: int, new_tokens: int, compiler_options: dict | None = None,
         **kwargs) -> dict:
    """Compile the fused round (`lower_round(config, mesh, ..., **kwargs)`: dtypes, remat,
    micro_batches, reward_config, constrain_activations) ahead of time and return
    memory_analysis() per device (bytes) and the lower / compile seconds.
    `compiler_options`: XLA debug options for this compile (e.g. {"xla_backend_optimization_level": 0})."""
    lowered, parts = lower_round(config, mesh, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, **kwargs)
    compiled, timing = compile_lowered(lowered, compiler_options)
    out = dict(lower_s=parts["lower_s"], **timing, **memory_of(compiled))
    out.update({k: parts[k] for k in ("global_state_bytes", "global_reward_model_bytes", "global_params",
                                      "global_base_bytes", "global_trained_bytes")})
    return out


class _batch_constrained_layers:
    """Context: the decoder's token ids and mask (`Decoder.__call__` / `extend`) and every layer's
    hidden states (`DecoderLayer.__call__`) constrained to the batch sharding of `mesh` (a no-op
    for mesh None). The what-if of the library change this plan recommends."""

    def __init__(self, mesh):
        self.mesh = mesh

    def __enter__(self):
        if self.mesh is None:
            return self
        import jax

        from xpo_jax import parallel as par
        from xpo_jax.models import transformer

        sharding = par.Layout(self.mesh).batch
        pin = lambda x: jax.lax.with_sharding_constraint(x, sharding)
        self.orig = orig = transformer.DecoderLayer.__call__

        def call(self_, x, *args, **kwargs):
            y, cache = orig(self_, pin(x), *args, **kwargs)
            return pin(y), cache

        # The token ids too: concatenating two batch-sharded [B, .] arrays along the batch axis
        # (the round's concat(y, y~) and the oracle's) leaves XLA free to replicate the result.
        self.orig_call, self.orig_extend = dec_call, dec_extend = transformer.Decoder.__call__, transformer.Decoder.extend
        transformer.Decoder.__call__ = lambda self_, tokens, mask: dec_call(self_, pin(tokens), pin(mask))
        transformer.Decoder.extend = lambda self_, tokens, mask, cache: dec_extend(self_, pin(tokens), pin(mask), cache)
        transformer.DecoderLayer.__call__ = call
        return self

    def __exit__(self, *exc):
        if self.mesh is not None:
            from xpo_jax.models import transformer

            transformer.DecoderLayer.__call__ = self.orig
            transformer.Decoder.__call__, transformer.Decoder.extend = self.orig_call, self.orig_extend
        return False


# ----------------------------------------------------------------------------------------------
# One row per subprocess
# ----------------------------------------------------------------------------------------------


def row_id(r: dict) -> str:
    lora = f"|lora{r['lora']}-{r['base']}" if r.get("lora") else ""
    batch = f"|B{r['batch']}" if r.get("batch", BATCH) != BATCH else ""
    return (f"{r['model']}|{r['devices']}|{r['precision']}|{r['remat']}|mb{r['micro_batches']}"
            f"|{'pinned' if r.get('pinned') else 'as-is'}|O{r.get('opt', 0) if r.get('opt') is not None else 'default'}"
            f"{lora}{batch}")


def child(spec: dict) -> dict:
    import jax

    from xpo_jax import parallel as par

    n = spec["devices"]
    assert jax.device_count() == n, (jax.device_count(), n)
    mesh = par.make_mesh(data=1, fsdp=n, devices=jax.devices())
    config = model_config(spec["model"])
    lora = dict(lora_rank=spec["lora"], base_dtype=LORA_BASES[spec["base"]]) if spec.get("lora") else {}
    res = plan(config, mesh, batch=spec.get("batch", BATCH), prompt_len=PROMPT, new_tokens=NEW, remat=spec["remat"],
               micro_batches=spec["micro_batches"], constrain_activations=spec.get("pinned", False),
               **PRECISIONS[spec["precision"]], **lora)
    return {**spec, "mesh": f"data=1 x fsdp={n}", **res, "jax": jax.__version__}


def all_rows() -> list[dict]:
    """Every row, in the order they run. Smallest model first within each phase: (A) 64 devices,
    the target's count, with the what-if rows; (B) 8 devices; (C) 32 devices; last, the f32
    baselines of the two largest models at 8 devices (the first to go when the budget runs out).
    `opt` is XLA's CPU backend optimisation level (LLVM codegen: 0 halves compile time and leaves
    memory_analysis unchanged; the calibration row compiles the target at the default level)."""
    def row(model, n, prec, remat, mb=1, pinned=False, opt=0):
        return dict(model=model, devices=n, precision=prec, remat=remat, micro_batches=mb, pinned=pinned, opt=opt)

    big = "Llama-3-8B"
    rows, last = [], []
    for model in MODELS:  # (A)
        rows += [row(model, 64, p, r, mb) for p, r, mb in VARIANTS] + [row(model, 64, "bf16", "block", pinned=True)]
        if model == big:
            rows += [row(big, 64, "bf16", "block", 4), row(big, 64, "bf16", "none", pinned=True),
                     row(big, 64, "bf16", "matmuls", pinned=True), row(big, 64, "bf16", "block", opt=None)]
    for n in (8, 32):  # (B), (C)
        for model in MODELS:
            for p, r, mb in VARIANTS:
                if n == 8 and p == "f32" and model in ("Llama-3.2-3B", big):
                    last.append(row(model, n, p, r, mb))
                else:
                    rows.append(row(model, n, p, r, mb))
            if model == big:
                rows += [row(big, n, "bf16", "block", 4), row(big, n, "bf16", "block", pinned=True),
                         row(big, n, "bf16", "block", 4, pinned=True)]
    return rows + last + lora_rows()


def lora_rows() -> list[dict]:
    """LoRA (rank 16, default targets, bf16 base) and QLoRA (int8 / nf4 base) rows of Llama-3-8B,
    bf16 compute, block remat, on 1 device and on 8 (fsdp 8): the plan's batch, and on 1 device
    also LORA_SMALL_BATCH prompts (the plan's 64 leave no single device a chance)."""
    rows = []
    for n, batch in ((8, BATCH), (1, BATCH), (1, LORA_SMALL_BATCH)):
        for base in LORA_BASES:
            rows.append(dict(model="Llama-3-8B", devices=n, precision="bf16", remat="block", micro_batches=1,
                             pinned=False, opt=0, lora=LORA_RANK, base=base, batch=batch))
    return rows


def load_done(path: str = JSONL, key=None) -> dict:
    """The finished rows of a JSONL results file, by `key(row)` (default `row_id`)."""
    key = row_id if key is None else key
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    r = json.loads(line)
                    done[key(r)] = r
    return done


def run_row(spec: dict, timeout: float, dump_to: str | None = None, script: str = __file__) -> dict:
    """Run `script --child SPEC` in a fresh process with spec["devices"] simulated CPU devices (and
    spec["opt"] as XLA's CPU optimisation level) and return the JSON line it prints last, plus
    wall_s; a failure or a timeout returns the spec with an "error"."""
    flags = f"--xla_force_host_platform_device_count={spec['devices']}"
    if dump_to:  # the optimised HLO and XLA's buffer-assignment report of the round
        flags += f" --xla_dump_to={dump_to} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*round_fn.*"
    if spec.get("opt") is not None:
        flags += f" --xla_backend_optimization_level={spec['opt']}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(k, None)  # every compile from nothing
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, os.path.abspath(script), "--child", json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {**spec, "error": f"timed out after {timeout:.0f} s", "wall_s": time.time() - t0}
    wall = time.time() - t0
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = err.strip().splitlines()[-3:]
        return {**spec, "error": f"exit {proc.returncode}: {' | '.join(tail)}", "wall_s": wall}
    r = json.loads(lines[-1])
    r["wall_s"] = wall
    return r


def main_loop(a) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    if a.fresh and os.path.exists(JSONL):
        os.remove(JSONL)
    done = load_done()
    rows = [r for r in all_rows() if (not a.models or r["model"] in a.models) and
            (not a.devices or r["devices"] in a.devices) and (not a.lora or r.get("lora"))]
    start = time.time()
    budget = a.budget_min * 60.0
    per_model: dict[str, float] = {}  # the longest row seen per model: the next one's estimate
    for spec in rows:
        rid = row_id(spec)
        if rid in done and "error" not in done[rid]:
            per_model[spec["model"]] = max(per_model.get(spec["model"], 0.0), done[rid].get("wall_s", 0.0))
            continue
        spent = time.time() - start
        guess = per_model.get(spec["model"], 0.0)
        if spent + guess > budget:
            print(f"[plan] skip {rid}: {spent:.0f} s spent + ~{guess:.0f} s > budget {budget:.0f} s", flush=True)
            continue
        print(f"[plan] {rid} ...", flush=True)
        r = run_row(spec, timeout=a.row_timeout)
        r["load"] = os.getloadavg()[0]
        r["date"] = datetime.datetime.now().isoformat(timespec="seconds")
        per_model[spec["model"]] = max(per_model.get(spec["model"], 0.0), r.get("wall_s", 0.0))
        with open(JSONL, "a") as f:
            f.write(json.dumps(r) + "\n")
        msg = r.get("error") or (f"total {r['total_bytes'] / GIB:.2f} GiB/device (arg {r['argument_bytes'] / GIB:.2f}, "
                                 f"temp {r['temp_bytes'] / GIB:.2f}), lower {r['lower_s']:.1f} s, "
                                 f"compile {r['compile_s']:.1f} s")
        print(f"[plan]   {msg}; wall {r['wall_s']:.0f} s", flush=True)
    print(f"[plan] this invocation: {time.time() - start:.0f} s", flush=True)
    report(a)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def verdict(total: int) -> str:
    fits = [name for name, gib in DEVICE_GIB.items() if total <= gib * GIB]
    return ", ".join(fits) if fits else "none"


def _prec_label(p: str) -> str:
    return {"f32": "f32 all", "bf16": "f32 master+Adam, bf16 compute/ref/RM"}[p]


def analysis(rows: list) -> list:
    """The answer to the target, a summary, what stands in the way and the caveats (markdown
    lines). Numbers come from the finished rows; the buffer breakdowns quoted were read with
    `--breakdown` on the target row, as is and pinned."""
    ok = [r for r in rows if "error" not in r and r.get("opt") is not None and not r.get("lora")]

    def find(model, n, prec, remat, mb=1, pinned=False):
        for r in ok:
            if (r["model"], r["devices"], r["precision"], r["remat"], r["micro_batches"], bool(r.get("pinned"))) == \
                    (model, n, prec, remat, mb, pinned):
                return r
        return None

    def t(*key, what="total_bytes", **kw):
        r = find(*key, **kw)
        return "not run" if r is None else f"{r[what] / GIB:.2f} GiB"

    big = "Llama-3-8B"
    out = ["", "## The target: Llama-3-8B, float32 master weights and Adam, bfloat16 compute and reference, 64 devices", ""]
    tgt = find(big, 64, "bf16", "block")
    if tgt is not None:
        fits = tgt["total_bytes"] <= 16 * GIB
        out += [
            f"**{'Yes' if fits else 'No'}, by this estimate.** With `--remat block` the round needs "
            f"**{tgt['total_bytes'] / GIB:.2f} GiB per device** on data=1 x fsdp=64 (arguments "
            f"{tgt['argument_bytes'] / GIB:.2f} GiB: the policy's float32 weights and Adam moments, the bfloat16 "
            f"reference and reward model, 1/64 each; temporaries {tgt['temp_bytes'] / GIB:.2f} GiB), "
            f"{16 - tgt['total_bytes'] / GIB:.1f} GiB under a v5e's 16 GiB; with `--micro-batches 4` "
            f"{t(big, 64, 'bf16', 'block', 4)}. Without remat it needs {t(big, 64, 'bf16', 'none')} and with "
            f"`--remat matmuls` {t(big, 64, 'bf16', 'matmuls')}: neither fits 16 GiB. The same program compiled at "
            f"XLA's default CPU optimisation level gives the same bytes (the calibration row). At 32 devices "
            f"block + 4 micro-batches also fits ({t(big, 32, 'bf16', 'block', 4)}); at 8 devices the state alone is "
            f"{t(big, 8, 'bf16', 'block', what='argument_bytes')} per device (about 16 bytes per parameter: 4 f32 "
            f"weight + 8 Adam + 2 bf16 reference + 2 bf16 reward model, / 8), so the best 8-device round "
            f"({t(big, 8, 'bf16', 'block', 4)}, block + 4 micro-batches) fits an H100 or a v5p, not a v4.",
            "",
        ]
    out += ["### The smallest round per model and device count (bf16 rows, the library as is)", "",
            "| model | devices | best configuration | total | fits | remat none | f32 baseline |", "|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for n in sorted(DEVICES):
            cands = [r for r in ok if r["model"] == model and r["devices"] == n and r["precision"] == "bf16"
                     and not r.get("pinned")]
            if not cands:
                continue
            b = min(cands, key=lambda r: r["total_bytes"])
            out.append(f"| {model} | {n} | remat {b['remat']}, mb {b['micro_batches']} | {b['total_bytes'] / GIB:.2f} | "
                       f"{verdict(b['total_bytes'])} | {t(model, n, 'bf16', 'none')} | {t(model, n, 'f32', 'none')} |")
    out += [
        "",
        "## What the table says",
        "",
        "- **remat none never fits a 16 GiB device, at any size or device count** (0.5B: "
        f"{t('Qwen2-0.5B', 64, 'bf16', 'none')} per device on 64 devices). The training forward keeps every layer's "
        "activations of the 2 x 64 sequences of 768 tokens, the float32 attention scores [rows, heads, 768, 768] "
        "first. `--remat block` is the setting that makes every model fit something; `matmuls` (keeps the "
        "projections' outputs) needs 1.5-3x block's temporaries.",
        "- **More devices shrink the state, not the temporaries.** Arguments fall as 1/N (8B: "
        f"{t(big, 8, 'bf16', 'block', what='argument_bytes')} -> {t(big, 32, 'bf16', 'block', what='argument_bytes')} -> "
        f"{t(big, 64, 'bf16', 'block', what='argument_bytes')} on 8 / 32 / 64 devices), temporaries much less "
        f"({t(big, 8, 'bf16', 'block', what='temp_bytes')} -> {t(big, 32, 'bf16', 'block', what='temp_bytes')} -> "
        f"{t(big, 64, 'bf16', 'block', what='temp_bytes')}): see the first obstacle below.",
        "- **Micro-batches help at every device count** (8B block: "
        f"{t(big, 8, 'bf16', 'block')} -> {t(big, 8, 'bf16', 'block', 4)} on 8 devices, "
        f"{t(big, 64, 'bf16', 'block')} -> {t(big, 64, 'bf16', 'block', 4)} on 64), even at 64 devices where a "
        "device holds one prompt: the policy's forward and backward are the largest temporaries and run on a "
        "quarter of the batch at a time (the sampling, the reward model and the reference forward are not "
        "micro-batched).",
        "- **bf16 storage shrinks the arguments by a fifth, not the temporaries**: with remat none the bf16 rows "
        "have slightly *more* temporaries than the f32 baseline (bf16 copies of float32 master weights next to "
        "float32 attention scores, softmax and norms, which stay float32 by design).",
        "",
        "## What stands in the way, and what would remove it",
        "",
        "The target fits, but with less headroom than the state suggests: on 64 devices the state is 1.9 GiB "
        "and the temporaries are 5-6x that. `--breakdown` on the target row (XLA's buffer-assignment report) "
        "shows why:",
        "",
        "1. **Activations are not split by rows.** The library constrains the state (FSDP) and the prompts (batch) "
        "and leaves everything in between to XLA's sharding propagation. In the compiled round the FSDP "
        "sharding of the weights propagates into the activations: the training forward's hidden states are "
        "whole-batch arrays split over the model dimensions (f32/bf16 [128, 768, 4096 / 64], attention "
        "[128, 1 head, 768, 768]) -- tensor parallelism with the batch replicated -- with transient "
        "whole-batch [128, 768, 4096] buffers (1.5 GiB each in f32) where the layout changes. This is why the "
        "temporaries barely shrink with more devices, why remat none is so large, and why micro-batches help "
        "on 64 devices. *Removing it*: a batch sharding constraint on the model's token ids, masks and each "
        "layer's hidden states (and on the concatenations of y and y~ in `round.seq_logprobs` and the oracle). "
        "The `pinned (what-if)` rows do exactly that by wrapping `Decoder.__call__` / `extend` / "
        "`DecoderLayer.__call__` at compile time: 0.5B block "
        f"{t('Qwen2-0.5B', 64, 'bf16', 'block')} -> {t('Qwen2-0.5B', 64, 'bf16', 'block', pinned=True)}, 1.5B "
        f"{t('Qwen2.5-1.5B', 64, 'bf16', 'block')} -> {t('Qwen2.5-1.5B', 64, 'bf16', 'block', pinned=True)}, 8B remat "
        f"none {t(big, 64, 'bf16', 'none')} -> {t(big, 64, 'bf16', 'none', pinned=True)} -- but 8B block "
        f"{t(big, 64, 'bf16', 'block')} -> {t(big, 64, 'bf16', 'block', pinned=True)}: worse, because of 2 and 3.",
        "2. **Once the activations are pinned, the embedding and the LM head are gathered whole, in float32.** "
        "The FSDP rule splits a weight on its largest dimension, the vocabulary for [V, D] and [D, V]. The "
        "pinned round (breakdown of the pinned target row) all-gathers the whole "
        "float32 table for the lookup (f32[128256, 4096] = 1.96 GiB, and as much again for the untied LM head "
        "kernel), computes the lookup for the whole batch (f32 [128, 768, 4096], 1.5 GiB) and scatters the "
        "embedding's gradient into a whole float32 [V, D] buffer before reducing it. *Removing it*: gather the "
        "bfloat16 copy instead of the float32 master (cast under the weight's own sharding, then gather: half "
        "the bytes), look up only the local rows (pinned token ids against the gathered table, or a vocab-"
        "sharded lookup with a reduce-scatter), and chunk the LM head with the log-probs.",
        "3. **Layer weights are gathered in float32 too** (pinned rows: f32 [4096, 14336] gathers per layer "
        "and their gradients): casting to bfloat16 before the all-gather halves them; that is the same change "
        "as in 2, for every FSDP weight.",
        "4. **Logits**: the completion logits are made whole, [rows, 257, V] in float32, plus their cotangent and "
        "transposes in the backward (0.25 GiB each per device on 64 devices, 2 GiB each on 8): computing the "
        "LM head inside `logprobs.token_logprobs`' checkpointed chunks would keep one [rows, 128, V] chunk.",
        "",
        "With 1-3 removed, the 8B round on 64 devices would hold the state (1.9 GiB), one or two layers' "
        "gathered bfloat16 weights (0.4 GiB each), the saved layer inputs of its two sequences (one prompt's y "
        "and y~; block remat: 32 x 2 x 768 x 4096 x 2 B = 0.4 GiB), the logits and the KV caches: a few GiB "
        "rather than 12 (arithmetic, not a measured row).",
        "",
        *lora_analysis(rows),
        "## What a CPU compile can and cannot tell about a TPU or GPU",
        "",
        "- **Exact (up to layout padding)**: arguments, outputs and aliasing are the sharded sizes of the state, "
        "the reward model and the prompts -- what the FSDP rule puts on each device. TPU layouts pad minor "
        "dimensions to tiles (multiples of 128 and 8), which adds little for these shapes (every dimension here "
        "is a multiple of 64 and most of 128).",
        "- **Same partitioner**: the sharding propagation and SPMD partitioning that decide the layouts above "
        "are XLA's target-independent passes, so the layout problems (1-3) are expected on TPU and GPU too; "
        "their exact choices can still differ with the backend's cost model and XLA version.",
        "- **An estimate**: temporaries come from the CPU backend's fusion, scheduling and buffer assignment. A "
        "TPU compile fuses differently, assigns some buffers to other memory spaces, and its latency-hiding "
        "scheduler overlaps each layer's FSDP all-gather with the previous layer's compute (more than one "
        "layer's weights alive at once); the CPU backend may also keep float32 copies around bfloat16 dots that "
        "a TPU would not. Expect the temporaries to move by some tens of percent either way, not by factors.",
        "- **Not counted at all**: the runtime's own reservations (a TPU runtime keeps some HBM; JAX on GPU "
        "gives XLA 75% of the memory by default, `XLA_PYTHON_CLIENT_MEM_FRACTION`), fragmentation, and the "
        "trainer's other programs (the evaluation, the initial state's placement) which are not alive during "
        "the round. Read a row as fitting comfortably when it is at or below ~85% of the device, marginal above.",
        "- **Not measured**: speed. The as-is layouts move activation-sized data between devices every layer "
        "(tensor parallelism over 64 devices), the pinned ones weight-sized data (FSDP); which is faster on a "
        "given interconnect is for a device run to say.",
    ]
    return out


def lora_analysis(rows: list) -> list:
    """The LoRA / QLoRA rows (`lora_rows`) as one table: what fits 16, 32 and 80 GiB."""
    lr = [r for r in rows if r.get("lora") and "error" not in r]
    if not lr:
        return []
    g = lambda b: f"{b / GIB:.2f}"
    out = ["## LoRA and QLoRA: Llama-3-8B on 1 and 8 devices", "",
           f"Rank {LORA_RANK} adapters on every projection (q/k/v/o, gate/up/down), float32 adapters and Adam, "
           "bfloat16 compute, block remat, one update; the frozen base (= the reference) stored in bfloat16 "
           "(LoRA) or with its projections quantized (QLoRA: `--base-dtype int8 | nf4`; embeddings, norms and "
           "the LM head bfloat16); the reward model is the plan's bfloat16 policy-shaped one (15.0 GiB whole). "
           "state = the adapters and Adam; base and RM whole sizes; per-device GiB as above.", "",
           "| devices | B | base | trained (whole) | base (whole) | arg | temp | **total** | fits 16 | fits 32 | "
           "fits 80 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    yes = lambda r, gib: "yes" if r["total_bytes"] <= gib * GIB else "no"
    for r in sorted(lr, key=lambda r: (r["devices"], -r.get("batch", BATCH), list(LORA_BASES).index(r["base"]))):
        out.append(f"| {r['devices']} | {r.get('batch', BATCH)} | {r['base']} | {g(r['global_trained_bytes'])} | "
                   f"{g(r['global_base_bytes'])} | {g(r['argument_bytes'])} | {g(r['temp_bytes'])} | "
                   f"**{g(r['total_bytes'])}** | {yes(r, 16)} | {yes(r, 32)} | {yes(r, 80)} |")
    out += [
        "",
        "- **What fits.** On 8 devices (fsdp 8, the plan's batch) every variant fits 32 GiB (LoRA bf16 29.7 GiB: "
        "marginal; QLoRA int8 / nf4 26.5 / 25.7 GiB: each device dequantizes whole layers, after gathering their codes), none 16 GiB: the per-device arguments are 2.5-3.7 GiB, the rest "
        "is the round's activations for 8 prompts x 768 tokens per device. On 1 device the plan's batch of 64 fits "
        "nothing (144-184 GiB); at 8 prompts QLoRA fits an 80 GiB H100 (int8 64.5, nf4 61.7 GiB) and LoRA does not "
        "(97.0 GiB).",
        "- **Where the bytes are** (`--breakdown` of the 1-device B=8 rows, 2026-12-04). The quantized base saves "
        "what its storage says (arguments 29.4 -> 22.9 -> 20.1 GiB: 15.0 GiB of bf16 base -> 8.5 int8 -> 5.6 nf4; "
        "the bf16 reward model is the other 14.0 GiB) and, on this CPU compile, more temporaries too: the largest "
        "temporaries are float32 copies of whole bfloat16 layer stacks (f32[32, 4096, 14336], f32[32, 14336, "
        "4096], f32[32, 4096, 4096] ...; 26 GiB per 8B model), which the CPU backend makes for its dots (it has "
        "no bfloat16 dot) and hoists out of the layer scan. The LoRA bf16 row has them for the base and for the "
        "reward model (67.6 GiB of temporaries), the QLoRA rows only for the reward model (41.6 GiB): the "
        "quantized kernels dequantize inside the scan, one layer at a time. A GPU or TPU does bfloat16 dots "
        "natively: without those copies the B=8 rows would need about 45 GiB (LoRA) and 38 GiB (QLoRA) -- an 80 "
        "GiB device with room, still not a 32 GiB one (arithmetic from the breakdown, not a measured row).",
        "",
    ]
    return out


def report(a) -> None:
    done = load_done()
    order = {row_id(r): i for i, r in enumerate(all_rows())}
    rows = sorted(done.values(), key=lambda r: order.get(row_id(r), 1e9))
    missing = [row_id(r) for r in all_rows() if row_id(r) not in done]
    g = lambda b: f"{b / GIB:.2f}"
    lines = [
        "# Pod plan by simulation: per-device memory of the fused XPO round",
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores ({platform.platform()}), shared with other "
        f"jobs; jax {next((r.get('jax') for r in rows if r.get('jax')), '?')}. Date: "
        f"{max((r.get('date', '') for r in rows), default='?')[:10]}. Command: "
        "`nice -n 5 python experiments/plan_memory.py --budget-min 60` (resumable; `--report` rewrites this file).",
        "",
        f"The round: `make_round(...).round_fn`, jitted with the trainer's shardings and `donate_argnums=0`, lowered "
        f"on `jax.ShapeDtypeStruct` inputs (no weight materialised) and compiled for N simulated CPU devices "
        f"(`--xla_force_host_platform_device_count=N`, one fresh process per row, no compilation cache). Batch "
        f"{BATCH} prompts x {PROMPT} tokens, {NEW} new tokens; y from the policy, y~ from the reference (XPO, "
        f"exploration_mix 1: two KV-cache sampling loops), a reward-model oracle, reference forward, policy "
        f"forward + backward, AdamW, one update per round. Layers scanned (`scan_layers=True`). Mesh data=1 x "
        f"fsdp=N: the batch splits over all N devices either way, and fsdp=N also splits every weight, "
        f"Adam moment, the reference and the reward model N ways (a data axis would replicate them).",
        "",
        "Models (published HF config.json shapes): Qwen2-0.5B (V 151936, d 896, 24 layers, 14/2 heads, mlp 4864, "
        "tied, qkv bias), Qwen2.5-1.5B (V 151936, d 1536, 28 layers, 12/2 heads, mlp 8960, tied, qkv bias), "
        "Llama-3.2-3B (V 128256, d 3072, 28 layers, 24/8 heads, mlp 8192, tied), Llama-3-8B (V 128256, d 4096, "
        "32 layers, 32/8 heads, mlp 14336, untied). Reference: the policy's shape. Reward model: a policy-shaped "
        "`*ForSequenceClassification` (our `RewardModel`: the policy's trunk + a D->1 score head, no LM head), "
        "the common RLHF set-up.",
        "",
        "Precision: **f32** = float32 everything (the baseline); **bf16** = float32 master weights and Adam "
        "moments, bfloat16 compute, bfloat16 reference and reward model (logits, log-probs, losses, softmax and "
        "norm statistics stay float32). remat: none / block (`nothing_saveable` per decoder layer) / matmuls "
        "(`dots_with_no_batch_dims_saveable`). mb = micro-batches (gradient accumulation in the update).",
        "",
        "Per device, GiB (2^30 bytes), from `compiled.memory_analysis()`: arg = arguments (state, reward model, "
        "prompts), out = outputs, temp = XLA temporaries, alias = outputs written into donated arguments, "
        "**total = arg + out + temp - alias** (what `train._check_fits` compares with the device). Fits: "
        f"total <= {', '.join(f'{k} {v} GiB' for k, v in DEVICE_GIB.items())} (nominal HBM; see the caveats). "
        "lower / compile: wall seconds (the machine was shared: load = 1-minute load average on 2 cores). "
        "XLA opt: the CPU backend's optimisation level (`--xla_backend_optimization_level`; 0 = LLVM code "
        "generation unoptimised, which shortens the compile and leaves memory_analysis unchanged: the target "
        "row compiled at the default level too gives identical bytes). activations: *as is* = the library's "
        "program; *pinned (what-if)* = token ids, masks and every layer's hidden states constrained to the "
        "batch sharding at compile time (not the library's behaviour; see below). Buffer breakdown of one row: "
        "`python experiments/plan_memory.py --breakdown '{\"model\": \"Llama-3-8B\", \"devices\": 64, "
        "\"precision\": \"bf16\", \"remat\": \"block\"}'`.",
        "",
        "| model | params | devices | mesh | precision | remat | mb | LoRA | B | activations | arg | out | temp | alias | "
        "**total** | fits | lower s | compile s | XLA opt | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        act = "pinned (what-if)" if r.get("pinned") else "as is"
        opt = "default" if r.get("opt") is None else str(r["opt"])
        lora = f"r{r['lora']}, {r['base']} base" if r.get("lora") else "-"
        head = (f"| {r['model']} | {{params}} | {r['devices']} | data=1 x fsdp={r['devices']} | {r['precision']} | "
                f"{r['remat']} | {r['micro_batches']} | {lora} | {r.get('batch', BATCH)} | {act} |")
        if "error" in r:
            lines.append(head.format(params="") + f" | | | | failed: {r['error'][:160]} | | | | {opt} | |")
            continue
        lines.append(
            head.format(params=f"{r['global_params'] / 1e9:.2f} B") + f" {g(r['argument_bytes'])} | "
            f"{g(r['output_bytes'])} | {g(r['temp_bytes'])} | {g(r['alias_bytes'])} | **{g(r['total_bytes'])}** | "
            f"{verdict(r['total_bytes'])} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | {opt} | {r.get('load', 0):.1f} |")
    if missing:
        lines += ["", "Rows not run (left out to keep the whole run within the time budget, largest models last): "
                  + ", ".join(f"`{m}`" for m in missing) + "."]
    total_wall = sum(r.get("wall_s", 0.0) for r in rows)
    lines += ["", f"Wall time of the rows (subprocess start to end, summed): {total_wall / 60:.1f} min."]
    lines += analysis(rows)
    with open(os.path.join(RESULTS, "plan_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, "plan_memory.json"), "w") as f:
        json.dump(dict(batch=BATCH, prompt=PROMPT, new_tokens=NEW, device_gib=DEVICE_GIB, models=MODELS,
                       precisions=PRECISIONS, rows=rows, not_run=missing), f, indent=1)
    print("\n".join(lines))


def breakdown(spec: dict, top: int, timeout: float) -> None:
    """Compile one row with XLA's dumps on and print the largest allocations of its buffer
    assignment (per device): which arrays make up `temp`. Not written to the results."""
    import glob
    import tempfile

    with tempfile.TemporaryDirectory(prefix="plan_memory_dump_") as d:
        r = run_row(spec, timeout, dump_to=d)
        print(json.dumps({k: v for k, v in r.items() if not k.startswith("global")}))
        for path in glob.glob(os.path.join(d, "*round_fn*memory-usage-report.txt")):
            with open(path) as f:
                print("".join(f.readlines()[: top + 4]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--budget-min", type=float, default=60.0, help="wall-time budget of this invocation (minutes)")
    p.add_argument("--row-timeout", type=float, default=1200.0, help="seconds before a row's compile is killed")
    p.add_argument("--models", nargs="*", choices=list(MODELS), help="only these models")
    p.add_argument("--devices", nargs="*", type=int, help="only these device counts")
    p.add_argument("--lora", action="store_true", help="only the LoRA / QLoRA rows (`lora_rows`)")
    p.add_argument("--fresh", action="store_true", help="forget the finished rows (delete the JSONL)")
    p.add_argument("--report", action="store_true", help="only rewrite the .md/.json from the JSONL")
    p.add_argument("--breakdown", metavar="JSON", help="compile one row spec, e.g. '{\"model\": \"Llama-3-8B\", "
                   "\"devices\": 64, \"precision\": \"bf16\", \"remat\": \"block\", \"micro_batches\": 1}', "
                   "and print its largest buffers (XLA's memory-usage report)")
    p.add_argument("--top", type=int, default=25, help="--breakdown: allocations to print")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))), flush=True)
        return
    if a.report:
        report(a)
        return
    if a.breakdown:
        spec = dict(pinned=False, opt=0, micro_batches=1)
        spec.update(json.loads(a.breakdown))
        breakdown(spec, a.top, a.row_timeout)
        return
    main_loop(a)


if __name__ == "__main__":
    main()
