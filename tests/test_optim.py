"""Chapter 5's library: schedules, param groups, Muon + AdamW, clipping, accumulation, the LR range test."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from pretrain_lib.model import GPT, MaskedLM, ModelConfig
from pretrain_lib.objectives import IGNORE_INDEX, mask_tokens
from pretrain_lib.optim.accumulation import labelled_mlm_objective, per_micro_step_forward_backward
from pretrain_lib.optim import (MuonWithAdamW, as_lr_lambda, build_optimizer, clip_grad_norm, cosine_lr,
                                muon_matrices, noam_lr, param_groups, wsd_lr)
from pretrain_lib.optim.range_test import lr_range_test
from pretrain_lib.train import clm_objective, train, train_step


def _gpt(seed=0, vocab=40, d_model=32):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=vocab, d_model=d_model, n_heads=2, n_layers=2, max_seq_len=16))


def _weights(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ----------------------------------------------------------------------------- schedules, worked by hand

def test_noam_boundaries():
    # d_model = 256, warmup 4: d^-0.5 = 1/16 and w^-1.5 = 1/8
    lr = lambda s: noam_lr(s, d_model=256, warmup_steps=4)
    assert lr(0) == pytest.approx(1 / 16 * 1 / 8)          # (s+1) = 1: the warmup branch
    assert lr(3) == pytest.approx(1 / 32)                  # s+1 = w: both branches meet at (d·w)^-0.5
    assert lr(15) == pytest.approx(1 / 16 * 1 / 4)         # s+1 = 16: 1/sqrt(16)
    assert max(lr(s) for s in range(50)) == pytest.approx(lr(3))
    assert noam_lr(3, d_model=256, warmup_steps=4, scale=2.0) == pytest.approx(2 / 32)


def test_source_noam_peak_ignores_the_optimizers_lr():
    """The source's §6: Adam(lr=1e-4), d_model=256, warmup 4000: the schedule peaks near 1e-3."""
    peak = max(noam_lr(s, d_model=256, warmup_steps=4000) for s in range(3990, 4010))
    assert peak == pytest.approx((256 * 4000) ** -0.5)
    assert 9.8e-4 < peak < 9.9e-4


def test_cosine_boundaries():
    lr = lambda s: cosine_lr(s, max_lr=1.0, min_lr=0.1, warmup_steps=4, cosine_steps=12)
    assert lr(0) == 0.0
    assert lr(3) == pytest.approx(0.75)          # the last warmup step
    assert lr(4) == pytest.approx(1.0)           # the peak
    assert lr(8) == pytest.approx(0.55)          # half way: min + (max - min) / 2
    assert lr(12) == pytest.approx(0.1)          # the end of the decay
    assert lr(13) == lr(1000) == 0.1             # after it
    assert cosine_lr(5, max_lr=1.0, min_lr=0.0, warmup_steps=5, cosine_steps=5) == 1.0


@pytest.mark.parametrize("decay,step,expected", [("linear", 7, 0.5), ("cosine", 7, 0.5), ("sqrt", 6, 0.5),
                                                 ("linear", 6, 0.75), ("cosine", 6, 0.5 * (1 + math.cos(math.pi / 4)))])
