"""The run directory's rules: one process at a time (a lock), no writes through symlinks, run
files of the right kind, and paths the operating system accepts.

Lock. `<run_dir>/.<name>.lock` (beside the run directory, so a lock never needs the directory to
exist and `--overwrite` never deletes it; names cannot start with '.', so it never clashes with
a run) holds the holder's pid, host, process start time and a random token. It is created
atomically with its content (written to a private temporary file, then `os.link`ed to the lock's
name: link fails when the name exists, so two processes can never both succeed). A second process
refuses at once, naming the holder. A lock whose holder is dead (same host, no such pid, or the
pid now belongs to a process started at another time) is stale: it is taken over under a second
exclusive file (`.takeover`), which re-reads the lock and removes it only if it is still the same
stale one (its token), so two processes taking over at once cannot both win. A holder on another
host cannot be checked: the message says so and names the file to delete. Released on exit (the
Trainer's finally, and `atexit` for anything left).

Symlinks. A run writes, truncates and deletes only inside its directory: a run file that is a
symbolic link (to anywhere) is refused, naming the link, as is a run directory that is itself a
link (`--overwrite` would delete inside its target). Links above the run directory (e.g. a
`runs` that links to a scratch disk) are the user's choice and are followed.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import time
import uuid
from typing import Optional

# Every file the trainer or a sweep writes in a run directory (kind: "file" or "dir"), with the
# temporary names written beside them. TensorBoard's events files match EVENTS_PREFIX.
RUN_FILES = {
    "config.json": "file", "metrics.jsonl": "file", "metrics.jsonl.tmp": "file", "samples.jsonl": "file",
    "samples.jsonl.tmp": "file", "summary.json": "file", "summary.md": "file", "curve.png": "file",
    "checkpoints": "dir", "data": "dir",
    "sweep.csv": "file", "sweep.json": "file", "heatmap.png": "file", "curves.png": "file", "curves.npz": "file",
    "params.npz": "file",
}
EVENTS_PREFIX = "events.out.tfevents"
NAME_MAX = 255  # bytes of one path component (Linux, macOS)
PATH_MAX = 4096
TAKEOVER_STALE_S = 30.0  # a .takeover file older than this was left by a process that died mid-takeover

_HELD: dict[str, str] = {}  # lock path -> our token, for every lock this process holds


class RunDirLocked(ValueError):
    """Another process holds the run directory."""


class UnsafeRunDir(ValueError):
    """A run file is a symlink or of the wrong kind; or the path cannot exist on this OS."""


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------


def check_os_path(flag: str, path: str) -> None:
    """UnsafeRunDir naming `flag` when the OS would refuse `path`: a NUL byte, a component longer
    than NAME_MAX bytes, the whole longer than PATH_MAX, or not encodable in the file system's
    encoding."""
    if "\x00" in path:
        raise UnsafeRunDir(f"{flag}={path!r}: contains a NUL character, which no file name may hold")
    try:
        raw = os.fsencode(path)
    except UnicodeError as e:
        raise UnsafeRunDir(f"{flag}={path!r}: not a valid file name here ({e})") from None
    if len(os.fsencode(os.path.abspath(path))) >= PATH_MAX:
        raise UnsafeRunDir(f"{flag}: the path is {len(raw)} bytes, more than the OS allows ({PATH_MAX})")
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX:
            raise UnsafeRunDir(f"{flag}: the path component {part[:40]!r}... is {len(part)} bytes, more than the "
                               f"OS allows in one name ({NAME_MAX})")


def lock_path(out: str) -> str:
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lock")


def check_run_files(out: str) -> None:
    """UnsafeRunDir naming the path when the run directory `out` is a symlink, or a run file in
    it (RUN_FILES, events files, the checkpoints' entries) is a symlink or of the wrong kind (a
    directory where a file belongs, or the reverse)."""
    if os.path.islink(out):
        raise UnsafeRunDir(f"{out} is a symbolic link (to {os.readlink(out)}): a run directory must be a real "
                           "directory (the run writes and --overwrite deletes inside it); use the target's path")
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise UnsafeRunDir(f"{out} is a file, not a run directory: remove it or choose another --name")
    for f in sorted(os.listdir(out)):
        kind = RUN_FILES.get(f, "file" if f.startswith(EVENTS_PREFIX) else None)
        if kind is not None:
            _check_entry(os.path.join(out, f), kind)
    ckpt = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt):
        for f in sorted(os.listdir(ckpt)):
            if os.path.islink(os.path.join(ckpt, f)):
                _refuse_link(os.path.join(ckpt, f))


def _check_entry(path: str, kind: str) -> None:
    if os.path.islink(path):
        _refuse_link(path)
    if kind == "file" and os.path.isdir(path):
        raise UnsafeRunDir(f"{path} is a directory, but the run writes a file there: move it away")
    if kind == "file" and not os.path.isfile(path):  # a FIFO or a device: reading it could block forever
        raise UnsafeRunDir(f"{path} is not a regular file (a pipe or a device?), but the run writes a file there: "
                           "move it away")
    if kind == "dir" and not os.path.isdir(path):
        raise UnsafeRunDir(f"{path} is a file, but the run keeps a directory there: move it away")


def _refuse_link(path: str) -> None:
    raise UnsafeRunDir(f"{path} is a symbolic link (to {os.readlink(path)}): the run never writes, truncates or "
                       "deletes through a link; remove the link (or replace it with a real file or directory)")


# ----------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None
    where there is no /proc: with the pid it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the holder (same host) still runs: its pid exists and started when it said."""
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    started = holder.get("started")
    now = _start_time(pid)
    return started is None or now is None or started == now


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or torn: written by something else (we write atomically)


