"""Pure topic mapping between a plain-MQTT device and Azure IoT Hub's fixed topic scheme.

IoT Hub accepts only its own topics: telemetry on ``devices/{id}/messages/events/{property bag}``,
cloud-to-device messages on ``devices/{id}/messages/devicebound/{property bag}``, plus the
``$iothub/twin`` and ``$iothub/methods`` request/response topics. Devices behind the proxy use
their own topics, so the proxy folds a device topic into the property-bag slot and back.

Two mappings, chosen per Endpoint (:class:`~cloudconnector.model.TopicMapping`):

- ``Flatten`` (the original product's): ``/my/desired/topic`` -> ``my-desired-topic``. The
  leading slash is dropped and ``/`` becomes ``-``, so the result is a bare property name. Lossy:
  ``a-b`` and ``a/b`` collide, and only characters IoT Hub allows in a property name pass.
- ``Property`` (lossless): the original topic travels as the property ``mqtt-topic``, percent-encoded
  with ``quote(topic, safe="")``, so any UTF-8 topic round-trips and IoT Hub routing can match it.

The same suffix is used both ways: a device subscribing to ``/cmd`` is subscribed upstream under
``devicebound/`` with the suffix ``/cmd`` would get as telemetry, so a sender that publishes to
that exact upstream topic reaches it. This module holds no I/O and no connection state besides the
:class:`Subscriptions` table, which the proxy keeps per device connection.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote

from cloudconnector.model import TopicMapping

API_VERSION = "2021-04-12"
TOPIC_PROPERTY = "mqtt-topic"
PASSTHROUGH_PREFIXES = ("$iothub/twin/", "$iothub/methods/")

# IoT Hub allows ASCII letters, digits and ``! # $ % & ' * + - . ^ _ ` | ~`` in property names; of
# those, ``&`` and ``=`` separate the property bag, ``%`` escapes, ``#`` and ``+`` are MQTT
# wildcards. What is left may appear in a flattened name unescaped.
_FLAT_CHARS = frozenset(string.ascii_letters + string.digits + "!$'*-.^_`|~")

# Unconfirmed: IoT Hub documents 256 KB per message including properties but no separate topic
# limit. A topic this long is certainly a mistake, and refusing it with a clear reason beats the
# hub closing the connection without one.
MAX_TOPIC_BYTES = 4096
MAX_DEVICE_ID = 128


class TopicError(ValueError):
    """A device topic cannot be expressed in IoT Hub's scheme; the message says why (no payload)."""


@dataclass(frozen=True)
class HubNames:
    """The fixed upstream names for one device on one hub."""

    host: str
    device_id: str

    def __post_init__(self) -> None:
        if not self.device_id or len(self.device_id) > MAX_DEVICE_ID or "/" in self.device_id:
            raise TopicError("the device id is not valid for IoT Hub")
        if not self.host or "/" in self.host:
            raise TopicError("the hub host name is not valid")

    @property
    def username(self) -> str:
        return f"{self.host}/{self.device_id}/?api-version={API_VERSION}"

    @property
    def events(self) -> str:
        return f"devices/{self.device_id}/messages/events/"

    @property
    def devicebound(self) -> str:
        return f"devices/{self.device_id}/messages/devicebound/"

    @property
    def devicebound_all(self) -> str:
        return self.devicebound + "#"


def has_wildcard(topic: str) -> bool:
    return "+" in topic or "#" in topic


def is_passthrough(topic: str) -> bool:
    return topic.startswith(PASSTHROUGH_PREFIXES)


def _check_device_topic(topic: str) -> None:
    if not topic:
        raise TopicError("empty topic")
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        raise TopicError(f"topic longer than {MAX_TOPIC_BYTES} bytes")
    if "\x00" in topic:
        raise TopicError("topic contains U+0000")


def flatten(topic: str) -> str:
    """``/my/desired/topic`` -> ``my-desired-topic``; refuses what IoT Hub would not accept."""
    _check_device_topic(topic)
    name = (topic[1:] if topic.startswith("/") else topic).replace("/", "-")
    if not name:
        raise TopicError("topic has no name once its leading slash is dropped")
    bad = sorted({c for c in name if c not in _FLAT_CHARS})
    if bad:
        shown = "".join(c if c.isprintable() and c.isascii() else "?" for c in bad)
        raise TopicError(
            f"topic has characters IoT Hub does not allow in a flattened name ({shown!r}); "
            "use the Property topic mapping for such topics"
        )
    return name


def suffix(topic: str, mapping: TopicMapping) -> str:
    """The property-bag part that stands for ``topic`` under ``mapping``."""
    if mapping is TopicMapping.PROPERTY:
        _check_device_topic(topic)
        return f"{TOPIC_PROPERTY}={quote(topic, safe='')}"
    return flatten(topic)


def d2c_topic(names: HubNames, topic: str, mapping: TopicMapping) -> str:
    """Upstream topic for a device's PUBLISH."""
    if is_passthrough(topic):
        return topic
    if has_wildcard(topic):
        raise TopicError("wildcards are not allowed in a PUBLISH topic")
    return _bounded(names.events + suffix(topic, mapping))


