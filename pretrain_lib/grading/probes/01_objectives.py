# Hidden probes of exercises/01_objectives.ipynb. Inputs come from the run's secret seed; the
# student's values are judged in the grading process (properties of the masks, or the same
# numbers as the solution's on the same inputs).
FORBIDDEN = {"pretrain_lib.objectives", "mask_tokens_reference", "objectives.mask_tokens", "objectives.mlm_loss",
             "objectives.clm_loss", "DynamicMLMCollator", "pretrain_lib.data.collate"}


def _mask_setup(seed):
    r = rng(seed, 10)
    vocab = int(r.integers(300, 800))
    n_special = int(r.integers(3, 7))
    ids = r.integers(n_special, vocab, (128, 128))
    pad = int(r.integers(20, 60))
    ids[:, 0], ids[::2, -pad:] = n_special - 1, 0
    return ids, vocab, list(range(n_special)), 1


def _mask_run(ns, seed, ctx):
    import torch
    ids, vocab, specials, mask_id = _mask_setup(seed)
    x = torch.tensor(ids)
    before = x.clone()
    inputs, labels = ns["mask_tokens"](x, mask_token_id=mask_id, vocab_size=vocab, special_token_ids=tuple(specials),
                                       generator=torch.Generator().manual_seed(int(seed) % 2**31))
    return {"inputs": inputs.tolist(), "labels": labels.tolist(), "unchanged": bool(torch.equal(x, before))}


def _grid(value, rows, cols):
    """``value`` as a rows x cols list of ints, or None."""
    if not isinstance(value, list) or len(value) != rows:
        return None
    if any(not isinstance(r, list) or len(r) != cols for r in value):
        return None
    if any(not isinstance(x, int) or isinstance(x, bool) for r in value for x in r):
        return None
    return value


def _mask_stats(student, ids, vocab, specials, mask_id):
    """((selected share, [MASK] share, kept share), "") for one (inputs, labels) pair, or (None, why)."""
    if not isinstance(student, dict):
        return None, "mask_tokens did not return (inputs, labels)"
    rows, cols = len(ids), len(ids[0])
    inputs, labels = _grid(student.get("inputs"), rows, cols), _grid(student.get("labels"), rows, cols)
    if inputs is None or labels is None:
        return None, f"inputs and labels must be integer tensors of the input's shape ({rows} x {cols})"
    n_ord = n_sel = n_mask = n_keep = 0
    for i, row in enumerate(ids):
        for j, tok in enumerate(row):
            lab, inp = labels[i][j], inputs[i][j]
            ordinary = tok not in specials
            n_ord += ordinary
            if lab != -100:
                if not ordinary:
                    return None, "a special or padding position was selected"
                if lab != tok:
                    return None, "a label differs from the original id at a selected position"
                n_sel += 1
                n_mask += inp == mask_id
                n_keep += inp == tok
                if inp != mask_id and inp != tok and (inp in specials or not 0 <= inp < vocab):
                    return None, "a random replacement is a special token or out of the vocabulary"
            elif inp != tok:
                return None, "an unselected position (label -100) was changed in inputs"
    if n_sel == 0:
        return None, "no position was selected (every label is -100)"
    return (n_sel / max(1, n_ord), n_mask / n_sel, n_keep / n_sel), ""


def _mask_judge(student, reference, seed):
    if not isinstance(student, dict) or student.get("unchanged") is not True:
        return False, "input_ids was modified in place"
    ids, vocab, specials, mask_id = _mask_setup(seed)
    stats, why = _mask_stats(student, ids.tolist(), vocab, specials, mask_id)
    if stats is None:
        return False, why
    sel, mask, keep = stats
    for what, got, want, tol in (("selected", sel, 0.15, 0.015), ("[MASK] among selected", mask, 0.8, 0.04),
                                 ("kept among selected", keep, 0.1, 0.03)):
        if abs(got - want) > tol:
            return False, f"{what}: {got:.1%}, expected {want:.0%} ± {tol:.1%}"
    return True, ""


