"""Start-up: how long the commands a cron job or a shell prompt calls often take, as whole
processes, against the 0.3 s target (issue 15).

Each command runs as its own process through the installed console script (the
`changeover` next to this Python, as cron and shells call it), with stdout a pipe, in a
temporary directory:

- `python -c pass`: the interpreter alone, the floor every ratio is measured against;
- `typer + pydantic alone`: what the two libraries cost any command that takes options,
  without changeover: import typer, parse one option (typer 0.29 converts every option
  through a pydantic TypeAdapter) and validate one pydantic model (the config is one);
- `changeover --help`;
- `changeover status` on a temporary state dir whose journal is empty;
- `changeover stacks` on a small config: one local stack (1 db, 2 web), its local cloud
  not running, so the row reports that and no server is contacted.

The runs are interleaved (one of each command, N times) so that load from other work on
the machine falls on all of them alike, after one warm-up run each that is not counted.
It prints each command's median, min and max wall time, its median CPU time (user plus
system: less disturbed by other work than the wall time), the ratio of its median to
`python -c pass`'s, and whether the median is under the target.
Python caches compiled bytecode in a private temporary directory (PYTHONPYCACHEPREFIX),
as an installed package has it; `--no-bytecode-cache` compiles changeover's own modules
in every process instead, as a checkout under PYTHONDONTWRITEBYTECODE=1 does.

What is measured is the install next to this Python, so measure the one users get: the
quickstart's `pip install .` into a fresh venv. An editable install (`pip install -e`, a
development checkout) adds its import finder to every process, `python -c pass` included;
the header says which kind of install was measured, and which interpreter.

    python3 -m venv /tmp/co && /tmp/co/bin/pip install -q . && \
        /tmp/co/bin/python bench/startup.py [--runs 9] [--no-bytecode-cache] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_S = 0.3

CONFIG = """\
[stacks.shop]
provider = "local"
address = "shop-eip"

[stacks.shop.roles.db]
count = 1
data = true

[stacks.shop.roles.web]
count = 2
"""


def _changeover() -> str:
    script = Path(sys.executable).with_name("changeover")
    if not script.exists():
        sys.exit(f"no console script at {script}: install changeover (pip install .) first")
    return str(script)


# What typer and pydantic cost a command that takes options, changeover aside.
LIBRARIES = """\
import typer
from pydantic import BaseModel

class Config(BaseModel):
    state_dir: str = "."

app = typer.Typer(add_completion=False)

@app.command()
def main(state_dir: str = typer.Option(".")) -> None:
    Config.model_validate({"state_dir": state_dir})

app(["--state-dir", "/tmp"], standalone_mode=False)
"""

# Where `orchestrator` is imported from: site-packages (a user install) or elsewhere.
WHERE = """\
import os, sys, sysconfig, orchestrator
pkg = os.path.realpath(orchestrator.__file__)
site = os.path.realpath(sysconfig.get_paths()["purelib"])
print("user" if pkg.startswith(site + os.sep) else "editable")
print(os.path.realpath(sys.executable))
"""


def _install(root: Path, env: dict[str, str]) -> tuple[str, str]:
    """The kind of install measured ("user" or "editable") and the interpreter behind it."""
    out = subprocess.run(
        [sys.executable, "-c", WHERE], cwd=root, env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    return out[0], out[1]


def _commands(root: Path) -> list[tuple[str, list[str]]]:
    exe, state, config = _changeover(), str(root / "state"), str(root / "changeover.toml")
    return [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("typer + pydantic alone", [sys.executable, "-c", LIBRARIES]),
        ("changeover --help", [exe, "--help"]),
        ("changeover status", [exe, "--state-dir", state, "status"]),
        ("changeover stacks", [exe, "--config", config, "--state-dir", state, "stacks"]),
    ]


def _env(root: Path, bytecode_cache: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHANGEOVER_")}
    env["HOME"] = str(root / "home")  # nothing of the user's state or config is read
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(argv: list[str], root: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one whole process."""
    cpu, start = _cpu_children(), time.perf_counter()
    proc = subprocess.run(
        argv, cwd=root, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr}")
    return elapsed, _cpu_children() - cpu


