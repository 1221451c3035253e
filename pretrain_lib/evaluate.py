"""Evaluate a trained run: validation loss, bits per byte, and the multiple-choice benchmark.

    python -m pretrain_lib.evaluate --checkpoint build/runs/gpt-char-tiny --json build/eval/gpt-char-tiny.json

Bits per byte. A loss in nats per token depends on the tokenizer: a BPE token carries about
three characters, a character token one, so a char model's 1.5 nats and a BPE model's 4 nats
say nothing about which model is better. Dividing the total by the text's size instead of the
token count removes the tokenizer::

    bits_per_byte = (sum of the nats of every predicted token) / (ln 2 * UTF-8 bytes those tokens decode to)

Both models are then measured on one axis: bits needed per byte of the same held-out text.
The validation split is read whole (every ``seq_len + 1`` window, consecutive windows sharing one
token, so each token after the first is predicted exactly once) unless ``--max-windows`` cuts it.
An end-of-text token between documents decodes to no bytes; its nats still count.

The benchmark (:mod:`pretrain_lib.benchmark`) reports ``mc_accuracy`` with its 95 % bootstrap
interval over items, ``mc_chance`` (0.25) and the same rule applied to a unigram model of the
run's training split. It needs a causal model: for a BERT run only the validation (MLM) loss is
reported and the other fields are null.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .benchmark import scoring
from .benchmark.items import ITEM_FILE, held_out_report, read_items
from .data.loader import ShardedTokenDataset
from .data.shards import read_all_tokens
from .data.tokenizer import SPECIAL_TOKENS, UNK
from .generate import LoadedRun, RunLoadError, load_run


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Nats summed over tokens → bits per byte of the text they decode to."""
    if total_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count, got {total_bytes}")
    return total_nats / (math.log(2) * total_bytes)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for in decoded text (0 for the special tokens).

    A byte-level BPE token's string spells one byte per character (GPT-2's byte-to-unicode map),
    so its length is its byte count even when it holds half of a multi-byte character; any other
    token's string is its text."""
    byte_level = json.loads(tokenizer.to_str()).get("decoder", {}) or {}
    byte_level = byte_level.get("type") == "ByteLevel"
    specials = {tokenizer.token_to_id(t) for t in (*SPECIAL_TOKENS, UNK)} - {None}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, i in tokenizer.get_vocab().items():
        if i not in specials:
            lengths[i] = len(token) if byte_level else len(token.encode("utf-8"))
    return lengths


@torch.no_grad()
def window_nats(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """``(n_windows, seq_len)`` nats of each predicted token of each window ``(n_windows, seq_len + 1)``."""
    was_training = model.training
    model.eval()
    out = []
    for chunk in windows.split(batch_size):
        logits = model(chunk[:, :-1]).double()
        out.append(F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none"))
    model.train(was_training)
    return torch.cat(out)


def validation_windows(run: LoadedRun, max_windows: int | None = None) -> torch.Tensor:
    """The validation split as consecutive ``seq_len + 1`` windows, in order (the first ``max_windows``)."""
    dataset = ShardedTokenDataset(run.data.val_index, seq_len=run.config.model.seq_len, shuffle=False,
                                  expected_fingerprint=run.data.meta["tokenizer_fingerprint"])
    n = len(dataset) if not max_windows else min(max_windows, len(dataset))
    return torch.stack([torch.as_tensor(np.asarray(dataset.window(i), dtype=np.int64)) for i in range(n)])


def evaluate_run(run: LoadedRun | str | Path, *, max_windows: int | None = None, items_path: str | Path = ITEM_FILE,
                 seed: int = 0, log=None) -> dict:
    """Every figure of the module docstring for one run, as a JSON-ready dict."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    run = run if isinstance(run, LoadedRun) else load_run(run, log=log)
    windows = validation_windows(run, max_windows)
    result = {"checkpoint": str(run.checkpoint), "step": run.step, "kind": run.config.model.kind,
              "tokenizer": run.config.data.tokenizer, "val_windows": int(windows.size(0)),
              "val_tokens": int(windows.size(0) * (windows.size(1) - 1))}
    if not run.is_gpt:
        from .capstone.evaluate import mlm_eval_objective, validation_loss
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
    if held_out["in_training"] or held_out["in_validation"] < len(items):
        log(f"warning: of {len(items)} benchmark items, {held_out['in_training']} occur in this run's training text "
            f"and {len(items) - held_out['in_validation']} are not in its validation text; the items come from the "
            "last Shakespeare plays, so the accuracy is not a held-out score for this corpus or split")
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
    result.update(mc_accuracy=model_acc.mean, mc_accuracy_ci95=[model_acc.mean - model_acc.spread,
                                                                model_acc.mean + model_acc.spread],
                  mc_chance=scoring.CHANCE, mc_unigram_accuracy=unigram_acc.mean,
                  mc_unigram_accuracy_ci95=[unigram_acc.mean - unigram_acc.spread,
                                            unigram_acc.mean + unigram_acc.spread],
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
        lo, hi = result["mc_accuracy_ci95"]
        summary += (f", {result['bits_per_byte']:.4f} bits/byte; benchmark {result['mc_accuracy']:.3f} "
                    f"[{lo:.3f}, {hi:.3f}] vs chance {result['mc_chance']:.2f} and unigram "
                    f"{result['mc_unigram_accuracy']:.3f} ({result['n_items']} items)")
    print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
