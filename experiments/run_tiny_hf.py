"""End to end through the real-model path, from a fresh install:

    python experiments/run_tiny_hf.py [OUT_DIR]

builds a tiny random HF-format policy and reward model (Qwen2 layout, safetensors, a BPE
tokenizer with a ChatML template; experiments/make_tiny_hf.py), then runs

    xpo-jax train --policy OUT/policy --reward-model OUT/reward_model \\
        --prompts experiments/data/prompts_tiny.jsonl --rounds 5 ...

and then the same with a reward model that has its own tokenizer (judged on the host).
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from make_tiny_hf import main as make_tiny_hf  # noqa: E402


def main(out="/tmp/xpo_tiny_hf"):
    policy, rm = make_tiny_hf([os.path.join(out, "a")])
    _, other_rm = make_tiny_hf([os.path.join(out, "b"), "--vocab-size", "300", "--seed", "1"])
    prompts = os.path.join(HERE, "data", "prompts_tiny.jsonl")
    for name, judge in (("tiny-hf-fused", rm), ("tiny-hf-host-judge", other_rm)):
        cmd = [sys.executable, "-m", "xpo_jax", "train", "--policy", str(policy), "--reward-model", str(judge),
               "--prompts", prompts, "--rounds", "5", "--batch-size", "8", "--max-new-tokens", "16",
               "--max-prompt-length", "64", "--run-dir", os.path.join(out, "runs"), "--name", name,
               "--progress", "false"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
