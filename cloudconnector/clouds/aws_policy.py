"""The per-device AWS IoT policy: its name and its document.

Least privilege by default: a certificate may only connect with its own thing name as the client
id (``${iot:Connection.Thing.ThingName}``, which AWS fills in only when the certificate is
attached to that thing) and may only publish, receive and subscribe on the Endpoint's topics. The
original product's allow-everything document exists only as an explicit opt-in.

With a topic template on the Endpoint (``spec.topicTemplate``), the proxy puts every device topic
below the template's prefix, so the default topics follow it: ``fleet/{cloudId}/`` allows
``fleet/${iot:Connection.Thing.ThingName}/*``. ``{cloudId}``/``{thingName}`` become the thing-name
variable; the other placeholders name values the policy cannot check and become ``*``. Topics set
in ``spec.aws.policy`` are used as they are.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from cloudconnector import topic_template
from cloudconnector.model import AwsSpec, PolicyMode

VERSION = "2012-10-17"
THING_VARIABLE = "${iot:Connection.Thing.ThingName}"
_POLICY_NAME = re.compile(r"^[\w+=,.@-]{1,128}$")
_SUFFIX = "-policy"


def policy_name(thing_name: str) -> str:
    """A policy name owned by one thing: policy names forbid ':', which thing names allow.

    Thing names never contain '.', so mapping ':' to '.' cannot make two things share a policy.
    """
    safe = thing_name.replace(":", ".")
    name = safe + _SUFFIX
    if len(name) > 128:
        digest = hashlib.sha256(thing_name.encode()).hexdigest()[:16]
        name = f"{safe[: 128 - len(_SUFFIX) - 17]}-{digest}{_SUFFIX}"
    assert _POLICY_NAME.match(name), name
    return name


def arn_prefix(thing_arn: str) -> str:
    """``arn:{partition}:iot:{region}:{account}`` taken from a thing's ARN (works in aws-cn too)."""
    parts = thing_arn.split(":", 5)
    if len(parts) < 6 or parts[0] != "arn" or parts[2] != "iot":
        raise ValueError("not an AWS IoT ARN")
    return ":".join(parts[:5])


def template_topics(template: str) -> str:
    """The policy topic pattern for every topic below a topic template's prefix."""
    topic_template.check(template)

    def variable(name: str) -> str:
        return THING_VARIABLE if name in ("cloudId", "thingName") else "*"

    return re.sub(r"\{([^{}]*)\}", lambda m: variable(m.group(1)), template) + "*"


def _topics(spec: AwsSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    publish, subscribe = spec.publish_topics, spec.subscribe_topics
    if spec.topic_template:
        below = (template_topics(spec.topic_template),)
        publish = below if publish == AwsSpec.publish_topics else publish
        subscribe = below if subscribe == AwsSpec.subscribe_topics else subscribe
    return publish, subscribe


def policy_document(spec: AwsSpec, thing_arn: str) -> dict[str, Any]:
    if spec.policy_mode is PolicyMode.ALLOW_ALL:
        return {"Version": VERSION, "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}
    prefix = arn_prefix(thing_arn)
    publish_topics, subscribe_topics = _topics(spec)
    statements: list[dict[str, Any]] = [
        {
            "Effect": "Allow",
            "Action": "iot:Connect",
            "Resource": f"{prefix}:client/{THING_VARIABLE}",
            # Without an attached thing the variable is empty; this makes that an explicit deny.
            "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}},
        }
    ]
    if publish_topics:
        statements.append(
            {
                "Effect": "Allow",
                "Action": "iot:Publish",
                "Resource": [f"{prefix}:topic/{t}" for t in publish_topics],
            }
        )
    if subscribe_topics:
        statements.append(
            {
                "Effect": "Allow",
                "Action": "iot:Subscribe",
                "Resource": [f"{prefix}:topicfilter/{t}" for t in subscribe_topics],
            }
        )
        statements.append(
            {
                "Effect": "Allow",
                "Action": "iot:Receive",
                "Resource": [f"{prefix}:topic/{t}" for t in subscribe_topics],
            }
        )
    return {"Version": VERSION, "Statement": statements}


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), sort_keys=True)


def same_document(a: str, b: str) -> bool:
    """Compare two policy texts by meaning, not by whitespace or key order."""
    try:
        return bool(json.loads(a) == json.loads(b))
    except ValueError:
        return False
