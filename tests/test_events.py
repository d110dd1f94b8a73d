"""Validation of every channel's payload: what is accepted, and why the rest is rejected."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner.events import (
    Activity,
    Connect,
    Disconnect,
    NodeStatus,
    Reason,
    Rejected,
    parse,
)

NOW = 1_767_225_600_000
UUID = "7734d7c1-73ab-4820-adae-309d965eda32"


def test_well_formed_payloads_parse() -> None:
    assert parse("user:activity", json.dumps({"user_id": UUID, "timestamp": NOW // 1000}),
                 NOW) == Activity(UUID, NOW)
    assert parse("user:connect", json.dumps({"user_id": UUID}), NOW) == Connect(UUID)
    assert parse("user:disconnect", json.dumps({"user_id": UUID}).encode(), NOW) == \
        Disconnect(UUID)
    assert parse("node:status", json.dumps({"node_id": "node-123", "status": "ready"}),
                 NOW) == NodeStatus("node-123", "ready")


def test_extra_fields_are_ignored() -> None:
    payload = {"user_id": UUID, "timestamp": NOW // 1000, "page": "/pricing"}
    assert parse("user:activity", json.dumps(payload), NOW) == Activity(UUID, NOW)


@pytest.mark.parametrize(("channel", "payload", "reason"), [
    ("user:connect", b"x" * 5000, Reason.TOO_LARGE),
    ("user:connect", b"\xff\xfe", Reason.NOT_UTF8),
    ("user:connect", b"{not json", Reason.NOT_JSON),
    ("user:connect", b"[1, 2]", Reason.NOT_OBJECT),
    ("user:connect", b"null", Reason.NOT_OBJECT),
    ("user:connect", b"{}", Reason.MISSING_FIELD),
    ("user:connect", b'{"user_id": 42}', Reason.WRONG_TYPE),
    ("user:connect", b'{"user_id": ""}', Reason.BAD_ID),
    ("user:connect", json.dumps({"user_id": "u" * 129}).encode(), Reason.BAD_ID),
    ("user:connect", b'{"user_id": "a b"}', Reason.BAD_ID),
    ("user:connect", b'{"user_id": "a\\nb"}', Reason.BAD_ID),
    ("user:activity", json.dumps({"user_id": UUID}).encode(), Reason.MISSING_FIELD),
    ("user:activity", json.dumps({"user_id": UUID, "timestamp": "1767225600"}).encode(),
     Reason.WRONG_TYPE),
    ("user:activity", json.dumps({"user_id": UUID, "timestamp": True}).encode(),
     Reason.WRONG_TYPE),
    ("user:activity", json.dumps({"user_id": UUID, "timestamp": 0}).encode(),
     Reason.BAD_TIMESTAMP),
    ("user:activity", json.dumps({"user_id": UUID, "timestamp": 10**12}).encode(),
     Reason.BAD_TIMESTAMP),
    ("user:activity", b'{"user_id": "u1", "timestamp": NaN}', Reason.BAD_TIMESTAMP),
    ("node:status", b'{"node_id": "n1"}', Reason.MISSING_FIELD),
    ("node:status", b'{"node_id": "n1", "status": "exploded"}', Reason.UNKNOWN_STATUS),
    ("node:status", b'{"node_id": "n1", "status": 1}', Reason.WRONG_TYPE),
    ("node:status", b'{"status": "ready"}', Reason.MISSING_FIELD),
    ("other:channel", b'{"user_id": "u1"}', Reason.UNKNOWN_CHANNEL),
])
def test_bad_payloads_are_rejected_with_a_reason(channel: str, payload: bytes,
                                                  reason: Reason) -> None:
    result = parse(channel, payload, NOW)
    assert isinstance(result, Rejected)
    assert result.reason is reason
    assert result.detail


def test_deeply_nested_json_is_rejected_not_crashing() -> None:
    payload = b"[" * 2000 + b"]" * 2000
    result = parse("user:connect", payload[:4000], NOW)
    assert isinstance(result, Rejected)


def test_timestamp_bounds_are_configurable() -> None:
    old = json.dumps({"user_id": UUID, "timestamp": NOW // 1000 - 100})
    assert isinstance(parse("user:activity", old, NOW, max_age_s=50), Rejected)
    assert parse("user:activity", old, NOW, max_age_s=200) == Activity(UUID, NOW - 100_000)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10)
FIELD_VALUES = JSON | st.sampled_from([UUID, "node-1", "ready", "booting", "terminated", ""])
PAYLOADS = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda value: json.dumps(value).encode()),
    # The fields the contract names, with values of any type and size.
    st.fixed_dictionaries({}, optional={
        "user_id": FIELD_VALUES, "node_id": FIELD_VALUES, "status": FIELD_VALUES,
        "timestamp": FIELD_VALUES | st.floats() | st.integers(),
    }).map(lambda value: json.dumps(value).encode()),
)
CHANNELS = st.sampled_from(["user:activity", "user:connect", "user:disconnect", "node:status",
                            "other"])


@settings(max_examples=600, deadline=None)
@given(channel=CHANNELS, data=PAYLOADS)
def test_any_payload_on_any_channel_parses_or_is_rejected_never_raises(
    channel: str, data: bytes,
) -> None:
    result = parse(channel, data, NOW)
    assert isinstance(result, Activity | Connect | Disconnect | NodeStatus | Rejected)
    if isinstance(result, Activity):
        assert NOW - 86_400_000 <= result.timestamp_ms <= NOW + 300_000


@pytest.mark.parametrize("timestamp", [1e308, -1e308, 1.7e305, 10**400, -(10**400)])
def test_a_timestamp_too_large_for_milliseconds_is_rejected(timestamp: float) -> None:
    payload = '{"user_id": "u1", "timestamp": ' + json.dumps(timestamp) + "}"
    result = parse("user:activity", payload, NOW)
    assert isinstance(result, Rejected) and result.reason is Reason.BAD_TIMESTAMP


def test_an_id_or_pool_name_with_a_trailing_newline_is_refused() -> None:
    """`$` matches before a final newline; the patterns end at `\\Z`."""
    from provisioner.keys import PoolKeys

    result = parse("user:connect", json.dumps({"user_id": "u1\n"}), NOW)
    assert isinstance(result, Rejected) and result.reason is Reason.BAD_ID
    with pytest.raises(ValueError, match="pool name"):
        PoolKeys("default\n")


def _padded_connect(size: int) -> bytes:
    """A connect payload of exactly `size` bytes (its padding an ignored extra field)."""
    head = b'{"user_id": "u1", "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def test_a_payload_of_exactly_4_kib_is_read_and_one_byte_more_is_too_large() -> None:
    assert len(_padded_connect(4096)) == 4096
    assert parse("user:connect", _padded_connect(4096), NOW) == Connect("u1")
    result = parse("user:connect", _padded_connect(4097), NOW)
    assert isinstance(result, Rejected) and result.reason is Reason.TOO_LARGE


def test_an_id_of_128_characters_is_taken() -> None:
    assert parse("user:connect", json.dumps({"user_id": "u" * 128}), NOW) == Connect("u" * 128)
    longest = "n" + "._:@-" * 25 + "x" * 2
    assert len(longest) == 128
    assert parse("node:status", json.dumps({"node_id": longest, "status": "ready"}),
                 NOW) == NodeStatus(longest, "ready")


@pytest.mark.parametrize("user_id", ["-u1", ".u1", "_u1", ":u1", "@u1", ".", "..", "-"])
def test_an_id_must_begin_with_a_letter_or_a_digit(user_id: str) -> None:
    result = parse("user:connect", json.dumps({"user_id": user_id}), NOW)
    assert isinstance(result, Rejected) and result.reason is Reason.BAD_ID
    assert parse("user:connect", json.dumps({"user_id": "0" + user_id}), NOW) == \
        Connect("0" + user_id)


def test_activity_exactly_a_day_old_or_five_minutes_ahead_is_taken_and_beyond_is_not() -> None:
    def activity(timestamp: float) -> object:
        return parse("user:activity", json.dumps({"user_id": UUID, "timestamp": timestamp}), NOW)

    assert activity(NOW // 1000 - 86_400) == Activity(UUID, NOW - 86_400_000)
    assert activity(NOW // 1000 + 300) == Activity(UUID, NOW + 300_000)
    for beyond in (NOW / 1000 - 86_400.5, NOW / 1000 + 300.5):
        result = activity(beyond)
        assert isinstance(result, Rejected) and result.reason is Reason.BAD_TIMESTAMP, beyond


def test_a_payload_given_as_text_is_measured_in_bytes() -> None:
    """4 KiB of its UTF-8, not 4096 characters: 2,100 two-byte characters are too large."""
    text = '{"user_id": "u1", "pad": "' + "é" * 2100 + '"}'
    assert len(text) < 4096 < len(text.encode())
    result = parse("user:connect", text, NOW)
    assert isinstance(result, Rejected) and result.reason is Reason.TOO_LARGE
    assert parse("user:connect", text[:2000] + '"}', NOW) == Connect("u1")


@pytest.mark.parametrize("status", ["terminating", "stopped", "Ready", "running"])
def test_a_node_status_outside_the_wire_contract_is_unknown(status: str) -> None:
    """booting|ready|terminated only: the Node API's `terminating` is a state of its list,
    never a status on the channel."""
    result = parse("node:status", json.dumps({"node_id": "n1", "status": status}), NOW)
    assert isinstance(result, Rejected) and result.reason is Reason.UNKNOWN_STATUS
