"""Parsing and validating what arrives on the four channels.

Nothing here trusts the wire: every payload is checked for size, JSON, shape, types, id
syntax and plausible timestamps. A bad one becomes a :class:`Rejected` with a reason, which the
caller counts and logs (rate-limited) before dropping it. Unknown extra fields are ignored so
that producers can add fields without breaking us.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

MAX_PAYLOAD_BYTES = 4096
ID_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z")
#: ID_PATTERN in words, for the messages that refuse an id.
ID_RULE = "1-128 of A-Z a-z 0-9 . _ : @ -, the first a letter or a digit"


class Channel(StrEnum):
    ACTIVITY = "user:activity"
    CONNECT = "user:connect"
    DISCONNECT = "user:disconnect"
    NODE_STATUS = "node:status"


SUBSCRIBED = tuple(Channel)

NODE_STATUSES = ("booting", "ready", "terminated")


class Reason(StrEnum):
    """Why an event was rejected: the label of the rejected-events counter."""

    TOO_LARGE = "too_large"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    BAD_ID = "bad_id"
    BAD_TIMESTAMP = "bad_timestamp"
    UNKNOWN_STATUS = "unknown_status"
    UNKNOWN_CHANNEL = "unknown_channel"


@dataclass(frozen=True)
class Activity:
    user_id: str
    timestamp_ms: int


@dataclass(frozen=True)
class Connect:
    user_id: str


@dataclass(frozen=True)
class Disconnect:
    user_id: str


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    status: str


Event = Activity | Connect | Disconnect | NodeStatus


@dataclass(frozen=True)
class Rejected:
    reason: Reason
    detail: str


class _Reject(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _identifier(payload: dict[str, Any], name: str) -> str:
    if name not in payload:
        raise _Reject(Reason.MISSING_FIELD, f"missing {name!r}")
    value = payload[name]
    if name == "node_id" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # as the Node API client takes a create's {"id": 17} (nodeapi.py)
    if not isinstance(value, str):
        raise _Reject(Reason.WRONG_TYPE, f"{name!r} must be a string, not {type(value).__name__}")
    if not ID_PATTERN.match(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise _Reject(Reason.BAD_ID, f"{name!r}={shown!r} is not {ID_RULE}")
    return value


def _timestamp(payload: dict[str, Any], now_ms: int, max_age_s: float, max_skew_s: float) -> int:
    if "timestamp" not in payload:
        raise _Reject(Reason.MISSING_FIELD, "missing 'timestamp'")
    value = payload["timestamp"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Reject(Reason.WRONG_TYPE,
                      f"'timestamp' must be Unix seconds, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Reject(Reason.BAD_TIMESTAMP, "'timestamp' is not finite")
    out_of_range = _Reject(Reason.BAD_TIMESTAMP,
                           f"'timestamp'={str(value)[:40]} is more than {max_age_s:.0f}s old or "
                           f"{max_skew_s:.0f}s ahead of now ({now_ms // 1000})")
    # Compared in seconds first (a second of slack): a value far out of range, an int of any
    # size or a float near the largest, would overflow in milliseconds.
    if not now_ms / 1000 - max_age_s - 1 <= value <= now_ms / 1000 + max_skew_s + 1:
        raise out_of_range
    ms = int(value * 1000)
    if ms < now_ms - max_age_s * 1000 or ms > now_ms + max_skew_s * 1000:
        raise out_of_range
    # Its second: activity is keyed by it (lua/record_activity.lua), and a fraction of one
    # (time.time()) made each request of a second an event of its own.
    return ms - ms % 1000


def parse(channel: str, data: bytes | str, now_ms: int, *, max_age_s: float = 86400.0,
          max_skew_s: float = 300.0) -> Event | Rejected:
    """Turn one pub/sub message into an event, or say why it is rejected."""
    try:
        raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")
        if len(raw) > MAX_PAYLOAD_BYTES:
            raise _Reject(Reason.TOO_LARGE, f"{len(raw)} bytes > {MAX_PAYLOAD_BYTES}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Reject(Reason.NOT_UTF8, str(exc)) from None
        try:
            payload = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise _Reject(Reason.NOT_JSON, str(exc)[:80]) from None
        if not isinstance(payload, dict):
            raise _Reject(Reason.NOT_OBJECT, f"payload is a JSON {type(payload).__name__}")
        if channel == Channel.ACTIVITY:
            return Activity(_identifier(payload, "user_id"),
                            _timestamp(payload, now_ms, max_age_s, max_skew_s))
        if channel == Channel.CONNECT:
            return Connect(_identifier(payload, "user_id"))
        if channel == Channel.DISCONNECT:
            return Disconnect(_identifier(payload, "user_id"))
        if channel == Channel.NODE_STATUS:
            node_id = _identifier(payload, "node_id")
            if "status" not in payload:
                raise _Reject(Reason.MISSING_FIELD, "missing 'status'")
            status = payload["status"]
            if not isinstance(status, str):
                raise _Reject(Reason.WRONG_TYPE, "'status' must be a string")
            if status not in NODE_STATUSES:
                raise _Reject(Reason.UNKNOWN_STATUS, f"status {status[:20]!r} is not one of "
                              + "|".join(NODE_STATUSES))
            return NodeStatus(node_id, status)
        raise _Reject(Reason.UNKNOWN_CHANNEL, f"channel {channel[:40]!r}")
    except _Reject as rejection:
        return Rejected(rejection.reason, rejection.detail)
