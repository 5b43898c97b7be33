"""A run report as one self-contained HTML file: inline CSS and inline SVG drawn here.

Nothing is fetched when the file is opened (no script, no font, no image, no link), so
it can be attached to a ticket or a CI run and read offline years later. The page has:

- a header with the outcome, the exit code, the message and what to do next;
- a timeline (SVG): the steps as bands, one row per server coloured by its state,
  and vertical markers (freeze, write switch, cutover, bake end, rollback, kill,
  resume); with a rehearsal's load, charts of requests and failures per second and of
  p50/p99 latency on the same time axis;
- tables: the health gate's facts per new server, component versions and drift, the
  provider calls per operation, the steps with their attempts and undos, and a
  rehearsal's checks and lost writes.

Elements carry classes and data attributes (`server-row` with `data-server`, `marker`
with `data-kind`) so a browser test can find them in the DOM.
"""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any

WIDTH = 1180  # px, the SVG's width
LABEL_W = 250  # px, the label column left of the time axis
RIGHT_PAD = 80  # room for a lane's 'destroyed' mark
MARKER_ROWS = 4  # label rows above the axis, so close markers do not overlap
CHAR_W = 6.0  # px, roughly, of a marker label's character
ROW_H = 22
STEP_H = 16
CHART_H = 90

STATE_COLORS = {
    "booting": "#9ecae1",
    "booted": "#6baed6",
    "verified": "#3182bd",
    "serving": "#31a354",
    "out": "#fdae6b",
    "drained": "#bdbdbd",
    "failed": "#de2d26",
}
STATE_LABELS = {
    "booting": "booting",
    "booted": "running, not verified",
    "verified": "verified",
    "serving": "serving",
    "out": "out of service (draining)",
    "drained": "drained",
    "failed": "failed the gate",
}
STEP_COLORS = {"done": "#74a9cf", "failed": "#de2d26", "started": "#fdd49e", "pending": "#eee"}
MARKER_COLORS = {
    "freeze": "#756bb1",
    "switch": "#9e9ac8",
    "cutover": "#e6550d",
    "bake_end": "#31a354",
    "rollback": "#de2d26",
    "kill": "#000000",
    "resume": "#3182bd",
    "paused": "#636363",
    "end": "#636363",
}
OUTCOME_COLORS = {
    "succeeded": "#31a354",
    "noop": "#31a354",
    "rolled_back": "#e6550d",
    "dirty": "#de2d26",
    "precondition_failed": "#636363",
    "paused": "#3182bd",
}

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       margin: 24px; color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 10px; color: #fff;
         font-weight: 600; font-size: 13px; vertical-align: middle; }
