"""The monitor: fused norms against torch's, host reads, planted faults, sinks, peak FLOP/s, resume."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import REPO
from pretrain_lib.model import GPT, ModelConfig
from pretrain_lib.monitor import (AnomalyRules, Monitor, RollingZScore, check_initial_loss, count_host_reads, datasheet_peak,
                                  grad_norms, LayerIndex, layer_of, mfu, peak_flops, peak_flops_info, plot_run,
                                  read_jsonl, rolling_spikes)
from pretrain_lib.monitor import peak as peak_module
from pretrain_lib.train import clm_objective, train

VOCAB = 40
KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}


def _gpt(seed=0, n_layers=2):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=2, n_layers=n_layers, max_seq_len=16))


def _data(seed=0, rows=256):
    return torch.randint(0, VOCAB, (rows, 16), generator=torch.Generator().manual_seed(seed))


def _batches(data, batch=4):
    rows = data.size(0)
    return lambda i: {"input_ids": data[(i * batch) % rows:(i * batch) % rows + batch]}


def _run(monitor, steps=20, log_every=5, model=None, objective=clm_objective, batches=None, callbacks_before=(),
         **kw):
    model = model if model is not None else _gpt()
    batches = batches if batches is not None else _batches(_data())
    return train(model, batches, objective, steps=steps, log_every=log_every, device="cpu", progress=False,
                 callbacks=[*callbacks_before, monitor], **kw)


def _has_tensorboard():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- norms

def test_layer_grouping():
    assert layer_of("backbone.blocks.3.attn.qkv.weight") == "backbone.blocks.3"
    assert layer_of("module._orig_mod.backbone.tok_emb.weight") == "backbone.tok_emb"
    assert layer_of("bias") == "bias"
    index = LayerIndex(_gpt(n_layers=3))
    assert index.names == ["tok_emb", "pos_emb", "blocks.0", "blocks.1", "blocks.2", "ln_f"]


def test_fused_norms_match_clip_grad_norm_and_vector_norm_by_hand():
    model = _gpt()
    loss, _ = clm_objective(model, {"input_ids": _data()[:4]})
    loss.backward()
    index = LayerIndex(model)
    total, per_layer = grad_norms(index)
    params = [p for p in model.parameters() if p.grad is not None]
    reference = torch.nn.utils.clip_grad_norm_(params, max_norm=float("inf"), foreach=False)
    torch.testing.assert_close(total, reference, rtol=1e-5, atol=0)
    for name, value in zip(index.names, per_layer):
        grads = [p.grad.reshape(-1) for n, p in model.named_parameters() if layer_of(n).endswith(name)]
        by_hand = torch.linalg.vector_norm(torch.cat(grads))
        torch.testing.assert_close(value, by_hand, rtol=1e-5, atol=0)


def test_monitor_reports_pre_clip_layer_norms_under_clipping():
    """The engine clips the grads in place before on_step; the monitor undoes the factor."""
    seen = {}

    class Spy:
        def on_step(self, state):
            if state.step == 3:
                _, post = grad_norms(LayerIndex(state.model))
                seen["post"], seen["pre"] = post.clone(), float(state.last.grad_norm)

    monitor = Monitor(peak_flops=1e12)
    train(_gpt(), _batches(_data()), clm_objective, steps=3, log_every=3, device="cpu", progress=False,
          grad_clip=0.05, callbacks=[Spy(), monitor])
    record = monitor.records[-1]
    assert seen["pre"] > 0.05  # clipping happened
    layers = torch.tensor(list(record["layer_grad_norms"].values()))
    torch.testing.assert_close(layers.square().sum().sqrt(), torch.tensor(seen["pre"]), rtol=1e-4, atol=0)
    torch.testing.assert_close(layers * (0.05 / (seen["pre"] + 1e-6)), seen["post"], rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------- JSONL and host reads

def test_jsonl_lines_parse_and_carry_the_documented_keys(tmp_path):
    path = tmp_path / "run.jsonl"
    monitor = Monitor(path, peak_flops=1e12)
    history = _run(monitor, steps=12, log_every=4, eval_every=6, eval_fn=lambda m: 1.5)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [4, 6, 8, 12]  # eval steps are logged too
    for r in lines:
        assert KEYS <= set(r), set(r)
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    assert [r.get("val_loss") for r in lines] == [None, 1.5, None, 1.5]
    assert lines[-1]["loss"] == pytest.approx(history.losses[-1], rel=1e-6)
    assert lines[-1]["grad_norm"] == pytest.approx(history.grad_norms[-1], rel=1e-6)
    first = lines[0]
    assert first["peak_flops"] == 1e12 and first["flops_per_token"] == _gpt().flops_per_token(None)
    # MFU is model FLOPs per token × tokens/s ÷ peak, from the logged numbers themselves
    assert first["mfu"] == pytest.approx(first["flops_per_token"] * first["tokens_per_s"] / 1e12, rel=1e-9)
    assert read_jsonl(path) == lines


def test_an_evaluation_does_not_repeat_an_earlier_evaluations_val_keys():
    """Two evaluations with no logged step between them: a val_* key that only the first one set
    must not reappear on the second one's line (the engine starts each evaluation's val_* afresh)."""
    class FirstOnly:
        def on_eval(self, state):
            if state.step == 2:
                state.metrics["val_once"] = 7.0

    monitor = Monitor(peak_flops=1e12)
    _run(monitor, steps=6, log_every=8, eval_every=2, eval_fn=lambda m: 1.0, callbacks_before=[FirstOnly()])
    assert [(r["step"], r.get("val_once")) for r in monitor.records] == [(2, 7.0), (4, None), (6, None)]


def test_on_eval_records_every_val_key_the_evaluation_produced(tmp_path):
    """A callback listed before the monitor adds ``val_foo`` (a float, then a one-element tensor):
    the evaluation's line carries it beside ``val_loss``, in JSONL and TensorBoard; other lines do not."""
    class AddFoo:
        def on_eval(self, state):
            value = 10.0 * state.step + 0.5
            state.metrics["val_foo"] = value if state.step < 12 else torch.tensor(value)
            state.metrics["not_val"] = 1.0

    path = tmp_path / "run.jsonl"
    monitor = Monitor(path, peak_flops=1e12, tensorboard_dir=tmp_path / "tb" if _has_tensorboard() else None)
    _run(monitor, steps=12, log_every=4, eval_every=6, eval_fn=lambda m: 1.5, callbacks_before=[AddFoo()])
    lines = read_jsonl(path)
    assert [(r["step"], r.get("val_loss"), r.get("val_foo")) for r in lines] == [
        (4, None, None), (6, 1.5, 60.5), (8, None, None), (12, 1.5, 120.5)]
    assert all("not_val" not in r for r in lines)
    # evaluation steps off the logging grid are logged too, with every val_* figure
    off_grid = Monitor(peak_flops=1e12)
    _run(off_grid, steps=8, log_every=4, eval_every=3, eval_fn=lambda m: 2.0, callbacks_before=[AddFoo()])
    assert [(r["step"], r.get("val_loss"), r.get("val_foo")) for r in off_grid.records] == [
        (3, 2.0, 30.5), (4, None, None), (6, 2.0, 60.5), (8, 2.0, 80.5)]  # the last step evaluates too
    if _has_tensorboard():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tb"))
        events.Reload()
        assert [(e.step, e.value) for e in events.Scalars("train/val_foo")] == [(6, 60.5), (12, 120.5)]


