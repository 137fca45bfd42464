"""README.md never rots: every fenced Python block runs, and every `xpo-jax ...` command line in it
parses and validates (flags exist, values are accepted) without running."""
from __future__ import annotations

import os
import re
import shlex

import pytest

from xpo_jax.cli import _glue_negative_numbers, build_parser
from xpo_jax.config import config_from_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def command_lines() -> list[str]:
    """`xpo-jax ...` commands from the README's indented blocks, continuation lines joined."""
    lines, out = README.split("\n"), []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("xpo-jax ") or " xpo-jax " in line and not line.startswith(("#", "for ")):
            cmd = line[line.index("xpo-jax "):]
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1] + " " + lines[i].strip()
            out.append(cmd.split(" #")[0].split(" &")[0].strip().rstrip('"'))
        i += 1
    return out


def test_the_readme_has_examples():
    assert len(PYTHON_BLOCKS) >= 6 and len(command_lines()) >= 10


@pytest.mark.parametrize("i", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    exec(compile(PYTHON_BLOCKS[i], f"README.md python block {i}", "exec"), {"__name__": f"readme_{i}"})


# The user's module the README's "Your own loss" commands name (`--loss-type mylosses:margin_dpo`).
MYLOSSES = """
import jax


def margin_dpo(chosen_logratios, rejected_logratios, *, beta, gamma=0.5):
    return -jax.nn.log_sigmoid(beta * (chosen_logratios - rejected_logratios) - gamma)
"""


@pytest.mark.parametrize("cmd", command_lines())
def test_command_line_parses_and_validates(cmd, tmp_path, monkeypatch):
    (tmp_path / "mylosses.py").write_text(MYLOSSES)
    monkeypatch.chdir(tmp_path)  # as the README says: mylosses.py next to where you run
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = shlex.split(cmd.replace("$i", "0"))[1:]  # the shell loop's process id
    if "--help" in argv:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 0
        return
    args = build_parser().parse_args(_glue_negative_numbers(argv))
    if args.command in ("train", "sweep"):
        config_from_args(args).validate()
