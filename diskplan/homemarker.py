"""The home marker: a small JSON file ``prepare`` leaves in a VM's directory on the node.

``<hostDisks.root>/<namespace>/<vm>/home.node.json`` (:data:`diskplan.keys.HOME_MARKER`) says which
node made the VM's images, for which VMI and when. The node agent reads it to record the home node
of a VM that started and stopped before the agent saw its VMI. Wire form, one JSON object::

    {"version": 1, "namespace": "vms", "vm": "pg01", "vmiUID": "0d5c...", "node": "node-a",
     "writtenAt": "2026-01-02T03:04:05Z"}

``writtenAt`` is RFC 3339 in UTC (``Z``; fractions of a second allowed). Pure: bytes in, a
:class:`HomeMarker` out (or :class:`~diskplan.errors.Malformed` naming the member and the reason),
and back; no files, no clock. Reading is strict (unknown members, wrong types, names that are not
Kubernetes names, a time that is not UTC are refused) and bounded (:data:`MAX_MARKER_BYTES`): the
file lies in a directory the node agent scans, so it is treated as untrusted input.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from typing import Any

from diskplan import keys as K
from diskplan.errors import Malformed
from diskplan.plan import DNS_LABEL, DNS_SUBDOMAIN, load_json_object

MARKER_VERSION = 1
MAX_MARKER_BYTES = 4096  # a marker is ~200 bytes
MEMBERS = ("version", "namespace", "vm", "vmiUID", "node", "writtenAt")
# a Kubernetes object UID (a UUID in practice); conservative, bounded
_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}\Z")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})\Z")


@dataclass(frozen=True)
class HomeMarker:
    """What ``prepare`` records on the node that holds a VM's images.

    - ``namespace``, ``vm``: the VM (the directory the file lies in must say the same).
    - ``vmi_uid``: the VMI whose launcher made or checked the images (``vmiUID``).
    - ``node``: the node prepare ran on (``DISKHOOKS_NODE_NAME``).
    - ``written_at``: when it was written, an aware UTC datetime (``writtenAt``).
    """

    namespace: str
    vm: str
    vmi_uid: str
    node: str
    written_at: datetime.datetime


def format_time(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC with ``Z``: seconds, plus microseconds when there are any. ``moment`` must be
    aware (a naive datetime has no defined instant: ``ValueError``)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("the time must be timezone-aware")
    utc = moment.astimezone(datetime.UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_time(text: str, *, field: str = "writtenAt") -> datetime.datetime:
    """An RFC 3339 time in UTC (``Z`` or ``+00:00``) as an aware datetime; :class:`Malformed` naming
    ``field``. Digits past microseconds are cut (Python's resolution)."""
    match = _RFC3339.match(text) if isinstance(text, str) else None
    if match is None:
        raise Malformed(field, f"{str(text)[:64]!r} is not an RFC 3339 time (YYYY-MM-DDTHH:MM:SSZ)")
    if match.group(2) not in ("Z", "+00:00", "-00:00"):
        raise Malformed(field, f"{text!r} is not in UTC (write it with Z)")
    fraction = match.group(1) or ""
    base = text[:19]
    try:
        moment = datetime.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.UTC)
    except ValueError as exc:
        raise Malformed(field, f"{text!r} is not a valid time: {exc}") from None
    if fraction:
        moment = moment.replace(microsecond=int(fraction[1:7].ljust(6, "0")))
    return moment


def marker_json(marker: HomeMarker) -> bytes:
    """The file's bytes: one JSON object in :data:`MEMBERS` order, then a newline. The marker is
    checked as :func:`parse_marker` would check it (``Malformed``), so a bad one is never written."""
    doc = {"version": MARKER_VERSION, "namespace": marker.namespace, "vm": marker.vm,
           "vmiUID": marker.vmi_uid, "node": marker.node,
           "writtenAt": format_time(marker.written_at)}
    _check(doc)
    return (json.dumps(doc, separators=(", ", ": "), ensure_ascii=True) + "\n").encode()


def parse_marker(data: bytes) -> HomeMarker:
    """Read a marker file's bytes; :class:`Malformed` naming ``home.node.json.<member>``."""
    doc = load_json_object(data, field=K.HOME_MARKER, what="the home marker", max_bytes=MAX_MARKER_BYTES)
    return _check(doc)


def _check(doc: dict[str, Any]) -> HomeMarker:
    where = K.HOME_MARKER
    unknown = sorted(set(doc) - set(MEMBERS))
    if unknown:
        raise Malformed(f"{where}.{unknown[0][:64]}", "unknown member in the home marker")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version != MARKER_VERSION:
        raise Malformed(f"{where}.version", f"must be {MARKER_VERSION} (this diskhooks reads version "
                        f"{MARKER_VERSION}), not {str(version)[:32]!r}")

    def text(member: str, pattern: re.Pattern[str], what: str) -> str:
        value = doc.get(member)
        if not isinstance(value, str) or not value:
            raise Malformed(f"{where}.{member}", "must be a non-empty string")
        if not pattern.match(value):
            raise Malformed(f"{where}.{member}", f"{value[:64]!r} is not {what}")
        return value

    namespace = text("namespace", DNS_LABEL, "a namespace name (DNS label)")
    vm = text("vm", DNS_SUBDOMAIN, "a VM name (DNS subdomain)")
    vmi_uid = text("vmiUID", _UID, "an object UID")
    node = text("node", DNS_SUBDOMAIN, "a node name (DNS subdomain)")
    written = doc.get("writtenAt")
    if not isinstance(written, str):
        raise Malformed(f"{where}.writtenAt", "must be a string (RFC 3339, UTC)")
    return HomeMarker(namespace=namespace, vm=vm, vmi_uid=vmi_uid, node=node,
                      written_at=parse_time(written, field=f"{where}.writtenAt"))
