# Hidden probes of exercises/02_data.ipynb: packing, the rank x worker split, exact dedup,
# each on inputs drawn from the run's secret seed.
FORBIDDEN = {"pack_documents", "pretrain_lib.data.packing", "ShardedTokenDataset", "worker_windows", "library_dedup",
             "pretrain_lib.data.dedup", "pretrain_lib.data.loader", "dedup.exact_dedup", "packing.pack_documents"}


def _docs(seed, salt, n):
    r = rng(seed, salt)
    return [r.integers(5, 5000, int(r.integers(1, 40))).tolist() for _ in range(n)], r


def _pack_small(ns, seed, ctx):
    out = []
    for k in range(4):
        docs, r = _docs(seed, 40 + k, int(3 + k))
        block = int(r.integers(2, 7))
        total = sum(len(d) + 1 for d in docs)
        if total < block:
            block = total
        b = ns["pack"](docs, block, 3)
        out.append({"blocks": b.tolist(), "dtype": str(b.dtype), "shape": list(b.shape)})
    return out


def _pack_random(ns, seed, ctx):
    docs, r = _docs(seed, 50, 60)
    blocks = ns["pack"](docs, int(r.integers(16, 80)), 4).tolist()
    try:
        ns["pack"]([[1, 2]], int(r.integers(5, 20)), 0)
        raises = "no error"
    except ValueError:
        raises = "ValueError"
    except Exception as exc:
        raises = type(exc).__name__
    return {"blocks": blocks, "short": raises}


def _split_cases(seed):
    r = rng(seed, 60)
    return [(int(r.integers(1, 3000)), int(r.integers(1, 6)), int(r.integers(1, 6))) for _ in range(4)]


def _split_run(ns, seed, ctx):
    return [[[ns["split_windows"](n, rank, w, k, nw) for k in range(nw)] for rank in range(w)]
            for n, w, nw in _split_cases(seed)]


def _split_judge(student, reference, seed):
    cases = _split_cases(seed)
    if not isinstance(student, list) or len(student) != len(cases):
        return False, f"returned {len(student) if isinstance(student, list) else 'no'} cases where {len(cases)} were run"
    for (n, w, nw), case in zip(cases, student):
        if not isinstance(case, list) or len(case) != w or any(not isinstance(r, list) or len(r) != nw for r in case):
            return False, f"{n} windows on {w} ranks x {nw} workers: not one list per rank and worker"
        if any(not isinstance(part, list) for per_rank in case for part in per_rank):
            return False, f"{n} windows on {w} ranks x {nw} workers: a part is not a list of window indices"
        got = [i for per_rank in case for part in per_rank for i in part]
        if sorted(got) != list(range(n)):
            return False, f"{n} windows on {w} ranks x {nw} workers are not covered exactly once"
        sizes = [len(part) for per_rank in case for part in per_rank]
        if max(sizes) - min(sizes) > 1:
            return False, f"{n} windows on {w} ranks x {nw} workers: counts from {min(sizes)} to {max(sizes)}"
    return True, ""


def _split_library(ns, seed, ctx):
    r = rng(seed, 61)
    return [[ns["split_windows"](n, rank, 2, k, 2) for rank in range(2) for k in range(2)]
            for n in r.integers(5, 500, 3).tolist()]


def _texts(seed, salt):
    r = rng(seed, salt)
    words = ["alpha", "Beta", "gamma", "delta", "Straße", "naïve", "ｆｕｌｌ", "x1", "mix"]
    base = [" ".join(r.choice(words, int(r.integers(1, 6)))) for _ in range(12)]
    texts = []
    for t in base + base[: int(r.integers(3, 9))]:
        kind = int(r.integers(0, 4))
        t = t.upper() if kind == 1 else t.replace(" ", "  \t") if kind == 2 else t + "\n " if kind == 3 else t
        texts.append(t)
    order = r.permutation(len(texts))
    return [texts[i] for i in order]


def _dedup_code(ns, seed, ctx):
    return ns["exact_dedup"]([t.replace("a", "def f():\n    ") for t in _texts(seed, 71)])


PROBES = {
    "pack-small": {"answer": "pack", "run": _pack_small, "judge": equal},
    "pack-random-documents": {"answer": "pack", "run": _pack_random, "judge": equal},
    "split-covers-once": {"answer": "split_windows", "run": _split_run, "judge": _split_judge},
    "split-matches-library": {"answer": "split_windows", "run": _split_library, "judge": equal},
    "dedup-normalised": {"answer": "exact_dedup", "run": lambda ns, seed, ctx: ns["exact_dedup"](_texts(seed, 70)),
                         "judge": equal},
    "dedup-code": {"answer": "exact_dedup", "run": _dedup_code, "judge": equal},
}

describe_inputs(PROBES, {
    "pack-small": "4 short lists of documents packed into blocks of 2-6 tokens",
    "pack-random-documents": "60 random documents packed into blocks of 16-80 tokens, then a document too short "
                             "for one block",
    "split-covers-once": "4 random (windows, ranks, workers) triples, every rank and worker asked for its part",
    "split-matches-library": "3 random window counts on 2 ranks x 2 workers",
    "dedup-normalised": "random texts repeated with changed case, runs of spaces and tabs, and trailing newlines",
    "dedup-code": "random texts holding code (newlines and indentation matter)",
})
