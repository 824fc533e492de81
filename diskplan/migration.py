"""Cold migration of a stopped VM's directory to another node: the names and formats every side shares.

Pure (no I/O). The protocol goes through the cluster (docs/MIGRATION.md):

- the user's command sets :data:`ANN_MIGRATE_TO` (and optionally :data:`ANN_MIGRATE_DELETE_SOURCE`)
  on the VirtualMachine; the webhook validates it (:mod:`webhook.vm.migration`);
- the source node's agent moves the VM directory to the target's agent (rsync over mutual TLS),
  reports in :data:`ANN_MIGRATION_STATUS` (a :class:`MigrationStatus` as JSON) and in Events, then
  hands the home over: one update sets ``diskhooks.io/node`` to the target and removes the request.

The status and the agents' wire requests come from other processes, so reading them is strict
and bounded (:class:`~diskplan.errors.Malformed` naming the member and the reason).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from diskplan import keys as K
from diskplan.errors import Malformed, Refused
from diskplan.plan import DNS_LABEL, DNS_SUBDOMAIN, is_node_name, load_json_object

ANN_MIGRATE_TO = K.ANN_MIGRATE_TO
ANN_MIGRATE_DELETE_SOURCE = K.ANN_MIGRATE_DELETE_SOURCE
ANN_MIGRATION_STATUS = K.ANN_MIGRATION_STATUS
REQUEST_ANNOTATIONS = (ANN_MIGRATE_TO, ANN_MIGRATE_DELETE_SOURCE)

EVENT_STARTED = "MigrationStarted"
EVENT_RETRYING = "MigrationRetrying"
EVENT_SUCCEEDED = "MigrationSucceeded"
EVENT_FAILED = "MigrationFailed"
EVENT_CANCELLED = "MigrationCancelled"
EVENT_SOURCE_REMOVED = "MigrationSourceRemoved"

# phases, in order; the last three end a migration
PENDING, PREFLIGHT, COPYING, VERIFYING, HANDING_OVER = "Pending", "Preflight", "Copying", "Verifying", \
    "HandingOver"
SUCCEEDED, FAILED, CANCELLED = "Succeeded", "Failed", "Cancelled"
PHASES = (PENDING, PREFLIGHT, COPYING, VERIFYING, HANDING_OVER, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)

MAX_STATUS_BYTES = 4096
MAX_ERROR_CHARS = 600
CLIP_MARK = " ... "
MAX_HEADER_BYTES = 256 * 1024  # a wire request: names, a manifest of a few files
MAX_FILES = 128  # files of one VM directory in a request (the target's record of it stays small)
DEFAULT_PORT = 9181
_ID = re.compile(r"^[0-9a-f]{8,32}$")
_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
STATUS_MEMBERS = ("id", "phase", "source", "target", "bytes", "total", "rate", "error", "startedAt",
                  "updatedAt", "sourceKept", "attempt", "targetStarted")

# what the source node does with its copy once the VM has moved (policy nodeAgent.migration.keepSource)
KEEP_UNTIL_STARTED, KEEP_FOREVER = "untilStarted", "forever"
KEEP_SOURCE_CHOICES = (KEEP_UNTIL_STARTED, KEEP_FOREVER)


# ------------------------------------------------------------------------------------------------
# the status annotation
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MigrationStatus:
    """``diskhooks.io/migration-status``: one migration's progress and outcome, written by the
    agents only. ``bytes``/``total``: bytes of the VM directory's files copied so far and in all;
    ``rate``: bytes per second over the last interval; ``source_kept``: where the source node keeps
    its copy after a success (None: deleted, or not yet); ``target_started`` (``targetStarted``):
    when the target's agent first saw the VM running there after a success (None: not yet)."""

    id: str
    phase: str
    source: str
    target: str
    bytes: int = 0
    total: int = 0
    rate: int = 0
    error: str | None = None
    started_at: str = ""
    updated_at: str = ""
    source_kept: str | None = None
    attempt: int = 1
    target_started: str | None = None

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL

    def advanced(self, **changes: Any) -> MigrationStatus:
        return replace(self, **changes)


