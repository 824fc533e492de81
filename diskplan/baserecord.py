"""The base record of a library-backed disk: what the overlay ``<disk>.qcow2`` was made on.

prepare writes ``<disk>.base.json`` beside the overlay *before* it creates the overlay (an overlay
never exists without its record) and checks it at every later start; the hook sidecar compares the
base's cheap identity with it at every ``OnDefineDomain``. Pure: the caller stats and hashes.

Record (JSON object, written by prepare only)::

    {"base": "almalinux-9", "file": "almalinux-9.qcow2", "format": "qcow2",
     "virtualSize": 10737418240, "sha256": "<64 hex>", "overlay": "data.qcow2",
     "identity": {"dev": 2049, "ino": 1234, "size": 1074135040,
                  "mtimeNs": 1767225600000000000, "ctimeNs": 1767225600000000000}}

``sha256`` is over every byte of the base file (its content, whatever its format). ``identity`` is
the file's cheap fingerprint: device, inode, size, mtime and ctime in nanoseconds. A base copied
over in place (``cp new old``) keeps its inode but changes size, mtime or ctime; a new file moved in
(``mv``, ``rsync``) changes the inode; ``touch`` changes the times. When the identity still matches,
the content is trusted without reading it; when it does not, prepare hashes the file again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from diskplan.plan import BASE_FORMATS, Backing, PlannedDisk

MAX_RECORD_BYTES = 64 * 1024  # both base records (this one and the persistent root's): prepare and the sidecar
IDENTITY_FIELDS = ("dev", "ino", "size", "mtimeNs", "ctimeNs")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_REF_DIGEST = re.compile(r"@(sha256:[0-9a-f]{64})\Z")


def identity_of(st: os.stat_result) -> dict[str, int]:
    """The cheap identity of a file from its ``stat`` result."""
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtimeNs": st.st_mtime_ns,
            "ctimeNs": st.st_ctime_ns}


def make_record(disk: PlannedDisk, *, virtual_size: int, sha256: str,
                identity: Mapping[str, int]) -> dict[str, Any]:
    """The record of ``disk``'s library base (``disk.backing`` must be set)."""
    b = disk.backing
    assert b is not None
    return {"base": b.image, "file": b.file, "format": b.format, "virtualSize": virtual_size,
            "sha256": sha256, "overlay": disk.file, "identity": dict(identity)}


def record_problem(doc: Any) -> str | None:
    """Why ``doc`` (parsed JSON) is not a record prepare writes (None when it is one)."""
    if not isinstance(doc, dict):
        return "is not a JSON object"
    ok = (isinstance(doc.get("base"), str) and isinstance(doc.get("file"), str)
          and doc.get("format") in BASE_FORMATS and _is_count(doc.get("virtualSize"))
          and isinstance(doc.get("sha256"), str) and bool(_SHA256.match(doc["sha256"]))
          and isinstance(doc.get("overlay"), str) and isinstance(doc.get("identity"), dict)
          and set(doc["identity"]) == set(IDENTITY_FIELDS)
          and all(isinstance(v, int) and not isinstance(v, bool) for v in doc["identity"].values()))
    if not ok:
        return ("does not have the fields diskhooks writes (base, file, format, virtualSize, sha256, "
                "overlay, identity with " + ", ".join(IDENTITY_FIELDS) + ")")
    return None


def persist_record_problem(doc: Any) -> str | None:
    """Why ``doc`` (parsed JSON) is not a persistent root's base record
    (``persist-root.<volume>.base.json``) as prepare writes it (None when it is one). It holds the
    SHA-256 of the containerDisk's file (``sha256``), the image's digest when the VM names the image
    by digest (``imageDigest``, ``sha256:<64 hex>``), or both."""
    if not isinstance(doc, dict):
        return "is not a JSON object"
    sha, digest = doc.get("sha256"), doc.get("imageDigest")
    ok = (isinstance(doc.get("image"), str) and (sha is not None or digest is not None)
          and (sha is None or (isinstance(sha, str) and bool(_SHA256.match(sha))))
          and (digest is None or (isinstance(digest, str) and bool(_DIGEST.match(digest))))
          and doc.get("format") in BASE_FORMATS
          and isinstance(doc.get("virtualSize"), int) and isinstance(doc.get("vmiUID"), str)
          and isinstance(doc.get("overlay"), str))
    if not ok:
        return ("does not have the fields diskhooks writes (image, sha256, format, virtualSize, "
                "vmiUID, overlay; imageDigest for an image named by digest, beside or instead of "
                "sha256)")
    return None


def image_digest(reference: str) -> str | None:
    """``sha256:<hex>`` of an image reference pinned by digest (``...@sha256:<64 hex>``), else None.
    Content behind a digest never changes: the runtime checks what it pulls against it."""
    match = _REF_DIGEST.search(reference)
    return match.group(1) if match else None


def persist_needs_hash(image: str, record: Mapping[str, Any] | None) -> bool:
    """Whether prepare must hash the containerDisk's file for a persistent root on ``image`` whose
    valid base record is ``record`` (None: missing or unusable). A reference by digest is recorded
    by its digest: no hash at the first start, none while the record holds the same digest, and one
    only to compare with a hash recorded earlier (the VM moved from a tag to a digest). A tag always
    needs the hash; so does nothing that is refused anyway (a record with no hash to compare)."""
    digest = image_digest(image)
    if record is None:
        return digest is None
    if digest is not None and record.get("imageDigest") == digest:
        return False
    return record.get("sha256") is not None


def names_other_base(record: Mapping[str, Any], backing: Backing) -> bool:
    """Whether a valid record describes another base than the planned one."""
    return record.get("file") != backing.file or record.get("format") != backing.format


def identity_changes(recorded: Mapping[str, Any], now: Mapping[str, int]) -> str:
    """The identity fields that differ, for messages: ``"ino 12 -> 14, mtimeNs ..."``."""
    return ", ".join(f"{k} {recorded.get(k)} -> {now.get(k)}" for k in IDENTITY_FIELDS
                     if recorded.get(k) != now.get(k))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
