"""The course website: built offline with nbconvert, loaded page by page in headless Chromium."""
from __future__ import annotations

import json
import shutil

import nbformat
import pytest

from conftest import REPO
from pretrain_lib.site import build_site
from pretrain_lib.site.browser import Browser, check_site, find_chromium
from pretrain_lib.site.build import static_notebook

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y "
                                    "chromium); the browser test needs a real browser")
try:
    from pretrain_lib.site.build import mathjax_dir
    mathjax_dir()
    MATHJAX_MISSING = ""
except FileNotFoundError as exc:
    MATHJAX_MISSING = str(exc)
needs_mathjax = pytest.mark.skipif(bool(MATHJAX_MISSING), reason=MATHJAX_MISSING or "-")
FIGURE_NOTEBOOK = REPO / "chapters" / "01_objectives" / "01_masked_lm.ipynb"


def _executed_subset(tmp_path):
    """Executed notebooks to build from: `make run`'s build/chapters when it holds every chapter notebook (a few
    run by hand are not the course), else a small set made now (chapter 0 as committed, its formula sheet full of
    math, and one chapter-1 notebook run at test sizes for figures)."""
    from pretrain_lib.notebooks import chapter_notebooks
    made = REPO / "build" / "chapters"
    if all((made / p.parent.name / p.name).is_file() for p in chapter_notebooks(REPO / "chapters")):
        return made
    from pretrain_lib.notebooks import execute_notebook
    src = tmp_path / "executed"
    shutil.copytree(REPO / "chapters" / "00_overview", src / "00_overview", ignore=shutil.ignore_patterns("*.png"))
    params = json.loads((REPO / "tests" / "notebook_params" / "01_objectives.json").read_text())
    run = execute_notebook(FIGURE_NOTEBOOK, build_dir=tmp_path, parameters=params.get(FIGURE_NOTEBOOK.stem))
    assert run.ok, run.error
    (src / "01_objectives").mkdir(parents=True)
    shutil.copy2(tmp_path / "chapters" / "01_objectives" / FIGURE_NOTEBOOK.name, src / "01_objectives")
    return src  # its figures are in tmp_path/figures, where build_site looks (next to the executed folder)


def test_empty_build_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="make run"):
        build_site(tmp_path / "nothing", tmp_path / "site")


def test_widgets_degrade_to_their_static_outputs():
    nb = nbformat.v4.new_notebook(metadata={"widgets": {"state": {}}})
    cell = nbformat.v4.new_code_cell("show()")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {},
                                                                 "text/plain": "VBox()"}),
                    nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="})]
    nb.cells.append(cell)
    static = static_notebook(nb)
    assert "widgets" not in static.metadata and [list(o.data) for o in static.cells[0].outputs] == [["image/png"]]
    assert len(nb.cells[0].outputs) == 2  # the original is untouched


@pytest.mark.notebook
@needs_chromium
@needs_mathjax
def test_every_page_loads_offline_with_links_images_and_math(tmp_path):
    site = REPO / "build" / "site"
    report = build_site(_executed_subset(tmp_path), site)
    assert report["pages"] >= 3
    pages = {p.relative_to(site).as_posix() for p in site.glob("[0-9][0-9]_*/*.html")}
    assert "00_overview/02_glossary_and_formulas.html" in pages
    index = (site / "index.html").read_text()
    assert all(f'href="{p}"' in index for p in pages) and "python -m pretrain_lib.grading check" in index
    results = check_site(site, CHROMIUM, "00_overview/02_glossary_and_formulas.html")
    assert set(results) == pages | {"index.html"}
    problems = {page: r.problems for page, r in results.items() if r.problems}
    assert not problems, json.dumps(problems, indent=1)
    assert results["00_overview/02_glossary_and_formulas.html"].math > 20  # MathJax typeset the formula sheet
    executed = [p for p in pages if p.startswith("01_objectives/")]
    if executed:  # a page with figures: its images were checked to decode above
        assert "<img" in (site / executed[0]).read_text()
    for shot in ("index.png", "chapter.png"):
        assert (site / "screenshots" / shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_chromium
def test_the_browser_check_catches_each_kind_of_breakage(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<html><body><a href="missing.html">x</a><img src="nope.png">'
                    '<div class="jp-RenderedMarkdown">$\\frac{1}{2}$</div>'
                    '<script>console.error("boom")</script><script>undefinedFunction()</script></body></html>')
    browser = Browser(CHROMIUM)
    try:
        problems = "\n".join(browser.visit(page.as_uri()).problems)
    finally:
        browser.close()
    for expected in ("broken link", "image did not load", "math left unrendered", "console error: boom",
                     "JavaScript exception"):
        assert expected in problems, problems


@needs_chromium
@needs_mathjax
def test_math_in_markdown_outputs_is_typeset_and_printed_dollars_are_left_alone(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("say(...)")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"text/markdown": r"KL is $\mathrm{KL}(p\|q) = 0.12$."}),
                    nbformat.v4.new_output("stream", name="stdout", text="costs $5 and $6 \\alpha\n")]
    nb.cells.append(cell)
    (tmp_path / "executed" / "01_demo").mkdir(parents=True)
    nbformat.write(nb, tmp_path / "executed" / "01_demo" / "01_page.ipynb")
    site = tmp_path / "site"
    build_site(tmp_path / "executed", site)
    report = check_site(site, CHROMIUM, "01_demo/01_page.html")["01_demo/01_page.html"]
    assert report.problems == [] and report.math == 1  # the markdown output typeset, the printed text left as text
    assert "costs $5 and $6" in (site / "01_demo" / "01_page.html").read_text()