def test_monitor_adds_at_most_one_host_read_per_logged_step():
    def count_reads(callbacks):
        with count_host_reads() as reads:
            train(_gpt(), _batches(_data()), clm_objective, steps=20, log_every=5, device="cpu",
                  progress=False, callbacks=callbacks)
        return reads.count

    bare = count_reads([])
    monitored = count_reads([Monitor(peak_flops=1e12)])
    assert monitored - bare <= 20 // 5, (bare, monitored)
    assert monitored - bare >= 1  # the monitor does read its window back (the count is not vacuous)


# ----------------------------------------------------------------------------- planted faults

def test_healthy_run_raises_no_alarm():
    monitor = Monitor(peak_flops=1e12)
    history = _run(monitor, steps=300, log_every=25, lr=1e-3, batches=_batches(_data(rows=512), batch=8))
    assert history.losses[-1] < history.losses[0]
    assert monitor.anomalies == []


def test_poisoned_batch_detected_at_its_step_and_skipped():
    poisoned_step = 14  # 1-based, the engine's state.step

    def next_batch(i):
        return {"input_ids": _data()[(i * 4) % 256:(i * 4) % 256 + 4],
                "scale": torch.tensor(float("nan") if i == poisoned_step - 1 else 1.0)}

    def objective(model, batch):
        loss, n = clm_objective(model, batch)
        return loss * batch["scale"], n

    monitor = Monitor(peak_flops=1e12)
    history = _run(monitor, steps=30, log_every=10, batches=next_batch, objective=objective,
                   max_nonfinite_steps=1)
    assert history.skipped_steps == [poisoned_step - 1]
    assert [(a["step"], a["kind"], a["skipped"]) for a in monitor.anomalies] == [(poisoned_step, "nonfinite", True)]
    assert monitor.records[1]["skipped_steps"] == 1


