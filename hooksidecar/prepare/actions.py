"""What prepare can do for a volume: the actions :func:`hooksidecar.prepare.decide.plan_actions`
returns and :func:`hooksidecar.prepare.apply.apply` carries out. Plain values, no I/O.

One or more actions per volume: create, grow, keep unchanged, write or keep a base record, or
refuse; and for the VM directory, write or keep the home marker. Nothing is done when any volume
is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class CreateImage:
    volume: str
    path: str  # launcher path
    size: int
    backing: str | None = None  # launcher path written into the header
    backing_format: str | None = None


@dataclass(frozen=True)
class GrowImage:
    volume: str
    path: str
    size: int
    from_size: int
    backing_here: tuple[str, str] | None = None  # (launcher path, format) of the base to open


@dataclass(frozen=True)
class Unchanged:
    volume: str
    path: str
    virtual_size: int
    also: tuple[str, ...] = ()  # files kept as they are that qemu's user must still be able to read
    planned_size: int | None = None  # set when the image is larger than planned (kept, never shrunk)


@dataclass(frozen=True)
class WriteMarker:
    volume: str
    path: str
    record: Mapping[str, Any]


@dataclass(frozen=True)
class WriteBaseRecord:
    """Write a library-backed disk's base record (always before its overlay is created).
    ``why``: ``new`` (a new overlay), ``identity`` (same content, the file's identity changed),
    ``adopted`` (an overlay made before diskhooks kept records: the base as it is now)."""

    volume: str
    path: str
    record: Mapping[str, Any]
    hashed: bool
    why: Literal["new", "identity", "adopted"]
    warning: str | None = None


@dataclass(frozen=True)
class KeepBaseRecord:
    """The base record already describes the base: give it to qemu's user, write nothing."""

    volume: str
    path: str
    sha256: str
    hashed: bool


@dataclass(frozen=True)
class WriteHomeMarker:
    """Write the home marker (``home.node.json``) in the VM directory, before any image is made.
    ``data`` is the file's bytes (:func:`diskplan.homemarker.marker_json`); ``warning`` says what it
    replaces, when it replaces something."""

    volume: str
    path: str
    data: bytes
    node: str
    warning: str | None = None


@dataclass(frozen=True)
class KeepHomeMarker:
    """The home marker already names this node: left as it is (not rewritten at every start)."""

    volume: str
    path: str
    node: str


@dataclass(frozen=True)
class Refuse:
    volume: str
    reason: str


Action = (CreateImage | GrowImage | Unchanged | WriteMarker | WriteBaseRecord | KeepBaseRecord
          | WriteHomeMarker | KeepHomeMarker | Refuse)
