"""A throwaway JupyterLab server and a headless Chromium page that works it, for tests.

The server runs as a student's `make lab` would (live widgets, inline figures), but on a free local
port with a random token and with every Jupyter/IPython config, runtime, settings and workspace
folder in a temporary directory, so nothing of the user's setup is read or written. The page
reuses the site test's DevTools driver (`pretrain_lib.site.browser.Browser`): Debian's Chromium,
no browser downloaded.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# set by conftest.py / CI for headless runs; a person in JupyterLab has none of them
_HEADLESS_ENV = ("COURSE_HEADLESS", "CI", "MPLBACKEND")
# A news/update toast would cover the notebook in the screenshots, and must not reach the network.
# Comms over subshells (JupyterLab >= 4.4's default with ipykernel 7) run widget callbacks on a second kernel
# thread beside the main one; pyplot is not thread-safe, and the explorer then drew blank or cut figures
# (a 1,957-byte white PNG instead of ~49 kB) in most runs, none in runs with them disabled. The course must
# ship this setting for students too (see the test's docstring); the test runs what they should get.
_LAB_SETTINGS = {"@jupyterlab/apputils-extension/notification.jupyterlab-settings":
                 {"fetchNews": "false", "checkForUpdates": False},
                 "@jupyterlab/apputils-extension/kernels-settings.jupyterlab-settings":
                 {"commsOverSubshells": "disabled"}}


def lab_missing() -> str:
    """Why JupyterLab with live widgets cannot run here ("" when it can)."""
    for module, package in (("jupyterlab", "jupyterlab"), ("ipykernel", "ipykernel"),
                            ("ipywidgets", "ipywidgets"), ("jupyterlab_widgets", "jupyterlab_widgets"),
                            ("websocket", "websocket-client"), ("psutil", "psutil")):
        try:
            __import__(module)
        except ImportError:
            return f"{package} is not installed (pip install -e . installs it); the JupyterLab browser test needs it"
    return ""


class LabServer:
    """``jupyter lab`` on 127.0.0.1, a free port and a token; ``close()`` stops it and its kernels."""

    def __init__(self, root_dir: Path, home: Path, timeout_s: float = 120):
        self.root_dir, self.home = Path(root_dir), Path(home)
        self.token = secrets.token_hex(16)
        self.log_path = self.home / "jupyter-server.log"
        self._children: set[int] = set()
        env = {k: v for k, v in os.environ.items() if k not in _HEADLESS_ENV}
        dirs = {"JUPYTER_CONFIG_DIR": "config", "JUPYTER_DATA_DIR": "data", "JUPYTER_RUNTIME_DIR": "runtime",
                "JUPYTERLAB_SETTINGS_DIR": "lab-settings", "JUPYTERLAB_WORKSPACES_DIR": "lab-workspaces",
                "IPYTHONDIR": "ipython", "COURSE_FIGURE_DIR": "figures"}
        for var, name in dirs.items():
            env[var] = str(self.home / name)
            (self.home / name).mkdir(parents=True, exist_ok=True)
        for rel, values in _LAB_SETTINGS.items():
            path = self.home / "lab-settings" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               "--ServerApp.port=0", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root_dir}", "--LabApp.expose_app_in_browser=True",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=",
               "--ServerApp.terminals_enabled=False"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # containers run as root; JupyterLab refuses it without the flag
        with open(self.log_path, "w") as log:
            # its own session: close() can signal the server without touching pytest
            self.proc = subprocess.Popen(cmd, env=env, cwd=self.root_dir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.url = self._wait_until_serving(timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_until_serving(self, timeout_s: float) -> str:
        info = self.home / "runtime" / f"jpserver-{self.proc.pid}.json"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if info.exists():
                try:
                    url = f"http://127.0.0.1:{json.loads(info.read_text())['port']}"
                    with urllib.request.urlopen(f"{url}/api/status?token={self.token}", timeout=10):
                        return url
                except (ValueError, KeyError, OSError):
                    pass  # written but not complete yet, or not answering yet
            time.sleep(0.25)
        raise TimeoutError(f"jupyter lab did not serve within {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def remember_children(self) -> None:
        """Note the server's kernels now: they run in sessions of their own, so they are stopped by id."""
        import psutil

        try:
            self._children |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass

    def close(self) -> None:
        """Shut down through the API (kernels first), then signal whatever is left; never raises."""
        if getattr(self, "proc", None) is None:
            return
        self.remember_children()
        if self.proc.poll() is None and getattr(self, "url", None):
            request = urllib.request.Request(f"{self.url}/api/shutdown", method="POST",
                                             headers={"Authorization": f"token {self.token}"})
            try:
                urllib.request.urlopen(request, timeout=20).close()
            except (OSError, urllib.error.URLError):
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for pid in self.leftover():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftover(self) -> list[int]:
        """The server's children (kernels) still running, zombies aside."""
        import psutil

        alive = []
        for pid in sorted(self._children):
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive


