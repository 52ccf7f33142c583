"""Topic templates: one prefix per device, so identical firmware lands under each device's own topics.

An Endpoint (and a Group, overriding it) may set ``spec.topicTemplate``, a *prefix* such as
``fleet/{cloudId}/``. The proxy puts the expanded prefix in front of every topic and filter the
device sends and takes it off every topic delivered back, so a device that publishes ``telemetry``
and subscribes to ``cmd`` is ``fleet/meter-7/telemetry`` and ``fleet/meter-7/cmd`` in the cloud.

A prefix rather than a free-form pattern: it is always reversible (strip what was added), wildcard
filters stay filters (``#`` becomes ``fleet/meter-7/#``), and the least-privilege cloud policy is
simply "below the prefix". The syntax, checked here and by the CRD pattern:

- placeholders ``{cloudId}`` (alias ``{thingName}``), ``{iccid}``, ``{imsi}``, ``{device}``,
  ``{namespace}`` and ``{group}``; every other character is literal;
- it ends with ``/``, does not start with ``/`` or ``$`` and holds no ``+``, ``#`` or U+0000;
- the empty string means "no template" (a Group uses it to switch off its Endpoint's).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PLACEHOLDERS = ("cloudId", "thingName", "iccid", "imsi", "device", "namespace", "group")
MAX_LENGTH = 200

_NAMES = "|".join(PLACEHOLDERS)
# The same rule as the CRDs' pattern (kept in step by tests/proxy/test_topic_templates.py).
CRD_PATTERN = rf"^$|^([^{{}}+#$/\x00]|\{{({_NAMES})\}})([^{{}}+#\x00]|\{{({_NAMES})\}})*/$"
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class TemplateError(ValueError):
    """A template or one device's expansion of it is unusable; the message says why."""


def check(template: str) -> str:
    """``template`` if it is a valid topic template, else :class:`TemplateError` naming the fault."""
    if template == "":
        return template
    if len(template) > MAX_LENGTH:
        raise TemplateError(f"must be at most {MAX_LENGTH} characters long")
    if not template.endswith("/"):
        raise TemplateError("must end with '/': it is a prefix put in front of the device's topics")
    if template[0] in "/$":
        raise TemplateError("must not start with '/' or '$'")
    for bad, what in (("+", "'+'"), ("#", "'#'"), ("\x00", "U+0000")):
        if bad in template:
            raise TemplateError(f"must not contain {what}")
    for name in _PLACEHOLDER.findall(template):
        if name not in PLACEHOLDERS:
            known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
            raise TemplateError(f"has an unknown placeholder {{{name}}}; known are {known}")
    if "{" in _PLACEHOLDER.sub("", template) or "}" in _PLACEHOLDER.sub("", template):
        raise TemplateError("has an unmatched '{' or '}'")
    return template


def placeholders(template: str) -> list[str]:
    return _PLACEHOLDER.findall(template)


def expand(template: str, values: Mapping[str, str | None]) -> str:
    """The prefix for one device; :class:`TemplateError` when the device lacks a value it needs."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1)
        got = values.get("cloudId" if name == "thingName" else name)
        if not got:
            raise TemplateError(f"uses {{{name}}}, which this device does not have")
        if any(c in got for c in "/+#\x00"):
            raise TemplateError(f"{{{name}}} of this device holds a character topics cannot carry")
        return got

    return _PLACEHOLDER.sub(value, template)
