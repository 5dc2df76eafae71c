"""The report in a real browser: headless Chromium (Debian's package) opens report.html and we check that it loads
without console errors, makes no network request, and that its plots render (decoded images, screenshots that
are not blank).

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no port, no network), which
reports console messages, uncaught exceptions, every request the page makes, and takes screenshots. A net-log
(``--log-net-log``) is checked as a second witness of "no network". A negative control page (a script error and
an http image) proves the checks catch what they are meant to catch.

The session fixture installs Chromium with apt-get when it is missing and we are root (as in CI); otherwise the
tests are skipped with the reason.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
         "--mute-audio", "--no-default-browser-check", "--hide-scrollbars",
         # nothing leaves the machine, whoever asks: every proxied request is refused on the loopback
         "--proxy-server=http://127.0.0.1:1", "--disable-features=NetworkTimeServiceQuerying"]


def _find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    path = _find_browser()
    if path:
        return path
    if not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and there is no apt-get to install it (apt-get install chromium)")
    if os.geteuid() != 0:
        pytest.skip("Chromium is not installed and installing it needs root (sudo apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.skip(f"could not install Chromium ({' '.join(cmd)}): {proc.stderr.strip()[-300:]}")
    path = _find_browser()
    if not path:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH")
    return path


class DevTools:
    """A headless Chromium driven over the DevTools protocol on a pipe (fd 3: commands in, fd 4: events out)."""

    def __init__(self, binary: str, workdir: Path, netlog: Path, width: int = 1280, height: int = 4000):
        self.workdir = workdir
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [binary, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={workdir / 'profile'}",
                f"--log-net-log={netlog}", "--net-log-capture-mode=Everything", f"--window-size={width},{height}",
                "about:blank"]
        # the browser expects the pipe on fds 3 and 4 (bash: dash's redirections take one-digit fds only)
        shell = f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}'
        self._log = open(workdir / "chromium.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([shutil.which("bash") or "bash", "-c", shell, *args], pass_fds=(to_browser_r, from_browser_w),
                                     stdout=subprocess.DEVNULL, stderr=self._log,
                                     start_new_session=True)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict] = []
        self.session: str | None = None

    # -- protocol ------------------------------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe; see chromium.log")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: bool = True, timeout: float = 60.0) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self._next:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict:
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline)
            self.events.append(m)
            if m.get("method") == method:
                return m

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read_message(deadline))
        except TimeoutError:
            pass

    # -- page ----------------------------------------------------------------------------------------------------
    def open(self, url: str, width: int = 1280, height: int = 4000) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired")
        self.drain(0.5)

    def evaluate(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"evaluate failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, clip: dict | None = None) -> bytes:
        params: dict = {"format": "png"}
        if clip:
            params.update(clip=clip, captureBeyondViewport=True)
        return base64.b64decode(self.send("Page.captureScreenshot", params)["data"])

    # -- findings ------------------------------------------------------------------------------------------------
    def console_errors(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(f"exception: {d.get('text')} {(d.get('exception') or {}).get('description', '')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                        for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", session=False, timeout=10)
                self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - fall back to ending the process group we started
            pass
        finally:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log.close()


def _netlog_requests(path: Path) -> tuple[list[str], list[str]]:
    """http(s)/ws(s) URL requests in a net-log: (made by the page, made by the browser itself).

    A request the page makes carries the page's origin: its initiator is an origin (``null`` for a file: page)
    and its network isolation key names the page's site (``file://``). The browser's own background requests
    (component updater, network time, account check) have no initiator ("not an origin"); they are not the
    page's doing and go nowhere here (the proxy below refuses them)."""
    import re

    text = path.read_text(errors="replace")
    log = json.loads(text if text.rstrip().endswith("}") else text.rstrip().rstrip(",") + "]}")
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    page, background = set(), set()
    for e in log.get("events", []):
        p = e.get("params") or {}
        url = p.get("url")
        if e.get("type") != start or not isinstance(url, str) or not re.match(r"^(https?|wss?)://", url):
            continue
        by_page = p.get("initiator") != "not an origin" or "file://" in str(p.get("network_isolation_key"))
        (page if by_page else background).add(url)
    return sorted(page), sorted(background)


def _variance(png: bytes) -> float:
    from PIL import Image, ImageStat

    with Image.open(io.BytesIO(png)) as im:
        return float(ImageStat.Stat(im.convert("L")).var[0])


