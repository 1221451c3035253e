"""Sharded checkpoints for FSDP runs, through ``torch.distributed.checkpoint`` (DCP).

Gathering an FSDP model onto rank 0 to write one file needs the whole model, and its
optimiser moments, in one process's memory: the thing sharding was meant to avoid. Here
every rank writes only its own shards, in parallel, into one folder::

    ckpt_00000500.dcp/
        __0_0.distcp, __1_0.distcp   the weight and AdamW-moment shards of rank 0 and rank 1
        .metadata                    DCP's index: which bytes of which tensor are where
        extra.pt                     step, tokens, loader and RNG states per rank, config (rank 0)
        MANIFEST                     SHA-256 of every file above (rank 0, written last)

Atomicity is the single-file recipe applied to a folder: every rank writes into a hidden
temporary folder (DCP fsyncs each file); after a barrier rank 0 hashes the files, writes the
manifest, renames the folder into place and fsyncs the parent. A run killed at any moment
leaves either no new folder or a complete one. On load, a missing, truncated or altered file
fails the manifest check and the previous checkpoint is used.

DCP reshards on load, so a sharded checkpoint also loads into one process
(:func:`load_sharded_model`), e.g. to evaluate a model trained on many GPUs.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

# The reading side (manifest check, small state) is in checkpoint.py, which load_checkpoint needs without FSDP.
from .checkpoint import (EXTRA, MANIFEST, CheckpointError, atomic_write_bytes, encode_checkpoint, fsync_dir,
                         read_sharded_extra, sha256_file, verify_sharded)


def sharded_name(step: int) -> str:
    return f"ckpt_{step:08d}.dcp"


def save_sharded(folder: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict[str, Any], *, rank: int) -> Path:
    """Write ``ckpt_<step>.dcp`` (every rank calls it: a collective). ``extra`` is the small,
    unsharded state that rank 0 writes next to the shards. Returns the folder's final path."""
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    final = folder / sharded_name(step)
    tmp = folder / f".{final.name}.tmp"
    if rank == 0:  # a leftover from a run killed mid-write
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)   # this rank's shards (DTensors), no gathering
    save({"model": model_state, "optimizer": optim_state}, storage_writer=FileSystemWriter(tmp, sync_files=True))
    if rank == 0:
        atomic_write_bytes(tmp / EXTRA, encode_checkpoint(extra))
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}
        atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        shutil.rmtree(final, ignore_errors=True)   # the same step written again (a resumed run)
        tmp.rename(final)
        fsync_dir(folder)
    dist.barrier()
    return final


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read this rank's shards of the weights and optimiser moments into an FSDP model (a collective)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)   # the layout to fill, shard by shard
    state = {"model": model_state, "optimizer": optim_state}
    load(state, storage_reader=FileSystemReader(Path(path)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_sharded_model(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a sharded checkpoint's weights into a plain (unsharded) model in one process:
    DCP assembles each full tensor from the ranks' shards."""
    from torch.distributed.checkpoint import FileSystemReader, load

    verify_sharded(path)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # DCP warns that it assumes one process: that is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load(state, storage_reader=FileSystemReader(Path(path)), no_dist=True)
    model.load_state_dict(state["model"])
    return model
