"""`changeover report --output json` for a rebuild on AWS (moto over HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.aws.test_aws_cli import _cli, _config_file
from tests.aws.world import AwsWorld


def test_report_of_an_aws_rebuild(
    aws_server: AwsWorld, tmp_path: Path, aws_env_vars: dict[str, str]
) -> None:
    """The report of an AWS run: every instance's lane, the cutover, the boto3 calls
    per operation and the outcome, as JSON; the HTML is written too."""
    cfg = _config_file(aws_server, tmp_path, address="both")
    config = aws_server.config(address="both")
    aws_server.bootstrap(aws_server.provider(config), config)
    state = tmp_path / "state"
    run = _cli(cfg, state, aws_env_vars, "--output", "json", "rebuild", aws_server.stack, "--yes")
    assert run.returncode == 0, run.stderr[-2000:]
    run_id = json.loads(run.stdout)["run_id"]
    html = tmp_path / "aws.html"
    proc = _cli(cfg, state, aws_env_vars, "--output", "json", "report", run_id, "--html", str(html))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    assert rep["outcome"] == "succeeded" and rep["exit_code"] == 0
    new = [ln for ln in rep["servers"] if ln["side"] == "new"]
    old = [ln for ln in rep["servers"] if ln["side"] == "old"]
    assert len(new) == len(old) == 3
    assert all(ln["events"].get("serving") is not None for ln in new)
    assert all(ln["destroyed"] for ln in old)
    assert "cutover" in [m["kind"] for m in rep["markers"]]
    assert rep["api_calls"]["RunInstances"] >= 1 and rep["api_calls"]["TerminateInstances"] >= 1
    assert html.read_text().startswith("<!DOCTYPE html>")
