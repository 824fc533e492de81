"""Structured log lines of the hook sidecar: one JSON object per line, on a stream (stderr).

What a line may say is decided here; the servicers only hand over facts. Two pure helpers describe a
call for the log without parsing anything twice in full: :func:`vmi_identity` (namespace/name of the
VMI from its JSON, never raising) and :func:`changed_disks` (aliases of the ``<disk>`` elements whose
text differs between the XML received and the XML answered, from a byte-level scan: a log hint, not a
decision). :func:`larger_than_planned` turns the images the checks accepted although they are
larger than planned into the line's ``largerThanPlanned`` and ``warning`` (prepare warns on its own
line too). No gRPC, no lxml, no environment.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hooksidecar.images import LargerImage

_DISK_TAG = re.compile(rb"<disk\b|</disk>")
_ALIAS = re.compile(rb'<alias\s+name="([^"]{1,256})"')
_MAX_LISTED = 32


def larger_than_planned(images: Sequence[LargerImage]) -> dict[str, Any]:
    """Log fields for images the sidecar accepted although they are larger than planned (prepare
    keeps them, never shrinks them, and warns on its own log line): ``largerThanPlanned`` (volume,
    virtualSize, plannedSize; at most 32) and a ``warning`` in prepare's words. Empty when none."""
    if not images:
        return {}
    listed = images[:_MAX_LISTED]
    warning = "; ".join(
        f"volume {i.volume}: {i.path} is larger than planned ({i.virtual_size} bytes, planned "
        f"{i.planned_size}): kept as it is, since diskhooks never shrinks an image; the guest sees "
        f"{i.virtual_size} bytes" for i in listed)
    if len(images) > len(listed):
        warning += f"; and {len(images) - len(listed)} more"
    return {"largerThanPlanned": [{"volume": i.volume, "virtualSize": i.virtual_size,
                                   "plannedSize": i.planned_size} for i in listed],
            "warning": warning}


class JsonLog:
    """Writes one JSON object per line to ``stream``; safe to call from several threads."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "event": event, **fields}
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True, default=str) + "\n"
        with self._lock:
            try:
                self._stream.write(line)
                self._stream.flush()
            except (OSError, ValueError):  # a closed stderr must never fail a call
                pass


def vmi_identity(vmi_json: bytes) -> str:
    """``namespace/name`` of the VMI, or ``"?"`` when the JSON does not say (never raises)."""
    try:
        doc = json.loads(vmi_json)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "?"
    return identity_of(doc)


def identity_of(vmi: Any) -> str:
    """:func:`vmi_identity` of a VMI already parsed (the sidecar's core hands it over, so a call's
    line names the VMI without a second parse); never raises."""
    meta = vmi.get("metadata") if isinstance(vmi, dict) else None
    if not isinstance(meta, dict):
        return "?"
    ns, name = meta.get("namespace"), meta.get("name")
    if not isinstance(ns, str) or not isinstance(name, str):
        return "?"
    return f"{ns[:253]}/{name[:253]}"


def changed_disks(before: bytes, after: bytes) -> list[str]:
    """Aliases (``ua-<volume>``) of the disks whose XML differs between ``before`` and ``after``.

    Byte-level and approximate (a disk that appears or vanishes is listed too; white space does not
    count); at most 32 names.
    """
    if before == after:
        return []
    old, new = _disks(before), _disks(after)
    changed = [alias for alias in sorted(set(old) | set(new)) if not _same(old.get(alias), new.get(alias))]
    return changed[:_MAX_LISTED]


def _same(old: bytes | None, new: bytes | None) -> bool:
    """Whether two disk segments read the same, white space aside (runs of it count as one)."""
    if old is None or new is None:
        return old is new
    return old == new or old.split() == new.split()


def _disks(xml: bytes) -> dict[str, bytes]:
    """``<disk>...</disk>`` segments by alias, in one linear pass (no backtracking regex over the
    document: its size is bounded only by the gRPC message limit)."""
    out: dict[str, bytes] = {}
    start: int | None = None
    for match in _DISK_TAG.finditer(xml):
        if match.group() != b"</disk>":
            start = match.start()  # a self-closed <disk/> before it is simply not listed
            continue
        if start is None:
            continue
        text = xml[start:match.end()]
        start = None
        alias = _ALIAS.search(text)
        key = alias.group(1).decode("ascii", "replace") if alias else f"#{len(out)}"
        out[key] = text
    return out
