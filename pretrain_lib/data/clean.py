"""Text cleaning and heuristic quality filters (in the style of the Gopher rules).

Two kinds of step:

* **normalisers** change a document's text: Unicode NFKC, line endings and trailing
  whitespace, HTML/markdown markup;
* **rules** keep or drop a whole document: length in words, mean word length, the
  symbol-to-word ratio, the fraction of duplicate lines (Rae et al. 2021, "Scaling
  Language Models: Methods, Analysis & Insights from Training Gopher", appendix A).

:func:`clean_documents` applies both lazily and fills a :class:`CleaningReport` that says,
for every rule, how many documents and characters it removed. The rules were tuned for
English web prose; code breaks several of them, which is why :func:`code_rules` exists.
"""
from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator

from .corpus import Document, strip_markdown

# ---------------------------------------------------------------- normalisation

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")   # keeps \t and \n
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_MANY_BLANK_LINES = re.compile(r"\n{3,}")
_HTML_BLOCK = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(\s[^<>]*)?/?>")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)


def normalize_text(text: str) -> str:
    """NFKC-normalise and tidy whitespace without touching indentation.

    NFKC folds compatibility characters (full-width letters, ligatures such as "ﬁ",
    non-breaking spaces) into their plain forms, so the same word is one string. Line
    endings become ``\\n``, control characters go, trailing spaces go, and runs of blank
    lines shrink to one blank line. Leading whitespace is kept: in code it is syntax.
    """
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    return _MANY_BLANK_LINES.sub("\n\n", text).strip("\n") + "\n" if text.strip() else ""


def strip_markup(text: str) -> str:
    """Remove HTML (tags, comments, script/style blocks, entities), then markdown markup with
    :func:`pretrain_lib.data.corpus.strip_markdown`, keeping the words a reader would see."""
    text = _HTML_BLOCK.sub(" ", text)
    text = _HTML_COMMENT.sub(" ", text)
    text = _HTML_TAG.sub("", text)
    return strip_markdown(html.unescape(text))


# ---------------------------------------------------------------- document statistics

def words(text: str) -> list[str]:
    """Whitespace-separated words (the Gopher rules count words this way)."""
    return text.split()


def mean_word_length(text: str) -> float:
    """Mean number of characters per word; 0.0 for a text without words."""
    w = words(text)
    return sum(len(x) for x in w) / len(w) if w else 0.0


def symbol_to_word_ratio(text: str) -> float:
    """(number of ``#`` + number of ellipses ``...`` / ``…``) / number of words.

    High values flag tag lists and truncated snippets in web text (and comments in code).
    """
    n_words = len(words(text))
    if n_words == 0:
        return float("inf")
    n_symbols = text.count("#") + text.count("...") + text.count("…")
    return n_symbols / n_words


def duplicate_line_fraction(text: str) -> float:
    """Fraction of non-empty lines that repeat an earlier line of the same document."""
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


# ---------------------------------------------------------------- rules

@dataclass(frozen=True)
class Rule:
    """A quality rule: ``keep(text)`` is True for a document that passes."""
    name: str
    description: str
    keep: Callable[[str], bool]


def gopher_rules(*, min_words: int = 50, max_words: int = 100_000, min_mean_word_length: float = 3.0,
                 max_mean_word_length: float = 10.0, max_symbol_ratio: float = 0.1,
                 max_duplicate_lines: float = 0.3) -> list[Rule]:
    """The Gopher paper's prose rules, with its default thresholds."""
    return [
        Rule("length", f"{min_words} ≤ words ≤ {max_words}", lambda t: min_words <= len(words(t)) <= max_words),
        Rule("mean_word_length", f"{min_mean_word_length} ≤ mean word length ≤ {max_mean_word_length}",
             lambda t: min_mean_word_length <= mean_word_length(t) <= max_mean_word_length),
        Rule("symbol_ratio", f"(# + ellipses) / words ≤ {max_symbol_ratio}",
             lambda t: symbol_to_word_ratio(t) <= max_symbol_ratio),
        Rule("duplicate_lines", f"duplicate-line fraction ≤ {max_duplicate_lines}",
             lambda t: duplicate_line_fraction(t) <= max_duplicate_lines),
    ]