def test_exploding_layer_detected_at_its_step_with_its_name():
    bad_step, model = 40, _gpt(n_layers=3)
    calls = {"n": 0}

    def blow_up(grad):  # a hook on one weight of block 1, firing once per backward
        calls["n"] += 1
        return grad * 1e4 if calls["n"] == bad_step else grad

    model.backbone.blocks[1].mlp.up.weight.register_hook(blow_up)
    monitor = Monitor(peak_flops=1e12)
    _run(monitor, steps=60, log_every=20, model=model, lr=1e-3)
    kinds = {(a["step"], a["kind"], a.get("layer")) for a in monitor.anomalies}
    assert (bad_step, "layer_exploding", "blocks.1") in kinds
    assert (bad_step, "grad_norm_spike", None) in kinds
    assert {a["step"] for a in monitor.anomalies} == {bad_step}
    assert {a.get("layer") for a in monitor.anomalies if a["kind"] == "layer_exploding"} == {"blocks.1"}


def test_loss_spike_detected_at_its_step():
    bad_step = 50
    data = _data()
    spike_batch = torch.full((4, 16), 7)  # the same token everywhere: far from anything learned...
    spike_batch[:, 1::2] = 9              # ...and a pattern the model never saw

    def next_batch(i):
        return {"input_ids": spike_batch if i == bad_step - 1 else data[:4]}

    # a falling loss curve widens a long window's band (128 steps from 3.7 to 0.5): a short window
    # compares the spike with the recent plateau, where it stands out by more than 20σ
    monitor = Monitor(peak_flops=1e12, rules=AnomalyRules(spike_window=16))
    _run(monitor, steps=60, log_every=20, batches=next_batch, lr=3e-3)
    assert bad_step in {a["step"] for a in monitor.anomalies if a["kind"] == "loss_spike"}
    assert all(a["step"] == bad_step for a in monitor.anomalies)


def test_dead_learning_rate_is_flagged_once():
    monitor = Monitor(peak_flops=1e12)
    schedule = lambda step: 1e-3 if step < 5 else 0.0  # noqa: E731 (a decay that ends at zero too early)
    _run(monitor, steps=12, log_every=4, lr_schedule=schedule)
    assert [(a["step"], a["kind"]) for a in monitor.anomalies] == [(6, "dead_lr")]


def test_rolling_zscore_by_hand():
    series = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 9.0, 2.0]
    # mean 1.5 and std 0.5 over the first 8: 9 lies 15σ above, 2.0 lies 1σ above
    assert rolling_spikes(series, k=6.0, window=8, min_history=8) == [8]
    detector = RollingZScore(k=6.0, window=8, min_history=8)
    for x in series[:8]:
        spike, z = detector.update(x)
        assert not spike and math.isnan(z)  # no band before min_history values
    assert detector.zscore(9.0) == pytest.approx(15.0)
    with pytest.raises(ValueError, match="window"):
        RollingZScore(window=1)