def clip_error(text: str) -> str:
    """``text`` in at most :data:`MAX_ERROR_CHARS` characters: a longer one keeps its beginning and its
    end (where a refusal says what happened to the copy) with `` ... `` between."""
    if len(text) <= MAX_ERROR_CHARS:
        return text
    keep = MAX_ERROR_CHARS - len(CLIP_MARK)
    return text[:keep - keep // 3] + CLIP_MARK + text[len(text) - keep // 3:]


def status_json(status: MigrationStatus) -> str:
    """The annotation's value (checked as :func:`parse_status` checks it)."""
    doc: dict[str, Any] = {"id": status.id, "phase": status.phase, "source": status.source,
                           "target": status.target, "bytes": status.bytes, "total": status.total,
                           "rate": status.rate, "startedAt": status.started_at,
                           "updatedAt": status.updated_at, "attempt": status.attempt}
    if status.error is not None:
        doc["error"] = clip_error(status.error)
    if status.source_kept is not None:
        doc["sourceKept"] = status.source_kept
    if status.target_started is not None:
        doc["targetStarted"] = status.target_started
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=True)
    _check_status(json.loads(text))
    return text


def parse_status(text: str | bytes) -> MigrationStatus:
    """Read the annotation; :class:`Malformed` naming ``diskhooks.io/migration-status.<member>``."""
    return _check_status(load_json_object(text, field=ANN_MIGRATION_STATUS, what="the migration status",
                                          max_bytes=MAX_STATUS_BYTES))


