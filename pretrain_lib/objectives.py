"""Pretraining objectives: dynamic MLM masking (80/10/10), the MLM and CLM losses, and the mixed
objectives of later models (T5 span corruption, prefix LM, a UL2-style mixture of denoisers).

Shapes: ``input_ids`` and ``labels`` are ``(batch, seq)`` integer tensors, ``logits`` are
``(batch, seq, vocab)``. Positions whose label is ``-100`` give no learning signal.
"""
from __future__ import annotations

import random
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _check_integer_ids(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {tensor.dtype}")


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Iterable[int] = (),
    mlm_probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style dynamic masking.

    Each position whose id is not in ``special_token_ids`` is selected with probability
    ``mlm_probability``. A selected position becomes ``mask_token_id`` with probability 0.8,
    a random *ordinary* token (never a special one) with probability 0.1, and keeps its id
    with probability 0.1. ``labels`` holds the original id at selected positions and
    ``-100`` elsewhere. ``input_ids`` is not modified.

    Returns ``(inputs, labels)``, both shaped like ``input_ids``.
    """
    _check_integer_ids("input_ids", input_ids)
    if not 0.0 <= float(mlm_probability) <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id={mask_token_id} is outside the vocabulary [0, {vocab_size})")

    device = input_ids.device
    special = torch.tensor(sorted(set(int(i) for i in special_token_ids) | {mask_token_id}), dtype=torch.long)
    # Random replacements are drawn from ordinary tokens only: a random [PAD] or [CLS]
    # in the middle of a text would teach the model something false.
    ordinary = torch.ones(vocab_size, dtype=torch.bool)
    ordinary[special[(special >= 0) & (special < vocab_size)]] = False
    ordinary_ids = ordinary.nonzero().squeeze(1)
    if ordinary_ids.numel() == 0:
        raise ValueError("every id in the vocabulary is special: there is nothing to draw random replacements from")

    # Draw on the generator's device (CPU by default) so a seed gives the same masks on any device.
    draw_device = generator.device if generator is not None else device
    shape = input_ids.shape
    select_draw = torch.rand(shape, generator=generator, device=draw_device).to(device)
    action_draw = torch.rand(shape, generator=generator, device=draw_device).to(device)
    random_ids = ordinary_ids.to(draw_device)[
        torch.randint(ordinary_ids.numel(), shape, generator=generator, device=draw_device)
    ].to(device)

    is_special = torch.isin(input_ids, special.to(device))
    selected = (select_draw < mlm_probability) & ~is_special
    to_mask = selected & (action_draw < 0.8)
    to_random = selected & (action_draw >= 0.8) & (action_draw < 0.9)

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    inputs = torch.where(to_random, random_ids.to(input_ids.dtype), inputs)
    return inputs, labels


def _cross_entropy_over_labels(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    if logits.dim() != 3:
        raise ValueError(f"logits must be (batch, seq, vocab), got shape {tuple(logits.shape)}")
    flat_targets = targets.reshape(-1)
    # Sum, then divide by the count clamped at 1: the same as the mean when any position
    # carries a label, and 0 (still attached to the logits) when none does. Branching on
    # "any label?" instead would read a tensor on the host at every step.
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat_targets,
                            ignore_index=ignore_index, reduction="sum")
    count = (flat_targets != ignore_index).sum().clamp(min=1)
    return total / count


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not -100.

    logits: ``(batch, seq, vocab)``; labels: ``(batch, seq)`` from :func:`mask_tokens`.
    """
    _check_integer_ids("labels", labels)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, seq)")
    return _cross_entropy_over_labels(logits, labels, IGNORE_INDEX)