def measure(runs: int, bytecode_cache: bool) -> tuple[list[dict[str, Any]], tuple[str, str]]:
    """Each command's figures, and the install measured (its kind and interpreter)."""
    with tempfile.TemporaryDirectory(prefix="changeover-startup-") as tmp:
        root = Path(tmp)
        (root / "home").mkdir()
        (root / "changeover.toml").write_text(CONFIG)
        commands, env = _commands(root), _env(root, bytecode_cache)
        install = _install(root, env)
        for _, argv in commands:  # warm-up: bytecode cache, the journal's file
            _run(argv, root, env)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in commands}
        for _ in range(runs):
            for name, argv in commands:
                times[name].append(_run(argv, root, env))
    floor = statistics.median(wall for wall, _ in times["python -c pass"])
    libraries = statistics.median(wall for wall, _ in times["typer + pydantic alone"])
    rows = []
    for name, samples in times.items():
        walls = [wall for wall, _ in samples]
        median = statistics.median(walls)
        rows.append(
            {
                "command": name,
                "median_s": round(median, 4),
                "min_s": round(min(walls), 4),
                "max_s": round(max(walls), 4),
                "cpu_median_s": round(statistics.median(cpu for _, cpu in samples), 4),
                "vs_python": round(median / floor, 1),
                # --help parses no option: it loads rich, not pydantic
                "over_libraries_s": round(median - libraries, 4)
                if name.startswith("changeover") and not name.endswith("--help")
                else None,
                "under_target": median < TARGET_S,
            }
        )
    return rows, install


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=9, help="timed runs of each command (9)")
    ap.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="compile changeover's modules in every process (PYTHONDONTWRITEBYTECODE=1)",
    )
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs must be at least 1")
    load_before = os.getloadavg()[0]
    rows, (install, interpreter) = measure(a.runs, bytecode_cache=not a.no_bytecode_cache)
    load_after = os.getloadavg()[0]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    figures = {
        "machine": machine,
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "runs": a.runs,
        "bytecode_cache": not a.no_bytecode_cache,
        "via": "console script",
        "install": install,
        "interpreter": interpreter,
        "target_s": TARGET_S,
        "commands": rows,
    }
    if a.json:
        print(json.dumps(figures))
        return
    print(
        f"start-up, whole processes through the console script, median of {a.runs} runs "
        f"({machine}; load average {load_before:.2f} before, {load_after:.2f} after; "
        f"bytecode cache {'on' if figures['bytecode_cache'] else 'off'})"
    )
    print(f"  interpreter {interpreter}; {install} install")
    if install != "user":
        print(
            "  note: an editable install adds its import finder to every process; users get "
            "`pip install .` (see this file's docstring)"
        )
    print(
        f"  {'command':<22} {'median':>8} {'min':>8} {'max':>8} {'CPU':>8} {'vs python':>10}"
        f" {'vs libs':>8}  target (on the median)"
    )
    for r in rows:
        ours = r["command"].startswith("changeover")
        verdict = (
            (f"under {TARGET_S} s" if r["under_target"] else f"OVER {TARGET_S} s") if ours else "-"
        )
        over = f"{'-':>9}"
        if r.get("over_libraries_s") is not None:
            over = f"{r['over_libraries_s'] * 1000:+7.0f}ms"
        print(
            f"  {r['command']:<22} {r['median_s']:>7.3f}s {r['min_s']:>7.3f}s "
            f"{r['max_s']:>7.3f}s {r['cpu_median_s']:>7.3f}s {r['vs_python']:>9.1f}x"
            f" {over}  {verdict}"
        )


if __name__ == "__main__":
    main()
