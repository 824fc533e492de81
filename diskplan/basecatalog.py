"""The node's base catalog: the SHA-256 of each library base, keyed by the file's identity.

One entry per library file, ``<hostDisks.root>/.diskhooks/catalog/<file>.entry.json``
(:func:`diskplan.keys.catalog_dir`, :func:`diskplan.keys.catalog_entry_name`), written by root on
the node only: the node agent (off the start path) or the first ``prepare`` that needs the hash.
A ``prepare`` reading the catalog takes an entry's ``sha256`` as the base's content only when the
base's identity *now* is exactly the entry's; otherwise it hashes the base itself. Why that keeps
"an overlay is never opened on a base whose content changed": docs/BASE-CATALOG.md. Wire form, one
JSON object::

    {"version": 1, "file": "almalinux-9.qcow2", "dev": 2049, "ino": 1234, "size": 1074135040,
     "mtimeNs": 1767225600000000000, "ctimeNs": 1767225600000000000, "sha256": "<64 hex>",
     "hashedAt": "2026-01-02T03:04:05.25Z", "hashedBy": "node-agent"}

``dev``..``ctimeNs`` are :data:`diskplan.baserecord.IDENTITY_FIELDS` (the same identity the base
records hold); ``hashedBy`` is ``node-agent`` or ``prepare``. Pure: bytes in, a
:class:`CatalogEntry` out (or :class:`~diskplan.errors.Malformed` naming the member), and back;
the trust rule (:func:`mismatch`) and the quiet rule (:func:`is_quiet`) as plain functions of
their inputs. Reading is strict and bounded (:data:`MAX_ENTRY_BYTES`), since an entry is a file.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diskplan import keys as K
from diskplan.baserecord import IDENTITY_FIELDS, identity_changes
from diskplan.errors import Malformed
from diskplan.homemarker import format_time, parse_time
from diskplan.plan import _BASE_FILE, load_json_object

CATALOG_VERSION = 1
MAX_ENTRY_BYTES = 4096  # an entry is ~300 bytes
MEMBERS = ("version", "file", *IDENTITY_FIELDS, "sha256", "hashedAt", "hashedBy")
HASHED_BY = ("node-agent", "prepare")
#: A file is hashed for the catalog only once its ctime is at least this old (see
#: :func:`is_quiet`): far above any filesystem's timestamp granularity (coarse clock ticks of a
#: few ms; 1 s on ext3; 2 s on FAT) and any sensible clock adjustment between two reads.
QUIET_NS = 2_000_000_000
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class CatalogEntry:
    """The SHA-256 of a library file's content while it had ``identity``.

    - ``file``: the library file name (a plan's ``backing.file``).
    - ``identity``: device, inode, size, mtime and ctime (ns) when it was hashed, the same before
      and after every byte was read (:data:`~diskplan.baserecord.IDENTITY_FIELDS`).
    - ``sha256``: lower-case hex digest of every byte of the file.
    - ``hashed_at``: when the hashing ended (aware UTC datetime); ``hashed_by``: who hashed it.
    """

    file: str
    identity: Mapping[str, int]
    sha256: str
    hashed_at: datetime.datetime
    hashed_by: str


def is_base_file_name(name: str) -> bool:
    """Whether ``name`` can be a plan's library base file (so it can have a catalog entry)."""
    return _BASE_FILE.match(name) is not None


def entry_json(entry: CatalogEntry) -> bytes:
    """The entry file's bytes (one JSON object in :data:`MEMBERS` order and a newline); checked
    as :func:`parse_entry` checks it (``Malformed``), so an entry that could not be read back is
    never written."""
    doc: dict[str, Any] = {"version": CATALOG_VERSION, "file": entry.file}
    doc.update({k: entry.identity.get(k) for k in IDENTITY_FIELDS})
    doc.update(sha256=entry.sha256, hashedAt=format_time(entry.hashed_at), hashedBy=entry.hashed_by)
    _check(doc)
    return (json.dumps(doc, separators=(", ", ": "), ensure_ascii=True) + "\n").encode()


def parse_entry(data: bytes, *, file: str | None = None) -> CatalogEntry:
    """Read an entry file's bytes; :class:`Malformed` naming ``<entry>.<member>``. With ``file``
    (the name the entry was found under), an entry describing another file is refused too."""
    where = K.catalog_entry_name(file) if file is not None else "catalog entry"
    doc = load_json_object(data, field=where, what="the catalog entry", max_bytes=MAX_ENTRY_BYTES)
    entry = _check(doc, where=where)
    if file is not None and entry.file != file:
        raise Malformed(f"{where}.file", f"names {entry.file!r}, not {file!r}: an entry is only read "
                        "under its own file's name")
    return entry


def mismatch(entry: CatalogEntry, *, file: str, identity: Mapping[str, int]) -> str | None:
    """Why ``entry`` does not describe the library file ``file`` as it is now (its ``identity``):
    None when it does, and only then may its ``sha256`` stand for the content."""
    if entry.file != file:
        return f"the entry is for {entry.file!r}, not {file!r}"
    if any(entry.identity.get(k) != identity.get(k) for k in IDENTITY_FIELDS):
        return f"the file changed since it was hashed ({identity_changes(entry.identity, identity)})"
    return None


def is_quiet(identity: Mapping[str, int], *, now_ns: int, quiet_ns: int = QUIET_NS) -> bool:
    """Whether a file whose identity was just taken may be hashed for the catalog: its last change
    (``ctimeNs``) lies at least ``quiet_ns`` before ``now_ns`` (the wall clock when the identity was
    taken, as ``time.time_ns()``).

    ctime, not mtime: ``utime`` sets mtime to anything, while ctime is always the kernel's clock at
    the change. Timestamps are taken from a coarse clock, so a write in the same tick as an earlier
    one can leave ctime unchanged; a file quiet at the first ``stat`` cannot be changed later
    without ctime moving to a later tick (every later change happens at ``now_ns`` or after, more
    than ``quiet_ns`` past the recorded ctime), so "identity equal before and after reading" then
    proves that nothing was written while it was read."""
    return now_ns - identity["ctimeNs"] >= quiet_ns


def _check(doc: dict[str, Any], *, where: str = "catalog entry") -> CatalogEntry:
    unknown = sorted(set(doc) - set(MEMBERS))
    if unknown:
        raise Malformed(f"{where}.{unknown[0][:64]}", "unknown member in a catalog entry")
    missing = [m for m in MEMBERS if m not in doc]
    if missing:
        raise Malformed(f"{where}.{missing[0]}", "is missing")
    version = doc["version"]
    if not _is_int(version) or version != CATALOG_VERSION:
        raise Malformed(f"{where}.version", f"must be {CATALOG_VERSION} (this diskhooks reads version "
                        f"{CATALOG_VERSION}), not {str(version)[:32]!r}")
    file = doc["file"]
    if not isinstance(file, str) or not is_base_file_name(file):
        raise Malformed(f"{where}.file", f"{str(file)[:64]!r} is not a library base file name")
    for k in IDENTITY_FIELDS:
        if not _is_int(doc[k]) or doc[k] < 0:
            raise Malformed(f"{where}.{k}", "must be a non-negative integer")
    sha = doc["sha256"]
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise Malformed(f"{where}.sha256", "must be 64 lower-case hex digits")
    by = doc["hashedBy"]
    if by not in HASHED_BY:
        raise Malformed(f"{where}.hashedBy", f"must be one of {', '.join(HASHED_BY)}")
    at = doc["hashedAt"]
    if not isinstance(at, str):
        raise Malformed(f"{where}.hashedAt", "must be a string (RFC 3339, UTC)")
    return CatalogEntry(file=file, identity={k: int(doc[k]) for k in IDENTITY_FIELDS}, sha256=sha,
                        hashed_at=parse_time(at, field=f"{where}.hashedAt"), hashed_by=str(by))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
