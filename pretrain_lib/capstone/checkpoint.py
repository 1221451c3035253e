"""Atomic, checksummed checkpoints: write, keep the last K, find the latest good one.

nanoGPT writes its checkpoint with one ``torch.save`` over the previous file: a crash
during that write leaves neither the old checkpoint nor the new one. Here a checkpoint is

1. serialised in memory, prefixed by a header with the SHA-256 of the payload;
2. written to a temporary file in the same folder, flushed and ``fsync``-ed;
3. renamed over its final name (``os.replace`` is atomic within a file system);
4. made durable by an ``fsync`` of the folder, which records the rename itself.

A pointer file ``latest`` (written the same way) names the newest checkpoint; older ones
beyond ``keep`` are deleted only after the new one is safe. On load, a file whose
checksum does not match (a truncated copy, a flipped bit) is reported and the previous
checkpoint is used instead.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

MAGIC = b"PLCKPT1\n"                 # file = MAGIC + 64 hex digits of sha256(payload) + b"\n" + payload
POINTER = "latest"
_NAME = re.compile(r"^ckpt_(\d{8})\.(pt|dcp)$")   # .dcp: a sharded checkpoint's folder (sharded.py)


class CheckpointError(RuntimeError):
    """No usable checkpoint, or an output folder a checkpoint cannot be written to."""


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:08d}.pt"


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` as the user's umask lets a new file have it (what ``open(path, "w")`` gives)."""
    current = os.umask(0)   # reading the umask means setting it; put it straight back
    os.umask(current)
    return mode & ~current


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a crash at any moment leaves the old file or the new one,
    never a mixture: temporary file in the same folder → fsync → rename → fsync of the folder.
    The file gets the permissions the user's umask gives a new file (``mkstemp`` alone would make
    it 0600, unreadable by a group sharing the run)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def encode_checkpoint(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def decode_checkpoint(data: bytes, name: str = "checkpoint") -> dict[str, Any]:
    """Check the header and checksum, then unpickle; raises :class:`CheckpointError` when corrupt."""
    head = len(MAGIC) + 65
    if len(data) < head or not data.startswith(MAGIC):
        raise CheckpointError(f"{name} is not a course checkpoint (missing header; {len(data)} bytes)")
    expected = data[len(MAGIC):head - 1].decode("ascii", "replace")
    payload = data[head:]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise CheckpointError(f"{name} is corrupt: its checksum is {actual[:12]}… but its header says "
                              f"{expected[:12]}… (truncated or overwritten)")
    # weights_only: a checkpoint holds tensors, numbers, strings and containers only, so a
    # tampered file cannot run code when it is loaded.
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``folder`` (files, and sharded folders), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write ``state`` as ``<folder>/ckpt_<step>.pt`` atomically, point ``latest`` at it, and
    delete all but the newest ``keep`` checkpoints. Returns the checkpoint's path."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = atomic_write_bytes(folder / checkpoint_name(step), encode_checkpoint(state))
    point_and_prune(folder, path, keep=keep)
    return path


def point_and_prune(folder: Path, newest: Path, *, keep: int) -> None:
    """Point ``latest`` at ``newest`` (already safe on disk), then apply the retention rule.

    Retention follows the run's own history, not the file names: ``newest`` and the ``keep - 1``
    checkpoints before it stay. A checkpoint numbered *after* ``newest`` can only be left from a
    timeline this run abandoned (it resumed from an earlier step because that file was corrupt
    or unreadable), so it is deleted, never kept in place of the good one just written."""
    atomic_write_bytes(folder / POINTER, newest.name.encode() + b"\n")
    step = int(_NAME.match(newest.name).group(1))
    history = list_checkpoints(folder)
    stale = [p for s, p in history if s > step]
    older = [p for s, p in history if s <= step and p != newest]
    for old in stale + older[:max(0, len(older) - (keep - 1))]:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


RUN_FILES = ("metrics.jsonl", "metrics.json", POINTER, "tensorboard")   # what a run writes besides checkpoints


def previous_run(folder: str | Path) -> list[str]:
    """The files of an earlier run in ``folder`` (checkpoints, metrics, ...), by name; empty when none."""
    folder = Path(folder)
    return [p.name for _, p in list_checkpoints(folder)] + [n for n in RUN_FILES if (folder / n).exists()]


def clear_run(folder: str | Path) -> None:
    """Delete an earlier run's checkpoints and logs from ``folder`` (``--overwrite``); other files stay."""
    folder = Path(folder)
    for _, path in list_checkpoints(folder):
        _remove(path)
    for name in RUN_FILES:
        if (folder / name).exists():
            _remove(folder / name)


def snapshot(state: Any) -> Any:
    """A copy of ``state`` whose tensors are fresh CPU copies, so training may go on changing the originals."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a namedtuple takes its fields as arguments
        return type(state)(*(snapshot(v) for v in state))
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return state


class BackgroundWriter:
    """Writes checkpoints on a background thread, so training waits only for a copy of the state.

    Serialising, hashing, writing and ``fsync``-ing take longer than copying a few tensors; here
    the training loop pays only for :func:`snapshot` and the rest overlaps with the next steps.
    One write is in flight at a time (the next :meth:`submit` waits for it), and :meth:`wait`
    must be called before the process relies on the checkpoint (the trainer does at the end of a
    run). A write that failed raises its error at the next :meth:`submit` or :meth:`wait`.
    Killing the process mid-write is safe for the same reason as with :func:`save_checkpoint`:
    the previous checkpoint stays the latest until the new one is renamed into place.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.write_seconds: list[float] = []   # wall-clock of each write, measured on the thread

    def submit(self, folder: str | Path, step: int, state: dict[str, Any], *, keep: int = 2) -> None:
        self.wait()
        copy = snapshot(state)

        def write() -> None:
            start = time.perf_counter()
            try:
                save_checkpoint(folder, step, copy, keep=keep)
            except BaseException as exc:  # re-raised in the training thread
                self._error = exc
            self.write_seconds.append(time.perf_counter() - start)

        # not a daemon: a normal interpreter exit waits for the write to finish
        self._thread = threading.Thread(target=write, name=f"checkpoint-{step}")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint failed: {error}") from error


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state; for a sharded folder, its small state with ``sharded`` = the folder
    (the shards are read into an FSDP model by :func:`sharded.load_sharded`)."""
    path = Path(path)
    if path.is_dir():
        return read_sharded_extra(path)
    return decode_checkpoint(path.read_bytes(), path.name)


def load_latest(folder: str | Path, *, log=None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` whose checksum holds, as ``(path, state)``; ``None``
    when there is none at all. A corrupt one is reported through ``log`` (default: stderr)
    and the one before it tried; if every file is corrupt, :class:`CheckpointError`."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    folder = Path(folder)
    candidates = [p for _, p in reversed(list_checkpoints(folder))]
    pointer = folder / POINTER
    if pointer.is_file():  # the pointer first: it names the checkpoint the run last finished
        named = folder / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    problems = []
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except (CheckpointError, OSError, RuntimeError, EOFError) as exc:
            problems.append(f"{path.name}: {exc}")
            log(f"checkpoint: {exc}; falling back to the previous checkpoint")
    if problems:
        raise CheckpointError(f"no usable checkpoint in {folder}: " + "; ".join(problems))
    return None


# ----------------------------------------------------------------------------- before training

def check_output_dir(folder: str | Path, *, need_bytes: int) -> None:
    """Fail now, not after an hour of training, when ``folder`` cannot hold the checkpoints:
    it must be creatable, writable (a real file is written, fsync-ed and removed, which
    also catches read-only mounts that permission bits do not show) and have ``need_bytes``
    free."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / ".write_test", b"ok")
        (folder / ".write_test").unlink()
    except OSError as exc:
        raise CheckpointError(f"the output folder {folder} is not writable ({exc.strerror or exc}); choose another "
                              f"out_dir (--set out_dir=...) or fix its permissions") from exc
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise CheckpointError(f"the output folder {folder} has {free / 2**20:.1f} MiB free but the checkpoints need "
                              f"about {need_bytes / 2**20:.1f} MiB; free space or choose another out_dir")


# ----------------------------------------------------------------------------- sharded folders (reading)
# A sharded checkpoint (sharded.py writes it) is a folder: its MANIFEST lists the SHA-256 of every file, and
# extra.pt holds the small state. Reading them needs no FSDP, so it lives here, below sharded.py.
MANIFEST = "MANIFEST"
EXTRA = "extra.pt"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sharded(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless every file the manifest lists is there, whole and unchanged."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path.name} has no {MANIFEST} (a write that never finished)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path.name}/{MANIFEST} is unreadable ({exc})") from exc
    for name, entry in manifest.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path.name} is incomplete: {name} is missing")
        if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise CheckpointError(f"{path.name} is corrupt: {name} does not match its checksum (truncated or overwritten)")


def read_sharded_extra(path: str | Path) -> dict[str, Any]:
    """Verify the folder and return its small state, with ``sharded`` set to the folder's path
    (the weights and moments stay on disk until :func:`load_sharded` reads them)."""
    path = Path(path)
    verify_sharded(path)
    state = decode_checkpoint((path / EXTRA).read_bytes(), f"{path.name}/{EXTRA}")
    state["sharded"] = str(path)
    return state