def _check_status(doc: dict[str, Any]) -> MigrationStatus:
    where = ANN_MIGRATION_STATUS
    unknown = sorted(set(doc) - set(STATUS_MEMBERS))
    if unknown:
        raise Malformed(f"{where}.{unknown[0][:64]}", "unknown member")

    def count(member: str) -> int:
        value = doc.get(member, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise Malformed(f"{where}.{member}", "must be a whole number, 0 or more")
        return value

    ident = doc.get("id")
    if not isinstance(ident, str) or not _ID.match(ident):
        raise Malformed(f"{where}.id", "must be 8 to 32 lower-case hex digits")
    phase = doc.get("phase")
    if phase not in PHASES:
        raise Malformed(f"{where}.phase", f"must be one of {', '.join(PHASES)}")
    nodes = []
    for member in ("source", "target"):
        value = doc.get(member)
        if not is_node_name(value):
            raise Malformed(f"{where}.{member}", "must be a node name")
        nodes.append(str(value))
    times = []
    for member in ("startedAt", "updatedAt", "targetStarted"):
        value = doc.get(member, "")
        if not isinstance(value, str) or (value and not _TIME.match(value)):
            raise Malformed(f"{where}.{member}", "must be an RFC 3339 time in UTC")
        times.append(value)
    error = doc.get("error")
    if error is not None and (not isinstance(error, str) or len(error) > MAX_ERROR_CHARS):
        raise Malformed(f"{where}.error", f"must be a string of at most {MAX_ERROR_CHARS} characters")
    kept = doc.get("sourceKept")
    if kept is not None and (not isinstance(kept, str) or not kept.startswith("/") or len(kept) > 1024):
        raise Malformed(f"{where}.sourceKept", "must be an absolute path")
    attempt = count("attempt") if "attempt" in doc else 1
    return MigrationStatus(id=ident, phase=str(phase), source=nodes[0], target=nodes[1],
                           bytes=count("bytes"), total=count("total"), rate=count("rate"), error=error,
                           started_at=times[0], updated_at=times[1], source_kept=kept,
                           attempt=max(1, attempt), target_started=times[2] or None)


def status_of(annotations: Mapping[str, Any] | None) -> MigrationStatus | None:
    """The VM's status annotation, None when absent or unreadable."""
    value = (annotations or {}).get(ANN_MIGRATION_STATUS)
    if not isinstance(value, str):
        return None
    try:
        return parse_status(value)
    except Malformed:
        return None


def is_migration_id(value: object) -> bool:
    """Whether ``value`` is a migration's ``id`` (8 to 32 lower-case hex digits)."""
    return isinstance(value, str) and bool(_ID.match(value))


def migrate_to_of(annotations: Mapping[str, Any] | None) -> str | None:
    value = (annotations or {}).get(ANN_MIGRATE_TO)
    return value if isinstance(value, str) else None


def delete_source_of(annotations: Mapping[str, Any] | None) -> bool:
    return (annotations or {}).get(ANN_MIGRATE_DELETE_SOURCE) == "true"


# ------------------------------------------------------------------------------------------------
# which VMs count as stopped
# ------------------------------------------------------------------------------------------------
STOPPED_STRATEGIES = ("Halted", "Manual")


def stop_problem(spec: Mapping[str, Any]) -> str | None:
    """Why a VM's ``spec`` lets it run (None when it stays stopped until someone starts it):
    ``running: true``, or a ``runStrategy`` that starts it (Always, RerunOnFailure, Once)."""
    running = spec.get("running")
    strategy = spec.get("runStrategy")
    if running is True:
        return "spec.running is true"
    if running is False or running is None and strategy is None:
        return None
    if strategy in STOPPED_STRATEGIES:
        return None
    return f"spec.runStrategy is {str(strategy)[:40]!r} (stop it first: runStrategy Halted)"


# ------------------------------------------------------------------------------------------------
# the VM directory's files
# ------------------------------------------------------------------------------------------------
_DISK = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.(qcow2|base\.json)$")
_PERSIST = re.compile(r"^persist-root\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.(qcow2|base\.json)$")


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")


def is_vm_file(name: str) -> bool:
    """Whether ``name`` is a file diskhooks keeps in a VM directory (an image, a base record, the
    home marker); prepare's temporary names (leading dot) and anything else are not."""
    return name == K.HOME_MARKER or bool(_DISK.match(name)) or bool(_PERSIST.match(name))


def is_movable_name(name: str) -> bool:
    """Whether a file of a VM directory moves with it: any plain name (letters, digits, ``._+-``,
    no leading dot). A leading dot marks a temporary file (prepare's ``.<name>.tmp-<hex>``, rsync's
    partial directory), which stays behind."""
    return bool(_SAFE_NAME.match(name)) and name not in (".", "..")


@dataclass(frozen=True)
class FileEntry:
    """One file of the VM directory: ``size`` (bytes), ``allocated`` (bytes on disk),
    ``sha256`` (None until hashed), ``virtual`` (an image's virtual size from its qcow2 header, as
    the source read it, for the target's capacity check at preflight; None otherwise)."""

    name: str
    size: int
    allocated: int
    sha256: str | None = None
    virtual: int | None = None


@dataclass(frozen=True)
class Base:
    """A library base one of the VM's disks was made on (from its ``<disk>.base.json``)."""

    file: str
    sha256: str


# ------------------------------------------------------------------------------------------------
# the agents' wire requests (one JSON line each way, then rsync's stream for ``rsync``)
# ------------------------------------------------------------------------------------------------
OP_PREFLIGHT, OP_RSYNC, OP_COMMIT, OP_ABORT = "preflight", "rsync", "commit", "abort"
OPS = (OP_PREFLIGHT, OP_RSYNC, OP_COMMIT, OP_ABORT)


@dataclass(frozen=True)
class WireRequest:
    op: str
    id: str
    namespace: str
    vm: str
    vm_uid: str
    source: str
    target: str
    files: tuple[FileEntry, ...] = ()
    bases: tuple[Base, ...] = ()
    rsync_args: tuple[str, ...] = ()
    reason: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict)


def request_json(r: WireRequest) -> bytes:
    doc: dict[str, Any] = {"op": r.op, "id": r.id, "namespace": r.namespace, "vm": r.vm, "vmUID": r.vm_uid,
                           "source": r.source, "target": r.target}
    if r.files:
        doc["files"] = [{"name": f.name, "size": f.size, "allocated": f.allocated,
                         **({"sha256": f.sha256} if f.sha256 else {}),
                         **({"virtual": f.virtual} if f.virtual is not None else {})} for f in r.files]
    if r.bases:
        doc["bases"] = [{"file": b.file, "sha256": b.sha256} for b in r.bases]
    if r.rsync_args:
        doc["args"] = list(r.rsync_args)
    if r.reason:
        doc["reason"] = clip_error(r.reason)
    data = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()
    parse_request(data)
    return data + b"\n"


