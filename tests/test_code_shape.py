"""The package's shape, checked: imports go one way through the layers, no module reaches into
another's private names, and no function body is longer than a reader can hold (80 lines)."""
from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "xpo_jax")
MAX_BODY_LINES = 80

# Each layer imports only its own and lower layers (README "The package").
LAYERS = {
    "low": {"registry", "parallel", "distributed", "reporting", "hlo", "rundir"},
    "core": {"losses", "logprobs", "sampling", "oracles", "pairs", "state", "round", "checkpoint", "models"},
    "data": {"tasks", "hf"},
    "driving": {"config", "run", "train", "sweeps", "cli", "__main__", "__init__"},
}
RANK = {m: i for i, (_, mods) in enumerate(LAYERS.items()) for m in mods}


def modules():
    for root, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                with open(path) as fh:
                    yield rel, ast.parse(fh.read(), path)


def top(name: str) -> str:
    """xpo_jax.models.hf -> models; hf.run -> hf."""
    return name.split(".")[0]


def runtime_imports(tree: ast.Module):
    """(line, imported xpo_jax module, names) of every import not under `if TYPE_CHECKING:`."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xpo_jax"):
            names = [a.name for a in node.names]
            if node.module == "xpo_jax":  # from xpo_jax import parallel as par
                for n in names:
                    yield node.lineno, n, []
            else:
                yield node.lineno, node.module[len("xpo_jax."):], names
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("xpo_jax."):
                    yield node.lineno, a.name[len("xpo_jax."):], []


def test_imports_go_one_way_through_the_layers():
    bad = []
    for mod, tree in modules():
        mine = RANK[top(mod)]
        for line, target, _ in runtime_imports(tree):
            if top(target) != top(mod) and RANK[top(target)] > mine:
                bad.append(f"xpo_jax/{mod}.py:{line} imports {target} (a higher layer)")
    assert not bad, "\n".join(bad)


def test_no_private_name_used_across_modules():
    bad = []
    for mod, tree in modules():
        aliases = {}
        for line, target, names in runtime_imports(tree):
            if target == mod:
                continue
            bad += [f"xpo_jax/{mod}.py:{line} imports {n} from {target}" for n in names if n.startswith("_")]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "xpo_jax":
                aliases.update({a.asname or a.name: a.name for a in node.names})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"xpo_jax/{mod}.py:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def body_lines(fn: ast.AST) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring
    return 0 if not body else body[-1].end_lineno - body[0].lineno + 1


def test_no_function_body_over_80_lines():
    long = [f"xpo_jax/{mod}.py:{fn.lineno} {fn.name}: {body_lines(fn)} lines" for mod, tree in modules()
            for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            and body_lines(fn) > MAX_BODY_LINES]
    assert not long, "\n".join(long)


@pytest.mark.parametrize("check", [body_lines])
def test_the_checks_can_fail(check):
    """The checkers themselves see what they look for (a test that cannot fail is a defect)."""
    src = "def f():\n    '''doc\n    more'''\n" + "".join(f"    x{i} = {i}\n" for i in range(81))
    assert check(ast.parse(src).body[0]) == 81
    tree = ast.parse("from xpo_jax.train import _x\nfrom xpo_jax import parallel as par\npar._put(1)\n"
                     "if TYPE_CHECKING:\n    from xpo_jax.run import Run\n")
    assert [(t, n) for _, t, n in runtime_imports(tree)] == [("train", ["_x"]), ("parallel", [])]
