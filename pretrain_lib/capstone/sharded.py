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
import re
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
                 extra: dict[str, Any], *, rank: int, prefix: str = "") -> Path:
    """Write ``ckpt_<step>.dcp`` (every rank calls it: a collective). ``extra`` is the small,
    unsharded state that rank 0 writes next to the shards. ``prefix`` (a device mesh's tp coordinate,
    ``"tp0"``, ``"tp1"``) keeps apart the slices that tensor-parallel ranks hold under one parameter
    name. Returns the folder's final path."""
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
    save(_keyed({"model": model_state, "optimizer": optim_state}, prefix),
         storage_writer=FileSystemWriter(tmp, sync_files=True))
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


def _keyed(state: dict, prefix: str) -> dict:
    return {prefix: state} if prefix else state


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, prefix: str = "") -> None:
    """Read this rank's shards of the weights and optimiser moments into an FSDP model (a collective);
    ``prefix`` as :func:`save_sharded` wrote it."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)   # the layout to fill, shard by shard
    state = _keyed({"model": model_state, "optimizer": optim_state}, prefix)
    load(state, storage_reader=FileSystemReader(Path(path)))
    state = state[prefix] if prefix else state
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_sharded_model(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a sharded checkpoint's weights into a plain (unsharded) model in one process:
    DCP assembles each full tensor from the ranks' shards. A device-mesh run's checkpoint holds one
    set of slices per tp coordinate (``tp0.model...``); those are joined as the split cut them."""
    from torch.distributed.checkpoint import FileSystemReader, load

    verify_sharded(path)
    reader = FileSystemReader(Path(path))
    saved = reader.read_metadata().state_dict_metadata
    prefixes = sorted({k.split(".")[0] for k in saved if re.match(r"tp\d+\.model\.", k)}, key=lambda p: int(p[2:]))
    with warnings.catch_warnings():  # DCP warns that it assumes one process: that is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        if not prefixes:
            state = {"model": model.state_dict()}
            load(state, storage_reader=reader, no_dist=True)
            model.load_state_dict(state["model"])
            return model
        parts = []
        for prefix in prefixes:   # each tp coordinate's slices, whole over the dp ranks that sharded them
            start = f"{prefix}.model."
            empty = {k[len(start):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in saved.items()
                     if k.startswith(start)}
            state = {prefix: {"model": empty}}
            load(state, storage_reader=FileSystemReader(Path(path)), no_dist=True)
            parts.append(state[prefix]["model"])
    from ..distributed.tensor_parallel_layers import merge_tensor_parallel_state
    model.load_state_dict(merge_tensor_parallel_state(parts))
    return model
