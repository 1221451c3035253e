"""The Chinchilla law, the FLOPs it is written in, and the compute-optimal allocation.

Notation of Hoffmann et al. (2022, "Training Compute-Optimal Large Language Models"):

    L(N, D) = E + A / N**alpha + B / D**beta,     C ≈ 6 N D

with N the parameters, D the training tokens and C the training FLOPs. Minimising L under
the constraint gives N_opt ∝ C^(beta/(alpha+beta)) and D_opt ∝ C^(alpha/(alpha+beta)): those
two *allocation exponents* are :attr:`ChinchillaFit.exponent_n_opt` and
:attr:`ChinchillaFit.exponent_d_opt` (not to be confused with a = log A and b = log B, the
coordinates the Approach-3 fit works in).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..model import GPT, ModelConfig

# --------------------------------------------------------------------------------- FLOPs


def _meta_gpt(config: ModelConfig | GPT) -> GPT:
    """A GPT with the given config whose weights live on the ``meta`` device: no memory, no
    initialisation cost, but ``matmul_params`` and ``flops_per_token`` work."""
    if isinstance(config, GPT):
        return config
    if not isinstance(config, ModelConfig):
        raise TypeError(f"expected a ModelConfig or a GPT, got {type(config).__name__}")
    with torch.device("meta"):
        return GPT(config)


def flops_per_token(config: ModelConfig | GPT, seq_len: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token of the course GPT: 6 N plus attention.

    The model's own count, :meth:`pretrain_lib.model.GPT.flops_per_token` (the one the
    monitoring chapter's MFU uses), so the course has one formula. ``seq_len`` defaults to
    ``config.max_seq_len``.
    """
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len <= 0):
        raise ValueError(f"seq_len must be a positive integer or None, got {seq_len!r}")
    return _meta_gpt(config).flops_per_token(seq_len)


def training_flops(config: ModelConfig | GPT, tokens: float, seq_len: int | None = None) -> float:
    """FLOPs to train on ``tokens`` tokens: ``flops_per_token(config, seq_len) * tokens``."""
    if not tokens > 0:
        raise ValueError(f"tokens must be positive, got {tokens!r}")
    return flops_per_token(config, seq_len) * float(tokens)


def scaling_params(config: ModelConfig | GPT) -> int:
    """The N of C ≈ 6 N D for the course GPT (:meth:`pretrain_lib.model.GPT.matmul_params`):
    every weight that takes part in a matrix multiply, the tied output projection included,
    position embeddings not (as Kaplan et al. and Hoffmann et al. count FLOPs)."""
    return _meta_gpt(config).matmul_params()


# --------------------------------------------------------------------------------- the law


def chinchilla_loss(N, D, E: float, A: float, B: float, alpha: float, beta: float):
    """L(N, D) = E + A / N**alpha + B / D**beta (NumPy broadcasting over N and D)."""
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    if np.any(N <= 0) or np.any(D <= 0):
        raise ValueError("N (parameters) and D (tokens) must be positive")
    return E + A / N**alpha + B / D**beta


PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


@dataclass
class ChinchillaFit:
    """Fitted (or published) parameters of L(N, D) = E + A/N^alpha + B/D^beta.

    ``objective``: the paper's objective at the optimum (sum of Huber losses of the log
    residuals); ``ci``: bootstrap intervals ``{name: (low, high)}`` when requested;
    ``bootstrap``: the bootstrap estimates, shape ``(n_boot, 5)`` in :data:`PARAM_NAMES` order.
    """
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = float("nan")
    n_points: int = 0
    n_starts: int = 0
    label: str = ""
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap: np.ndarray | None = field(default=None, repr=False)

    def __call__(self, N, D):
        """Predicted loss at N parameters and D tokens."""
        return chinchilla_loss(N, D, self.E, self.A, self.B, self.alpha, self.beta)

    predict = __call__

    @property
    def params(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in PARAM_NAMES}

    @property
    def exponent_n_opt(self) -> float:
        """The allocation exponent of N_opt ∝ C^x: beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def exponent_d_opt(self) -> float:
        """The allocation exponent of D_opt ∝ C^x: alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    def summary(self) -> str:
        text = (f"E={self.E:.3f}  A={self.A:.1f}  B={self.B:.1f}  alpha={self.alpha:.3f}  beta={self.beta:.3f}"
                f"  (N_opt ∝ C^{self.exponent_n_opt:.3f}, D_opt ∝ C^{self.exponent_d_opt:.3f})")
        return f"{self.label}: {text}" if self.label else text