def code_rules(*, min_lines: int = 5, max_line_length: int = 1000, max_duplicate_lines: float = 0.5) -> list[Rule]:
    """Rules for source code, where words are identifiers and ``#`` starts a comment."""
    return [
        Rule("length", f"≥ {min_lines} non-empty lines",
             lambda t: sum(1 for ln in t.split("\n") if ln.strip()) >= min_lines),
        Rule("max_line_length", f"no line longer than {max_line_length} characters (minified or generated code)",
             lambda t: max((len(ln) for ln in t.split("\n")), default=0) <= max_line_length),
        Rule("duplicate_lines", f"duplicate-line fraction ≤ {max_duplicate_lines}",
             lambda t: duplicate_line_fraction(t) <= max_duplicate_lines),
    ]


def default_rules(domain: str) -> list[Rule]:
    """Gopher rules for prose, code rules for ``domain == "code"``."""
    return code_rules() if domain == "code" else gopher_rules()


class EmptyCorpusError(ValueError):
    """Raised when no document survives cleaning and filtering."""


@dataclass
class RuleStats:
    docs_removed: int = 0
    chars_removed: int = 0


@dataclass
class CleaningReport:
    """What cleaning did. ``removed[rule]`` counts documents a rule removed; each removed
    document is charged to the *first* rule it fails, so the counts add up."""
    docs_in: int = 0
    docs_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    chars_normalised_away: int = 0
    removed: dict[str, RuleStats] = field(default_factory=dict)
    removed_names: dict[str, list[str]] = field(default_factory=dict)

    def add_removed(self, rule: str, doc: Document) -> None:
        stats = self.removed.setdefault(rule, RuleStats())
        stats.docs_removed += 1
        stats.chars_removed += len(doc.text)
        self.removed_names.setdefault(rule, []).append(doc.name)

    def table(self) -> str:
        lines = [f"{'rule':<18} {'docs removed':>12} {'chars removed':>14}"]
        for rule, s in self.removed.items():
            lines.append(f"{rule:<18} {s.docs_removed:>12} {s.chars_removed:>14,}")
        lines.append(f"kept {self.docs_out}/{self.docs_in} documents, {self.chars_out:,}/{self.chars_in:,} characters "
                     f"({self.chars_normalised_away:,} removed by normalisation)")
        return "\n".join(lines)


def clean_documents(docs: Iterable[Document], *, rules: list[Rule] | Callable[[str], list[Rule]] | None = None,
                    strip_html: bool = False, report: CleaningReport | None = None) -> Iterator[Document]:
    """Normalise every document, then keep those that pass every rule (lazily).

    ``rules``: a list applied to all documents, or a function ``domain -> rules``
    (default :func:`default_rules`). Raises :class:`EmptyCorpusError` after the last
    document if none survived, so a too-strict filter fails loudly instead of training
    on nothing.
    """
    report = report if report is not None else CleaningReport()
    rules_for = rules if callable(rules) else (lambda domain: rules) if rules is not None else default_rules
    for doc in docs:
        report.docs_in += 1
        report.chars_in += len(doc.text)
        text = strip_markup(doc.text) if strip_html else doc.text
        text = normalize_text(text)
        report.chars_normalised_away += len(doc.text) - len(text)
        cleaned = replace(doc, text=text)
        if not text:
            report.add_removed("empty", cleaned)
            continue
        failed = next((r for r in rules_for(doc.domain) if not r.keep(text)), None)
        if failed is not None:
            report.add_removed(failed.name, cleaned)
            continue
        for r in rules_for(doc.domain):
            report.removed.setdefault(r.name, RuleStats())
        report.docs_out += 1
        report.chars_out += len(text)
        yield cleaned
    if report.docs_out == 0:
        raise EmptyCorpusError(
            f"no document survived cleaning ({report.docs_in} in); removed per rule: "
            + ", ".join(f"{k}={v.docs_removed}" for k, v in report.removed.items())
            + ". Loosen the rule thresholds or check that the corpus is not empty.")