def test_early_rule_by_hand_and_the_band_alone_is_blind_there():
    # median of the first three values is 2.0, so 9.0 is 4.5 times it: above early_ratio=4, flagged and kept
    # out of the history; 7.9 (3.95 times) is not. The band needs min_history=16 values and sees nothing here.
    series = [2.0, 2.2, 1.8, 9.0, 7.9, 2.1]
    assert rolling_spikes(series, early_ratio=4.0) == [3]
    assert rolling_spikes(series) == []
    detector = RollingZScore(early_ratio=4.0)
    for x in series[:3]:
        assert detector.update(x) == (False, pytest.approx(float("nan"), nan_ok=True))
        assert detector.last_rule is None  # fewer than early_history=3 values: nothing to compare with
    spike, _ = detector.update(9.0)
    assert spike and detector.last_rule == "early" and detector.last_ratio == pytest.approx(4.5)
    assert list(detector.values) == [2.0, 2.2, 1.8]
    for x in [2.0] * 13:
        detector.update(x)
    detector.update(2.0)
    assert detector.last_rule == "band"  # from min_history values on, the band judges
    with pytest.raises(ValueError, match="early_ratio"):
        RollingZScore(early_ratio=0.5)


def test_monitor_early_rule_flags_a_gradient_blow_up_in_the_first_steps():
    bad_step = 6  # long before the band's 16 values

    def run(**kw):
        model, calls = _gpt(), {"n": 0}

        def blow_up(grad):
            calls["n"] += 1
            return grad * 50.0 if calls["n"] == bad_step else grad

        model.backbone.blocks[0].mlp.up.weight.register_hook(blow_up)
        monitor = Monitor(peak_flops=1e12, rules=AnomalyRules(**kw))
        _run(monitor, steps=10, log_every=5, model=model)
        return monitor

    found = [a for a in run().anomalies if a["kind"] == "grad_norm_spike"]
    assert [(a["step"], a["rule"]) for a in found] == [(bad_step, "early")] and found[0]["ratio"] > 4.0
    assert run(spike_early_ratio=None).anomalies == []  # the band alone is blind for its first 16 values


def test_anomaly_rules_validate_and_old_rule_keywords_say_what_to_write():
    assert AnomalyRules() == AnomalyRules(spike_k=6.0, spike_window=128, spike_min_history=16, spike_early_ratio=4.0,
                                          spike_early_history=3, explode_factor=3.0, vanish_ratio=1e-4, warmup_steps=1)
    with pytest.raises(Exception, match="frozen|cannot assign"):
        AnomalyRules().spike_k = 1.0
    for bad, field in ((dict(spike_k=0.0), "spike_k"), (dict(spike_window=1), "spike_window"),
                       (dict(spike_min_history=200), "spike_min_history"), (dict(spike_early_ratio=0.5), "spike_early_ratio"),
                       (dict(spike_early_history=20), "spike_early_history"), (dict(explode_factor=0.0), "explode_factor"),
                       (dict(vanish_ratio=1.0), "vanish_ratio"), (dict(warmup_steps=-1), "warmup_steps")):
        with pytest.raises(ValueError, match=field):
            AnomalyRules(**bad)
    for old in AnomalyRules.names():
        value = getattr(AnomalyRules(), old)
        with pytest.raises(TypeError, match=rf"rules=AnomalyRules\({old}={value!r}\)"):
            Monitor(**{old: value})
    with pytest.raises(TypeError, match=r"rules=AnomalyRules\(spike_k=4.0, warmup_steps=10\)"):
        Monitor("run.jsonl", spike_k=4.0, warmup_steps=10, peak_flops=1e12)
    with pytest.raises(TypeError, match="unexpected keyword argument 'spikes'"):
        Monitor(spikes=4.0)
    with pytest.raises(TypeError, match="AnomalyRules"):
        Monitor(rules={"spike_k": 4.0})


