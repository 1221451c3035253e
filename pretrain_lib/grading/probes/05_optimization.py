# Hidden probes of exercises/05_optimization.ipynb: the cosine schedule on a table drawn from the
# secret seed, accumulation on ragged micro-batches of fresh batches, clipping of fresh gradients
# (one parameter without a gradient). Values are compared with the solution's on the same inputs.
FORBIDDEN = {"pretrain_lib.optim", "optim.cosine_lr", "cosine_lr", "clip_grad_norm_", "torch.nn.utils.clip_grad_norm_",
             "clip_grad_norm", "optim.clip_grad_norm", "train_step", "default_forward_backward"}


def _cosine_table(ns, seed, ctx):
    r = rng(seed, 50)
    out = []
    for _ in range(4):
        warmup = int(r.integers(0, 30))
        end = warmup + int(r.integers(0, 80))
        top = float(r.uniform(1e-4, 1e-2))
        low = float(top * r.uniform(0, 0.5))
        out += [float(ns["my_cosine_lr"](s, top, low, warmup, end)) for s in range(0, end + 20, 2)]
    return out


def _accumulation(ns, seed, ctx, kind):
    import torch
    r = rng(seed, 51 if kind == "clm" else 52)
    batch = ns["padded_clm_batch"](int(r.integers(0, 10_000))) if kind == "clm" else ns["mlm_batch"](int(r.integers(0, 10_000)))
    cuts = sorted(int(c) for c in r.choice(range(1, 8), size=int(r.integers(1, 4)), replace=False))
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [8])]
    model = ns["small_model"](kind)
    objective = ns["labelled_clm_objective"] if kind == "clm" else ns["labelled_mlm_objective"]
    total = ns["accumulate_gradients"](model, ns["split"](batch, sizes), objective)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return [float(total), float(grads.norm())] + [float(v) for v in grads[::97][:200]]


def _clip(ns, seed, ctx):
    r = rng(seed, 53)
    ps = ns["params_with_one_missing_grad"](int(r.integers(0, 10_000)))
    max_norm = float(r.uniform(0.05, 12.0))
    norm = float(ns["my_clip_grad_norm"](ps, max_norm))
    return [norm, max_norm] + [float(v) for p in ps if p.grad is not None for v in p.grad.reshape(-1)]


def _clip_missing(ns, seed, ctx):
    ps = ns["params_with_one_missing_grad"](int(rng(seed, 54).integers(0, 10_000)))
    ns["my_clip_grad_norm"](ps, 0.01)
    return [p.grad is None for p in ps]


PROBES = {
    "cosine-lr-boundaries": {"answer": "my_cosine_lr", "run": _cosine_table, "judge": lambda s, r, seed: close(s, r, 1e-12, 1e-15)},
    "cosine-lr-table": {"answer": "my_cosine_lr", "run": _cosine_table, "judge": lambda s, r, seed: close(s, r, 1e-12, 1e-15)},
    "accumulation-clm": {"answer": "accumulate_gradients", "run": lambda ns, seed, ctx: _accumulation(ns, seed, ctx, "clm"),
                         "judge": lambda s, r, seed: close(s, r, 1e-4, 1e-7)},
    "accumulation-mlm": {"answer": "accumulate_gradients", "run": lambda ns, seed, ctx: _accumulation(ns, seed, ctx, "mlm"),
                         "judge": lambda s, r, seed: close(s, r, 1e-4, 1e-7)},
    "clip-grad-norm": {"answer": "my_clip_grad_norm", "run": _clip, "judge": lambda s, r, seed: close(s, r, 1e-5, 1e-7)},
    "clip-grad-norm-missing": {"answer": "my_clip_grad_norm", "run": _clip_missing, "judge": equal},
}

describe_inputs(PROBES, {
    "cosine-lr-boundaries": "4 random schedules (warm-up 0-29 steps, some without decay), every other step",
    "cosine-lr-table": "4 random schedules (warm-up 0-29 steps, some without decay), every other step",
    "accumulation-clm": "a fresh padded CLM batch cut into 2-4 ragged micro-batches",
    "accumulation-mlm": "a fresh MLM batch cut into 2-4 ragged micro-batches",
    "clip-grad-norm": "fresh gradients (one parameter without a gradient) and a random max_norm",
    "clip-grad-norm-missing": "fresh gradients with one parameter without a gradient",
})
