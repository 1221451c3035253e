"""Token shards on disk: flat ``numpy.memmap`` files plus one JSON index.

Layout of ``out_dir``::

    index.json          format, dtype, vocab_size, tokenizer fingerprint, shard list
    shard_00000.bin     raw little-endian token ids (uint16 or uint32), no header
    shard_00001.bin     ...

Documents are concatenated, each followed by ``eot_id`` when one is given, and the stream
is cut every ``tokens_per_shard`` tokens (the last shard may be shorter). A reader maps a
shard with ``numpy.memmap``: the operating system pages in only what is read, so a
corpus larger than RAM costs no RAM.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

INDEX_NAME = "index.json"
FORMAT = "pretrain_lib.token_shards/1"


class ShardError(ValueError):
    """A shard set that cannot be read safely (missing, truncated, or from another tokenizer)."""


class TokenizerMismatchError(ShardError):
    """The shards were written with a different tokenizer than the one the reader expects."""


def choose_dtype(vocab_size: int, dtype: str | None = None) -> np.dtype:
    """The smallest unsigned dtype that holds every id below ``vocab_size``.

    uint16 up to 65,536 ids (half the disk and page cache of uint32), uint32 above. A
    ``dtype`` forced by the caller is checked against the vocabulary.
    """
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if dtype is None:
        if vocab_size <= 2 ** 16:
            return np.dtype(np.uint16)
        if vocab_size <= 2 ** 32:
            return np.dtype(np.uint32)
        raise ValueError(f"vocab_size={vocab_size} exceeds 2**32 ids; no supported shard dtype holds it")
    chosen = np.dtype(dtype)
    if chosen.kind != "u":
        raise ValueError(f"shard dtype must be unsigned (uint16 or uint32), got {chosen}")
    if vocab_size - 1 > np.iinfo(chosen).max:
        raise ValueError(f"vocab_size={vocab_size} does not fit in {chosen} (max id {np.iinfo(chosen).max}); "
                         f"use dtype='uint32' or leave dtype=None to choose automatically")
    return chosen


def write_shards(docs: Iterable[Sequence[int]], out_dir: str | Path, *, tokens_per_shard: int, vocab_size: int,
                 tokenizer_fingerprint: str = "", eot_id: int | None = None, dtype: str | None = None) -> Path:
    """Write ``docs`` (token-id sequences) as shards under ``out_dir`` and return the index path.

    Streams: holds one shard's buffer in memory, never the corpus. Ids outside
    ``[0, vocab_size)`` raise (they would come from a different tokenizer).
    """
    if not isinstance(tokens_per_shard, int) or tokens_per_shard <= 0:
        raise ValueError(f"tokens_per_shard must be a positive integer, got {tokens_per_shard!r}")
    np_dtype = choose_dtype(vocab_size, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("shard_*.bin"):  # a previous, larger run must not leave extra shards behind
        stale.unlink()
    shards: list[dict] = []
    buffer = np.empty(tokens_per_shard, dtype=np_dtype)
    filled = 0
    n_docs = 0

    def flush(n: int) -> None:
        name = f"shard_{len(shards):05d}.bin"
        mm = np.memmap(out / name, dtype=np_dtype, mode="w+", shape=(n,))
        mm[:] = buffer[:n]
        mm.flush()
        del mm
        shards.append({"file": name, "num_tokens": int(n)})

    for doc in docs:
        ids = np.asarray(doc, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
            raise ValueError(f"document {n_docs} holds token id {bad} outside [0, {vocab_size}): "
                             f"were these ids made by a tokenizer with a larger vocabulary?")
        if eot_id is not None:
            ids = np.append(ids, eot_id)
        n_docs += 1
        pos = 0
        while pos < ids.size:
            take = min(ids.size - pos, tokens_per_shard - filled)
            buffer[filled:filled + take] = ids[pos:pos + take]
            filled += take
            pos += take
            if filled == tokens_per_shard:
                flush(filled)
                filled = 0
    if filled:
        flush(filled)
    if not shards:
        raise ValueError("write_shards got no tokens: the corpus is empty after cleaning/tokenising")
    index = {"format": FORMAT, "dtype": np_dtype.name, "vocab_size": int(vocab_size),
             "tokenizer_fingerprint": tokenizer_fingerprint, "eot_id": eot_id, "num_documents": n_docs,
             "total_tokens": sum(s["num_tokens"] for s in shards), "shards": shards}
    index_path = out / INDEX_NAME
    index_path.write_text(json.dumps(index, indent=1))
    return index_path


@dataclass(frozen=True)
class ShardIndex:
    """A validated shard index. ``shard(i)`` maps shard ``i`` read-only."""
    path: Path
    dtype: np.dtype
    vocab_size: int
    tokenizer_fingerprint: str
    files: tuple[Path, ...]
    num_tokens: tuple[int, ...]
    eot_id: int | None = None

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def shard(self, i: int) -> np.memmap:
        return np.memmap(self.files[i], dtype=self.dtype, mode="r", shape=(self.num_tokens[i],))


def read_index(index_path: str | Path, *, expected_fingerprint: str | None = None) -> ShardIndex:
    """Load and check an index: every shard file present with exactly the bytes it should hold,
    and (when ``expected_fingerprint`` is given) written with that tokenizer."""
    index_path = Path(index_path)
    if index_path.is_dir():
        index_path = index_path / INDEX_NAME
    if not index_path.is_file():
        raise ShardError(f"no shard index at {index_path}; write shards with write_shards() first")
    try:
        meta = json.loads(index_path.read_text())
    except ValueError as exc:
        raise ShardError(f"{index_path} is not valid JSON ({exc}); rewrite the shards") from exc
    if meta.get("format") != FORMAT:
        raise ShardError(f"{index_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    fingerprint = meta.get("tokenizer_fingerprint", "")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise TokenizerMismatchError(
            f"the shards in {index_path.parent} were written by tokenizer {fingerprint or '(unrecorded)'}, "
            f"but this reader expects {expected_fingerprint}: their ids mean different tokens. "
            f"Re-tokenise the corpus with the current tokenizer, or load the tokenizer that wrote them.")
    dtype = np.dtype(meta["dtype"])
    files, counts = [], []
    for entry in meta["shards"]:
        f = index_path.parent / entry["file"]
        n = int(entry["num_tokens"])
        expected_bytes = n * dtype.itemsize
        if not f.is_file():
            raise ShardError(f"shard {f} listed in {index_path.name} is missing; rewrite the shards")
        actual = f.stat().st_size
        if actual != expected_bytes:
            raise ShardError(f"shard {f.name} holds {actual} bytes but the index says {n} {dtype} tokens "
                             f"= {expected_bytes} bytes: the file is truncated or was overwritten; rewrite the shards")
        files.append(f)
        counts.append(n)
    return ShardIndex(index_path, dtype, int(meta["vocab_size"]), fingerprint, tuple(files), tuple(counts),
                      meta.get("eot_id"))


def read_all_tokens(index_path: str | Path, *, expected_fingerprint: str | None = None) -> np.ndarray:
    """Every token of every shard as one int64 array (for tests and small corpora only)."""
    index = read_index(index_path, expected_fingerprint=expected_fingerprint)
    return np.concatenate([np.asarray(index.shard(i), dtype=np.int64) for i in range(len(index.files))])
