"""Named things a user can add without editing the library: tasks, losses, bonus forms.

A `Registry` maps names to objects; `resolve(spec)` also accepts "package.module:attribute", which
is imported (from the working directory too, as `python -m` would) so that a command line can
name a user's own object (`--task mytasks:echo`, `--loss-type mylosses:margin_loss`) with no
library file touched. Imports nothing of xpo_jax: every layer may use it.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, Generic, Optional, TypeVar

T = TypeVar("T")


def import_attr(spec: str, kind: str) -> Any:
    """The object named by "package.module:attribute"; ValueError naming `spec` when it cannot
    be imported."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"{kind} {spec!r}: expected a registered name or 'module:attribute'")
    if os.getcwd() not in sys.path:  # a user's file next to where the command runs
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{kind} {spec!r}: cannot import {attr!r} from {module!r} ({e})") from e


class Registry(Generic[T]):
    """name -> T. `convert(obj, spec)` turns what a "module:attribute" names into a T (and may
    raise ValueError); the result is registered under `key(result)` (default: the spec itself)."""

    def __init__(self, kind: str, convert: Callable[[Any, str], T], key: Optional[Callable[[T], str]] = None):
        self.kind, self._convert, self._key = kind, convert, key
        self.items: dict[str, T] = {}

    def add(self, name: str, item: T, *, overwrite: bool = False) -> T:
        """Register `item` as `name`; a different item already under that name is kept unless
        `overwrite`."""
        if name in self.items and self.items[name] is not item and not overwrite:
            raise ValueError(f"a {self.kind} named {name!r} is already registered (pass overwrite=True to replace it)")
        self.items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self.items:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self.items))}")
        return self.items[name]

    def resolve(self, spec: str) -> T:
        """A registered name, or "module:attribute" (imported, converted and registered)."""
        if not isinstance(spec, str):
            raise ValueError(f"{self.kind} must be a name or 'module:attribute', got {spec!r}")
        if ":" not in spec or spec in self.items:
            return self.get(spec)
        item = self._convert(import_attr(spec, self.kind), spec)
        return self.add(spec if self._key is None else self._key(item), item, overwrite=True)

    def names(self) -> tuple[str, ...]:
        return tuple(self.items)

    def __contains__(self, name: str) -> bool:
        return name in self.items
