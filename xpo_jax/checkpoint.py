"""Checkpoints with orbax: the whole XPOState, the config and the data position, atomically.

Orbax writes each step into a temporary folder and renames it when complete, so a crash or a kill
mid-save leaves the previous checkpoints intact; `latest_step` only ever sees finished ones. The
trainer saves only states whose round produced finite metrics, so a NaN never overwrites the last
good checkpoint.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Save / restore (state, config dict, data-position dict) under `directory/<round>`."""

    def __init__(self, directory: str, *, keep: int = 2):
        # Keep remote paths (gs://...) as they are: multi-host runs checkpoint to shared storage.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_round(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, round_idx: int, state: Any, config: dict, data: dict) -> None:
        """Save and wait until it is on disk (a checkpoint is only worth having once finished)."""
        self.manager.save(
            round_idx,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config),
                data=ocp.args.JsonSave(data),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, like_state: Any, round_idx: Optional[int] = None) -> tuple[Any, dict, dict]:
        """Restore onto the structure, shapes, dtypes and shardings of `like_state`."""
        step = self.latest_round() if round_idx is None else round_idx
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                config=ocp.args.JsonRestore(),
                data=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], dict(out["config"]), dict(out["data"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