def test_wsd_boundaries(decay, step, expected):
    lr = lambda s: wsd_lr(s, max_lr=1.0, min_lr=0.0, warmup_steps=2, stable_steps=3, decay_steps=4, decay=decay)
    assert [lr(0), lr(1), lr(2), lr(4), lr(5)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    assert lr(step) == pytest.approx(expected)
    assert lr(9) == lr(100) == 0.0


@pytest.mark.parametrize("call,match", [
    (lambda: cosine_lr(-1, max_lr=1, min_lr=0, warmup_steps=1, cosine_steps=2), "non-negative"),
    (lambda: cosine_lr(0, max_lr=1, min_lr=0, warmup_steps=5, cosine_steps=4), "cosine_steps"),
    (lambda: cosine_lr(0, max_lr=1, min_lr=2, warmup_steps=1, cosine_steps=2), "min_lr"),
    (lambda: wsd_lr(0, max_lr=1, min_lr=0, warmup_steps=1, stable_steps=-1, decay_steps=1), "stable_steps"),
    (lambda: wsd_lr(0, max_lr=1, min_lr=0, warmup_steps=1, stable_steps=1, decay_steps=1, decay="exp"), "decay"),
    (lambda: noam_lr(0, d_model=0, warmup_steps=4), "d_model"),
    (lambda: as_lr_lambda(lambda s: 1.0, 0.0), "base_lr"),
])
def test_schedules_reject_impossible_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_lambda_lr_gives_the_engines_learning_rates_over_a_whole_run():
    schedule = lambda s: cosine_lr(s, max_lr=3e-3, min_lr=3e-4, warmup_steps=3, cosine_steps=10)
    data = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    history = train(_gpt(), lambda i: {"input_ids": data}, clm_objective, steps=14, lr=3e-3, lr_schedule=schedule,
                    progress=False, device="cpu")
    model = _gpt()
    opt = torch.optim.SGD(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, as_lr_lambda(schedule, 3e-3))
    torch_lrs = []
    with warnings.catch_warnings():  # LambdaLR warns when it is stepped without an optimiser step
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(14):
            torch_lrs.append(opt.param_groups[0]["lr"])
            sched.step()
    assert torch_lrs == pytest.approx(history.lrs, rel=1e-12, abs=1e-15)
    assert history.lrs == [schedule(s) for s in range(14)]


# ----------------------------------------------------------------------------- parameter groups

def test_param_groups_on_the_course_gpt():
    model = _gpt()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)].split(".")[-2] for p in decay["params"])
    assert decayed == sorted(["tok_emb", "pos_emb"] + ["qkv", "proj", "up", "down"] * 2)
    assert all(names[id(p)].endswith(("bias", "ln1.weight", "ln2.weight", "ln_f.weight")) for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # the tied output projection is the token embedding: counted once
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -1.0)


def test_muon_puts_every_parameter_in_exactly_one_group():
    for model in (_gpt(), MaskedLM(ModelConfig(vocab_size=40, d_model=32, n_heads=2, n_layers=2, causal=False))):
        opt = build_optimizer(model, "muon", lr=1e-3, muon_lr=0.02)
        assert isinstance(opt, MuonWithAdamW)
        grouped = [id(p) for g in opt.param_groups for p in g["params"]]
        assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each once, none missing
        muon_ids = {id(p) for g in opt.param_groups if g["optimizer"] == "muon" for p in g["params"]}
        assert muon_ids == {id(p) for p in muon_matrices(model)}
        assert id(model.backbone.tok_emb.weight) not in muon_ids and id(model.backbone.pos_emb.weight) not in muon_ids
        assert all(p.dim() == 2 for p in muon_matrices(model))


def test_muon_leaves_an_untied_output_head_to_adamw():
    class Untied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = ModelConfig(vocab_size=40, d_model=16, n_heads=2, n_layers=1)
            self.emb = torch.nn.Embedding(40, 16)
            self.hidden = torch.nn.Linear(16, 16)
            self.head = torch.nn.Linear(16, 40)

    model = Untied()
    assert [id(p) for p in muon_matrices(model)] == [id(model.hidden.weight)]


def test_muon_lr_scale_follows_the_engines_schedule_and_state_round_trips():
    model = _gpt()
    opt = build_optimizer(model, "muon", lr=1e-3, muon_lr=0.02)
    data = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(1))
    before = _weights(model)
    train(model, lambda i: {"input_ids": data}, clm_objective, optimizer=opt, steps=3, lr=1e-3,
          lr_schedule=lambda s: 1e-3 * (s + 1), progress=False, device="cpu")
    assert not torch.equal(before, _weights(model))
    lrs = {g["optimizer"]: g["lr"] for g in opt.param_groups}
    assert lrs["adamw"] == pytest.approx(3e-3) and lrs["muon"] == pytest.approx(3e-3 * 20)
    again = build_optimizer(model, "muon", lr=1e-3)
    again.load_state_dict(opt.state_dict())
    buf = next(iter(opt.muon.state.values()))["momentum_buffer"]
    assert torch.equal(next(iter(again.muon.state.values()))["momentum_buffer"], buf)


