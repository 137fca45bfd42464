"""Held-out evaluation of HF runs (`xpo_jax.hf.eval`): the policy against the reference on
prompts training never sees, scored by the training or a second reward model; the samples, the
summary and the plot; the input errors, raised before any weights are loaded."""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

import xpo_jax.hf.run as hf_run
from common import PROMPTS, hf_test_config, make_tiny_hf
from xpo_jax import parallel as par
from xpo_jax.parallel import Layout
from xpo_jax.hf.eval import Subset
from xpo_jax.hf.data import read_prompt_files
from xpo_jax.models.hf import load_hf, save_hf
from xpo_jax.run import build_run
from xpo_jax.train import Program, Trainer

EVAL_KEYS = ("eval/score", "eval/ref_score", "eval/win_rate", "eval/bt_win_prob", "eval/kl", "eval/length",
             "eval/eos_rate", "eval/ref_length", "eval/ref_eos_rate")


def even_token_reward_model(src, dst, scale=10.0):
    """A reward model that prefers the even token ids, written as an HF checkpoint.

    Built from the tiny RM's config with hand-set weights (everything else zero):
      - embedding of token i: the one-hot e_0 when i is even, e_1 when odd;
      - layer 0 attention: q and k zero, so every position attends uniformly to all real tokens
        before it; v reads e_0 (scaled by 1/sqrt(D) to undo the input RMSNorm), so at the last
        token the attention output is f = the fraction of even ids in concat(prompt, response);
        o_proj writes f into residual dimension 2;
      - every other block's output projection is zero, norm scales are one: the last token's
        residual is e_{0 or 1} + f e_2, and after the final RMSNorm dimension 2 holds
        sqrt(D) f / sqrt(1 + f^2);
      - score reads dimension 2 times scale / sqrt(D):  r(x, y) = scale * f / sqrt(1 + f^2),
        strictly increasing in the number of even ids of the response.
    Why a half of the vocabulary rather than one token: the random tiny policy samples any one
    token with probability ~1/V, too rarely for a few rounds to find it; a half is in every
    response, so every pair carries a preference."""
    config, params, _ = load_hf(src)
    p = jax.tree_util.tree_map(lambda x: np.zeros_like(np.asarray(x)), params)
    V, D = p["model"]["embed_tokens"]["embedding"].shape
    p["model"]["embed_tokens"]["embedding"][np.arange(V), np.arange(V) % 2] = 1.0
    for layer in ("layers_0", "layers_1"):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            p["model"][layer][norm]["scale"][:] = 1.0
    p["model"]["norm"]["scale"][:] = 1.0
    attn = p["model"]["layers_0"]["self_attn"]
    attn["v_proj"]["kernel"][0, 0] = 1.0 / np.sqrt(D)
    attn["o_proj"]["kernel"][0, 2] = 1.0
    p["score"]["kernel"][2, 0] = scale / np.sqrt(D)
    with open(os.path.join(src, "config.json")) as f:
        ids = {k: v for k, v in json.load(f).items() if k in ("eos_token_id", "pad_token_id", "bos_token_id")}
    save_hf(dst, config, p, kind="reward_model", extra_config=ids)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(src, f), dst)
    return dst


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf_eval")
    policy, rm = make_tiny_hf(base / "a")
    _, other_rm = make_tiny_hf(base / "b", "--vocab-size", "300", "--seed", "1")
    even_rm = even_token_reward_model(str(rm), str(base / "even_rm"))
    return policy, rm, other_rm, even_rm, base


def eval_rows(path):
    return [r for r in (json.loads(l) for l in open(path)) if "eval/win_rate" in r]


def test_the_even_token_reward_model_scores_what_it_says(dirs):
    from xpo_jax.models.transformer import RewardModel

    *_, even_rm, _ = dirs
    config, params, _ = load_hf(even_rm)
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (4, 12)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[:, :3] = 0
    f = ((tokens % 2 == 0) & (mask > 0)).sum(-1) / mask.sum(-1)
    np.testing.assert_allclose(jax.jit(RewardModel(config).apply)({"params": params}, tokens, mask),
                               10 * f / np.sqrt(1 + f * f), rtol=1e-4)