def test_the_rules_reach_every_detector():
    """The learning rate is 0 throughout, so the weights never move and each step's loss and gradients
    are those of one batch times a factor planted by hand: a ±1 % wobble (σ = 0.82 % of the mean), then
    1.5 × at one step, 61σ above the band's mean and under the early rule's 4 × the median. k=4
    flags it on the loss, the global and every layer's norm; k=1000 flags nothing; an explode_factor of
    1.2 (not 3) calls the layers exploding; warmup_steps decides from which step an LR of 0 is dead."""
    bad_step, steps = 30, 34

    def objective(m, batch):
        loss, n = clm_objective(m, batch)
        return loss * batch["scale"], n

    def batches(i):
        return {"input_ids": _data()[:4], "scale": torch.tensor(1.5 if i == bad_step - 1 else 1.0 + 0.01 * (i % 3 - 1))}

    def run(**rules):
        monitor = Monitor(peak_flops=1e12, rules=AnomalyRules(**rules))
        _run(monitor, steps=steps, log_every=steps, objective=objective, batches=batches, lr_schedule=lambda s: 0.0)
        return monitor

    tight = run(spike_k=4.0, warmup_steps=steps)
    layers = set(tight.records[-1]["layer_grad_norms"])
    assert {(a["step"], a["kind"]) for a in tight.anomalies} == {(bad_step, "loss_spike"), (bad_step, "grad_norm_spike")}
    assert {a["rule"] for a in tight.anomalies} == {"band"} and min(a["z"] for a in tight.anomalies) > 50
    exploding = run(spike_k=4.0, explode_factor=1.2, warmup_steps=steps).anomalies
    assert {(a["step"], a["layer"]) for a in exploding if a["kind"] == "layer_exploding"} == {(bad_step, n) for n in layers}
    assert run(spike_k=1000.0, explode_factor=1.2, warmup_steps=steps).anomalies == []
    # warmup_steps=1 (the default): an LR of 0 from step 2 on is dead, flagged once
    assert [(a["step"], a["kind"]) for a in run(spike_k=1000.0).anomalies] == [(2, "dead_lr")]

def test_time_inside_exclude_time_is_left_out_of_tokens_per_second(monkeypatch):
    from pretrain_lib.monitor import core as core_module

    clock = {"t": 0.0}  # a fake clock for the monitor: a step takes 1 s, a mid-run plot 30 s
    monkeypatch.setattr(core_module, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock["t"])}))
    monitor = Monitor(peak_flops=1e12)

    class Tick:
        def on_step(self, state):
            clock["t"] += 1.0

    class PlotMidRun:
        def on_step(self, state):
            if state.step == 7:
                with monitor.exclude_time():
                    clock["t"] += 30.0

    train(_gpt(), _batches(_data()), clm_objective, steps=10, log_every=5, device="cpu", progress=False,
          callbacks=[Tick(), monitor, PlotMidRun()])
    # 4 rows of 16 tokens per step, 1 s per step: 64 tokens/s in both windows, the 30 s plot left out
    assert [r["tokens_per_s"] for r in monitor.records] == pytest.approx([64.0, 64.0])
    assert [r["excluded_s"] for r in monitor.records] == pytest.approx([0.0, 30.0])


def test_an_old_state_without_the_early_rule_still_loads():
    saved = Monitor().state_dict()
    for key in ("loss_spikes", "grad_spikes"):
        for field in ("early_ratio", "early_history"):
            del saved[key][field]
    restored = Monitor(rules=AnomalyRules(spike_early_ratio=5.0))
    restored.load_state_dict(saved)
    assert restored.grad_spikes.early_ratio == 5.0


# ----------------------------------------------------------------------------- update ratios, sinks, resume

def test_update_to_weight_ratio_matches_the_weights_by_hand():
    kept = {}

    class Keep:
        def on_step(self, state):
            if state.step in (4, 5):
                kept[state.step] = [p.detach().clone() for p in state.model.backbone.blocks[0].parameters()]

    monitor = Monitor(peak_flops=1e12)
    train(_gpt(), _batches(_data()), clm_objective, steps=5, log_every=5, device="cpu", progress=False,
          callbacks=[Keep(), monitor])
    delta = torch.cat([(b - a).reshape(-1) for a, b in zip(kept[4], kept[5])])
    weight = torch.cat([a.reshape(-1) for a in kept[4]])
    expected = float(torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(weight))
    assert monitor.records[-1]["layer_update_ratios"]["blocks.0"] == pytest.approx(expected, rel=1e-4)