class LabPage:
    """One Chromium tab on JupyterLab: run JavaScript in it, wait for a condition, click, drag, screenshot."""

    def __init__(self, chromium: str, shots: Path, timeout_s: float = 90):
        from pretrain_lib.site.browser import Browser

        self.shots = Path(shots)
        self.browser = Browser(chromium, timeout_s=timeout_s)
        # JupyterLab's kernel websocket would fill the event list with frames nobody reads
        self.browser.call("Network.disable", session=True)

    def goto(self, url: str) -> None:
        self.browser.call("Page.navigate", session=True, url=url)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (awaited if a promise), or RuntimeError with its exception."""
        result = self.browser.call("Runtime.evaluate", session=True, expression=expression, awaitPromise=True,
                                   returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return result.get("result", {}).get("value")

    def wait_until(self, expression: str, what: str, timeout_s: float):
        """Poll a JavaScript expression until it is truthy; return its value. Raises with ``what`` on timeout."""
        deadline = time.monotonic() + timeout_s
        last_error = None
        while True:
            try:
                value = self.evaluate(expression)
                if value:
                    return value
            except RuntimeError as exc:  # the page is still loading the code the expression uses
                last_error = exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout_s:.0f} s"
                                   + (f" (last error: {last_error})" if last_error else ""))
            time.sleep(0.25)

    def scroll_into_view(self, element: str, timeout_s: float = 20) -> None:
        """Scroll the element (a JavaScript expression) to the top and wait until it stays there: JupyterLab
        lays out cells outside the view lazily (content-visibility), so the first scroll lands short."""
        in_place = ("(e => { const top = e.getBoundingClientRect().top; e.scrollIntoView();"
                    f" return Math.abs(e.getBoundingClientRect().top - top) < 1; }})({element})")
        deadline, settled = time.monotonic() + timeout_s, 0
        while settled < 2 and time.monotonic() < deadline:  # a screenshot a little off is no failure
            settled = settled + 1 if self.evaluate(in_place) else 0
            time.sleep(0.3)

    def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 8) -> None:
        """A real mouse drag (press, moves, release) from one viewport point to another."""
        (x0, y0), (x1, y1) = start, end
        self._mouse("mouseMoved", x0, y0)
        self._mouse("mousePressed", x0, y0, buttons=1)
        for i in range(1, steps + 1):
            self._mouse("mouseMoved", x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps, buttons=1)
        self._mouse("mouseReleased", x1, y1)

    def _mouse(self, kind: str, x: float, y: float, buttons: int = 0) -> None:
        extra = {"button": "left", "clickCount": 1} if kind != "mouseMoved" else {}
        self.browser.call("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y, buttons=buttons, **extra)

    def screenshot(self, name: str) -> Path:
        """The viewport as a PNG under ``shots``, once its images are decoded and painted."""
        self.evaluate("Promise.all([...document.images].map(i => i.decode().catch(() => null)))"
                      ".then(() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r))))"
                      ".then(() => true)")
        data = self.browser.call("Page.captureScreenshot", session=True, format="png")["data"]
        path = self.shots / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def save_data_image(self, name: str, data_url: str) -> Path:
        """An image the page holds as a data URL (a figure as the kernel sent it), written under ``shots``."""
        path = self.shots / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data_url.split(",", 1)[1]))
        return path

    def javascript_errors(self) -> list[str]:
        """Uncaught exceptions and console errors seen so far."""
        errors = []
        for event in self.browser.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                errors.append(str(details.get("exception", {}).get("description", details.get("text")))[:300])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))[:300])
        return errors

    def close(self) -> None:
        """Close Chromium, then stop by id any of its helper processes that outlive it (never raises)."""
        import psutil

        try:
            helpers = psutil.Process(self.browser.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            helpers = []
        try:
            self.browser.close()
        except OSError:  # its helpers may still be writing the profile as the main process exits
            psutil.wait_procs(helpers, timeout=5)
            self.browser.close()
        _, alive = psutil.wait_procs(helpers, timeout=5)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
