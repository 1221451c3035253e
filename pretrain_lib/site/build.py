"""Build the course website from the executed notebooks that ``make run`` leaves in ``build/chapters/``.

Why nbconvert: it is the Jupyter project's own, maintained converter, renders every output type the
notebooks produce (figures, tables, text) exactly as JupyterLab does, and takes a template of the
course's own (``templates/course_page``) that removes what would reach the network (require.js,
the widget manager, mermaid from a CDN) and points MathJax at a copy inside the site.

MathJax 3 (its ``tex-svg`` build, which carries its fonts as SVG paths) comes from the PyPI package
``django-static-mathjax``, which ships MathJax's release files; ``make site`` installs it. Widgets
degrade to the static figure each notebook draws when headless: their outputs are dropped.

Layout: ``index.html`` (course map, every page, the exercises), ``<chapter>/<notebook>.html`` with
previous/next links, ``exercises/*.ipynb`` (downloadable), ``assets/``.
"""
from __future__ import annotations

import argparse
import copy
import html
import importlib.util
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
MATHJAX_PACKAGE = "django-static-mathjax==3.2.2.1"


@dataclass
class Page:
    source: Path          # executed notebook
    chapter: str          # e.g. "01_objectives"
    stem: str             # e.g. "01_masked_lm"
    title: str

    @property
    def href(self) -> str:
        return f"{self.chapter}/{self.stem}.html"


def page_path(site: Path, chapter: str, stem: str) -> Path:
    return Path(site) / chapter / f"{stem}.html"


def notebook_title(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return ""


def mathjax_dir() -> Path:
    """MathJax's ``es5`` release folder from the installed package; says how to install it when missing."""
    spec = importlib.util.find_spec("mathjax")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        es5 = Path(folder) / "static" / "mathjax" / "es5"
        if (es5 / "tex-svg.js").is_file():
            return es5
    raise FileNotFoundError(f"MathJax is not installed: run `make site`, or `.venv/bin/pip install '{MATHJAX_PACKAGE}'`")


def static_notebook(nb):
    """A copy without widget state or widget views (the notebook's static figure stays)."""
    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            data = out.get("data")
            if isinstance(data, dict) and WIDGET_MIME in data:
                continue  # a widget's text/plain fallback ("VBox(...)") says nothing to a reader
            kept.append(out)
        cell.outputs = kept
    return nb


_SAVED = re.compile(r"""save_figure\([^,()]+,\s*["']([\w.-]+)["']""")


def add_saved_figures(nb, figures: Path):
    """Put the PNGs a headless run saved (``build/figures/<chapter>/<notebook>/``) back into the page.

    Headless runs write figures to files instead of showing them, so the executed notebook holds none.
    Each figure goes under the cell that saved it (``save_figure(fig, "name")``); any other goes at the end.
    """
    pngs = {p.stem: p for p in sorted(Path(figures).glob("*.png"))} if Path(figures).is_dir() else {}
    placed = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for name in _SAVED.findall(cell.source):
            if name in pngs and name not in placed:
                cell.outputs.append(_image_output(pngs[name]))
                placed.add(name)
    rest = [p for name, p in pngs.items() if name not in placed]
    if rest:
        nb.cells.append(nbformat.v4.new_markdown_cell("## Figures of this run"))
        nb.cells.append(nbformat.v4.new_code_cell("", outputs=[_image_output(p) for p in rest]))
    return nb


def _image_output(png: Path):
    import base64
    return nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(png.read_bytes()).decode(),
                                                         "text/plain": f"<figure {png.name}>"})


_HREF = re.compile(r'href="([^"#:?]+)(#[^"]*)?"')


def fix_links(text: str, page_dir: Path, site: Path, source_dir: Path, pages_by_source: dict[Path, Page],
              site_files: set[Path]) -> tuple[str, list[str]]:
    """Point links to other notebooks at their pages; unlink targets the site does not hold (returned).

    ``site_files``: every file the finished site holds (resolved), including pages not written yet.
    """
    dropped: list[str] = []

    def repl(m):
        target, anchor = m.group(1), m.group(2) or ""
        if (page_dir / target).resolve() in site_files or (page_dir / target).exists():
            return m.group(0)
        linked = (source_dir / target).resolve()
        page = pages_by_source.get(linked)
        if page is not None:
            rel = Path("../" * (len(page_dir.relative_to(site).parts))) / page.href
            return f'href="{rel.as_posix()}{anchor}"'
        dropped.append(target)
        return 'data-course-unlinked="' + html.escape(target) + '"'
    return _HREF.sub(repl, text), dropped


def nav_html(prev: Page | None, nxt: Page | None, root: str) -> str:
    left = f'<a rel="prev" href="{root}{prev.href}">← {html.escape(prev.title)}</a>' if prev else "<span></span>"
    right = f'<a rel="next" href="{root}{nxt.href}">{html.escape(nxt.title)} →</a>' if nxt else "<span></span>"
    return f'<nav class="course-nav">{left}<a href="{root}index.html">Course map</a>{right}</nav>'


