"""Optimisation: the one optimiser builder, LR schedules, global-norm clipping, the LR range test.

``from pretrain_lib.optim import build_optimizer, cosine_lr, ...`` is the public interface;
the modules are ``builder`` (param groups, AdamW, Muon + AdamW), ``schedules`` (Noam,
warmup + cosine, warmup–stable–decay), ``clipping`` and ``range_test``.
"""
from .builder import OPTIMIZERS, MuonWithAdamW, build_optimizer, muon_matrices, param_groups
from .clipping import clip_grad_norm
from .range_test import LRRangeResult, exponential_lr, lr_range_test
from .schedules import WSD_DECAYS, as_lr_lambda, cosine_lr, noam_lr, wsd_lr

__all__ = ["OPTIMIZERS", "MuonWithAdamW", "build_optimizer", "muon_matrices", "param_groups", "clip_grad_norm",
           "LRRangeResult", "exponential_lr", "lr_range_test", "WSD_DECAYS", "as_lr_lambda", "cosine_lr",
           "noam_lr", "wsd_lr"]
