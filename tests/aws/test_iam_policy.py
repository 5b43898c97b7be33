"""The documented least-privilege IAM policy covers every call the provider makes, and
conditions every destructive one on the ownership tag."""

from __future__ import annotations

import json
import re
from pathlib import Path

from providers.aws import is_mutating

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"ec2": "ec2", "elbv2": "elasticloadbalancing", "ssm": "ssm"}


def _calls() -> set[str]:
    source = (ROOT / "providers" / "aws.py").read_text()
    found = re.findall(r"api\(\s*(?:p\.|self\.)(ec2|elbv2|ssm),\s*\"(\w+)\"", source)
    return {f"{SERVICES[svc]}:{''.join(w.title() for w in op.split('_'))}" for svc, op in found}


def test_policy_allows_every_call_and_tags_guard_destruction() -> None:
    """Every API the provider calls is allowed; every mutating one carries a tag condition
    or is limited to creating tagged resources."""
    policy = json.loads((ROOT / "docs" / "aws-iam-policy.json").read_text())
    allowed: dict[str, list[dict[str, object]]] = {}
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        for a in actions:
            allowed.setdefault(a, []).append(st)
    calls = _calls()
    assert len(calls) >= 15
    missing = sorted(c for c in calls if c not in allowed)
    assert not missing, f"not in the IAM policy: {missing}"
    for call in calls:
        if is_mutating(call.split(":")[1]) and call != "ssm:SendCommand":
            assert any("Condition" in st for st in allowed[call]), f"{call} is unconditioned"
