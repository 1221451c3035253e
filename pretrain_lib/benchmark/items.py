"""Building and reading the benchmark's items (``python -m pretrain_lib.benchmark.items`` rebuilds the file).

The item file is fixed and versioned: ``pretrain_lib/assets/shakespeare_mc_v2.jsonl``, one JSON
object a line (``id``, ``source``, ``context``, ``endings``, ``label``, ``version``). It is made by
:func:`build_items` from the cleaned plays with a fixed seed, so running this module again writes
the same bytes (a test checks it); a change to the rules below is a new version and a new file.

Version 2: the next word. The context stops in the middle of a spoken line, after a word (at least
:data:`MIN_HEAD` characters into the line); the true ending is the word that follows, with its
leading space and any punctuation attached (`` lord,``), 4 to 15 characters; the three distractors
are words that follow the same kind of cut elsewhere in held-out text, of exactly the same length,
drawn by occurrence (a common word is drawn as often as the text uses it). So nothing but fit to the
context tells the endings apart: a model blind to the context, such as the unigram model of the
training split, stays near chance, while a model that has learnt which word may follow which
(syntax, the sentence's and the speaker's thread) gains. Version 1 (the next whole line of 25-60
characters after whole lines, distractors drawn from distinct lines) left both shipped GPT configs
at chance: a line's score per byte is mostly its own words' frequencies, not its fit to the context,
and distinct-string sampling made rare lines over-represented among the distractors.

Held-out text. The trainer's validation split is the last ``val_fraction`` (0.1) of the token
stream of the plays in sorted order, so the last plays are text the model never trains on. The
items come only from the plays that *start* after :data:`HELD_OUT_FROM` (0.92) of the cleaned
stream's characters: two points of margin, because a BPE tokenizer compresses plays a little
unevenly and its 90 % boundary falls a little off the character one. Which plays these are is
computed, not typed in (today: Romeo and Juliet, Timon of Athens). Since the split is a property
of each run, :func:`held_out_report` checks a run's own splits: every item's passage must lie in
its decoded validation text and nowhere in its training text.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

VERSION = 2
ITEM_FILE = Path(__file__).resolve().parents[1] / "assets" / f"shakespeare_mc_v{VERSION}.jsonl"
HELD_OUT_FROM = 0.92       # items come from plays starting after this fraction of the stream (val_fraction 0.1)
N_ITEMS = 600              # a 95 % interval of about ±0.04 on an accuracy near 0.4
SEED = 2026
CONTEXT_CHARS = 400        # the passage: whole lines going back from the cut, at most this long (~120 BPE tokens)
MIN_HEAD = 10              # the cut lies at least this many characters into its line
MIN_ENDING, MAX_ENDING = 4, 15   # an ending: a space and one word with its punctuation (" the" .. " unfortunate,")
NEAR_LINES = 10            # a distractor never comes from within this many lines of the true ending
STAGE_DIRECTIONS = ("Enter", "Exit", "Exeunt", "Re-enter")
_NEXT_WORD = re.compile(r"(?<=\S) \S+")   # a space after a word, and the word after it


@dataclass
class Item:
    id: str
    source: str
    context: str
    endings: list[str]
    label: int
    version: int = VERSION


def _is_dialogue(line: str) -> bool:
    """A spoken line: not blank, not a speaker's name (the plays write names in capitals), not a stage
    direction (in italics, ``_Enter ..._``, or a bare ``Exeunt ...``)."""
    stripped = line.strip()
    return (bool(stripped) and stripped != stripped.upper() and not stripped.startswith("_")
            and stripped.split()[0] not in STAGE_DIRECTIONS)


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


def next_word_cuts(docs) -> list[tuple[str, int, int, str]]:
    """Every ``(document, line index, offset of the cut in the document, ending)`` of ``docs``: a cut
    after a word at least ``MIN_HEAD`` characters into a spoken line, the ending the next word with
    its leading space, ``MIN_ENDING``..``MAX_ENDING`` characters."""
    cuts = []
    for d in docs:
        line_start = 0
        for i, line in enumerate(d.text.split("\n")):
            if _is_dialogue(line):
                for m in _NEXT_WORD.finditer(line):
                    if m.start() >= MIN_HEAD and MIN_ENDING <= len(m.group()) <= MAX_ENDING:
                        cuts.append((d.name, i, line_start + m.start(), m.group()))
            line_start += len(line) + 1
    return cuts


def _context(text: str, cut: int) -> str:
    """The text before ``cut``: the head of its line and whole lines before it, at most ``CONTEXT_CHARS``."""
    first = text.rfind("\n", 0, cut) + 1           # start of the cut's line
    while first > 0:
        previous = text.rfind("\n", 0, first - 1) + 1
        if cut - previous > CONTEXT_CHARS:
            break
        first = previous
    return text[first:cut].lstrip("\n")


def build_items(docs, *, n_items: int = N_ITEMS, seed: int = SEED) -> list[Item]:
    """Items from ``docs`` (held-out documents, in order): ``n_items`` lines, one cut each (drawn
    among the line's cuts), the next word as the true ending and three distractors of the same
    length drawn by occurrence among all cuts' endings, none near the true one, all different."""
    rng = random.Random(seed)
    cuts = next_word_cuts(docs)
    by_line: dict[tuple[str, int], list] = {}
    for cut in cuts:
        by_line.setdefault(cut[:2], []).append(cut)
    candidates = [rng.choice(line_cuts) for line_cuts in by_line.values()]
    if len(candidates) < n_items:
        raise ValueError(f"only {len(candidates)} candidate items in the held-out text, fewer than {n_items}")
    by_length: dict[int, list] = {}
    for cut in cuts:
        by_length.setdefault(len(cut[3]), []).append(cut)
    texts = {d.name: d.text for d in docs}
    items = []
    for name, i, offset, word in sorted(rng.sample(candidates, n_items), key=lambda c: (c[0], c[1])):
        pool = [c[3] for c in by_length[len(word)] if c[3] != word and not (c[0] == name and abs(c[1] - i) <= NEAR_LINES)]
        if len(set(pool)) < 3:
            raise ValueError(f"fewer than three distinct {len(word)}-character distractors for {word!r}")
        distractors: list[str] = []
        while len(distractors) < 3:           # by occurrence: a word is drawn as often as the text has it
            pick = rng.choice(pool)
            if pick not in distractors:
                distractors.append(pick)
        label = rng.randrange(4)
        endings = distractors[:label] + [word] + distractors[label:]
        items.append(Item(f"{name}-{i:05d}", name, _context(texts[name], offset), endings, label))
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
