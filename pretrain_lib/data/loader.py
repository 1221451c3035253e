"""Batches for training.

``random_windows`` / ``random_batch`` are nanoGPT's ``get_batch``: random contiguous
windows of a long token stream, the simplest loader for causal language modelling.
``ShardedTokenDataset`` + ``ResumableLoader`` read token shards from disk, split across
ranks and DataLoader workers with no overlap, and resume exactly. ``MLMCollator`` masks
each batch when it is made (dynamic masking).
"""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..objectives import mask_tokens
from .shards import read_index


def random_windows(tokens: torch.Tensor, *, batch_size: int, seq_len: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``batch_size`` windows of ``seq_len`` consecutive tokens from a 1-D stream.

    Returns ``(batch_size, seq_len)`` int64. For CLM, the loss shifts inside the window,
    so a window of T tokens gives T-1 predictions.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    if tokens.numel() < seq_len:
        raise ValueError(f"the stream has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    starts = torch.randint(tokens.numel() - seq_len + 1, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len)
    return tokens[starts[:, None] + offsets[None, :]].long()


# ---------------------------------------------------------------- nanoGPT-style batches from a memmap

def random_batch(tokens, *, batch_size: int, seq_len: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's ``get_batch`` on a 1-D token array (a ``numpy.memmap`` shard or a tensor).

    Returns ``(x, y)``, both ``(batch_size, seq_len)`` int64, with ``y`` the next tokens of
    ``x``. Only the ``batch_size`` windows are read from disk, never the whole shard.
    """
    n = len(tokens)
    if n < seq_len + 1:
        raise ValueError(f"the stream has {n} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(n - seq_len, (batch_size,), generator=generator).tolist()
    rows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    block = torch.from_numpy(rows)
    return block[:, :-1], block[:, 1:]


# ---------------------------------------------------------------- sharded, resumable iterable dataset

class ShardedTokenDataset(IterableDataset):
    """``(seq_len + 1)``-token windows of a shard set, split across ranks and workers, resumable.

    Windows: in a shard of n tokens, window k covers tokens ``[k*seq_len, k*seq_len + seq_len + 1)``
    for k < (n - 1) // seq_len (consecutive windows share one token, so every token after
    the first is a target exactly once). Windows never cross shard boundaries.

    Order: each epoch, all windows of all shards are shuffled with ``default_rng([seed, epoch])`` (the
    same permutation on every rank, no communication needed). Rank r takes every
    ``world_size``-th window starting at r; inside a rank, the remaining windows are cut
    into chunks of ``chunk_size`` and DataLoader worker w takes chunks w, w + W, ... The
    ranks' windows are disjoint and together cover every window once per epoch; when the
    number of windows is not a multiple of ``world_size`` the first ranks get one more.

    Resuming: ``state_dict()`` records the epoch and how many of this rank's windows were
    consumed, as a few JSON-serialisable ints. Iterating the dataset directly (in this
    process, one iterator at a time) counts a window when it is handed over, so the state
    taken after k windows resumes at window k. Through :class:`ResumableLoader` (which sets
    ``chunk_size`` to the batch size so that the DataLoader's round-robin over workers
    returns the windows in stream order) the loader counts what it handed to the training
    loop. A plain ``DataLoader`` with worker processes iterates copies of the dataset in
    those processes, so nothing counts there: use :class:`ResumableLoader` to resume one.
    """

    def __init__(self, index_path: str | Path, *, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, expected_fingerprint: str | None = None):
        super().__init__()
        if not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.index = read_index(index_path, expected_fingerprint=expected_fingerprint)
        self.seq_len, self.rank, self.world_size = seq_len, rank, world_size
        self.seed, self.shuffle = int(seed), bool(shuffle)
        counts = [max(0, (n - 1) // seq_len) for n in self.index.num_tokens]
        self.window_shard = np.repeat(np.arange(len(counts)), counts)
        self.window_start = np.concatenate([np.arange(c) * seq_len for c in counts]) if counts else np.zeros(0, int)
        if self.window_shard.size < world_size:
            raise ValueError(f"the shards hold {self.window_shard.size} window(s) of {seq_len + 1} tokens, fewer than "
                             f"world_size={world_size}: use a smaller seq_len or more data")
        self.epoch = 0
        self.position = 0           # windows of this rank's stream already consumed this epoch
        self.chunk_size = 1
        self.externally_tracked = False
        self._maps: dict[int, np.memmap] = {}

    # -- the order ------------------------------------------------------------
    @property
    def num_windows(self) -> int:
        """Windows in the whole shard set (all ranks)."""
        return int(self.window_shard.size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global window ids in this epoch's order (identical on every rank)."""
        if not self.shuffle:
            return np.arange(self.num_windows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def rank_stream(self, epoch: int | None = None) -> np.ndarray:
        """This rank's window ids for ``epoch``, in the order training consumes them."""
        return self.epoch_order(self.epoch if epoch is None else epoch)[self.rank::self.world_size]

    def worker_windows(self, worker: int, num_workers: int, *, start: int = 0, epoch: int | None = None) -> np.ndarray:
        """Window ids worker ``worker`` of ``num_workers`` yields, from stream position ``start``."""
        rest = self.rank_stream(epoch)[start:]
        chunk_of_item = np.arange(rest.size) // self.chunk_size
        return rest[chunk_of_item % num_workers == worker]

    def __len__(self) -> int:
        return int(self.rank_stream().size)

    # -- reading --------------------------------------------------------------
    def window(self, window_id: int) -> torch.Tensor:
        """Window ``window_id`` as ``(seq_len + 1,)`` int64."""
        shard = int(self.window_shard[window_id])
        if shard not in self._maps:  # opened lazily in each process: memmaps are not pickled to workers
            self._maps[shard] = self.index.shard(shard)
        start = int(self.window_start[window_id])
        return torch.from_numpy(np.asarray(self._maps[shard][start:start + self.seq_len + 1], dtype=np.int64))

    def start_epoch_if_finished(self) -> None:
        """Move to the next epoch when this one has been consumed entirely."""
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        counting = info is None and not self.externally_tracked  # iterated directly, in this process
        if counting:
            self.start_epoch_if_finished()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for window_id in self.worker_windows(worker, num_workers, start=self.position):
            window = self.window(int(window_id))
            if counting:
                self.position += 1  # counted as it is handed over: a state taken now resumes after it
            yield window

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    # -- resuming -------------------------------------------------------------
    _ORDER_KEYS = ("seed", "shuffle", "seq_len", "rank", "world_size", "num_windows", "total_tokens")

    def state_dict(self) -> dict[str, int]:
        """Where this rank's stream stands: ``epoch`` and ``position`` (windows of this rank's
        stream consumed in that epoch), plus the settings that fix the window order, which
        :meth:`load_state_dict` checks. Plain ints: the dict survives ``json.dumps``."""
        return {"epoch": int(self.epoch), "position": int(self.position), "seed": self.seed,
                "shuffle": int(self.shuffle), "seq_len": self.seq_len, "rank": self.rank,
                "world_size": self.world_size, "num_windows": self.num_windows,
                "total_tokens": int(self.index.total_tokens)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict`): the next window is the one the
        saved run would have read next. Refuses a state saved with other settings or data."""
        missing = [k for k in ("epoch", "position", *self._ORDER_KEYS) if k not in state]
        if missing:
            raise ValueError(f"cannot resume: the saved loader state lacks {missing}; save it with state_dict()")
        mine = self.state_dict()
        for key in self._ORDER_KEYS:
            if int(state[key]) != mine[key]:
                raise ValueError(f"cannot resume: the saved loader state has {key}={state[key]} but this dataset has "
                                 f"{key}={mine[key]}; the window order would differ")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"cannot resume: epoch={epoch}, position={position} is outside this rank's stream of "
                             f"{len(self)} windows")
        self.epoch, self.position = epoch, position


def _batch_len(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _batch_len(batch[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def clm_collate(windows: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack windows into ``{"input_ids": (batch, seq_len + 1)}`` int64: the batch dict that
    :func:`pretrain_lib.train.train` reads (the causal loss shifts inside each window)."""
    return {"input_ids": torch.stack([torch.as_tensor(w, dtype=torch.long) for w in windows])}


class ResumableLoader:
    """A DataLoader over a :class:`ShardedTokenDataset` whose ``state_dict()`` is exact.

    Each ``iter()`` is the rest of the current epoch. ``state_dict()`` after k batches,
    loaded into a fresh dataset and loader with the same settings, yields exactly the
    batches the uninterrupted loader would have yielded next (same ``num_workers`` or not:
    the stream order does not depend on it).

    Batches are ``(batch, seq_len + 1)`` int64 tensors; ``collate_fn=clm_collate`` makes them
    the engine's batch dicts, ``collate_fn=MLMCollator(...)`` masks them. ``pin_memory``
    (default: when CUDA is available) returns batches in page-locked host memory, so that
    ``batch.to(device, non_blocking=True)`` copies without blocking the host.
    """

    def __init__(self, dataset: ShardedTokenDataset, *, batch_size: int, num_workers: int = 0,
                 collate_fn=None, multiprocessing_context: str | None = None, pin_memory: bool | None = None,
                 **dataloader_kwargs):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if dataloader_kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers=True would keep the workers' copy of the position from the first "
                             "epoch; ResumableLoader starts its workers at each iter(), leave it False")
        self.dataset = dataset
        self.batch_size = batch_size
        dataset.chunk_size = batch_size   # a worker's batch is one chunk: batches come back in stream order
        dataset.externally_tracked = True
        if num_workers > 0 and multiprocessing_context is None:
            multiprocessing_context = "fork" if "fork" in mp.get_all_start_methods() else None
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self.dataloader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                                     multiprocessing_context=multiprocessing_context if num_workers else None,
                                     pin_memory=pin_memory, **dataloader_kwargs)

    def __iter__(self):
        self.dataset.start_epoch_if_finished()
        for batch in self.dataloader:
            self.dataset.position += _batch_len(batch)  # counted before it is handed over
            yield batch
        self.dataset.position = len(self.dataset)      # the epoch is over (drop_last may have left a tail)

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        left = len(self.dataset) - self.dataset.position
        return left // self.batch_size if self.dataloader.drop_last else -(-left // self.batch_size)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


# ---------------------------------------------------------------- dynamic MLM masking per batch

class MLMCollator:
    """Stack windows and mask them *now*, per batch, with :func:`pretrain_lib.objectives.mask_tokens`.

    A window seen in two epochs gets two different masks (dynamic masking, RoBERTa), where
    masking once at load time (the source chapter) shows the model the same blanks every
    epoch. Each process (main or DataLoader worker) draws from its own generator seeded
    with ``seed`` and the worker id, so workers do not repeat each other's masks.

    Returns ``{"input_ids": (batch, L), "labels": (batch, L)}`` int64.
    """

    def __init__(self, *, mask_token_id: int, vocab_size: int, special_token_ids: Iterable[int] = (),
                 mlm_probability: float = 0.15, seed: int = 0):
        self.mask_token_id, self.vocab_size = mask_token_id, vocab_size
        self.special_token_ids = tuple(int(i) for i in special_token_ids)
        self.mlm_probability, self.seed = mlm_probability, seed
        self._generator: torch.Generator | None = None
        self._owner: tuple[int, int] | None = None

    def _rng(self) -> torch.Generator:
        info = get_worker_info()
        owner = (os.getpid(), -1 if info is None else info.id)
        if self._generator is None or self._owner != owner:
            self._generator = torch.Generator().manual_seed(self.seed * 1_000_003 + owner[1] + 1)
            self._owner = owner
        return self._generator

    def __call__(self, windows: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = torch.stack([torch.as_tensor(w, dtype=torch.long) for w in windows])
        inputs, labels = mask_tokens(batch, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                                     special_token_ids=self.special_token_ids,
                                     mlm_probability=self.mlm_probability, generator=self._rng())
        return {"input_ids": inputs, "labels": labels}
