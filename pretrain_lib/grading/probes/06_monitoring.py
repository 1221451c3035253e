# Hidden probes of exercises/06_monitoring.ipynb: the fused gradient norm on fresh gradients (one
# parameter without a gradient), the spike detector on a series drawn from the secret seed, and MFU
# on drawn numbers. Values are compared with the solution's on the same inputs.
FORBIDDEN = {"clip_grad_norm_", "torch.nn.utils.clip_grad_norm_", "global_grad_norm", "grad_norms", "rolling_spikes",
             "RollingZScore", "pretrain_lib.monitor", "monitor.mfu"}


def _grad_norm(ns, seed, ctx):
    import torch
    r = rng(seed, 60)
    g = torch.Generator().manual_seed(int(r.integers(0, 10_000)))
    params = [torch.nn.Parameter(torch.zeros(int(r.integers(1, 50)), int(r.integers(1, 9)))) for _ in range(5)]
    for p in params[:-1]:  # the last parameter has no gradient
        p.grad = torch.randn(p.shape, generator=g) * float(r.uniform(0.01, 10.0))
    value = ns["my_global_grad_norm"](params)
    return [float(value), int(value.dim())]


def _spikes(ns, seed, ctx):
    r = rng(seed, 61)
    series = list(map(float, r.normal(3.0, 0.2, 260)))
    for t in r.choice(range(20, 260), size=4, replace=False):
        series[int(t)] *= float(r.uniform(1.5, 4.0))
    series[int(r.integers(0, 260))] = float("nan")
    k, window = float(r.uniform(2.5, 6.0)), int(r.integers(8, 64))
    return [int(i) for i in ns["my_spike_steps"](series, k=k, window=window, min_history=min(8, window))]


def _mfu(ns, seed, ctx):
    r = rng(seed, 62)
    return [float(ns["my_mfu"](float(r.uniform(1e5, 1e10)), int(r.integers(1, 10**6)), float(r.uniform(0.1, 100)),
                               float(r.uniform(1e9, 1e15)))) for _ in range(5)]


PROBES = {
    "fused-grad-norm": {"answer": "my_global_grad_norm", "run": _grad_norm, "judge": lambda s, r, seed: close(s, r, 1e-5, 1e-9)},
    "rolling-zscore": {"answer": "my_spike_steps", "run": _spikes, "judge": equal},
    "mfu": {"answer": "my_mfu", "run": _mfu, "judge": lambda s, r, seed: close(s, r, 1e-9, 1e-15)},
}

_INPUTS = {
    "fused-grad-norm": "5 random parameters, the last without a gradient",
    "rolling-zscore": "a 260-step loss series with 4 spikes and one NaN, a random k and window",
    "mfu": "5 random (FLOPs per token, tokens, seconds, peak FLOP/s) tuples",
}
for _cid, _text in _INPUTS.items():
    PROBES[_cid]["inputs"] = _text