def test_state_dict_is_json_and_a_restored_monitor_appends(tmp_path):
    class StopAt:
        def on_step(self, state):
            state.stop = state.step == 15

    path = tmp_path / "run.jsonl"
    first = Monitor(path, peak_flops=1e12)
    train(_gpt(), _batches(_data()), clm_objective, steps=30, log_every=5, device="cpu", progress=False,
          callbacks=[first, StopAt()])
    saved = json.loads(json.dumps(first.state_dict()))  # plain JSON survives the round trip
    assert len(saved["loss_spikes"]["values"]) == 15 and saved["ema_steps"] == 15
    second = Monitor(path, peak_flops=1e12)
    second.load_state_dict(saved)
    assert second.state_dict() == saved
    _run(second, steps=5, log_every=5)
    assert [r["step"] for r in read_jsonl(path)] == [5, 10, 15, 5]  # appended, not overwritten
    assert second.state_dict()["ema_steps"] == 20
    with pytest.raises(ValueError, match="version"):
        Monitor().load_state_dict({**saved, "version": 99})


def test_tensorboard_event_file_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = Monitor(tensorboard_dir=tmp_path / "tb", peak_flops=1e12)
    _run(monitor, steps=10, log_every=5)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [5, 10]
    assert losses[-1].value == pytest.approx(monitor.records[-1]["loss"], rel=1e-6)
    assert "layer_grad_norms/blocks.0" in events.Tags()["scalars"]


def test_plot_run_draws_a_running_log(tmp_path):
    path = tmp_path / "run.jsonl"
    _run(Monitor(path, peak_flops=1e12), steps=10, log_every=5)
    with open(path, "a") as f:
        f.write('{"step": 15, "loss"')  # a line still being written
    fig = plot_run(path)
    assert len(fig.axes) == 6 and fig.axes[0].get_title() == "Training loss"
    norm_panel = fig.axes[2]
    labels = [line.get_label() for line in norm_panel.get_lines()]
    assert norm_panel.get_title() == "Global gradient norm" and "max over the window's steps" in labels
    window_max = norm_panel.get_lines()[labels.index("max over the window's steps")].get_ydata()
    assert list(window_max) == pytest.approx([r["grad_norm_max"] for r in read_jsonl(path)])


# ----------------------------------------------------------------------------- peak FLOP/s, MFU, sanity

def test_peak_flops_table_and_never_a_silent_default(monkeypatch):
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312e12
    assert datasheet_peak("NVIDIA H100 80GB HBM3", torch.bfloat16)[0] == 989e12
    assert datasheet_peak("NVIDIA H100 PCIe", "bf16")[0] == 756e12
    assert datasheet_peak("NVIDIA H200", "bf16")[0] == 989e12
    assert datasheet_peak("NVIDIA B200", "bf16")[0] == 2.25e15
    assert datasheet_peak("NVIDIA L40S", "bf16")[0] == 362e12
    assert datasheet_peak("Some Future GPU", "bf16") is None
    with pytest.raises(ValueError, match="no peak FLOP/s known"):
        peak_flops("meta", "fp32")
    with pytest.raises(ValueError, match="dtype"):
        peak_flops("cpu", "int8")
    calls = []
    monkeypatch.setattr(peak_module, "_MEASURED", {})
    real = peak_module.measure_peak_flops

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, size=128, repeats=2, **{k: v for k, v in kwargs.items() if k not in ("size",)})
    monkeypatch.setattr(peak_module, "measure_peak_flops", spy)
    value, source = peak_flops_info("cpu", "fp32")
    assert value > 1e6 and source.startswith("measured") and len(calls) == 1