def test_held_out_win_rate_rises_under_a_token_preferring_reward_model(dirs):
    """Round 0: the policy is the reference, same keys: every pair ties (win rate exactly 0.5,
    KL exactly 0). Six rounds against a reward model that prefers even ids take the held-out win
    rate well above 0.5; samples.jsonl, the summary and the plot are written."""
    policy, _, _, even_rm, base = dirs
    cfg = hf_test_config(policy, even_rm, base, "even", rounds=6, eval_every=3, batch_size=8, learning_rate=1e-2,
                         updates_per_round=4, bradley_terry=False, eval_fraction=0.5, eval_temperature=1.0)
    t = Trainer(cfg)
    # The split: training reads the first half of the file only, the evaluation the second half.
    everything = read_prompt_files([PROMPTS])
    source = t.run_.prompts.iterator.source
    assert isinstance(source, Subset) and len(source) == 32
    assert t.run_.evaluator.held_out.rows == everything[32:] and list(source.__getitems__(range(32))) == everything[:32]
    t.run()
    out = base / "even"
    rows = eval_rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 3, 6]
    first, last = rows[0], rows[-1]
    assert set(EVAL_KEYS) <= set(first)
    assert first["eval/win_rate"] == 0.5 and first["eval/kl"] == 0.0 and first["eval/bt_win_prob"] == 0.5
    assert first["eval/score"] == first["eval/ref_score"]
    assert last["eval/ref_score"] == first["eval/ref_score"]  # the reference's pass is computed once
    assert last["eval/win_rate"] >= 0.8, last
    assert last["eval/score"] > last["eval/ref_score"] and last["eval/bt_win_prob"] > 0.5

    samples = [json.loads(l) for l in open(out / "samples.jsonl")]
    assert [s["round"] for s in samples] == [0] * 4 + [3] * 4 + [6] * 4
    assert set(samples[0]) == {"round", "prompt", "policy", "reference", "policy_score", "reference_score"}
    assert all(s["policy"] == s["reference"] and s["policy_score"] == s["reference_score"] for s in samples[:4])
    assert samples[0]["prompt"] == everything[32]  # a plain-string prompt as is

    summary = json.load(open(out / "summary.json"))
    assert summary["final_eval_win_rate"] == last["eval/win_rate"] and summary["eval_prompts"] == 32
    md = open(out / "summary.md").read()
    assert "Held-out evaluation: 32 prompts" in md and "| 0 | " in md and "| 6 | " in md
    assert "Samples at round 6" in md and "| prompt | reference | policy (round 6) |" in md
    assert os.path.getsize(out / "curve.png") > 10_000
    print("seconds per evaluation (first includes compiling):", [round(s, 3) for s in t.run_.evaluator.seconds])


def test_eval_on_a_4x2_mesh_matches_one_device_with_a_second_judge(dirs, tmp_path):
    """--eval-prompts and --eval-reward-model with another tokenizer (re-encoded on the host
    between the sampling and the scoring program), through the Trainer's Program on each mesh:
    the 4 x 2 mesh gives the one-device metrics, at round 0 and for a policy that moved."""
    policy, rm, other_rm, _, base = dirs
    held = tmp_path / "held_out.jsonl"
    lines = [{"prompt": "Name three primary colours."}, {"prompt": "What is a prime number?"},
             {"messages": [{"role": "user", "content": "Suggest a name for a cat."}]},
             {"prompt": "Write one line about the sea."}, {"prompt": "Count to five."}]
    held.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = hf_test_config(policy, rm, base, "eval-mesh", eval_every=1, batch_size=8, eval_prompts=str(held),
                         eval_reward_model=str(other_rm), eval_samples=3)
    results = []
    for mesh in (par.make_mesh(1, 1, devices=jax.devices()[:1]), par.make_mesh(4, 2)):
        layout = Layout(mesh)
        run = build_run(cfg, layout)
        assert run.oracle is not None and run.evaluator.judge.host is not None
        prog = Program(run, layout)
        state = prog.init(jax.random.PRNGKey(cfg.seed), run.hparams())
        at0, samples0 = prog.evaluate(state, 0)
        # Another policy: every weight scaled by 1.5 (elementwise: the shardings are kept).
        moved = state.replace(params=jax.tree.map(lambda p: p * 1.5, state.params))
        at1, samples1 = prog.evaluate(moved, 1)
        results.append((at0, at1))
        assert at0["eval/win_rate"] == 0.5 and at0["eval/kl"] == 0.0 and at0["eval/score"] == at0["eval/ref_score"]
        assert at1["eval/kl"] != 0.0 and at1["eval/ref_score"] == at0["eval/ref_score"]
        assert [s["prompt"] for s in samples1] == [lines[0]["prompt"], lines[1]["prompt"],
                                                   "user: Suggest a name for a cat."]  # a chat as role: content
    for a, b in zip(*results):
        assert set(EVAL_KEYS) == set(a) == set(b)
        for k in EVAL_KEYS:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)


