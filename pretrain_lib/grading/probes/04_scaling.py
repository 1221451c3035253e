# Hidden probes of exercises/04_scaling.ipynb: the law, the Huber objective in log space and
# the compute-optimal allocation on parameters drawn from the run's secret seed.
FORBIDDEN = {"PAPER_FIT", "EPOCH_FIT", "log_huber_objective", "compute_optimal", "chinchilla_loss",
             "scaling.log_huber_objective", "scaling.compute_optimal", "scaling.chinchilla_loss", "fit_approach3",
             "optimal_allocation"}


def _law(ns, seed, ctx):
    r = rng(seed, 90)
    N, D = 10 ** r.uniform(6, 12, 20), 10 ** r.uniform(8, 14, 20)
    E, A, B = r.uniform(1, 2), r.uniform(100, 900), r.uniform(100, 3000)
    alpha, beta = r.uniform(.2, .5), r.uniform(.2, .5)
    out = [float(v) for v in ns["my_chinchilla_loss"](N, D, E, A, B, alpha, beta)]
    return out + [float(ns["my_chinchilla_loss"](float(N[0]), float(D[0]), E, A, B, alpha, beta))]


def _huber_points(seed, salt, near):
    r = rng(seed, salt)
    centre = r.normal([6.2, 7.6, 0.6, 0.35, 0.37], 0.05) if near else r.uniform([-2, -2, -1, 0, 0], [9, 30, 2, 2, 1])
    return [list(map(float, centre + (r.normal(0, 0.02, 5) if near else 0))) for _ in range(4)], r


def _huber(ns, seed, ctx):
    import numpy as np
    points, r = _huber_points(seed, 91, near=False)
    n = int(r.integers(5, 40))
    logN, logD = r.uniform(15, 25, n), r.uniform(18, 30, n)
    logL = np.log(r.uniform(1.8, 4, n))
    delta = float(r.choice([1e-3, 1e-2, 0.5]))
    out = [float(ns["my_log_huber_objective"](np.array(p), logN, logD, logL, delta)) for p in points]
    big = float(ns["my_log_huber_objective"](np.array([1000.0, 5.0, 0.5, 0.3, 0.3]), logN, logD, logL, delta))
    tiny = float(ns["my_log_huber_objective"](np.array([-50.0, -50.0, np.log(2.0) + 1e-4 * r.uniform(1, 5), 0, 0]),
                                               np.zeros(1), np.zeros(1), np.log([2.0]), 1e-3))
    return out + [big, tiny]


def _huber_fit(ns, seed, ctx):
    import numpy as np
    d = ns["data"]
    points, _ = _huber_points(seed, 92, near=True)
    return [float(ns["my_log_huber_objective"](np.array(p), np.log(d.N), np.log(d.D), np.log(d.loss), 1e-3))
            for p in points]


def _optimal(ns, seed, ctx):
    r = rng(seed, 93)
    C = 10 ** r.uniform(18, 27, 6)
    A, B, alpha, beta = r.uniform(100, 900), r.uniform(100, 3000), r.uniform(.2, .5), r.uniform(.2, .5)
    n_opt, d_opt = ns["my_compute_optimal"](C, A, B, alpha, beta)
    return [float(v) for v in n_opt] + [float(v) for v in d_opt]


PROBES = {
    "chinchilla-law": {"answer": "my_chinchilla_loss", "run": _law, "judge": lambda s, r, seed: close(s, r, 1e-9)},
    "log-huber-objective": {"answer": "my_log_huber_objective", "run": _huber,
                            "judge": lambda s, r, seed: close(s, r, 1e-7, 1e-14)},
    "log-huber-fit": {"answer": "my_log_huber_objective", "run": _huber_fit,
                      "judge": lambda s, r, seed: close(s, r, 1e-7, 1e-14)},
    "compute-optimal": {"answer": "my_compute_optimal", "run": _optimal, "judge": lambda s, r, seed: close(s, r, 1e-9)},
}

describe_inputs(PROBES, {
    "chinchilla-law": "20 random (N, D) pairs and random law parameters, then one pair as plain floats",
    "log-huber-objective": "4 random parameter points on random data, a point far off and a near-zero residual",
    "log-huber-fit": "4 parameter points near the fit, on the notebook's data",
    "compute-optimal": "6 random compute budgets (1e18-1e27 FLOPs) and random law parameters",
})
