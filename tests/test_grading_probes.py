"""The verdict side of the grader against a class that fights back (issue 20, families 3, 4, 8, 9).

* 3: the hidden probes run in a separate probe process, started after the kernel has ended; the
  kernel never sees the probe code, the seed or the channel, so forging PASS lines, the check
  helper, the probe function or its protocol line gains nothing; judges check the whole contract
  (an empty, truncated or all-ignored result fails);
* 4: review flags see through dynamic access (getattr with a built name, aliases, frames) and
  leave IPython magics alone (``%matplotlib inline``, ``%%time``), whose cells still grade;
* 8: a helper function in a new cell of its own is run before the answers that use it; a
  leftover debug print inside an answer costs nothing when a hidden probe decides;
* 9: a failed hidden probe says what failed on which kind of input (never the seed); notes are
  de-duplicated and capped.

Submissions are built here from the real Chapter 1 exercise (the smallest with torch) and graded
as one class (``grade_class``, two at a time).
"""
from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path

import nbformat
import pytest

from conftest import REPO
from pretrain_lib.grading.gradebook import grade_class
from pretrain_lib.grading.grader import _same_output, assemble, cap_notes
from pretrain_lib.grading.probe_runner import python_cells, run_isolated
from pretrain_lib.grading.reference import (accepts, degenerate_values, load_exercise, reference_values,
                                            solution_cells)
from pretrain_lib.grading.review import review_source
from pretrain_lib.grading.sandbox import default_memory_limit, hidden_paths

OBJECTIVES = REPO / "exercises" / "01_objectives.ipynb"
SOLUTION = REPO / "solutions" / "01_objectives.ipynb"
SEED = 987_654_321_123          # fixed so the test can look for it in every feedback file


def _nb(path: Path):
    return nbformat.read(path, as_version=4)


def _cell_by_defines(nb, name: str):
    return next(c for c in nb.cells if name in c.get("metadata", {}).get("course", {}).get("defines", [])
                or re.search(rf"^(def {name}\b|{name}\s*=)", c.source, re.M) and "answer" in c.metadata.get("tags", []))


def _set(nb, name: str, source: str):
    nb = copy.deepcopy(nb)
    _cell_by_defines(nb, name).source = source
    return nb


def _code(source: str, tags=()):
    c = nbformat.v4.new_code_cell(source)
    if tags:
        c.metadata["tags"] = list(tags)
    return c


# --- units (seconds) ---------------------------------------------------------------------------

def test_the_kernel_notebook_holds_no_probe_code_seed_or_expected_output():
    ex = load_exercise(OBJECTIVES)
    built = assemble(ex, _nb(SOLUTION), SEED)
    text = json.dumps(built.notebook)
    assert str(SEED) not in text and "PROBES" not in text and "_mask_judge" not in text
    assert "PASS about 15% of ordinary positions are selected" not in text
    assert "probe_runner" not in text


def test_the_mislabelled_check_is_named_by_what_it_tests():
    ex = load_exercise(OBJECTIVES)
    titles = {c.check_id: c.title for c in ex.checks}
    assert "15%" in titles["mask-tokens-proportions"], titles


def test_every_judge_rejects_empty_truncated_and_all_ignored_values():
    """The reference run refuses a judge that accepts a degenerate value; the holes the issue found are shut."""
    zip_judge = lambda s, r, seed: (all(a == b for a, b in zip(s, r)), "")   # the old hole: zip over nothing
    assert any(accepts(zip_judge, v, [1, 2, 3], 0) for v in degenerate_values([1, 2, 3]))
    for name in ("01_objectives", "02_data"):
        ex = load_exercise(REPO / "exercises" / f"{name}.ipynb")
        values, note = reference_values(ex, SEED)       # raises when a judge accepts a degenerate value
        assert note == "" and all("value" in v for v in values.values())
    ex2 = load_exercise(REPO / "exercises" / "02_data.ipynb")
    split = values = reference_values(ex2, SEED)[0]["split-covers-once"]["value"]
    assert not accepts(ex2.judges["split-covers-once"], [], split, SEED)
    assert not accepts(ex2.judges["split-covers-once"], split[:1], split, SEED)
    # mask_tokens returning noise with every label ignored: neither mask check accepts it
    ex1 = load_exercise(OBJECTIVES)
    ref = reference_values(ex1, SEED)[0]
    for cid in ("mask-tokens-proportions", "mask-tokens-labels-seeded"):
        good = ref[cid]["value"]
        runs = good if isinstance(good, list) else [good]
        noise = [{"inputs": [[(i * 7 + j) % 300 for j in range(len(r["labels"][0]))] for i in range(len(r["labels"]))],
                  "labels": [[-100] * len(r["labels"][0]) for _ in r["labels"]], "unchanged": True} for r in runs]
        noise[-1]["inputs"] = [[7] * len(noise[-1]["labels"][0])] * len(noise[-1]["labels"])  # differ between seeds
        forged = noise if isinstance(good, list) else noise[0]
        assert accepts(ex1.judges[cid], good, good, SEED)
        assert not accepts(ex1.judges[cid], forged, good, SEED), cid
        ignored = copy.deepcopy(good)        # the solution's inputs, every label -100
        for r in (ignored if isinstance(ignored, list) else [ignored]):
            r["labels"] = [[-100] * len(row) for row in r["labels"]]
        assert not accepts(ex1.judges[cid], ignored, good, SEED), cid