def parse_request(data: bytes) -> WireRequest:
    """A peer's request line; :class:`Malformed` naming the member and the reason."""
    doc = load_json_object(data, field="request", what="the request", max_bytes=MAX_HEADER_BYTES)
    unknown = sorted(set(doc) - {"op", "id", "namespace", "vm", "vmUID", "source", "target", "files",
                                 "bases", "args", "reason"})
    if unknown:
        raise Malformed(f"request.{unknown[0][:64]}", "unknown member")
    op = doc.get("op")
    if op not in OPS:
        raise Malformed("request.op", f"must be one of {', '.join(OPS)}")

    def text(member: str, ok: Any, what: str) -> str:
        value = doc.get(member)
        if not isinstance(value, str) or not ok(value):
            raise Malformed(f"request.{member}", f"must be {what}")
        return value

    ident = text("id", _ID.match, "8 to 32 lower-case hex digits")
    namespace = text("namespace", DNS_LABEL.match, "a namespace name")
    vm = text("vm", DNS_SUBDOMAIN.match, "a VM name")
    vm_uid = text("vmUID", _UID.match, "an object UID")
    source = text("source", is_node_name, "a node name")
    target = text("target", is_node_name, "a node name")
    listed = _list(doc, "files")
    if len(listed) > MAX_FILES:
        raise Malformed("request.files", f"lists {len(listed)} files; a VM directory moves with at most "
                                         f"{MAX_FILES}")
    files = tuple(_file_entry(f, i) for i, f in enumerate(listed))
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise Malformed("request.files", "names a file twice")
    bases = tuple(_base(b, i) for i, b in enumerate(_list(doc, "bases")))
    args = _list(doc, "args")
    if not all(isinstance(a, str) and len(a) <= 256 for a in args) or len(args) > 32:
        raise Malformed("request.args", "must be at most 32 strings")
    reason = doc.get("reason", "")
    if not isinstance(reason, str):
        raise Malformed("request.reason", "must be a string")
    return WireRequest(op=str(op), id=ident, namespace=namespace, vm=vm, vm_uid=vm_uid, source=source,
                       target=target, files=files, bases=bases, rsync_args=tuple(args),
                       reason=clip_error(reason))


def _list(doc: Mapping[str, Any], member: str) -> list[Any]:
    value = doc.get(member, [])
    if not isinstance(value, list) or len(value) > 256:
        raise Malformed(f"request.{member}", "must be a list of at most 256 items")
    return value


def _file_entry(item: Any, i: int) -> FileEntry:
    where = f"request.files[{i}]"
    if not isinstance(item, dict) or set(item) - {"name", "size", "allocated", "sha256", "virtual"}:
        raise Malformed(where, "must be an object with name, size, allocated and optional sha256 and virtual")
    name = item.get("name")
    if not isinstance(name, str) or not is_movable_name(name):
        raise Malformed(f"{where}.name", "is not a plain file name (letters, digits, ._+-, no leading dot)")

    def count(member: str) -> int:
        value = item.get(member)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise Malformed(f"{where}.{member}", "must be a whole number, 0 or more")
        return value

    size, allocated = count("size"), count("allocated")
    virtual = count("virtual") if item.get("virtual") is not None else None
    sha = item.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha)):
        raise Malformed(f"{where}.sha256", "must be 64 lower-case hex digits")
    return FileEntry(name=name, size=size, allocated=allocated, sha256=sha, virtual=virtual)


def _base(item: Any, i: int) -> Base:
    where = f"request.bases[{i}]"
    if not isinstance(item, dict) or set(item) != {"file", "sha256"}:
        raise Malformed(where, "must be an object with file and sha256")
    file, sha = item["file"], item["sha256"]
    if not isinstance(file, str) or not file or "/" in file or file.startswith(".") or len(file) > 253:
        raise Malformed(f"{where}.file", "must be a file name of the image library")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise Malformed(f"{where}.sha256", "must be 64 lower-case hex digits")
    return Base(file=file, sha256=sha)


