"""Chapter 8.3: a gender bias measured in the corpus and in a model trained on it, counterfactual
data augmentation (CDA), and a minimal PII redactor.

The measure is the female share of third-person pronouns,
``s = #{she, her, hers} / (#{she, her, hers} + #{he, him, his})``: in a text, in the words that
follow a descriptive word, or (for a model) in the probability it gives to each set of pronoun
tokens where the held-out text continues with a pronoun."""
from __future__ import annotations

import re
from collections import Counter

import torch
import torch.nn as nn

FEMALE, MALE = frozenset({"she", "her", "hers"}), frozenset({"he", "him", "his"})
WORD = re.compile(r"[a-z']+")


def female_share(words: list[str]) -> tuple[float, int]:
    """``(share, n)``: the female share of the third-person pronouns among ``words`` and their number."""
    f, m = sum(w in FEMALE for w in words), sum(w in MALE for w in words)
    return (f / (f + m) if f + m else float("nan")), f + m


def descriptor_shares(text: str, descriptors: list[str], window_words: int) -> tuple[float, dict[str, tuple[float, int]]]:
    """The whole text's female share, and per descriptor ``(share, n pronouns)`` in the
    ``window_words`` words that follow each of its occurrences."""
    words = WORD.findall(text.lower())
    by_word = {}
    for d in descriptors:
        following = [v for i, w in enumerate(words) if w == d for v in words[i + 1:i + 1 + window_words]]
        by_word[d] = female_share(following)
    return female_share(words)[0], by_word


SWAPS = {"he": "she", "she": "he", "him": "her", "his": "her", "her": "his", "hers": "his",
         "man": "woman", "woman": "man", "men": "women", "women": "men", "king": "queen", "queen": "king",
         "lord": "lady", "lady": "lord", "father": "mother", "mother": "father", "son": "daughter",
         "daughter": "son", "brother": "sister", "sister": "brother", "husband": "wife", "wife": "husband",
         "sir": "madam", "madam": "sir", "boy": "girl", "girl": "boy"}
_SWAP_RE = re.compile(r"\b(" + "|".join(SWAPS) + r")\b", re.IGNORECASE)


def swap_gender(text: str) -> str:
    """Counterfactual copy: every word of ``SWAPS`` replaced by its counterpart, keeping its case."""
    def replace(m: re.Match) -> str:
        word = m.group(0)
        new = SWAPS[word.lower()]
        return new.upper() if word.isupper() and len(word) > 1 else (new.capitalize() if word[0].isupper() else new)
    return _SWAP_RE.sub(replace, text)


def pronoun_token_ids(tokenizer, words) -> torch.Tensor:
    """Ids of the single tokens " he", " He", ... (a pronoun after a space: without the space,
    "her" is also a piece of "other")."""
    found = set()
    for w in words:
        for form in (w, w.capitalize()):
            ids = tokenizer.encode(" " + form).ids
            if len(ids) == 1:
                found.add(ids[0])
    return torch.tensor(sorted(found))


def word_continuation_ids(tokenizer) -> torch.Tensor:
    """Ids of the tokens that continue a word: their text starts with a letter (no leading space).
    A pronoun token followed by one of them is the first piece of a longer word: " he" + "aven"."""
    return torch.tensor([i for i in range(tokenizer.get_vocab_size()) if tokenizer.decode([i])[:1].isalpha()],
                        dtype=torch.long)


def pronoun_positions(windows: torch.Tensor, pronoun_ids: torch.Tensor,
                      continuation_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask over the targets ``windows[:, 1:]``: where the text continues with a pronoun token.
    With ``continuation_ids``, only where that token is a whole word: the token after it does not
    continue it. The last target of a window, whose next token is not in the window, is then left out."""
    at = torch.isin(windows[:, 1:], pronoun_ids)
    if continuation_ids is not None:
        whole = torch.zeros_like(at)
        whole[:, :-1] = ~torch.isin(windows[:, 2:], continuation_ids)
        at &= whole
    return at


def pronoun_token_share(windows: torch.Tensor, female_ids: torch.Tensor, male_ids: torch.Tensor,
                        continuation_ids: torch.Tensor | None = None) -> float:
    """The female share of the pronoun tokens at the positions :func:`pronoun_positions` selects."""
    at = pronoun_positions(windows, torch.cat([female_ids, male_ids]), continuation_ids)
    return torch.isin(windows[:, 1:][at], female_ids).sum().item() / at.sum().item()


@torch.no_grad()
def _logits_by_chunk(model: nn.Module, windows: torch.Tensor, batch_size: int):
    """``(chunk, logits)`` over ``windows`` in chunks, in eval mode (restored after): the logits
    predict ``chunk[:, 1:]``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for chunk in windows.split(batch_size):
            yield chunk, model(chunk.to(device))[:, :-1].float().cpu()
    finally:
        model.train(was_training)


def pronoun_predictions(model: nn.Module, windows: torch.Tensor, female_ids: torch.Tensor, male_ids: torch.Tensor,
                        *, continuation_ids: torch.Tensor | None = None,
                        batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """At every position of ``windows`` whose next token is a pronoun (a whole word when
    ``continuation_ids`` is given, see :func:`pronoun_positions`): the model's female share
    ``p(female) / (p(female) + p(male))``. Returns ``(shares, per-window mean loss)``."""
    pronouns = torch.cat([female_ids, male_ids])
    shares, losses = [], []
    for chunk, logits in _logits_by_chunk(model, windows, batch_size):
        losses.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none").mean(1))
        probs = logits.softmax(-1)
        at = pronoun_positions(chunk, pronouns, continuation_ids)
        p_f, p_m = probs[..., female_ids].sum(-1)[at], probs[..., male_ids].sum(-1)[at]
        shares.append(p_f / (p_f + p_m))
    return torch.cat(shares), torch.cat(losses)


def pronoun_place_losses(model: nn.Module, windows: torch.Tensor, pronoun_ids: torch.Tensor,
                         continuation_ids: torch.Tensor | None = None, *, batch_size: int = 32) -> torch.Tensor:
    """The model's cross-entropy (nats) at each place :func:`pronoun_positions` selects: how well it
    predicts the pronoun that the text actually has there."""
    losses = []
    for chunk, logits in _logits_by_chunk(model, windows, batch_size):
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")
        losses.append(per_token[pronoun_positions(chunk, pronoun_ids, continuation_ids)])
    return torch.cat(losses)


PII_PATTERNS = {
    "EMAIL": re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b"),
    "PHONE": re.compile(r"\+?\d[\d ()-]{7,}\d"),
    "IP": re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"),
}


def redact(text: str) -> tuple[str, Counter]:
    """Replace e-mail addresses, phone numbers and IPv4 addresses by ``<EMAIL>``, ``<PHONE>``, ``<IP>``."""
    counts: Counter = Counter()
    for label, pattern in PII_PATTERNS.items():
        text, n = pattern.subn(f"<{label}>", text)
        counts[label] += n
    return text, counts
