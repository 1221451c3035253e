"""Atomic, checksummed checkpoints (pretrain_lib.capstone.checkpoint)."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from pretrain_lib.capstone import checkpoint as ckpt


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "w": torch.randn(5, 3, generator=g), "nested": {"lr": 0.1 * step, "name": "x"}}


def test_round_trip_keeps_the_last_k_and_points_at_the_newest(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [20, 30]
    assert (tmp_path / ckpt.POINTER).read_text().strip() == "ckpt_00000030.pt"
    path, state = ckpt.load_latest(tmp_path)
    assert path.name == "ckpt_00000030.pt"
    assert state["step"] == 30 and torch.equal(state["w"], _state(30)["w"]) and state["nested"]["lr"] == 0.1 * 30
    assert not list(tmp_path.glob("*.tmp")), "no temporary file may be left behind"


def test_no_checkpoint_is_none(tmp_path):
    assert ckpt.load_latest(tmp_path / "absent") is None
    assert ckpt.load_latest(tmp_path) is None


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    ckpt.save_checkpoint(tmp_path, 10, _state(10), keep=3)
    newest = ckpt.save_checkpoint(tmp_path, 20, _state(20), keep=3)
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-10] ^= 0xFF
    newest.write_bytes(bytes(data))
    messages = []
    path, state = ckpt.load_latest(tmp_path, log=messages.append)
    assert path.name == "ckpt_00000010.pt" and state["step"] == 10
    assert len(messages) == 1 and "ckpt_00000020.pt" in messages[0] and "corrupt" in messages[0]
    assert "falling back" in messages[0]


def test_every_checkpoint_corrupt_is_an_error_naming_them(tmp_path):
    p = ckpt.save_checkpoint(tmp_path, 5, _state(5))
    p.write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint.*ckpt_00000005.pt"):
        ckpt.load_latest(tmp_path, log=lambda _: None)


def test_a_crash_during_the_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 10, _state(10))
    before = (tmp_path / "ckpt_00000010.pt").read_bytes()

    def crash(src, dst):  # the process dies between writing the temporary file and the rename
        raise OSError(errno.EIO, "simulated crash")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save_checkpoint(tmp_path, 10, _state(99))
    monkeypatch.undo()
    assert (tmp_path / "ckpt_00000010.pt").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert ckpt.load_latest(tmp_path)[1]["step"] == 10


def test_the_checksum_covers_every_byte_of_the_payload():
    data = ckpt.encode_checkpoint(_state(3))
    assert ckpt.decode_checkpoint(data)["step"] == 3
    for position in (len(ckpt.MAGIC) + 70, len(data) // 2, len(data) - 1):
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        with pytest.raises(ckpt.CheckpointError, match="corrupt"):
            ckpt.decode_checkpoint(bytes(damaged))
    with pytest.raises(ckpt.CheckpointError, match="not a course checkpoint"):
        ckpt.decode_checkpoint(b"PK\x03\x04 a plain torch.save zip file")


def test_output_folder_checks_fail_before_training(tmp_path, monkeypatch):
    ckpt.check_output_dir(tmp_path / "fine", need_bytes=1024)
    assert not list((tmp_path / "fine").iterdir()), "the write probe must be removed"
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="not writable"):
        ckpt.check_output_dir(not_a_folder / "run", need_bytes=1)

    class Usage:
        free = 10 * 2**20

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: Usage())
    with pytest.raises(ckpt.CheckpointError, match=r"10.0 MiB free but the checkpoints need about 100.0 MiB"):
        ckpt.check_output_dir(tmp_path / "full", need_bytes=100 * 2**20)


def test_a_read_only_mount_is_reported(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", read_only)
    with pytest.raises(ckpt.CheckpointError, match="not writable.*Read-only file system"):
        ckpt.check_output_dir(tmp_path, need_bytes=1)


def test_a_background_write_saves_the_state_as_it_was_when_submitted(tmp_path):
    weights = torch.arange(6.0)
    writer = ckpt.BackgroundWriter()
    writer.submit(tmp_path, 3, {"step": 3, "model": {"w": weights}, "rng": (1, weights)}, keep=2)
    weights.add_(100.0)   # training goes on changing the tensors in place
    writer.wait()
    path, state = ckpt.load_latest(tmp_path)
    assert path.name == "ckpt_00000003.pt" and state["step"] == 3
    assert torch.equal(state["model"]["w"], torch.arange(6.0)) and torch.equal(state["rng"][1], torch.arange(6.0))
    assert len(writer.write_seconds) == 1


def test_a_failed_background_write_is_raised_in_the_training_thread(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    writer = ckpt.BackgroundWriter()
    monkeypatch.setattr(ckpt, "atomic_write_bytes", full_disk)
    writer.submit(tmp_path, 1, {"step": 1})
    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        writer.wait()
    writer.wait()   # reported once; the writer is usable again


# ----------------------------------------------------------------------------- retention and permissions

def test_retention_keeps_the_new_checkpoint_not_a_corrupt_later_one(tmp_path):
    """A run resumed from step 4 past a corrupt step 8 writes step 6: 6 must stay, and 8 (a dead timeline) go."""
    for step in (4, 8):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep=2)
    (tmp_path / "ckpt_00000008.pt").write_bytes(b"garbage")
    path, _ = ckpt.load_latest(tmp_path, log=lambda _: None)
    assert path.name == "ckpt_00000004.pt"
    ckpt.save_checkpoint(tmp_path, 6, _state(6), keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6]
    assert ckpt.load_latest(tmp_path)[1]["step"] == 6


def test_retention_counts_keep_from_the_new_checkpoint_backwards(tmp_path):
    for step in (2, 4, 8):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep=3)
    ckpt.save_checkpoint(tmp_path, 6, _state(6), keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]
    assert (tmp_path / ckpt.POINTER).read_text().strip() == "ckpt_00000006.pt"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o007, 0o660)])
def test_checkpoints_and_rewritten_files_follow_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = ckpt.save_checkpoint(tmp_path, 1, _state(1))
        rewritten = ckpt.atomic_write_bytes(tmp_path / "metrics.jsonl", b"{}\n")
    finally:
        os.umask(old)
    for p in (path, tmp_path / ckpt.POINTER, rewritten):
        assert p.stat().st_mode & 0o777 == mode, f"{p.name}: {oct(p.stat().st_mode & 0o777)}"


def test_previous_run_and_clear_run(tmp_path):
    assert ckpt.previous_run(tmp_path) == []
    ckpt.save_checkpoint(tmp_path, 3, _state(3))
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    assert ckpt.previous_run(tmp_path) == ["ckpt_00000003.pt", "metrics.jsonl", "latest"]
    ckpt.clear_run(tmp_path)
    assert ckpt.previous_run(tmp_path) == [] and (tmp_path / "notes.txt").read_text() == "mine"
