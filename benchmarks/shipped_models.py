"""The shipped GPT configs taken all the way out of the course, through the public commands only.

For each config: train it at its defaults (``python -m pretrain_lib.train``), evaluate it
(``python -m pretrain_lib.evaluate``: validation loss, bits per byte, the benchmark against chance
and a unigram model with bootstrap intervals), export it (``python -m pretrain_lib.export``), load
the export in ``transformers`` (largest logit difference on random ids), run EleutherAI's
``lm-eval`` on the local benchmark task over the export, and compare greedy continuations from
``python -m pretrain_lib.generate`` in a fresh process with ``transformers``' ``generate``.

    python benchmarks/shipped_models.py                       # both configs at their defaults
    python benchmarks/shipped_models.py --configs gpt-char-tiny --steps 50   # a quick wiring check

Writes ``benchmarks/results/shipped_models.json`` (``tables.py`` turns it into the README's table).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "ROMEO:\nWhat"
NEW_TOKENS = 40     # prompt + continuation inside GPT-2's n_positions (65 for gpt-char-tiny)


def command(*args: str) -> subprocess.CompletedProcess:
    """Run one course command in a fresh process from the repository root; stop on failure."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"`python -m {' '.join(args)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc


def transformers_checks(export_dir: Path, run_dir: Path) -> dict:
    """Logits of the export against the course model on random ids, and transformers' greedy text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain_lib.generate import load_run

    run = load_run(run_dir, log=lambda _: None)
    hf = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    tok = AutoTokenizer.from_pretrained(export_dir)
    ids = torch.randint(0, run.model.config.vocab_size, (4, run.model.config.max_seq_len),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = run.model(ids), hf(ids).logits
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return {"max_logit_difference": float((ours - theirs).abs().max()),
            "hf_greedy": PROMPT + tok.decode(out[0, enc.input_ids.size(1):])}


def lm_eval_accuracy(export_dir: Path) -> float:
    """``acc_bytes`` of lm-eval's own harness on the course's local task over the exported folder."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pretrain_lib.benchmark import items
    task_dir = Path(items.__file__).parent / "lm_eval_task"
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export_dir},dtype=float32",
                                      tasks=["shakespeare_mc"], device="cpu", batch_size=16,
                                      task_manager=TaskManager(include_path=str(task_dir)))
    return float(results["results"]["shakespeare_mc"]["acc_bytes,none"])


def one_config(name: str, steps: int | None, work: Path) -> dict:
    run_dir, export_dir, report = work / name, work / f"{name}-hf", work / f"{name}.json"
    extra = ["--set", f"train.steps={steps}", "--set", f"train.warmup_steps={max(1, steps // 10)}"] if steps else []
    start = time.perf_counter()
    command("pretrain_lib.train", "--config", f"configs/{name}.toml", "--out", str(run_dir), *extra)
    train_s = time.perf_counter() - start
    command("pretrain_lib.evaluate", "--checkpoint", str(run_dir), "--json", str(report))
    evaluation = json.loads(report.read_text())
    command("pretrain_lib.export", "--checkpoint", str(run_dir), "--format", "hf", "--out", str(export_dir))
    course_greedy = command("pretrain_lib.generate", "--checkpoint", str(run_dir), "--prompt", PROMPT,
                            "--max-new-tokens", str(NEW_TOKENS), "--seed", "0", "--temperature", "0").stdout
    hf = transformers_checks(export_dir, run_dir)
    keep = ("step", "val_loss", "bits_per_byte", "mc_accuracy", "mc_accuracy_ci95", "mc_chance",
            "mc_unigram_accuracy", "mc_unigram_accuracy_ci95", "mc_gain_over_unigram",
            "mc_gain_over_unigram_ci95", "n_items", "mc_held_out")
    return {"config": name, "steps": evaluation["step"], "train_s": round(train_s, 1),
            **{k: evaluation[k] for k in keep if k in evaluation},
            "lm_eval_acc_bytes": lm_eval_accuracy(export_dir),
            "max_logit_difference": hf["max_logit_difference"],
            "greedy_equal": course_greedy == hf["hf_greedy"], "greedy_text": course_greedy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["gpt-char-tiny", "gpt-bpe-small"])
    parser.add_argument("--steps", type=int, default=0, help="override train.steps (0: the config's own)")
    parser.add_argument("--out", default=str(HERE / "results" / "shipped_models.json"))
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    sys.path.insert(0, str(ROOT))
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one_config(name, args.steps or None, Path(tmp)) for name in args.configs]
    result = {"benchmark": "shipped_models", "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
              "machine": platform.machine(), "command": "python benchmarks/shipped_models.py " + " ".join(argv or sys.argv[1:]),
              "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(f"{r['config']}: step {r['steps']}, val loss {r['val_loss']:.3f}, {r['bits_per_byte']:.3f} bits/byte, "
              f"benchmark {r['mc_accuracy']:.3f} (chance {r['mc_chance']:.2f}, unigram {r['mc_unigram_accuracy']:.3f}), "
              f"lm-eval {r['lm_eval_acc_bytes']:.3f}, max logit diff {r['max_logit_difference']:.1e}, "
              f"greedy equal {r['greedy_equal']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
