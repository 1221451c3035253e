"""Tokenizers for the course, trained with the Hugging Face ``tokenizers`` library.

Every tokenizer carries the course's special tokens at fixed ids 0-4:
``[PAD]`` ``[MASK]`` ``[CLS]`` ``[SEP]`` ``<|endoftext|>`` (WordPiece adds ``[UNK]`` at 5).

``kind="bpe"``: byte-level BPE for the decoder (any text round-trips exactly).
``kind="wordpiece"``: BERT-style WordPiece for the encoder (normalises and splits on
whitespace and punctuation, so decoding does not restore the exact text).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ("[PAD]", "[MASK]", "[CLS]", "[SEP]", "<|endoftext|>")
PAD, MASK, CLS, SEP, EOT = SPECIAL_TOKENS
UNK = "[UNK]"  # WordPiece only


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, kind: str = "bpe") -> Tokenizer:
    """Train a tokenizer on an iterable of strings.

    ``kind="bpe"``: byte-level BPE (GPT-2 style): every byte string round-trips exactly.
    ``kind="wordpiece"``: BERT-style WordPiece (``[UNK]`` for characters it never saw).
    The special tokens take ids 0-4.
    """
    if kind not in ("bpe", "wordpiece"):
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'bpe' or 'wordpiece'")
    min_vocab = len(SPECIAL_TOKENS) + 256
    if not isinstance(vocab_size, int) or vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be an integer ≥ {min_vocab} (256 bytes + {len(SPECIAL_TOKENS)} specials), got {vocab_size!r}")
    seen_any = False

    def non_empty(it: Iterable[str]):
        nonlocal seen_any
        for t in it:
            if not isinstance(t, str):
                raise TypeError(f"train_tokenizer expects strings, got {type(t).__name__}")
            if t:
                seen_any = True
                yield t

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        # BertNormalizer puts spaces around CJK characters, so Chinese becomes one word per character.
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.BertNormalizer(lowercase=False)])
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, UNK],
                                            show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    tok.train_from_iterator(non_empty(texts), trainer=trainer)
    if not seen_any:
        raise ValueError("train_tokenizer got no non-empty text: the corpus is empty")
    return tok


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Map each special token to its id, failing clearly if one is missing."""
    ids = {}
    for token in SPECIAL_TOKENS:
        idx = tokenizer.token_to_id(token)
        if idx is None:
            raise ValueError(f"the tokenizer has no {token} token; train it with train_tokenizer()")
        ids[token] = idx
    return ids


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write the tokenizer as one JSON file (the ``tokenizers`` format) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer saved by :func:`save_tokenizer`, checking the course's special tokens."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}; train one and save it with save_tokenizer()")
    tok = Tokenizer.from_file(str(path))
    special_token_ids(tok)
    return tok


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """16 hex digits identifying the tokenizer's vocabulary, merges and settings.

    Two tokenizers with the same fingerprint map text to the same ids; token shards record
    it so that ids are never read with a different tokenizer than the one that wrote them.
    """
    canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def encode_texts(tokenizer: Tokenizer, texts: Iterable[str], *, batch_size: int = 64) -> list[list[int]]:
    """Token ids of every text, in order: the course's one function that tokenises a corpus.

    ``texts``: any iterable of strings, a list or a generator that reads one document at a
    time (a single string is refused: it would be read as one text per character). Texts
    are encoded ``batch_size`` at a time with ``Tokenizer.encode_batch``, which spreads a
    batch over the tokenizers library's own threads (``TOKENIZERS_PARALLELISM``);
    ``batch_size=1`` is one call per text, the source chapter's style. No special tokens
    are added: documents are separated later, by :func:`pretrain_lib.data.packing.pack_documents`
    or :func:`pretrain_lib.data.shards.write_shards` with ``eot_id``.

    Returns one list of ids per text (``len(result) == len(texts)``), Python ints. For
    compact storage convert each with NumPy (:func:`pretrain_lib.data.shards.choose_dtype`);
    :func:`pretrain_lib.data.parallel.tokenize_files` runs this function in worker processes.
    """
    if isinstance(texts, str):
        raise TypeError("encode_texts expects an iterable of texts, got one string; pass [text]")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    ids: list[list[int]] = []
    stream = iter(texts)
    while batch := list(itertools.islice(stream, batch_size)):
        for text in batch:
            if not isinstance(text, str):
                raise TypeError(f"encode_texts expects strings, got {type(text).__name__} at position {len(ids)}")
        ids.extend(e.ids for e in tokenizer.encode_batch(batch, add_special_tokens=False))
    return ids


def bytes_per_token(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """UTF-8 bytes divided by tokens over ``texts``: higher means better compression."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in encode_texts(tokenizer, texts))
    if n_tokens == 0:
        raise ValueError("the texts produced no tokens: pass at least one non-empty text")
    return n_bytes / n_tokens


def round_trips(tokenizer: Tokenizer, text: str) -> bool:
    """True when decoding the encoding gives back exactly ``text``."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.decode(ids, skip_special_tokens=False) == text