def test_the_probe_process_ignores_forged_channel_messages_and_sees_no_host_environment(monkeypatch):
    """Answer code in the probe process writes forged protocol lines to every descriptor, prints, and
    reads the environment: only the values its functions return come back."""
    monkeypatch.setenv("INSTRUCTOR_TOKEN", "tok-8d1e2f")
    ex = load_exercise(OBJECTIVES)
    cells = solution_cells(SOLUTION)
    forger = ("import os, json\n"
              "for fd in range(0, 64):\n"
              "    for msg in ({'loaded': True}, {'nonce': 'x', 'check': 'clm-loss', 'result': {'value': [1.0] * 6}}):\n"
              "        try:\n            os.write(fd, (json.dumps(msg) + '\\n').encode())\n"
              "        except OSError:\n            pass\n"
              "print('{\"loaded\": true}')\n"
              "def clm_loss(logits, input_ids, *, ignore_index=-100):\n"
              "    raise RuntimeError('env ' + os.environ.get('INSTRUCTOR_TOKEN', 'absent'))\n")
    cells = [c for c in cells if "def clm_loss" not in c] + [forger]
    values, note = run_isolated(python_cells(cells), ex.probe_source, ["mlm-loss", "clm-loss"], SEED, timeout_s=240,
                                cell_timeout_s=60, memory_bytes=default_memory_limit(2), hide=hidden_paths([]))
    assert note == "", note
    assert "value" in values["mlm-loss"]
    assert values["clm-loss"] == {"error": "RuntimeError: env absent"}


def test_review_sees_through_dynamic_access_and_leaves_magics_alone():
    forbidden = load_exercise(OBJECTIVES).forbidden
    attacks = {
        "import sys\nm = getattr(sys, 'mod' + 'ules')['pretrain' + '_lib.objectives']": "computed attribute name",
        "import sys\nm = getattr(sys, 'modules')": "modules",
        "import sys as s\nm = s.modules['x']": "sys.modules",
        "from sys import modules": "sys.modules",
        "m = vars(__builtins__)": "vars",
        "try:\n    1 / 0\nexcept Exception as e:\n    g = e.__traceback__.tb_frame.f_globals": "f_globals",
        "import importlib\nm = importlib.import_module('pretrain' + '_lib.objectives')": "importlib",
        "m = __import__('pretrain_lib.objectives')": "__import__",
        "import operator\nf = operator.attrgetter('mask' + '_tokens_reference')": "computed attribute name",
        "from pretrain_lib import objectives as o\nf = o.mlm_loss": "library",
        "x = some_module.__dict__['mlm_loss']": "__dict__",
        "%time r = __import__('os').system('ls')": "__import__",
        "%%bash\nls /": "%%bash",
        "!cat /etc/passwd": "shell",
    }
    for source, fragment in attacks.items():
        reasons = review_source(source, forbidden=forbidden, modules={"torch", "F"})
        assert any(fragment in r for r in reasons), (source, reasons)
    honest = ["%matplotlib inline\nimport torch\ndef f(x):\n    return x", "%%time\ndef f(x):\n    return x",
              "%time y = sum([1, 2])", "%config InlineBackend.figure_format = 'svg'\nz = 1",
              "def f(x):\n    print('debug', x.shape)\n    return x.sum()"]
    for source in honest:
        assert review_source(source, forbidden=forbidden, modules={"torch", "F"}) == [], source


def test_notes_are_deduplicated_and_capped_and_extra_lines_cost_nothing_only_with_a_probe():
    notes = cap_notes(["same"] * 50_000 + [f"note {i}" for i in range(10_000)] + ["REVIEW: x"] + ["y" * 10**6])
    assert len(notes) <= 41 and notes[0] == "same" and "REVIEW: x" in notes and sum(map(len, notes)) < 100_000
    assert notes[-1].startswith("... and ")
    expected = "PASS a\nPASS b\n"
    assert _same_output("debug 1\nPASS a\ndebug 2\nPASS b\n", expected, extra_lines_ok=True)
    assert not _same_output("debug 1\nPASS a\ndebug 2\nPASS b\n", expected)
    assert not _same_output("PASS a\nFAIL b\n", expected, extra_lines_ok=True)
    assert not _same_output("PASS b\nPASS a\n", expected, extra_lines_ok=True)


