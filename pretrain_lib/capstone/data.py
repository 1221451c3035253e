"""Data for the capstone: corpus → clean → tokenizer → token shards, once, cached by fingerprint.

Everything here calls the chapter-2 pipeline (``pretrain_lib.data``); this module only decides
*what* to prepare and *where* it is cached. The cache folder is named by a fingerprint of
every setting that changes the tokens (corpus, its files' names and sizes, cleaning, the
tokenizer and its vocabulary, the split), so a second run with the same ``[data]`` section
reuses the shards and a changed one prepares new ones next to the old. A folder is built
under a temporary name and renamed when complete: an interrupted preparation never
leaves a half-written cache that a later run would trust.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from ..data import corpus as corpus_mod
from ..data.clean import CleaningReport, clean_documents, code_rules, gopher_rules
from ..data.loader import ResumableLoader, ShardedTokenDataset, clm_collate
from ..data.shards import read_index, write_shards
from ..data.tokenizer import (EOT, SPECIAL_TOKENS, UNK, encode_texts, load_tokenizer, save_tokenizer,
                              tokenizer_fingerprint, train_tokenizer)
from ..utils import REPO_ROOT
from .config import DataSection, RunConfig

CACHE_FORMAT = "capstone-data/1"   # bump when the preparation below changes what it writes
_DATA_KEYS = ("corpus", "folder", "max_docs", "tokenizer", "vocab_size", "val_fraction")


def _data_keys(data: DataSection) -> tuple[str, ...]:
    """The settings that name the prepared data; cleaning thresholds only when set (old caches stay valid)."""
    return _DATA_KEYS + tuple(k for k in ("min_words", "max_symbol_ratio", "max_duplicate_lines", "min_lines")
                              if getattr(data, k))


# ----------------------------------------------------------------------------- character tokenizer

def train_char_tokenizer(texts) -> Tokenizer:
    """A character-level tokenizer (nanoGPT's ``shakespeare_char``) in the ``tokenizers`` format.

    Ids 0-4 are the course's special tokens and 5 is ``[UNK]`` (as for WordPiece), then one
    id per distinct character of ``texts`` in sorted order. Using the library's format means
    the rest of the pipeline (``encode_texts``, fingerprints, shards) needs no special case.
    """
    chars = sorted(set(itertools.chain.from_iterable(texts)))
    if not chars:
        raise ValueError("train_char_tokenizer got no characters: the corpus is empty")
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, UNK))}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()  # join the characters back without spaces
    return tok


# ----------------------------------------------------------------------------- corpus

def _source_files(data: DataSection) -> list[Path]:
    if data.corpus == "shakespeare":
        return corpus_mod.shakespeare_play_paths()
    if data.corpus == "code":
        return corpus_mod.python_stdlib_paths()
    folder = resolve_path(data.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.folder = {data.folder!r} is not a folder (looked at {folder})")
    return sorted(p for p in folder.rglob("*.txt") if p.is_file())


def iter_documents(data: DataSection) -> Iterator[corpus_mod.Document]:
    """The configured corpus, lazily, cut to ``max_docs`` (0: all)."""
    if data.corpus == "shakespeare":
        docs = corpus_mod.iter_shakespeare()
    elif data.corpus == "code":
        docs = corpus_mod.iter_python_stdlib()
    else:
        docs = corpus_mod.load_text_folder(resolve_path(data.folder))
    return itertools.islice(docs, data.max_docs or None)


def resolve_path(path: str) -> Path:
    """Relative paths in a config are relative to the course's root folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


_resolve = resolve_path   # the old name


def cleaning_rules(data: DataSection):
    """``domain -> rules`` for :func:`clean_documents`: chapter 2.1's rules with the config's thresholds."""
    def given(value, default):
        return value if value else default

    def rules_for(domain: str):
        if domain == "code":
            return code_rules(min_lines=given(data.min_lines, 5),
                              max_duplicate_lines=given(data.max_duplicate_lines, 0.5))
        return gopher_rules(min_words=given(data.min_words, 50), max_symbol_ratio=given(data.max_symbol_ratio, 0.1),
                            max_duplicate_lines=given(data.max_duplicate_lines, 0.3))
    return rules_for


def dropped_files_report(report: CleaningReport, rules_for, domain: str, *, limit: int = 20) -> list[str]:
    """One line per document cleaning dropped: its name and the rule (with its threshold) it failed."""
    described = {r.name: r.description for r in rules_for(domain)}
    described["empty"] = "empty after normalisation"
    lines = [f"{name}: {rule} ({described.get(rule, rule)})" for rule, names in report.removed_names.items()
             for name in names]
    return lines[:limit] + ([f"... and {len(lines) - limit} more (all in meta.json)"] if len(lines) > limit else [])


def data_fingerprint(data: DataSection) -> str:
    """16 hex digits naming the prepared data: the settings that change tokens and the
    corpus's files (names and sizes), so an edited text file gets a fresh cache."""
    settings = {k: getattr(data, k) for k in _data_keys(data)}
    files = [(p.name, p.stat().st_size) for p in _source_files(data)]
    blob = json.dumps({"format": CACHE_FORMAT, "settings": settings, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- preparation

@dataclass(frozen=True)
class PreparedData:
    folder: Path
    fingerprint: str
    tokenizer_path: Path
    train_index: Path
    val_index: Path
    vocab_size: int
    meta: dict

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)


def _load_prepared(folder: Path) -> PreparedData:
    meta = json.loads((folder / "meta.json").read_text())
    return PreparedData(folder, meta["fingerprint"], folder / "tokenizer.json", folder / "train" / "index.json",
                        folder / "val" / "index.json", int(meta["vocab_size"]), meta)


def prepare_data(data: DataSection, *, verbose: bool = True) -> PreparedData:
    """Clean, tokenise and shard the corpus once; later calls with the same settings reuse it.

    Layout of ``<cache_dir>/<fingerprint>/``: ``tokenizer.json``, ``train/`` and ``val/``
    shard sets (``index.json`` + ``shard_*.bin``), ``meta.json`` (counts and the cleaning
    report). The token stream is every document followed by ``<|endoftext|>``; its first
    ``1 - val_fraction`` is the training split and the rest validation, as nanoGPT splits
    its text 90/10 (the last plays are text the model never trains on).
    """
    fingerprint = data_fingerprint(data)
    cache = _resolve(data.cache_dir)
    folder = cache / fingerprint
    if (folder / "meta.json").is_file():
        return _load_prepared(folder)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{fingerprint}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    report = CleaningReport()
    rules_for = cleaning_rules(data)
    texts = [d.text for d in clean_documents(iter_documents(data), rules=rules_for, report=report)]
    dropped = dropped_files_report(report, rules_for, "code" if data.corpus == "code" else data.corpus)
    if dropped and verbose:
        print(f"data: cleaning dropped {report.docs_in - report.docs_out} of {report.docs_in} documents (thresholds: "
              "data.min_words, data.max_symbol_ratio, data.max_duplicate_lines, data.min_lines):\n  "
              + "\n  ".join(dropped))
    if data.tokenizer == "char":
        tok = train_char_tokenizer(texts)
    else:
        tok = train_tokenizer(texts, vocab_size=data.vocab_size, kind=data.tokenizer)
    save_tokenizer(tok, tmp / "tokenizer.json")
    eot = tok.token_to_id(EOT)
    pieces = []
    for start in range(0, len(texts), 16):  # 16 documents at a time: int32 arrays, not lists of Python ints
        for ids in encode_texts(tok, texts[start:start + 16]):
            pieces.append(np.asarray(ids + [eot], dtype=np.int32))
    stream = np.concatenate(pieces)
    n_train = int(round(stream.size * (1.0 - data.val_fraction)))
    fp_tok = tokenizer_fingerprint(tok)
    vocab_size = tok.get_vocab_size()
    for split, part in (("train", stream[:n_train]), ("val", stream[n_train:])):
        write_shards([part], tmp / split, tokens_per_shard=data.tokens_per_shard, vocab_size=vocab_size,
                     tokenizer_fingerprint=fp_tok)
    meta = {"fingerprint": fingerprint, "tokenizer_fingerprint": fp_tok, "vocab_size": vocab_size,
            "documents": len(texts), "characters": sum(len(t) for t in texts), "tokens": int(stream.size),
            "train_tokens": n_train, "val_tokens": int(stream.size - n_train), "cleaning": report.table(),
            "dropped": report.removed_names, "settings": {k: getattr(data, k) for k in _data_keys(data)}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process (a second rank, a parallel test) finished first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():
            raise
    if verbose:
        print(f"data: prepared {meta['documents']} documents → {meta['tokens']:,} tokens "
              f"(vocabulary {vocab_size}) in {folder}")
    return _load_prepared(folder)


# ----------------------------------------------------------------------------- batches

def train_loader(prepared: PreparedData, config: RunConfig, *, rank: int = 0, world_size: int = 1) -> ResumableLoader:
    """This rank's resumable loader over the training shards: ``(batch, seq_len + 1)`` windows,
    shuffled per epoch with the run's seed, batches of a fixed shape (``drop_last``)."""
    dataset = ShardedTokenDataset(prepared.train_index, seq_len=config.model.seq_len, rank=rank,
                                  world_size=world_size, seed=config.seed,
                                  expected_fingerprint=prepared.meta["tokenizer_fingerprint"])
    # The DataLoader draws a base seed for its workers from a generator at every iter(); its own
    # generator keeps that draw out of the global RNG, which dropout uses and a resume restores.
    return ResumableLoader(dataset, batch_size=config.train.batch_size, num_workers=config.data.num_workers,
                           collate_fn=clm_collate, drop_last=True,
                           generator=torch.Generator().manual_seed(config.seed),
                           worker_init_fn=leave_stop_signals_to_the_trainer if config.data.num_workers else None)


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """In a loader worker: ignore SIGTERM/SIGUSR1, which a scheduler may send to every process of the job.
    The training process checkpoints and then ends its workers; a worker killed first would fail the run."""
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def validation_batches(prepared: PreparedData, config: RunConfig) -> list[dict[str, torch.Tensor]]:
    """The first ``eval_batches`` batches of validation windows, in order: the same fixed set
    at every evaluation, so two evaluations differ only because the model did."""
    dataset = ShardedTokenDataset(prepared.val_index, seq_len=config.model.seq_len, shuffle=False,
                                  expected_fingerprint=prepared.meta["tokenizer_fingerprint"])
    b = config.train.batch_size
    n = min(config.train.eval_batches * b, len(dataset))
    if n < b:
        raise ValueError(f"the validation split holds {len(dataset)} windows of {config.model.seq_len + 1} tokens, "
                         f"fewer than one batch of {b}: raise data.val_fraction or use more documents")
    windows = [dataset.window(i) for i in range(n - n % b)]
    return [clm_collate(windows[i:i + b]) for i in range(0, len(windows), b)]


def train_tokens(prepared: PreparedData) -> int:
    return read_index(prepared.train_index).total_tokens