@pytest.mark.parametrize("kwargs,match", [({"name": "sgd"}, "one of"), ({"lr": 0.0}, "lr must be positive"),
                                          ({"name": "muon", "muon_lr": -1.0}, "muon_lr"),
                                          ({"betas": (0.9, 1.0)}, "betas"), ({"eps": 0.0}, "eps")])
def test_build_optimizer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(_gpt(), **{"lr": 1e-3, **kwargs})


def test_keyword_adamw_call_is_unchanged():
    opt = build_optimizer(_gpt(), lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


# ----------------------------------------------------------------------------- clipping

def _three_params():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(3, 4), (5,), (2, 2)])
    a.grad, b.grad = torch.randn(3, 4, generator=g) * 3, torch.randn(5, generator=g)  # c has no gradient
    return [a, b, c]


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch_with_a_parameter_without_gradient(max_norm):
    ours, theirs = _three_params(), _three_params()
    norm = clip_grad_norm(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    by_hand = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in _three_params() if p.grad is not None))
    assert float(norm) == pytest.approx(by_hand, rel=1e-6) and float(norm) == pytest.approx(float(expected), rel=1e-6)
    for p, q in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    assert ours[2].grad is None
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ours[:2]))
    assert clipped == pytest.approx(min(by_hand, max_norm), rel=1e-5)
    # same direction: every gradient scaled by one factor
    ratio = ours[0].grad / _three_params()[0].grad
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))


def test_clip_grad_norm_edge_cases():
    p = torch.nn.Parameter(torch.ones(3))
    assert float(clip_grad_norm([p], 1.0)) == 0.0            # no gradient at all
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert float(clip_grad_norm(p, 1.0)) == pytest.approx(5.0)  # a single tensor is accepted
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm([p], 0.0)


# ----------------------------------------------------------------------------- accumulation, from chapter 5's angle

def _masked_lm(seed=0):
    torch.manual_seed(seed)
    return MaskedLM(ModelConfig(vocab_size=40, d_model=32, n_heads=2, n_layers=2, max_seq_len=16, causal=False))


def _mlm_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, 40, (8, 16), generator=g)
    inputs, labels = mask_tokens(ids, mask_token_id=1, vocab_size=40, special_token_ids=[0, 1, 2],
                                 mlm_probability=0.15, generator=g)
    return inputs, labels


@pytest.mark.parametrize("split", [[4, 4], [2, 2, 2, 2], [1, 7], [3, 1, 4]])
def test_mlm_accumulation_equals_the_large_batch(split):
    """MLM's 15 % gives each micro-batch a random number of targets; token normalisation is still exact."""
    # eps=1e-6 as in test_engine: parameters whose true gradient is 0 see rounding noise only
    big, acc, naive = _masked_lm(), _masked_lm(), _masked_lm()
    opts = [build_optimizer(m, lr=1e-3, eps=1e-6) for m in (big, acc, naive)]
    counts = []
    for step in range(4):
        inputs, labels = _mlm_batch(step)
        train_step(big, [{"input_ids": inputs, "labels": labels}], labelled_mlm_objective, opts[0], grad_clip=1.0)
        micro = [{"input_ids": x, "labels": y} for x, y in zip(inputs.split(split), labels.split(split))]
        counts.append([int((m["labels"] != IGNORE_INDEX).sum()) for m in micro])
        train_step(acc, micro, labelled_mlm_objective, opts[1], grad_clip=1.0)
        train_step(naive, micro, labelled_mlm_objective, opts[2], grad_clip=1.0,
                   forward_backward=per_micro_step_forward_backward)  # the source's division
    assert (_weights(big) - _weights(acc)).abs().max() < 1e-6
    if any(len(set(c)) > 1 for c in counts):  # unequal target counts: dividing by micro-steps must drift
        assert (_weights(big) - _weights(naive)).abs().max() > 1e-5


# ----------------------------------------------------------------------------- LR range test

def test_lr_range_test_finds_a_learning_rate_between_the_extremes_and_leaves_the_model():
    model = _gpt(vocab=30)
    g = torch.Generator().manual_seed(0)
    starts = lambda: torch.randint(0, 30, (8,), generator=g)
    stream = torch.arange(30).repeat(3)  # a periodic stream: learnable in a few steps

    def next_batch(i):
        return {"input_ids": torch.stack([stream[s:s + 16] for s in starts()])}

    before = _weights(model)
    result = lr_range_test(model, next_batch, clm_objective, min_lr=1e-5, max_lr=30.0, steps=60, device="cpu")
    assert torch.equal(before, _weights(model))
    assert len(result.lrs) == len(result.losses) < 60  # it diverged before the last step and stopped
    assert result.lrs[0] == pytest.approx(1e-5) and all(b > a for a, b in zip(result.lrs, result.lrs[1:]))
    assert 1e-5 < result.suggested_lr < 3.0
    assert result.suggested_lr == pytest.approx(result.lr_at_min / 3)
    assert result.stopped_early and result.stop_lr == result.lrs[-1]
    assert min(result.losses) < result.losses[0] - 0.5  # somewhere in the sweep it really learned
    with pytest.raises(ValueError, match="min_lr"):
        lr_range_test(model, next_batch, clm_objective, min_lr=1.0, max_lr=0.1)
    with pytest.raises(TypeError, match="lr_schedule"):
        lr_range_test(model, next_batch, clm_objective, lr_schedule=lambda s: 1.0)


def _synthetic_sweep():
    """A range test's losses, made by hand: flat at 6 for 10 steps, a straight fall of 1/30 nat per
    step to 5.0 at step 39, a plateau alternating 5.01 / 4.99 (steps 40-69) with one lone spike of
    9.0 at step 45 (a bad batch the run recovers from), then a blow-up of +0.3 nat per step."""
    losses = [6.0] * 10 + [6.0 - k / 30 for k in range(1, 31)] + [5.0 + 0.01 * (-1) ** k for k in range(30)]
    losses += [5.0 + 0.3 * k for k in range(1, 11)]
    losses[45] = 9.0
    return losses


def test_range_test_minimum_ignores_a_lone_spike_and_sits_at_the_start_of_the_floor():
    from pretrain_lib.optim.range_test import centred_median, diverged, first_spike, floor_index
    losses = _synthetic_sweep()
    smooth = centred_median(losses, 5)
    assert smooth[45] == pytest.approx(5.01)  # the median of 5 ignores the lone 9.0
    assert first_spike(losses, 5) == 45       # 9.0 - 5.01 > half of the gain 6 - 4.99
    # floor 4.99 (plateau medians), gain 1.01; first median within 5 % of the gain (<= 5.0405):
    # step 38, whose window [5.100, 5.067, 5.033, 5.000, 5.010] has median 5.033 (step 37's is 5.067)
    assert floor_index(losses, 5) == 38
    # stop rule: the lone spike does not stop it; the blow-up does, within a few steps of its start
    stops = [i for i in range(len(losses)) if diverged(losses[:i + 1], 5, 0.5)]
    assert stops and 70 <= stops[0] <= 74, stops[:3]
    assert not any(diverged(losses[:i + 1], 5, 0.5) for i in range(70))
    assert diverged([6.0, 5.0, float("nan")], 5, 0.5)  # a non-finite loss stops at once


