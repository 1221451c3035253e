# Hidden probes of exercises/09_scale.ipynb: the attention merge on fresh queries, keys and block cuts (some blocks
# fully masked for some queries), the router and balancing loss on fresh logits of random sizes, μP's rates at a
# random width and base. Values are compared with the solution's on the same inputs.
FORBIDDEN = {"pretrain_lib.distributed.context_parallel", "merge_partial_attention", "context_parallel",
             "pretrain_lib.moe", "reference_route", "reference_balance_loss", "moe.route", "moe.balance_loss",
             "pretrain_lib.mup", "mup.hidden_lr_scale", "mup_param_groups", "hidden_lr_scale"}


def _merge(ns, seed, ctx, salt):
    import torch
    r = rng(seed, salt)
    t, d, n_blocks = int(r.integers(8, 40)), int(r.choice([4, 8, 16])), int(r.integers(2, 6))
    g = torch.Generator().manual_seed(int(r.integers(0, 2**31)))
    q, k, v = (torch.randn(2, t, d, generator=g) for _ in range(3))
    pos = torch.arange(t)
    cuts = sorted(int(c) for c in r.choice(range(1, t), size=n_blocks - 1, replace=False))
    blocks = [pos[a:b] for a, b in zip([0] + cuts, cuts + [t])]
    order = [int(i) for i in r.permutation(n_blocks)] if salt == 91 else list(range(n_blocks))
    out = lse = None
    for i in order:
        part = ns["partial_attention"](q, k[..., blocks[i], :], v[..., blocks[i], :], pos, blocks[i])
        out, lse = part if out is None else ns["merge_attention"](out, lse, *part)
    return [float(x) for x in out.reshape(-1)[::7]] + [float(x) for x in lse.reshape(-1)]


def _route(ns, seed, ctx):
    import torch
    r = rng(seed, 92)
    T, E = int(r.integers(5, 80)), int(r.integers(2, 17))
    k = int(r.integers(1, min(E, 4) + 1))
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(int(r.integers(0, 2**31)))) * float(r.uniform(0.5, 3))
    probs, experts, gates = ns["top_k_route"](logits, k)
    return {"experts": experts.tolist(), "gates": [float(x) for x in gates.reshape(-1)],
            "probs": [float(x) for x in probs.reshape(-1)[::3]]}


def _balance(ns, seed, ctx):
    import torch
    r = rng(seed, 93)
    T, E = int(r.integers(5, 200)), int(r.integers(2, 17))
    k = int(r.integers(1, min(E, 4) + 1))
    g = torch.Generator().manual_seed(int(r.integers(0, 2**31)))
    probs = torch.randn(T, E, generator=g).softmax(-1)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return [float(ns["balance_loss"](probs, experts))]


def _mup(ns, seed, ctx):
    r = rng(seed, 94)
    base = int(r.choice([16, 32, 64]))
    width = base * int(r.integers(1, 9))
    lr = float(r.uniform(1e-4, 3e-2))
    return [float(ns["mup_learning_rate"](kind, lr, width, base)) for kind in ("hidden", "embedding", "bias", "norm")]


def _mup_base(ns, seed, ctx):
    r = rng(seed, 95)
    base = int(r.choice([16, 32, 64, 128]))
    lr = float(r.uniform(1e-4, 3e-2))
    return [float(ns["mup_learning_rate"](kind, lr, base, base)) for kind in ("hidden", "embedding", "bias", "norm")]


def _route_judge(student, reference, seed):
    if not isinstance(student, dict) or set(student) != set(reference):
        return False, "top_k_route must return (probs, experts, gates)"
    if student["experts"] != reference["experts"]:
        return False, "chose different experts (the k most probable, most probable first)"
    return close([student["gates"], student["probs"]], [reference["gates"], reference["probs"]], 1e-5, 1e-7)


PROBES = {
    "ring-merge-two-blocks": {"answer": "merge_attention", "run": lambda ns, seed, ctx: _merge(ns, seed, ctx, 90),
                              "judge": lambda s, r, seed: close(s, r, 1e-4, 1e-6)},
    "ring-merge-any-order": {"answer": "merge_attention", "run": lambda ns, seed, ctx: _merge(ns, seed, ctx, 91),
                             "judge": lambda s, r, seed: close(s, r, 1e-4, 1e-6)},
    "router-top-k": {"answer": "top_k_route", "run": _route, "judge": _route_judge},
    "balance-loss": {"answer": "balance_loss", "run": _balance, "judge": lambda s, r, seed: close(s, r, 1e-5, 1e-7)},
    "mup-lr-groups": {"answer": "mup_learning_rate", "run": _mup, "judge": lambda s, r, seed: close(s, r, 1e-12, 0)},
    "mup-lr-base-width": {"answer": "mup_learning_rate", "run": _mup_base,
                          "judge": lambda s, r, seed: close(s, r, 1e-12, 0)},
}

describe_inputs(PROBES, {
    "ring-merge-two-blocks": "fresh queries, keys and values cut into 2-5 key blocks at random places, merged in order",
    "ring-merge-any-order": "fresh queries, keys and values cut into 2-5 key blocks, merged in a random order",
    "router-top-k": "fresh router logits for 5-79 tokens, 2-16 experts, k from 1 to 4",
    "balance-loss": "fresh router probabilities and expert choices, 5-199 tokens, 2-16 experts",
    "mup-lr-groups": "a random base width (16-64), a width 1-8 times it, a random learning rate",
    "mup-lr-base-width": "a random base width and learning rate, at the base width itself",
})
