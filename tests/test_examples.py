"""The scheduling examples in examples/ work as shipped.

Every `changeover ...` command line in them parses against the real command line (no
command runs), the crontab's and the workflow's cron expressions are valid, every YAML
file parses, the Kubernetes objects validate against the Kubernetes schema
(kubernetes-validate, strict), the ConfigMap's changeover.toml loads with changeover's own
loader, and the systemd units pass `systemd-analyze verify` where systemd-analyze exists.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml
from kubernetes_validate.utils import all_versions

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CRON = EXAMPLES / "cron" / "changeover.cron"
SERVICE = EXAMPLES / "systemd" / "changeover-rotate.service"
TIMER = EXAMPLES / "systemd" / "changeover-rotate.timer"
CRONJOB = EXAMPLES / "kubernetes" / "cronjob.yaml"
WORKFLOW = EXAMPLES / "ci" / "github-actions-rotate.yml"
ALL = (CRON, SERVICE, TIMER, CRONJOB, WORKFLOW)

# Kubernetes versions the manifests must validate against: 1.27 made CronJob.timeZone GA.
K8S_VERSIONS = sorted(
    {v for v in all_versions() if tuple(map(int, v.split(".")[:2])) >= (1, 27)},
    key=lambda v: tuple(map(int, v.split("."))),
)
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
NO_SYSTEMD = "systemd-analyze is not installed (Debian's systemd package)"


@pytest.fixture
def systemd_analyze() -> str:
    """systemd-analyze, or skip; under CI (which installs it: .ci/run) a failure."""
    if SYSTEMD_ANALYZE is None:
        if os.environ.get("CI"):
            pytest.fail(f"{NO_SYSTEMD} (CI installs it: see .ci/run)")
        pytest.skip(NO_SYSTEMD)
    return SYSTEMD_ANALYZE


# --- the real command line -----------------------------------------------------------------


class UsageError(Exception):
    """The command line refused the arguments: `changeover` would exit 2 with this."""


def parse_cli(argv: list[str]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Parse `changeover ARGV` with changeover's own command objects, every callback
    replaced by a recorder so nothing runs. Returns the global options, the command's path
    (`rotate`, `security enable`) and its parameters. Raises UsageError where `changeover
    ARGV` would exit 2 with a usage error (an unknown flag, a bad value, a missing
    argument). Duck-typed: typer builds on click, or (0.2x) on a copy of it."""
    from orchestrator.cli import app

    root = typer.main.get_command(app)  # a fresh object: stubbing it changes nothing else
    calls: list[tuple[str, dict[str, Any]]] = []

    def stub(cmd: Any, path: str) -> None:
        def record(**params: Any) -> None:
            calls.append((path, params))

        cmd.callback = record
        for name, sub in getattr(cmd, "commands", {}).items():
            stub(sub, f"{path} {name}".strip())

    stub(root, "")
    try:
        root.main(argv, prog_name="changeover", standalone_mode=False)
    except Exception as exc:
        if getattr(exc, "exit_code", None) == 2 and hasattr(exc, "format_message"):
            raise UsageError(exc.format_message()) from exc
        raise
    assert len(calls) >= 2, f"changeover {shlex.join(argv)}: no command was selected"
    (_, global_opts), (path, params) = calls[0], calls[-1]
    return global_opts, path, params


OPERATOR = re.compile(r"^[();<>|&]+$")
VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def shell_commands(script: str, env: dict[str, str] | None = None) -> list[list[str]]:
    """The changeover command lines in a shell script: from a `changeover` word to the next
    operator or redirection. `$VAR` takes its value from env, or else stands as VAR."""
    env = env or {}
    found: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        expanded = VAR.sub(lambda m: env.get(m[1], m[1]), line)
        lexer = shlex.shlex(expanded, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for i, word in enumerate(words):
            if Path(word).name != "changeover":
                continue
            argv: list[str] = []
            for w in words[i + 1 :]:
                if OPERATOR.match(w):
                    if w[0] in "<>" and argv and argv[-1].isdigit():
                        argv.pop()  # the 2 of 2>>file
                    break
                argv.append(w)
            found.append(argv)
    return found


# --- cron expressions ----------------------------------------------------------------------

MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
MONTHS = {m: i for i, m in enumerate(MONTH_NAMES, 1)}
DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
CRON_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 7, DAYS),
)
CRON_ITEM = re.compile(r"^(?:\*|(\w+)(?:-(\w+))?)(?:/(\d+))?$")