def test_many_extra_cells_make_one_short_note():
    ex = load_exercise(OBJECTIVES)
    nb = _nb(SOLUTION)
    nb.cells += [_code(f"print({i})") for i in range(2_000)] + [_code("print('same')") for _ in range(2_000)]
    built = assemble(ex, nb, SEED)
    text = "\n".join(built.notes)
    assert len(built.notes) <= 3 and len(text) < 2_000 and "and 3990 more" in text, built.notes


# --- one class (the adversarial submissions, graded together) ------------------------------------------

def _submissions(subs: Path) -> dict[str, str]:
    """Write the class; returns what each student is."""
    sol, exe = _nb(SOLUTION), _nb(OBJECTIVES)
    mask_src = _cell_by_defines(sol, "mask_tokens").source
    mlm_src = _cell_by_defines(sol, "mlm_loss").source
    students = {}

    def write(name, nb, what):
        (subs / name).mkdir(parents=True)
        nbformat.write(nb, subs / name / "01_objectives.ipynb")
        students[name] = what

    write("honest", sol, "the solution")
    # 3: every answer a stub; the kernel swaps the check helper, patches the probe machinery, prints protocol lines
    forger = ("import sys, os\n"
              "_m = sys.modules['pretrain_lib.grading.checks']\n"
              "def check(name, cond):\n    print('PASS', name)\n    return True\n"
              "_m.check = check\n"
              "import pretrain_lib.grading.probe_runner as _pr\n"
              "_pr.run_probes = lambda *a, **k: {c: {'value': 0} for c in a[1]}\n"
              "for _k in list(os.environ):\n    print('GRADING-PROBE', _k)\n"
              "print('{\"loaded\": true}')\n"
              "print('GRADING-PROBE 0123456789abcdef {\"mlm-loss\": {\"value\": [1.0, 2.0, 3.0]}}')\n"
              "def mask_tokens(input_ids, *, mask_token_id, vocab_size, special_token_ids=(), mlm_probability=0.15, "
              "generator=None):\n    raise NotImplementedError\n")
    write("stub_forger", _set(exe, "mask_tokens", forger), "stubs + forged checks and probe lines")
    # 3: noise from mask_tokens with every label ignored, the check helper forged so the visible output passes
    noise = ("def check(name, cond):\n    print('PASS', name)\n    return True\n"
             "def mask_tokens(input_ids, *, mask_token_id, vocab_size, special_token_ids=(), mlm_probability=0.15, "
             "generator=None):\n"
             "    noise = torch.randint(5, vocab_size, input_ids.shape, generator=generator)\n"
             "    return noise, torch.full_like(input_ids, -100)\n")
    write("noise_mask", _set(sol, "mask_tokens", noise), "mask_tokens returns noise, every label ignored")
    # 4: magics in answer cells (honest); a library implementation reached through getattr with built strings
    magics = _set(sol, "mask_tokens", "%matplotlib inline\n" + mask_src)
    magics = _set(magics, "mlm_loss", "%%time\n" + mlm_src)
    write("magics", magics, "%matplotlib inline and %%time in answer cells")
    dyn = _set(sol, "mlm_loss", "import sys\n_lib = getattr(sys, 'mod' + 'ules')['pretrain' + '_lib.objec' + 'tives']\n"
                                "def mlm_loss(logits, labels):\n    return getattr(_lib, 'mlm' + '_loss')(logits, labels)\n")
    write("dynamic_library", dyn, "the library's mlm_loss through getattr(sys, 'mod' + 'ules')")
    # 8: a helper in a new untagged cell of its own, after the answer that uses it; debug prints left in mlm_loss
    helper_nb = _set(sol, "mask_tokens", "def mask_tokens(input_ids, *, mask_token_id, vocab_size, special_token_ids=(), "
                                         "mlm_probability=0.15, generator=None):\n"
                                         "    return _masking(input_ids, mask_token_id, vocab_size, special_token_ids, "
                                         "mlm_probability, generator)\n")
    body = "\n".join(line for line in mask_src.splitlines()[1:] if "SOLUTION" not in line)
    helper_src = ("def _masking(input_ids, mask_token_id, vocab_size, special_token_ids, mlm_probability, generator):\n"
                  + body)
    i = helper_nb.cells.index(_cell_by_defines(helper_nb, "mask_tokens"))
    helper_nb.cells.insert(i + 1, _code(helper_src))
    helper_nb = _set(helper_nb, "mlm_loss", mlm_src.replace("    return ", "    print('debug: logits', tuple(logits.shape))\n"
                                                                        "    return "))
    write("helper_cell", helper_nb, "a helper cell of its own; debug prints in mlm_loss")
    # 9: right on the visible cases, wrong on hidden ones; its exception reveals the seed if the grader lets it
    wrong = ("import sys\n"
             "def mlm_loss(logits, labels):\n"
             "    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)\n"
             "    return loss if logits.size(-1) in (8, 11) else loss * 1.5\n"
             "def clm_loss(logits, input_ids, *, ignore_index=-100):\n"
             "    if tuple(logits.shape) in ((2, 6, 9), (1, 6, 9)):\n"
             "        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1),"
             " ignore_index=ignore_index)\n"
             "    f = sys._getframe(1)\n"
             "    raise ValueError('seed=' + str(f.f_locals.get('seed')) + ' ' + str(int(f.f_locals.get('seed')) % 2**31))\n")
    wrong_nb = _set(sol, "mlm_loss", wrong)
    wrong_nb.cells = [c for c in wrong_nb.cells if "def clm_loss" not in c.source or "loss * 1.5" in c.source]
    wrong_nb.cells += [_code(f"scratch_{i} = {i}") for i in range(300)] + [_code("print('scratch')") for _ in range(300)]
    write("hidden_fail", wrong_nb, "visible pass, hidden fail; 600 scratch cells")
    return students