# --------------------------------------------------------------------------------- compute-optimal allocation


def compute_optimal(C, fit: ChinchillaFit) -> tuple[np.ndarray | float, np.ndarray | float]:
    """N_opt and D_opt that minimise the fitted L(N, D) subject to C = 6 N D.

    With D = C / (6N), dL/dN = 0 gives α A N^{-α} = β B (C/6)^{-β} N^{β}, so
    N_opt = G (C/6)^{β/(α+β)} and D_opt = G^{-1} (C/6)^{α/(α+β)}, G = (αA / (βB))^{1/(α+β)}.
    """
    C_arr = np.asarray(C, dtype=float)
    if np.any(~np.isfinite(C_arr)) or np.any(C_arr <= 0):
        raise ValueError("the compute budget C (FLOPs) must be positive and finite")
    if not (fit.alpha > 0 and fit.beta > 0 and fit.A > 0 and fit.B > 0):
        raise ValueError(f"compute_optimal needs alpha, beta, A, B > 0; got {fit.params}: "
                         "without both power-law terms there is no finite optimum")
    s = fit.alpha + fit.beta
    G = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1.0 / s)
    n_opt = G * (C_arr / 6.0) ** (fit.beta / s)
    d_opt = (C_arr / 6.0) / n_opt
    if C_arr.ndim == 0:
        return float(n_opt), float(d_opt)
    return n_opt, d_opt


def compute_overhead(N, C: float, fit: ChinchillaFit):
    """The cost of an off-optimal model size: the extra compute (as a fraction of C) that a
    model of N parameters needs to reach the loss the compute-optimal model reaches with C.

    The optimal loss is L* = L(N_opt, D_opt). A model of size N reaches L* with
    D' = (B / (L* − E − A/N^α))^{1/β} tokens, i.e. C' = 6 N D'; the overhead is C'/C − 1.
    It is 0 at N_opt and ``inf`` when N is so small that E + A/N^α ≥ L* (no amount of data
    makes up for it).
    """
    N = np.asarray(N, dtype=float)
    if np.any(N <= 0):
        raise ValueError("N (parameters) must be positive")
    n_opt, d_opt = compute_optimal(C, fit)
    target = fit(n_opt, d_opt)
    gap = target - fit.E - fit.A / N**fit.alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        d_needed = np.where(gap > 0, (fit.B / np.where(gap > 0, gap, 1.0)) ** (1.0 / fit.beta), np.inf)
    overhead = 6.0 * N * d_needed / C - 1.0
    return float(overhead) if overhead.ndim == 0 else overhead


def floor_size_factor(fit: ChinchillaFit) -> float:
    """The smallest N / N_opt that can still reach the compute-optimal loss L* (at any budget).

    At the optimum the two power-law terms are tied: α A/N_opt^α = β B/D_opt^β (the
    stationarity condition of :func:`compute_optimal`), so L* − E = (1 + α/β) A/N_opt^α.
    A model f·N_opt has floor E + A/(f N_opt)^α, which stays below L* only while
    f^(−α) < 1 + α/β: the threshold is f = (1 + α/β)^(−1/α), the same for every C, where
    :func:`compute_overhead` goes to infinity.
    """
    if not (fit.alpha > 0 and fit.beta > 0):
        raise ValueError(f"floor_size_factor needs alpha, beta > 0; got alpha={fit.alpha}, beta={fit.beta}")
    return (1.0 + fit.alpha / fit.beta) ** (-1.0 / fit.alpha)
