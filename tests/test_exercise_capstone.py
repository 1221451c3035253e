"""Exercise 7's hidden probes for bits per byte and the multiple-choice rule reject the plausible wrong answers.

The probes' run functions are called here directly on hand-written answers (no kernel, no sandbox): the
rule worked by hand from its definition is accepted, each near miss (no ln 2, per token instead of per
byte, no error for a zero byte count; the raw sum, per character, per token, the last of a tie, one
hard-coded index) is rejected on the hidden inputs of several seeds.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import REPO
from pretrain_lib.grading.reference import accepts, load_exercise

EXERCISE = REPO / "exercises" / "07_capstone.ipynb"
SEEDS = (1, 2, 987_654_321)


@pytest.fixture(scope="module")
def exercise():
    return load_exercise(EXERCISE, REPO / "solutions")


def _probe(ex, check_id, name, fn, seed):
    from pretrain_lib.grading.probe_runner import load_probes
    return load_probes(ex.probe_source)["PROBES"][check_id]["run"]({name: fn}, seed, None)


def test_points_and_which_checks_have_probes(exercise):
    points = {c.check_id: c.max_points for c in exercise.checks}
    assert points == {"atomic-write": 4, "resume-state": 3, "config-validation": 3, "bits-per-byte": 2, "mc-choice": 3}
    assert set(exercise.judges) == {"bits-per-byte", "mc-choice"}
    assert {c.check_id: c.answer for c in exercise.checks if c.answer} == {"bits-per-byte": "bits_per_byte",
                                                                          "mc-choice": "choose"}


def _bpb(mean, n_tokens, n_bytes):
    if n_bytes <= 0:
        raise ValueError(n_bytes)
    return mean * n_tokens / (math.log(2) * n_bytes)


BPB_WRONG = {
    "no ln 2": lambda m, n, b: m * n / b if b > 0 else _bpb(m, n, b),
    "per token": lambda m, n, b: m / math.log(2) if b > 0 else _bpb(m, n, b),
    "no error": lambda m, n, b: m * n / (math.log(2) * b) if b else float("inf"),
}


@pytest.mark.parametrize("seed", SEEDS)
def test_bits_per_byte_probe(exercise, seed):
    judge = exercise.judges["bits-per-byte"]
    good = _probe(exercise, "bits-per-byte", "bits_per_byte", _bpb, seed)
    assert good[-2:] == ["ValueError", "ValueError"] and all(v > 0 for v in good[:-2])
    assert accepts(judge, good, good, seed)
    for name, wrong in BPB_WRONG.items():
        assert not accepts(judge, _probe(exercise, "bits-per-byte", "bits_per_byte", wrong, seed), good, seed), name


def _per_byte(logprobs, endings):
    return [sum(lp) / len(e.encode("utf-8")) for lp, e in zip(logprobs, endings)]


def _choose(logprobs, endings):
    scores = _per_byte(logprobs, endings)
    return next(i for i, s in enumerate(scores) if s == max(scores))


CHOOSE_WRONG = {
    "raw sum": lambda lp, e: int(np.argmax([sum(x) for x in lp])),
    "per character": lambda lp, e: int(np.argmax([sum(x) / len(s) for x, s in zip(lp, e)])),
    "per token": lambda lp, e: int(np.argmax([sum(x) / len(x) for x in lp])),
    "last of a tie": lambda lp, e: max(i for i, s in enumerate(_per_byte(lp, e)) if s == max(_per_byte(lp, e))),
    "hard-coded": lambda lp, e: 1,
}


@pytest.mark.parametrize("seed", SEEDS)
def test_choice_probe(exercise, seed):
    judge = exercise.judges["mc-choice"]
    good = _probe(exercise, "mc-choice", "choose", _choose, seed)
    assert accepts(judge, good, good, seed)
    assert good == _probe(exercise, "mc-choice", "choose", lambda lp, e: int(np.argmax(_per_byte(lp, e))), seed)
    for name, wrong in CHOOSE_WRONG.items():
        assert not accepts(judge, _probe(exercise, "mc-choice", "choose", wrong, seed), good, seed), name
