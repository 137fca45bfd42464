"""Checkpoints with orbax: the whole XPOState, the config and the data position, atomically,
with a checksum of every array that is verified on restore.

Orbax writes each step into a temporary folder and renames it when complete, so a crash or a kill
mid-save leaves the previous checkpoints intact; `latest_step` only ever sees finished ones. The
trainer saves only states whose round produced finite metrics, so a NaN never overwrites the last
good checkpoint.

Bytes that rot after the save (a disk, a copy, a hand) would restore silently and surface later
as a NaN blamed on training. So every save also stores, per array, a 32-bit fingerprint of its
bits (`fingerprints`: an integer sum mod 2^32 of the bits times position weights, computed on
device; integer addition is exact and order-free, so the value does not depend on the mesh the
state is sharded over). `restore_latest_good` recomputes them after reading and, when a
checkpoint does not verify (or cannot be read at all), falls back to the newest older one that
does, and says so. The checkpoints it skipped are set aside by the trainer (`set_aside`:
renamed to `corrupt-<round>`, kept for inspection), so that the resumed run can save those rounds
again.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


def _fingerprint(x: jax.Array) -> jax.Array:
    """sum_i bits_i * w_i mod 2^32 over the array's bits viewed as uint32 words, with odd weights
    w_i that depend on the position (so swapped or shifted values change it too)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 8:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    else:
        narrow = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
        words = jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
    words = words.reshape(-1)
    weights = jnp.arange(words.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
    return jnp.sum(words * weights, dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree: Any) -> list:
    return [_fingerprint(x) for x in jax.tree_util.tree_leaves(tree)]


def fingerprints(tree: Any) -> list[int]:
    """One uint32 fingerprint per array leaf of `tree` (host ints, leaf order)."""
    out = _fingerprints(tree)
    return [int(np.asarray(v.addressable_data(0))) for v in out]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the message is one line with the OS's reason)."""


def root_cause(e: BaseException) -> str:
    """The innermost OSError of an exception chain as 'strerror: filename' (else the exception's
    own first line): what the user can act on, not orbax's wrapping."""
    seen, cur, found = set(), e, None
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.strerror:
            found = cur
        cur = cur.__cause__ or cur.__context__
    if found is not None:
        return f"{found.strerror}: {found.filename}" if found.filename else found.strerror
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def check_metadata(where: str, step: int, data: dict, saved_fingerprints: Any) -> None:
    """ValueError unless a checkpoint's metadata is what its folder says: it holds the array
    fingerprints (without them nothing can be verified) and the round of its folder name (a
    copied or edited folder would restore another round's state under this one's name)."""
    if saved_fingerprints is None:
        raise ValueError(f"checkpoint {where} has no array fingerprints in its metadata: it cannot be verified")
    if data.get("round") != step:
        raise ValueError(f"checkpoint {where} holds round {data.get('round')!r}, not {step} (a copied, renamed or "
                         "edited folder)")


class Checkpointer:
    """Save / restore (state, config dict, data-position dict) under `directory/<round>`."""

    def __init__(self, directory: str, *, keep: int = 2):
        # Keep remote paths (gs://...) as they are: multi-host runs checkpoint to shared storage.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self.skipped: list[int] = []  # rounds the last restore_latest_good could not use

    def latest_round(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_rounds(self) -> list[int]:
        return sorted(self.manager.all_steps(), reverse=True)

    def saved_config(self, round_idx: Optional[int] = None) -> dict:
        """The config dict saved with a checkpoint (reads no arrays: cheap, for checks before a
        run is built); default the newest whose JSON reads (a damaged newer one is skipped here:
        `restore_latest_good` decides about it)."""
        return self._saved("config", round_idx)

    def saved_data(self, round_idx: Optional[int] = None) -> dict:
        """The data-position dict saved with a checkpoint (reads no arrays); default as
        `saved_config`."""
        return self._saved("data", round_idx)

    def _saved(self, item: str, round_idx: Optional[int]) -> dict:
        steps = self.all_rounds() if round_idx is None else [round_idx]
        errors = []
        for step in steps:
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
                return dict(out[item])
            except Exception as e:  # noqa: BLE001 - a damaged checkpoint: try the next older one
                errors.append(f"{step}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
        raise ValueError(f"no checkpoint in {self.directory} has a readable {item} ({'; '.join(errors) or 'none'})")

    def save(self, round_idx: int, state: Any, config: dict, data: dict) -> None:
        """Save and wait until it is on disk (a checkpoint is only worth having once finished).
        A failure to write (disk full, a read-only or immutable folder, checkpoints/ replaced by a
        file) raises CheckpointWriteError: one line naming the folder and the OS's reason."""
        data = {**data, "fingerprints": fingerprints(state)}
        try:
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
        except Exception as e:  # noqa: BLE001 - orbax wraps the OS error in its own types
            raise CheckpointWriteError(f"cannot save round {round_idx} to {self.directory}: {root_cause(e)}") from e

    def restore(self, like_state: Any, round_idx: Optional[int] = None, *, verify: bool = True) -> tuple[Any, dict, dict]:
        """Restore onto the structure, shapes, dtypes and shardings of `like_state` (arrays or
        `jax.ShapeDtypeStruct`s with shardings). Raises ValueError when `verify` and the arrays'
        fingerprints differ from the saved ones."""
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
        state, data = out["state"], dict(out["data"])
        saved = data.pop("fingerprints", None)
        if verify:
            check_metadata(f"{self.directory}/{step}", step, data, saved)
            now = fingerprints(state)
            if now != list(saved):
                bad = [i for i, (a, b) in enumerate(zip(now, saved)) if a != b]
                names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
                raise ValueError(f"checkpoint {self.directory}/{step} is corrupt: {len(bad)} array(s) differ from "
                                 f"what was saved ({', '.join(names[i] for i in bad[:4])}{' ...' if len(bad) > 4 else ''})")
        return state, dict(out["config"]), data

    def restore_latest_good(self, like_state: Any) -> Optional[tuple[Any, dict, dict, str]]:
        """The newest checkpoint that reads and verifies: (state, config, data, note), where note
        says which newer ones were skipped and why ("" when the newest is good); None when there
        is no checkpoint. Raises ValueError when none verifies. The rounds skipped are left in
        `self.skipped` (see `set_aside`)."""
        failures = []
        self.skipped = []
        for step in self.all_rounds():
            try:
                state, config, data = self.restore(like_state, step)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the next older one
                failures.append(f"{step}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
                self.skipped.append(step)
                continue
            note = ""
            if failures:
                note = (f"warning: skipped {len(failures)} newer checkpoint(s) that failed verification "
                        f"({'; '.join(failures)}); resuming from round {step}")
            return state, config, data, note
        if failures:
            raise ValueError(f"no checkpoint in {self.directory} verifies: {'; '.join(failures)}")
        return None

    def set_aside(self, rounds: list[int]) -> list[str]:
        """Rename the checkpoints of `rounds` to `corrupt-<round>` (kept for inspection, invisible
        to restores once `reload` has run), so the run can save those rounds again; returns the new
        paths. Call it on one process, then `reload` on every process (this one included)."""
        from etils import epath  # orbax's paths: local or remote (gs://...)

        moved = []
        root = epath.Path(self.directory)
        for r in rounds:
            dst, n = root / f"corrupt-{r}", 1
            while dst.exists():
                n += 1
                dst = root / f"corrupt-{r}.{n}"
            (root / str(r)).rename(dst)
            moved.append(str(dst))
        return moved

    def reload(self) -> None:
        """Re-read which checkpoints exist (after another process changed the directory)."""
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
