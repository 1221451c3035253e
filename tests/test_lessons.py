"""The lesson method's helpers (pretrain_lib.lesson) and the rules every notebook follows:
claims are skipped at test sizes only by name, never switched off or loosened."""
from __future__ import annotations

import ast
import json
import re
import statistics

import pytest

from conftest import REPO
from pretrain_lib.lesson import (ClaimFailed, Claims, bootstrap_mean, clearly_exceeds, over_seeds,
                                 paired_difference)
from pretrain_lib.notebooks import chapter_notebooks

NOTEBOOKS = chapter_notebooks(REPO / "chapters")


def test_over_seeds_is_the_sample_mean_and_standard_deviation():
    est = over_seeds([4.10, 4.20, 4.30])
    assert est.mean == pytest.approx(4.2)
    assert est.spread == pytest.approx(statistics.stdev([4.10, 4.20, 4.30]))  # 0.1, by hand
    assert est.spread == pytest.approx(0.1)
    assert f"{est:.2f}" == "4.20 ± 0.10 (3 seeds)"
    assert f"{over_seeds([-0.2, -0.1, 0.0]):+.2f}" == "-0.10 ± 0.10 (3 seeds)"


def test_paired_difference_removes_what_the_pairs_share():
    # each seed shifts both runs alike; the difference is 0.5 every time, so its spread is 0
    a, b = [3.0, 4.0, 5.0], [2.5, 3.5, 4.5]
    est = paired_difference(a, b)
    assert est.mean == pytest.approx(0.5) and est.spread == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_bootstrap_interval_of_a_constant_is_zero_and_of_a_spread_sample_matches_the_normal_rule():
    assert bootstrap_mean([2.0] * 10).spread == 0.0
    values = [float(x) for x in range(100)]  # sd 29.0; 95 % half-width of the mean ≈ 1.96 * 29.0 / 10 = 5.7
    est = bootstrap_mean(values, n_resamples=4000)
    assert est.mean == pytest.approx(49.5)
    assert 4.8 < est.spread < 6.6
    with pytest.raises(ValueError):
        bootstrap_mean([1.0])


def test_cluster_bootstrap_resamples_whole_groups():
    # two groups whose values are constant inside: the only noise is which group is drawn, so the
    # interval is that of a mean of 2 draws from {0, 10}, weighted by group size
    values, groups = [0.0] * 3 + [10.0] * 3, [7, 7, 7, 9, 9, 9]
    est = bootstrap_mean(values, groups=groups, n_resamples=4000)
    assert est.mean == pytest.approx(5.0) and est.n == 2
    assert est.spread == pytest.approx(5.0)         # resampled means are 0, 5 or 10: the 95 % interval is [0, 10]
    assert bootstrap_mean(values, n_resamples=4000).spread < 5.0   # per value, the same data look 6 times surer
    # groups of one value each are the ordinary bootstrap
    x = [float(i) for i in range(50)]
    assert bootstrap_mean(x, groups=range(50)).spread == pytest.approx(bootstrap_mean(x).spread, rel=0.1)
    with pytest.raises(ValueError):
        bootstrap_mean(values, groups=[1, 2])
    with pytest.raises(ValueError):
        bootstrap_mean(values, groups=[1] * 6)


def test_clearly_exceeds_needs_twice_a_measured_noise():
    assert clearly_exceeds(0.3, 0.1) and not clearly_exceeds(0.15, 0.1) and clearly_exceeds(-0.3, 0.1)
    with pytest.raises(ValueError):
        clearly_exceeds(0.3, float("nan"))


def test_claims_pass_fail_and_skip_by_name(capsys):
    claims = Claims(skip=["needs_budget"])
    claims.check("holds", True, "never shown")
    claims.check("needs_budget", False, "skipped, so never evaluated as a failure")
    with pytest.raises(ClaimFailed, match="broken"):
        claims.check("broken", False, "the loss should fall")
    with pytest.raises(ValueError, match="twice"):
        claims.check("holds", True, "")
    claims.finish()
    out = capsys.readouterr().out
    assert "skipped at these test sizes" in out and "needs_budget" in out
    assert "all checks passed (1 named claim)" in out


def test_a_skip_that_names_no_claim_is_an_error():
    claims = Claims(skip=["renamed_claim"])
    with pytest.raises(ValueError, match="renamed_claim"):
        claims.finish()


def _parameters_cell(notebook) -> dict[str, object]:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"])
            names = {}
            for node in ast.parse(src).body:
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            names[target.id] = node.value
            return names
    return {}


# a parameter with one of these names would be a threshold or a switch that turns a claim off
THRESHOLD_NAME = re.compile(r"margin|tolerance|threshold|speedup|_claims$|_control$|^check_|^assert")


@pytest.mark.parametrize("params_file", sorted((REPO / "tests" / "notebook_params").glob("*.json")),
                         ids=lambda p: p.stem)
def test_test_sizes_shrink_runs_and_skip_claims_by_name_only(params_file):
    chapter = REPO / "chapters" / params_file.stem
    overrides = json.loads(params_file.read_text())
    for stem, params in overrides.items():
        notebook = chapter / f"{stem}.ipynb"
        assert notebook.is_file(), f"{params_file.name} names {stem}, which is not a notebook of {chapter.name}"
        declared = _parameters_cell(notebook)
        for name, value in params.items():
            assert name in declared, f"{stem}: {name} is not in the notebook's parameters cell"
            if name == "skip_claims":
                assert isinstance(value, list) and all(isinstance(v, str) for v in value)
                continue
            assert not THRESHOLD_NAME.search(name), (
                f"{stem}: test sizes may not override {name!r}: a claim is skipped by name in skip_claims, "
                "never loosened or switched off")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_notebook_checks_its_claims_and_closes_with_the_verdict(notebook):
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    declared = _parameters_cell(notebook)
    assert "skip_claims" in declared, "the parameters cell declares skip_claims = [] (test sizes name claims there)"
    for name in declared:
        assert not THRESHOLD_NAME.search(name) or name == "skip_claims", (
            f"{name} looks like a threshold or a claim switch: thresholds live in the notebook's code, not in "
            "its parameters")
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert any("claims.finish()" in src for src in code[-2:]), "the closing cells call claims.finish()"


def test_a_saved_figure_displays_its_file_name_not_the_machine_folders(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pretrain_lib.utils import save_figure
    monkeypatch.setenv("COURSE_FIGURE_DIR", str(tmp_path))
    fig, _ = plt.subplots()
    path = save_figure(fig, "loss_curve")
    plt.close(fig)
    assert repr(path) == "<figure loss_curve.png>" and str(tmp_path) not in repr(path)
    assert path == tmp_path / "loss_curve.png" and path.stat().st_size > 0
