# Hidden probes of exercises/07_capstone.ipynb: bits per byte on (loss, tokens, bytes) drawn from the secret seed,
# with a byte count of 0 and a negative one; the multiple-choice rule on items drawn from the seed (2-6 endings of
# 1-15 characters, some multi-byte, so the raw sum, the per-token mean and a count of characters all choose otherwise
# on many of them; a quarter hold an exact tie). Values are compared with the solution's on the same inputs. The
# first three parts (atomic write, resume state, config validator) are graded on their visible output.
FORBIDDEN = {"library_bits_per_byte", "metrics.bits_per_byte", "evaluate.bits_per_byte", "scoring.predictions",
             "scoring.byte_lengths", "scoring.correct", "pretrain_lib.evaluate", "pretrain_lib.benchmark"}

_LETTERS = "abcdefghijklmnopqrstuvwxyz" * 3 + "éüßçñ—€ø" + "語😀"   # characters of 1 to 4 bytes, mostly ASCII


def _bits_per_byte(ns, seed, ctx):
    r = rng(seed, 70)
    out = []
    for _ in range(8):
        n_tokens = int(r.integers(1, 10**6))
        n_bytes = max(1, int(round(n_tokens * float(r.uniform(0.5, 6.0)))))   # 0.5 to 6 bytes per token
        out.append(float(ns["bits_per_byte"](float(r.uniform(0.05, 9.0)), n_tokens, n_bytes)))
    for bad in (0, -int(r.integers(1, 100))):
        try:
            ns["bits_per_byte"](float(r.uniform(0.05, 9.0)), int(r.integers(1, 1000)), bad)
            out.append("no error")
        except ValueError:
            out.append("ValueError")
        except Exception as exc:  # noqa: BLE001 - another exception is a wrong answer, reported as a value
            out.append(type(exc).__name__)
    return out


def _item(r):
    k = int(r.integers(2, 7))
    endings = [" " + "".join(r.choice(list(_LETTERS), int(r.integers(1, 15)))) for _ in range(k)]
    logprobs = []
    for e in endings:
        n_tokens = int(r.integers(1, len(e) + 1))
        per_byte = float(r.uniform(0.2, 3.0))
        weights = r.dirichlet([1.0] * n_tokens)
        logprobs.append([float(-per_byte * len(e.encode("utf-8")) * w) for w in weights])
    if r.random() < 0.25:   # an exact tie at the top between two endings: one token each, q/8 nats per byte
        i, j = sorted(int(x) for x in r.choice(k, 2, replace=False))
        best = max(sum(lp) / len(e.encode("utf-8")) for lp, e in zip(logprobs, endings))
        q = int(-best * 8)      # -q/8 >= best, and q >= 1 since every ending costs at least 0.2 nats per byte
        for m in (i, j):
            logprobs[m] = [-(q / 8) * len(endings[m].encode("utf-8"))]
    return logprobs, endings


def _choose(ns, seed, ctx):
    r = rng(seed, 71)
    return [int(ns["choose"](*_item(r))) for _ in range(60)]


PROBES = {
    "bits-per-byte": {"answer": "bits_per_byte", "run": _bits_per_byte,
                      "judge": lambda s, r, seed: close(s, r, 1e-9, 1e-12)},
    "mc-choice": {"answer": "choose", "run": _choose, "judge": equal},
}

describe_inputs(PROBES, {
    "bits-per-byte": "8 random (mean loss, tokens, bytes) at 0.5 to 6 bytes per token, then byte counts of 0 and below",
    "mc-choice": "60 random items of 2-6 endings of 1-15 characters (some of 2-4 bytes), a quarter with an exact tie",
})