def check_cron(expr: str) -> None:
    """Raise ValueError unless expr is five valid cron time fields (numbers, names, `*`,
    ranges, lists, steps), as cron(8) and GitHub's schedule read them."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"{expr!r}: {len(fields)} time fields, not 5")
    for text, (what, low, high, names) in zip(fields, CRON_FIELDS, strict=True):
        for item in text.split(","):
            m = CRON_ITEM.match(item.lower())
            if m is None:
                raise ValueError(f"{expr!r}: {what} {item!r} is not *, N, N-M or a step")
            bounds = [names.get(v, v) for v in (m[1], m[2]) if v is not None]
            for b in bounds:
                if not str(b).isdigit() or not low <= int(b) <= high:
                    raise ValueError(f"{expr!r}: {what} {b!r} is not in {low}..{high}")
            if len(bounds) == 2 and int(bounds[0]) > int(bounds[1]):
                raise ValueError(f"{expr!r}: {what} range {item!r} runs backwards")
            if m[3] is not None and int(m[3]) < 1:
                raise ValueError(f"{expr!r}: {what} step {m[3]} is below 1")


ENV_LINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\s*=")


def crontab_entries(path: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """A user crontab: its variable assignments and its (time fields, command) lines."""
    env: dict[str, str] = {}
    jobs: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if ENV_LINE.match(line):
            name, value = line.split("=", 1)
            env[name.strip()] = value.strip()
            continue
        fields = line.split(None, 5)
        assert len(fields) == 6, f"{line!r}: five time fields and a command"
        jobs.append((" ".join(fields[:5]), fields[5]))
    return env, jobs


# --- systemd units -------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections, each a list of (key, value) in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = [v for k, v in sections.get(section, []) if k == key]
    assert values, f"[{section}] has no {key}="
    return values[-1]


def exec_start(sections: dict[str, list[tuple[str, str]]]) -> list[str]:
    line = unit_value(sections, "Service", "ExecStart").lstrip("-@:+!")
    return shlex.split(line)


def verify_units(tmp_path: Path, units: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on these unit texts, written to tmp_path, with each
    ExecStart= binary replaced by an executable stub in tmp_path: verify insists that the
    binary exists, and /opt/changeover/bin is the installing host's business."""
    assert SYSTEMD_ANALYZE is not None
    stub = tmp_path / "changeover"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    paths = []
    for name, text in units.items():
        path = tmp_path / name
        path.write_text(re.sub(r"(?m)^(ExecStart=[-@:+!]*)\S+", rf"\g<1>{stub}", text))
        paths.append(str(path))
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *paths],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )


# --- what every example runs ---------------------------------------------------------------


def workflow_doc() -> dict[Any, Any]:
    doc = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(doc, dict)
    return doc


def workflow_on(doc: dict[Any, Any]) -> dict[str, Any]:
    # YAML 1.1 (PyYAML) reads the key `on` as the boolean true; GitHub reads it as "on".
    on = doc.get("on", doc.get(True))
    assert isinstance(on, dict), "the workflow has no `on:` mapping"
    return on


def workflow_commands() -> list[list[str]]:
    """The changeover command lines of the workflow's run: steps, once per matrix value,
    with `${{ matrix.X }}` and the workflow's, job's and step's env substituted."""
    doc = workflow_doc()
    found: list[list[str]] = []
    for job in doc["jobs"].values():
        matrix = job.get("strategy", {}).get("matrix", {})
        combos: list[dict[str, Any]] = [{}]
        for key, values in matrix.items():
            combos = [{**c, key: v} for c in combos for v in values]
        for combo in combos:

            def sub(text: str, combo: dict[str, Any] = combo) -> str:
                return re.sub(r"\$\{\{\s*matrix\.(\w+)\s*\}\}", lambda m: str(combo[m[1]]), text)

            for step in job["steps"]:
                if "run" not in step:
                    continue
                env = {**doc.get("env", {}), **job.get("env", {}), **step.get("env", {})}
                found += shell_commands(step["run"], {k: sub(str(v)) for k, v in env.items()})
    return found


def cronjob_docs() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(CRONJOB.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)
    return docs


def kind(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == name]
    return doc


