"""The quick study's report.html in a real browser: headless Chromium driven over the DevTools protocol.

Checks: no console error or uncaught exception, every section (h2) present, every image loaded with
a non-zero natural size, and a `<script>` injected through a study name and a method name does not
run (while a `<script>` put into the page itself does: the control that shows scripts run here).
With POSTTRAIN_WRITE_SCREENSHOT=1 the screenshot is also written to docs/report_browser.png.

Chromium is Debian's `chromium` package (`make test` installs it when it can); without it, or
without the websocket-client package, the test is skipped with the reason.
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--remote-debugging-port=0", "--remote-allow-origins=*"]
SECTIONS = ["Accuracy", "Findings", "Training curves", "Format shares over training", "RL from SFT checkpoints",
            "Where the weights moved", "KL to the base and forgetting", "Repairing SFT's damage",
            "Example completions (in-domain)", "Configuration"]
STUDY_XSS = "<script>window.__xss_study=1</script>"
METHOD_XSS = "<script>window.__xss_method=1</script>"


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; `make test` tries that)")
    try:
        import websocket  # noqa: F401
    except ImportError:
        pytest.skip("the websocket-client package is not installed (pip install -e .[dev])")
    return exe


class Browser:
    """One headless Chromium with a fresh profile, one page, spoken to over the DevTools protocol."""

    def __init__(self, exe: str, profile: Path) -> None:
        import websocket

        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert self.proc.poll() is None, "chromium exited at start"
            assert time.time() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]
            self.events.append(msg)

    def open(self, path: Path) -> None:
        self.events.clear()
        self.call("Page.navigate", url=path.resolve().as_uri())
        deadline = time.time() + 60
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            assert time.time() < deadline, "the page did not load"
            self.events.append(json.loads(self.ws.recv()))

    def eval(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in res, res
        return res["result"].get("value")

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("text", "exception"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(str(p.get("args")))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out

    def screenshot(self) -> bytes:
        height = self.eval("document.documentElement.scrollHeight")
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=min(int(height), 2400), deviceScaleFactor=1,
                  mobile=False)
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def browser(tmp_path):
    b = Browser(chromium(), tmp_path / "profile")
    yield b
    b.close()


def _rename(d: dict, old: str, new: str) -> dict:
    return {(new if k == old else k): v for k, v in d.items()}


def injected_run(src: Path, dst: Path) -> Path:
    """A copy of the run whose results name the study and the SFT method with a <script>, re-rendered
    by `posttrain report` (the report must escape whatever names results.json holds)."""
    shutil.copytree(src, dst)
    res = json.loads((dst / "results.json").read_text())
    res["study"] = STUDY_XSS
    for key in ("models", "forgetting", "diagnostics", "trajectories", "training"):
        res[key] = _rename(res[key], "sft", METHOD_XSS)
    res["diagnostic_pairs"] = {k.replace("sft", METHOD_XSS): v for k, v in res["diagnostic_pairs"].items()}
    (dst / "results.json").write_text(json.dumps(res))
    r = subprocess.run([sys.executable, "-m", "posttrain.cli", "report", str(dst)], capture_output=True, text=True,
                       env={**os.environ, "POSTTRAIN_NO_PROGRESS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr
    return dst / "report.html"


@pytest.mark.slow
def test_report_in_headless_chromium(quick_study, browser, tmp_path):
    browser.open(quick_study / "report.html")
    assert browser.errors() == []
    assert browser.eval("[...document.querySelectorAll('h2')].map(h => h.textContent)") == SECTIONS
    imgs = browser.eval("[...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(imgs) >= 8
    bad = [alt for alt, complete, w, h in imgs if not (complete and w > 0 and h > 0)]
    assert not bad, f"images not shown: {bad}"
    png = browser.screenshot()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (tmp_path / "report.png").write_bytes(png)
    if os.environ.get("POSTTRAIN_WRITE_SCREENSHOT") == "1":
        (ROOT / "docs" / "report_browser.png").write_bytes(png)

    # control: a script that is part of the page does run in this harness
    control = tmp_path / "control.html"
    control.write_text((quick_study / "report.html").read_text().replace("<body>", "<body><script>window.__control=1</script>", 1))
    browser.open(control)
    assert browser.eval("window.__control") == 1

    page = injected_run(quick_study, tmp_path / "injected")
    browser.open(page)
    assert browser.errors() == []
    assert browser.eval("typeof window.__xss_study") == "undefined"
    assert browser.eval("typeof window.__xss_method") == "undefined"
    assert browser.eval("document.scripts.length") == 0
    text = browser.eval("document.body.innerText")
    assert STUDY_XSS in text and METHOD_XSS in text  # shown as text, so escaped rather than dropped
    assert browser.eval("document.title") == f"posttrain · {STUDY_XSS}"
