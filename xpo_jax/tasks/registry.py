"""The task registry: built-in tasks by name, and user tasks as "module:attribute".

Built in: "hard-explore", "copy" (`builtin`), and the coverage families (`coverage`) at
pi_ref(optimal) = 1e-1, 1e-2, 1e-3, 1e-4: "bandit-1e-3", "chain-1e-3", "chain-transformer-1e-3",
and so on.
"""
from __future__ import annotations

from xpo_jax.tasks.base import Task
from xpo_jax.tasks.builtin import make_copy_task, make_hard_explore_task
from xpo_jax.tasks.coverage import (
    PRESET_COVERAGES, make_bandit_task, make_chain_task, make_chain_transformer_task,
)

DEFAULT_TASK = "hard-explore"
TASKS: dict[str, Task] = {}


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Add ``task`` to ``TASKS`` under ``task.name``; refuse to replace one unless ``overwrite``."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a Task; got {type(task).__name__}")
    if task.name in TASKS and TASKS[task.name] is not task and not overwrite:
        raise ValueError(f"a task named {task.name!r} is already registered (overwrite=True)")
    TASKS[task.name] = task
    return task


def resolve_task(spec: str) -> Task:
    """A registered task by name, or a user task as "package.module:attribute" (a Task, or a
    function returning one), imported and registered under its own name: the CLI's --task."""
    if ":" not in spec:
        return get_task(spec)
    import importlib
    import os
    import sys

    if os.getcwd() not in sys.path:  # as `python -m` would: a task file next to the user's run
        sys.path.insert(0, os.getcwd())
    module, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"task {spec!r}: cannot import {attr!r} from {module!r} ({e})") from e
    task = obj() if callable(obj) and not isinstance(obj, Task) else obj
    if not isinstance(task, Task):
        raise ValueError(f"task {spec!r} is a {type(task).__name__}, expected a Task")
    return register_task(task, overwrite=True)


def get_task(name: str = DEFAULT_TASK) -> Task:
    """The registered task called ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
    return TASKS[name]


register_task(make_hard_explore_task())
register_task(make_copy_task())
for _coverage in PRESET_COVERAGES:
    register_task(make_bandit_task(coverage=_coverage))
    register_task(make_chain_task(coverage=_coverage))
    register_task(make_chain_transformer_task(coverage=_coverage))