class RunDirLock:
    """The lock of run directory `out` (see the module docstring): `acquire()` or RunDirLocked
    naming the holder; `release()` (idempotent)."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        self.path = lock_path(out)
        self.token: Optional[str] = None

    @property
    def held(self) -> bool:
        return self.token is not None and _HELD.get(self.path) == self.token

    def acquire(self) -> None:
        if self.held:
            return
        if self.path in _HELD:
            raise RunDirLocked(f"{self.out} is in use by another Trainer of this process (pid {os.getpid()}): "
                               "finish that run first")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
              "token": uuid.uuid4().hex, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(20):
            if self._link(me):
                self.token = me["token"]
                _HELD[self.path] = self.token
                return
            holder = _read(self.path)
            if holder is None:  # released meanwhile: try again
                continue
            if not self._stale(holder, me):
                raise RunDirLocked(self._held_message(holder))
            self._take_over(holder)
        raise RunDirLocked(f"{self.out}: could not take the lock {self.path} (it keeps changing hands)")

    def _link(self, me: dict) -> bool:
        """Create the lock with its content in one step: True when this process now holds it."""
        tmp = f"{self.path}.{me['token']}.tmp"
        with open(tmp, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    @staticmethod
    def _stale(holder: dict, me: dict) -> bool:
        if not holder:  # an empty or unreadable lock file: not ours, and no holder to name
            return False
        if holder.get("host") != me["host"]:
            return False
        if holder.get("pid") == me["pid"] and holder.get("started") == me["started"]:
            return True  # this very process, which no longer holds it (acquire checked _HELD): left over
        return not _alive(holder)

    def _held_message(self, holder: dict) -> str:
        if not holder:
            return (f"{self.out} is locked by {self.path}, which cannot be read: if no run uses this directory, "
                    "delete that file")
        where = "" if holder.get("host") == socket.gethostname() else (
            f"; it runs on another host, so it cannot be checked from here: if it is gone, delete {self.path}")
        return (f"{self.out} is in use by another process: pid {holder.get('pid')} on host {holder.get('host')} "
                f"(since {holder.get('since')}){where}. Wait for it, or choose another --name")

    def _take_over(self, stale: dict) -> None:
        """Remove a stale lock, if it is still the same one, under the .takeover guard."""
        guard = self.path + ".takeover"
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - os.path.getmtime(guard) > TAKEOVER_STALE_S:
                    os.remove(guard)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return
        os.close(fd)
        try:
            now = _read(self.path)
            if now and now.get("token") == stale.get("token"):
                os.remove(self.path)
                print(f"note: took over the stale lock {self.path} of pid {stale.get('pid')} on "
                      f"{stale.get('host')} (no longer running)", flush=True)
        finally:
            os.remove(guard)

    def release(self) -> None:
        if not self.held:
            return
        try:
            if (_read(self.path) or {}).get("token") == self.token:
                os.remove(self.path)
        except OSError:
            pass
        _HELD.pop(self.path, None)
        self.token = None


def release_all() -> None:
    """Release every lock this process holds (atexit does it too; call it before `os._exit`)."""
    for path, token in list(_HELD.items()):
        try:
            if (_read(path) or {}).get("token") == token:
                os.remove(path)
        except OSError:
            pass
    _HELD.clear()


atexit.register(release_all)
