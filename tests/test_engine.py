"""The training engine: token-normalised accumulation, no_sync, schedules, callbacks, host reads."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from pretrain_lib.model import GPT, MaskedLM, ModelConfig
from pretrain_lib.monitor import count_host_reads
from pretrain_lib.objectives import IGNORE_INDEX
from pretrain_lib.optim import build_optimizer
from pretrain_lib.train import TrainConfig, clm_objective, mlm_objective, train, train_step


def _gpt(seed=0, vocab=40):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=vocab, d_model=32, n_heads=2, n_layers=2, max_seq_len=16))


def _weights(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _padding_objective(model, batch):
    """CLM where targets equal to 0 (padding) are ignored: micro-batches then hold different
    numbers of targets, the case where dividing by the number of micro-steps is wrong."""
    ids = batch["input_ids"]
    targets = ids[:, 1:].masked_fill(ids[:, 1:] == 0, IGNORE_INDEX)
    logits = model(ids)[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX)
    return loss, (targets != IGNORE_INDEX).sum()


def _ragged_rows(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (6, 16), generator=g)
    for row, keep in enumerate([16, 3, 9, 16, 5, 12]):  # very different numbers of real tokens
        ids[row, keep:] = 0
    return ids


@pytest.mark.parametrize("split", [[3, 3], [1, 5], [2, 1, 3]])
def test_accumulation_equals_one_large_batch(split):
    # eps=1e-6: the key bias has a true gradient of exactly 0 (softmax ignores a constant
    # added to every score), so both runs see rounding noise near 1e-13 there, which Adam
    # with eps=1e-8 would blow up to steps of size lr. The gradients themselves agree to 1e-8.
    big, acc = _gpt(), _gpt()
    opt_big = build_optimizer(big, lr=1e-3, weight_decay=0.1, eps=1e-6)
    opt_acc = build_optimizer(acc, lr=1e-3, weight_decay=0.1, eps=1e-6)
    for step in range(4):
        ids = _ragged_rows(step)
        loss_big, norm_big = train_step(big, [{"input_ids": ids}], _padding_objective, opt_big, grad_clip=1.0)
        chunks = list(torch.split(ids, split))
        loss_acc, norm_acc = train_step(acc, [{"input_ids": c} for c in chunks], _padding_objective, opt_acc,
                                        grad_clip=1.0)
        assert torch.allclose(loss_big, loss_acc, atol=1e-6)
        assert torch.allclose(norm_big, norm_acc, rtol=1e-5)
    assert (_weights(big) - _weights(acc)).abs().max() < 1e-6


def test_dividing_by_micro_steps_is_not_the_large_batch():
    """The reference above is not vacuous: the source's per-micro-step division differs."""
    model = _gpt()
    ids = _ragged_rows(0)
    chunks = [ids[:1], ids[1:]]
    with torch.no_grad():
        full, _ = _padding_objective(model, {"input_ids": ids})
        naive = sum(_padding_objective(model, {"input_ids": c})[0] for c in chunks) / len(chunks)
    assert abs(float(full) - float(naive)) > 1e-3


def test_step_result_is_tensors_and_loss_matches_forward():
    model = _gpt()
    ids = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = clm_objective(model, {"input_ids": ids})
    result = train_step(model, [{"input_ids": ids}], clm_objective, build_optimizer(model, lr=1e-3))
    loss, norm = result
    assert isinstance(loss, torch.Tensor) and isinstance(norm, torch.Tensor) and loss.dim() == 0
    assert abs(float(loss) - float(expected)) < 1e-6
    assert int(result.n_targets) == 4 * 15


def test_grad_norm_is_pre_clip_and_clipping_applies():
    model = _gpt()
    ids = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(2))
    reference = _gpt()
    clm_objective(reference, {"input_ids": ids})[0].backward()
    by_hand = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in reference.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = _weights(model)
    _, norm = train_step(model, [{"input_ids": ids}], clm_objective, opt, grad_clip=1e-3)
    assert abs(float(norm) - by_hand) / by_hand < 1e-5
    moved = (_weights(model) - before).norm()  # SGD with lr 1: the update is the clipped gradient
    assert abs(float(moved) - 1e-3) < 1e-6


