"""The AWS provider (boto3): EC2 instances, Elastic IPs, ELBv2 target groups, EBS, SSM.

- Servers are EC2 instances found by the ownership tags (I7). They are launched from a
  launch template, an AMI, or the latest AMI named by an SSM public parameter, with
  first-boot cloud-init that upgrades everything (providers/cloudinit.py).
- The address is an Elastic IP (one holder, read back from DescribeAddresses, never
  from the instance's PublicIpAddress) or an ELBv2 target group (register new, wait
  healthy, deregister old, wait out the deregistration delay while draining).
- Data moves as EBS: snapshot live, freeze with the user's command over SSM, final
  snapshot, volume in the new instance's AZ, attach (always with InstanceId).
- Every API call is counted per operation by botocore event hooks, and retried with
  jittered exponential backoff when AWS says it is transient (throttling, 5xx,
  eventual consistency). Polling is batched: one DescribeInstances per poll.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import boto3
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
    WaiterError,
)
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from orchestrator import events
from orchestrator.audit import check_hygiene
from orchestrator.errors import (
    BadInput,
    CapabilityError,
    ChangeoverError,
    PreconditionFailed,
    StepFailed,
    TransientError,
)
from orchestrator.log import get_logger
from orchestrator.models import (
    TAG_GENERATION,
    TAG_ROLE,
    TAG_RUN,
    TAG_STACK,
    TAG_TOKEN,
    DataSummary,
    HealthReport,
    Server,
    ServerState,
)
from orchestrator.settings import HealthCheck, HygienePolicy, RoleConfig, StackConfig
from providers.base import NoInPlaceUpgrades
from providers.cloudinit import READY_FILE, first_boot_user_data
from providers.hostkeys import HostKeyPins, ssh_transport
from providers.transport import CommandResult, Transport, TransportUnavailable

# Error codes AWS documents as worth retrying, plus eventual consistency after a launch.
TRANSIENT_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "InvalidInstanceID.NotFound",
        "InvalidVolume.NotFound",
        "InvalidSnapshot.NotFound",
        "InvocationDoesNotExist",
        "IncorrectInstanceState",
    }
)
# Operation-name prefixes that change the world; `plan` must make none (I8).
MUTATING_PREFIXES = (
    "Run", "Terminate", "Create", "Delete", "Associate", "Disassociate", "Register",
    "Deregister", "Attach", "Detach", "Modify", "Send", "Start", "Stop", "Reboot",
    "Allocate", "Release", "Put", "Add", "Remove",
)  # fmt: skip
TAG_DATA_MODE = "changeover:data-mode"
# "small" and friends are portable sizes; anything else is taken as an instance type.
SIZES = {"small": "t3.small", "medium": "t3.medium", "large": "t3.large", "xlarge": "t3.xlarge"}
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
STATE_MAP: dict[str, ServerState] = {
    "pending": "pending",
    "running": "running",
    "stopping": "stopped",
    "stopped": "stopped",
    "shutting-down": "terminated",
    "terminated": "terminated",
}
SSM_POLL = 1.0  # seconds between GetCommandInvocation polls
STATUS_IDS = 100  # DescribeInstanceStatus takes at most 100 instance ids by name
# Reads kept for reuse until the engine's next poll or wait (refresh()) or a change of
# ours that makes them stale: a step that just read the instances, the address holder or
# the target health does not ask AWS again (API economy). Polls (GetCommandInvocation,
# waiters) are never kept.
KEPT_READS = frozenset(
    {
        "describe_instances",
        "describe_addresses",
        "describe_target_health",
        "describe_target_groups",
        "describe_tags",
        "describe_instance_status",
        "describe_volumes",
        "get_parameter",
    }
)
# What each of our changes makes stale; any other change forgets every kept read.
# Launching adds instances (listings change, known instances do not); terminating drops
# the instances it names; an address move changes holders and public IPs; a target
# (de)registration changes target health; a command over SSM changes nothing kept.
STALE_AFTER: dict[str, frozenset[str]] = {
    "run_instances": frozenset({"describe_instances"}),
    "terminate_instances": frozenset({"describe_instances"}),
    "associate_address": frozenset({"describe_addresses", "describe_instances"}),
    "disassociate_address": frozenset({"describe_addresses", "describe_instances"}),
    "register_targets": frozenset({"describe_target_health"}),
    "deregister_targets": frozenset({"describe_target_health"}),
    "send_command": frozenset(),
}
HTTP_PORT = 80
# Our own target changes, and the state AWS gives a target right after each.
TARGET_CHANGES = {"register_targets": "initial", "deregister_targets": "draining"}

Prober = Callable[[str, int, str, float], tuple[int, str | None]]


def http_probe(host: str, port: int, path: str, timeout: float) -> tuple[int, str | None]:
    """GET host:port/path: (status, the server that answered if it says). 0 if unreachable."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("X-Changeover-Backend")
    except (OSError, http.client.HTTPException):
        return 0, None
    finally:
        conn.close()


def is_mutating(operation: str) -> bool:
    return operation.startswith(MUTATING_PREFIXES)


def to_op_name(method: str) -> str:
    """boto3's method name as the API's operation name: run_instances -> RunInstances."""
    return "".join(part.capitalize() for part in method.split("_"))


class AwsError(ChangeoverError):
    """AWS refused a call for a reason retrying will not fix."""

    exit_code = 1

    def __init__(self, operation: str, code: str, message: str) -> None:
        self.operation = operation
        self.code = code
        super().__init__(f"aws {operation}: {code}: {message}")


def _map_error(operation: str, exc: Exception) -> Exception:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in TRANSIENT_CODES or status >= 500:
            return TransientError(f"aws {operation}: {code} (transient)")
        return AwsError(operation, code, str(err.get("Message", "")))
    if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError)):
        return TransientError(f"aws {operation}: {exc}")
    return exc


