"""``python -m pretrain_lib.evaluate``: one run's validation loss, bits per byte and benchmark score."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..benchmark import scoring
from ..benchmark.items import ITEM_FILE, held_out_report, read_items
from ..data.loader import ShardedTokenDataset
from ..data.shards import read_all_tokens
from ..generate import LoadedRun, RunLoadError, load_run
from .metrics import bits_per_byte, token_byte_lengths, window_nats


def validation_windows(run: LoadedRun, max_windows: int | None = None) -> torch.Tensor:
    """The validation split as consecutive ``seq_len + 1`` windows, in order (the first ``max_windows``)."""
    dataset = ShardedTokenDataset(run.data.val_index, seq_len=run.config.model.seq_len, shuffle=False,
                                  expected_fingerprint=run.data.meta["tokenizer_fingerprint"])
    n = len(dataset) if not max_windows else min(max_windows, len(dataset))
    return torch.stack([torch.as_tensor(np.asarray(dataset.window(i), dtype=np.int64)) for i in range(n)])


def evaluate_run(run: LoadedRun | str | Path, *, max_windows: int | None = None, items_path: str | Path = ITEM_FILE,
                 seed: int = 0, log=None) -> dict:
    """Every figure that :mod:`pretrain_lib.evaluate` describes, for one run, as a JSON-ready dict."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    run = run if isinstance(run, LoadedRun) else load_run(run, log=log)
    windows = validation_windows(run, max_windows)
    result = {"checkpoint": str(run.checkpoint), "step": run.step, "kind": run.config.model.kind,
              "tokenizer": run.config.data.tokenizer, "val_windows": int(windows.size(0)),
              "val_tokens": int(windows.size(0) * (windows.size(1) - 1))}
    if not run.is_gpt:
        from ..capstone.evaluate import mlm_eval_objective, validation_loss
        objective = mlm_eval_objective(run.tokenizer, mlm_probability=run.config.data.mlm_probability,
                                       seed=run.config.seed)
        batches = [{"input_ids": chunk} for chunk in windows.split(32)]
        result.update(val_loss=validation_loss(run.model, batches, objective), bits_per_byte=None, mc_accuracy=None,
                      mc_chance=None, note="a masked LM: the validation loss is over masked positions; bits per byte "
                                           "and the left-to-right benchmark need a causal model")
        return result
    nats = window_nats(run.model, windows)
    n_bytes = int(token_byte_lengths(run.tokenizer)[windows[:, 1:].numpy()].sum())
    total = float(nats.sum())
    result.update(val_loss=total / nats.numel(), val_bytes=n_bytes, bits_per_byte=bits_per_byte(total, n_bytes))

    items = read_items(items_path)
    train_ids = read_all_tokens(run.data.train_index)
    held_out = held_out_report(items, run.tokenizer, train_ids, read_all_tokens(run.data.val_index))
    if held_out["in_training"]:
        log(f"warning: {held_out['in_training']} of {len(items)} benchmark items occur in this run's training text, "
            "so the accuracy is not a held-out score for this run")
    elif held_out["in_validation"] < len(items):
        log(f"note: none of the {len(items)} benchmark items occurs in this run's training text, so the score is held "
            f"out; {len(items) - held_out['in_validation']} are not in its validation text either (the items are "
            "Shakespeare's last plays, which may differ in kind from this run's corpus)")
    try:
        lls = scoring.choice_loglikelihoods(run.model, run.tokenizer, items, window=run.model.config.max_seq_len)
    except scoring.WindowTooShort as exc:
        log(f"warning: benchmark skipped: {exc}")
        result.update(mc_accuracy=None, mc_chance=scoring.CHANCE, n_items=len(items), mc_note=str(exc))
        return result
    model_acc = scoring.accuracy(lls, items, seed=seed)
    unigram = scoring.unigram_loglikelihoods(scoring.unigram_log_probs(train_ids, run.data.vocab_size),
                                             run.tokenizer, items)
    unigram_acc = scoring.accuracy(unigram, items, seed=seed)
    gain = scoring.accuracy_gain(lls, unigram, items, seed=seed)
    result.update(mc_accuracy=model_acc.mean, mc_accuracy_ci95=[model_acc.mean - model_acc.spread,
                                                                model_acc.mean + model_acc.spread],
                  mc_chance=scoring.CHANCE, mc_unigram_accuracy=unigram_acc.mean,
                  mc_unigram_accuracy_ci95=[unigram_acc.mean - unigram_acc.spread,
                                            unigram_acc.mean + unigram_acc.spread],
                  mc_gain_over_unigram=gain.mean, mc_gain_over_unigram_ci95=[gain.mean - gain.spread,
                                                                             gain.mean + gain.spread],
                  n_items=len(items), mc_items_file=Path(items_path).name, mc_held_out=held_out,
                  mc_normalisation="log-likelihood per UTF-8 byte of the ending (lm-eval's acc_bytes)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain_lib.evaluate",
                                     description="Validation loss, bits per byte and the multiple-choice benchmark "
                                                 "of a trained run.")
    parser.add_argument("--checkpoint", required=True, metavar="OUT_DIR", help="a run's out_dir")
    parser.add_argument("--json", required=True, metavar="PATH", help="where to write the results")
    parser.add_argument("--max-windows", type=int, default=0, help="validation windows read (0: the whole split)")
    parser.add_argument("--items", default=str(ITEM_FILE), help="the benchmark's JSONL item file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap over items")
    args = parser.parse_args(argv)
    try:
        result = evaluate_run(args.checkpoint, max_windows=args.max_windows or None, items_path=args.items,
                              seed=args.seed)
    except (RunLoadError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    summary = f"val loss {result['val_loss']:.4f} nats/token"
    if result["bits_per_byte"] is not None:
        summary += f", {result['bits_per_byte']:.4f} bits/byte"
    if result.get("mc_accuracy") is not None:
        (lo, hi), (g_lo, g_hi) = result["mc_accuracy_ci95"], result["mc_gain_over_unigram_ci95"]
        summary += (f"; benchmark {result['mc_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] vs chance {result['mc_chance']:.2f} "
                    f"and unigram {result['mc_unigram_accuracy']:.3f} (gain {result['mc_gain_over_unigram']:+.3f} "
                    f"[{g_lo:+.3f}, {g_hi:+.3f}], paired; {result['n_items']} items)")
    print(summary, file=sys.stderr)
    return 0

