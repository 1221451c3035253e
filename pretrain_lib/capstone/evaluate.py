"""Evaluation for the capstone: validation loss and perplexity, GPT samples, BERT fill-mask top-5."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from tokenizers import Tokenizer

from ..data.tokenizer import special_token_ids
from ..train import clm_objective, mlm_objective


def mlm_eval_objective(tokenizer: Tokenizer, *, mlm_probability: float, seed: int):
    """An MLM objective whose masks are the same at every evaluation (a fresh generator with a
    fixed seed): the validation loss then moves only because the model does."""
    specials = special_token_ids(tokenizer)
    return mlm_objective(mask_token_id=specials["[MASK]"], vocab_size=tokenizer.get_vocab_size(),
                         special_token_ids=list(specials.values()), mlm_probability=mlm_probability,
                         generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def validation_loss(model: nn.Module, batches, objective=clm_objective) -> float:
    """Token-weighted mean loss over ``batches`` (each target token counts once, as in training)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, n = objective(model, batch)
        n = torch.as_tensor(n, device=device, dtype=torch.float64)
        total += loss.double() * n
        count += n
    model.train(was_training)
    return float(total / count.clamp(min=1))  # one host read per evaluation


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


@torch.no_grad()
def gpt_sample(model: nn.Module, tokenizer: Tokenizer, *, prompt: str = "\n", max_new_tokens: int = 200,
               temperature: float = 0.8, top_k: int | None = 40, seed: int = 0) -> str:
    """A continuation of ``prompt``, sampled with its own generator (the training RNG is untouched)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [special_token_ids(tokenizer)["<|endoftext|>"]]
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_k=top_k,
                         generator=torch.Generator().manual_seed(seed))
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=False)


@torch.no_grad()
def fill_mask(model: nn.Module, tokenizer: Tokenizer, text: str, *, k: int = 5) -> list[list[tuple[str, float]]]:
    """For each ``[MASK]`` in ``text``, the ``k`` most probable tokens with their probabilities."""
    mask_id = special_token_ids(tokenizer)["[MASK]"]
    pieces = text.split("[MASK]")
    if len(pieces) < 2:
        raise ValueError(f"fill_mask needs a [MASK] in the text, got {text!r}")
    # Each piece is encoded on its own and the mask id put between them: a character-level
    # tokenizer would otherwise spell "[MASK]" out as six characters.
    ids = []
    for i, piece in enumerate(pieces):
        ids += ([mask_id] if i else []) + tokenizer.encode(piece, add_special_tokens=False).ids
    limit = model.config.max_seq_len
    if len(ids) > limit:  # keep the end of a long text (a small context); the mask must stay in it
        ids = ids[-limit:]
        if mask_id not in ids:
            raise ValueError(f"the [MASK] of {text!r} lies outside the model's last {limit} tokens; shorten the text")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs = model(torch.tensor([ids], device=device)).float().softmax(-1)[0].cpu()
    model.train(was_training)
    out = []
    for pos in [i for i, t in enumerate(ids) if t == mask_id]:
        top = torch.topk(probs[pos], k)
        out.append([(tokenizer.id_to_token(int(i)), float(p)) for p, i in zip(top.values, top.indices)])
    return out
