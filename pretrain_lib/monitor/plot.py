"""The standard dashboard of a run (loss, LR, gradient norm at the logged step and its maximum over
each logged window, tokens/s, MFU, anomalies marked),
drawn from a monitor's records or its JSONL file, and the live notebook view built on it."""
from __future__ import annotations

from pathlib import Path

from ..utils import is_headless, save_figure
from .records import read_jsonl

_PANELS = [("loss", "loss (nats/token)", "Training loss"), ("lr", "learning rate", "Learning rate"),
           ("grad_norm", "L2 norm (pre-clip)", "Global gradient norm"),
           ("tokens_per_s", "tokens / s", "Throughput"), ("mfu", "MFU (%)", "Model FLOPs utilisation"),
           ("data_share", "share of step time (%)", "Waiting for data")]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_records(records: list[dict], anomalies: list[dict] | None = None, *, title: str = "Training run"):
    """A 2×3 dashboard figure of monitor records; anomalies are marked on the loss and norm panels."""
    import matplotlib.pyplot as plt

    if anomalies is None:
        anomalies = [a for r in records for a in (r.get("anomalies") or ())]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, ylabel, name) in zip(axes.flat, _PANELS):
        steps, values = _series(records, key)
        if key in ("mfu", "data_share"):
            values = [100.0 * v for v in values]
        ax.plot(steps, values, lw=1.2, label="at the logged step" if key == "grad_norm" else key)
        if key == "grad_norm":
            # the logged value is one step in log_every: a spike between two logged steps only shows in the
            # window's maximum, which the monitor computes over every step it read back
            s, v = _series(records, "grad_norm_max")
            ax.plot(s, v, lw=1.2, ls="--", color="tab:orange", label="max over the window's steps")
            values = values + v
        if key == "loss":
            s, v = _series(records, "loss_smooth")
            ax.plot(s, v, lw=1.5, label="smoothed")
            s, v = _series(records, "val_loss")
            if s:
                ax.plot(s, v, "o-", ms=3, label="validation")
            ax.legend(fontsize=8)
        if key in ("loss", "grad_norm"):
            marked = sorted({a["step"] for a in anomalies})
            for i, step in enumerate(marked):
                ax.axvline(step, color="red", alpha=0.35, lw=1, label="anomaly" if i == 0 and key == "grad_norm"
                           else None)
            if key == "grad_norm" and values and min(values) > 0:
                ax.set_yscale("log")
            if key == "grad_norm":
                ax.legend(fontsize=8)
        ax.set_title(name)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_run(jsonl_path: str | Path, *, title: str | None = None, save_as: str | None = None):
    """The dashboard of a finished or running log (a half-written last line is skipped).
    ``save_as``: also write the figure with :func:`pretrain_lib.utils.save_figure`."""
    records = read_jsonl(jsonl_path)
    if not records:
        raise ValueError(f"{jsonl_path} holds no monitor records yet")
    fig = plot_records(records, title=title or f"Run {Path(jsonl_path).name}")
    if save_as is not None:
        save_figure(fig, save_as)
    return fig


class LiveDashboard:
    """Redraws the dashboard in a notebook every ``every`` logged steps (ipywidgets output
    area); when headless (papermill, CI) it draws nothing live and writes a static figure
    at the end instead, since nobody is watching and ``plt.show()`` would do nothing.
    With ``keep_frames=True`` every redraw is also saved as ``<figure_name>_step<N>.png``
    (listed in ``frames``), headless or not, so a run without a screen still shows what the
    live view drew; ``redraws`` counts the redraw points either way."""

    def __init__(self, *, every: int = 1, figure_name: str = "monitor_dashboard", keep_frames: bool = False):
        if not isinstance(every, int) or every <= 0:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every, self.figure_name, self.keep_frames = every, figure_name, keep_frames
        self.headless = is_headless()
        self.updates = 0
        self.redraws = 0
        self.frames: list[Path] = []
        self.saved: Path | None = None
        self._out = None
        if not self.headless:
            import ipywidgets
            from IPython.display import display
            self._out = ipywidgets.Output()
            display(self._out)

    def update(self, records: list[dict], anomalies: list[dict]) -> None:
        self.updates += 1
        if self.updates % self.every or (self.headless and not self.keep_frames):
            return
        import matplotlib.pyplot as plt

        self.redraws += 1
        step = records[-1]["step"]
        fig = plot_records(records, anomalies, title=f"Live: step {step}")
        if self.keep_frames:
            self.frames.append(save_figure(fig, f"{self.figure_name}_step{step}"))
        if not self.headless:
            from IPython.display import clear_output, display
            with self._out:
                clear_output(wait=True)
                display(fig)
        plt.close(fig)

    def final(self, records: list[dict], anomalies: list[dict]) -> Path:
        """Write the last dashboard to ``<figure_dir>/<figure_name>.png`` (and return its path)."""
        import matplotlib.pyplot as plt

        fig = plot_records(records, anomalies, title=f"Run at step {records[-1]['step']}")
        self.saved = save_figure(fig, self.figure_name)
        plt.close(fig)
        return self.saved
