"""Chapter 7's trainer: ``python -m pretrain_lib.train --config configs/NAME.toml`` and ``pretrain_lib.capstone.run``.

Modules: ``config`` (TOML → validated dataclasses, ``--set`` overrides, exactness keys), ``data``
(the chapter-2 pipeline run once, cached by fingerprint; loaders), ``checkpoint`` (atomic,
checksummed, keep-K, fallback past a corrupt file, output-folder checks), ``evaluate`` (validation
loss, perplexity, samples, fill-mask), ``parallel`` (torchrun: DDP / FSDP through the distributed
package), ``resume`` (fresh start or resume: what a checkpoint restores and what it refuses),
``callbacks`` (evaluation and checkpoints as engine hooks), ``preemption`` (signals, Ctrl-C, exit
codes), ``threads`` (CPU threads that do not oversubscribe the cores), ``trainer`` (``run``, step by
step, through the engine's ``train()``) and ``cli`` (the command line).
"""
from .trainer import RunResult, run

__all__ = ["RunResult", "run"]
