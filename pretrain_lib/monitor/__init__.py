"""Monitoring a pretraining run (chapter 6): a callback of the engine's ``train()``.

    from pretrain_lib.monitor import AnomalyRules, Monitor, peak_flops, plot_run
    monitor = Monitor("build/run.jsonl", tensorboard_dir="build/tb",
                      rules=AnomalyRules(spike_k=4.0))   # a tighter spike band than the default 6σ
    train(model, batches, clm_objective, steps=300, callbacks=[monitor])
    plot_run("build/run.jsonl")

Modules: ``core`` (the Monitor and its JSONL / TensorBoard sinks), ``norms`` (per-layer
norms in one fused pass), ``detect`` (the anomaly rules ``AnomalyRules``, the spike detector,
sanity checks), ``peak`` (peak FLOP/s table and the measured probe, MFU), ``plot`` (dashboard
and live view), ``reads`` (counting host reads; the source chapter's per-parameter norm, kept
to measure it).
"""
from .core import Monitor, read_jsonl
from .detect import (AnomalyRules, RollingZScore, check_initial_loss, check_overfits_one_batch,
                     expected_initial_loss, rolling_spikes)
from .norms import LayerIndex, grad_norms, layer_of
from .peak import datasheet_peak, measure_peak_flops, mfu, peak_flops, peak_flops_info
from .plot import LiveDashboard, plot_records, plot_run
from .reads import SourceStyleRecorder, TimedCallback, count_host_reads, source_style_grad_norm

__all__ = ["Monitor", "AnomalyRules", "read_jsonl", "RollingZScore", "rolling_spikes", "expected_initial_loss",
           "check_initial_loss", "check_overfits_one_batch", "LayerIndex", "grad_norms", "layer_of",
           "datasheet_peak", "measure_peak_flops", "mfu", "peak_flops", "peak_flops_info", "LiveDashboard",
           "plot_records", "plot_run", "SourceStyleRecorder", "TimedCallback", "count_host_reads", "source_style_grad_norm"]
