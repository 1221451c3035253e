"""JupyterLab in a real browser: a chapter notebook opened, run and explored in headless Chromium.

`make lab` is where students work, so this test does what a student does there: start JupyterLab,
open 4.4 (the compute-optimal explorer), run all cells, see the printed results and a matplotlib
figure, and move the explorer's controls. It checks that the ipywidgets explorer is live (the
labextension rendered it, the kernel answers a changed control with new numbers and a new figure)
rather than the static text a missing labextension leaves, and that every figure it draws has ink.
Screenshots (and the explorer's figures as PNG files) go to the test's tmp dir and to
build/lab_screenshots/ for a person to look at.

JupyterLab runs with comms over kernel subshells disabled (tests/lab_session.py says why: with them, the
explorer's figures came out blank in most runs); a student's `make lab` needs the same setting.
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import time

import pytest

from conftest import REPO
from lab_session import LabPage, LabServer, lab_missing
from pretrain_lib.site.browser import find_chromium

CHROMIUM = find_chromium()
LAB_MISSING = lab_missing()
NOTEBOOK = REPO / "chapters" / "04_scaling" / "04_compute_optimal_explorer.ipynb"
SCREENSHOTS = REPO / "build" / "lab_screenshots"
# generous: a loaded 2-core machine starts JupyterLab and a kernel importing torch in tens of seconds
SERVER_START_S, NOTEBOOK_READY_S, RUN_ALL_S, WIDGET_REPLY_S = 120, 120, 180, 60

# what the open notebook shows: prompts, outputs (model and DOM), images and the explorer's controls
_STATE = r"""
(() => {
  const panel = window.jupyterapp && jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return JSON.stringify({ready: false});
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = panel.content.widgets.filter(c => c.model.type === 'code');
  const errors = [];
  cells.forEach((c, i) => {
    for (let j = 0; j < c.model.outputs.length; j++) {
      const o = c.model.outputs.get(j).toJSON();
      if (o.output_type === 'error') errors.push(`code cell ${i + 1}: ${o.ename}: ${o.evalue}`);
    }
  });
  const explorer = panel.node.querySelector('.widget-interact');
  const out = explorer && explorer.querySelector('.widget-output');
  const img = out && out.querySelector('img');
  return JSON.stringify({
    ready: panel.context.isReady && cells.length > 0,
    path: panel.context.path,
    kernel: kernel ? kernel.status : 'none',
    prompts: cells.map(c => (c.node.querySelector('.jp-InputPrompt') || {}).textContent || ''),
    errors,
    text: [...panel.node.querySelectorAll('.jp-OutputArea-output')].map(e => e.textContent).join('\n'),
    images: [...panel.node.querySelectorAll('.jp-OutputArea-output img')].map(
      i => ({decoded: i.complete && i.naturalWidth > 0, width: i.naturalWidth, png: i.src.startsWith('data:image/png')})),
    explorer: explorer ? {
      sliders: explorer.querySelectorAll('.noUi-handle').length,
      selects: [...explorer.querySelectorAll('select')].map(s => [...s.options].map(o => o.value)),
      readouts: [...explorer.querySelectorAll('.widget-readout')].map(r => r.textContent),
      output: out ? out.textContent : '',
      image: img && img.complete && img.naturalWidth > 0 ? img.src : '',
    } : null,
  });
})()
"""


def _state(page: LabPage) -> dict:
    return json.loads(page.evaluate(_STATE))


def _explorer_settles(page: LabPage, shows, what: str) -> dict:
    """The explorer's state once ``shows(explorer)`` holds with the kernel idle and the figure drawn, the same
    on two looks 0.5 s apart: a drag sends several values, and each answer replaces the text, then the figure."""
    deadline, last = time.monotonic() + WIDGET_REPLY_S, None
    while True:
        state = _state(page)
        explorer = state.get("explorer") or {}
        if state.get("kernel") == "idle" and explorer.get("image") and shows(explorer):
            if explorer == last:
                return explorer
            last = explorer
        else:
            last = None
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {WIDGET_REPLY_S} s; the explorer shows "
                               f"{(explorer.get('output') or '(nothing)')[:400]!r}")
        time.sleep(0.5)


def _factor_shown(explorer: dict) -> float | None:
    match = re.search(r"\(([\d.e+-]+) × optimal\)", explorer["output"])
    return float(match.group(1)) if match else None


def _chinchilla_report(fit, budget: float, factor: float) -> tuple[float, float]:
    """N and loss of a model ``factor`` x N_opt at ``budget`` FLOPs, from the closed form worked by hand
    (4.1: G = (αA / βB)^(1/(α+β)), N_opt = G (C/6)^(β/(α+β)); L = E + A/N^α + B/D^β with D = C/6N)."""
    g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1 / (fit.alpha + fit.beta))
    n = factor * g * (budget / 6) ** (fit.beta / (fit.alpha + fit.beta))
    d = budget / (6 * n)
    return n, fit.E + fit.A / n**fit.alpha + fit.B / d**fit.beta


def _assert_drawn(data_url: str, what: str) -> None:
    """The figure has ink: axes, curves and labels, not the blank PNG a figure closed mid-draw gives."""
    from PIL import Image  # matplotlib's own dependency

    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("L")
    dark = sum(image.histogram()[:128])
    assert dark > 0.005 * image.width * image.height, f"{what}: the figure is blank ({dark} dark pixels)"


def _assert_law_reported(output: str, fit, factor: float) -> None:
    """The explorer's "chosen" line is the law's answer for the control values it shows."""
    budget = float(re.search(r"C=(\S+) FLOPs", output).group(1))
    chosen = re.search(r"chosen:\s+N=(\S+) .*, D=\S+, loss ([\d.]+)", output)
    n, loss = _chinchilla_report(fit, budget, factor)
    assert chosen and float(chosen.group(1)) == pytest.approx(n, rel=5e-3), (fit.label, output)
    assert float(chosen.group(2)) == pytest.approx(loss, abs=1.5e-4), (fit.label, output)


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a copy of 4.4 and a Chromium tab; both stopped, even on failure."""
    work = tmp_path / "notebooks"  # a copy: JupyterLab autosaves, and the chapter must stay as committed
    work.mkdir()
    shutil.copy2(NOTEBOOK, work)  # at its defaults: 4.4 runs in seconds, and its curves are drawn smooth
    server = LabServer(work, tmp_path / "jupyter", timeout_s=SERVER_START_S)
    page = None
    try:
        page = LabPage(CHROMIUM, tmp_path / "screenshots")
        yield server, page
    finally:
        if page is not None:
            page.close()
        server.close()
        left = server.leftover()
        if SCREENSHOTS.parent.exists() and (tmp_path / "screenshots").exists():
            shutil.rmtree(SCREENSHOTS, ignore_errors=True)
            shutil.copytree(tmp_path / "screenshots", SCREENSHOTS)
        assert not left, f"kernel processes {left} outlived the JupyterLab server"


