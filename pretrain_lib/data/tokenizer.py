"""Tokenizers for the course, trained with the Hugging Face ``tokenizers`` library.

Every tokenizer carries the course's special tokens at fixed ids 0-4:
``[PAD]`` ``[MASK]`` ``[CLS]`` ``[SEP]`` ``<|endoftext|>``.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("[PAD]", "[MASK]", "[CLS]", "[SEP]", "<|endoftext|>")
PAD, MASK, CLS, SEP, EOT = SPECIAL_TOKENS


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, kind: str = "bpe") -> Tokenizer:
    """Train a tokenizer on an iterable of strings.

    ``kind="bpe"``: byte-level BPE (GPT-2 style): every byte string round-trips exactly.
    The special tokens take ids 0-4.
    """
    if kind != "bpe":
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'bpe'")
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