.meta { color: #555; }
.next { background: #fff8e1; border-left: 4px solid #e6a700; padding: 8px 12px; margin: 10px 0; }
table { border-collapse: collapse; margin: 4px 0 8px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top;
         font-size: 13px; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #237a3b; font-weight: 600; }
.bad { color: #c0221b; font-weight: 600; }
.bar { display: inline-block; height: 10px; background: #74a9cf; vertical-align: middle; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
svg .lbl { font-size: 12px; }
svg .mlabel { font-size: 10px; font-weight: 600; }
.legend span { display: inline-block; margin-right: 14px; font-size: 12px; }
.legend i { display: inline-block; width: 12px; height: 12px; margin-right: 4px;
            vertical-align: -2px; }
code { font-size: 12px; }
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _nice_step(span: float, ticks: int = 10) -> float:
    raw = max(span, 1e-3) / ticks
    mag = 10 ** math.floor(math.log10(raw))
    return float(next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw))


class _Axis:
    """Seconds since the run began -> x pixels."""

    def __init__(self, start: float, end: float) -> None:
        self.start = start
        self.end = max(end, start + 0.1)
        self.width = WIDTH - LABEL_W - RIGHT_PAD

    def x(self, t: float) -> float:
        return round(LABEL_W + (t - self.start) / (self.end - self.start) * self.width, 2)


def _timeline(r: dict[str, Any]) -> str:
    load = (r.get("load") or {}).get("per_second") or []
    times = [0.0, float(r["duration"])]
    times += [float(p["t"]) for p in load] + [float(p["t"]) + 1 for p in load]
    axis = _Axis(min(times), max(times))
    parts: list[str] = []
    y = 12 + 11 * MARKER_ROWS  # room for marker labels above the axis

    # the axis
    step = _nice_step(axis.end - axis.start)
    tick = math.floor(axis.start / step) * step
    ticks = []
    while tick <= axis.end + 1e-9:
        if tick >= axis.start - 1e-9:
            ticks.append(tick)
        tick += step
    parts.append(
        f'<g class="axis"><line x1="{LABEL_W}" y1="{y}" x2="{axis.x(axis.end)}" '
        f'y2="{y}" stroke="#999"/>'
    )
    for t in ticks:
        x = axis.x(t)
        label = f"{t:g}s" if step >= 1 else f"{t:.1f}s"
        parts.append(
            f'<line x1="{x}" y1="{y - 4}" x2="{x}" y2="{y}" stroke="#999"/>'
            f'<text x="{x}" y="{y - 6}" text-anchor="middle">{_e(label)}</text>'
        )
    parts.append("</g>")
    y += 8

    # the steps, as bands
    parts.append(f'<text class="lbl" x="4" y="{y + 12}" font-weight="600">steps</text>')
    y += 18
    for s in r["steps"]:
        parts.append(f'<g class="step-row" data-step="{_e(s["key"])}">')
        parts.append(f'<text x="14" y="{y + 12}">{_e(s["key"])}</text>')
        if s["start"] is not None:
            end = s["end"] if s["end"] is not None else r["duration"]
            x1, x2 = axis.x(s["start"]), axis.x(end)
            color = "#c6dbef" if s["noop"] else STEP_COLORS.get(s["state"], "#ccc")
            note = f"{s['key']}: {s['state']}, {_fmt(s['seconds'])}s, attempts {s['attempts']}"
            note += f"; no-op: {s['noop']}" if s["noop"] else ""
            note += f"; error: {s['error']}" if s["error"] else ""
            parts.append(
                f'<rect class="band step-{_e(s["state"])}" x="{x1}" y="{y + 2}" '
                f'width="{max(x2 - x1, 2):.2f}" height="{STEP_H - 4}" fill="{color}">'
                f"<title>{_e(note)}</title></rect>"
            )
        if s["undo_start"] is not None:
            u1 = axis.x(s["undo_start"])
            u2 = axis.x(s["undo_end"] if s["undo_end"] is not None else r["duration"])
            parts.append(
                f'<rect class="band undo" x="{u1}" y="{y + 2}" width="{max(u2 - u1, 2):.2f}" '
                f'height="{STEP_H - 4}" fill="#fd8d3c" stroke="#a63603">'
                f"<title>{_e('undo ' + s['key'] + ': ' + str(s['undo']))}</title></rect>"
            )
        parts.append("</g>")
        y += STEP_H

    # one row per server
    y += 10
    parts.append(f'<text class="lbl" x="4" y="{y + 12}" font-weight="600">servers</text>')
    y += 18
    for ln in r["servers"]:
        who = f"{ln['id']}  {ln['role'] or ''} g{ln['generation'] or '?'} ({ln['side']})"
        parts.append(
            f'<g class="server-row" data-server="{_e(ln["id"])}" data-side="{_e(ln["side"])}" '
            f'data-role="{_e(ln["role"])}">'
            f'<rect x="0" y="{y}" width="{WIDTH}" height="{ROW_H}" '
            f'fill="{"#fafafa" if ln["side"] == "old" else "#fff"}"/>'
            f'<text x="14" y="{y + 15}">{_e(who)}</text>'
        )
        for seg in ln["segments"]:
            x1, x2 = axis.x(seg["start"]), axis.x(seg["end"])
            title = f"{ln['id']}: {STATE_LABELS.get(seg['state'], seg['state'])} "
            title += f"{_fmt(seg['start'])}s - {_fmt(seg['end'])}s"
            parts.append(
                f'<rect class="seg seg-{_e(seg["state"])}" x="{x1}" y="{y + 3}" '
                f'width="{max(x2 - x1, 1.5):.2f}" height="{ROW_H - 6}" '
                f'fill="{STATE_COLORS.get(seg["state"], "#ccc")}"><title>{_e(title)}</title></rect>'
            )
        if ln["destroyed"] and ln["events"].get("gone") is not None:
            x = axis.x(ln["events"]["gone"])
            parts.append(
                f'<text class="gone" x="{x + 3}" y="{y + 15}" fill="#c0221b">✕ destroyed</text>'
            )
        parts.append("</g>")
        y += ROW_H
    top_of_markers, bottom = 12 + 11 * MARKER_ROWS, y

    # the load, on the same axis
    if load:
        y += 16
        y = _load_charts(parts, axis, load, y)
        bottom = y

    # markers across everything
    free_from = [0.0] * MARKER_ROWS  # where each label row is free again, in px
    for m in r["markers"]:
        x = axis.x(m["at"])
        label = m["label"][:40]
        row = next((i for i, f in enumerate(free_from) if f <= x), None)
        if row is None:
            row = min(range(MARKER_ROWS), key=lambda i: free_from[i])
        free_from[row] = x + CHAR_W * len(label) + 8
        color = MARKER_COLORS.get(m["kind"], "#444")
        parts.append(
            f'<g class="marker" data-kind="{_e(m["kind"])}">'
            f'<line x1="{x}" y1="{top_of_markers}" x2="{x}" y2="{bottom}" stroke="{color}" '
            f'stroke-width="1.5" stroke-dasharray="5,3"><title>{_e(m["label"])} at '
            f"{_fmt(m['at'])}s</title></line>"
            f'<text class="mlabel" x="{x + 2}" y="{10 + row * 11}" fill="{color}">'
            f"{_e(label)}</text></g>"
        )
    height = bottom + 10
    return (
        f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
        f'height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="run timeline">' + "".join(parts) + "</svg>"
    )


def _load_charts(parts: list[str], axis: _Axis, load: list[dict[str, Any]], y: int) -> int:
    """Requests and failures per second, then p50/p99 latency, on the run's axis."""
    peak = max([p["requests"] for p in load] + [1])
    parts.append('<g class="chart" data-chart="requests">')
    parts.append(f'<text class="lbl" x="4" y="{y + 12}" font-weight="600">requests/s</text>')
    parts.append(f'<text x="14" y="{y + 28}">peak {peak}/s; failures in red</text>')
    base = y + CHART_H
    parts.append(
        f'<line x1="{LABEL_W}" y1="{base}" x2="{axis.x(axis.end)}" y2="{base}" stroke="#999"/>'
    )
    for p in load:
        x1, x2 = axis.x(p["t"]), axis.x(p["t"] + 1)
        h = p["requests"] / peak * (CHART_H - 6)
        parts.append(
            f'<rect x="{x1}" y="{base - h:.2f}" width="{max(x2 - x1 - 1, 1):.2f}" '
            f'height="{h:.2f}" fill="#9ecae1"><title>{p["t"]}s: {p["requests"]} requests, '
            f"{p['failed']} failed</title></rect>"
        )
        if p["failed"]:
            fh = max(p["failed"] / peak * (CHART_H - 6), 2)
            parts.append(
                f'<rect class="failures" x="{x1}" y="{base - fh:.2f}" '
                f'width="{max(x2 - x1 - 1, 1):.2f}" height="{fh:.2f}" fill="#de2d26"/>'
            )
    parts.append("</g>")
    y = base + 14
    top = max([p["p99_ms"] for p in load] + [1.0])
    base = y + CHART_H
    parts.append('<g class="chart" data-chart="latency">')
    parts.append(f'<text class="lbl" x="4" y="{y + 12}" font-weight="600">latency (ms)</text>')
    parts.append(f'<text x="14" y="{y + 28}">p99 (dark), p50 (light); max {top:.1f} ms</text>')
    parts.append(
        f'<line x1="{LABEL_W}" y1="{base}" x2="{axis.x(axis.end)}" y2="{base}" stroke="#999"/>'
    )
    for key, color in (("p50_ms", "#6baed6"), ("p99_ms", "#08519c")):
        points = " ".join(
            f"{axis.x(p['t'] + 0.5)},{base - p[key] / top * (CHART_H - 6):.2f}"
            for p in load
            if p["requests"]
        )
        if points:
            parts.append(
                f'<polyline class="{key}" points="{points}" fill="none" stroke="{color}" '
                f'stroke-width="1.5"/>'
            )
    parts.append("</g>")
    return base + 8


def _legend() -> str:
    states = "".join(
        f'<span><i style="background:{c}"></i>{_e(STATE_LABELS[s])}</span>'
        for s, c in STATE_COLORS.items()
    )
    marks = "".join(
        f'<span><i style="background:{MARKER_COLORS[k]}"></i>{_e(k.replace("_", " "))}</span>'
        for k in ("freeze", "switch", "cutover", "bake_end", "rollback", "kill", "resume")
    )
    return f'<p class="legend">{states}</p><p class="legend">markers: {marks}</p>'


def _table(columns: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(value: Any, cls: str = "") -> str:
    return f'<td class="{cls}">{_e(value)}</td>' if cls else f"<td>{_e(value)}</td>"


def _yes(ok: Any) -> str:
    if ok is None:
        return "<td></td>"
    return '<td class="ok">yes</td>' if ok else '<td class="bad">no</td>'


def _health(r: dict[str, Any]) -> str:
    rows = []
    for h in r["health"]:
        if h.get("server") is None:
            rows.append(
                [
                    _td(h["step"]),
                    '<td class="bad">failed</td>',
                    *(["<td></td>"] * 6),
                    _td("; ".join(h["reasons"])),
                ]
            )
            continue
        versions = ", ".join(f"{k} {v}" for k, v in (h.get("versions") or {}).items())
        rows.append(
            [
                _td(h["server"]),
                '<td class="ok">passed</td>' if h["passed"] else '<td class="bad">failed</td>',
                _yes(h["app_ok"]),
                _td(h["pending"], "num"),
                _td(h["security"], "num"),
                '<td class="bad">yes</td>' if h["reboot_required"] else "<td>no</td>",
                _td(h.get("kernel")),
                _td(versions),
                _td("; ".join(h["reasons"]) + (f" held: {h['held']}" if h.get("held") else "")),
            ]
        )
    if not rows:
        return "<p>No server reached the health gate.</p>"
    cols = ["server", "gate", "app health", "pending", "security", "reboot required"]
    return _table([*cols, "kernel", "versions", "notes"], rows, "health")


def _versions(r: dict[str, Any]) -> str:
    out = ""
    if r["versions"]:
        rows = [
            [
                _td(v["component"]),
                _td(", ".join(v["before"]) or "not recorded"),
                _td(", ".join(v["after"]) or "-"),
                '<td class="bad">changed</td>' if v["changed"] else "<td>same</td>",
            ]
            for v in r["versions"]
        ]
        out += _table(["component", "replaced servers", "new servers", ""], rows, "versions")
    else:
        out += "<p>No component versions were recorded.</p>"
    if r["drift"]:
        rows = [
            [
                _td(d["server"]),
                _td(d["component"]),
                _td(f"{d['recorded']} (run {d['recorded_by']})"),
                _td(d["audited"]),
            ]
            for d in r["drift"]
        ]
        out += "<p>Drift on the replaced servers (seen by audit before this run):</p>"
        out += _table(["server", "component", "recorded", "audited"], rows, "drift")
    else:
        out += "<p>No drift recorded on the replaced servers.</p>"
    return out


def _api_calls(r: dict[str, Any]) -> str:
    calls = r["api_calls"]
    if not calls:
        return "<p>Not recorded: the run's process did not reach its end.</p>"
    peak = max(calls.values())
    rows = [
        [
            _td(op),
            _td(n, "num"),
            f'<td><span class="bar" style="width:{max(2, round(200 * n / peak))}px"></span></td>',
        ]
        for op, n in sorted(calls.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    rows.append(["<th>total</th>", _td(r["api_calls_total"], "num"), "<td></td>"])
    out = _table(["operation", "calls", ""], rows, "api-calls")
    if r.get("api_calls_by") == "the last process":
        out += "<p>Counted by the process that ended the run (it was resumed).</p>"
    if r["retries"]:
        out += "<p>Steps that took more than one attempt (polls and retries): " + ", ".join(
            f"<code>{_e(k)}</code> {n}" for k, n in r["retries"].items()
        )
        out += "</p>"
    return out


def _steps(r: dict[str, Any]) -> str:
    rows = [
        [
            _td(s["index"], "num"),
            _td(s["key"]),
            _td(s["state"], "bad" if s["state"] == "failed" else ""),
            _td(s["attempts"], "num"),
            _td(_fmt(s["start"]), "num"),
            _td(_fmt(s["seconds"]), "num"),
            _td(s["undo"]),
            _td(s["error"] or s["undo_error"] or (f"no-op: {s['noop']}" if s["noop"] else "")),
        ]
        for s in r["steps"]
    ]
    return _table(["#", "step", "state", "attempts", "start (s)", "seconds", "undo", "note"], rows)


def _scenario(r: dict[str, Any]) -> str:
    sc, ld = r.get("scenario"), r.get("load")
    if not sc:
        return ""
    verdict = '<span class="ok">PASS</span>' if sc["passed"] else '<span class="bad">FAIL</span>'
    out = f"<h2>Rehearsal {_e(sc['name'])}: {verdict}</h2>"
    rows = [
        [
            _td(c["check"]),
            _yes(c["ok"]).replace(">yes<", ">pass<").replace(">no<", ">FAIL<"),
            _td(c["detail"]),
        ]
        for c in sc["checks"]
    ]
    out += _table(["expectation", "result", "detail"], rows, "checks")
    if ld:
        lat = ld.get("latency_ms", {})
        out += (
            f"<p>Load: {ld['sent']} requests at {ld['rate']} req/s, "
            f'<span class="{"bad" if ld["failed"] else "ok"}">{ld["failed"]} failed</span>; '
            f"latency p50 {lat.get('p50', 0)} ms, p99 {lat.get('p99', 0)} ms. "
            f"Writes acknowledged: {ld['acked_writes']}; "
            f'<span class="{"bad" if ld["writes_lost"] else "ok"}">lost: {ld["writes_lost"]}'
            f"</span>"
            + (f" ({', '.join(map(str, ld['lost_ids']))})" if ld["lost_ids"] else "")
            + "</p>"
        )
        if ld.get("errors"):
            out += "<p>Errors: " + _e(ld["errors"]) + "</p>"
    return out


def render_html(r: dict[str, Any]) -> str:
    """The report as one HTML page (a string), needing nothing from outside."""
    outcome = r["outcome"] or f"{r['status']} (not ended)"
    color = OUTCOME_COLORS.get(r["outcome"] or "", "#3182bd")
    gen = r.get("generation") or {}
    address = r.get("address") or {}
    summary = [
        f"<b>{_e(r['strategy'])}</b> of stack <b>{_e(r['stack'])}</b>",
        f"generation {_e(gen.get('before'))} → {_e(gen.get('after', '?'))}",
        f"took {r['duration']:.1f}s",
        f"exit code <b>{_e(r['exit_code'] if r['exit_code'] is not None else 'none yet')}</b>",
    ]
    if address:
        summary.append(
            f"address {_e(address.get('name'))}: {_e(', '.join(address.get('before', [])))} → "
            f"{_e(', '.join(address.get('after', [])))}"
        )
    body = [
        f'<h1>Run {_e(r["run_id"])} <span class="badge" id="outcome" '
        f'style="background:{color}">{_e(outcome.upper())}</span></h1>',
        f'<p class="meta">{" · ".join(summary)}</p>',
    ]
    if r.get("message") and r["message"] != "done":
        body.append(f'<p id="message">{_e(r["message"])}</p>')
    if r.get("next"):
        body.append(f'<p class="next" id="next"><b>Next:</b> {_e(r["next"])}</p>')
    body += [
        "<h2>Timeline</h2>",
        _legend(),
        f'<div style="overflow-x:auto">{_timeline(r)}</div>',
        _scenario(r),
        "<h2>Health gate</h2>",
        _health(r),
        "<h2>Versions and drift</h2>",
        _versions(r),
        "<h2>Provider calls</h2>",
        _api_calls(r),
        "<h2>Steps</h2>",
        _steps(r),
    ]
    if r.get("resources"):
        body.append(
            "<h2>Resources now</h2><pre>" + _e(json.dumps(r["resources"], indent=2)) + "</pre>"
        )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>changeover run {_e(r['run_id'])}: {_e(outcome)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )
