"""Issue 12's fault probe ("nothing lost, nothing hung, nothing silently wrong"): one test per case.

Data lost or mixed
    path-like --name refused; --overwrite deletes nothing outside the run dir
                                          test_path_like_names_are_refused_and_overwrite_deletes_nothing_outside
    a crash between checkpoints: --resume trims metrics.jsonl and TensorBoard to the restored
    round, survives a torn last line, time/elapsed_s continues
                                          test_crash_between_checkpoints_resume_trims_metrics_and_tensorboard
    SIGKILL at random rounds (a real `python -m xpo_jax train`), then SIGTERM, resumed each time:
    every round once, the uninterrupted run's parameters bitwise; SIGTERM exits 75, a finished run 0
                                          test_sigkill_and_sigterm_at_random_rounds_lose_and_repeat_nothing
    the meshed path refuses a rerun of a name          test_meshed_rerun_of_a_name_is_refused
    (SIGTERM on a mesh saves and exits 75: tests/test_train.py::test_sigterm_on_a_mesh_saves_exits_75_and_resumes)
A documented example that crashes
    the caller's key and hparams survive a donated round (1 device, 4x2)
                                          test_caller_key_and_hparams_survive_a_donated_round
Hangs
    --truncation drop with prompts that never fit      test_truncation_drop_with_prompts_that_never_fit_stops
Silently wrong
    resume with an edited prompt file                  test_resume_with_an_edited_prompt_file_is_refused_naming_it
    corrupt checkpoint bytes: fallback, then a clear error; the NaN message names the restored one
                                          test_corrupt_checkpoints_fall_back_then_fail_clearly
    tokenizer larger than the model                    test_cli_input_errors[tokenizer-larger-than-model]
    sample() with bad prompts: tests/test_sampling.py (test_bad_prompt_shapes_raise,
    test_prompt_ids_outside_vocabulary_raise, test_right_padded_mask_raises, ...)
    --resume without a checkpoint; --resume --overwrite
                                          test_resume_without_a_checkpoint_starts_at_round_1_and_no_message_says_round_none,
                                          test_cli_input_errors[resume-and-overwrite]
Errors that come late or raw (one line, exit 2, before anything compiles)
                                          test_cli_input_errors[*] (resume config mismatch, a changed
                                          shape option, unwritable / file run dir, batch vs mesh, missing
                                          prompt file, policy dir without config.json / tokenizer.json,
                                          truncated safetensors, negative numbers, binary prompt file),
                                          test_resume_check_covers_every_shape_determining_option
    a config that cannot fit memory                    test_memory_check_refuses_a_batch_that_cannot_fit
    a renamed / copied run dir and a trailing '/'     test_resume_accepts_a_renamed_run_dir_and_a_trailing_slash
Also
    a resumed run compiles its round once              test_a_resumed_run_compiles_its_round_once
    exit codes 75 / 0 documented                       test_exit_codes_are_documented (and the SIGKILL test)
    no message says "round None"                       test_resume_without_a_checkpoint_starts_at_round_1_and_no_message_says_round_none

Speed: one Run (rounds=12, batch 8) is shared by every in-process test, whose round program is
then compiled once per session (the persistent compilation cache of conftest serves the later
Trainers and the subprocesses, which use the same flags). Curve plots are skipped in-process.
"""
import dataclasses
import glob
import itertools
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from common import PROMPTS, hf_test_config, make_tiny_hf, no_plots  # noqa: F401 (autouse fixture)

from xpo_jax import parallel as par
from xpo_jax.parallel import Layout
from xpo_jax import train as train_module
from xpo_jax.checkpoint import Checkpointer
from xpo_jax.cli import __doc__ as CLI_DOC
from xpo_jax.cli import main as cli_main
from xpo_jax.config import RESUME_MAY_DIFFER, TrainConfig
from xpo_jax.run import build_run
from xpo_jax.train import EXIT_INTERRUPTED, NonFiniteLoss, Program, Trainer

# The default task (hard-explore): its reference fine-tune is cached on disk for the session
# (conftest's $XPO_JAX_CACHE), so the subprocesses read it instead of building a model.
ROUNDS = 12
CFG = TrainConfig(rounds=ROUNDS, batch_size=8, eval_every=0, checkpoint_every=0, progress=False, tensorboard=False)
# The same run from the command line (the options that shape the program equal CFG's).
CLI_FLAGS = ["--rounds", str(ROUNDS), "--batch-size", "8", "--eval-every", "0", "--progress", "false",
             "--tensorboard", "false"]
# A tiny HF run whose round compiles once: --truncation is host-side, so "left" and "drop" share it.
HF_OPTS = {"rounds": 2, "batch_size": 4, "max_new_tokens": 4, "max_prompt_length": 4}
HF_FLAGS = ["--rounds", "2", "--batch-size", "4", "--max-new-tokens", "4", "--max-prompt-length", "4",
            "--eval-every", "0", "--checkpoint-every", "0", "--progress", "false", "--tensorboard", "false"]
FAST_S = 5.0  # an input error known before compiling comes within this (it takes well under a second)
ENV = dict(os.environ, PYTHONUNBUFFERED="1")

# Backend compiles by program name (the AOT compile and persistent-cache hits included).
COMPILES: list = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: COMPILES.append(kw.get("fun_name")) if name == "/jax/core/compile/backend_compile_duration"
    else None)
ROUND_PROGRAMS = {"jit(step)", "jit(round_fn)", "jit(make_pairs)", "jit(update)"}


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run():
    return build_run(CFG)


