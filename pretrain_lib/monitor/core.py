"""``Monitor``: a callback of the engine's ``train()`` that records what a pretraining run needs watched.

Per step it only queues tensors (the step's loss and gradient norm, and the per-layer
gradient norms from one fused pass); every ``log_every`` steps it reads all of them back in
**one** host transfer, runs the anomaly checks on every step of the window, and writes one
JSON line (flushed, so ``tail -f`` and :func:`plot_run` can read a run in progress), plus
TensorBoard scalars and a live notebook view when asked.

Steps are counted as the engine's ``state.step``: the number of completed optimiser
steps, so step 1 is the first update (``history.skipped_steps`` is 0-based: step s there is s+1 here).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .detect import AnomalyRules, RollingZScore
from .norms import LayerIndex, full, layer_matrix, local, param_grad_norms
from .peak import mfu as compute_mfu
from .peak import peak_flops_info
from .records import read_jsonl  # noqa: F401  (re-exported: the log's reader beside its writer)

STATE_VERSION = 1


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _jsonable(value: Any) -> Any:
    """Strict JSON: NaN and inf become null (other readers reject Python's ``NaN``)."""
    if isinstance(value, float):
        return _finite_or_none(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _host_value(value: Any) -> Any:
    """A one-element tensor as a Python number (an evaluation may hand one over); anything else as it is."""
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _refuse(unexpected: dict) -> None:
    """``Monitor()`` with keywords it does not take: the old rule keywords get told the new spelling."""
    old = {k: v for k, v in unexpected.items() if k in AnomalyRules.names()}
    if old:
        given = ", ".join(f"{k}={v!r}" for k, v in old.items())
        raise TypeError(f"Monitor() takes the anomaly rules as one argument now: write "
                        f"rules=AnomalyRules({given}) instead of {given} "
                        "(from pretrain_lib.monitor import AnomalyRules)")
    raise TypeError(f"Monitor() got an unexpected keyword argument {next(iter(unexpected))!r}")


def _model_of(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


class Monitor:
    """An engine callback: norms, update ratios, tokens/s, MFU, memory, data wait, anomalies.

    ``jsonl_path``: one JSON line per logged step (None: keep records in memory only, in
    ``.records``). ``log_every``: None follows ``TrainConfig.log_every``. ``rules``: the
    anomaly rules, an :class:`AnomalyRules` (spike band and early rule, exploding and vanishing
    layers, dead learning rate; None: the defaults), e.g. ``rules=AnomalyRules(spike_k=4.0)``.
    ``flops_per_token``: None asks the model (``model.flops_per_token(seq_len)``, the
    library's one FLOP count). ``peak_flops``: None looks the device up
    (:func:`pretrain_lib.monitor.peak_flops`; measured on the CPU).
    ``.anomalies`` lists dicts with ``step``, ``kind``, ``value`` and ``layer`` where it applies.
    At an evaluation, every ``val_*`` figure in ``state.metrics`` (the engine's ``val_loss`` and
    what callbacks listed before the monitor added) goes on that step's line.
    Each record's ``excluded_s`` is the time of its window left out of tokens/s (evaluations,
    log writing and drawing, and blocks run inside :meth:`exclude_time`).
    """

    def __init__(self, jsonl_path: str | Path | None = None, *, log_every: int | None = None,
                 tensorboard_dir: str | Path | None = None, live: bool = False, progress: bool = False,
                 rules: AnomalyRules | None = None, flops_per_token: float | None = None,
                 peak_flops: float | None = None, seq_len: int | None = None, smoothing: float = 0.9,
                 update_ratios: bool = True, live_every: int = 1, live_figure: str = "monitor_dashboard",
                 **unexpected):
        if unexpected:
            _refuse(unexpected)
        if rules is None:
            rules = AnomalyRules()
        if not isinstance(rules, AnomalyRules):
            raise TypeError(f"rules must be an AnomalyRules (or None for the defaults), got {type(rules).__name__}")
        if log_every is not None and (not isinstance(log_every, int) or log_every <= 0):
            raise ValueError(f"log_every must be a positive integer or None, got {log_every!r}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"peak_flops must be positive (FLOP/s) or None, got {peak_flops!r}")
        if flops_per_token is not None and not flops_per_token > 0:
            raise ValueError(f"flops_per_token must be positive or None, got {flops_per_token!r}")
        self.jsonl_path = Path(jsonl_path) if jsonl_path is not None else None
        self.log_every = log_every
        self.tensorboard_dir = tensorboard_dir
        self.live, self.live_every, self.live_figure = live, live_every, live_figure
        self.live_view = None  # the LiveDashboard once training starts with live=True
        self.keep_live_frames = False  # set True to save each redraw as a figure file, also headless
        self.progress = progress
        self.flops_per_token, self.peak_flops, self.peak_source = flops_per_token, peak_flops, None
        if peak_flops is not None:
            self.peak_source = "given"
        self.seq_len = seq_len
        self.rules, self.smoothing = rules, smoothing
        self.update_ratios = update_ratios
        self.loss_spikes = self._detector()
        self.grad_spikes = self._detector()
        self.layer_spikes: dict[str, RollingZScore] = {}
        self.records: list[dict] = []
        self.anomalies: list[dict] = []
        self._ema, self._ema_steps = 0.0, 0
        self._vanishing: set[str] = set()
        self._lr_dead = False
        self._resumed = False
        self._started = False
        self._pending: list[tuple[int, float, Any, torch.Tensor | None]] = []
        self._snapshot: list[torch.Tensor] | None = None
        self._held: dict | None = None
        self._excluded = 0.0  # seconds of the current window that are not training (evaluations, plots)

    # ------------------------------------------------------------------ engine hooks

    def on_step(self, state) -> None:
        if not self._started:
            self._start(state)
        self._write_held()
        result = state.last
        # only one fused norm call per step here; layers and the clip factor are worked out per window
        norms = None if result.skipped else param_grad_norms(self._index)
        self._pending.append((state.step, float(state.lr), result, norms))
        self._t_step_end = time.perf_counter()
        if self._is_logged(state.config, state.step):
            self._log(state)
        elif self._window is None:  # the first window starts after the first step (warm-up left out)
            self._window = (time.perf_counter(), state.tokens_seen, state.data_seconds)
        if self.update_ratios and state.step < state.config.steps and self._is_logged(state.config, state.step + 1):
            self._snapshot = [local(p.detach()).clone() for p in self._index.params]
        if self._bar is not None:
            self._bar.update(1)

    def on_eval(self, state) -> None:
        """Every ``val_*`` figure of this evaluation goes on the step's line: the engine's ``val_loss``
        and those that callbacks listed before the monitor put in ``state.metrics``."""
        values = {k: _host_value(v) for k, v in state.metrics.items() if k.startswith("val_")}
        values.setdefault("val_loss", None)
        self._excluded += time.perf_counter() - self._t_step_end  # eval time is not training throughput
        if self._held is not None and self._held["step"] == state.step:
            self._held.update(values)
            self._write_held()
        else:
            self._emit({"step": state.step, **values})

    def on_end(self, state) -> None:
        if not self._started:
            return
        if self._pending:
            self._log(state)
        self._write_held()
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.live and self.records:
            self.live_view.final(self.records, self.anomalies)
        self._started, self._resumed = False, True  # a later train() call with this monitor appends to its log

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict:
        """Everything the detectors and smoothing carry over, as plain JSON-able values."""
        return {"version": STATE_VERSION, "loss_spikes": self.loss_spikes.state_dict(),
                "grad_spikes": self.grad_spikes.state_dict(),
                "layer_spikes": {k: v.state_dict() for k, v in self.layer_spikes.items()},
                "ema": self._ema, "ema_steps": self._ema_steps, "vanishing": sorted(self._vanishing),
                "lr_dead": self._lr_dead, "anomalies": [dict(a) for a in self.anomalies]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the JSONL file is then appended to, not overwritten."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"monitor state version {state.get('version')!r} is not {STATE_VERSION}")
        self.loss_spikes.load_state_dict(state["loss_spikes"])
        self.grad_spikes.load_state_dict(state["grad_spikes"])
        self.layer_spikes = {}
        for name, s in state["layer_spikes"].items():
            self.layer_spikes[name] = self._detector()
            self.layer_spikes[name].load_state_dict(s)
        self._ema, self._ema_steps = float(state["ema"]), int(state["ema_steps"])
        self._vanishing = set(state["vanishing"])
        self._lr_dead = bool(state["lr_dead"])
        self.anomalies = [dict(a) for a in state["anomalies"]]
        self._resumed = True

    # ------------------------------------------------------------------ other callbacks' time

    @contextlib.contextmanager
    def exclude_time(self):
        """Time spent inside this block is not training time: tokens/s and the data share of
        the current window leave it out (a plot drawn mid-run, a checkpoint written by
        another callback), as they leave out evaluations."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._started:
                self._excluded += time.perf_counter() - start

    # ------------------------------------------------------------------ internals

    def _detector(self) -> RollingZScore:
        return self.rules.detector()

    @staticmethod
    def _spike(step: int, kind: str, value: float, z: float, detector: RollingZScore) -> dict:
        """An anomaly record: ``rule`` is ``"band"`` (with ``z``, in σ above the mean) or ``"early"``
        (with ``ratio``, the value over the median of the few values before it)."""
        found = {"step": step, "kind": kind, "value": value, "z": z, "rule": detector.last_rule}
        if detector.last_rule == "early":
            found["ratio"] = detector.last_ratio
        return found


    def _start(self, state) -> None:
        self._started = True
        model = _model_of(state.model)
        self._index = LayerIndex(model)
        self._device = self._index.params[0].device
        self._layer_matrix = layer_matrix(self._index, self._device)
        self._clip = state.config.grad_clip
        if self.flops_per_token is None:
            count = getattr(model, "flops_per_token", None)
            if count is None:
                warnings.warn("the model has no flops_per_token(seq_len) and none was given: MFU is not logged",
                              stacklevel=3)
            else:
                self.flops_per_token = float(count(self.seq_len))
        if self.peak_flops is None:
            self.peak_flops, self.peak_source = peak_flops_info(self._device, state.config.dtype)
        self._every = self.log_every or state.config.log_every
        self._file = None
        if self.jsonl_path is not None:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.jsonl_path, "a" if self._resumed else "w", encoding="utf-8")
        self._writer = None
        if self.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("tensorboard_dir= needs TensorBoard: pip install -e '.[tensorboard]'") from exc
            self._writer = SummaryWriter(str(self.tensorboard_dir))
        self._bar = None
        if self.progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=state.config.steps, initial=state.step - 1, desc="train", unit="step")
        if self.live:
            from .plot import LiveDashboard
            self.live_view = LiveDashboard(every=self.live_every, figure_name=self.live_figure,
                                           keep_frames=self.keep_live_frames)
        self._window = None
        self._excluded = 0.0
        self._t0 = time.perf_counter()
        self._process = None

    def _is_logged(self, config, step: int) -> bool:
        if step % self._every == 0 or step == config.steps:
            return True
        return bool(config.eval_every) and step % config.eval_every == 0

    def _read_window(self) -> tuple[list[float], list[float], list[list[float]], list[float]]:
        """Everything the window's steps left on the device, in one host transfer.

        Under FSDP the per-parameter norms are of each rank's shard: their squares are summed
        over ranks in one all-reduce per window (every rank logs at the same steps)."""
        n_layers = len(self._index)
        dev = self._device
        losses = torch.stack([local(r.loss).float().to(dev) for _, _, r, _ in self._pending])
        norms = torch.stack([full(r.grad_norm).float().to(dev) for _, _, r, _ in self._pending])
        nan_row = torch.full((len(self._index.params),), float("nan"), device=dev)
        squares = [torch.stack([p if p is not None else nan_row for _, _, _, p in self._pending]).square()]
        if self._snapshot is not None:
            now = [local(p.detach()) for p in self._index.params]
            squares += [torch.stack(torch._foreach_norm(torch._foreach_sub(now, self._snapshot))).float().square(),
                        torch.stack(torch._foreach_norm(self._snapshot)).float().square()]
            self._snapshot = None
        if self._index.sharded:
            flat = torch.cat([s.flatten() for s in squares])
            torch.distributed.all_reduce(flat)
            squares = list(flat.split([s.numel() for s in squares]))
            squares[0] = squares[0].view(len(self._pending), -1)
        layers = (squares[0] @ self._layer_matrix).sqrt()  # (steps, layers)
        if self._clip is not None:  # the grads in place were clipped: undo the clip factor for pre-clip norms
            layers = layers / torch.clamp(self._clip / (norms + 1e-6), max=1.0)[:, None]
        parts = [losses, norms, layers.flatten()]
        if len(squares) == 3:
            delta, weight = ((sq @ self._layer_matrix).sqrt() for sq in squares[1:])
            parts.append(delta / weight.clamp(min=1e-12))
        values = torch.cat(parts).cpu().tolist()  # the monitor's one host read of this window
        k = len(self._pending)
        layer_rows = [values[2 * k + i * n_layers: 2 * k + (i + 1) * n_layers] for i in range(k)]
        ratios = values[2 * k + k * n_layers:]
        return values[:k], values[k:2 * k], layer_rows, ratios

    def _check(self, step: int, lr: float, loss: float, norm: float, layer_row: list[float], skipped: bool) -> None:
        found = []
        if not math.isfinite(loss) or not math.isfinite(norm):
            bad = ("loss", loss) if not math.isfinite(loss) else ("grad_norm", norm)
            found.append({"step": step, "kind": "nonfinite", "value": str(bad[1]), "of": bad[0],
                          "skipped": skipped})
        else:
            self._ema = self.smoothing * self._ema + (1.0 - self.smoothing) * loss
            self._ema_steps += 1
        for kind, detector, value in (("loss_spike", self.loss_spikes, loss),
                                      ("grad_norm_spike", self.grad_spikes, norm)):
            spike, z = detector.update(value)
            if spike:
                found.append(self._spike(step, kind, value, z, detector))
        if math.isfinite(norm):
            for name, value in zip(self._index.names, layer_row):
                if not math.isfinite(value):
                    continue
                detector = self.layer_spikes.get(name) or self.layer_spikes.setdefault(name, self._detector())
                history = list(detector.values)
                spike, z = detector.update(value)
                # a layer "explodes" when it is both far outside its band and several times its usual size:
                # small layers (position embeddings, norms) have narrow bands that noise alone can leave
                if spike and value > self.rules.explode_factor * sum(history) / len(history):
                    found.append({**self._spike(step, "layer_exploding", value, z, detector), "layer": name})
                vanishing = value <= self.rules.vanish_ratio * norm
                if vanishing and name not in self._vanishing:
                    found.append({"step": step, "kind": "layer_vanishing", "layer": name, "value": value,
                                  "share": value / norm if norm > 0 else float("nan")})
                    self._vanishing.add(name)
                elif not vanishing:
                    self._vanishing.discard(name)
        dead = lr <= 0.0 and step > self.rules.warmup_steps
        if dead and not self._lr_dead:
            found.append({"step": step, "kind": "dead_lr", "value": lr})
        self._lr_dead = dead
        self.anomalies.extend(found)
        return found

    def _log(self, state) -> None:
        losses, norms, layer_rows, ratios = self._read_window()
        found = []
        for (step, lr, result, _), loss, norm, row in zip(self._pending, losses, norms, layer_rows):
            found += self._check(step, lr, loss, norm, row, bool(result.skipped))
        step, lr, _, _ = self._pending[-1]
        skipped = sum(bool(r.skipped) for _, _, r, _ in self._pending)
        self._pending = []
        now = time.perf_counter()
        if self._window is None:  # logged at the very first step: time since train() started
            seconds, tokens, data = state.metrics.get("seconds", now - self._t0), state.tokens_seen, state.data_seconds
        else:
            t, tok, dat = self._window
            seconds, tokens, data = now - t - self._excluded, state.tokens_seen - tok, state.data_seconds - dat
        tokens_per_s = tokens / seconds if seconds > 0 and tokens > 0 else None
        flops_per_s = self.flops_per_token * tokens_per_s if self.flops_per_token and tokens_per_s else None
        record = {
            "step": step, "loss": losses[-1],
            "loss_smooth": self._ema / (1.0 - self.smoothing ** self._ema_steps) if self._ema_steps else None,
            "lr": lr, "grad_norm": norms[-1], "grad_norm_max": max((n for n in norms if math.isfinite(n)), default=None),
            "tokens_per_s": tokens_per_s, "flops_per_s": flops_per_s,
            "mfu": compute_mfu(self.flops_per_token, tokens_per_s, self.peak_flops) if flops_per_s else None,
            "tokens_seen": state.tokens_seen, "data_share": data / seconds if seconds > 0 else None,
            "skipped_steps": skipped, "elapsed_s": now - self._t0,
            "excluded_s": self._excluded if self._window is not None else 0.0,
            **self._memory(),
            "layer_grad_norms": dict(zip(self._index.names, layer_rows[-1])),
        }
        if ratios:
            record["layer_update_ratios"] = dict(zip(self._index.names, ratios))
        if not self.records:
            record.update(peak_flops=self.peak_flops, peak_source=self.peak_source,
                          flops_per_token=self.flops_per_token)
        record["anomalies"] = found
        eval_follows = bool(state.config.eval_every) and (step % state.config.eval_every == 0
                                                           or step == state.config.steps)
        if eval_follows:
            self._held = record  # on_eval adds the val_* figures and writes it (or the next hook does)
        else:
            self._emit(record)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{losses[-1]:.3f}",
                                  tok_s=f"{tokens_per_s:,.0f}" if tokens_per_s else "-", refresh=False)
        self._excluded = 0.0
        self._window = (time.perf_counter(), state.tokens_seen, state.data_seconds)

    def _memory(self) -> dict:
        if self._device.type == "cuda":
            return {"mem_allocated_mb": torch.cuda.max_memory_allocated(self._device) / 2 ** 20,
                    "mem_reserved_mb": torch.cuda.memory_reserved(self._device) / 2 ** 20}
        import psutil
        if self._process is None:
            self._process = psutil.Process()
        return {"rss_mb": self._process.memory_info().rss / 2 ** 20}

    def _write_held(self) -> None:
        if self._held is not None:
            record, self._held = self._held, None
            self._emit(record)

    def _emit(self, record: dict) -> None:
        start = time.perf_counter()
        record = _jsonable(record)
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
        if self._writer is not None:
            self._to_tensorboard(record)
        if self.live and "loss" in record:
            self.live_view.update(self.records, self.anomalies)
        self._excluded += time.perf_counter() - start  # writing and drawing the log is not training time

    def _to_tensorboard(self, record: dict) -> None:
        step = record["step"]
        evaluation = [k for k in record if k.startswith("val_")]
        for key in ("loss", "loss_smooth", *evaluation, "lr", "grad_norm", "tokens_per_s", "mfu", "data_share",
                    "rss_mb", "mem_allocated_mb", "mem_reserved_mb"):
            if isinstance(record.get(key), (int, float)) and not isinstance(record[key], bool):
                self._writer.add_scalar(f"train/{key}", record[key], step)
        for group in ("layer_grad_norms", "layer_update_ratios"):
            for name, value in (record.get(group) or {}).items():
                if value is not None:
                    self._writer.add_scalar(f"{group}/{name}", value, step)
        for a in record.get("anomalies") or ():
            self._writer.add_text("anomalies", json.dumps(a), a["step"])