class ApiAccounting:
    """Counts every AWS API call by operation, via botocore's event hooks."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.mutating: list[str] = []

    def attach(self, client: Any) -> None:
        client.meta.events.register("before-call", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.calls[model.name] += 1
        if is_mutating(model.name):
            self.mutating.append(model.name)


class SsmTransport:
    """Runs commands through SSM RunCommand (AWS-RunShellScript), polling for the result."""

    name = "ssm"

    def __init__(self, provider: AwsProvider) -> None:
        self.provider = provider

    def run(self, server: Server, command: str, *, timeout: float = 30.0) -> CommandResult:
        p = self.provider
        sent = p.api(
            p.ssm,
            "send_command",
            InstanceIds=[server.id],
            DocumentName="AWS-RunShellScript",
            Parameters={"commands": [command]},
            TimeoutSeconds=max(30, int(timeout)),
        )
        command_id = sent["Command"]["CommandId"]
        deadline = time.monotonic() + timeout
        while True:
            try:
                inv = p.api(
                    p.ssm, "get_command_invocation", CommandId=command_id, InstanceId=server.id
                )
            except TransientError:
                inv = {"Status": "Pending"}
            status = inv.get("Status")
            if status in ("Success", "Failed", "Cancelled", "TimedOut"):
                return CommandResult(
                    int(inv.get("ResponseCode", 0 if status == "Success" else 1)),
                    str(inv.get("StandardOutputContent", "")),
                    str(inv.get("StandardErrorContent", "")),
                )
            if time.monotonic() >= deadline:
                raise TransportUnavailable(f"ssm command on {server.id} timed out ({status})")
            p.sleep(SSM_POLL)


class AwsProvider(NoInPlaceUpgrades):
    """Provider for stacks on AWS."""

    name = "aws"

    def __init__(
        self,
        *,
        stack: str,
        config: StackConfig,
        session: Any,
        endpoint_url: str | None = None,
        prober: Prober = http_probe,
        transport: Transport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        call_attempts: int = 8,
        call_deadline: float = 60.0,
    ) -> None:
        self.stack = stack
        self.config = config
        self.accounting = ApiAccounting()
        self.ec2 = session.client("ec2", endpoint_url=endpoint_url)
        self.elbv2 = session.client("elbv2", endpoint_url=endpoint_url)
        self.ssm = session.client("ssm", endpoint_url=endpoint_url)
        for client in (self.ec2, self.elbv2, self.ssm):
            self.accounting.attach(client)
        self.calls: Counter[str] = Counter()
        self.prober = prober
        self.transport: Transport = transport or SsmTransport(self)
        # SSH host keys are pinned from the console before the first connection.
        self.host_keys = HostKeyPins(console=self._console_output)
        if transport is None and config.hygiene.transport == "ssh":
            self.transport = ssh_transport(config.hygiene.ssh, self.host_keys)
        self.host_keys.attach(self.transport)
        self.sleep = sleep
        self.call_attempts = call_attempts
        self.call_deadline = call_deadline
        self.log = get_logger(provider="aws", stack_name=stack)
        self._tg_arns: dict[str, str] = {}  # target group name or ARN -> checked ARN
        self._statuses: dict[str, Any] = {}  # one batch's DescribeInstanceStatus answers
        self._kept: dict[str, Any] = {}  # reads kept until refresh() or a change
        self._known: dict[str, dict[str, Any]] = {}  # instances of the stack, by id, ditto
        self._interest: list[str] = []  # what this poll is about (ex_prefetch)
        self._status_ids: list[str] | None = None  # this poll's DescribeInstanceStatus ids
        # RunInstances' answers, for as long as the provider lives: an instance's id, tags,
        # private address and launch time never change, so in a poll only its state is
        # read again (_launched_states).
        self._launched: dict[str, dict[str, Any]] = {}
        self._registered: set[tuple[str, str]] = set()  # (group, target) ex_add_members sent

    @property
    def api_calls(self) -> Counter[str]:
        return self.accounting.calls

    # --- calling AWS -----------------------------------------------------------------
    def refresh(self) -> None:
        """Forget kept reads: the engine's next poll asks AWS again."""
        self._kept.clear()
        self._known.clear()
        self._interest = []
        self._status_ids = None

    def ex_prefetch(self, stack: str, ids: list[str]) -> None:
        """The servers one poll is about (every replacement in flight of a sliding
        window, whatever stage each is in): until the next refresh(), the first read of
        each kind (instances, status checks, addresses) asks about all of them at once,
        and the reads after it are answered from that one call."""
        self._interest = list(dict.fromkeys(ids))

    def _with_interest(self, ids: list[str]) -> list[str]:
        return sorted({*ids, *self._interest}) if set(ids) <= set(self._interest) else ids

    def _status_interest(self, ids: list[str]) -> list[str]:
        """For DescribeInstanceStatus, whose InstanceIds must all exist: in a poll, the
        poll's servers that this provider launched or that this poll's DescribeInstances
        saw running. Fixed at the poll's first status read and only ever grown, so the
        reads of statuses in one poll (boot waits, status checks) are one call."""
        if not set(ids) <= set(self._interest):
            return ids
        if self._status_ids is None or not set(ids) <= set(self._status_ids):
            seen = [
                i
                for i in self._interest
                if i in self._launched
                or self._known.get(i, {}).get("State", {}).get("Name") == "running"
            ]
            self._status_ids = sorted({*ids, *seen, *(self._status_ids or [])})
        return self._status_ids

    def _launched_states(self, ids: list[str]) -> list[dict[str, Any]] | None:
        """In a poll (ex_prefetch): servers this provider launched, as RunInstances
        described them, with their state from the poll's DescribeInstanceStatus
        (IncludeAllInstances: pending ones too), the read VerifyServers' status checks
        make anyway. So a boot wait and the status checks of every lane in flight cost one
        call. None where that cannot answer: outside a poll, a server launched by another
        process, or SSH over public addresses (a public IP comes after the launch and
        moves with an elastic IP). An id the answer lacks is absent, like a filter's."""
        if (
            not self._interest
            or not ids
            or all(i in self._known for i in ids)  # read in this poll already
            or self.config.hygiene.ssh.address == "public"
            or not all(i in self._launched for i in ids)
        ):
            return None
        statuses = self._instance_statuses(self._status_interest(ids))
        return [
            {**self._launched[i], "State": statuses[i]["InstanceState"]}
            for i in ids
            if i in statuses
        ]

    def _instance_statuses(self, ids: list[str]) -> dict[str, Any]:
        """DescribeInstanceStatus (IncludeAllInstances: pending and stopped ones too) of
        these instances, by id, in calls of at most STATUS_IDS ids, the most AWS takes
        (a rotate's meltdown check reads every new server of the run)."""
        found: dict[str, Any] = {}
        for at in range(0, len(ids), STATUS_IDS):
            described = self.api(
                self.ec2,
                "describe_instance_status",
                InstanceIds=ids[at : at + STATUS_IDS],
                IncludeAllInstances=True,
            )["InstanceStatuses"]
            found.update((st["InstanceId"], st) for st in described)
        return found

    def _stale(self, operation: str, kwargs: dict[str, Any]) -> None:
        """Forget what one of our changes makes stale (before it is sent: a call that
        fails part-way may have changed things too)."""
        if operation not in STALE_AFTER:
            self.refresh()
            return
        stale = STALE_AFTER[operation]
        self._kept = {k: v for k, v in self._kept.items() if k.split(" ", 1)[0] not in stale}
        for instance in [*kwargs.get("InstanceIds", []), kwargs.get("InstanceId")]:
            self._known.pop(str(instance), None)

    def _keep(self, operation: str, kwargs: dict[str, Any], fn: Callable[[], Any]) -> Any:
        """A read answered from what this poll already read, or read and kept."""
        if operation in TARGET_CHANGES:
            # What AWS reports right after it took the change: a registered target is
            # `initial`, a deregistered one `draining`. Kept target health is brought up
            # to date rather than read again; a call that fails forgets it.
            try:
                result = fn()
            except BaseException:
                self._stale(operation, kwargs)
                raise
            self._patch_health(kwargs, TARGET_CHANGES[operation])
            return result
        if is_mutating(to_op_name(operation)):
            self._stale(operation, kwargs)
            return fn()
        if operation not in KEPT_READS:
            return fn()
        key = f"{operation} {json.dumps(kwargs, sort_keys=True, default=str)}"
        if key not in self._kept:
            self._kept[key] = fn()
        return self._kept[key]

    def _patch_health(self, kwargs: dict[str, Any], state: str) -> None:
        arn = kwargs.get("TargetGroupArn")
        ids = [t["Id"] for t in kwargs.get("Targets", [])]
        for key, kept in self._kept.items():
            if not key.startswith("describe_target_health ") or f'"{arn}"' not in key:
                continue
            rows = kept["TargetHealthDescriptions"]
            for i in ids:
                row = next((r for r in rows if r["Target"]["Id"] == i), None)
                if row is None:
                    rows.append({"Target": {"Id": i}, "TargetHealth": {"State": state}})
                else:
                    row["TargetHealth"] = {"State": state}

    def api(self, client: Any, operation: str, **kwargs: Any) -> Any:
        """One AWS call, retried with jittered backoff while AWS says it is transient."""
        return self._keep(
            operation,
            kwargs,
            lambda: self._retrying(operation, lambda: getattr(client, operation)(**kwargs)),
        )

    def paginate(self, client: Any, operation: str, key: str, **kwargs: Any) -> list[Any]:
        """Every item of a paginated call (boto3's paginator), retried as a whole: a
        throttled page restarts the listing, so nothing is half-read."""

        def everything() -> list[Any]:
            pages = client.get_paginator(operation).paginate(**kwargs)
            return [item for page in pages for item in page.get(key, [])]

        result: list[Any] = self._keep(
            operation, {"_key": key, **kwargs}, lambda: self._retrying(operation, everything)
        )
        return result

    def _retrying(self, operation: str, fn: Callable[[], Any]) -> Any:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self.log.warning(
                events.PROVIDER_RETRY,
                operation=operation,
                attempt=state.attempt_number,
                error=str(exc),
            )

        def call() -> Any:
            try:
                return fn()
            except Exception as exc:
                raise _map_error(operation, exc) from exc

        retrying = Retrying(
            stop=stop_after_attempt(self.call_attempts) | stop_after_delay(self.call_deadline),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            retry=retry_if_exception_type(TransientError),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(call)

    def _op(self, name: str) -> None:
        self.calls[name] += 1

    # --- servers -------------------------------------------------------------------------
    def _instances(self, stack: str, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        flt = [{"Name": f"tag:{TAG_STACK}", "Values": [stack]}, *filters]
        found = [
            i
            for r in self.paginate(self.ec2, "describe_instances", "Reservations", Filters=flt)
            for i in r["Instances"]
        ]
        self._known.update((i["InstanceId"], i) for i in found)
        return found

    def _by_ids(self, stack: str, ids: list[str]) -> list[dict[str, Any]]:
        """The stack's instances among `ids`: from what was read since the last poll if
        every one is known, else one DescribeInstances. A filter (not InstanceIds), so an
        id AWS does not show yet is simply absent, and only our own come back (I7)."""
        if all(i in self._known for i in ids):
            return [self._known[i] for i in ids]
        if self._interest:
            # A poll of a sliding window: one listing of the stack answers every lane's
            # reads (its new servers, the members a stop check counts, the old ones).
            self._instances(stack, [{"Name": "instance-state-name", "Values": LIVE_STATES}])
            if all(i in self._known for i in ids):
                return [self._known[i] for i in ids]
        wanted = set(ids)
        found = self._instances(
            stack, [{"Name": "instance-id", "Values": self._with_interest(ids)}]
        )
        return [i for i in found if i["InstanceId"] in wanted]

    def _to_server(self, inst: dict[str, Any]) -> Server:
        tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
        role = tags.get(TAG_ROLE, "")
        role_cfg = self.config.roles.get(role)
        use_public = self.config.hygiene.ssh.address == "public"
        host = inst.get("PublicIpAddress") if use_public else inst.get("PrivateIpAddress")
        return Server(
            id=inst["InstanceId"],
            stack=tags.get(TAG_STACK, ""),
            role=role,
            generation=int(tags.get(TAG_GENERATION, "0") or 0),
            run=tags.get(TAG_RUN, ""),
            state=STATE_MAP.get(inst["State"]["Name"], "pending"),
            host=host,
            port=role_cfg.health.port if role_cfg else None,
            created_at=inst["LaunchTime"].timestamp() if "LaunchTime" in inst else 0.0,
            tags=tags,
        )

    def list_servers(self, stack: str) -> list[Server]:
        self._op("list_servers")
        live = [{"Name": "instance-state-name", "Values": LIVE_STATES}]
        return [self._to_server(i) for i in self._instances(stack, live)]

    def describe_servers(self, stack: str, ids: list[str]) -> list[Server]:
        self._op("describe_servers")
        if not ids:
            return []
        found = self._launched_states(ids)
        return [self._to_server(i) for i in (self._by_ids(stack, ids) if found is None else found)]

    def _image(self, role: str, cfg: RoleConfig) -> dict[str, Any]:
        launch = cfg.launch
        if launch.launch_template:
            key = (
                "LaunchTemplateId"
                if launch.launch_template.startswith("lt-")
                else ("LaunchTemplateName")
            )
            return {
                "LaunchTemplate": {
                    key: launch.launch_template,
                    "Version": launch.launch_template_version,
                }
            }
        if launch.ami:
            return {"ImageId": launch.ami}
        if launch.ami_ssm_parameter:
            param = self.api(self.ssm, "get_parameter", Name=launch.ami_ssm_parameter)
            return {"ImageId": param["Parameter"]["Value"]}
        if cfg.image.startswith("ami-"):
            return {"ImageId": cfg.image}
        raise BadInput(
            f"role {role!r} has no image: set roles.{role}.launch.ami, "
            f"launch.ami_ssm_parameter or launch.launch_template"
        )

    def create_servers(
        self,
        *,
        stack: str,
        role: str,
        generation: int,
        run_id: str,
        count: int,
        image: str,
        size: str,
        idempotency_key: str,
        links: dict[str, str],
        fresh: bool = False,
    ) -> list[Server]:
        self._op("create_servers")
        token_filter = [
            {"Name": f"tag:{TAG_TOKEN}", "Values": [idempotency_key]},
            {"Name": "instance-state-name", "Values": LIVE_STATES},
        ]
        # A first attempt finds nothing; a retried or resumed one may find a launch that
        # went through (the ClientToken below guards the same on AWS's side).
        existing = [] if fresh else self._instances(stack, token_filter)
        missing = count - len(existing)
        if missing <= 0:
            return [self._to_server(i) for i in existing[:count]]
        cfg = self.config.roles[role]
        launch = cfg.launch
        tags = [
            {"Key": TAG_STACK, "Value": stack},
            {"Key": TAG_ROLE, "Value": role},
            {"Key": TAG_GENERATION, "Value": str(generation)},
            {"Key": TAG_RUN, "Value": run_id},
            {"Key": TAG_TOKEN, "Value": idempotency_key},
            {"Key": "Name", "Value": f"{stack}-{role}-g{generation}"},
        ]
        kwargs: dict[str, Any] = {
            **self._image(role, cfg),
            "MinCount": missing,
            "MaxCount": missing,
            # Like the tag lookup above, but AWS-side: a retried launch never doubles.
            "ClientToken": hashlib.sha256(
                f"{idempotency_key}/{len(existing)}".encode()
            ).hexdigest()[:64],
            "UserData": first_boot_user_data(launch.user_data, self.config.security),
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }
        instance_type = launch.instance_type or SIZES.get(size, size)
        if not launch.launch_template or launch.instance_type:
            kwargs["InstanceType"] = instance_type
        if launch.subnets:
            kwargs["SubnetId"] = launch.subnets[generation % len(launch.subnets)]
        if launch.security_groups:
            kwargs["SecurityGroupIds"] = launch.security_groups
        if launch.key_name:
            kwargs["KeyName"] = launch.key_name
        if launch.instance_profile:
            kwargs["IamInstanceProfile"] = {"Name": launch.instance_profile}
        launched = self.api(self.ec2, "run_instances", **kwargs)["Instances"]
        self._launched.update((i["InstanceId"], i) for i in launched if i.get("Tags"))
        if self._interest:
            # In a sliding window's poll (ex_prefetch; the scheduler refreshes before the
            # next one): RunInstances answered with the instances, pending, with their
            # tags, so a read of them in this poll needs no DescribeInstances.
            self._known.update((i["InstanceId"], i) for i in launched if i.get("Tags"))
        return [self._to_server(i) for i in [*existing, *launched]]

    def destroy_servers(self, stack: str, ids: list[str]) -> list[str]:
        self._op("destroy_servers")
        if not ids:
            return []
        owned = {i["InstanceId"]: i for i in self._by_ids(stack, ids)}
        if foreign := [i for i in ids if i not in owned]:
            raise PreconditionFailed(
                f"instances {foreign} do not carry {TAG_STACK}={stack}; refusing to touch them"
            )
        alive = [
            i
            for i, inst in owned.items()
            if inst["State"]["Name"] not in ("shutting-down", "terminated")
        ]
        if alive:
            self.api(self.ec2, "terminate_instances", InstanceIds=alive)
        return alive

    # --- health ----------------------------------------------------------------------------
    def verify_servers(
        self, servers: list[Server], checks: dict[str, HealthCheck], policy: HygienePolicy
    ) -> list[HealthReport]:
        """One DescribeInstanceStatus for every ec2-status check of the batch (per 100)."""
        status_ids = [s.id for s in servers if checks[s.role].type == "ec2-status"]
        if status_ids:
            self._statuses = self._instance_statuses(self._status_interest(status_ids))
        try:
            return [self.verify_server(s, checks[s.role], policy) for s in servers]
        finally:
            self._statuses = {}

    def verify_server(
        self, server: Server, check: HealthCheck, policy: HygienePolicy
    ) -> HealthReport:
        self._op("verify_server")
        report = HealthReport(server.id, server.state == "running", False, False)
        if not report.running:
            report.reasons.append(f"instance is {server.state}")
            return report
        report.app_ok, reason = self._app_health(server, check)
        if reason:
            report.reasons.append(reason)
        report.hygiene_ok = self._hygiene(server, policy, report)
        return report

    def _status_checks(self, instance_id: str) -> tuple[bool, str]:
        """EC2's own status checks of one instance (from the batch's answer if any)."""
        if instance_id in self._statuses:
            st = [self._statuses[instance_id]]
        else:
            st = self.api(
                self.ec2,
                "describe_instance_status",
                InstanceIds=[instance_id],
                IncludeAllInstances=True,
            )["InstanceStatuses"]
        statuses = (
            {st[0]["InstanceStatus"]["Status"], st[0]["SystemStatus"]["Status"]}
            if st
            else {"initializing"}
        )
        if statuses == {"ok"}:
            return True, ""
        if statuses <= {"ok", "initializing", "not-applicable"}:
            # Status checks settle a few minutes after boot: wait, don't fail.
            raise TransientError(f"ec2 status checks of {instance_id} still initializing")
        return False, f"ec2 status checks: {', '.join(sorted(statuses))}"

    def _app_health(self, server: Server, check: HealthCheck) -> tuple[bool, str]:
        if check.type == "ec2-status":
            return self._status_checks(server.id)
        if check.type == "target-group":
            groups = [
                ep.name
                for ep in self.config.entry_points
                if server.role in ep.roles and self._address_kind(ep.name) == "target-group"
            ]
            if not groups:
                return False, f"no target group serves role {server.role!r}"
            health = self._target_health(groups[0]).get(server.id)
            return health == "healthy", "" if health == "healthy" else f"target is {health}"
        if server.host is None:
            return False, "instance has no address to check"
        if check.type == "tcp":
            try:
                socket.create_connection((server.host, check.port), check.timeout).close()
                return True, ""
            except OSError as exc:
                return False, f"tcp check failed: {exc}"
        status, _ = self.prober(server.host, check.port, check.path, check.timeout)
        return status == 200, "" if status == 200 else f"health check failed: HTTP {status}"

    def _hygiene(self, server: Server, policy: HygienePolicy, report: HealthReport) -> bool:
        """Host hygiene over the transport (SSM by default): cloud-init has finished,
        then the shared fact script, judged by the shared policy (orchestrator.hygiene)."""
        if (
            policy.pending == "ignore"
            and not policy.reboot_required_fails
            and (not policy.min_versions)
        ):
            return True
        ready = self.transport.run(server, f"test -f {READY_FILE}", timeout=60.0)
        if not ready.ok:
            report.reasons.append(f"cloud-init has not finished ({READY_FILE} missing)")
            return False
        facts, verdict = check_hygiene(self.transport, server, policy)
        report.facts = facts.to_dict()
        report.reasons.extend(verdict.reasons)
        return verdict.ok

    def ex_transport(self, policy: HygienePolicy) -> Transport:
        """The transport `audit` uses on aws: SSM RunCommand unless one was injected."""
        del policy
        return self.transport

    # --- SSH host keys (providers/hostkeys.py) -----------------------------------------------
    def pin_host_keys(
        self, stack: str, servers: list[Server], known: dict[str, list[str]]
    ) -> dict[str, list[str]]:
        """Pin new instances' host keys from their console before hygiene connects over
        SSH (`known`: pins recorded in the journal, used as they are). Over SSM: {}."""
        if not self.host_keys.active:
            return {}
        self._op("pin_host_keys")
        return self.host_keys.pin_servers(servers, known)

    def ex_host_keys(self, server: Server) -> list[str]:
        """The keys pinned for a server, else its console's: for `audit` over SSH."""
        return self.host_keys(server)

    def _console_output(self, server: Server) -> str | None:
        """The instance's serial console (GetConsoleOutput; AWS sends it base64-encoded).
        cloud-init prints the SSH host keys there; empty until it has."""
        try:
            out = self.api(self.ec2, "get_console_output", InstanceId=server.id, Latest=True)
        except AwsError as exc:
            if exc.code != "UnsupportedOperation":
                raise
            # Only Nitro instances offer the latest output; the others buffer it at boot.
            out = self.api(self.ec2, "get_console_output", InstanceId=server.id)
        encoded = out.get("Output") or ""
        try:
            return base64.b64decode(encoded).decode(errors="replace")
        except ValueError:
            return None

    # --- address ---------------------------------------------------------------------------
    def _address_kind(self, address: str) -> Literal["elastic-ip", "target-group"]:
        kind = self.config.entry_point(address).type
        if kind in ("elastic-ip", "target-group"):
            return kind
        if kind != "auto":
            raise CapabilityError(
                "aws", f"entry point type {kind!r}", "use elastic_ip or target_group"
            )
        if address.startswith("eipalloc-") or address.replace(".", "").isdigit():
            return "elastic-ip"
        return "target-group"

    def _eip(self, stack: str, address: str) -> dict[str, Any]:
        key = "AllocationIds" if address.startswith("eipalloc-") else "PublicIps"
        found = self.api(self.ec2, "describe_addresses", **{key: [address]})["Addresses"]
        if not found:
            raise PreconditionFailed(f"elastic IP {address} not found")
        eip: dict[str, Any] = found[0]
        tags = {t["Key"]: t["Value"] for t in eip.get("Tags", [])}
        if tags.get(TAG_STACK) != stack:
            raise PreconditionFailed(
                f"elastic IP {address} does not carry {TAG_STACK}={stack}; refusing to touch it"
            )
        return eip

    def _target_group(self, stack: str, address: str) -> str:
        if address not in self._tg_arns:
            if address.startswith("arn:"):
                arn = address
            else:
                groups = self.api(self.elbv2, "describe_target_groups", Names=[address])
                arn = groups["TargetGroups"][0]["TargetGroupArn"]
            described = self.api(self.elbv2, "describe_tags", ResourceArns=[arn])
            tags = {t["Key"]: t["Value"] for t in described["TagDescriptions"][0]["Tags"]}
            if tags.get(TAG_STACK) != stack:
                raise PreconditionFailed(
                    f"target group {address} does not carry {TAG_STACK}={stack}; refusing it"
                )
            self._tg_arns[address] = arn
        return self._tg_arns[address]

    def _target_health(self, address: str) -> dict[str, str]:
        arn = self._target_group(self.stack, address)
        described = self.api(self.elbv2, "describe_target_health", TargetGroupArn=arn)
        return {
            d["Target"]["Id"]: d["TargetHealth"]["State"]
            for d in described["TargetHealthDescriptions"]
        }

    def _target_groups(self) -> list[str]:
        return [
            ep.name
            for ep in self.config.entry_points
            if self._address_kind(ep.name) == "target-group"
        ]

    def address_capacity(self, stack: str, address: str) -> int | None:
        return 1 if self._address_kind(address) == "elastic-ip" else None

    def get_members(self, stack: str, address: str) -> list[str]:
        self._op("get_members")
        if self._address_kind(address) == "elastic-ip":
            holder = self._eip(stack, address).get("InstanceId")
            return [holder] if holder else []
        return [i for i, state in self._target_health(address).items() if state != "draining"]

    def set_members(self, stack: str, address: str, ids: list[str]) -> None:
        self._op("set_members")
        if self._address_kind(address) == "elastic-ip":
            if len(ids) != 1:
                raise CapabilityError("aws", f"an elastic IP holding {len(ids)} servers")
            eip = self._eip(stack, address)
            if eip.get("InstanceId") == ids[0]:
                return
            # moto (like old EC2-Classic code paths) refuses a move without this spelled out.
            self.api(
                self.ec2,
                "associate_address",
                AllocationId=eip["AllocationId"],
                InstanceId=ids[0],
                AllowReassociation=True,
            )
            return
        arn = self._target_group(stack, address)
        health = self._target_health(address)
        new = [i for i in ids if i not in health or health[i] == "draining"]
        if new:
            self.api(
                self.elbv2, "register_targets", TargetGroupArn=arn, Targets=[{"Id": i} for i in new]
            )
            self._stale("register_targets", {})  # read what the group says now
            health = self._target_health(address)
        if waiting := [i for i in ids if health.get(i) != "healthy"]:
            # Old targets stay registered until every new one is healthy; the engine
            # retries this step, which re-reads and registers nothing twice.
            raise TransientError(f"targets not healthy yet: {waiting}")
        if old := [i for i, s in health.items() if i not in ids and s != "draining"]:
            self.api(
                self.elbv2,
                "deregister_targets",
                TargetGroupArn=arn,
                Targets=[{"Id": i} for i in old],
            )

    def ex_add_members(self, stack: str, address: str, ids: list[str]) -> None:
        """A target group: register these targets (those not registered yet) and wait
        (TransientError, retried by the engine) until they are healthy. Unlike
        set_members it waits on nobody else's targets: a sliding window's lanes each add
        their own server, and one target that never turns healthy fails only its lane.

        A target this provider has not registered yet is registered without reading the
        group first: RegisterTargets is idempotent (a target already registered stays as
        it is), so the read would only tell what the call makes true anyway."""
        self._op("add_members")
        arn = self._target_group(stack, address)
        health: dict[str, str] = {}
        if not (new := [i for i in ids if (arn, i) not in self._registered]):
            health = self._target_health(address)
            new = [i for i in ids if i not in health or health[i] == "draining"]
        if new:
            self.api(
                self.elbv2, "register_targets", TargetGroupArn=arn, Targets=[{"Id": i} for i in new]
            )
            self._registered.update((arn, i) for i in new)
            # Just registered: `initial` until the group's health checks pass.
            raise TransientError(f"targets not healthy yet: {new}")
        if waiting := [i for i in ids if health.get(i) != "healthy"]:
            raise TransientError(f"targets not healthy yet: {waiting}")

    def ex_remove_members(self, stack: str, address: str, ids: list[str]) -> None:
        """A target group: deregister these targets (they start draining). The others
        stay as they are, healthy or not yet."""
        self._op("remove_members")
        arn = self._target_group(stack, address)
        health = self._target_health(address)
        if old := [i for i in ids if i in health and health[i] != "draining"]:
            self.api(
                self.elbv2,
                "deregister_targets",
                TargetGroupArn=arn,
                Targets=[{"Id": i} for i in old],
            )

    def ex_healthy_members(self, stack: str, address: str) -> list[str] | None:
        """The members an entry point itself finds healthy, for min-healthy guards: a
        target group's `healthy` targets, from the target health its member reads kept
        (no DescribeInstances). None for an elastic IP, which checks nobody's health."""
        if self._address_kind(address) == "elastic-ip":
            return None
        return [i for i, state in self._target_health(address).items() if state == "healthy"]

    def inflight(self, stack: str, address: str) -> dict[str, int]:
        """Targets still draining count as busy until the deregistration delay is over."""
        self._op("inflight")
        if self._address_kind(address) == "elastic-ip":
            return {}
        return {i: 1 for i, s in self._target_health(address).items() if s == "draining"}

    def routes_to(self, stack: str, ids: list[str]) -> dict[str, list[str]]:
        """One DescribeAddresses for the whole batch (any elastic IP of the account, even
        one the config does not know), and the stack's target groups' registrations."""
        self._op("routes_to")
        if not ids:
            return {}
        out: dict[str, list[str]] = {}
        held = self.api(
            self.ec2,
            "describe_addresses",
            Filters=[{"Name": "instance-id", "Values": self._with_interest(ids)}],
        )["Addresses"]
        for eip in held:
            if eip.get("InstanceId") in ids:
                name = eip.get("AllocationId") or eip.get("PublicIp")
                out.setdefault(eip["InstanceId"], []).append(
                    f"elastic IP {name} ({eip.get('PublicIp')})"
                )
        for address in self._target_groups():
            for i, state in self._target_health(address).items():
                if i in ids and state != "draining":
                    out.setdefault(i, []).append(f"target group {address}")
        return out

    def probe_address(self, stack: str, address: str, path: str) -> tuple[int, str | None]:
        """Through the address: HTTP when the serving role is checked over HTTP, else the
        provider's own view of who holds the address and whether it is healthy."""
        self._op("probe_address")
        role = self.config.roles[self.config.entry_point(address).roles[0]]
        if self._address_kind(address) == "elastic-ip":
            eip = self._eip(stack, address)
            holder = eip.get("InstanceId")
            if role.health.type in ("http", "tcp"):
                status, backend = self.prober(
                    eip["PublicIp"], role.health.port, path, role.health.timeout
                )
                return status, backend or holder
            if holder is None:
                return 503, None
            if role.health.type == "ec2-status":
                return (200 if self._status_checks(holder)[0] else 503), holder
            server = self.describe_servers(stack, [holder])
            ok, _ = self._app_health(server[0], role.health) if server else (False, "")
            return (200 if ok else 503), holder
        health = self._target_health(address)
        healthy = sorted(i for i, s in health.items() if s == "healthy")
        if not healthy:
            return 503, None
        return 200, healthy[0]

    # --- data (EBS) ------------------------------------------------------------------------
    def _instance(self, stack: str, server_id: str) -> dict[str, Any]:
        found = self._by_ids(stack, [server_id])
        if not found:
            raise PreconditionFailed(f"instance {server_id} is not part of stack {stack!r}")
        return found[0]

    def _data_volume(self, stack: str, server_id: str) -> str:
        inst = self._instance(stack, server_id)
        device = self.config.roles[self.config.data_role or ""].data_options.device
        for mapping in inst.get("BlockDeviceMappings", []):
            if mapping["DeviceName"] == device:
                return str(mapping["Ebs"]["VolumeId"])
        raise PreconditionFailed(f"instance {server_id} has no data volume at {device}")

    def _run_hook(self, stack: str, server_id: str, command: str | None, what: str) -> None:
        if not command:
            return
        server = self._to_server(self._instance(stack, server_id))
        result = self.transport.run(server, command, timeout=120.0)
        if not result.ok:
            raise StepFailed(f"{what} command failed on {server_id}: exit {result.exit_status}")

    def _set_mode(self, server_id: str, mode: str) -> None:
        self.api(
            self.ec2,
            "create_tags",
            Resources=[server_id],
            Tags=[{"Key": TAG_DATA_MODE, "Value": mode}],
        )

    def _run_of(self, stack: str, server_id: str) -> str:
        """The run that created a server: what a volume or snapshot made for it carries
        (I4: every resource a run creates carries the run id)."""
        tags = {t["Key"]: t["Value"] for t in self._instance(stack, server_id).get("Tags", [])}
        return str(tags.get(TAG_RUN, ""))

    def _snapshot(self, stack: str, volume: str, purpose: str, run: str) -> str:
        snap = self.api(
            self.ec2,
            "create_snapshot",
            VolumeId=volume,
            Description=f"changeover {purpose}",
            TagSpecifications=[
                {
                    "ResourceType": "snapshot",
                    "Tags": [
                        {"Key": TAG_STACK, "Value": stack},
                        {"Key": TAG_RUN, "Value": run},
                        {"Key": "changeover:purpose", "Value": purpose},
                    ],
                }
            ],
        )
        self._wait("snapshot_completed", SnapshotIds=[snap["SnapshotId"]])
        return str(snap["SnapshotId"])

    def _wait(self, waiter: str, **kwargs: Any) -> None:
        try:
            self.ec2.get_waiter(waiter).wait(
                **kwargs, WaiterConfig={"Delay": 2, "MaxAttempts": 150}
            )
        except WaiterError as exc:
            raise TransientError(f"aws waiter {waiter}: {exc}") from exc

    def _move_volume(self, stack: str, snapshot: str, dst: str, purpose: str, run: str) -> str:
        """Create a volume from `snapshot` in dst's AZ and attach it at the data device,
        replacing (detaching) whatever volume was there."""
        inst = self._instance(stack, dst)
        device = self.config.roles[self.config.data_role or ""].data_options.device
        zone = inst["Placement"]["AvailabilityZone"]
        vol = self.api(
            self.ec2,
            "create_volume",
            SnapshotId=snapshot,
            AvailabilityZone=zone,
            TagSpecifications=[
                {
                    "ResourceType": "volume",
                    "Tags": [
                        {"Key": TAG_STACK, "Value": stack},
                        {"Key": TAG_RUN, "Value": run},
                        {"Key": "changeover:purpose", "Value": purpose},
                    ],
                }
            ],
        )["VolumeId"]
        self._wait("volume_available", VolumeIds=[vol])
        for mapping in inst.get("BlockDeviceMappings", []):
            if mapping["DeviceName"] == device:
                # detach_volume needs InstanceId (moto fails without it; AWS prefers it).
                self.api(
                    self.ec2,
                    "detach_volume",
                    VolumeId=mapping["Ebs"]["VolumeId"],
                    InstanceId=dst,
                    Device=device,
                )
                self._wait("volume_available", VolumeIds=[mapping["Ebs"]["VolumeId"]])
        self.api(self.ec2, "attach_volume", VolumeId=vol, InstanceId=dst, Device=device)
        self._wait("volume_in_use", VolumeIds=[vol])
        return str(vol)

    def check_data_moves(self, stack: str) -> None:
        opts = self.config.roles[self.config.data_role or ""].data_options
        if not opts.freeze_command:
            raise CapabilityError(
                "aws",
                "a write freeze without data_options.freeze_command",
                "set it on the data role, or rebuild with --no-migrate-data",
            )

    def data_mode(self, stack: str, server_id: str) -> dict[str, Any]:
        self._op("data_mode")
        tags = {t["Key"]: t["Value"] for t in self._instance(stack, server_id).get("Tags", [])}
        return {"mode": tags.get(TAG_DATA_MODE, "normal"), "inflight": 0}

    def data_copy_live(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        self._op("data_copy_live")
        # A live snapshot makes the final one incremental, so the freeze stays short.
        run = self._run_of(stack, dst_id)
        return {"snapshot": self._snapshot(stack, self._data_volume(stack, src_id), "live", run)}

    def data_freeze(self, stack: str, src_id: str) -> dict[str, Any]:
        self._op("data_freeze")
        self.check_data_moves(stack)
        opts = self.config.roles[self.config.data_role or ""].data_options
        self._run_hook(stack, src_id, opts.freeze_command, "freeze")
        self._set_mode(src_id, "frozen")
        return {"mode": "frozen"}

    def data_unfreeze(self, stack: str, src_id: str) -> dict[str, Any]:
        self._op("data_unfreeze")
        opts = self.config.roles[self.config.data_role or ""].data_options
        self._run_hook(stack, src_id, opts.unfreeze_command, "unfreeze")
        self._set_mode(src_id, "normal")
        return {"mode": "normal"}

    def data_final_sync(self, stack: str, src_id: str, dst_id: str) -> DataSummary:
        self._op("data_final_sync")
        src_vol = self._data_volume(stack, src_id)
        run = self._run_of(stack, dst_id)
        snap = self._snapshot(stack, src_vol, "final", run)
        vol = self._move_volume(stack, snap, dst_id, "data", run)
        src = self.api(self.ec2, "describe_volumes", VolumeIds=[src_vol])["Volumes"][0]
        new = self.api(self.ec2, "describe_volumes", VolumeIds=[vol])["Volumes"][0]
        attached = [a["InstanceId"] for a in new.get("Attachments", [])]
        if new.get("SnapshotId") != snap or new["Size"] != src["Size"] or attached != [dst_id]:
            raise StepFailed(f"data volume {vol} does not match snapshot {snap} of {src_vol}")
        return DataSummary(count=int(new["Size"]), max_id=0, checksum=snap)

    def data_switch(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        self._op("data_switch")
        # The new db serves from its own volume; the old one stays frozen until retired.
        self._set_mode(src_id, "switched")
        return {"mode": "switched"}

    def data_switch_back(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        """Move the new db's volume (with every write it acknowledged) back to the old."""
        self._op("data_switch_back")
        opts = self.config.roles[self.config.data_role or ""].data_options
        self._run_hook(stack, dst_id, opts.freeze_command, "freeze")
        run = self._run_of(stack, dst_id)
        snap = self._snapshot(stack, self._data_volume(stack, dst_id), "switch-back", run)
        vol = self._move_volume(stack, snap, src_id, "data", run)
        self._run_hook(stack, src_id, opts.unfreeze_command, "unfreeze")
        self._set_mode(src_id, "normal")
        return {"volume": vol}


def make_aws_provider(
    name: str, config: StackConfig, *, state_dir: Path | None = None, **kw: Any
) -> AwsProvider:
    """Build the provider from config. Credentials come from boto3's usual chain only."""
    del state_dir  # the journal lives elsewhere; AWS keeps no local state
    if config.region is None:
        raise BadInput(f"stack {name!r}: aws needs `region`")
    session = boto3.Session(profile_name=config.profile, region_name=config.region)
    return AwsProvider(
        stack=name, config=config, session=session, endpoint_url=config.endpoint_url, **kw
    )