def one_device():
    return par.make_mesh(1, 1, devices=jax.devices()[:1])


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_bitwise(a, b):
    for x, y in zip(host(a), host(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def finished(run, tmp_path_factory):
    """An uninterrupted run of CFG (checkpoints kept: 10 and 12): (run dir, name, final state leaves,
    the one-device abstract state)."""
    base = tmp_path_factory.mktemp("finished")
    t = Trainer(dataclasses.replace(CFG, run_dir=str(base), name="done", checkpoint_every=2), run=run)
    t.run()
    return {"run_dir": base, "name": "done", "state": host(t.state), "abstract": t.program.abstract_state}


def latest(ckpt_dir, every: bool = False):
    """The newest checkpoint's round (every=True: all rounds, newest first)."""
    ckpt = Checkpointer(str(ckpt_dir))
    try:
        return ckpt.all_rounds() if every else ckpt.latest_round()
    finally:
        ckpt.close()


def rows_of(path) -> list:
    """The complete JSON lines of a metrics.jsonl (a line being written is skipped)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def tensorboard_steps(out, tag: str) -> tuple[list, list]:
    """(events files, steps of `tag` over all of them), read from the TFRecord framing."""
    from tensorboardX.proto import event_pb2

    files = sorted(glob.glob(os.path.join(out, "events.out.tfevents*")))
    steps = []
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i + 12 <= len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return files, steps


def poison_at(trainer: Trainer, call: int, how: str = "nan"):
    """Make the `call`-th round of `trainer` produce a NaN loss (how="nan") or crash (how="crash")."""
    real = trainer.program.step
    calls = []

    def step(state, *args):
        calls.append(1)
        if len(calls) == call and how == "crash":
            raise RuntimeError("simulated crash")
        state, m = real(state, *args)
        if len(calls) == call:
            m = dict(m, loss=m["loss"] * float("nan"))
        return state, m

    trainer.program.step = step


def cli(argv, capsys):
    """(exit status, stderr, seconds, round programs compiled) of `xpo-jax train ARGV` in-process."""
    capsys.readouterr()
    n = len(COMPILES)
    t0 = time.perf_counter()
    rc = cli_main(["train", *argv])
    seconds = time.perf_counter() - t0
    return rc, capsys.readouterr().err, seconds, [c for c in COMPILES[n:] if c in ROUND_PROGRAMS]


def assert_one_line_error(err: str, *fragments: str) -> None:
    """stderr holds one `xpo-jax train: error: ...` line (and no traceback) with every fragment.
    (Other stderr output, e.g. TFDS progress bars while a prompt file is prepared, may precede it.)"""
    prefix = "xpo-jax train: error: "
    assert err.count(prefix) == 1 and "Traceback" not in err, err
    line = err[err.index(prefix):]
    assert "\n" not in line.rstrip("\n"), line
    for f in fragments:
        assert f in line, (f, line)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Tiny HF checkpoints (policy and reward model share a 512-token tokenizer)."""
    base = tmp_path_factory.mktemp("hf")
    policy, rm = make_tiny_hf(base / "tiny")
    return {"base": base, "policy": str(policy), "rm": str(rm)}


def hf_cfg(hf, run_dir, name, **kw):
    return hf_test_config(hf["policy"], hf["rm"], run_dir, name, **{**HF_OPTS, **kw})


def flip_bytes(path: str, offset: int, n: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = bytes(x ^ 0xFF for x in f.read(n))
        f.seek(offset)
        f.write(b)


def data_files(ckpt_dir, step) -> list:
    """The array data files orbax wrote for `step`, largest first."""
    files = glob.glob(os.path.join(ckpt_dir, str(step), "state", "ocdbt.process_*", "d", "*"))
    assert files, os.listdir(os.path.join(ckpt_dir, str(step), "state"))
    return sorted(files, key=os.path.getsize, reverse=True)


def corrupt_silently(ckpt_dir, step, abstract) -> None:
    """Flip one byte in the middle of the largest array file of checkpoint `step` at a place where
    the file still decodes (zstd has no checksum), so only the fingerprints can tell."""
    path = data_files(ckpt_dir, step)[0]
    size = os.path.getsize(path)
    for k in range(16):
        offset = size // 2 + 101 * k
        flip_bytes(path, offset)
        ckpt = Checkpointer(ckpt_dir)
        try:
            ckpt.restore(abstract, step, verify=False)
        except Exception:  # noqa: BLE001 - this byte broke the compression framing: try another
            flip_bytes(path, offset)
            continue
        finally:
            ckpt.close()
        return
    pytest.fail(f"no byte of {path} could be flipped silently")


# ----------------------------------------------------------------------------------------------
# Data lost or mixed
# ----------------------------------------------------------------------------------------------


def test_path_like_names_are_refused_and_overwrite_deletes_nothing_outside(run, tmp_path, capsys):
    """`--name ..` once made --overwrite delete <run_dir>/../checkpoints and metrics.jsonl."""
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    for f in ("metrics.jsonl", "summary.json", "curve.png"):
        (tmp_path / f).write_text("precious\n")
    runs = tmp_path / "runs"
    runs.mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"--name='\.\.': must be a plain name"):
        Trainer(dataclasses.replace(CFG, run_dir=str(runs), name="..", overwrite=True), run=run)
    for name in ("..", ".", "../x", "a/b", str(tmp_path), ".hidden", ""):
        rc, err, seconds, compiled = cli(["--run-dir", str(runs), "--name", name, "--overwrite", *CLI_FLAGS], capsys)
        assert rc == 2, name
        assert_one_line_error(err, "--name=", "no paths")
        assert seconds < FAST_S and not compiled
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "metrics.jsonl").read_text() == "precious\n"


def test_crash_between_checkpoints_resume_trims_metrics_and_tensorboard(run, finished, tmp_path):
    """Killed after round 5 with checkpoints at 2 and 4 (and a torn last line): the resumed run
    keeps rows 1-4, redoes 5-12, every round once in metrics.jsonl and TensorBoard, the clock
    continues, and the result is the uninterrupted run's, bitwise."""
    cfg = dataclasses.replace(CFG, run_dir=str(tmp_path), name="crash", checkpoint_every=2, tensorboard=True)
    t = Trainer(cfg, run=run)
    poison_at(t, 6, how="crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        t.run()
    out = tmp_path / "crash"
    before = rows_of(out / "metrics.jsonl")
    assert [r["round"] for r in before] == [1, 2, 3, 4, 5]
    assert latest(out / "checkpoints") == 4
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"loss": 0.25, "objective/kl": 0.0')  # a torn last line: the kill came mid-write
    resumed = Trainer(dataclasses.replace(cfg, resume=True), run=run)
    resumed.run()
    rows = rows_of(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert rows[:4] == before[:4]  # the kept rows are the first run's
    elapsed = [r["time/elapsed_s"] for r in rows]
    assert all(b > a for a, b in itertools.pairwise(elapsed)), elapsed  # continues, never restarts at 0
    files, steps = tensorboard_steps(out, "loss")
    assert len(files) == 1 and steps == list(range(1, ROUNDS + 1)), (files, steps)
    assert_bitwise(resumed.state, finished["state"])


def test_sigkill_and_sigterm_at_random_rounds_lose_and_repeat_nothing(finished, tmp_path, capsys):
    """`python -m xpo_jax train --checkpoint-every 2` SIGKILLed at two random rounds, then SIGTERMed
    at a third, resuming each time (one resume also finds a torn last line), then finished. At the
    end every round is in metrics.jsonl exactly once, the clock never went back, SIGTERM's exit
    status was 75 and the last run's 0, and the final parameters are the uninterrupted run's,
    bitwise. The SIGTERM phase runs the CLI in this process (a real signal to itself after the
    target round; `python -m xpo_jax` exits with main's status: the real exit code on a mesh is
    tests/test_train.py::test_sigterm_on_a_mesh_saves_exits_75_and_resumes); it saves a process
    start. (TensorBoard's rewrite is checked in-process above: tensorboardX imports cost each
    process seconds.)"""
    seed = int(os.environ.get("XPO_FAULT_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    why = f"(XPO_FAULT_SEED={seed})"
    out = tmp_path / "k"
    metrics, ckpt_dir = out / "metrics.jsonl", out / "checkpoints"
    args = [*CLI_FLAGS, "--checkpoint-every", "2", "--run-dir", str(tmp_path), "--name", "k"]
    last = 0
    for phase, how in enumerate(["kill", "kill", "term", "finish"]):
        saved = latest(ckpt_dir) if phase else None
        resume = ["--resume"] if phase else []
        target = min(rng.randint(last + 1, last + 3), ROUNDS - 3)  # leave rounds for the next phase
        assert how == "finish" or target > last, f"phase {phase}: the previous one ran to round {last} {why}"
        if how == "term":
            real_step = Program.step

            def step(self, state, data_key, round_idx, real_step=real_step, target=target):
                out = real_step(self, state, data_key, round_idx)
                if round_idx + 1 == target:
                    os.kill(os.getpid(), signal.SIGTERM)
                return out

            capsys.readouterr()
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(Program, "step", step)
                rc = cli_main(["train", *args, *resume])
            log = capsys.readouterr().out
            assert rc == EXIT_INTERRUPTED, f"{why}\n{log}"
        else:
            proc = subprocess.Popen([sys.executable, "-m", "xpo_jax", "train", *args, *resume], env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if how == "kill":
                deadline = time.monotonic() + 120
                while proc.poll() is None and time.monotonic() < deadline:
                    rows = rows_of(metrics)
                    if rows and rows[-1]["round"] >= target:
                        break
                    time.sleep(0.01)
                assert proc.poll() is None, f"phase {phase} ended before round {target} {why}:\n{proc.communicate()[0]}"
                proc.send_signal(signal.SIGKILL)
            log, _ = proc.communicate(timeout=120)
            rc = proc.returncode
            assert rc == (-signal.SIGKILL if how == "kill" else 0), f"{why}\n{log}"
        if phase:
            expect = (f"resumed from {ckpt_dir}/{saved} " if saved is not None
                      else f"--resume: no checkpoint in {ckpt_dir}; starting at round 1")
            assert expect in log, f"{why}\n{log}"
        last = rows_of(metrics)[-1]["round"]
        if how == "term":
            assert last == target and f"signal: saved round {last}" in log, f"{why}\n{log}"
            assert latest(ckpt_dir) == last
        if phase == 0:
            with open(metrics, "a") as f:
                f.write('{"loss": 0.5, "rou')  # torn: a kill in the middle of a write
    rounds = [r["round"] for r in rows_of(metrics)]
    assert rounds == list(range(1, ROUNDS + 1)), f"{why} {rounds}"
    elapsed = [r["time/elapsed_s"] for r in rows_of(metrics)]
    assert all(b > a for a, b in itertools.pairwise(elapsed)), f"{why} {elapsed}"
    ckpt = Checkpointer(str(ckpt_dir))
    state, _, data = ckpt.restore(finished["abstract"], ROUNDS)
    ckpt.close()
    assert data["round"] == ROUNDS
    for a, b in zip(host(state), finished["state"], strict=True):
        np.testing.assert_array_equal(a, b, err_msg=why)


def test_meshed_rerun_of_a_name_is_refused(run, finished, capsys):
    """The same guards on a 4x2 mesh (the old meshed loop had none): a rerun of a name is refused
    without --resume / --overwrite, before anything is built, and the checkpoints stay. (SIGTERM on
    a mesh: tests/test_train.py::test_sigterm_on_a_mesh_saves_exits_75_and_resumes.)"""
    cfg = dataclasses.replace(CFG, run_dir=str(finished["run_dir"]), name=finished["name"])
    with pytest.raises(ValueError, match="holds an earlier run's output: pass --resume"):
        Trainer(cfg, mesh=par.make_mesh(4, 2), run=run)
    rc, err, seconds, compiled = cli(["--run-dir", str(finished["run_dir"]), "--name", finished["name"], "--data", "4",
                                      "--fsdp", "2", *CLI_FLAGS], capsys)
    assert rc == 2 and seconds < FAST_S and not compiled
    assert_one_line_error(err, "holds an earlier run's output", "--resume", "--overwrite")
    assert latest(finished["run_dir"] / finished["name"] / "checkpoints", every=True) == [12, 10]


# ----------------------------------------------------------------------------------------------
# A documented example that crashes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (4, 2)])
def test_caller_key_and_hparams_survive_a_donated_round(run, shape):
    """initial_state once stored the caller's key and hparams (and the reference as the policy):
    a donated round then deleted them (or refused to donate one buffer twice). Both ways of making
    a state, eagerly (`layout.place(run.init_state(key, hparams), ...)`, as the README's former
    example) and `Program.init`, with
    caller arrays uncommitted or already placed on the mesh. On one device the real round
    (`Program.step`); on 4x2 a donating program with the round's state shardings (the same
    aliasing, without compiling a second round)."""
    layout = Layout(one_device() if shape == (1, 1) else par.make_mesh(*shape))
    prog = Program(run, layout)
    data_key = jax.device_put(run.data_key(jax.random.PRNGKey(1)), layout.replicated)
    donate = jax.jit(lambda s: s, donate_argnums=0, out_shardings=prog.state_sharding)
    for placed in (False, True):
        for make in ("readme", "program"):
            key, hparams = jax.random.PRNGKey(0), run.hparams()
            if placed:
                key, hparams = jax.device_put((key, hparams), layout.replicated)
            if make == "readme":
                state = layout.place(run.init_state(key, hparams), prog.state_sharding)
            else:
                state = prog.init(key, hparams)
            if shape == (1, 1):
                new, _ = prog.step(state, data_key, 0)
            else:
                new = donate(state)
            assert state.rng.is_deleted()  # the round did donate its input
            assert not key.is_deleted(), (placed, make)
            assert not any(x.is_deleted() for x in jax.tree.leaves(hparams)), (placed, make)
            assert not any(x.is_deleted() for x in jax.tree.leaves(run.ref_params))
            np.asarray(key), jax.device_get(hparams)  # still readable
            del new


# ----------------------------------------------------------------------------------------------
# Silently wrong (HF prompt files), and a hang
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edited_prompts_run(hf, tmp_path_factory):
    """An HF run (on its own copy of the prompt file) stopped after round 1 with a checkpoint; it
    also compiles the tiny HF round for the --truncation drop subprocess below."""
    d = tmp_path_factory.mktemp("hfprompts")
    prompts = d / "prompts.jsonl"
    shutil.copy(PROMPTS, prompts)
    cfg = dataclasses.replace(hf_cfg(hf, d, "edited"), prompts=str(prompts))
    Trainer(cfg).run(stop_after=1)
    return cfg


def test_resume_with_an_edited_prompt_file_is_refused_naming_it(edited_prompts_run, capsys):
    cfg = edited_prompts_run
    with open(cfg.prompts, "a") as f:
        f.write('{"prompt": "one more line changes the data the saved position points into"}\n')
    rc, err, seconds, compiled = cli(["--policy", cfg.policy, "--reward-model", cfg.reward_model, "--prompts",
                                      cfg.prompts, "--run-dir", cfg.run_dir, "--name", cfg.name, "--resume", *HF_FLAGS],
                                     capsys)
    assert rc == 2 and not compiled and seconds < FAST_S
    assert_one_line_error(err, f"--prompts={cfg.prompts!r}", "changed since the checkpoint was saved")


def test_truncation_drop_with_prompts_that_never_fit_stops(hf, edited_prompts_run, tmp_path):
    """No prompt fits 4 tokens: a full pass over the file, then one line and exit 2, not an endless
    loop (in a subprocess, so a regression costs the timeout, not the session)."""
    cmd = [sys.executable, "-m", "xpo_jax", "train", "--policy", hf["policy"], "--reward-model", hf["rm"], "--prompts",
           PROMPTS, "--truncation", "drop", "--run-dir", str(tmp_path), "--name", "drop", *HF_FLAGS]
    try:
        p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=150, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"--truncation drop hung:\n{e.stdout}\n{e.stderr}")
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-4000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("xpo-jax train: error: ")]
    assert len(errors) == 1 and "--truncation drop: no prompt of a full pass over" in errors[0], p.stderr[-4000:]
    assert f"--prompts={PROMPTS!r}" in errors[0] and "--max-prompt-length=4" in errors[0]


# ----------------------------------------------------------------------------------------------
# Corrupt checkpoints
# ----------------------------------------------------------------------------------------------


def test_corrupt_checkpoints_fall_back_then_fail_clearly(run, finished, tmp_path, capsys):
    """Checkpoints 2, 4, 6; a byte of 6 flipped (it still decodes). --resume detects it by the
    fingerprints, says so, resumes from 4 and sets 6 aside; a NaN then calls round 4, never the
    corrupt 6, the last good checkpoint. A second resume redoes 5-12 (saving 6 again) and ends on
    the uninterrupted run's parameters, bitwise. Then every checkpoint corrupted: one clear error."""
    cfg = dataclasses.replace(CFG, run_dir=str(tmp_path), name="rot", checkpoint_every=2, keep_checkpoints=3)
    Trainer(cfg, run=run).run(stop_after=6)
    ckpt_dir = str(tmp_path / "rot" / "checkpoints")
    assert latest(ckpt_dir, every=True) == [6, 4, 2]
    corrupt_silently(ckpt_dir, 6, finished["abstract"])
    ckpt = Checkpointer(ckpt_dir)
    with pytest.raises(ValueError, match="checkpoint .*/6 is corrupt: 1 array"):
        ckpt.restore(finished["abstract"], 6)
    ckpt.close()

    resumed = Trainer(dataclasses.replace(cfg, resume=True), run=run)
    poison_at(resumed, 1)
    capsys.readouterr()
    with pytest.raises(NonFiniteLoss) as e:
        resumed.run()
    out = capsys.readouterr().out
    assert "skipped 1 newer checkpoint(s)" in out and "/6 is corrupt" in out and "resuming from round 4" in out, out
    assert f"set aside as {ckpt_dir}/corrupt-6" in out
    assert f"resumed from {ckpt_dir}/4 " in out
    assert "round 5: loss=nan" in str(e.value) and "last good checkpoint (round 4)" in str(e.value), str(e.value)
    assert "round 6" not in str(e.value) and "None" not in str(e.value)
    assert latest(ckpt_dir, every=True) == [4, 2] and os.path.isdir(f"{ckpt_dir}/corrupt-6")

    again = Trainer(dataclasses.replace(cfg, resume=True), run=run)
    again.run()
    assert latest(ckpt_dir, every=True) == [12, 10, 8]
    assert [r["round"] for r in rows_of(tmp_path / "rot" / "metrics.jsonl")] == list(range(1, ROUNDS + 1))
    assert_bitwise(again.state, finished["state"])

    # When no checkpoint verifies: one clear error (exit 2 from the CLI), nothing set aside.
    for step in (12, 10, 8):
        path = data_files(ckpt_dir, step)[0]
        flip_bytes(path, os.path.getsize(path) // 2, 64)
    rc, err, _, _ = cli(["--run-dir", str(tmp_path), "--name", "rot", "--resume", "--checkpoint-every", "2",
                         "--keep-checkpoints", "3", *CLI_FLAGS], capsys)
    assert rc == 2
    assert_one_line_error(err, f"no checkpoint in {ckpt_dir} verifies", "12: ", "10: ", "8: ")
    assert latest(ckpt_dir, every=True) == [12, 10, 8]


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------


def test_resume_without_a_checkpoint_starts_at_round_1_and_no_message_says_round_none(run, tmp_path, capsys):
    """--resume on a name with no checkpoint says so and starts at round 1; a NaN before any
    checkpoint says that none was saved (once: "the last good checkpoint (round None)")."""
    t = Trainer(dataclasses.replace(CFG, run_dir=str(tmp_path), name="fresh", resume=True), run=run)
    poison_at(t, 2)
    capsys.readouterr()
    with pytest.raises(NonFiniteLoss) as e:
        t.run()
    out = capsys.readouterr().out
    assert f"--resume: no checkpoint in {tmp_path / 'fresh' / 'checkpoints'}; starting at round 1" in out
    assert [r["round"] for r in rows_of(tmp_path / "fresh" / "metrics.jsonl")] == [1]
    assert "round 2: loss=nan" in str(e.value) and "no checkpoint was saved yet" in str(e.value), str(e.value)
    assert "None" not in str(e.value) and "None" not in out.replace("null", "")
    assert latest(tmp_path / "fresh" / "checkpoints") is None


@pytest.fixture(scope="module")
def moved_resume(run, tmp_path_factory):
    """A fresh run stopped after round 4, its run dir copied under another name, resumed from
    there with a trailing '/' on --run-dir; with the round programs each Trainer compiled."""
    d = tmp_path_factory.mktemp("moved")
    compiled = []
    n = len(COMPILES)
    Trainer(dataclasses.replace(CFG, run_dir=str(d / "a"), name="orig"), run=run).run(stop_after=4)
    compiled.append([c for c in COMPILES[n:] if c in ROUND_PROGRAMS])
    shutil.copytree(d / "a" / "orig", d / "b" / "copy")
    n = len(COMPILES)
    t = Trainer(dataclasses.replace(CFG, run_dir=str(d / "b") + "/", name="copy", resume=True), run=run)
    t.run()
    compiled.append([c for c in COMPILES[n:] if c in ROUND_PROGRAMS])
    return {"out": d / "b" / "copy", "state": host(t.state), "compiled": compiled}


def test_resume_accepts_a_renamed_run_dir_and_a_trailing_slash(moved_resume, finished):
    """name and run_dir are where a run lives, not what it computes: a run dir copied under
    another name and given with a trailing '/' resumes, and ends where the uninterrupted run did."""
    assert [r["round"] for r in rows_of(moved_resume["out"] / "metrics.jsonl")] == list(range(1, ROUNDS + 1))
    for a, b in zip(moved_resume["state"], finished["state"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_resumed_run_compiles_its_round_once(moved_resume):
    """A resumed Trainer compiles the round exactly as often as a fresh one: once (the restored
    state has the shardings the ahead-of-time executable was compiled for)."""
    assert moved_resume["compiled"] == [["jit(step)"], ["jit(step)"]], moved_resume["compiled"]


def test_resume_check_covers_every_shape_determining_option(run):
    """Orbax can only fail on a shape mismatch if an option that shapes the state may change on
    resume. Those that may: none changes a state shape or dtype (mesh options change only the
    layout, which orbax reshards)."""
    allowed = {"rounds", "resume", "overwrite", "progress", "tensorboard", "checkpoint_every", "keep_checkpoints",
               "eval_every", "eval_samples", "name", "run_dir", "data", "fsdp", "tensor", "accept_changed_models"}
    assert RESUME_MAY_DIFFER == allowed  # a new entry needs a reason here
    def shapes(tree):
        return [(jax.tree_util.keystr(p), x.shape, x.dtype) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]

    base = shapes(run.state_shapes())
    other = build_run(dataclasses.replace(CFG, rounds=3, eval_every=1, checkpoint_every=1, keep_checkpoints=5))
    assert shapes(other.state_shapes()) == base
    for mesh in (one_device(), par.make_mesh(4, 2), par.make_mesh(8, 1)):
        assert shapes(Program(run, mesh).abstract_state) == base


# ----------------------------------------------------------------------------------------------
# Errors that come late or raw: one line, exit 2, before anything compiles
# ----------------------------------------------------------------------------------------------


def _unwritable(tmp_path) -> str:
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o500)
    if not os.access(d, os.W_OK):
        return str(d / "runs")
    # root writes anywhere a mode allows nothing: use a read-only mount when there is one
    for p in ("/proc/sys", "/sys/fs/cgroup"):
        if os.path.isdir(p) and not os.access(p, os.W_OK):
            return os.path.join(p, "xpo_runs")
    pytest.skip("no unwritable directory for this user")


def _vocab_larger_than_model(hf) -> str:
    """A self-consistent checkpoint with 300 embeddings and the 512-token tokenizer."""
    from safetensors.numpy import load_file, save_file

    d = hf["base"] / "small_vocab"
    if not d.exists():
        shutil.copytree(hf["policy"], d)
        tensors = load_file(d / "model.safetensors")
        tensors["model.embed_tokens.weight"] = np.ascontiguousarray(tensors["model.embed_tokens.weight"][:300])
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    return str(d)


def _policy_without(hf, name) -> str:
    d = hf["base"] / f"no_{name}"
    if not d.exists():
        shutil.copytree(hf["policy"], d)
        os.remove(d / name)
    return str(d)


def _truncated_weights(hf) -> str:
    d = hf["base"] / "truncated"
    if not d.exists():
        shutil.copytree(hf["policy"], d)
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return str(d)


def _binary_prompts(tmp_path) -> str:
    f = tmp_path / "prompts.jsonl"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe" * 8)
    return str(f)


# case -> (needs: "finished" | "hf" | None, argv builder (fixture value, tmp_path), expected fragments)
CLI_CASES = {
    "resume-config-mismatch": ("finished", lambda f, t: [
        "--run-dir", str(f["run_dir"]), "--name", f["name"], "--resume", "--alpha", "0.5", *CLI_FLAGS],
        ["--resume with settings that differ", "--alpha was 0.005, now 0.5"]),
    "resume-shape-option-changed": ("finished", lambda f, t: [
        "--run-dir", str(f["run_dir"]), "--name", f["name"], "--resume", "--replay-capacity", "16",
        "--replay-batch-size", "8", *CLI_FLAGS],
        ["--replay-capacity was 0, now 16", "--replay-batch-size was 0, now 8"]),
    "resume-and-overwrite": (None, lambda f, t: ["--run-dir", str(t), "--resume", "--overwrite", *CLI_FLAGS],
                             ["--overwrite=True: contradicts --resume"]),
    "run-dir-unwritable": (None, lambda f, t: ["--run-dir", _unwritable(t), *CLI_FLAGS], ["--run-dir=", "not writable"]),
    "run-dir-is-a-file": (None, lambda f, t: ["--run-dir", str(_a_file(t)), *CLI_FLAGS],
                          ["--run-dir=", "is a file, not a directory"]),
    "batch-vs-data-x-fsdp": (None, lambda f, t: ["--run-dir", str(t), "--data", "4", "--fsdp", "2", *CLI_FLAGS,
                                                 "--batch-size", "12"],
                             ["--batch-size=12 must be divisible by the mesh's 8 batch shards (data 4 x fsdp 2)"]),
    "batch-vs-mesh": (None, lambda f, t: ["--run-dir", str(t), "--fsdp", "2", *CLI_FLAGS, "--batch-size", "12"],
                      ["--batch-size=12 must be divisible by the mesh's 8 batch shards (data 4 x fsdp 2)"]),
    "missing-prompt-file": ("hf", lambda h, t: ["--policy", h["policy"], "--reward-model", h["rm"], "--prompts",
                                                str(t / "nope.jsonl"), "--run-dir", str(t), *HF_FLAGS],
                            ["--prompts: no file matches", "nope.jsonl"]),
    "policy-without-config-json": ("hf", lambda h, t: ["--policy", _policy_without(h, "config.json"), "--reward-model",
                                                       h["rm"], "--prompts", PROMPTS, "--run-dir", str(t), *HF_FLAGS],
                                   ["--policy=", "no_config.json", "no config.json in it"]),
    "policy-without-tokenizer-json": ("hf", lambda h, t: ["--policy", _policy_without(h, "tokenizer.json"),
                                                          "--reward-model", h["rm"], "--prompts", PROMPTS, "--run-dir",
                                                          str(t), *HF_FLAGS],
                                      ["--policy=", "no_tokenizer.json", "no tokenizer.json in it"]),
    "truncated-safetensors": ("hf", lambda h, t: ["--policy", _truncated_weights(h), "--reward-model", h["rm"],
                                                  "--prompts", PROMPTS, "--run-dir", str(t), *HF_FLAGS],
                              ["--policy=", "truncated", "model.safetensors"]),
    "tokenizer-larger-than-model": ("hf", lambda h, t: ["--policy", _vocab_larger_than_model(h), "--reward-model",
                                                        h["rm"], "--prompts", PROMPTS, "--run-dir", str(t), *HF_FLAGS],
                                    ["--policy=", "small_vocab", "the tokenizer has 512 tokens but the model only 300"]),
    "binary-prompt-file": ("hf", lambda h, t: ["--policy", h["policy"], "--reward-model", h["rm"], "--prompts",
                                               _binary_prompts(t), "--run-dir", str(t), *HF_FLAGS],
                           ["prompts.jsonl: line 1: not UTF-8 text", "binary file"]),
    "negative-learning-rate": (None, lambda f, t: ["--run-dir", str(t), "--learning-rate", "-1e-3", *CLI_FLAGS],
                               ["--learning-rate=-0.001: must be finite and > 0"]),
    "negative-alpha": (None, lambda f, t: ["--run-dir", str(t), "--alpha", "-1e-3", *CLI_FLAGS],
                       ["--alpha=-0.001: must be finite and >= 0"]),
}
XFAIL: dict = {}  # cases expected to fail, with (reason, exception): none left


def _a_file(tmp_path):
    f = tmp_path / "not_a_dir"
    f.write_text("")
    return f


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(reason=XFAIL[c][0], raises=XFAIL[c][1],
                                                                           strict=True))
                                  if c in XFAIL else c for c in CLI_CASES])
def test_cli_input_errors(case, request, tmp_path, capsys):
    """Each input error: `xpo-jax train: error: ...` on one line naming the flag or file, exit
    status 2, within seconds and before the round compiles (nothing raw, nothing late)."""
    needs, argv, fragments = CLI_CASES[case]
    value = request.getfixturevalue(needs) if needs else None
    rc, err, seconds, compiled = cli(argv(value, tmp_path), capsys)
    assert rc == 2, err
    assert_one_line_error(err, *fragments)
    assert seconds < FAST_S, seconds
    assert not compiled, compiled


def test_memory_check_refuses_a_batch_that_cannot_fit(tmp_path, capsys):
    """Validation cannot know it; the ahead-of-time compile's memory analysis can, before any
    state is allocated or any file written."""
    rc, err, _, _ = cli(["--run-dir", str(tmp_path), "--name", "huge", *CLI_FLAGS, "--batch-size", "100000000"], capsys)
    assert rc == 2
    assert_one_line_error(err, "--batch-size=100000000: one round program needs", "GiB per device",
                          "lower --batch-size")
    assert not (tmp_path / "huge").exists()


# ----------------------------------------------------------------------------------------------
# Also
# ----------------------------------------------------------------------------------------------


def test_exit_codes_are_documented():
    assert EXIT_INTERRUPTED == 75
    assert "75 stopped by SIGTERM" in " ".join(CLI_DOC.split()) and "0 finished" in CLI_DOC
    assert "EXIT_INTERRUPTED (75)" in train_module.__doc__ and "a finished run exits 0" in train_module.__doc__


# ----------------------------------------------------------------------------------------------
# Issue 19: the second fault probe
# ----------------------------------------------------------------------------------------------

from common import ROOT  # noqa: E402

RUNDIR_PY = os.path.join(ROOT, "xpo_jax", "rundir.py")
# xpo_jax/rundir.py alone (no jax import: a process starts in a fraction of a second): argv
# [rundir.py, run dir, seconds to hold]; prints "won" (then holds) or "refused: <message>".
LOCKER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("rundir_alone", sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
lock = m.RunDirLock(sys.argv[2])
try:
    lock.acquire()
except m.RunDirLocked as e:
    print("refused:", e, flush=True)
else:
    print("won", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def locker(out, hold: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOCKER, RUNDIR_PY, str(out), str(hold)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_cli(command, argv, capsys):
    """(exit status, stderr, seconds, round programs compiled) of `xpo-jax COMMAND ARGV` in-process."""
    capsys.readouterr()
    n = len(COMPILES)
    t0 = time.perf_counter()
    rc = cli_main([command, *argv])
    seconds = time.perf_counter() - t0
    return rc, capsys.readouterr().err, seconds, [c for c in COMPILES[n:] if c in ROUND_PROGRAMS]


def one_line(err: str, command: str, *fragments: str) -> None:
    prefix = f"xpo-jax {command}: error: "
    assert err.count(prefix) == 1 and "Traceback" not in err, err
    line = err[err.index(prefix):]
    assert "\n" not in line.rstrip("\n"), line
    for f in fragments:
        assert f in line, (f, line)


def test_a_second_process_on_a_run_dir_refuses_at_once_naming_the_holder(run, tmp_path, capsys):
    """Two processes on one name once lost metrics (or hung): the second refuses at once, naming
    the holder's pid and host (train and sweep alike); a holder killed with SIGKILL leaves a stale
    lock that the next run takes over; a Trainer that refuses leaves no lock behind."""
    import socket

    from xpo_jax.rundir import lock_path

    out = tmp_path / "busy"
    holder = locker(out, 120)
    try:
        assert holder.stdout.readline().strip() == "won"
        for command in ("train", "sweep"):
            rc, err, seconds, compiled = run_cli(command, ["--run-dir", str(tmp_path), "--name", "busy", *CLI_FLAGS],
                                                 capsys)
            assert rc == 2 and seconds < FAST_S and not compiled, err
            one_line(err, command, "is in use by another process", f"pid {holder.pid}", socket.gethostname())
    finally:
        holder.kill()
        holder.wait()
    assert os.path.exists(lock_path(str(out)))  # SIGKILL: nothing released it
    capsys.readouterr()
    t = Trainer(dataclasses.replace(CFG, run_dir=str(tmp_path), name="busy"), run=run)
    assert "took over the stale lock" in capsys.readouterr().out
    assert json.loads(open(lock_path(str(out))).read())["pid"] == os.getpid()
    t.lock.release()
    assert not os.path.exists(lock_path(str(out)))
    (out / "metrics.jsonl").parent.mkdir(exist_ok=True)
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="holds an earlier run's output"):
        Trainer(dataclasses.replace(CFG, run_dir=str(tmp_path), name="busy"), run=run)
    assert not os.path.exists(lock_path(str(out)))  # released on the error path


def test_a_stale_lock_is_taken_over_by_exactly_one_of_four(tmp_path):
    """A lock left by a dead process, four processes starting at once: one wins, three refuse
    naming the winner (the takeover re-checks the lock under its own exclusive file)."""
    from xpo_jax.rundir import lock_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "stale"
    with open(lock_path(str(out)), "w") as f:
        json.dump({"pid": dead.pid, "host": __import__("socket").gethostname(), "token": "old"}, f)
    procs = [locker(out, 5) for _ in range(4)]
    lines = [next(line.strip() for line in p.stdout if not line.startswith("note: took over")) for p in procs]
    for p in procs:
        p.kill()
        p.wait()
    assert sum(line == "won" for line in lines) == 1, lines
    winner = procs[lines.index("won")].pid
    assert all(f"pid {winner}" in line for line in lines if line != "won"), lines


def test_sweep_follows_the_name_rules(tmp_path, capsys):
    """A sweep rerun on a name once silently replaced sweep.csv / sweep.json: refused without
    --overwrite, --resume refused (a sweep has no checkpoints), --overwrite clears the outputs."""
    from xpo_jax.sweeps import claim_sweep_dir

    out = tmp_path / "sw"
    out.mkdir()
    (out / "sweep.json").write_text("{}")
    (out / "sweep.csv").write_text("alpha\n")
    base = ["--run-dir", str(tmp_path), "--name", "sw", "--rounds", "2", "--batch-size", "8"]
    for extra, fragment in (([], "holds an earlier sweep's output (sweep.csv, sweep.json): pass --overwrite"),
                            (["--resume"], "--resume: a sweep is one compiled program without checkpoints")):
        rc, err, seconds, compiled = run_cli("sweep", [*base, *extra], capsys)
        assert rc == 2 and seconds < FAST_S and not compiled, err
        one_line(err, "sweep", fragment)
    assert (out / "sweep.json").read_text() == "{}"
    lock = claim_sweep_dir(TrainConfig(run_dir=str(tmp_path), name="sw", overwrite=True))
    lock.release()
    assert not (out / "sweep.json").exists() and not (out / "sweep.csv").exists()


CHECKPOINTS_BECOME_A_FILE = """
import os, shutil, sys
from xpo_jax import cli
from xpo_jax.train import Program
real = Program.step
run_dir = sys.argv[1]
def step(self, state, data_key, r):
    out = real(self, state, data_key, r)
    if r + 1 == 3:
        ck = os.path.join(run_dir, "x", "checkpoints")
        shutil.rmtree(ck)
        open(ck, "w").write("not a directory")
    return out
Program.step = step
sys.argv = [sys.argv[0], "train", *sys.argv[2:]]
raise SystemExit(cli.main())
"""


def test_checkpoints_replaced_by_a_file_mid_run_ends_the_process_with_one_line(tmp_path):
    """The error was printed, then orbax's background threads kept the process alive forever:
    now one line, exit 2, the process ends (and its lock is released)."""
    from xpo_jax.rundir import lock_path

    args = [*CLI_FLAGS, "--rounds", "6", "--checkpoint-every", "2", "--run-dir", str(tmp_path), "--name", "x"]
    p = subprocess.run([sys.executable, "-c", CHECKPOINTS_BECOME_A_FILE, str(tmp_path), *args], env=ENV,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "xpo-jax train: error: cannot save round 4" in p.stderr and "Not a directory" in p.stderr
    assert not os.path.exists(lock_path(str(tmp_path / "x")))


def test_disk_full_while_saving_is_one_line(tmp_path, capsys):
    """A failed write (disk full; an immutable or read-only folder is the same path with EPERM /
    EROFS) reaches the user as one line naming the folder and the OS's reason."""
    import errno

    import orbax.checkpoint as ocp

    def full(self, *a, **k):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "f" / "checkpoints" / "2"))
        except OSError as e:
            raise RuntimeError("orbax: background save failed") from e

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ocp.CheckpointManager, "save", full)
        rc, err, _, _ = run_cli("train", ["--run-dir", str(tmp_path), "--name", "f", *CLI_FLAGS,
                                          "--checkpoint-every", "2"], capsys)
    assert rc == 2
    one_line(err, "train", "cannot save round 2 to", "No space left on device")


def test_sigint_saves_and_exits_130(tmp_path, capsys):
    """Ctrl-C behaves as SIGTERM: the round finishes, is saved, and the exit status is 130."""
    from xpo_jax.train import EXIT_SIGINT

    real_step = Program.step

    def step(self, state, data_key, round_idx):
        out = real_step(self, state, data_key, round_idx)
        if round_idx + 1 == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Program, "step", step)
        rc = cli_main(["train", *CLI_FLAGS, "--run-dir", str(tmp_path), "--name", "int"])
    log = capsys.readouterr().out
    assert EXIT_SIGINT == 130 and rc == 130, log
    assert "signal: saved round 3" in log
    assert latest(tmp_path / "int" / "checkpoints") == 3
    assert [r["round"] for r in rows_of(tmp_path / "int" / "metrics.jsonl")] == [1, 2, 3]


def test_symlinks_in_a_run_directory_are_refused_and_nothing_outside_changes(tmp_path, capsys):
    """config.json, checkpoints/ or the run directory itself a symlink to elsewhere: refused,
    naming the link, before anything is written or deleted; the targets stay as they were. A
    directory where a run file belongs is refused too."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("precious\n")
    (outside / "3").mkdir()
    (outside / "metrics.jsonl").write_text("{}\n")
    runs = tmp_path / "runs"
    runs.mkdir()
    before = sorted((str(p), p.is_file() and p.read_text()) for p in outside.rglob("*"))
    (runs / "a").mkdir()
    (runs / "a" / "config.json").symlink_to(outside / "precious.txt")
    (runs / "b").mkdir()
    (runs / "b" / "checkpoints").symlink_to(outside)
    (runs / "c").symlink_to(outside)
    (runs / "d").mkdir()
    (runs / "d" / "metrics.jsonl").mkdir()
    cases = {"a": ["config.json is a symbolic link", str(outside / "precious.txt")],
             "b": ["checkpoints is a symbolic link"], "c": ["is a symbolic link", "a run directory must be a real"],
             "d": ["metrics.jsonl is a directory"]}
    for name, fragments in cases.items():
        rc, err, seconds, compiled = run_cli("train", ["--run-dir", str(runs), "--name", name, "--overwrite",
                                                       *CLI_FLAGS], capsys)
        assert rc == 2 and seconds < FAST_S and not compiled, err
        one_line(err, "train", *fragments)
    assert sorted((str(p), p.is_file() and p.read_text()) for p in outside.rglob("*")) == before


def _data_json(ckpt_dir, step) -> str:
    path = os.path.join(ckpt_dir, str(step), "data", "metadata")  # orbax's JsonSave of the item "data"
    assert os.path.isfile(path), os.listdir(os.path.dirname(path))
    return path


def _edit_data(ckpt_dir, step, edit) -> None:
    path = _data_json(ckpt_dir, step)
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


DAMAGES = {  # how -> (damage(ckpt_dir), the round restored, what the note names)
    "empty-folder": (lambda d: os.mkdir(os.path.join(d, "14")), 12, "14: "),
    "copied-folder": (lambda d: shutil.copytree(os.path.join(d, "12"), os.path.join(d, "14")), 12,
                      "holds round 12, not 14"),
    "round-edited": (lambda d: _edit_data(d, 12, lambda x: x.update(round=11)), 10, "holds round 11, not 12"),
    "fingerprints-removed": (lambda d: _edit_data(d, 12, lambda x: x.pop("fingerprints")), 10,
                             "no array fingerprints"),
    "truncated-metadata": (lambda d: open(_data_json(d, 12), "r+").truncate(10), 10, "12: "),
    "renamed-folder": (lambda d: os.rename(os.path.join(d, "12"), os.path.join(d, "12.old")), 10, ""),
}


@pytest.mark.parametrize("how", list(DAMAGES))
def test_damaged_checkpoint_folders_fall_back_to_the_newest_good_one(run, finished, tmp_path, how):
    """Checkpoint folders that are not what their name says: --resume's checks read the newest
    readable config, and the restore falls back to the newest checkpoint that verifies, naming
    the one it skipped."""
    shutil.copytree(finished["run_dir"] / finished["name"], tmp_path / "r")
    ckpt_dir = str(tmp_path / "r" / "checkpoints")
    damage, want, note = DAMAGES[how]
    damage(ckpt_dir)
    t = Trainer(dataclasses.replace(CFG, run_dir=str(tmp_path), name="r", resume=True), run=run)  # no raw error
    t.lock.release()
    ckpt = Checkpointer(ckpt_dir)
    try:
        state, _, data, msg = ckpt.restore_latest_good(finished["abstract"])
    finally:
        ckpt.close()
    assert data["round"] == want and note in msg, (data["round"], msg)


def _nan_policy(hf) -> str:
    from safetensors.numpy import load_file, save_file

    d = hf["base"] / "nan_policy"
    if not d.exists():
        shutil.copytree(hf["policy"], d)
        tensors = load_file(d / "model.safetensors")
        x = tensors["model.layers.0.mlp.up_proj.weight"].copy()
        x.flat[7] = np.nan
        tensors["model.layers.0.mlp.up_proj.weight"] = x
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return str(d)


def _policy_with_template(hf, name: str, template) -> str:
    d = hf["base"] / name
    if not d.exists():
        shutil.copytree(hf["policy"], d)
        config = json.loads((d / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        if template is not None:
            config["chat_template"] = template
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        if (d / "chat_template.jinja").exists():
            os.remove(d / "chat_template.jinja")
    return str(d)


def _hf_argv(h, t, policy=None, *extra):
    return ["--policy", policy or h["policy"], "--reward-model", h["rm"], "--prompts", PROMPTS, "--run-dir", str(t),
            *HF_FLAGS, *extra]


CLI_CASES.update({
    "seed-beyond-32-bits": (None, lambda f, t: ["--run-dir", str(t), *CLI_FLAGS, "--seed", str(2**32)],
                            ["--seed=4294967296: must be an integer in [0, 2^32)"]),
    "rounds-beyond-int32": (None, lambda f, t: ["--run-dir", str(t), *CLI_FLAGS, "--rounds", str(2**31)],
                            ["--rounds=2147483648: must be at most 2147483647"]),
    "batch-size-beyond-int32": (None, lambda f, t: ["--run-dir", str(t), *CLI_FLAGS, "--batch-size", str(2**40)],
                                ["--batch-size=1099511627776: must be at most 2147483647"]),
    "name-too-long": (None, lambda f, t: ["--run-dir", str(t), "--name", "n" * 240, *CLI_FLAGS],
                      ["--name: 240 characters; at most 200"]),
    "run-dir-component-too-long": (None, lambda f, t: ["--run-dir", str(t / ("d" * 300)), *CLI_FLAGS],
                                   ["--run-dir: the path component", "more than the OS allows"]),
    "run-dir-with-nul": (None, lambda f, t: ["--run-dir", str(t) + "/a\x00b", *CLI_FLAGS], ["NUL character"]),
    "eval-prompts-overlap-training": ("hf", lambda h, t: _hf_argv(h, t, None, "--eval-prompts", PROMPTS),
                                      ["--eval-prompts=", "also occur among the 64 training prompts"]),
    "nan-policy-weights": ("hf", lambda h, t: _hf_argv(h, t, _nan_policy(h)),
                           ["--policy=", "nan_policy", "non-finite weights",
                            "model.layers.0.mlp.up_proj.weight in model.safetensors"]),
    "policy-without-chat-template": ("hf", lambda h, t: _hf_argv(h, t, _policy_with_template(h, "no_template", None)),
                                     ["--policy=", "no_template", "cannot render the chat prompts", "no chat template"]),
    "template-the-sandbox-rejects": ("hf", lambda h, t: _hf_argv(h, t, _policy_with_template(
        h, "unsafe_template", "{{ messages.__class__.__mro__[1].__subclasses__() }}")),
        ["--policy=", "unsafe_template", "cannot render the chat prompts", "SecurityError"]),
})


def test_a_missing_jax_platform_fails_before_compiling_in_one_line(tmp_path):
    """JAX_PLATFORMS naming a platform that is not there: one line, exit 2 (not a traceback at
    the first array)."""
    env = dict(ENV, JAX_PLATFORMS="tpu")
    p = subprocess.run([sys.executable, "-m", "xpo_jax", "train", "--run-dir", str(tmp_path), *CLI_FLAGS], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    one_line(p.stderr, "train", "JAX_PLATFORMS='tpu': no usable JAX backend")


def _rewrite_weights(model_dir, scale: float) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    name = sorted(k for k in tensors if k.endswith("weight"))[0]
    tensors[name] = (tensors[name] * scale).astype(tensors[name].dtype)
    save_file(tensors, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})


def test_resume_refuses_changed_model_files_unless_accepted_and_recorded(hf, tmp_path, capsys):
    """The reward model's weights changed in place (same path) after a checkpoint: --resume
    refuses naming the file; --accept-changed-models trains on and the next checkpoint records the
    change; a checkpoint whose model fingerprints were removed fails verification."""
    pol, rm = shutil.copytree(hf["policy"], tmp_path / "pol"), shutil.copytree(hf["rm"], tmp_path / "rm")
    cfg = hf_cfg({**hf, "policy": str(pol), "rm": str(rm)}, tmp_path, "m", checkpoint_every=1)
    Trainer(cfg).run()
    ckpt_dir = tmp_path / "m" / "checkpoints"
    data = json.load(open(_data_json(ckpt_dir, 2)))
    assert set(data["model_fingerprints"]) == {"policy", "reward_model"}
    _rewrite_weights(rm, 1.5)
    argv = ["--policy", str(pol), "--reward-model", str(rm), "--prompts", PROMPTS, "--run-dir", str(tmp_path),
            "--name", "m", "--resume", *HF_FLAGS, "--checkpoint-every", "1", "--rounds", "3"]
    rc, err, seconds, compiled = run_cli("train", argv, capsys)
    assert rc == 2 and not compiled, err
    one_line(err, "train", "--resume: the models differ", f"--reward-model: {rm / 'model.safetensors'} changed",
             "--accept-changed-models")
    t = Trainer(dataclasses.replace(cfg, resume=True, rounds=3, accept_changed_models=True))
    t.run()
    data = json.load(open(_data_json(ckpt_dir, 3)))
    assert data["accepted_model_changes"][0]["round"] == 2
    assert "--reward-model" in data["accepted_model_changes"][0]["changes"][0]
    _edit_data(ckpt_dir, 3, lambda x: x.pop("model_fingerprints"))
    rc, err, _, compiled = run_cli("train", [*argv, "--rounds", "4"], capsys)
    assert rc == 2 and not compiled, err
    one_line(err, "train", "records no model fingerprints")