def test_input_errors_name_the_flag_before_any_weights_load(dirs, tmp_path, monkeypatch):
    policy, rm, other_rm, even_rm, base = dirs

    def no_load(*a, **k):
        raise AssertionError("weights were loaded before the inputs were checked")

    monkeypatch.setattr(hf_run, "load_hf", no_load)
    cfg = hf_test_config(policy, rm, tmp_path, "errors", eval_every=1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="--eval-prompts=.*empty.jsonl.*no prompts"):
        build_run(dataclasses.replace(cfg, eval_prompts=str(empty)))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 200}) + "\n")
    with pytest.raises(ValueError, match="--eval-prompts=.*long.jsonl.*no usable prompt"):
        build_run(dataclasses.replace(cfg, eval_prompts=str(long), truncation="drop"))
    with pytest.raises(ValueError, match="--eval-prompts: no file matches"):
        build_run(dataclasses.replace(cfg, eval_prompts=str(tmp_path / "missing.jsonl")))
    for f in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="--eval-fraction=.*must be in \\[0, 1\\)"):
            build_run(dataclasses.replace(cfg, eval_fraction=f))
    with pytest.raises(ValueError, match="--eval-fraction=0.95 .* leaving 3 for training: fewer than one batch"):
        build_run(dataclasses.replace(cfg, eval_fraction=0.95))
    with pytest.raises(ValueError, match="--eval-fraction=.*contradicts --eval-prompts"):
        build_run(dataclasses.replace(cfg, eval_fraction=0.1, eval_prompts=PROMPTS))
    with pytest.raises(ValueError, match="--eval-reward-model=.*needs a held-out set"):
        build_run(dataclasses.replace(cfg, eval_reward_model=str(other_rm)))
    with pytest.raises(ValueError, match="--policy=None: is required with --eval-prompts"):
        build_run(dataclasses.replace(cfg, policy=None, reward_model=None, prompts=None, eval_prompts=PROMPTS))
    # Another vocabulary and no tokenizer: its ids cannot be scored, nor its text re-encoded.
    bare = tmp_path / "bare_rm"
    shutil.copytree(other_rm, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(ValueError, match="--eval-reward-model=.*bare_rm.*no tokenizer.json.*vocabulary \\(300 ids\\) "
                                         "differs from the policy's \\(512\\)"):
        build_run(dataclasses.replace(cfg, eval_fraction=0.1, eval_reward_model=str(bare)))
    # The same vocabulary without a tokenizer reads the policy's ids: scored inside the program.
    monkeypatch.undo()
    same = tmp_path / "same_rm"
    shutil.copytree(even_rm, same, ignore=shutil.ignore_patterns("tokenizer*"))
    run = build_run(dataclasses.replace(cfg, eval_fraction=0.1, eval_reward_model=str(same)))
    assert run.evaluator.judge.host is None and run.evaluator.judge.name == str(same)
    assert run.evaluator.num_prompts == 7 and len(run.prompts.iterator.source) == 57
