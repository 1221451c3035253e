"""Building and reading the benchmark's items (``python -m pretrain_lib.benchmark.items`` rebuilds the file).

The item file is fixed and versioned: ``pretrain_lib/assets/shakespeare_mc_v1.jsonl``, one JSON
object a line (``id``, ``source``, ``context``, ``endings``, ``label``, ``version``). It is made by
:func:`build_items` from the cleaned plays with a fixed seed, so running this module again writes
the same bytes (a test checks it); a change to the rules below is a new version and a new file.

Held-out text. The trainer's validation split is the last ``val_fraction`` (0.1) of the token
stream of the plays in sorted order, so the last plays are text the model never trains on. The
items come only from the plays that *start* after :data:`HELD_OUT_FROM` (0.92) of the cleaned
stream's characters: two points of margin, because a BPE tokenizer compresses plays a little
unevenly and its 90 % boundary falls a little off the character one. Which plays these are is
computed, not typed in (today: Othello, Romeo and Juliet, Timon of Athens). Since the split is a
property of each run, :func:`held_out_report` checks a run's own splits: every item's passage must
lie in its decoded validation text and nowhere in its training text.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

VERSION = 1
ITEM_FILE = Path(__file__).resolve().parents[1] / "assets" / f"shakespeare_mc_v{VERSION}.jsonl"
HELD_OUT_FROM = 0.92       # items come from plays starting after this fraction of the stream (val_fraction 0.1)
N_ITEMS = 400
SEED = 2026
CONTEXT_CHARS = 240        # the passage: whole lines going back from the true ending, at most this long
MIN_LINE, MAX_LINE = 25, 60  # endings' length in characters (the char GPT's window is 65 tokens)
LENGTH_TOLERANCE = 2       # a distractor's length differs from the true line's by at most this
NEAR_LINES = 10            # a distractor is never within this many lines of the true one


@dataclass
class Item:
    id: str
    source: str
    context: str
    endings: list[str]
    label: int
    version: int = VERSION


def _is_dialogue(line: str) -> bool:
    """A spoken line: not blank and not a speaker's name (the plays write names in capitals)."""
    stripped = line.strip()
    return bool(stripped) and stripped != stripped.upper()


def held_out_documents(docs, *, start_fraction: float = HELD_OUT_FROM):
    """The documents that start after ``start_fraction`` of the stream (each followed by one
    end-of-text token, counted as one character, as the trainer writes it)."""
    total = sum(len(d.text) + 1 for d in docs)
    out, offset = [], 0
    for d in docs:
        if offset >= start_fraction * total:
            out.append(d)
        offset += len(d.text) + 1
    if not out:
        raise ValueError(f"no document starts after {start_fraction:.0%} of the corpus: it has too few documents")
    return out


def build_items(docs, *, n_items: int = N_ITEMS, seed: int = SEED) -> list[Item]:
    """Items from ``docs`` (held-out documents, in order). The true ending is a spoken line of
    ``MIN_LINE``..``MAX_LINE`` characters that continues the previous spoken line; the context is
    the text before it (whole lines, at most ``CONTEXT_CHARS``), so context + true ending is a
    contiguous piece of the play. Distractors: three other spoken lines of held-out text within
    ``LENGTH_TOLERANCE`` characters of the true one's length, none near it, all different."""
    rng = random.Random(seed)
    pool, candidates = [], []      # pool: (doc, line index, text) of every line that may be an ending
    for d in docs:
        lines = d.text.split("\n")
        starts = np.cumsum([0] + [len(ln) + 1 for ln in lines[:-1]])
        for i, line in enumerate(lines):
            if not (_is_dialogue(line) and MIN_LINE <= len(line) <= MAX_LINE):
                continue
            pool.append((d.name, i, line))
            if i == 0 or not _is_dialogue(lines[i - 1]):
                continue
            first = i - 1       # extend the context backwards by whole lines while it fits
            while first > 0 and starts[i] - 1 - starts[first - 1] <= CONTEXT_CHARS:
                first -= 1
            candidates.append((d.name, i, d.text[starts[first]:starts[i] - 1].lstrip("\n"), line))
    by_length: dict[int, list[tuple[str, int, str]]] = {}
    for entry in pool:
        by_length.setdefault(len(entry[2]), []).append(entry)
    if len(candidates) < n_items:
        raise ValueError(f"only {len(candidates)} candidate items in the held-out text, fewer than {n_items}")
    items = []
    for name, i, context, line in sorted(rng.sample(candidates, n_items), key=lambda c: (c[0], c[1])):
        near = [e for k in range(len(line) - LENGTH_TOLERANCE, len(line) + LENGTH_TOLERANCE + 1)
                for e in by_length.get(k, ())
                if e[2] != line and not (e[0] == name and abs(e[1] - i) <= NEAR_LINES)]
        texts = sorted({e[2] for e in near})
        distractors = rng.sample(texts, 3)
        label = rng.randrange(4)
        endings = distractors[:label] + [line] + distractors[label:]
        items.append(Item(f"{name}-{i:05d}", name, context, ["\n" + e for e in endings], label))
    return items


def shakespeare_items(*, n_items: int = N_ITEMS, seed: int = SEED) -> list[Item]:
    """:func:`build_items` on the held-out plays, cleaned exactly as the trainer cleans them."""
    from ..data.clean import clean_documents
    from ..data.corpus import iter_shakespeare
    return build_items(held_out_documents(list(clean_documents(iter_shakespeare()))), n_items=n_items, seed=seed)


def write_items(items: list[Item], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(it), ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    return path


def read_items(path: str | Path = ITEM_FILE) -> list[Item]:
    """The items of a JSONL file, checked: four distinct endings, a label in 0..3."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark item file at {path}; the shipped one is {ITEM_FILE}")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = Item(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path}:{n} is not a benchmark item ({exc})") from exc
        if len(item.endings) != 4 or len(set(item.endings)) != 4 or item.label not in range(4) or not item.context:
            raise ValueError(f"{path}:{n}: an item needs a context, four distinct endings and a label in 0..3")
        items.append(item)
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def held_out_report(items: list[Item], tokenizer, train_ids: np.ndarray, val_ids: np.ndarray) -> dict:
    """How many items' passages (context + true ending) lie in the run's decoded validation text,
    and how many occur anywhere in its training text (which must be none)."""
    val_text = tokenizer.decode(val_ids.tolist())
    train_text = tokenizer.decode(train_ids.tolist())
    passages = [it.context + it.endings[it.label] for it in items]
    return {"items": len(items), "in_validation": sum(p in val_text for p in passages),
            "in_training": sum(p in train_text for p in passages)}


if __name__ == "__main__":
    written = write_items(shakespeare_items(), ITEM_FILE)
    print(f"wrote {N_ITEMS} items to {written}")
