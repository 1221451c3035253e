"""The source chapter's preprocessing style next to the course's, as two measurable functions.

``source_style_examples``: one text (a line) at a time: tokenize, truncate or pad to
``max_length``, then mask positions in a Python loop, drawn over the whole padded row
(so ``[PAD]`` gets masked too), once, at load time.

``packed_examples``: batch-encode the documents, pack them into blocks with an
end-of-text separator, and mask a whole batch at once with ``mask_tokens`` (which never
selects special tokens). Both return the number of tokens the model would process.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tokenizers import Tokenizer

from ..objectives import mask_tokens
from .packing import pack_documents
from .tokenizer import encode_texts, special_token_ids


def source_style_examples(lines: Sequence[str], tokenizer: Tokenizer, *, max_length: int = 512,
                          seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One padded, statically masked example per line (the pattern the course replaces)."""
    ids = special_token_ids(tokenizer)
    pad, mask_id, vocab = ids["[PAD]"], ids["[MASK]"], tokenizer.get_vocab_size()
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for ids_of_line in encode_texts(tokenizer, lines, batch_size=1):  # one tokenizer call per line
        tokens = ids_of_line[:max_length]
        tokens = tokens + [pad] * (max_length - len(tokens))
        row = torch.tensor(tokens)
        n_masked = max(1, int(max_length * 0.15))
        positions = torch.randperm(max_length, generator=gen)[:n_masked]
        targets = row[positions].clone()
        for pos in positions:  # one Python iteration per masked position
            r = torch.rand(1, generator=gen).item()
            if r < 0.8:
                row[pos] = mask_id
            elif r < 0.9:
                row[pos] = torch.randint(0, vocab, (1,), generator=gen)
        examples.append({"input_ids": row, "masked_positions": positions, "target_tokens": targets})
    return examples


def packed_examples(docs: Sequence[str], tokenizer: Tokenizer, *, block_size: int = 512,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Packed ``(n_blocks, block_size)`` blocks, masked in one vectorised call."""
    ids = special_token_ids(tokenizer)
    blocks = pack_documents(encode_texts(tokenizer, docs), block_size=block_size, eot_id=ids["<|endoftext|>"])
    inputs, labels = mask_tokens(blocks, mask_token_id=ids["[MASK]"], vocab_size=tokenizer.get_vocab_size(),
                                 special_token_ids=list(ids.values()),
                                 generator=torch.Generator().manual_seed(seed))
    return {"input_ids": inputs, "labels": labels}