def subscribe_filter(names: HubNames, topic_filter: str, mapping: TopicMapping) -> str:
    """Upstream filter for a device's SUBSCRIBE / UNSUBSCRIBE filter."""
    if is_passthrough(topic_filter):
        return topic_filter
    _check_device_topic(topic_filter)
    if has_wildcard(topic_filter):
        _check_filter_syntax(topic_filter)
        return names.devicebound_all
    return _bounded(names.devicebound + suffix(topic_filter, mapping))


def _check_filter_syntax(topic_filter: str) -> None:
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise TopicError("'#' must be a whole last level of a filter")
        if "+" in level and level != "+":
            raise TopicError("'+' must be a whole level of a filter")


def _bounded(topic: str) -> str:
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        raise TopicError(f"the mapped topic is longer than {MAX_TOPIC_BYTES} bytes")
    return topic


def parse_property_bag(bag: str) -> list[tuple[str, str | None]]:
    """``a=1&b&%24.to=x`` -> [("a", "1"), ("b", None), ("$.to", "x")]; ``+`` stays a plus."""
    pairs: list[tuple[str, str | None]] = []
    for item in bag.split("&"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        pairs.append((unquote(key), unquote(value) if sep else None))
    return pairs


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (3.1.1 section 4.7), including the ``$`` rule for wildcards at level 0."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


@dataclass
class _Sub:
    topic_filter: str
    upstream: str
    qos: int


class Subscriptions:
    """One device connection's subscriptions, for reverse-mapping cloud-to-device messages.

    Several device filters may share one upstream filter (every wildcard filter maps to
    ``devicebound/#``), so an upstream UNSUBSCRIBE is only due when the last one goes.
    """

    def __init__(self, names: HubNames, mapping: TopicMapping) -> None:
        self.names = names
        self.mapping = mapping
        self._subs: dict[str, _Sub] = {}  # device filter -> entry, in subscription order

    def __iter__(self) -> Iterator[str]:
        return iter(self._subs)

    def add(self, topic_filter: str, qos: int) -> str:
        """Record a (validated) subscription; returns its upstream filter."""
        upstream = subscribe_filter(self.names, topic_filter, self.mapping)
        self._subs.pop(topic_filter, None)
        self._subs[topic_filter] = _Sub(topic_filter, upstream, min(qos, 1))
        return upstream

    def remove(self, topic_filter: str) -> str | None:
        """Forget a subscription; returns the upstream filter to drop, or None if still in use."""
        try:
            upstream = subscribe_filter(self.names, topic_filter, self.mapping)
        except TopicError:
            return None
        if self._subs.pop(topic_filter, None) is None:
            return None
        if any(s.upstream == upstream for s in self._subs.values()):
            return None
        return upstream

    def would_add_upstream(self, topic_filter: str, limit: int) -> bool:
        """True when subscribing to ``topic_filter`` needs an upstream filter beyond ``limit``."""
        upstream = subscribe_filter(self.names, topic_filter, self.mapping)
        held = {s.upstream for f, s in self._subs.items() if f != topic_filter}
        return upstream not in held and len(held) >= limit

    def device_topic(self, upstream_topic: str) -> str | None:
        """The topic a cloud-to-device message is delivered on, or None when no subscription wants it.

        In order: passthrough topics as they are; the ``mqtt-topic`` property; the exact suffix of
        a subscription; a flattened name read back (``-`` -> ``/``) that a wildcard filter
        matches; else, for a message that names no topic at all (IoT Hub's own senders only set
        system properties), the device's first exact subscription.
        """
        if is_passthrough(upstream_topic):
            return upstream_topic if self._wanted(upstream_topic) else None
        if not upstream_topic.startswith(self.names.devicebound):
            return None
        bag = upstream_topic[len(self.names.devicebound) :]
        for sub in self._subs.values():
            if sub.upstream == self.names.devicebound + bag and not has_wildcard(sub.topic_filter):
                return sub.topic_filter
        pairs = parse_property_bag(bag)
        for key, value in pairs:
            if key == TOPIC_PROPERTY and value:
                return value if self._wanted(value) else None
        bare = [key for key, value in pairs if value is None and key and not key.startswith("$")]
        for key in bare:
            for candidate in (key.replace("-", "/"), "/" + key.replace("-", "/")):
                if self._wanted(candidate):
                    return candidate
        if bare:
            return None  # named for a topic nobody here subscribed to
        for sub in self._subs.values():
            if not has_wildcard(sub.topic_filter) and not is_passthrough(sub.topic_filter):
                return sub.topic_filter
        return None

    def _wanted(self, topic: str) -> bool:
        return any(topic_matches(f, topic) for f in self._subs)

    def granted(self, topic_filter: str) -> int:
        sub = self._subs.get(topic_filter)
        return sub.qos if sub else 0
