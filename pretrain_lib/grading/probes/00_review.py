# Hidden probes of exercises/00_review.ipynb. A number or a letter is read back from its variable;
# an expression is called on inputs drawn from the run's secret seed. Every judge's message names the
# section that explains the answer, so the feedback points a student to what to reread.
FORBIDDEN = {"cosine_lr", "compute_optimal", "compute_overhead", "ring_traffic_factor", "clip_grad_norm_",
             "schedules.cosine_lr", "scaling.compute_optimal", "scaling.compute_overhead", "layer_activation_values",
             "hidden_lr_scale"}

SECTIONS = {
    "q01-mask-tokens": "1.1 Masked language modelling, 'The 80/10/10 rule'",
    "q02-unchanged-targets": "1.1 Masked language modelling, 'The 80/10/10 rule'",
    "q03-uniform-model": "1.2 Causal language modelling, 'The loss at initialisation'",
    "q04-signal-ratio": "1.3 MLM vs CLM, 'How many tokens teach each model?'",
    "q05-padding": "1.2 Causal language modelling, the pitfall 'padding counted in the loss'",
    "q06-gpt-params": "1.0 The Transformer, '7. Counting the parameters by hand'",
    "q07-padding-waste": "2.3 Packing and shards, 'Two ways to fill a batch'",
    "q08-lsh-candidate": "2.1 Cleaning and dedup, 'Near duplicates: MinHash and LSH'",
    "q09-shard-dtype": "2.3 Packing and shards, 'Token shards on disk'",
    "q10-never-masked": "2.4 Parallel loading, 'Static against dynamic masking'",
    "q11-byte-bpe": "2.2 Tokenizers, 'Byte-level BPE'",
    "q12-ddp-bytes": "3.5 Collectives, 'The ring'",
    "q13-zero-bytes": "3.2 ZeRO and FSDP, 'The memory formulas'",
    "q14-bubble": "3.4 Pipeline parallelism, 'Micro-batches and the bubble'",
    "q15-tp-allreduce": "3.3 Tensor parallelism, 'Column- then row-parallel'",
    "q16-double-allreduce": "3.1 Data parallelism, 'Why averaging gradients is exact'",
    "q17-train-flops": "4.1 The Chinchilla law, 'Compute: C ≈ 6ND'",
    "q18-n-opt": "4.1 The Chinchilla law, 'The compute-optimal allocation, step by step'",
    "q19-d-opt": "4.1 The Chinchilla law, 'The compute-optimal allocation, step by step'",
    "q20-overhead": "4.4 Compute-optimal explorer, 'The cost of being off-optimal'",
    "q21-n-opt-growth": "4.1 The Chinchilla law, '\"20 tokens per parameter\" versus the fitted exponents'",
    "q22-cosine-lr": "5.1 Learning-rate schedules, 'Three schedules'",
    "q23-clip": "5.2 Accumulation and clipping, 'Clipping by the global norm'",
    "q24-accumulated-loss": "5.2 Accumulation and clipping, 'What \"equivalent\" means'",
    "q25-bias-correction": "5.4 AdamW and Muon, 'Bias correction, numerically'",
    "q26-bf16": "5.3 Mixed precision, 'Three formats'",
    "q27-mfu": "6.1 What to watch, 'Throughput and MFU'",
    "q28-first-loss": "6.2 Diagnosing failures, '3. The two sanity checks'",
    "q29-host-reads": "6.1 What to watch, '4. Host reads'",
    "q30-tokens-per-step": "7.1 Pretraining a GPT, 'The config'",
    "q31-exact-resume": "7.3 Kill, resume, and scale out, 'Resume'",
    "q32-activation-bytes": "9.4 Activation memory and low precision, 'What a step keeps in memory'",
    "q33-innermost": "9.1 Composing parallelisms on a device mesh, 'A mesh gives every rank coordinates'",
    "q34-mup-hidden-lr": "9.5 μP, 'Why the best learning rate moves with the width'",
    "q35-zigzag": "9.2 Context parallelism, 'Load balance under the causal mask'",
}


def _number(name):
    def run(ns, seed, ctx):
        value = ns[name]
        if isinstance(value, bool) or not isinstance(float(value), float):
            raise TypeError(f"{name} must be a number")
        return float(value)
    return run


def _letter(name):
    def run(ns, seed, ctx):
        value = ns[name]
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a letter in quotes, such as \"B\"")
        return value.strip().upper()
    return run


def _calls(name, salt, draw):
    """Call the answer on 8 argument tuples drawn by ``draw(r)`` from the secret seed."""
    def run(ns, seed, ctx):
        r = rng(seed, salt)
        return [ns[name](*draw(r)) for _ in range(8)]
    return run


def _draw_clip(r):
    import numpy as np
    grads = [r.normal(0, r.uniform(0.1, 10), int(r.integers(1, 6))) for _ in range(int(r.integers(1, 4)))]
    total = float(np.sqrt(sum(float((g * g).sum()) for g in grads)))
    return grads, float(total * r.choice([0.1, 0.5, 2.0]))   # clipping active in some draws, not in others


def _draw_lr(r):
    warmup = int(r.integers(1, 200))
    end = warmup + int(r.integers(1, 2000))
    step = int(r.choice([r.integers(0, warmup), r.integers(warmup, end), end + int(r.integers(0, 100))]))
    max_lr = float(10 ** r.uniform(-5, -2))
    return step, max_lr, float(max_lr * r.uniform(0, 0.2)), warmup, end


