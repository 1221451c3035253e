"""Optimisation: the one optimiser builder, LR schedules, global-norm clipping.

``from pretrain_lib.optim import build_optimizer, cosine_lr, ...`` is the public interface;
the modules are ``builder`` (param groups, AdamW, Muon + AdamW), ``schedules`` (Noam,
warmup + cosine, warmup–stable–decay) and ``clipping``. Experiments that train a model sit above
the engine (``pretrain_lib.train``), which uses this package, so they are imported by their own
module path and not from here: ``range_test`` (the LR range test) and ``experiments``.
"""
from .builder import OPTIMIZERS, MuonWithAdamW, build_optimizer, muon_matrices, param_groups
from .clipping import clip_grad_norm
from .schedules import WSD_DECAYS, as_lr_lambda, cosine_lr, noam_lr, wsd_lr

__all__ = ["OPTIMIZERS", "MuonWithAdamW", "build_optimizer", "muon_matrices", "param_groups", "clip_grad_norm",
           "WSD_DECAYS", "as_lr_lambda", "cosine_lr", "noam_lr", "wsd_lr"]
