"""Data for the capstone: corpus → clean → tokenizer → token shards, once, cached by fingerprint.

Everything here calls the chapter-2 pipeline (``pretrain_lib.data``); this module only decides
*what* to prepare and *where* it is cached. The cache folder is named by a fingerprint of
every setting that changes the tokens (corpus, its files' names and sizes, cleaning, the
tokenizer and its vocabulary, the split), so a second run with the same ``[data]`` section
reuses the shards and a changed one prepares new ones next to the old. A folder is built
under a temporary name and renamed when complete: an interrupted preparation never
leaves a half-written cache that a later run would trust.

The validation split (``data.split``) is made of whole documents for a folder of your own text
(and the code corpus): ordered by a hash of their names, documents join it while they bring its
share of the tokens closer to ``val_fraction`` (:func:`choose_validation_documents`), so a folder
whose last files differ in kind still gets a validation set drawn from all of it. The Shakespeare
corpus keeps the tail split (the last ``val_fraction`` of the token stream of the plays in sorted
order, nanoGPT's 90/10): its last plays are the text the benchmark's items come from. A single
document is always split at its tail.
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
from .config import DataSection, RunConfig, data_cache_dir, resolve_path

CACHE_FORMAT = "capstone-data/1"   # bump when the preparation below changes what it writes
_DATA_KEYS = ("corpus", "folder", "max_docs", "tokenizer", "vocab_size", "val_fraction")


def _data_keys(data: DataSection) -> tuple[str, ...]:
    """The settings that name the prepared data; cleaning thresholds only when set (old caches stay valid)."""
    return _DATA_KEYS + tuple(k for k in ("min_words", "max_symbol_ratio", "max_duplicate_lines", "min_lines")
                              if getattr(data, k))


def _settings(data: DataSection) -> dict:
    """The settings that change the tokens, as the fingerprint sees them: the folder as an absolute path (the
    same folder named two ways is one cache), and the split only when it is by document (a tail split names
    its data as it did before ``data.split`` existed, so the shipped configs' caches stay valid)."""
    settings = {k: getattr(data, k) for k in _data_keys(data)}
    if data.folder:
        settings["folder"] = str(resolve_path(data.folder))
    if split_mode(data) == "documents":
        settings["split"] = "documents"
    return settings


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
    settings = _settings(data)
    files = [(p.name, p.stat().st_size) for p in _source_files(data)]
    blob = json.dumps({"format": CACHE_FORMAT, "settings": settings, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the validation split

def split_mode(data: DataSection) -> str:
    """``"documents"`` or ``"tail"``: ``data.split``, with ``"auto"`` choosing the tail for the Shakespeare
    corpus (the benchmark's items come from its last plays, which the tail split holds out) and whole
    documents for every other corpus. A corpus of one document is split at its tail whatever this says."""
    if data.split != "auto":
        return data.split
    return "tail" if data.corpus == "shakespeare" else "documents"


def document_hash(name: str) -> str:
    """The key that orders documents for the split: SHA-256 of the document's name (its path in the folder)."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def choose_validation_documents(names: list[str], sizes: list[int], val_fraction: float) -> list[bool]:
    """Which documents make the validation split: ``True`` for each one taken.

    Going through the documents in the order of :func:`document_hash` of their names, a document is
    taken when adding its tokens brings the split's total closer to ``val_fraction`` of all tokens. The
    choice depends only on names and sizes (no seed, no file order), so it is the same on every machine,
    a file added later does not reshuffle the others, and a folder sorted by kind is sampled across kinds.
    The split never exceeds twice the target, so with ``val_fraction < 0.5`` training keeps documents.
    """
    if len(names) != len(sizes):
        raise ValueError(f"{len(names)} names but {len(sizes)} sizes")
    target = val_fraction * sum(sizes)
    taken, held = [False] * len(names), 0
    for i in sorted(range(len(names)), key=lambda i: (document_hash(names[i]), i)):
        if abs(held + sizes[i] - target) < abs(held - target):
            taken[i], held = True, held + sizes[i]
    return taken


def split_tokens(data: DataSection, names: list[str], pieces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(train, val, report)``: the token stream cut as ``data.split`` says (see :func:`split_mode`).

    ``pieces`` are the documents' token arrays (each ending with its end-of-text token), in corpus
    order; each split keeps that order. ``report`` says which split was made and, by document, which
    documents are in the validation split. An ``auto`` split whose documents are all too large to come
    near ``val_fraction`` (each more than twice the target) falls back to the tail and says why; an
    explicit ``split = "documents"`` raises instead."""
    mode, why = split_mode(data), ""
    if mode == "documents" and len(pieces) < 2:
        if data.split == "documents":
            raise ValueError(f"data.split = 'documents' needs at least two documents, and the corpus has "
                             f"{len(pieces)} after cleaning: add files, or set data.split = 'tail'")
        mode, why = "tail", "one document"
    taken = choose_validation_documents(names, [p.size for p in pieces], data.val_fraction) if mode == "documents" else []
    if mode == "documents" and not any(taken):
        total = sum(p.size for p in pieces)
        smallest = min(range(len(pieces)), key=lambda i: pieces[i].size)
        message = (f"no document is small enough for a validation split by document near data.val_fraction = "
                   f"{data.val_fraction:g}: the smallest, {names[smallest]}, holds {pieces[smallest].size / total:.1%} "
                   f"of the {total:,} tokens")
        if data.split == "documents":
            raise ValueError(message + "; raise val_fraction, add (or split) files, or set data.split = 'tail'")
        mode, why = "tail", message
    if mode == "tail":
        stream = np.concatenate(pieces)
        n_train = int(round(stream.size * (1.0 - data.val_fraction)))
        return stream[:n_train], stream[n_train:], {"split": "tail", "why": why} if why else {"split": "tail"}
    train = np.concatenate([p for p, t in zip(pieces, taken) if not t])
    val = np.concatenate([p for p, t in zip(pieces, taken) if t])
    return train, val, {"split": "documents", "val_documents": [n for n, t in zip(names, taken) if t],
                        "train_documents": len(pieces) - sum(taken)}


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


def split_description(meta: dict, val_fraction: float) -> str:
    """One sentence on how a prepared corpus was split (from its ``meta.json``)."""
    share = meta["val_tokens"] / max(1, meta["tokens"])
    if meta.get("split") == "documents":
        return (f"validation split: {len(meta['val_documents'])} of {meta['documents']} documents, chosen by a hash of "
                f"their names, {meta['val_tokens']:,} tokens ({share:.1%}; data.val_fraction = {val_fraction:g})")
    why = f" ({meta['why']})" if meta.get("why") else ""
    return f"validation split: the last {share:.1%} of the token stream, {meta['val_tokens']:,} tokens{why}"


def _load_prepared(folder: Path) -> PreparedData:
    meta = json.loads((folder / "meta.json").read_text())
    return PreparedData(folder, meta["fingerprint"], folder / "tokenizer.json", folder / "train" / "index.json",
                        folder / "val" / "index.json", int(meta["vocab_size"]), meta)


def prepare_data(data: DataSection, *, verbose: bool = True) -> PreparedData:
    """Clean, tokenise and shard the corpus once; later calls with the same settings reuse it.

    Layout of ``<cache_dir>/<fingerprint>/``: ``tokenizer.json``, ``train/`` and ``val/``
    shard sets (``index.json`` + ``shard_*.bin``), ``meta.json`` (counts, the split and the
    cleaning report). Each document is followed by ``<|endoftext|>``; the validation split is
    whole documents or the stream's tail (:func:`split_tokens`). The tokenizer is trained on
    every document, validation included, as nanoGPT's character vocabulary is.
    """
    fingerprint = data_fingerprint(data)
    cache = data_cache_dir(data)
    folder = cache / fingerprint
    if (folder / "meta.json").is_file():
        return _load_prepared(folder)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{fingerprint}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    report = CleaningReport()
    rules_for = cleaning_rules(data)
    docs = list(clean_documents(iter_documents(data), rules=rules_for, report=report))
    texts = [d.text for d in docs]
    dropped = dropped_files_report(report, rules_for, "code" if data.corpus == "code" else data.corpus)
    if dropped and verbose:
        print(f"data: cleaning dropped {report.docs_in - report.docs_out} of {report.docs_in} documents (thresholds: "
              "data.min_words, data.max_symbol_ratio, data.max_duplicate_lines, data.min_lines):\n  "
              + "\n  ".join(dropped))
    if data.tokenizer == "char":
        tok = train_char_tokenizer(texts)
    else:
        tok = train_tokenizer(texts, vocab_size=data.vocab_size, kind=data.tokenizer)
    eot = tok.token_to_id(EOT)
    pieces = []
    for start in range(0, len(texts), 16):  # 16 documents at a time: int32 arrays, not lists of Python ints
        for ids in encode_texts(tok, texts[start:start + 16]):
            pieces.append(np.asarray(ids + [eot], dtype=np.int32))
    train, val, split = split_tokens(data, [d.name for d in docs], pieces)   # may refuse: nothing written yet
    save_tokenizer(tok, tmp / "tokenizer.json")
    fp_tok = tokenizer_fingerprint(tok)
    vocab_size = tok.get_vocab_size()
    for name, part in (("train", train), ("val", val)):
        write_shards([part], tmp / name, tokens_per_shard=data.tokens_per_shard, vocab_size=vocab_size,
                     tokenizer_fingerprint=fp_tok)
    meta = {"fingerprint": fingerprint, "tokenizer_fingerprint": fp_tok, "vocab_size": vocab_size,
            "documents": len(texts), "characters": sum(len(t) for t in texts), "tokens": int(train.size + val.size),
            "train_tokens": int(train.size), "val_tokens": int(val.size), **split, "cleaning": report.table(),
            "dropped": report.removed_names, "settings": _settings(data)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process (a second rank, a parallel test) finished first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():
            raise
    if verbose:
        print(f"data: prepared {meta['documents']} documents → {meta['tokens']:,} tokens "
              f"(vocabulary {vocab_size}) in {folder}\ndata: {split_description(meta, data.val_fraction)}")
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
        raise ValueError(f"the validation split holds {len(dataset)} windows of {config.model.seq_len + 1} tokens "
                         f"({split_description(prepared.meta, config.data.val_fraction)}), fewer than one batch of "
                         f"{b}: add text (more or longer documents), raise data.val_fraction, or lower "
                         "train.batch_size or model.seq_len")
    windows = [dataset.window(i) for i in range(n - n % b)]
    return [clm_collate(windows[i:i + b]) for i in range(0, len(windows), b)]


def train_tokens(prepared: PreparedData) -> int:
    return read_index(prepared.train_index).total_tokens