_DRAWS = {
    "q03-uniform-model": ("q03_uniform_model", lambda r: (int(r.integers(2, 200_000)),)),
    "q04-signal-ratio": ("q04_signal_ratio", lambda r: (int(r.integers(16, 4096)), float(r.uniform(0.05, 0.5)))),
    "q06-gpt-params": ("q06_gpt_params", lambda r: (int(r.integers(100, 100_000)), int(r.integers(1, 64)) * 16,
                                                    int(r.integers(1, 48)), int(r.integers(16, 8192)))),
    "q07-padding-waste": ("q07_padding_waste", lambda r: (
        [int(x) for x in r.integers(1, 513, int(r.integers(1, 20)))], 512)),
    "q08-lsh-candidate": ("q08_lsh_candidate", lambda r: (float(r.uniform(0, 1)), int(r.integers(1, 64)),
                                                          int(r.integers(1, 16)))),
    "q10-never-masked": ("q10_never_masked", lambda r: (float(r.uniform(0.01, 0.9)), int(r.integers(1, 50)))),
    "q12-ddp-bytes": ("q12_ddp_bytes", lambda r: (int(10 ** r.uniform(3, 11)), int(r.choice([2, 4])),
                                                  int(r.integers(1, 1025)))),
    "q13-zero-bytes": ("q13_zero_bytes", lambda r: (float(10 ** r.uniform(6, 12)), int(r.integers(1, 1025)),
                                                    int(r.integers(0, 4)))),
    "q14-bubble": ("q14_bubble", lambda r: (int(r.integers(1, 65)), int(r.integers(1, 257)))),
    "q17-train-flops": ("q17_train_flops", lambda r: (float(10 ** r.uniform(6, 12)), float(10 ** r.uniform(8, 14)))),
    "q22-cosine-lr": ("q22_cosine_lr", _draw_lr),
    "q23-clip": ("q23_clip", _draw_clip),
    "q25-bias-correction": ("q25_bias_correction", lambda r: (float(r.uniform(0.5, 0.9999)), int(r.integers(1, 5000)))),
    "q27-mfu": ("q27_mfu", lambda r: (float(10 ** r.uniform(6, 11)), float(10 ** r.uniform(2, 6)),
                                      float(10 ** r.uniform(12, 16)))),
    "q30-tokens-per-step": ("q30_tokens_per_step", lambda r: tuple(int(r.integers(1, 65)) for _ in range(4))),
    "q32-activation-bytes": ("q32_block_activation_bytes", lambda r: (int(r.integers(1, 8193)), int(r.integers(1, 65)),
                                                                      int(r.integers(1, 129)) * 64)),
    "q34-mup-hidden-lr": ("q34_mup_hidden_lr", lambda r: (float(10 ** r.uniform(-5, -1)), int(r.integers(1, 65)) * 32,
                                                          int(r.choice([32, 64, 128, 256])))),
}
_NUMBERS = {"q01-mask-tokens": ("q01_mask_tokens", 1e-3), "q02-unchanged-targets": ("q02_unchanged_targets", 1e-3),
            "q18-n-opt": ("q18_n_opt", 1e-2), "q19-d-opt": ("q19_d_opt", 1e-2), "q20-overhead": ("q20_overhead", 2e-2),
            "q24-accumulated-loss": ("q24_accumulated_loss", 1e-3)}
_LETTERS = {"q05-padding": "q05_padding", "q09-shard-dtype": "q09_shard_dtype", "q11-byte-bpe": "q11_byte_bpe",
            "q15-tp-allreduce": "q15_tp_allreduce", "q16-double-allreduce": "q16_double_allreduce",
            "q21-n-opt-growth": "q21_n_opt_growth", "q26-bf16": "q26_bf16", "q28-first-loss": "q28_first_loss",
            "q29-host-reads": "q29_host_reads", "q31-exact-resume": "q31_exact_resume",
            "q33-innermost": "q33_innermost", "q35-zigzag": "q35_zigzag"}


def _judge(cid, compare):
    def judge(student, reference, seed):
        ok, why = compare(student, reference)
        return (True, "") if ok else (False, f"{why}; reread {SECTIONS[cid]}")
    return judge


PROBES = {}
for _cid, (_name, _draw) in _DRAWS.items():
    _rtol = 1e-9 if _cid != "q23-clip" else 1e-7
    PROBES[_cid] = {"answer": _name, "run": _calls(_name, 1500 + len(PROBES), _draw),
                    "judge": _judge(_cid, lambda s, r, t=_rtol: close(s, r, t, 1e-12))}
for _cid, (_name, _rtol) in _NUMBERS.items():
    PROBES[_cid] = {"answer": _name, "run": _number(_name), "judge": _judge(_cid, lambda s, r, t=_rtol: close(s, r, t))}
for _cid, _name in _LETTERS.items():
    PROBES[_cid] = {"answer": _name, "run": _letter(_name), "judge": _judge(_cid, equal)}

for _cid, _probe in PROBES.items():
    _probe["inputs"] = ("8 argument tuples drawn at random (the function called on each)" if _cid in _DRAWS
                        else "the value you assigned")