def clm_loss(logits: torch.Tensor, input_ids: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token loss: the logits at position t predict ``input_ids`` at t+1.

    Targets equal to ``ignore_index`` (padding, for instance) are excluded from the mean.
    logits: ``(batch, seq, vocab)``; input_ids: ``(batch, seq)``.
    """
    _check_integer_ids("input_ids", input_ids)
    if logits.shape[:-1] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} disagree on (batch, seq)")
    if input_ids.size(1) < 2:
        raise ValueError("clm_loss needs sequences of at least 2 tokens (one input, one target)")
    return _cross_entropy_over_labels(logits[:, :-1, :], input_ids[:, 1:], ignore_index)


# ----------------------------------------------------------------------------- mixed objectives
# Span corruption (T5), prefix LM and a UL2-style mixture, all trained on the course's causal
# GPT: the corrupted input (or the prefix) is read bidirectionally through the model's prefix
# attention mask, and the loss covers only what follows it. Each returns a dict with
# ``input_ids``, ``labels`` (-100 where no loss is taken, aligned so that ``clm_loss`` shifts them)
# and ``prefix_len`` ``(batch,)``. Random draws come from a CPU generator, so a seed gives the
# same corruption on any device, and nothing is read back from the device.

def span_counts(length: int, *, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """T5's ``(n_noise_tokens, n_spans)`` for a window of ``length``: round(length · density)
    noise tokens in round(n_noise / mean_span_length) spans (at least one of each, and at
    least one token left clean)."""
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if not mean_span_length >= 1.0:
        raise ValueError(f"mean_span_length must be at least 1, got {mean_span_length}")
    if length < 2:
        raise ValueError(f"span corruption needs windows of at least 2 tokens, got {length}")
    n_noise = min(max(1, round(length * noise_density)), length - 1)
    n_spans = min(max(1, round(n_noise / mean_span_length)), n_noise, length - n_noise)
    return n_noise, n_spans


def _random_partition(n_items: int, n_parts: int, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """``(batch, n_parts)`` positive lengths summing to ``n_items``, uniformly over the compositions."""
    if n_parts == 1:
        return torch.full((batch, 1), n_items, dtype=torch.long)
    cuts = torch.rand(batch, n_items - 1, generator=generator).argsort(dim=1)[:, :n_parts - 1] + 1
    edges = torch.cat([torch.zeros(batch, 1, dtype=torch.long), cuts.sort(dim=1).values,
                       torch.full((batch, 1), n_items, dtype=torch.long)], dim=1)
    return edges.diff(dim=1)


def random_span_mask(batch: int, length: int, *, noise_density: float = 0.15, mean_span_length: float = 3.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``(batch, length)`` bool, True on noise tokens: clean and noise spans alternate, starting
    clean, every row with the same number of noise tokens and spans (T5's ``random_spans_noise_mask``)."""
    n_noise, n_spans = span_counts(length, noise_density=noise_density, mean_span_length=mean_span_length)
    noise_lengths = _random_partition(n_noise, n_spans, batch, generator)
    clean_lengths = _random_partition(length - n_noise, n_spans, batch, generator)
    ends = torch.stack([clean_lengths, noise_lengths], dim=2).reshape(batch, 2 * n_spans).cumsum(dim=1)
    segment = torch.searchsorted(ends, torch.arange(length).expand(batch, length).contiguous(), right=True)
    return segment % 2 == 1


def _gather_kept(values: torch.Tensor, keep: torch.Tensor, n_keep: int) -> torch.Tensor:
    # Stable sort puts the kept positions first, in order: a fixed-size gather instead of
    # boolean indexing, which would make a GPU wait to learn the result's size.
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :n_keep]
    return values.gather(1, order)


def corrupt_spans(input_ids: torch.Tensor, noise_mask: torch.Tensor, *, sentinel_ids: Sequence[int],
                  n_noise: int, n_spans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each noise span by a sentinel in the input; the target lists each span after its sentinel.

    ``[a b c d e f]`` with noise on ``c d`` and ``f`` gives input ``[a b S0 e S1]`` and target
    ``[S0 c d S1 f]`` (T5 uses one sentinel per span, ``sentinel_ids[k % len]`` here). Every
    row of ``noise_mask`` must hold ``n_noise`` noise tokens in ``n_spans`` spans, starting clean.
    Returns ``(inputs (batch, seq − n_noise + n_spans), targets (batch, n_noise + n_spans))``.
    """
    _check_integer_ids("input_ids", input_ids)
    if noise_mask.shape != input_ids.shape:
        raise ValueError(f"noise_mask {tuple(noise_mask.shape)} and input_ids {tuple(input_ids.shape)} differ")
    if not sentinel_ids:
        raise ValueError("sentinel_ids is empty: span corruption needs at least one sentinel id")
    noise = noise_mask.to(input_ids.device, torch.bool)
    starts = torch.ones_like(noise)
    starts[:, 1:] = noise[:, 1:] != noise[:, :-1]
    span_index = starts.long().cumsum(dim=1).sub(1).div(2, rounding_mode="floor")  # clean span k, noise span k
    sentinels = torch.tensor(list(sentinel_ids), device=input_ids.device)[span_index % len(sentinel_ids)]
    inputs = _gather_kept(torch.where(noise & starts, sentinels, input_ids), ~noise | starts,
                          input_ids.size(1) - n_noise + n_spans)
    targets = _gather_kept(torch.where(~noise & starts, sentinels, input_ids), noise | starts, n_noise + n_spans)
    return inputs, targets


def span_corruption_source_length(seq_len: int, *, noise_density: float, mean_span_length: float) -> int:
    """The longest source window whose corrupted input + [SEP] + target fits in ``seq_len``
    (the sequence grows by two sentinels per span and the separator)."""
    for source in range(seq_len - 1, 1, -1):
        _, n_spans = span_counts(source, noise_density=noise_density, mean_span_length=mean_span_length)
        if source + 2 * n_spans + 1 <= seq_len:
            return source
    raise ValueError(f"seq_len={seq_len} is too short for span corruption")


def span_corruption_example(input_ids: torch.Tensor, *, sentinel_ids: Sequence[int], sep_id: int,
                            noise_density: float = 0.15, mean_span_length: float = 3.0,
                            generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """T5's span corruption as one decoder sequence: ``corrupted input [SEP] target``.

    The input and separator form the prefix (read bidirectionally, like T5's encoder); the loss
    is on the target only. ``input_ids`` ``(batch, seq)`` is the source window in full.
    """
    _check_integer_ids("input_ids", input_ids)
    b, t = input_ids.shape
    n_noise, n_spans = span_counts(t, noise_density=noise_density, mean_span_length=mean_span_length)
    noise = random_span_mask(b, t, noise_density=noise_density, mean_span_length=mean_span_length,
                             generator=generator)
    inputs, targets = corrupt_spans(input_ids, noise, sentinel_ids=sentinel_ids, n_noise=n_noise, n_spans=n_spans)
    sep = torch.full((b, 1), sep_id, dtype=input_ids.dtype, device=input_ids.device)
    sequence = torch.cat([inputs, sep, targets], dim=1)
    prefix = inputs.size(1) + 1
    labels = sequence.clone()
    labels[:, :prefix] = IGNORE_INDEX
    return {"input_ids": sequence, "labels": labels,
            "prefix_len": torch.full((b,), prefix, dtype=torch.long, device=input_ids.device)}


def prefix_lm_example(input_ids: torch.Tensor, *, min_prefix: float = 0.25, max_prefix: float = 0.75,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Prefix LM: each row is split at a random point in ``[min_prefix, max_prefix] · seq``; the
    prefix is read bidirectionally and the loss covers the tokens after it."""
    _check_integer_ids("input_ids", input_ids)
    if not 0.0 < min_prefix <= max_prefix < 1.0:
        raise ValueError(f"need 0 < min_prefix <= max_prefix < 1, got {min_prefix}, {max_prefix}")
    b, t = input_ids.shape
    lo, hi = max(1, int(min_prefix * t)), max(1, int(max_prefix * t))
    prefix_len = torch.randint(lo, hi + 1, (b,), generator=generator).to(input_ids.device)
    labels = input_ids.masked_fill(torch.arange(t, device=input_ids.device)[None, :] < prefix_len[:, None],
                                   IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels, "prefix_len": prefix_len}


def prefix_lm_loss(model, example: dict[str, torch.Tensor],
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean loss, n targets)`` of a causal ``model`` on an example from the builders above."""
    return sparse_clm_loss(model, example["input_ids"], example["labels"], attention_mask,
                           prefix_len=example["prefix_len"])


def sparse_clm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    *, prefix_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clm_loss(model(input_ids, ...), labels), n targets)``, with the output projection onto the
    vocabulary done only at the positions whose next label is not ``IGNORE_INDEX``.

    The same loss (the mean next-token cross-entropy over the labelled targets) and the same
    gradients, but when few positions carry a target (span corruption: about a fifth; a prefix LM:
    about half) most of the projection, a large share of a small model's compute, is skipped. A
    model without a ``backbone`` (not the course GPT) is run whole."""
    lm = getattr(model, "module", model)     # under DDP, the GPT inside
    targets = labels[:, 1:]
    chosen = targets != IGNORE_INDEX
    if not (hasattr(lm, "backbone") and hasattr(lm, "_readout")) or hasattr(lm, "head_dense"):
        return clm_loss(model(input_ids, attention_mask, prefix_len=prefix_len), labels), chosen.sum()
    hidden = lm.backbone(input_ids, attention_mask, prefix_len)[:, :-1]
    logits = lm._readout(hidden[chosen] @ lm.readout_weight().T)     # GPT.forward's head, on (n, d)
    n = chosen.sum()
    return F.cross_entropy(logits.float(), targets[chosen], reduction="sum") / n.clamp(min=1), n


def span_corruption_objective(*, sentinel_ids: Sequence[int], sep_id: int, noise_density: float = 0.15,
                              mean_span_length: float = 3.0, generator: torch.Generator | None = None):
    """An engine objective: each window is cut to the longest source that, corrupted, still fits
    in the window's length, so a step costs what a CLM step on the same batch costs."""
    def objective(model, batch):
        ids = batch["input_ids"]
        source = span_corruption_source_length(ids.size(1), noise_density=noise_density,
                                               mean_span_length=mean_span_length)
        example = span_corruption_example(ids[:, :source], sentinel_ids=sentinel_ids, sep_id=sep_id,
                                          noise_density=noise_density, mean_span_length=mean_span_length,
                                          generator=generator)
        return prefix_lm_loss(model, example)
    return objective


def prefix_lm_objective(*, min_prefix: float = 0.25, max_prefix: float = 0.75,
                        generator: torch.Generator | None = None):
    """An engine objective: prefix LM on each batch's windows, split afresh every time."""
    def objective(model, batch):
        example = prefix_lm_example(batch["input_ids"], min_prefix=min_prefix, max_prefix=max_prefix,
                                    generator=generator)
        return prefix_lm_loss(model, example, batch.get("attention_mask"))
    return objective


def ul2_objective(denoisers: dict[str, tuple[float, Callable]], *, seed: int = 0):
    """A UL2-style mixture: each micro-batch goes to one denoiser, drawn with the given weights.

    ``denoisers`` maps a name to ``(weight, objective)``, e.g. R (span corruption, short spans),
    X (extreme: long spans or dense noise), S (prefix LM). The draw uses a seeded host RNG, so no
    device value is read; ``objective.counts`` records how often each denoiser was used.
    """
    if not denoisers:
        raise ValueError("ul2_objective needs at least one denoiser")
    names = list(denoisers)
    weights = [float(denoisers[n][0]) for n in names]
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"denoiser weights must be non-negative and not all zero, got {weights}")
    rng = random.Random(seed)

    def objective(model, batch):
        name = rng.choices(names, weights=weights)[0]
        objective.counts[name] += 1
        return denoisers[name][1](model, batch)
    objective.counts = {n: 0 for n in names}
    return objective


# ----------------------------------------------------------------------------- per-example scores
# Lessons compare objectives on held-out text and measure the noise of each comparison with a
# bootstrap over the scored units (masked positions, windows). These return one value per unit.

@torch.no_grad()
def masked_position_scores(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *,
                           device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Score ``model`` at every scored position of ``batches`` of ``(inputs, labels, scored)``.

    ``scored`` ``(batch, seq)`` bool picks the positions (e.g. those shown as ``[MASK]``).
    Returns 1-D CPU tensors over those positions, in order: ``loss`` (nats, ``-log p`` of the
    label), ``rank`` (how many tokens score strictly higher than the label: 0 means the top
    guess is right, ``< k`` means the label is in the top k), ``top`` (the top guess) and
    ``window`` (which row of all the batches, counted from 0, the position lies in: positions
    of one window share its context, so a bootstrap should resample windows, not positions).
    """
    out: dict[str, list[torch.Tensor]] = {"loss": [], "rank": [], "top": [], "window": []}
    rows_before = 0
    for inputs, labels, scored in batches:
        log_probs = model.eval()(inputs.to(device)).float().log_softmax(-1).cpu()[scored]
        target = labels[scored]
        true = log_probs.gather(-1, target[:, None])
        out["loss"].append(-true[:, 0])
        out["rank"].append((log_probs > true).sum(-1))
        out["top"].append(log_probs.argmax(-1))
        out["window"].append(scored.nonzero()[:, 0] + rows_before)   # row-major, as scored indexes log_probs
        rows_before += scored.shape[0]
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def per_window_clm_loss(model, windows: Iterable[torch.Tensor]) -> torch.Tensor:
    """Next-token loss of a causal ``model`` for each row of each ``(batch, seq)`` window
    tensor: a 1-D CPU tensor with one mean loss (nats/token) per row."""
    losses = []
    for window in windows:
        logits = model.eval()(window).float()[:, :-1]
        per_token = F.cross_entropy(logits.transpose(1, 2), window[:, 1:], reduction="none")
        losses.append(per_token.mean(1).cpu())
    return torch.cat(losses)


@torch.no_grad()
def prefix_lm_row_scores(model, example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-row scores of a causal ``model`` on an example from the builders above (span
    corruption, prefix LM, or any ``input_ids``/``labels``/``prefix_len`` dict).

    Returns CPU tensors: ``loss`` ``(batch,)``, each row's mean loss over its labelled targets
    (nats/token, the per-row version of :func:`prefix_lm_loss`); ``correct`` and ``scored``
    ``(batch, seq - 1)`` bool, whether the top guess equals the target at each labelled target
    position (aligned with ``labels[:, 1:]``), so a caller can score a subset of the targets.
    """
    logits = model.eval()(example["input_ids"], prefix_len=example["prefix_len"]).float()[:, :-1]
    return row_scores_from_logits(logits, example["labels"])


@torch.no_grad()
def row_scores_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`prefix_lm_row_scores` from logits already computed, ``(batch, seq - 1, vocab)`` (the
    model's output without its last position), so that one forward can be scored against several
    labellings of the same input (e.g. all targets, then a subset)."""
    labels = labels[:, 1:]
    scored = labels != IGNORE_INDEX
    per_token = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * scored
    return {"loss": (per_token.sum(1) / scored.sum(1).clamp(min=1)).cpu(),
            "correct": ((logits.argmax(-1) == labels) & scored).cpu(), "scored": scored.cpu()}
