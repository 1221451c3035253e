"""Fine-tuning the course encoder on a small labelled task, through the one engine (chapter 7.4).

*Fine-tuning* takes a pretrained encoder, puts a small *classification head* on it (one linear
layer from the encoder's ``d_model`` features to one score per class) and trains encoder and head
together on labelled examples. The encoder gives one vector per token and the head needs one per
example, so the token vectors are *pooled*: BERT reads the vector of a ``[CLS]`` token put in front
of every input (its next-sentence objective trains that vector); :class:`SequenceClassifier` reads
the vector at a chosen token (``[CLS]``, or the ``[MASK]`` of a task about a hidden word, the one
position MLM pretraining trains) or the mean over the real tokens.

- :func:`hidden_word_task` builds a labelled task from the shipped plays: a line with one word
  replaced by ``[MASK]``, labelled with which of a few words was hidden (chapter 7.4: *thou* or
  *you*). :func:`heldout_documents` names the documents a capstone run never trained on.
- :func:`classifier_from` puts the head on a copy of a pretrained ``MaskedLM``'s backbone, or on the
  backbone of ``model.seeded_model`` with the same config (random initialisation, same shape).
- :func:`fine_tune` trains through ``pretrain_lib.train.train`` with :func:`classification_objective`
  (cross-entropy over the examples of a batch) and scores a held-out split through the engine's
  ``eval_fn``.
- The encoder is pretrained cheaply with ``train.sparse_mlm_objective`` (``mlm_objective``'s masks and loss,
  the MLM head's projection onto the vocabulary run at the masked positions only).
"""
from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import MaskedLM, ModelConfig, TransformerBackbone, seeded_model
from .train import Batch, Objective, TrainHistory, sparse_mlm_objective, train  # noqa: F401 (re-exported)

WORD = re.compile(r"[A-Za-z']+")   # a word of the plays: letters and apostrophes ("o'er", "you'll")


# ----------------------------------------------------------------------------- the task

@dataclass(frozen=True)
class LabelledTask:
    """Texts and integer labels of a training and a held-out test split; ``label_names[y]`` names label ``y``."""
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.train_texts) != len(self.train_labels) or len(self.test_texts) != len(self.test_labels):
            raise ValueError("each split needs one label per text")


def _stem(word: str) -> str:
    """A word without case or contraction: "You'll" → "you"."""
    return word.lower().split("'")[0]


def _word_groups(classes: Mapping[str, Sequence[str] | str]) -> list[list[str]]:
    groups = [[w.lower() for w in ([words] if isinstance(words, str) else words)] for words in classes.values()]
    flat = [w for g in groups for w in g]
    if len(groups) < 2 or not all(groups) or len(set(flat)) != len(flat):
        raise ValueError(f"classes must map at least two labels to disjoint, non-empty word lists, got {dict(classes)}")
    return groups


def hidden_word_examples(texts: Sequence[str], classes: Mapping[str, Sequence[str] | str], *,
                         give_away: Sequence[str] = (), min_words: int = 5, max_words: int = 16,
                         mask_token: str = "[MASK]") -> dict[int, list[str]]:
    """``label -> lines``: the lines of ``texts`` with ``min_words``..``max_words`` words in which exactly one
    word belongs to one of the ``classes`` (label name → its words, any case), with that word replaced by
    ``mask_token``; the label is the class's index. A line is left out when any other word is one of the
    classes' words or ``give_away``, also contracted ("you'll", "thou'rt"): such a word would tell the
    answer by itself. Each masked line is kept once; one that two labels would share (two lines that
    differ only in the hidden word) is left out."""
    groups = _word_groups(classes)
    label_of = {w: i for i, g in enumerate(groups) for w in g}
    telling = set(label_of) | {w.lower() for w in give_away}
    found_labels: dict[str, set[int]] = {}          # masked line -> the labels it was found with, in order
    for text in texts:
        for raw in text.splitlines():
            line = " ".join(raw.split())
            words = list(WORD.finditer(line))
            if not min_words <= len(words) <= max_words:
                continue
            hits = [m for m in words if m.group().lower() in label_of]
            others = [m for m in words if _stem(m.group()) in telling and m not in hits]
            if len(hits) != 1 or others:
                continue
            m = hits[0]
            found_labels.setdefault(line[:m.start()] + mask_token + line[m.end():], set()).add(label_of[m.group().lower()])
    examples: dict[int, list[str]] = {i: [] for i in range(len(groups))}
    for masked, labels in found_labels.items():
        if len(labels) == 1:
            examples[labels.pop()].append(masked)
    return examples


