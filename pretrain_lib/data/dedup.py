"""Exact and near-duplicate detection.

* Exact: a SHA-256 of the normalised text (NFKC, case-folded, whitespace collapsed), so
  copies that differ only in spacing or case count as one.
* Near: MinHash signatures of word n-gram shingles, grouped with LSH banding (Broder 1997;
  Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3). For two shingle sets
  A and B and a random hash h, P[min h(A) = min h(B)] = J(A, B) = |A ∩ B| / |A ∪ B|, so
  the fraction of equal signature entries estimates the Jaccard similarity. Splitting
  ``num_perm = bands * rows`` entries into bands makes two documents with similarity s
  share at least one band with probability 1 - (1 - s^rows)^bands (an S-curve).

All hashing is vectorised with numpy (one ``(num_perm, n_shingles)`` array per document).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from .corpus import Document

# The largest prime below 2**32: with a, b, x < P, a * x + b < 2**64, so the universal hash
# (a x + b) mod P is computed exactly in uint64 without overflow.
_PRIME = np.uint64(4_294_967_291)
_WS = re.compile(r"\s+")


def normalize_for_hash(text: str) -> str:
    """NFKC, case-folded, whitespace runs collapsed to one space, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


@dataclass
class DedupReport:
    docs_in: int = 0
    docs_out: int = 0
    chars_removed: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (removed doc, the kept doc it copies)


def exact_dedup(docs: Iterable[Document], report: DedupReport | None = None) -> Iterator[Document]:
    """Yield each document whose normalised text has not been seen before (first copy wins).

    Memory: one 32-byte digest per distinct document, never the texts themselves.
    """
    report = report if report is not None else DedupReport()
    first_seen: dict[bytes, str] = {}
    for doc in docs:
        report.docs_in += 1
        digest = hashlib.sha256(normalize_for_hash(doc.text).encode("utf-8")).digest()
        if digest in first_seen:
            report.duplicates.append((doc.name, first_seen[digest]))
            report.chars_removed += len(doc.text)
            continue
        first_seen[digest] = doc.name
        report.docs_out += 1
        yield doc


# ---------------------------------------------------------------- MinHash

def shingle_hashes(text: str, *, ngram: int = 5) -> np.ndarray:
    """The distinct word ``ngram``-shingles of ``text`` as uint64 hashes in [0, 2**32 - 5).

    Words come from :func:`normalize_for_hash`; a text shorter than ``ngram`` words is one
    shingle. CRC32 is deterministic across processes (Python's ``hash`` is salted).
    """
    tokens = normalize_for_hash(text).split(" ")
    if ngram <= 0:
        raise ValueError(f"ngram must be positive, got {ngram}")
    if len(tokens) <= ngram:
        grams = [" ".join(tokens)]
    else:
        grams = [" ".join(tokens[i:i + ngram]) for i in range(len(tokens) - ngram + 1)]
    hashes = np.fromiter((zlib.crc32(g.encode("utf-8")) for g in grams), dtype=np.uint64, count=len(grams))
    return np.unique(hashes % _PRIME)


@dataclass(frozen=True)
class MinHasher:
    """``num_perm`` universal hash functions h_i(x) = (a_i x + b_i) mod P, drawn from ``seed``."""
    num_perm: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.num_perm <= 0:
            raise ValueError(f"num_perm must be positive, got {self.num_perm}")

    @property
    def params(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, int(_PRIME), size=self.num_perm, dtype=np.uint64)
        b = rng.integers(0, int(_PRIME), size=self.num_perm, dtype=np.uint64)
        return a, b

    def signature(self, shingles: np.ndarray, *, chunk: int = 8192) -> np.ndarray:
        """``(num_perm,)`` uint64: the minimum of each hash function over the shingles."""
        shingles = np.asarray(shingles, dtype=np.uint64)
        if shingles.size == 0:
            raise ValueError("cannot MinHash an empty shingle set")
        a, b = self.params
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, shingles.size, chunk):  # bounded memory: (num_perm, chunk) at a time
            x = shingles[start:start + chunk] % _PRIME
            hashed = (a[:, None] * x[None, :] + b[:, None]) % _PRIME
            np.minimum(sig, hashed.min(axis=1), out=sig)
        return sig

    def signatures(self, texts: Iterable[str], *, ngram: int = 5) -> np.ndarray:
        """``(n_docs, num_perm)`` signatures of ``texts``."""
        rows = [self.signature(shingle_hashes(t, ngram=ngram)) for t in texts]
        return np.stack(rows) if rows else np.zeros((0, self.num_perm), dtype=np.uint64)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal entries of two signatures: an unbiased estimate of J(A, B)."""
    return float(np.mean(sig_a == sig_b))


def exact_jaccard(a: Iterable, b: Iterable) -> float:
    """|A ∩ B| / |A ∪ B| of two sets (1.0 for two empty sets)."""
    a, b = set(a), set(b)
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def lsh_candidate_probability(similarity: float | np.ndarray, *, bands: int, rows: int) -> float | np.ndarray:
    """Probability that two documents of Jaccard ``similarity`` share at least one band."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=float) ** rows) ** bands