def test_per_micro_step_hook_is_the_mean_of_micro_batch_means():
    model = _masked_lm()
    inputs, labels = _mlm_batch(0)
    micro = [{"input_ids": x, "labels": y} for x, y in zip(inputs.split([2, 6]), labels.split([2, 6]))]
    loss, n = per_micro_step_forward_backward(model, micro, labelled_mlm_objective)
    with torch.no_grad():
        expected = sum(labelled_mlm_objective(model, b)[0] for b in micro) / 2
    assert float(n) == 1.0 and float(loss) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="fp32"):
        per_micro_step_forward_backward(model, micro, labelled_mlm_objective, autocast=torch.bfloat16)


# ----------------------------------------------------------------------------- DDP: no_sync on all but the last micro-step

@pytest.mark.xdist_group("torchrun")
def test_ddp_no_sync_accumulation_equals_one_process_and_saves_the_bytes(tmp_path):
    from pretrain_lib.distributed.launch import run_torchrun
    m = run_torchrun("pretrain_lib.distributed.accumulation", args=["--steps", "2", "--micro-steps", "4", "--batch", "16"],
                     run_dir=tmp_path, stream=False, timeout_s=240).metrics
    no_sync, every = m["variants"]["no_sync"], m["variants"]["sync_every_micro_step"]
    assert m["world_size"] == 2 and m["max_abs_diff_vs_single"] <= 1e-5
    assert every["bytes_per_step"] == pytest.approx(4 * no_sync["bytes_per_step"])  # one all-reduce per micro-step
    # no_sync: one all-reduce of every gradient per step (DDP's buckets hold each parameter once, in fp32)
    assert no_sync["bytes_per_step"] == m["param_bytes"]
    assert m["bytes_saved_per_step"] == pytest.approx(3 * no_sync["bytes_per_step"])
    assert no_sync["losses"] == pytest.approx(m["reference_losses"], abs=1e-5)


# ----------------------------------------------------------------------------- the chapter's experiment setup

def test_window_batches_are_a_pure_function_of_seed_and_index():
    from pretrain_lib.optim.experiments import window_batches
    stream = torch.arange(500)
    a, b = window_batches(stream, batch_size=4, seq_len=8, seed=1), window_batches(stream, batch_size=4, seq_len=8, seed=1)
    assert torch.equal(b(7)["input_ids"], a(7)["input_ids"]) and not torch.equal(a(7)["input_ids"], a(8)["input_ids"])
    ids = a(3)["input_ids"]
    assert ids.shape == (4, 8) and torch.equal(ids[:, 1:] - ids[:, :-1], torch.ones(4, 7, dtype=ids.dtype))
    with pytest.raises(ValueError, match="longer than seq_len"):
        window_batches(torch.arange(5), batch_size=1, seq_len=8)


def test_validation_loss_is_the_mean_clm_loss_on_fixed_windows():
    from pretrain_lib.objectives import clm_loss
    from pretrain_lib.optim.experiments import validation_loss_fn
    model = _gpt()
    val = torch.randint(0, 40, (300,), generator=torch.Generator().manual_seed(5))
    eval_fn = validation_loss_fn(val, seq_len=16, n_windows=6, batch_size=4)
    starts = torch.linspace(0, 300 - 16, 6).long()
    windows = torch.stack([val[s:s + 16] for s in starts])
    with torch.no_grad():
        expected = float(clm_loss(model(windows), windows))  # equal windows: mean of means = overall mean
    assert eval_fn(model) == pytest.approx(expected, rel=1e-5) and model.training


def test_newton_schulz_keeps_singular_vectors_and_brings_singular_values_near_one():
    from pretrain_lib.optim.experiments import newton_schulz
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(96, 32, generator=g, dtype=torch.float64))
    B = (u @ torch.diag(torch.logspace(0, -2, 32, dtype=torch.float64)) @ w.T).float()
    O = newton_schulz(B).double()
    sv = torch.linalg.svdvals(O)
    assert 0.5 < sv.min() and sv.max() < 1.3
    polar = u @ w.T                            # the exact orthogonalisation U V^T, from the construction
    cosine = (O * polar).sum() / (O.norm() * polar.norm())
    assert cosine > 0.95
