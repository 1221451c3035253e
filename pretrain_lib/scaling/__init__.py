"""Scaling laws: the Chinchilla law and its FLOPs, its fits, and a real IsoFLOP sweep.

Notation of Hoffmann et al. (2022, "Training Compute-Optimal Large Language Models"):
L(N, D) = E + A / N**alpha + B / D**beta, with N the parameters, D the training tokens and
C ≈ 6 N D the training FLOPs. One concern per module:

- :mod:`.law`: the FLOP count (the model's own, ``GPT.flops_per_token``), the law,
  :class:`ChinchillaFit`, the compute-optimal allocation (:func:`compute_optimal`) and the
  cost of missing it (:func:`compute_overhead`, :func:`floor_size_factor`).
- :mod:`.published`: :data:`PAPER_FIT`, :data:`EPOCH_FIT`, :data:`REPLICATION_FIT` and the
  paper's points as extracted by Epoch AI (:func:`load_chinchilla_data`).
- :mod:`.lbfgs`: a vectorised L-BFGS that minimises thousands of small problems at once.
- :mod:`.approach3`: the paper's Approach 3 (:func:`fit_chinchilla`: Huber on log-loss,
  log-sum-exp, L-BFGS from a grid of starts, bootstrap intervals).
- :mod:`.approach2`: IsoFLOP profiles (:func:`fit_isoflop`) and how lopsided one is (:func:`equal_distance_rise`).
- :mod:`.sweep`: an IsoFLOP sweep on the CPU through the Chapter 2 data pipeline and the
  training engine (:func:`prepare_sweep_data`, :func:`run_isoflop_sweep`).
"""
from .approach2 import IsoFlopFit, IsoFlopRun, equal_distance_rise, fit_isoflop
from .approach3 import PAPER_GRID, fit_chinchilla, grid_starts, huber, log_huber_objective
from .law import (PARAM_NAMES, ChinchillaFit, chinchilla_loss, compute_optimal, compute_overhead, floor_size_factor,
                  flops_per_token, scaling_params, training_flops)
from .lbfgs import BatchedLBFGSResult, batched_lbfgs
from .published import DATA_FILE, EPOCH_FIT, PAPER_FIT, REPLICATION_FIT, ChinchillaData, load_chinchilla_data
from .sweep import ModelShape, SweepData, prepare_sweep_data, run_isoflop_sweep, split_texts, sweep_batches

__all__ = [
    "BatchedLBFGSResult", "ChinchillaData", "ChinchillaFit", "DATA_FILE", "EPOCH_FIT", "IsoFlopFit", "IsoFlopRun",
    "ModelShape", "PAPER_FIT", "PAPER_GRID", "PARAM_NAMES", "REPLICATION_FIT", "SweepData", "batched_lbfgs",
    "chinchilla_loss", "compute_optimal", "compute_overhead", "equal_distance_rise", "fit_chinchilla", "fit_isoflop",
    "floor_size_factor", "flops_per_token", "grid_starts", "huber", "load_chinchilla_data", "log_huber_objective",
    "prepare_sweep_data", "run_isoflop_sweep", "scaling_params", "split_texts", "sweep_batches", "training_flops",
]