def lsh_candidate_pairs(signatures: np.ndarray, *, bands: int, rows: int) -> set[tuple[int, int]]:
    """Pairs ``(i, j)``, i < j, whose signatures are equal on all ``rows`` entries of some band.

    ``signatures``: ``(n_docs, bands * rows)``. Each band is grouped with ``np.unique`` over
    rows, so no Python loop runs over document pairs that share nothing.
    """
    n_docs, num_perm = signatures.shape
    if bands * rows != num_perm:
        raise ValueError(f"bands * rows = {bands} * {rows} = {bands * rows} must equal the signature length {num_perm}")
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        block = signatures[:, band * rows:(band + 1) * rows]
        _, bucket = np.unique(block, axis=0, return_inverse=True)
        bucket = bucket.reshape(-1)
        order = np.argsort(bucket, kind="stable")
        sorted_buckets = bucket[order]
        boundaries = np.flatnonzero(np.diff(sorted_buckets)) + 1
        for group in np.split(order, boundaries):
            if group.size > 1:
                g = np.sort(group)
                for x in range(g.size):
                    for y in range(x + 1, g.size):
                        pairs.add((int(g[x]), int(g[y])))
    return pairs


def near_duplicate_pairs(signatures: np.ndarray, *, bands: int, rows: int,
                         threshold: float | None = None) -> set[tuple[int, int]]:
    """LSH candidates, optionally confirmed by the signature's Jaccard estimate ≥ ``threshold``."""
    pairs = lsh_candidate_pairs(signatures, bands=bands, rows=rows)
    if threshold is None:
        return pairs
    return {(i, j) for i, j in pairs if estimated_jaccard(signatures[i], signatures[j]) >= threshold}


def brute_force_near_duplicates(shingle_sets: Sequence[Iterable], threshold: float) -> set[tuple[int, int]]:
    """Reference: every pair whose exact Jaccard is ≥ ``threshold`` (O(n²), small sets only)."""
    sets = [set(np.asarray(s).tolist()) for s in shingle_sets]
    return {(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))
            if exact_jaccard(sets[i], sets[j]) >= threshold}


def duplicate_clusters(n_docs: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (union-find) of the duplicate graph, each sorted, singletons left out."""
    parent = list(range(n_docs))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n_docs):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def near_dedup(docs: Sequence[Document], *, num_perm: int = 128, bands: int = 16, ngram: int = 5,
               threshold: float = 0.8, seed: int = 0,
               report: DedupReport | None = None) -> list[Document]:
    """Keep the first document of every near-duplicate cluster (estimated Jaccard ≥ ``threshold``)."""
    if num_perm % bands:
        raise ValueError(f"num_perm={num_perm} is not divisible by bands={bands}")
    report = report if report is not None else DedupReport()
    sigs = MinHasher(num_perm, seed).signatures((d.text for d in docs), ngram=ngram)
    pairs = near_duplicate_pairs(sigs, bands=bands, rows=num_perm // bands, threshold=threshold)
    drop: set[int] = set()
    for cluster in duplicate_clusters(len(docs), pairs):
        for i in cluster[1:]:
            drop.add(i)
            report.duplicates.append((docs[i].name, docs[cluster[0]].name))
            report.chars_removed += len(docs[i].text)
    report.docs_in += len(docs)
    report.docs_out += len(docs) - len(drop)
    return [d for i, d in enumerate(docs) if i not in drop]