@pytest.mark.notebook
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium); "
                                             "the JupyterLab browser test needs a real browser")
@pytest.mark.skipif(bool(LAB_MISSING), reason=LAB_MISSING or "-")
def test_chapter_notebook_runs_and_its_explorer_reacts_in_jupyterlab(lab):
    from pretrain_lib.scaling import PAPER_FIT, REPLICATION_FIT

    server, page = lab
    explorer_js = "document.querySelector('.widget-interact')"
    try:
        page.goto(f"{server.url}/lab/tree/{NOTEBOOK.name}?token={server.token}")
        page.wait_until(f"({_STATE}).includes('\"kernel\":\"idle\"')", "the notebook open with an idle kernel",
                        NOTEBOOK_READY_S)
        opened = _state(page)
        assert opened["path"] == NOTEBOOK.name and all(p.strip() in ("[ ]:", "") for p in opened["prompts"]), opened
        page.screenshot("1_opened.png")

        # what Run > Run All Cells does; not awaited here (it resolves when the last cell ends)
        page.evaluate("void jupyterapp.commands.execute('notebook:run-all-cells'); true")
        page.wait_until(f"(s => s.kernel === 'idle' && s.prompts.length && /\\[\\d+\\]/.test(s.prompts[0])"
                        f" && !s.prompts.some(p => p.includes('*')))(JSON.parse({_STATE}))",
                        "all cells run", RUN_ALL_S)
        server.remember_children()
        ran = _state(page)
        assert not ran["errors"], f"cells failed in JupyterLab: {ran['errors']}"
        assert all(re.fullmatch(r"\[\d+\]:", p.strip()) for p in ran["prompts"]), f"cells left unrun: {ran['prompts']}"
        # printed results and the closing verdict reached the page
        assert "FLOPs, replication-style" in ran["text"] and "all checks passed" in ran["text"], ran["text"][-2000:]
        page.scroll_into_view("[...document.querySelectorAll('.jp-OutputArea-output')]"
                              ".find(o => o.textContent.includes('smallest model that can reach'))")
        page.screenshot("2_ran_all.png")

        assert ran["explorer"] is not None, (
            "no live ipywidgets explorer on the page (the widget cell printed its text form instead): "
            "JupyterLab lacks the @jupyter-widgets/jupyterlab-manager labextension (pip package "
            f"jupyterlab_widgets, installed with ipywidgets 8); outputs: {ran['text'][-600:]}")
        before = _explorer_settles(page, lambda e: True, "the explorer's first figure")
        assert before["sliders"] == 2 and len(before["selects"]) == 1, before
        assert _factor_shown(before) == 1 and "replication-style" in before["output"], before["output"]
        assert any(i["decoded"] and i["png"] and i["width"] > 300 for i in _state(page)["images"]), "no figure drawn"
        _assert_drawn(before["image"], "the explorer's first figure")
        page.scroll_into_view(explorer_js)
        page.screenshot("3_explorer_first.png")

        # the model size: the second slider's handle dragged with the mouse to 30 % of its track, where
        # log10(N / N_opt) runs from -1 to 1: about 0.4 x N_opt
        handle, track = page.evaluate(
            "(h => [h, h.closest('.noUi-target')].map(e => e.getBoundingClientRect())"
            ".map(r => [r.x, r.y, r.width, r.height]))"
            f"({explorer_js}.querySelectorAll('.noUi-handle')[1])")
        y = handle[1] + handle[3] / 2
        page.drag((handle[0] + handle[2] / 2, y), (track[0] + 0.3 * track[2], y))
        dragged = _explorer_settles(
            page, lambda e: _factor_shown(e) not in (None, 1)
            and _factor_shown(e) == pytest.approx(float(e["readouts"][1]), rel=0.01),
            "the explorer's numbers and figure for the dragged N / N_opt slider")
        page.scroll_into_view(explorer_js)
        page.screenshot("4_explorer_size_dragged.png")
        page.save_data_image("4_explorer_size_dragged_figure.png", dragged["image"])
        factor = _factor_shown(dragged)
        assert 0.25 < factor < 0.65, f"the slider dragged to 30 % of its track should read about 0.4, got {factor}"
        assert dragged["image"] != before["image"], "the figure did not follow the model size"
        _assert_drawn(dragged["image"], "the figure after dragging the slider")
        _assert_law_reported(dragged["output"], REPLICATION_FIT, factor)

        # the fit: a <select>, changed as a person's choice is (value set, change event)
        paper = next(v for v in before["selects"][0] if v.startswith("paper"))
        page.evaluate(f"(s => {{ s.value = {json.dumps(paper)}; s.dispatchEvent(new Event('change', "
                      f"{{bubbles: true}})); return true; }})({explorer_js}.querySelector('select'))")
        paper_fit = _explorer_settles(page, lambda e: paper in e["output"], "the explorer's numbers for the paper fit")
        page.scroll_into_view(explorer_js)
        page.screenshot("5_explorer_paper_fit.png")
        page.save_data_image("5_explorer_paper_fit_figure.png", paper_fit["image"])
        assert paper_fit["image"] != dragged["image"], "the figure did not follow the fit"
        _assert_drawn(paper_fit["image"], "the figure after changing the fit")
        _assert_law_reported(paper_fit["output"], PAPER_FIT, factor)
        assert not page.javascript_errors(), page.javascript_errors()
    except BaseException:
        try:
            page.screenshot("failure.png")
        except Exception:  # the browser itself may be what failed
            pass
        print(f"JupyterLab server log (tail):\n{server.log_tail()}")
        raise
