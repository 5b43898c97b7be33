"""Opt-outs: servers an operator tagged `changeover:do-not-disrupt` are left alone.

Like Karpenter's `karpenter.sh/do-not-disrupt`, the tag is set by the operator (in the
cloud's console, `aws ec2 create-tags`, a static host's `do_not_disrupt = true`) and
never by changeover. `rotate` (every form: plain, `--older-than`, `--only-if-needed`) and
`upgrade` never select such a server; their plans list it under `summary.skipped` with
the reason. It keeps serving, and counts toward min-healthy like any serving server.
Each provider fills `Server.tags` from what it already reads, so honouring the tag
costs no API call.
"""

from __future__ import annotations

from collections.abc import Iterable

from orchestrator.models import TAG_DO_NOT_DISRUPT, Server

SKIP_REASON = f"tagged {TAG_DO_NOT_DISRUPT}"


def opted_out(servers: Iterable[Server]) -> dict[str, str]:
    """The opted-out servers among these: server id -> the reason it is skipped."""
    return {s.id: SKIP_REASON for s in servers if s.do_not_disrupt}
