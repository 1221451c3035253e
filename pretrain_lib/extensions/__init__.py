"""Setup for chapter 8 (extensions): the experiments of 8.1 (continual pretraining), 8.2
(efficient-pretraining ingredients) and 8.3 (bias in data and model), kept out of the notebooks
so that their cells show the lesson, not the plumbing.

- ``common``: fixed validation windows, per-window losses (for a bootstrap over windows) and the
  unigram reference loss.
- ``continual``: the two domains of 8.1 and mixed (replay) batches.
- ``speedrun``: the variants of 8.2, their data layouts, FLOP counts and an alternating timer.
- ``bias``: pronoun shares, counterfactual swapping and PII redaction for 8.3.
"""
from .common import fixed_windows, unigram_window_losses, window_losses

__all__ = ["fixed_windows", "unigram_window_losses", "window_losses"]
