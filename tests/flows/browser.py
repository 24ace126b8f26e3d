"""Headless Chromium driven over the DevTools protocol, for tests that look at the Prefect UI.

The UI is a single-page app that fills itself from the API after the page has loaded, so a
one-shot `chromium --dump-dom` sees only its shell; here a page is opened and its text is polled
(in real time) until it shows what the test waits for, then a screenshot is taken. Only the
system's chromium and the `websockets` package (a Prefect dependency) are used: nothing is
downloaded.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium process with one page."""

    def __init__(self, executable: str, width: int = 1600, height: int = 1000):
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        self.proc = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--window-size={width},{height}", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = self.profile / "DevToolsActivePort", time.time() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def text(self) -> str:
        result = self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                           returnByValue=True)
        return result["result"].get("value") or ""

    def open(self, url: str, expect: list[str], timeout: float = 40.0) -> str:
        """Navigate to `url` and wait until the page text holds every string of `expect`;
        returns the text (whatever it is at the timeout)."""
        self.call("Page.navigate", url=url)
        return self.wait_for(expect, timeout)

    def wait_for(self, expect: list[str], timeout: float) -> str:
        """Poll the page text until it holds every string of `expect`; the text at that time or at the timeout."""
        deadline, text = time.time() + timeout, ""
        while time.time() < deadline:
            text = self.text()
            if all(e in text for e in expect):
                break
            time.sleep(0.5)
        return text

    def route(self, base: str, path: str, expect: list[str], timeout: float = 40.0) -> str:
        """Open the app at `base` and go to `path` inside it (history.pushState and a popstate
        event, as a click on a link would), then wait as `open` does. The server answers only
        its root with the app, so deep links are followed inside it."""
        self.open(base + "/", ["Runs"], timeout)
        self.call("Runtime.evaluate", expression=(f"history.pushState({{}}, '', {json.dumps(path)}); "
                                                  "dispatchEvent(new PopStateEvent('popstate'))"))
        return self.wait_for(expect, timeout)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