def reply_json(ok: bool, **members: Any) -> bytes:
    """The target's answer line: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``."""
    doc = {"ok": ok, **members}
    if "error" in doc and isinstance(doc["error"], str):
        doc["error"] = clip_error(doc["error"])
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def parse_reply(data: bytes) -> dict[str, Any]:
    doc = load_json_object(data, field="reply", what="the reply", max_bytes=64 * 1024)
    if not isinstance(doc.get("ok"), bool):
        raise Malformed("reply.ok", "must be true or false")
    return doc


# ------------------------------------------------------------------------------------------------
# rsync: the one command line each side runs
# ------------------------------------------------------------------------------------------------
DEST_PLACEHOLDER = "staging/"
# -r recursive, -t times, -p permissions, -o/-g owner and group (numeric): qemu's 107:107 stays;
# -S holes stay holes; no -l/-D/-H: links and devices are never copied (refused before);
# --inplace: written straight into the staging copy, so an interrupted file stays there and is the
# basis of the next attempt (resume: only what differs moves), and a resume needs no second copy's
# space; --delete-during: the staging directory ends up exactly the source's file set; --exclude:
# temporary files (leading dot) stay behind; --stats: the bytes that went over the wire
RSYNC_CLIENT_OPTIONS = ("-rtpogS", "--numeric-ids", "--inplace", "--delete-during", "--exclude=.*",
                        "--info=progress2", "--no-inc-recursive", "--stats")
_SERVER_SHORT = re.compile(r"^-[ogtprS]+e\.[A-Za-z]*$")
_SERVER_LONG = ("--delete-during", "--numeric-ids", "--inplace", "--stats", "--compress-choice=zstd",
                "--compress-level=1")
# zstd level 1 for a directory that is mostly holes (see wants_compression): rsync reads a hole as
# zeros and would send them; compressed, a run of zeros costs next to nothing on the wire
RSYNC_COMPRESS_OPTIONS = ("--compress", "--compress-choice=zstd", "--compress-level=1")
SPARSE_FRACTION = 0.75
_BWLIMIT = re.compile(r"^--bwlimit=[1-9][0-9]{0,8}$")  # KiB/s: the agents' --migration-bandwidth


def wants_compression(files: Sequence[FileEntry]) -> bool:
    """Whether to compress the copy: when the files allocate less than :data:`SPARSE_FRACTION` of
    their size (holes punched by a guest's discards), so that the holes' zeros do not cross the
    network. Dense images (random data, already compressed) are sent as they are: compressing them
    costs CPU for nothing."""
    size = sum(f.size for f in files)
    return size > 0 and sum(f.allocated for f in files) < SPARSE_FRACTION * size


def check_server_args(args: Sequence[str], staging: str) -> list[str]:
    """The ``rsync --server`` command line for a peer's ``args`` (what its rsync asked its remote
    shell to run), with the destination replaced by ``staging``. Only what
    :data:`RSYNC_CLIENT_OPTIONS` produces is accepted: a receiving server (never ``--sender``),
    the option letters and long options listed, the placeholder destination. :class:`Refused`
    naming the first argument not accepted."""
    where = "request.args"
    a = list(args)
    if len(a) < 5 or a[0] != "rsync" or a[1] != "--server":
        raise Refused(where, "must be an rsync --server command line")
    if a[-2] != "." or a[-1] != DEST_PLACEHOLDER:
        raise Refused(where, f"must end with . {DEST_PLACEHOLDER}")
    middle = a[2:-2]
    if not middle or not _SERVER_SHORT.match(middle[0]):
        raise Refused(where, f"{middle[0][:40]!r} is not an accepted option cluster" if middle
                      else "has no options")
    for arg in middle[1:]:
        if arg not in _SERVER_LONG and not _BWLIMIT.match(arg):
            raise Refused(where, f"{arg[:40]!r} is not accepted")
    if len(set(middle[1:])) != len(middle[1:]):
        raise Refused(where, "repeats an option")
    return ["rsync", "--server", *middle, ".", staging.rstrip("/") + "/"]


def ensure(condition: bool, field_: str, reason: str) -> None:
    if not condition:
        raise Refused(field_, reason)