def _labels_run(ns, seed, ctx):
    import torch
    ids, vocab, specials, mask_id = _mask_setup(seed)
    x = torch.tensor(ids[:6])
    runs = [ns["mask_tokens"](x, mask_token_id=mask_id, vocab_size=vocab, special_token_ids=tuple(specials),
                              generator=torch.Generator().manual_seed(int(seed) % 1000 + k)) for k in (0, 0, 1)]
    return [{"inputs": a.tolist(), "labels": b.tolist()} for a, b in runs]


def _labels_judge(student, reference, seed):
    ids, vocab, specials, mask_id = _mask_setup(seed)
    ids = ids[:6].tolist()
    if not isinstance(student, list) or len(student) != 3:
        return False, "mask_tokens was called 3 times but did not return 3 results"
    for run in student:      # ~100 of ~700 ordinary positions: a share within 5 standard deviations of 15%
        stats, why = _mask_stats(run, ids, vocab, specials, mask_id)
        if stats is None:
            return False, why
        if not 0.08 <= stats[0] <= 0.22:
            return False, f"selected {stats[0]:.1%} of the ordinary positions, expected about 15%"
    first, again, other = student
    if first != again:
        return False, "the same generator seed gave different masks"
    if first == other:
        return False, "different generator seeds gave the same masks"
    return True, ""


def _loss_inputs(seed, salt):
    import torch
    r = rng(seed, salt)
    b, t, v = (int(x) for x in r.integers(2, 9, 3))
    g = torch.Generator().manual_seed(int(r.integers(0, 2**31)))
    logits = torch.randn(b, t, v + 2, generator=g) * float(r.uniform(0.5, 3))
    ids = torch.randint(0, v + 2, (b, t), generator=g)
    return logits, ids, r


def _mlm_run(ns, seed, ctx):
    import torch
    out = []
    for k in range(3):
        logits, ids, r = _loss_inputs(seed, 20 + k)
        labels = torch.where(torch.tensor(r.random(ids.shape) < 0.4), ids, torch.full_like(ids, -100))
        labels[0, 0] = ids[0, 0]
        out.append(float(ns["mlm_loss"](logits, labels)))
    return out


def _clm_run(ns, seed, ctx):
    out = []
    for k in range(3):
        logits, ids, r = _loss_inputs(seed, 30 + k)
        out.append(float(ns["clm_loss"](logits, ids)))
        pad = int(ids[0, -1])
        ids[0, 1] = (pad + 1) % logits.size(-1)
        out.append(float(ns["clm_loss"](logits, ids, ignore_index=pad)))
    return out


_BATCH = "a 128 x 128 batch of a random vocabulary (300-800 ids) with a [CLS] column, padding and 3-6 special ids"
PROBES = {
    "mask-tokens-proportions": {"answer": "mask_tokens", "run": _mask_run, "judge": _mask_judge, "inputs": _BATCH},
    "mask-tokens-labels-seeded": {"answer": "mask_tokens", "run": _labels_run, "judge": _labels_judge,
                                  "inputs": "6 rows of " + _BATCH[2:] + ", masked with seeds s, s and s + 1"},
    "mlm-loss": {"answer": "mlm_loss", "run": _mlm_run, "judge": lambda s, r, seed: close(s, r, 1e-5, 1e-6),
                 "inputs": "3 random (batch, seq, vocab) logits with about 40% of the labels kept"},
    "clm-loss": {"answer": "clm_loss", "run": _clm_run, "judge": lambda s, r, seed: close(s, r, 1e-5, 1e-6),
                 "inputs": "3 random (batch, seq, vocab) logits, each without and with an ignore_index"},
    "expected-masks-512": {"answer": "expected_masks_512", "run": lambda ns, seed, ctx: float(ns["expected_masks_512"]),
                           "judge": lambda s, r, seed: close(s, r, 0, 0.01), "inputs": "the number you assigned"},
}
