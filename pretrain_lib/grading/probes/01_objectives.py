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


def _mask_stats(student, seed):
    ids, vocab, specials, mask_id = _mask_setup(seed)
    inputs, labels = student["inputs"], student["labels"]
    n_ord = n_sel = n_mask = n_keep = 0
    for i, row in enumerate(ids.tolist()):
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
                    return None, f"a random replacement is a special token or out of the vocabulary ({inp})"
            elif inp != tok:
                return None, "an unselected position was changed"
    if n_sel == 0:
        return None, "no position was selected"
    return (n_sel / n_ord, n_mask / n_sel, n_keep / n_sel), ""


def _mask_judge(student, reference, seed):
    if not isinstance(student, dict) or not student.get("unchanged"):
        return False, "input_ids was modified in place"
    stats, why = _mask_stats(student, seed)
    if stats is None:
        return False, why
    sel, mask, keep = stats
    for what, got, want, tol in (("selected", sel, 0.15, 0.015), ("[MASK] among selected", mask, 0.8, 0.04),
                                 ("kept among selected", keep, 0.1, 0.03)):
        if abs(got - want) > tol:
            return False, f"{what}: {got:.1%} on fresh inputs, expected {want:.0%} ± {tol:.1%}"
    return True, ""


def _labels_run(ns, seed, ctx):
    import torch
    ids, vocab, specials, mask_id = _mask_setup(seed)
    x = torch.tensor(ids[:6])
    runs = [ns["mask_tokens"](x, mask_token_id=mask_id, vocab_size=vocab, special_token_ids=tuple(specials),
                              generator=torch.Generator().manual_seed(int(seed) % 1000 + k)) for k in (0, 0, 1)]
    return [{"inputs": a.tolist(), "labels": b.tolist()} for a, b in runs]


def _labels_judge(student, reference, seed):
    ids = _mask_setup(seed)[0][:6].tolist()
    first, again, other = student
    for i, row in enumerate(ids):
        for j, tok in enumerate(row):
            lab = first["labels"][i][j]
            if lab != -100 and lab != tok:
                return False, "labels must hold the original id at selected positions and -100 elsewhere"
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


PROBES = {
    "mask-tokens-proportions": {"answer": "mask_tokens", "run": _mask_run, "judge": _mask_judge},
    "mask-tokens-labels-seeded": {"answer": "mask_tokens", "run": _labels_run, "judge": _labels_judge},
    "mlm-loss": {"answer": "mlm_loss", "run": _mlm_run, "judge": lambda s, r, seed: close(s, r, 1e-5, 1e-6)},
    "clm-loss": {"answer": "clm_loss", "run": _clm_run, "judge": lambda s, r, seed: close(s, r, 1e-5, 1e-6)},
    "expected-masks-512": {"answer": "expected_masks_512", "run": lambda ns, seed, ctx: float(ns["expected_masks_512"]),
                           "judge": lambda s, r, seed: close(s, r, 0, 0.01)},
}
