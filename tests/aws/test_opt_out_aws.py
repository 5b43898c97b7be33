"""Opt-outs on AWS (moto): the `changeover:do-not-disrupt` EC2 tag is read from the
instance tags the provider already describes, so honouring it costs no API call."""

from __future__ import annotations

from orchestrator.models import TAG_DO_NOT_DISRUPT
from strategies.opt_out import SKIP_REASON
from strategies.rotate import plan_rotate
from tests.aws.world import AwsWorld


def test_do_not_disrupt_tag_is_read_from_ec2_tags_without_extra_calls(aws: AwsWorld) -> None:
    """plan rotate --older-than 0 behind a target group: the tagged instance is under
    `skipped`, not selected, and the plan makes exactly the calls it made before the tag
    was set (per operation)."""
    config = aws.config(address="tg", web=3, db=False)
    made = aws.bootstrap(aws.provider(config), config)
    web = made["web"]

    before = aws.provider(config)
    untagged = plan_rotate(before, aws.stack, config, older_than=0.0)
    assert untagged.summary["skipped"] == {}
    assert sorted(untagged.summary["selected"]) == sorted(web)

    aws.ec2.create_tags(Resources=[web[1]], Tags=[{"Key": TAG_DO_NOT_DISRUPT, "Value": "true"}])
    after = aws.provider(config)
    tagged = plan_rotate(after, aws.stack, config, older_than=0.0)
    assert tagged.summary["skipped"] == {web[1]: SKIP_REASON}
    assert sorted(tagged.summary["selected"]) == sorted([web[0], web[2]])
    assert web[1] not in str([s.to_dict() for s in tagged.steps])
    assert dict(after.api_calls) == dict(before.api_calls)
    assert after.api_calls["DescribeInstances"] >= 1
