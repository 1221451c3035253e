"""Tokenising a corpus across processes.

Each worker process builds the tokenizer once, from its JSON text, in the pool's
initializer; a task is only a file path, and the worker reads the file itself. Nothing
large crosses a process boundary except the resulting ids (as compact numpy arrays).
The source chapter's pool, by contrast, pickles its whole preprocessor object with every
task and sends every example back as Python objects.

Within a process, ``Tokenizer.encode_batch`` has its own thread parallelism (controlled
by the ``TOKENIZERS_PARALLELISM`` environment variable); workers switch it off so that
N processes use N cores and not N x cores threads.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from .clean import normalize_text
from .corpus import decode_utf8
from .shards import choose_dtype
from .tokenizer import encode_texts

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode_file(path: str) -> tuple[str, np.ndarray, int]:
    data = Path(path).read_bytes()
    text = normalize_text(decode_utf8(data, path))
    (ids,) = encode_texts(_worker_tokenizer, [text])
    return path, np.asarray(ids, dtype=choose_dtype(_worker_tokenizer.get_vocab_size())), len(data)


def tokenize_files(paths: Sequence[str | Path], tokenizer: Tokenizer, *, processes: int = 1,
                   start_method: str = "spawn") -> list[np.ndarray]:
    """Token ids of every file (read, decoded, normalised, encoded with
    :func:`pretrain_lib.data.tokenizer.encode_texts`), in the order of ``paths``.

    Returns one 1-D array per file, in the smallest unsigned dtype that holds the vocabulary
    (:func:`pretrain_lib.data.shards.choose_dtype`: uint16 up to 65,536 ids).

    ``processes=1`` runs in this process (no pool); more uses a ``multiprocessing`` pool with
    ``imap`` in order. ``start_method="spawn"`` works everywhere (and is the macOS default);
    "fork" starts faster on Linux.
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    paths = [str(p) for p in paths]
    if processes == 1:
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        try:
            _init_worker(tokenizer.to_str())
            return [ids for _, ids, _ in map(_encode_file, paths)]
        finally:  # leave this process's thread setting as it was
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
    ctx = mp.get_context(start_method)
    with ctx.Pool(processes, initializer=_init_worker, initargs=(tokenizer.to_str(),)) as pool:
        return [ids for _, ids, _ in pool.imap(_encode_file, paths, chunksize=max(1, len(paths) // (8 * processes)))]
