"""Starting or continuing a run in its ``out_dir``: what a checkpoint restores, and what it refuses.

Exact resume. A checkpoint holds what the next step depends on: weights, optimiser moments,
the step (so the schedule continues where it was), tokens seen, the loader's position, the
Python/NumPy/torch (CPU and CUDA) RNG states, the MLM masking generator, the monitor's
state, the config and the data's fingerprint. :func:`claim_out_dir` decides between a fresh
start and a resume before anything is written; :func:`check_resumable` refuses a resume that
would not continue the same run, each refusal one paragraph that says what to do.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import RunConfig, exactness_differences


@dataclass
class ResumePoint:
    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def tokens_seen(self) -> int:
        return int(self.state["tokens_seen"])

    @property
    def sharded(self) -> bool:
        return "sharded" in self.state


def claim_out_dir(out_dir: Path, *, resume: bool | str, overwrite: bool, log) -> ResumePoint | None:
    """The checkpoint to continue from, or ``None`` for a fresh start, after refusing the cases that lose work.

    ``resume``: ``False`` (a new run: ``out_dir`` must hold no earlier run unless ``overwrite``),
    ``True`` (continue: a checkpoint must exist) or ``"auto"`` (continue when there is a
    checkpoint, else start afresh: what a requeued batch job wants). Reading only; the caller
    clears the folder (:func:`checkpoint.clear_run`) when this returns ``None``.
    """
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume must be False, True or 'auto', got {resume!r}")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: --resume continues the run in out_dir, "
                         "--overwrite deletes it; choose one")
    if not resume:
        earlier = ckpt.previous_run(out_dir)
        if earlier and not overwrite:
            shown = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            raise ckpt.CheckpointError(
                f"{out_dir} already holds a run ({shown}); starting another there would overwrite its metrics and "
                "mix the two runs' checkpoints. Continue it with --resume, train into a new folder with --set "
                "out_dir=..., or delete it and start afresh with --overwrite")
        return None
    found = ckpt.load_latest(out_dir, log=log)
    if found is None and resume is True:
        raise ckpt.CheckpointError(
            f"--resume: there is no checkpoint in {out_dir} (is out_dir spelled right?). To start a new run there, "
            "leave out --resume; to continue when a checkpoint exists and start afresh otherwise (a requeued batch "
            "job), use --resume=auto")
    return None if found is None else ResumePoint(*found)


def check_resumable(point: ResumePoint, config: RunConfig, *, data_fingerprint: str, world_size: int) -> list[str]:
    """The settings that differ from the checkpoint's, as ``"key: saved -> current"`` lines.

    Raises :class:`checkpoint.CheckpointError` when they would make the run differ from an
    uninterrupted one and ``allow_config_change`` is off. The data's fingerprint is compared
    too: a folder whose files changed cannot continue the saved loader position.
    """
    saved = point.state
    diffs = exactness_differences(saved["config"], config.to_dict())
    if saved.get("world_size", 1) != world_size:
        diffs.append(f"world_size: {saved.get('world_size', 1)} -> {world_size}")
    data_changed = saved.get("data_fingerprint") not in (None, data_fingerprint)
    if data_changed:
        diffs.append(f"data fingerprint: {saved['data_fingerprint']} -> {data_fingerprint} (the corpus files, their "
                     "cleaning or the tokenizer changed)")
    if diffs and not config.allow_config_change:
        advice = ("the training data changed since the checkpoint was written (a file in data.folder was added, "
                  "removed or edited): restore the data for an exact resume, " if data_changed else "restore them, ")
        raise ckpt.CheckpointError(
            f"refusing to resume from {point.path}: these settings differ from the checkpoint's and would make the run "
            "differ from an uninterrupted one:\n  " + "\n  ".join(diffs) + f"\n{advice}start a new run (--set "
            "out_dir=... or --overwrite), or pass --set allow_config_change=true to continue from the checkpoint's "
            "weights anyway")
    return diffs


def load_model_weights(model: torch.nn.Module, point: ResumePoint) -> None:
    """The checkpoint's weights into ``model``; a model of another shape is a one-paragraph error."""
    saved = point.state["model"]
    mine = model.state_dict()
    misfits = [f"{k} {tuple(v.shape)} -> {tuple(mine[k].shape)}" for k, v in saved.items()
               if k in mine and v.shape != mine[k].shape]
    missing, unexpected = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if misfits or missing or unexpected:
        detail = "; ".join(misfits[:3] + [f"missing {k}" for k in missing[:2]] + [f"extra {k}" for k in unexpected[:2]])
        raise ckpt.CheckpointError(
            f"the weights in {point.path} do not fit the model this config builds ({detail}). allow_config_change "
            "can change the schedule or the batch, never the model's shape or its vocabulary: resume with the "
            "checkpoint's [model] and tokenizer settings, or start a new run (--set out_dir=... or --overwrite)")
    model.load_state_dict(saved)


def load_loader_state(loader, point: ResumePoint, rank: int, *, data_changed_ok: bool, log) -> None:
    """Put the loader where the saved run's rank ``rank`` stood; a changed corpus under
    ``allow_config_change`` starts the data order afresh (said in the log)."""
    try:
        loader.load_state_dict(point.state["loader"][rank])
    except ValueError as exc:
        if not data_changed_ok:
            raise ckpt.CheckpointError(
                f"cannot continue the data order saved in {point.path}: the training data differ from the run's "
                f"({exc}). Restore the data, or pass --set allow_config_change=true to continue from the "
                "checkpoint's weights with the data order started afresh") from None
        log("the data changed: the loader starts a new pass over the new data (the resume is not exact)")


# ----------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # NumPy's key array as a tensor: checkpoints load with weights_only=True, which refuses ndarrays
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EndlessBatches:
    """The loader's epochs one after another, for as many steps as the run needs.

    ``restore_rng``: RNG states to put back when iteration begins. The engine seeds the
    global RNG when ``train()`` starts and only then asks for batches, so this is the first
    moment a resumed run can restore the RNG without the engine overwriting it.
    """

    def __init__(self, loader, restore_rng: dict | None = None):
        self.loader, self.restore_rng = loader, restore_rng

    def __iter__(self):
        if self.restore_rng is not None:
            set_rng_state(self.restore_rng)
            self.restore_rng = None
        while True:
            yield from self.loader