def test_measured_probe_is_cached():
    first = peak_module.measure_peak_flops("cpu", "fp32", size=64, repeats=1, cache=True)
    assert peak_module.measure_peak_flops("cpu", "fp32", size=64, repeats=1) == first


def test_mfu_by_hand_and_bad_input():
    assert mfu(6e9, 1000.0, 12e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        mfu(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="peak_flops"):
        Monitor(peak_flops=-1.0)


def test_initial_loss_is_log_vocab_for_the_course_init():
    report = check_initial_loss(_gpt(), {"input_ids": _data()[:8]}, clm_objective, VOCAB)
    assert report["expected"] == pytest.approx(math.log(VOCAB))
    assert report["ok"], report


def test_vanishing_layer_flagged_once_at_its_step():
    from_step, model = 12, _gpt()
    calls = {"n": 0}

    def silence(grad):  # from step 12 on, the position embedding gets no gradient (a detached branch)
        calls["n"] += 1
        return grad * 0.0 if calls["n"] >= from_step else grad

    model.backbone.pos_emb.weight.register_hook(silence)
    monitor = Monitor(peak_flops=1e12)
    _run(monitor, steps=20, log_every=5, model=model)
    assert [(a["step"], a["kind"], a["layer"]) for a in monitor.anomalies] == [(from_step, "layer_vanishing", "pos_emb")]


def test_source_style_norm_and_the_read_counter():
    from pretrain_lib.monitor import count_host_reads, source_style_grad_norm

    model = _gpt()
    clm_objective(model, {"input_ids": _data()[:4]})[0].backward()
    params = [p for p in model.parameters() if p.grad is not None]
    reference = float(torch.nn.utils.clip_grad_norm_(params, max_norm=float("inf")))
    with count_host_reads() as reads:
        value = source_style_grad_norm(model)
    assert value == pytest.approx(reference, rel=1e-5)
    assert reads.count == len(params)  # one .item() per parameter tensor: the pitfall, counted
    with count_host_reads() as after:
        pass
    assert after.count == 0 and "wrapper" not in torch.Tensor.item.__qualname__  # the patches are undone
    with count_host_reads() as none:
        grad_norms(LayerIndex(model))
    assert none.count == 0


def test_grad_norm_max_covers_every_step_of_the_window():
    monitor = Monitor(peak_flops=1e12)
    history = _run(monitor, steps=10, log_every=5)
    assert [r["grad_norm_max"] for r in monitor.records] == pytest.approx(
        [max(history.grad_norms[:5]), max(history.grad_norms[5:])], rel=1e-6)


def test_headless_live_view_writes_the_final_dashboard(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_HEADLESS", "1")
    monkeypatch.setenv("COURSE_FIGURE_DIR", str(tmp_path))
    monitor = Monitor(live=True, live_figure="final_view", peak_flops=1e12)
    _run(monitor, steps=10, log_every=5)
    assert monitor.live_view.saved == tmp_path / "final_view.png" and monitor.live_view.saved.stat().st_size > 0


def test_headless_live_view_keeps_a_frame_at_every_redraw_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_HEADLESS", "1")
    monkeypatch.setenv("COURSE_FIGURE_DIR", str(tmp_path))
    monitor = Monitor(live=True, live_every=2, live_figure="view", peak_flops=1e12)
    monitor.keep_live_frames = True
    _run(monitor, steps=12, log_every=2)   # 6 logged steps: redraws at the 2nd, 4th and 6th
    view = monitor.live_view
    assert view.updates == 6 and view.redraws == 3
    assert [f.name for f in view.frames] == ["view_step4.png", "view_step8.png", "view_step12.png"]
    assert all(f.stat().st_size > 0 for f in view.frames)


def test_headless_live_view_draws_nothing_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_HEADLESS", "1")
    monkeypatch.setenv("COURSE_FIGURE_DIR", str(tmp_path))
    monitor = Monitor(live=True, live_every=2, live_figure="view", peak_flops=1e12)
    _run(monitor, steps=12, log_every=2)
    assert monitor.live_view.redraws == 0 and monitor.live_view.frames == []
    assert sorted(f.name for f in tmp_path.iterdir()) == ["view.png"]


def test_a_monitor_reused_for_a_second_run_appends(tmp_path):
    path = tmp_path / "run.jsonl"
    monitor = Monitor(path, peak_flops=1e12)
    _run(monitor, steps=5, log_every=5)
    _run(monitor, steps=5, log_every=5)
    assert [r["step"] for r in read_jsonl(path)] == [5, 5]


def test_overfit_check_passes_for_the_course_gpt_and_fails_when_nothing_learns():
    from pretrain_lib.monitor import check_overfits_one_batch

    batch = {"input_ids": _data()[:4]}
    assert check_overfits_one_batch(_gpt(), batch, clm_objective, steps=60, lr=1e-2, device="cpu")["ok"]
    stuck = check_overfits_one_batch(_gpt(), batch, clm_objective, steps=10, lr=1e-7, device="cpu")
    assert not stuck["ok"] and stuck["final"] == pytest.approx(stuck["initial"], abs=0.05)


def test_monitor_log_every_is_independent_of_the_engine():
    monitor = Monitor(log_every=3, peak_flops=1e12)
    history = _run(monitor, steps=10, log_every=5)
    assert [r["step"] for r in monitor.records] == [3, 6, 9, 10]
    assert [r["loss"] for r in monitor.records] == pytest.approx([history.losses[i - 1] for i in (3, 6, 9, 10)],
                                                                 rel=1e-6)


_FSDP_SCRIPT = '''
import json, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from pretrain_lib.model import GPT, ModelConfig
from pretrain_lib.train import train_step, clm_objective, TrainConfig, TrainState, TrainHistory
from pretrain_lib.optim import build_optimizer
from pretrain_lib.monitor import Monitor
from pretrain_lib.distributed.strategies import apply_fsdp
from pretrain_lib.distributed.metrics import write_metrics


def run(sharded):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, d_model=32, n_heads=2, n_layers=2, max_seq_len=16))
    if sharded:
        apply_fsdp(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    opt = build_optimizer(model, lr=1e-2)
    data = torch.randint(0, 40, (64, 16), generator=torch.Generator().manual_seed(0))
    monitor = Monitor(peak_flops=1e12, flops_per_token=1.0)
    state = TrainState(step=0, model=model, optimizer=opt, config=TrainConfig(steps=6, log_every=3, grad_clip=0.5),
                       batches=None, history=TrainHistory())
    for step in range(6):  # the engine's step, driven by hand: every rank trains on the same batch
        batch = {"input_ids": data[step * 4:step * 4 + 4]}
        state.last = train_step(model, [batch], clm_objective, opt, grad_clip=0.5, dp_group=True if sharded else None)
        state.step, state.tokens_seen, state.lr = step + 1, state.tokens_seen + 64, 1e-2
        monitor.on_step(state)
    monitor.on_end(state)
    return monitor.records


dist.init_process_group("gloo")
sharded = run(True)
if dist.get_rank() == 0:
    single = run(False)
    pairs = [(a[key][name], b[key][name]) for a, b in zip(sharded, single)
             for key in ("layer_grad_norms", "layer_update_ratios") for name in b[key]]
    write_metrics(sys.argv[sys.argv.index("--out") + 1], {"pairs": pairs, "steps": [r["step"] for r in sharded]})
dist.destroy_process_group()
'''


@pytest.mark.distributed
@pytest.mark.xdist_group("torchrun")
def test_fsdp_shard_norms_equal_the_single_process_norms(tmp_path):
    """Under FSDP2 each rank holds shards: the monitor sums squared shard norms over ranks."""
    import os

    from pretrain_lib.distributed.launch import run_torchrun

    (tmp_path / "fsdp_monitor.py").write_text(_FSDP_SCRIPT)
    result = run_torchrun("fsdp_monitor", run_dir=tmp_path / "run", stream=False, timeout_s=300,
                          env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}).metrics
    assert result["steps"] == [3, 6] and len(result["pairs"]) == 2 * 2 * 5
    for sharded, single in result["pairs"]:
        assert sharded == pytest.approx(single, rel=1e-5)
