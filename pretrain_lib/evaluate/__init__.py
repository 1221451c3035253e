"""Evaluate a trained run: validation loss, bits per byte, and the multiple-choice benchmark.

``evaluate.metrics`` holds the tokenizer-free measures (no capstone import: the trainer may use
them); ``evaluate.run`` loads a run and writes the JSON.

    python -m pretrain_lib.evaluate --checkpoint build/runs/gpt-char-tiny --json build/eval/gpt-char-tiny.json

Bits per byte. A loss in nats per token depends on the tokenizer: a BPE token carries about
three characters, a character token one, so a char model's 1.5 nats and a BPE model's 4 nats
say nothing about which model is better. Dividing the total by the text's size instead of the
token count removes the tokenizer::

    bits_per_byte = (sum of the nats of every predicted token) / (ln 2 * UTF-8 bytes those tokens decode to)

Both models are then measured on one axis: bits needed per byte of the same held-out text.
The validation split is read whole (every ``seq_len + 1`` window, consecutive windows sharing one
token, so each token after the first is predicted exactly once) unless ``--max-windows`` cuts it.
An end-of-text token between documents decodes to no bytes; its nats still count. The trainer logs
the same measure as ``val_bits_per_byte`` at each evaluation (on its ``eval_batches`` fixed
windows: ``evaluate_run(..., max_windows=eval_batches * batch_size)`` gives the same figure for the
last checkpoint), so the learning curves of a char run and a BPE run share one axis.

The benchmark (:mod:`pretrain_lib.benchmark`) reports ``mc_accuracy`` with its 95 % bootstrap
interval over items, ``mc_chance`` (0.25), the same rule applied to a unigram model of the
run's training split, and the model's gain over it with a paired bootstrap interval
(``mc_gain_over_unigram``: a gain is real when it exceeds twice its half-width). It needs a causal
model: for a BERT run only the validation (MLM) loss is reported and the other fields are null.
"""
from .metrics import bits_per_byte, token_byte_lengths, window_nats

__all__ = ["bits_per_byte", "token_byte_lengths", "window_nats"]
