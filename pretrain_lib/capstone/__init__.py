"""Chapter 7's trainer: ``python -m pretrain_lib.train --config configs/NAME.toml`` and ``pretrain_lib.train.run``.

Modules: ``config`` (TOML → validated dataclasses, ``--set`` overrides, exactness keys), ``data``
(the chapter-2 pipeline run once, cached by fingerprint; loaders), ``checkpoint`` (atomic,
checksummed, keep-K, fallback past a corrupt file, output-folder checks), ``evaluate`` (validation
loss, perplexity, samples, fill-mask), ``parallel`` (torchrun: DDP / FSDP through the distributed
package), ``trainer`` (callbacks and ``run``/``main``; trains through the engine's ``train()``).
"""
