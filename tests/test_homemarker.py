"""The home marker (diskplan/homemarker.py): written by prepare, read by the node agent's scan."""

from __future__ import annotations

import datetime
import json

import pytest

from diskplan.errors import Malformed
from diskplan.homemarker import (
    MAX_MARKER_BYTES,
    HomeMarker,
    format_time,
    marker_json,
    parse_marker,
    parse_time,
)

UTC = datetime.UTC
MARKER = HomeMarker(namespace="vms", vm="pg01", vmi_uid="0d5c2f0e-8c1e-4a57-9c1b-2b7e3c1d9a10",
                    node="node-a.example.com",
                    written_at=datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
GOOD = {"version": 1, "namespace": "vms", "vm": "pg01", "vmiUID": "0d5c2f0e-8c1e-4a57-9c1b-2b7e3c1d9a10",
        "node": "node-a", "writtenAt": "2026-01-02T03:04:05Z"}


def test_round_trip_keeps_every_member() -> None:
    data = marker_json(MARKER)
    assert data.endswith(b"\n")
    assert json.loads(data) == {"version": 1, "namespace": "vms", "vm": "pg01",
                                "vmiUID": MARKER.vmi_uid, "node": "node-a.example.com",
                                "writtenAt": "2026-01-02T03:04:05Z"}
    assert parse_marker(data) == MARKER


def test_fractions_of_a_second_survive_and_the_time_is_utc() -> None:
    moment = datetime.datetime(2026, 1, 2, 4, 4, 5, 250000,
                               tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
    marker = HomeMarker("vms", "pg01", "u-1", "node-a", moment)
    data = marker_json(marker)
    assert json.loads(data)["writtenAt"] == "2026-01-02T03:04:05.25Z"
    back = parse_marker(data).written_at
    assert back == moment and back.utcoffset() == datetime.timedelta(0)


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-01-02T03:04:05Z", datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2026-01-02T03:04:05+00:00", datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2026-01-02T03:04:05.123456789Z", datetime.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
    ("2026-01-02T03:04:05.1Z", datetime.datetime(2026, 1, 2, 3, 4, 5, 100000, tzinfo=UTC)),
])
def test_parse_time_reads_rfc3339_utc(text: str, expected: datetime.datetime) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize(("text", "reason"), [
    ("2026-01-02T03:04:05+01:00", "not in UTC"),
    ("2026-01-02 03:04:05Z", "not an RFC 3339 time"),
    ("2026-01-02T03:04:05", "not an RFC 3339 time"),
    ("2026-13-02T03:04:05Z", "not a valid time"),
    ("yesterday", "not an RFC 3339 time"),
])
def test_parse_time_refuses(text: str, reason: str) -> None:
    with pytest.raises(Malformed) as err:
        parse_time(text)
    assert err.value.field == "writtenAt" and reason in err.value.reason


def test_format_time_refuses_a_naive_datetime() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        format_time(datetime.datetime(2026, 1, 2, 3, 4, 5))


@pytest.mark.parametrize(("change", "field", "reason"), [
    ({"version": 2}, "home.node.json.version", "must be 1"),
    ({"version": True}, "home.node.json.version", "must be 1"),
    ({"extra": 1}, "home.node.json.extra", "unknown member"),
    ({"namespace": "Vms"}, "home.node.json.namespace", "not a namespace name"),
    ({"namespace": "a.b"}, "home.node.json.namespace", "not a namespace name"),
    ({"vm": "../etc"}, "home.node.json.vm", "not a VM name"),
    ({"vm": ""}, "home.node.json.vm", "non-empty string"),
    ({"node": 7}, "home.node.json.node", "non-empty string"),
    ({"node": "Node_A"}, "home.node.json.node", "not a node name"),
    ({"vmiUID": "a/b"}, "home.node.json.vmiUID", "not an object UID"),
    ({"writtenAt": 1767323045}, "home.node.json.writtenAt", "must be a string"),
    ({"writtenAt": "2026-01-02T03:04:05-05:00"}, "home.node.json.writtenAt", "not in UTC"),
])
def test_parse_marker_refuses_naming_the_member(change: dict[str, object], field: str, reason: str) -> None:
    doc = {**GOOD, **change}
    with pytest.raises(Malformed) as err:
        parse_marker(json.dumps(doc).encode())
    assert err.value.field == field
    assert reason in err.value.reason


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{" * 100_000, "bytes, more than"),
    (b'{"version": 1, "pad": "' + b"x" * MAX_MARKER_BYTES + b'"}', "bytes, more than"),
])
def test_parse_marker_refuses_unreadable_bytes(data: bytes, reason: str) -> None:
    with pytest.raises(Malformed) as err:
        parse_marker(data)
    assert err.value.field == "home.node.json"
    assert reason in err.value.reason


def test_marker_json_refuses_what_it_could_not_read_back() -> None:
    bad = HomeMarker("vms", "pg01", "u-1", "node a", MARKER.written_at)
    with pytest.raises(Malformed) as err:
        marker_json(bad)
    assert err.value.field == "home.node.json.node"