class _FakeDDP(torch.nn.Module):
    """Records whether each backward ran inside no_sync (as DDP's context manager would)."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.inside = False
        self.calls = []

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def forward(self, *args):
        self.calls.append(self.inside)
        return self.module(*args)


def test_no_sync_on_every_micro_step_but_the_last():
    model = _FakeDDP(_gpt())
    ids = torch.randint(0, 40, (8, 16), generator=torch.Generator().manual_seed(3))
    train_step(model, [{"input_ids": c} for c in ids.chunk(4)], clm_objective, build_optimizer(model, lr=1e-3))
    assert model.calls == [True, True, True, False]


def test_schedule_sets_every_group_and_history_records_it():
    model = _gpt()
    data = torch.randint(0, 40, (2, 16))
    lrs = [1e-3 * (s + 1) for s in range(5)]
    history = train(model, lambda i: {"input_ids": data}, clm_objective, steps=5, lr=1e-3,
                    lr_schedule=lambda s: lrs[s], progress=False, device="cpu", log_every=2)
    assert history.lrs == lrs
    assert len(history.losses) == len(history.grad_norms) == 5


def test_iterable_batches_callbacks_and_stop():
    seen = []

    class Recorder:
        def on_step(self, state):
            seen.append(("step", state.step, dict(state.metrics)))
            if state.step == 4:
                state.stop = True

        def on_end(self, state):
            seen.append(("end", state.step, None))

    data = [{"input_ids": torch.randint(0, 40, (2, 16))} for _ in range(10)]
    history = train(_gpt(), data, clm_objective, TrainConfig(steps=10, log_every=2, device="cpu"),
                    callbacks=[Recorder()], progress=False)
    assert len(history.losses) == 4
    assert [s for kind, s, _ in seen] == [1, 2, 3, 4, 4]
    assert seen[1][2]["step"] == 2 and "loss" in seen[1][2]


def test_iterable_that_runs_out_says_so():
    data = [{"input_ids": torch.randint(0, 40, (2, 16))}]
    with pytest.raises(RuntimeError, match="ran out"):
        train(_gpt(), data, clm_objective, steps=3, progress=False, device="cpu")


def test_bad_settings_are_named():
    with pytest.raises(TypeError, match="unknown settings.*'stepz'"):
        train(_gpt(), lambda i: {}, clm_objective, stepz=3)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="fp8")
    with pytest.raises(ValueError, match="fp16"):
        train(_gpt(), lambda i: {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, clm_objective,
              steps=1, dtype="fp16", device="cpu", progress=False)
    with pytest.raises(ValueError, match="token ids"):
        train(_gpt(), lambda i: {"input_ids": torch.full((1, 4), 99)}, clm_objective, steps=1,
              device="cpu", progress=False)


def test_nonfinite_loss_is_reported_with_its_step():
    model = _gpt()

    def next_batch(i):
        return {"input_ids": torch.randint(0, 40, (2, 16)), "poison": torch.tensor(float("nan") if i == 3 else 1.0)}

    def objective_with_step(m, batch):
        loss, n = clm_objective(m, batch)
        return loss * batch["poison"], n

    with pytest.raises(FloatingPointError, match="at step 3"):
        train(model, next_batch, objective_with_step, steps=6, log_every=5, device="cpu", progress=False)


def test_at_most_one_host_read_per_logged_step():
    """Count reads of tensor values made by the engine, the objective and the model.

    Reads inside torch itself are not counted: the for-each AdamW reads its step counters,
    which live on the host by design (on CUDA the fused kernel reads none)."""
    model = _gpt()
    data = torch.randint(0, 40, (64, 16), generator=torch.Generator().manual_seed(0))
    mlm_model = MaskedLM(ModelConfig(vocab_size=40, d_model=32, n_heads=2, n_layers=1, max_seq_len=16,
                                     causal=False))
    mlm = mlm_objective(mask_token_id=1, vocab_size=40, special_token_ids=[0, 1],
                        generator=torch.Generator().manual_seed(0))
    steps, log_every = 20, 5
    with count_host_reads() as reads:
        train(model, lambda i: {"input_ids": data[(i * 4) % 64:(i * 4) % 64 + 4]}, clm_objective, steps=steps,
              log_every=log_every, grad_accum_steps=2, device="cpu", progress=False)
        train(mlm_model, lambda i: {"input_ids": data[:4]}, mlm, steps=steps, log_every=log_every,
              device="cpu", progress=False)
    assert reads.count <= 2 * steps // log_every, reads.calls


def test_generate_greedy_is_deterministic_and_respects_length():
    model = _gpt().eval()
    prompt = torch.tensor([[1, 2, 3]])
    a = model.generate(prompt, 10, temperature=0)
    b = model.generate(prompt, 10, temperature=0)
    assert a.shape == (1, 13) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    # greedy picks the argmax of the model's own next-token logits, one step at a time
    ids = prompt
    for _ in range(10):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids, a)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1 = model.generate(prompt, 20, temperature=1.0, top_k=3, generator=g1)
    s2 = model.generate(prompt, 20, temperature=1.0, top_k=3, generator=g2)
    assert torch.equal(s1, s2) and s1.max() < 40
    long = model.generate(torch.randint(0, 40, (1, 15)), 5, temperature=0)  # crosses max_seq_len=16
    assert long.shape == (1, 20)
    with pytest.raises(ValueError, match="token ids"):
        model.generate(torch.tensor([[41]]), 1)


def test_causal_padding_mask_equals_running_the_unpadded_prefix():
    model = _gpt().eval()
    ids = torch.randint(1, 40, (1, 10), generator=torch.Generator().manual_seed(7))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).bool()
    with torch.no_grad():
        alone = model(ids)
        with_mask = model(padded, mask)[:, :10]
        without_mask = model(padded)[:, :10]
    assert (alone - with_mask).abs().max() < 1e-5
    # causal attention alone already hides later padding from earlier positions
    assert (alone - without_mask).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_bf16_and_compile():
    model = GPT(ModelConfig(vocab_size=64, d_model=64, n_heads=4, n_layers=2, max_seq_len=32))
    data = torch.arange(64 * 33) % 64
    history = train(model, lambda i: {"input_ids": data[:32 * 8].view(8, 32)}, clm_objective, steps=30,
                    lr=3e-3, dtype="bf16", compile=True, device="cuda", progress=False)
    assert history.losses[-1] < history.losses[0]


def test_poisoned_batch_is_skipped_and_weights_unchanged():
    model = _gpt()
    snapshots = {}

    class Snapshot:
        def on_step(self, state):
            snapshots[state.step] = _weights(state.model).clone()

    def next_batch(i):
        return {"input_ids": torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(i)),
                "poison": torch.tensor(float("nan") if i == 3 else 1.0)}

    def objective(m, batch):
        loss, n = clm_objective(m, batch)
        return loss * batch["poison"], n

    history = train(model, next_batch, objective, steps=6, log_every=3, max_nonfinite_steps=2,
                    callbacks=[Snapshot()], device="cpu", progress=False)
    assert history.skipped_steps == [3]
    assert torch.equal(snapshots[3], snapshots[4])          # step 3 (0-based) left the weights alone
    assert not torch.equal(snapshots[4], snapshots[5])      # and training went on
    assert math.isnan(history.losses[3]) and all(math.isfinite(x) for i, x in enumerate(history.losses) if i != 3)

    def always_nan(m, batch):
        loss, n = clm_objective(m, batch)
        return loss * float("nan"), n

    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row"):
        train(_gpt(), next_batch, always_nan, steps=6, max_nonfinite_steps=2, device="cpu", progress=False)
