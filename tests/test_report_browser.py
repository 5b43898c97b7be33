"""The HTML report as a person sees it: opened in headless Chromium, offline.

`CHANGEOVER_WRITE_DOCS=1 pytest tests/test_report_browser.py` also saves the rehearsal
report's screenshot as docs/report.png (the README shows it).
"""

from __future__ import annotations

import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import html5lib
import pytest
from html5lib.html5parser import ParseError

from orchestrator.rehearse import World, load_scenario, run_scenario
from tests.browser import Page, not_blank, open_page
from tests.test_report import _last_run

DOCS_PNG = Path(__file__).parent.parent / "docs" / "report.png"

SCENARIO = """\
name: report-under-load
description: a rebuild under load, for the report's picture
strategy: rebuild
args: ["--bake", "1.5", "--retain", "0.5"]
load: {rate: 150, connections: 4, write_ratio: 0.3}
expect:
  exit_code: 0
  outcome: succeeded
  failed_requests: 0
  writes_lost: 0
"""


class _Dom(HTMLParser):
    """Elements of the DOM Chromium built, with their attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self._in: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def having(self, cls: str) -> list[dict[str, str]]:
        return [a for _, a in self.elements if cls in a.get("class", "").split()]


def _dom(page: Page) -> _Dom:
    dom = _Dom()
    dom.feed(page.dom)
    return dom


def _valid_html(path: Path) -> None:
    html5lib.HTMLParser(strict=True).parse(path.read_text(encoding="utf-8"))


def _clean(page: Page) -> None:
    assert page.console == [], page.console
    assert page.page_requests == [], f"the report fetched: {page.page_requests}"


def test_rehearsal_report_under_load(tmp_path: Path) -> None:
    """A rebuild under load, rehearsed with --html: the picture is not blank, has one
    row per server, the cutover marker and the load charts; the HTML has no error, and
    the page neither logs to the console nor fetches anything."""
    scenario = tmp_path / "report-under-load.yaml"
    scenario.write_text(SCENARIO)
    html = tmp_path / "report.html"
    result = run_scenario(load_scenario(scenario), state_dir=tmp_path / "state", html=html)
    assert result["passed"], result
    _valid_html(html)
    shot = tmp_path / "report.png"
    page = open_page(html, screenshot=shot)
    _clean(page)
    colours, inked = not_blank(shot)
    assert colours > 20 and inked > 0.05, (colours, inked)
    dom = _dom(page)
    rows = dom.having("server-row")
    assert len(rows) == 6, rows  # 1 db + 2 web, new and old
    assert {r["data-side"] for r in rows} == {"new", "old"}
    kinds = [m["data-kind"] for m in dom.having("marker")]
    assert "cutover" in kinds and "freeze" in kinds and "bake_end" in kinds
    charts = {c["data-chart"] for c in dom.having("chart")}
    assert charts == {"requests", "latency"}
    assert "PASS" in "".join(dom.text)
    if os.environ.get("CHANGEOVER_WRITE_DOCS") == "1":
        shutil.copyfile(shot, DOCS_PNG)


def test_rolled_back_report(world: World, tmp_path: Path) -> None:
    """A run rolled back during its bake (a new web server dies): the report shows the
    cutover, then the rollback, and every server's row, in the browser."""
    world.cloud.inject("server", times=1, role="web", die_after=1.5)
    proc = world.cli("rebuild", "demo", "--yes", "--bake", "5")
    assert proc.returncode == 1, proc.stderr[-2000:]
    html = tmp_path / "rolled-back.html"
    rep = world.cli("report", _last_run(world), "--html", str(html))
    assert rep.returncode == 0, rep.stderr
    _valid_html(html)
    page = open_page(html)
    _clean(page)
    dom = _dom(page)
    assert len(dom.having("server-row")) == 6
    kinds = [m["data-kind"] for m in dom.having("marker")]
    assert kinds.index("cutover") < kinds.index("rollback")
    assert "ROLLED_BACK" in "".join(dom.text)
    assert dom.having("undo"), "the undone steps are drawn"


def test_the_browser_checks_can_fail(tmp_path: Path) -> None:
    """The harness sees a fetch, a console message and an HTML error when there is one."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>x</title></head>"
        '<body><img src="http://cdn.example.net/chart.js" alt="">'
        '<script>console.error("boom")</script></body></html>'
    )
    page = open_page(bad)
    assert any("cdn.example.net" in r for r in page.page_requests), page.requests
    assert any("boom" in line for line in page.console), page.console
    bad.write_text("<!DOCTYPE html><html><body><p>unclosed <b>tags</p></body></html>")
    with pytest.raises(ParseError):
        _valid_html(bad)
