"""The trainer's command line: ``python -m pretrain_lib.train --config configs/NAME.toml [...]``.

(``python -m pretrain_lib.capstone.cli`` is the same command.) Exit codes, also in ``--help``:
0 done, 2 bad input (nothing trained), 75 preempted by SIGTERM/SIGUSR1 after writing a
checkpoint (run again with ``--resume``), 130 stopped by Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch.distributed as dist

from . import checkpoint as ckpt
from .preemption import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, RunInterrupted
from .trainer import RunResult, run

EPILOG = f"""\
paths: one rule for every path, as in any command-line tool: a relative path is relative to
the working directory (the folder you run the command from), whether it is --config, --out,
or out_dir, data.folder or data.cache_dir in the config file or in --set; ~ and absolute paths
are used as given. data.cache_dir left empty (the default) is the course's build/data.
From the course folder, configs/gpt-char-tiny.toml writes to build/runs/gpt-char-tiny.

exit codes: {EXIT_OK} done; {EXIT_BAD_INPUT} bad input (a config, a path or a checkpoint refused; nothing trained);
{EXIT_PREEMPTED} preempted: SIGTERM or SIGUSR1 arrived, a checkpoint was written at the next logged step,
continue with --resume; {EXIT_INTERRUPTED} stopped by Ctrl-C (the message names the last checkpoint).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain_lib.train", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Pretrain a GPT or BERT from a TOML config (configs/*.toml).")
    parser.add_argument("--config", required=True,
                        help="path of the TOML config, e.g. configs/gpt-char-tiny.toml (relative: to the working directory)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, choices=[True, "auto"],
                        type=lambda v: "auto" if v == "auto" else v, metavar="auto",
                        help="continue from the newest good checkpoint in out_dir (an error when there is none); "
                             "--resume=auto starts afresh when there is none (for a requeued batch job)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run already in out_dir (checkpoints, metrics) and start afresh")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set train.steps=300 (repeatable)")
    parser.add_argument("--out", default=None, help="same as --set out_dir=DIR (the torchrun launcher passes it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = args.overrides + ([f"out_dir={json.dumps(args.out)}"] if args.out else [])
    try:
        result = run(args.config, resume=args.resume, overwrite=args.overwrite, overrides=overrides)
    except (ValueError, ckpt.CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunInterrupted as exc:
        print(exc, file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:   # before the first step: preparing data, building the model
        print("stopped before training began; nothing to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    _finish(result)
    return EXIT_PREEMPTED if result.preempted else EXIT_OK


def _finish(result: RunResult) -> None:
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main:
        # the summary the torchrun launcher (pretrain_lib.distributed.launch) returns to a notebook
        summary = {"start_step": result.start_step, "steps": result.steps, "losses": result.losses,
                   "eval_steps": result.eval_steps, "val_losses": result.val_losses, "seconds": result.seconds,
                   "tokens_per_second": result.tokens_per_second, "preempted": result.preempted}
        ckpt.atomic_write_bytes(result.out_dir / "metrics.json", json.dumps(summary).encode())
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if result.val_losses and is_main and not result.preempted:
        print(f"done: step {result.steps}, val loss {result.val_losses[-1]:.4f}, "
              f"{result.tokens_per_second:,.0f} tokens/s, {result.seconds:.1f} s; output in {result.out_dir}")


if __name__ == "__main__":
    raise SystemExit(main())