def hidden_word_task(texts: Sequence[str], classes: Mapping[str, Sequence[str] | str], *, n_train: int,
                     n_test: int | None = None, give_away: Sequence[str] = (), min_words: int = 5,
                     max_words: int = 16, seed: int = 0, mask_token: str = "[MASK]") -> LabelledTask:
    """Which class's word did ``mask_token`` hide? Lines from :func:`hidden_word_examples`.

    Each split holds the same number of lines of every label (``n_train`` and ``n_test`` must divide
    evenly); ``n_test=None`` takes every line left in the smallest class. No line is in both splits.
    The same arguments always give the same task, in the same order."""
    k = len(classes)
    by_label = hidden_word_examples(texts, classes, give_away=give_away, min_words=min_words, max_words=max_words,
                                    mask_token=mask_token)
    smallest = min(len(v) for v in by_label.values())
    if n_train <= 0 or n_train % k:
        raise ValueError(f"n_train={n_train} must be a positive multiple of the {k} labels (balanced classes)")
    if n_test is None:
        n_test = (smallest - n_train // k) * k
    if n_test <= 0 or n_test % k or (n_train + n_test) // k > smallest:
        raise ValueError(f"n_train={n_train} and n_test={n_test} need {(n_train + n_test) // k} lines per label, "
                         f"in multiples of {k}; the texts have {smallest} for the rarest label")
    rng = random.Random(seed)
    train_pairs, test_pairs = [], []
    for label in range(k):
        chosen = rng.sample(by_label[label], (n_train + n_test) // k)
        train_pairs += [(t, label) for t in chosen[:n_train // k]]
        test_pairs += [(t, label) for t in chosen[n_train // k:]]
    rng.shuffle(train_pairs)
    rng.shuffle(test_pairs)
    return LabelledTask([t for t, _ in train_pairs], [y for _, y in train_pairs],
                        [t for t, _ in test_pairs], [y for _, y in test_pairs], tuple(classes))


def tail_documents(sizes: Sequence[int], val_tokens: int) -> list[bool]:
    """For a stream cut at its tail (the last ``val_tokens`` tokens are validation): which documents,
    of ``sizes`` tokens each in stream order, lie wholly in the validation split."""
    inside, total = [False] * len(sizes), 0
    for i in range(len(sizes) - 1, -1, -1):
        total += sizes[i]
        if total > val_tokens:
            break
        inside[i] = True
    return inside


def heldout_documents(data_section, prepared) -> dict[str, str]:
    """``name -> cleaned text`` of the documents a capstone run with this ``[data]`` section never trains
    on: those wholly inside its validation split (the prepared data's ``meta.json`` says how it was cut)."""
    from .capstone.data import cleaning_rules, iter_documents   # above the engine: imported on use
    from .data.clean import clean_documents
    from .data.tokenizer import encode_texts

    docs = list(clean_documents(iter_documents(data_section), rules=cleaning_rules(data_section)))
    if prepared.meta.get("split") == "documents":
        names = set(prepared.meta["val_documents"])
        return {d.name: d.text for d in docs if d.name in names}
    sizes = [len(ids) + 1 for ids in encode_texts(prepared.tokenizer(), [d.text for d in docs])]  # + end-of-text
    return {d.name: d.text for d, inside in zip(docs, tail_documents(sizes, prepared.meta["val_tokens"])) if inside}


@dataclass(frozen=True)
class EncodedSplit:
    """One split as tensors: ``input_ids`` ``(n, seq)`` padded with ``[PAD]``, ``attention_mask``
    ``(n, seq)`` (True on real tokens), ``labels`` ``(n,)``."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def encode_split(tokenizer, texts: Sequence[str], labels: Sequence[int], *, max_len: int, pad_id: int) -> EncodedSplit:
    """Tokenise ``texts`` (no special tokens added; each cut to ``max_len`` tokens) and pad them with
    ``pad_id`` to the longest."""
    ids = [e.ids[:max_len] for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    if not ids or min(map(len, ids)) == 0:
        raise ValueError("every text needs at least one token")
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} texts but {len(labels)} labels")
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.bool)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = True
    return EncodedSplit(input_ids, mask, torch.tensor(list(labels), dtype=torch.long))


# ----------------------------------------------------------------------------- the model

def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``(batch, seq, d)`` → ``(batch, d)``: the mean over real tokens (over all without a mask)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def pool_at_token(hidden: torch.Tensor, input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """``(batch, seq, d)`` → ``(batch, d)``: each row's vector at the first occurrence of ``token_id``
    (BERT's ``[CLS]`` pooling when it is ``[CLS]``); a row without that token is an error."""
    hit = input_ids == token_id
    if not bool(hit.any(dim=1).all()):
        raise ValueError(f"every input must hold the pooling token (id {token_id})")
    first = hit.int().argmax(dim=1)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), first]


class SequenceClassifier(nn.Module):
    """An encoder backbone, a pooling step and a linear classification head.

    ``input_ids`` ``(batch, seq)`` → logits ``(batch, n_classes)``. ``pool_token_id=None`` pools by the
    mean over real tokens; a token id pools at that token. ``config`` is the backbone's ``ModelConfig``
    (the engine checks token ids against its ``vocab_size``)."""

    def __init__(self, backbone: TransformerBackbone, n_classes: int = 2, *, dropout: float = 0.1,
                 pool_token_id: int | None = None):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.backbone = backbone
        self.config: ModelConfig = backbone.config
        self.pool_token_id = pool_token_id
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)   # as the encoder's own matrices
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.backbone(input_ids, attention_mask)
        if self.pool_token_id is None:
            pooled = mean_pool(hidden, attention_mask)
        else:
            pooled = pool_at_token(hidden, input_ids, self.pool_token_id)
        return self.head(self.drop(pooled))


def classifier_from(encoder: MaskedLM | None, config: ModelConfig, *, seed: int, n_classes: int = 2,
                    dropout: float = 0.1, pool_token_id: int | None = None) -> SequenceClassifier:
    """A classifier on a copy of ``encoder``'s backbone (the pretrained arm; ``encoder`` is not changed),
    or, with ``encoder=None``, on the backbone of ``seeded_model(config, seed)``: the same shape, randomly
    initialised (the from-scratch arm). The head is drawn from ``seed`` alike in both arms."""
    if encoder is not None:
        if encoder.config != config:
            raise ValueError("the encoder was built from another config than the one given; pass encoder.config")
        backbone = copy.deepcopy(encoder.backbone)
    else:
        if config.causal:
            raise ValueError("the from-scratch arm needs an encoder config (causal=False), as the pretrained one")
        backbone = seeded_model(config, seed).backbone
    torch.manual_seed(seed)
    return SequenceClassifier(backbone, n_classes, dropout=dropout, pool_token_id=pool_token_id)



# ----------------------------------------------------------------------------- training through the engine

def classification_objective(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """The engine objective for classification: the mean cross-entropy of ``model(input_ids,
    attention_mask)`` ``(batch, n_classes)`` against ``batch["labels"]`` ``(batch,)``, and the number of
    examples (the engine's target count, so accumulated micro-batches weigh each example once)."""
    logits = model(batch["input_ids"], batch.get("attention_mask"))
    labels = batch["labels"]
    return F.cross_entropy(logits.float(), labels), labels.numel()


def example_batches(split: EncodedSplit, *, batch_size: int, seed: int):
    """``next_batch(i)`` for the engine: passes over ``split``, each in a new order drawn from ``seed`` and
    the pass number, ``batch_size`` examples a batch (a pass's last partial batch is dropped)."""
    n = len(split)
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    per_pass = n // batch_size

    def next_batch(i: int) -> Batch:
        epoch, k = divmod(i, per_pass)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        rows = order[k * batch_size:(k + 1) * batch_size]
        return {"input_ids": split.input_ids[rows], "attention_mask": split.attention_mask[rows],
                "labels": split.labels[rows]}
    return next_batch


@torch.no_grad()
def predict(model: nn.Module, split: EncodedSplit, *, batch_size: int = 256) -> torch.Tensor:
    """Logits ``(n, n_classes)`` on the CPU for ``split``, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model(split.input_ids[i:i + batch_size].to(device),
                           split.attention_mask[i:i + batch_size].to(device)).float().cpu()
                     for i in range(0, len(split), batch_size)])
    model.train(was_training)
    return out


def linear_decay(step: int, *, lr: float, warmup_steps: int, steps: int) -> float:
    """BERT's fine-tuning schedule: linear warmup over ``warmup_steps`` steps, then linear decay to 0 at ``steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0.0, (steps - step) / max(1, steps - warmup_steps))


@dataclass
class FineTuneResult:
    eval_steps: list[int]          # steps at which the test split was scored (0: before any update)
    accuracies: list[float]        # held-out accuracy at each of them
    test_losses: list[float]       # held-out cross-entropy at each of them
    correct: torch.Tensor          # (n_test,) bool: which test examples the final model gets right
    history: TrainHistory          # the engine's history (training loss per step, ...)

    @property
    def final_accuracy(self) -> float:
        return self.accuracies[-1]


def fine_tune(model: SequenceClassifier, train_split: EncodedSplit, test_split: EncodedSplit, *, steps: int,
              lr: float, batch_size: int = 32, warmup_steps: int = 0, weight_decay: float = 0.01,
              eval_every: int = 10, seed: int = 0, device: str = "auto") -> FineTuneResult:
    """Fine-tune every weight of ``model`` on ``train_split`` through the engine's ``train`` (AdamW,
    :func:`linear_decay`, gradient clipping at 1), scoring ``test_split`` before the first update and every
    ``eval_every`` steps through the engine's ``eval_fn``; ``seed`` fixes the batch order and dropout."""
    scored: list[torch.Tensor] = []

    def evaluate(m: nn.Module) -> float:   # the engine's eval_fn: returns the held-out loss, keeps the logits
        scored.append(predict(m, test_split))
        return float(F.cross_entropy(scored[-1], test_split.labels))

    before = evaluate(model)
    history = train(model, example_batches(train_split, batch_size=batch_size, seed=seed), classification_objective,
                    steps=steps, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), grad_clip=1.0,
                    lr_schedule=lambda s: linear_decay(s, lr=lr, warmup_steps=warmup_steps, steps=steps),
                    eval_every=eval_every, seed=seed, device=device, log_every=min(eval_every, steps),
                    progress=False, eval_fn=evaluate)
    hits = [logits.argmax(dim=-1) == test_split.labels for logits in scored]
    return FineTuneResult([0, *history.eval_steps], [float(h.float().mean()) for h in hits],
                          [before, *history.eval_losses], hits[-1], history)
