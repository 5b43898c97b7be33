"""Headless Chromium for the report tests: the DOM as the browser built it, a
screenshot, the console, and every request the page tried to send.

Chromium runs with its proxy set to a recorder on 127.0.0.1 that answers nothing, and
its own name resolution off: any fetch a page makes (http, or https as a CONNECT)
lands in the recorder and fails. Chromium's own background calls (component updates,
its clock) go there too; they are told apart by host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# What Chromium itself calls at start-up; anything else came from the page.
BROWSER_OWN_HOSTS = {
    "accounts.google.com",
    "clients1.google.com",
    "clients2.google.com",
    "content-autofill.googleapis.com",
    "edgedl.me.gvt1.com",
    "optimizationguide-pa.googleapis.com",
    "redirector.gvt1.com",
    "safebrowsingohttpgateway.googleapis.com",
    "update.googleapis.com",
}
CONSOLE = re.compile(r":CONSOLE(?:\(\d+\))?[:\]]")


def chromium() -> str:
    """The browser, or skip (CI installs it: .ci/run, so there it fails instead)."""
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


class _Recorder(BaseHTTPRequestHandler):
    seen: list[str]

    def _record(self) -> None:
        self.server.seen.append(f"{self.command} {self.path}")  # type: ignore[attr-defined]
        self.send_response(502)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_HEAD = do_CONNECT = _record

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Page:
    """What the browser made of a file."""

    dom: str
    console: list[str]
    requests: list[str] = field(default_factory=list)

    @property
    def page_requests(self) -> list[str]:
        """Requests that came from the page, not from the browser's own services."""
        out = []
        for r in self.requests:
            target = r.split(" ", 1)[1]
            host = re.sub(r"^[a-z]+://", "", target).split("/", 1)[0].split(":", 1)[0]
            if host not in BROWSER_OWN_HOSTS:
                out.append(r)
        return out


def open_page(path: Path, *, screenshot: Path | None = None, size: str = "1280,1600") -> Page:
    """Load `path` in headless Chromium, offline; dump its DOM, optionally screenshot it."""
    browser = chromium()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
            base = [
                browser,
                "--headless=new",
                "--no-sandbox",  # CI runs as root
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                f"--user-data-dir={profile}",
                f"--proxy-server=http://127.0.0.1:{server.server_address[1]}",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--enable-logging=stderr",
                "--v=0",
                f"--window-size={size}",
            ]
            url = path.resolve().as_uri()
            dumped = subprocess.run(
                [*base, "--dump-dom", url],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert dumped.returncode == 0, dumped.stderr[-2000:]
            console = [ln for ln in dumped.stderr.splitlines() if CONSOLE.search(ln)]
            if screenshot is not None:
                shot = subprocess.run(
                    [*base, f"--screenshot={screenshot}", url],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
                console += [ln for ln in shot.stderr.splitlines() if CONSOLE.search(ln)]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return Page(dumped.stdout, console, list(server.seen))  # type: ignore[attr-defined]


def not_blank(png: Path) -> tuple[int, float]:
    """How many colours the picture has, and the share of pixels that are not white."""
    from PIL import Image

    with Image.open(png) as img:
        rgb = img.convert("RGB")
        small = rgb.resize((rgb.width // 4, rgb.height // 4))
        colours = small.getcolors(maxcolors=1 << 20) or []
        white = sum(n for n, c in colours if c == (255, 255, 255))
        return len(colours), 1 - white / (small.width * small.height)
