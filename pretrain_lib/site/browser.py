"""Load the built site in headless Chromium over the DevTools protocol and report what is broken.

For each page: JavaScript errors (console errors and uncaught exceptions), requests that leave the
machine (anything but ``file:`` and ``data:`` URLs: the site must work offline), resources that
failed to load, images that did not decode, links to files that do not exist, and math that MathJax
left unrendered (``$…$`` still in the text, or a MathJax error box). Uses Debian's ``chromium``
and ``websocket-client``; no browser is downloaded.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1280,900", "--remote-debugging-port=0"]

# run in the page once it has loaded: links, images and what MathJax left
_INSPECT = r"""
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const md = [...document.querySelectorAll('.jp-RenderedMarkdown')].map(e => e.innerText).join('\n');
  return JSON.stringify({
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    images: [...document.images].map(i => ({src: i.src.slice(0, 80), ok: i.complete && i.naturalWidth > 0})),
    math: document.querySelectorAll('mjx-container').length,
    math_errors: document.querySelectorAll('mjx-merror, [data-mjx-error]').length,
    leftover: (md.match(/\$[^$\n]*\\[a-zA-Z]+[^$\n]*\$/g) || []).slice(0, 3),
    mathjax: !!window.MathJax,
  });
})()
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageReport:
    url: str
    problems: list[str] = field(default_factory=list)
    math: int = 0


class Browser:
    """A headless Chromium driven through one DevTools websocket (flattened target sessions)."""

    def __init__(self, binary: str, timeout_s: float = 60):
        import websocket  # websocket-client

        self._profile = tempfile.TemporaryDirectory(prefix="course-chromium-", ignore_cleanup_errors=True)  # helpers may still write the profile
        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start (exit code {self.proc.returncode})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=10) as r:
            ws_url = json.load(r)["webSocketDebuggerUrl"]
        self.ws = websocket.create_connection(ws_url, timeout=timeout_s, suppress_origin=True)
        self._id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable", session=True)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout_s} s")
            self.events.append(json.loads(self.ws.recv()))

    def visit(self, url: str) -> PageReport:
        self.events = []
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")
        result = self.call("Runtime.evaluate", session=True, expression=_INSPECT, awaitPromise=True, returnByValue=True)
        report = PageReport(url)
        if "exceptionDetails" in result:
            report.problems.append(f"inspection failed: {result['exceptionDetails'].get('text')}")
            return report
        seen = json.loads(result["result"]["value"])
        time.sleep(0.2)  # let late console messages arrive
        self.call("Runtime.evaluate", session=True, expression="0")
        report.problems += self._event_problems()
        report.problems += [f"image did not load: {i['src']}" for i in seen["images"] if not i["ok"]]
        for link in seen["links"]:
            parsed = urllib.parse.urlparse(link)
            if parsed.scheme == "file" and not Path(urllib.parse.unquote(parsed.path)).exists():
                report.problems.append(f"broken link: {link}")
        if seen["math_errors"]:
            report.problems.append(f"{seen['math_errors']} MathJax error(s)")
        if seen["leftover"]:
            report.problems.append(f"math left unrendered: {seen['leftover']}")
        report.math = seen["math"]
        return report

    def _event_problems(self) -> list[str]:
        problems = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                problems.append("console error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                            for a in p.get("args", []))[:300])
            elif method == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                problems.append(f"JavaScript exception: {d.get('exception', {}).get('description', d.get('text'))}"[:300])
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                problems.append(f"browser error: {p['entry'].get('text')} {p['entry'].get('url', '')}"[:300])
            elif method == "Network.requestWillBeSent":
                scheme = urllib.parse.urlparse(p.get("request", {}).get("url", "")).scheme
                if scheme not in ("file", "data", "about", "blob"):
                    problems.append(f"network request (the site must work offline): {p['request']['url'][:200]}")
            elif method == "Network.loadingFailed" and not p.get("canceled"):
                problems.append(f"failed to load a resource: {p.get('errorText')}")
        return problems

    def screenshot(self, url: str, path: Path) -> None:
        self.visit(url)
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            if getattr(self, "ws", None):
                self.ws.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            self._profile.cleanup()


def check_site(site: Path, binary: str, chapter_page: str | None = None) -> dict[str, PageReport]:
    """Visit the index and every page; write two screenshots to ``site/screenshots/``."""
    site = Path(site).resolve()
    pages = [site / "index.html", *sorted(site.glob("[0-9][0-9]_*/*.html"))]
    browser = Browser(binary)
    try:
        reports = {str(p.relative_to(site)): browser.visit(p.as_uri()) for p in pages}
        browser.screenshot((site / "index.html").as_uri(), site / "screenshots" / "index.png")
        chapter = site / chapter_page if chapter_page else pages[min(1, len(pages) - 1)]
        browser.screenshot(chapter.as_uri(), site / "screenshots" / "chapter.png")
    finally:
        browser.close()
    return reports