@pytest.mark.notebook
def test_class_that_fights_the_verdicts(tmp_path):
    subs, out, exercises = tmp_path / "subs", tmp_path / "out", tmp_path / "exercises"
    exercises.mkdir()
    (exercises / OBJECTIVES.name).write_bytes(OBJECTIVES.read_bytes())
    _submissions(subs)
    report = grade_class(subs, out, exercises_dir=exercises, solutions_dir=REPO / "solutions", jobs=2,
                         timeout_s=400, cell_timeout_s=200, seed=SEED)
    with open(out / "gradebook.csv", newline="") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    feedback = {s: (out / "feedback" / s / "01_objectives.md").read_text() for s in rows}
    (tmp_path / "feedback.txt").write_text("\n\n".join(f"==== {s}\n{t}" for s, t in feedback.items()))
    ex = load_exercise(OBJECTIVES)
    total = sum(c.max_points for c in ex.checks)
    pts = {s: float(r["points"]) for s, r in rows.items()}
    col = lambda s, cid: float(rows[s][f"01_objectives: {cid}"])
    assert all(r["status"] == "graded" for r in rows.values()), {s: r["status"] for s, r in rows.items()}
    # honest layouts: full marks, no review flag
    for name in ("honest", "magics", "helper_cell"):
        assert pts[name] == total, (name, feedback[name])
        assert "REVIEW:" not in feedback[name], (name, feedback[name])
    assert "which your answers use: it was run before the answer defining `mask_tokens`" in feedback["helper_cell"]
    # 3: forged verdicts score nothing
    assert pts["stub_forger"] == 0, feedback["stub_forger"]
    assert "REVIEW:" in feedback["stub_forger"]
    assert col("noise_mask", "mask-tokens-proportions") == 0 and col("noise_mask", "mask-tokens-labels-seeded") == 0
    assert pts["noise_mask"] == total - 4, feedback["noise_mask"]
    # 4: the library through built strings is flagged (the score stands: the instructor reads it)
    assert "REVIEW:" in feedback["dynamic_library"] and "computed attribute name" in feedback["dynamic_library"]
    assert ("dynamic_library", "01_objectives") in report.review
    # 9: a visible pass with a hidden fail says why, on which inputs; never the seed; notes stay short
    fb = feedback["hidden_fail"]
    assert col("hidden_fail", "mlm-loss") == 0 and col("hidden_fail", "clm-loss") == 0
    assert "FAIL (not run)" not in fb and "FAIL (wrong on the grader's hidden inputs)" in fb
    assert "### mlm-loss" in fb and "inputs: 3 random (batch, seq, vocab) logits" in fb and "value 0: got" in fb
    assert "### clm-loss" in fb and "ValueError: seed=(secret) (secret)" in fb
    for name, text in feedback.items():
        for n in {SEED, SEED % 2**31, SEED % 10**6}:
            assert str(n) not in text, name
        assert len(text) < 30_000, (name, len(text))
    assert fb.count("not an answer cell") == 1 and "and 590 more" in fb
