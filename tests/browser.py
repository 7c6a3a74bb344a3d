"""A real headless Chromium for page checks, driven over WebDriver (chromedriver) by urllib.

Debian's ``chromium`` and ``chromium-driver`` (.ci/apt-packages.txt). The
WebDriver protocol is plain HTTP and JSON, so no client library is needed:
start chromedriver on a free port in its own session, open one browser
session, load a page, ask it questions in JavaScript, read the browser's
console log, and stop everything by PID on the way out.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from app.local.procs import stop_group

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--no-first-run", "--window-size=1200,900"]

# What the page looked like once loaded: broken images, requests that were not
# file: URLs (the page must be self-contained), the verdict and table cells.
INSPECT = """
const images = Array.from(document.images);
return {
  images: images.map(i => i.getAttribute('src')),
  broken: images.filter(i => !i.complete || i.naturalWidth === 0)
                .map(i => i.getAttribute('src')),
  requests: performance.getEntriesByType('resource').map(e => e.name),
  verdict: (document.getElementById('verdict') || {}).textContent || null,
  title: document.title,
};
"""


def available() -> bool:
    return bool(CHROMIUM and CHROMEDRIVER)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One chromedriver and one headless Chromium session; a context manager."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.session = ""

    def call(self, method: str, path: str, body: dict | None = None,
             timeout: float = 60.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read())["value"]

    def __enter__(self) -> Browser:
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.time() + 30
        while True:
            try:
                if self.call("GET", "/status", timeout=2)["ready"]:
                    break
            except OSError:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromedriver did not become ready in 30 s")
            time.sleep(0.2)
        caps = {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {"binary": CHROMIUM, "args": ARGS}}
        try:
            self.session = self.call("POST", "/session",
                                     {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.session:
            try:
                self.call("DELETE", f"/session/{self.session}", timeout=20)
            except OSError:
                pass
            self.session = ""
        if self.proc is not None:
            stop_group(self.proc, 10.0, "chromedriver")
            self.proc = None

    def open(self, page: Path) -> dict[str, Any]:
        """Load ``page`` (a file) and return what INSPECT saw plus the console messages."""
        self.call("POST", f"/session/{self.session}/url",
                  {"url": Path(os.path.abspath(page)).as_uri()})
        seen = self.call("POST", f"/session/{self.session}/execute/sync",
                         {"script": INSPECT, "args": []})
        seen["console"] = self.call("POST", f"/session/{self.session}/se/log",
                                    {"type": "browser"})
        return seen

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(
            self.call("GET", f"/session/{self.session}/screenshot")))