def collect_pages(executed_dir: Path) -> list[Page]:
    pages = []
    for path in sorted(Path(executed_dir).glob("[0-9][0-9]_*/[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        pages.append(Page(path, path.parent.name, path.stem, notebook_title(nb) or path.stem))
    return pages


def course_map_html() -> str:
    """The README's course map (between its COURSE MAP markers) as HTML."""
    from nbconvert.filters.markdown_mistune import markdown2html_mistune
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- COURSE MAP -->(.*?)<!-- END COURSE MAP -->", readme, re.S)
    return markdown2html_mistune(m.group(1)) if m else ""


def index_html(pages: list[Page], exercises: list[tuple[str, str]]) -> str:
    chapters: dict[str, list[Page]] = {}
    for p in pages:
        chapters.setdefault(p.chapter, []).append(p)
    body = ["<h1>Pretraining language models: the course</h1>",
            "<p>Every page below is a chapter notebook executed on a laptop CPU, with its outputs and figures. "
            "Run them yourself with <code>make run</code> or open them with <code>make lab</code>.</p>", "<h2>Pages</h2>"]
    for chapter, items in chapters.items():
        body.append(f"<h3>{html.escape(chapter.replace('_', ' '))}</h3><ul>")
        body += [f'<li><a href="{p.href}">{html.escape(p.title)}</a></li>' for p in items]
        body.append("</ul>")
    body.append("<h2>Exercises</h2><p>Each exercise is a notebook to fill in: write the code between the "
                "<code># BEGIN SOLUTION</code> markers, run its check cells, then grade it exactly as the instructor will:</p>"
                "<pre>python -m pretrain_lib.grading check exercises/NN_topic.ipynb</pre>"
                "<p>Instructors grade a whole class with <code>make grade SUBMISSIONS=folder OUT=folder</code> "
                "(one folder per student; a gradebook and one feedback file per student).</p><ul>")
    body += [f'<li><a href="exercises/{html.escape(name)}">{html.escape(name)}</a>: {html.escape(title)}</li>'
             for name, title in exercises]
    body.append("</ul><h2>Course map</h2>" + course_map_html())
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Pretraining course</title>"
            '<link rel="stylesheet" href="assets/site.css"></head><body class="course-index">'
            + "\n".join(body) + "</body></html>\n")


def build_site(executed_dir: Path = REPO_ROOT / "build" / "chapters", site: Path = REPO_ROOT / "build" / "site",
               exercises_dir: Path = REPO_ROOT / "exercises", chapters_dir: Path = REPO_ROOT / "chapters",
               figures_dir: Path | None = None) -> dict:
    """Write the site; returns ``{"pages", "seconds", "unlinked"}``. Raises when there is nothing to build."""
    from nbconvert import HTMLExporter

    start = time.perf_counter()
    figures_dir = Path(figures_dir) if figures_dir else Path(executed_dir).parent / "figures"  # make run's layout
    pages = collect_pages(executed_dir)
    if not pages:
        raise FileNotFoundError(f"no executed notebooks in {executed_dir}: run `make run` first")
    site = Path(site)
    if site.exists():
        shutil.rmtree(site)
    (site / "assets" / "mathjax").mkdir(parents=True)
    es5 = mathjax_dir()
    shutil.copy2(es5 / "tex-svg.js", site / "assets" / "mathjax" / "tex-svg.js")
    shutil.copytree(es5 / "input", site / "assets" / "mathjax" / "input")  # extensions MathJax autoloads
    license_file = es5.parent / "LICENSE"
    if license_file.exists():
        shutil.copy2(license_file, site / "assets" / "mathjax" / "LICENSE")
    shutil.copy2(HERE / "assets" / "site.css", site / "assets" / "site.css")

    exporter = HTMLExporter(template_name="course_page", extra_template_basedirs=[str(HERE / "templates")])
    by_source = {(Path(chapters_dir) / p.chapter / f"{p.stem}.ipynb").resolve(): p for p in pages}
    unlinked: dict[str, list[str]] = {}
    exercise_files = sorted(Path(exercises_dir).glob("[0-9][0-9]_*.ipynb"))
    site_files = {(site / p.href).resolve() for p in pages} | {(site / "index.html").resolve()} | {
        (site / "exercises" / e.name).resolve() for e in exercise_files}
    for i, page in enumerate(pages):
        nb = add_saved_figures(static_notebook(nbformat.read(page.source, as_version=4)),
                               figures_dir / page.chapter / page.stem)
        resources = {"site_root": "../", "metadata": {"name": page.title},
                     "site_nav": nav_html(pages[i - 1] if i else None, pages[i + 1] if i + 1 < len(pages) else None, "../")}
        body, _ = exporter.from_notebook_node(nb, resources=resources)
        out = page_path(site, page.chapter, page.stem)
        out.parent.mkdir(parents=True, exist_ok=True)
        body, dropped = fix_links(body, out.parent, site, Path(chapters_dir) / page.chapter, by_source, site_files)
        if dropped:
            unlinked[page.href] = dropped
        out.write_text(body, encoding="utf-8")

    exercises = []
    (site / "exercises").mkdir()
    for path in exercise_files:
        shutil.copy2(path, site / "exercises" / path.name)
        exercises.append((path.name, notebook_title(nbformat.read(path, as_version=4))))
    (site / "index.html").write_text(index_html(pages, exercises), encoding="utf-8")
    return {"pages": len(pages), "seconds": time.perf_counter() - start, "unlinked": unlinked}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain_lib.site", description="Build the course website.")
    parser.add_argument("--executed", default=str(REPO_ROOT / "build" / "chapters"),
                        help="folder of executed notebooks (what `make run` writes)")
    parser.add_argument("--out", default=str(REPO_ROOT / "build" / "site"))
    args = parser.parse_args(argv)
    try:
        report = build_site(Path(args.executed), Path(args.out))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for href, targets in report["unlinked"].items():
        print(f"note: {href}: links to files outside the site left as text: {', '.join(targets)}")
    print(f"wrote {report['pages']} pages to {args.out} in {report['seconds']:.1f} s; open {args.out}/index.html")
    return 0
