"""benchmarks/README.md's tables are generated from the benchmarks' JSON, never typed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("benchmark_tables", REPO / "benchmarks" / "tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)

# What benchmarks/chinchilla_fit.py writes, with round numbers: 10 s against 2 s is 5.0x.
CHINCHILLA = {"points": 240, "starts": 4500, "ours_seconds": 2.0, "baseline_seconds_extrapolated": 10.0,
              "baseline_starts_timed": 225, "speedup": 5.0, "cpu_count": 2}


def test_the_committed_readme_is_what_the_committed_results_give():
    assert tables.main(["--check"]) == 0, "run python benchmarks/tables.py"


def test_a_result_becomes_a_row_and_a_missing_one_says_how_to_measure_it():
    table = tables.render({"chinchilla_fit": CHINCHILLA})
    row = next(line for line in table.splitlines() if line.startswith("| `chinchilla_fit.py`"))
    assert "10.0 s (extrapolated from 225 starts)" in row and "all 4500 starts" in row and "2.0 s" in row
    assert "| 5.0× |" in row and "240 points; 2 CPUs" in row
    missing = next(line for line in table.splitlines() if line.startswith("| `grading.py`"))
    assert "not measured yet: run `python benchmarks/grading.py`" in missing
    assert len(table.splitlines()) == 2 + len(tables.BENCHMARKS)


def test_collect_copies_the_scripts_json_verbatim(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "chinchilla_fit.json").write_text(json.dumps(CHINCHILLA))
    (results / "not_a_benchmark.json").write_text("{}")
    collected = tmp_path / "results.json"
    collected.write_text(json.dumps({"grading": {"kept": True}}))
    assert tables.collect(results, collected) == ["chinchilla_fit"]
    assert json.loads(collected.read_text()) == {"chinchilla_fit": CHINCHILLA, "grading": {"kept": True}}


def test_an_entry_that_lacks_a_figure_is_named():
    broken = dict(CHINCHILLA)
    del broken["speedup"]
    with pytest.raises(ValueError, match="chinchilla_fit entry lacks what its table needs.*speedup"):
        tables.render({"chinchilla_fit": broken})


def test_the_readme_markers_are_required():
    with pytest.raises(ValueError, match="lacks the markers"):
        tables.updated_readme("# Benchmarks\n", {})
    text = f"intro\n{tables.BEGIN}\nold typed table\n{tables.END}\nafter\n"
    updated = tables.updated_readme(text, {})
    assert "old typed table" not in updated and updated.startswith("intro\n") and updated.endswith("after\n")


def test_grading_row_names_each_configuration_and_the_fastest():
    def run(sandbox, jobs, seconds):
        return {"jobs": jobs, "sandbox": sandbox, "students": 4, "seconds": seconds, "seconds_per_submission": seconds / 4}
    runs = [run(False, 1, 40.0), run(False, 2, 24.0), run(True, 1, 44.0), run(True, 2, 20.0)]
    result = {"exercise": "01_objectives", "baseline": dict(runs[0]), "runs": runs, "cpus": 2, "load_average_1min": 1.5}
    row = next(line for line in tables.render({"grading": result}).splitlines() if line.startswith("| `grading.py`"))
    assert "unsandboxed `--jobs 1`: 10.0 s per submission" in row
    assert "unsandboxed `--jobs 2`: 6.0 s; sandboxed `--jobs 1`: 11.0 s; sandboxed `--jobs 2`: 5.0 s" in row
    assert "2.00× (sandboxed `--jobs 2`)" in row and "4 submissions; 2 CPUs, load 1.5" in row


SPEEDRUN = {"date_utc": "2026-12-06T03:00:00Z", "rounds": 3, "load_average_1min": 2.1, "ratio_median": 0.45,
            "ratio_per_round": [0.44, 0.45, 0.47],
            "machine": {"processor": "x86_64", "cpu_count": 2, "threads_per_run": 1},
            "baseline": {"config": "configs/gpt-char-tiny.toml", "command": "python -m pretrain_lib.train --config "
                         "configs/gpt-char-tiny.toml", "wall_seconds_median": 100.0, "wall_seconds_min": 98.0,
                         "wall_seconds_max": 104.0, "val_loss_median": 1.912, "val_loss_max": 1.913,
                         "tokens_seen": 1560000},
            "speedrun": {"config": "configs/gpt-char-speedrun.toml", "command": "python -m pretrain_lib.train "
                         "--config configs/gpt-char-speedrun.toml", "wall_seconds_median": 45.0,
                         "wall_seconds_min": 44.0, "wall_seconds_max": 47.0, "val_loss_median": 1.905,
                         "val_loss_max": 1.91, "tokens_seen": 700000}}


def test_speedrun_records_name_config_loss_time_tokens_machine_command_and_date():
    table = tables.records({"speedrun": SPEEDRUN})
    row = next(line for line in table.splitlines() if "gpt-char-speedrun" in line)
    for text in ("0.45× the baseline's wall time", "1.9050", "45.0 s (44.0–47.0; 3 round(s)", "700,000", "2 CPUs",
                 "`python -m pretrain_lib.train --config configs/gpt-char-speedrun.toml`", "2026-12-06"):
        assert text in row, text
    assert "not measured yet" in tables.records({})
    text = f"{tables.BEGIN}\n{tables.END}\n{tables.RECORDS_BEGIN}\nold\n{tables.RECORDS_END}\n"
    assert "| speedrun: 0.45×" in tables.updated_readme(text, {"speedrun": SPEEDRUN})


def test_shipped_models_row_gives_every_figure_of_the_run():
    run = {"config": "gpt-char-tiny", "steps": 2000, "val_loss": 1.5, "bits_per_byte": 2.25, "mc_accuracy": 0.4,
           "mc_accuracy_ci95": [0.36, 0.44], "mc_chance": 0.25, "mc_unigram_accuracy": 0.26,
           "mc_unigram_accuracy_ci95": [0.22, 0.30], "mc_gain_over_unigram": 0.14, "mc_gain_over_unigram_ci95": [0.1, 0.18],
           "n_items": 600, "lm_eval_acc_bytes": 0.4, "max_logit_difference": 2e-6, "greedy_equal": True}
    result = {"shipped_models": {"runs": [run], "command": "python benchmarks/shipped_models.py", "date": "2026-12-06",
                                 "torch": "2.13.0", "cpu_count": 2, "load_average_1min": 0.5}}
    table = tables.shipped_models(result)
    row = next(line for line in table.splitlines() if line.startswith("| `gpt-char-tiny`"))
    for text in ("| 2,000 |", "| 1.500 |", "| 2.250 |", "40.0% [36.0%, 44.0%]", "| 25% |", "26.0% [22.0%, 30.0%]",
                 "+14.0% [+10.0%, +18.0%]", "| 40.0% |", "2.0e-06", "| yes |"):
        assert text in row, text
    assert "600 items" in table
    assert "not measured yet" in tables.shipped_models({})
    text = f"{tables.BEGIN}\n{tables.END}\n{tables.MODELS_BEGIN}\nold\n{tables.MODELS_END}\n"
    assert "| `gpt-char-tiny` | 2,000 |" in tables.updated_readme(text, result)