def _browse(chromium: str, html_path: Path, workdir: Path, inspect: bool = True) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    netlog = workdir / "netlog.json"
    browser = DevTools(chromium, workdir, netlog)
    try:
        browser.open(html_path.resolve().as_uri())
        out = {"errors": browser.console_errors(), "requests": browser.requests()}
        if inspect:
            out["title"] = browser.evaluate("document.title")
            out["images"] = browser.evaluate(
                "Array.from(document.images).map(i => ({id: i.closest('figure') ? i.closest('figure').id : '',"
                " complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))")
            out["sections"] = browser.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
            out["first"] = browser.evaluate(
                "(() => { const s = document.querySelector('section'); const links = Array.from(s.querySelectorAll("
                "'a')); return {id: s.id, text: s.innerText, top: s.getBoundingClientRect().top + scrollY,"
                " links: links.map(a => a.getAttribute('href')),"
                " resolved: links.every(a => document.querySelector(a.getAttribute('href')) !== null)}; })()")
            out["run_open"] = browser.evaluate(
                "Array.from(document.querySelectorAll('#run > details')).map(d => d.open)")
            out["page"] = browser.screenshot()
            rects = browser.evaluate(
                "Array.from(document.querySelectorAll('figure img')).map(i => { const r = i.getBoundingClientRect();"
                " return {id: i.closest('figure').id, x: r.left + scrollX, y: r.top + scrollY, width: r.width,"
                " height: r.height}; })")
            out["figure_shots"] = {r["id"]: browser.screenshot({"x": r["x"], "y": r["y"], "width": r["width"],
                                                                "height": r["height"], "scale": 1})
                                   for r in rects}
        out["errors"] = browser.console_errors()
        out["requests"] = browser.requests()
    finally:
        browser.close()
    out["netlog_urls"], out["browser_urls"] = _netlog_requests(netlog)
    return out


def test_report_renders_offline_without_errors(chromium, tmp_path, tmp_path_factory):
    from test_report import EXPECTED_FIGURES, shared_run

    run = shared_run(tmp_path_factory)  # the run folder and report of test_report.py (built once per session)
    seen = _browse(chromium, run["path"], tmp_path / "browser")

    assert seen["errors"] == [], seen["errors"]
    assert [u for u in seen["requests"] if not u.startswith(("file:", "data:"))] == []
    assert seen["netlog_urls"] == []
    assert seen["title"].startswith("outlierlab report")
    assert seen["sections"] == ["summary", "found", "explain", "mitigation", "compare", "figures", "run"]
    images = seen["images"]
    assert [i["id"] for i in images] == EXPECTED_FIGURES
    assert all(i["complete"] and i["w"] >= 400 and i["h"] >= 200 for i in images), images
    (tmp_path / "page.png").write_bytes(seen["page"])
    assert _variance(seen["page"]) > 100, "the page screenshot is blank"
    for name, shot in seen["figure_shots"].items():
        assert _variance(shot) > 50, f"figure {name} rendered blank"


def test_report_opens_with_the_summary(chromium, tmp_path, tmp_path_factory):
    """The first section, on the first screen, is the summary: it names the MA channel and the method that
    recovers the quantized setting, and links to the sections with the details; the run details come last,
    collapsed."""
    from test_report import MA_ROW, shared_run

    run = shared_run(tmp_path_factory)
    seen = _browse(chromium, run["path"], tmp_path / "browser")
    first = seen["first"]
    assert first["id"] == "summary" and first["top"] < 600, first
    assert f"channel {MA_ROW}," in first["text"], first["text"]
    assert "w8a8-tensor none 140 (+7.7%) -> paper 131 (+0.8%)" in first["text"], first["text"]
    assert set(first["links"]) == {"#explain", "#found", "#mitigation", "#compare"} and first["resolved"], first
    assert seen["sections"][-1] == "run" and seen["run_open"] == [False]


def test_the_checks_catch_errors_and_requests(chromium, tmp_path):
    """Negative control: a script error, a console.error and an http image are all reported."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><head><title>bad</title></head><body><p>x</p>"
                    "<img src='http://127.0.0.1:9/none.png'>"
                    "<script>console.error('deliberate'); undefined_function();</script></body></html>")
    seen = _browse(chromium, page, tmp_path / "browser", inspect=False)
    assert any("deliberate" in e for e in seen["errors"]), seen["errors"]
    assert any("undefined_function" in e for e in seen["errors"]), seen["errors"]
    assert "http://127.0.0.1:9/none.png" in seen["requests"]
    assert "http://127.0.0.1:9/none.png" in seen["netlog_urls"]
    assert "http://127.0.0.1:9/none.png" not in seen["browser_urls"]