def cronjob_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = kind(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert isinstance(container, dict)
    return container


def example_commands() -> dict[str, list[list[str]]]:
    """Every changeover command line in the examples, by file."""
    env, jobs = crontab_entries(CRON)
    container = cronjob_container(cronjob_docs())
    assert Path(container["command"][0]).name == "changeover"
    return {
        "cron": [argv for _, command in jobs for argv in shell_commands(command, env)],
        "systemd": [exec_start(unit_settings(SERVICE))[1:]],
        "kubernetes": [[*container["command"][1:], *container.get("args", [])]],
        "ci": workflow_commands(),
    }


# --- tests ---------------------------------------------------------------------------------


def test_examples_are_all_there_and_listed_in_their_readme() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for path in ALL:
        assert path.is_file(), path
        assert path.name in readme, f"examples/README.md does not mention {path.name}"
    assert "examples/" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize(
    "path", sorted(EXAMPLES.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(EXAMPLES))
)
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no YAML document"
    assert all(isinstance(d, dict) for d in docs)


def test_every_changeover_command_line_parses() -> None:
    from orchestrator.cli import parse_duration
    from orchestrator.windows import Schedule

    commands = example_commands()
    # The extractor found what is there (so an empty list cannot pass unnoticed).
    assert {name: len(found) for name, found in commands.items()} == {
        "cron": 2,
        "systemd": 1,
        "kubernetes": 1,
        "ci": 2,
    }
    for name, found in commands.items():
        for argv in found:
            try:
                global_opts, path, params = parse_cli(argv)
            except UsageError as exc:
                pytest.fail(f"{name}: changeover {shlex.join(argv)}: {exc}")
            if path in ("rotate", "upgrade"):
                # Unattended: no prompt, one JSON object on stdout, JSON log lines.
                assert params["yes"], f"{name}: {path} without --yes"
                assert not params["dry_run"]
                assert global_opts["output"] == "json", f"{name}: {path} without --output json"
                assert global_opts["log_format"] == "json", f"{name}: without --log-format json"
            # The values the command checks itself before it touches anything.
            if params.get("window"):
                Schedule.parse(params["window"])
            if params.get("older_than"):
                parse_duration(params["older_than"])


def test_the_command_line_check_catches_a_wrong_flag() -> None:
    _, path, params = parse_cli(["--output", "json", "rotate", "shop", "--only-if-needed", "-y"])
    assert (path, params["only_if_needed"], params["yes"]) == ("rotate", True, True)
    with pytest.raises(UsageError, match="only-if-neded"):
        parse_cli(["rotate", "shop", "--only-if-neded"])
    # Global options go before the command; after it they are not the command's.
    with pytest.raises(UsageError, match="--output"):
        parse_cli(["rotate", "shop", "--output", "json"])
    with pytest.raises(UsageError, match="max-surge"):
        parse_cli(["rotate", "shop", "--max-surge", "0"])
    assert shell_commands('x || changeover -v audit "$S" 2>>log; y', {"S": "shop"}) == [
        ["-v", "audit", "shop"]
    ]


def test_cron_lines() -> None:
    env, jobs = crontab_entries(CRON)
    assert jobs
    for fields, command in jobs:
        check_cron(fields)
        # cron turns an unescaped % into a newline and feeds the rest to stdin.
        assert not re.search(r"(?<!\\)%", command), f"unescaped % in {command!r}"
        assert shell_commands(command, env), f"no changeover command in {command!r}"
    assert env["SHELL"] == "/bin/sh"
    assert env["CHANGEOVER_CONFIG"].startswith("/")
    # No credentials in a crontab.
    assert not {k for k in env if k.startswith("AWS_")}
    # A skip (4) prints nothing, so cron mails only 1, 2 and 3.
    assert all('[ "$rc" -eq 4 ] ||' in command for _, command in jobs)


@pytest.mark.parametrize(
    "expr",
    ["60 * * * *", "* 24 * * *", "* * 0 * *", "* * * 13 *", "* * * * 8", "5-1 * * * *",
     "*/0 * * * *", "* * * *", "@daily", "* * * * mon-fry"],
)  # fmt: skip
def test_cron_check_refuses(expr: str) -> None:
    with pytest.raises(ValueError):
        check_cron(expr)


@pytest.mark.parametrize("expr", ["17 3 * * *", "*/15 2-4 * * 6,0", "0 0 1 jan mon-fri"])
def test_cron_check_accepts(expr: str) -> None:
    check_cron(expr)


def test_systemd_units_say_what_they_promise() -> None:
    service, timer = unit_settings(SERVICE), unit_settings(TIMER)
    assert unit_value(service, "Service", "Type") == "oneshot"
    assert "4" in unit_value(service, "Service", "SuccessExitStatus").split()
    assert unit_value(service, "Service", "User") not in ("", "root", "0")
    assert unit_value(service, "Service", "NoNewPrivileges") == "yes"
    assert unit_value(service, "Service", "ProtectSystem") == "strict"
    state_dir = unit_value(service, "Service", "StateDirectory")
    env = dict(v.split("=", 1) for k, v in service["Service"] if k == "Environment")
    # The state dir is the one StateDirectory= makes writable under ProtectSystem=strict.
    assert env["CHANGEOVER_STATE_DIR"] == f"/var/lib/{state_dir}"
    assert unit_value(service, "Service", "EnvironmentFile").lstrip("-").startswith("/etc/")
    assert exec_start(service)[0].startswith("/")
    assert unit_value(timer, "Timer", "OnCalendar")
    assert unit_value(timer, "Timer", "RandomizedDelaySec")
    assert unit_value(timer, "Timer", "Persistent") == "true"
    assert unit_value(timer, "Timer", "Unit") == SERVICE.name
    assert unit_value(timer, "Install", "WantedBy") == "timers.target"


@pytest.mark.usefixtures("systemd_analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    done = verify_units(tmp_path, {p.name: p.read_text() for p in (SERVICE, TIMER)})
    # verify exits 0 on a mere warning (an unknown key is "ignoring"): any output fails.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.usefixtures("systemd_analyze")
def test_systemd_analyze_verify_catches_a_bad_unit(tmp_path: Path) -> None:
    bad_timer = TIMER.read_text().replace("Persistent=true", "Persitent=true")
    done = verify_units(tmp_path, {SERVICE.name: SERVICE.read_text(), TIMER.name: bad_timer})
    assert "Persitent" in done.stdout + done.stderr


@pytest.mark.usefixtures("systemd_analyze")
def test_systemd_service_stays_hardened(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    helped = subprocess.run(
        [SYSTEMD_ANALYZE, "--help"], capture_output=True, text=True, check=False, timeout=30
    )
    if "--offline" not in helped.stdout:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    verify_units(tmp_path, {SERVICE.name: SERVICE.read_text()})  # writes the stubbed copy
    unit = tmp_path / SERVICE.name
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
    )
    # --threshold is on a 0..100 scale: 20 is the "2.0" systemd prints.
    assert done.returncode == 0, done.stdout[-800:] + done.stderr


def test_kubernetes_objects() -> None:
    docs = cronjob_docs()
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "CronJob", "ServiceAccount"]
    account, config = kind(docs, "ServiceAccount"), kind(docs, "ConfigMap")
    cron = kind(docs, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    check_cron(spec["schedule"])
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    assert "activeDeadlineSeconds" not in job  # a run killed mid-way is left unfinished
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
        "arn:aws:iam::"
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = cronjob_container(docs)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CHANGEOVER_STATE"].startswith("dynamodb://")
    assert not {k for k in env if k.startswith("AWS_")}, "credentials come from the role"
    assert "valueFrom" not in str(container["env"])  # and from no Secret either
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[env["CHANGEOVER_STATE_DIR"]]]
    config_dir, config_file = env["CHANGEOVER_CONFIG"].rsplit("/", 1)
    assert volumes[mounts[config_dir]]["configMap"]["name"] == config["metadata"]["name"]
    assert config_file in config["data"]


def test_the_configmaps_changeover_toml_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.settings import load_settings
    from orchestrator.windows import Schedule

    for var in [v for v in os.environ if v.startswith("CHANGEOVER_")]:
        monkeypatch.delenv(var)
    config = kind(cronjob_docs(), "ConfigMap")
    path = tmp_path / "changeover.toml"
    path.write_text(config["data"]["changeover.toml"])
    settings = load_settings(path)
    container = cronjob_container(cronjob_docs())
    stack = settings.stack(parse_cli(container["args"])[2]["stack"])
    assert stack.provider == "aws"
    Schedule.parse(stack.windows.open)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_schema(version: str) -> None:
    for doc in cronjob_docs():
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_schema_catches_a_misspelt_field() -> None:
    docs = cronjob_docs()
    cron = kind(docs, "CronJob")
    cron["spec"]["concurrencypolicy"] = cron["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, K8S_VERSIONS[-1], strict=True)


def test_github_workflow() -> None:
    doc = workflow_doc()
    on = workflow_on(doc)
    check_cron(on["schedule"][0]["cron"])
    assert "workflow_dispatch" in on
    assert doc["permissions"]["id-token"] == "write"
    (job,) = doc["jobs"].values()
    # One run per stack at a time, queued, never cancelled mid-run.
    assert "matrix.stack" in job["concurrency"]["group"]
    assert job["concurrency"]["cancel-in-progress"] is False
    uses = {s["uses"].split("@")[0]: s for s in job["steps"] if "uses" in s}
    aws = uses["aws-actions/configure-aws-credentials"]["with"]
    assert aws["role-to-assume"] and not {k for k in aws if "access-key" in k}
    upload = uses["actions/upload-artifact"]
    assert upload["if"] == "always()"
    assert {"result.json", "report.html"} <= set(upload["with"]["path"].split())
    assert job["env"]["CHANGEOVER_STATE"].startswith("dynamodb://")
    reports = [argv for argv in workflow_commands() if "report" in argv]
    assert reports and all("--html" in argv for argv in reports)
