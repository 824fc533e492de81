"""Capacity accounting: what the images under ``hostDisks.root`` hold on one node, what a VM's
start adds, what its launcher Pod requests and what the node advertises. Pure (no I/O, no clock).

The argument (why nothing is counted twice or forgotten) is in docs/CAPACITY.md; in short:

- **A VM directory's footprint** (:func:`footprint`) is, per image file, the larger of its virtual
  size on disk and every size a trusted plan promises it: images of running and stopped VMs,
  detached disks (their files stay), persistent roots, images kept larger than planned, and orphans
  (a directory whose VM no longer exists) all count, each file once.
- **A launcher Pod's request** (:func:`launcher_request_gib`) is what its start may newly create on
  a node the scheduler is free to choose: the planned disks of a plan **without** a home node, in
  whole GiB (rounded up). A plan with a home node requests nothing: its images' space is already
  counted by the home node's agent from the VM's plan, stopped or running, and the VM can start
  nowhere else.
- **A directory is counted** at ``max(footprint, hold)``, where ``hold`` is the request of the live
  launcher Pod that made it (:class:`DirFacts`): the scheduler already subtracts that Pod's request
  from what the node advertises, so the directory adds only what exceeds it.
- **The node advertises** (:attr:`NodeAccount.advertised_gib`) the GiB its live Pods hold plus the
  whole GiB of room left under the budget (``overcommit x filesystem size``); no room at all once
  the free space is below the reserve. The scheduler then sees exactly the room.
- **prepare's guard** (:func:`check_start`) refuses a start that creates or grows an image when,
  after it, the counted total would exceed the budget or the free space would fall below the
  reserve; a start that creates and grows nothing is never refused.

The node agent hands its per-directory totals to prepare in a small summary file
(:class:`NodeSummary`, keyed by a hash of ``<namespace>/<vm>`` so the file names no VM).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diskplan import keys as K
from diskplan import qcow2
from diskplan.errors import Malformed
from diskplan.homemarker import format_time, parse_time
from diskplan.plan import DNS_SUBDOMAIN, Plan, load_json_object

if TYPE_CHECKING:
    from diskplan.capacitypolicy import CapacityPolicy

GIB = 1 << 30
#: what creating or growing one qcow2 image allocates at once (header, L1 and refcount tables; a
#: 2 TiB image made by qemu-img takes ~450 KiB), counted against the free space before it is made
METADATA_ESTIMATE = 1 << 20
SUMMARY_VERSION = 1
MAX_SUMMARY_BYTES = 16 << 20
MAX_SUMMARY_DIRS = 200_000
_DIR_KEY = re.compile(r"^[0-9a-f]{32}$")
MAX_BYTES = 2**63 - 1

# what a VM directory is, for the metrics and the log (every one of them is counted)
RUNNING = "running"  # a VMI of it runs on this node
STOPPED = "stopped"  # its VM's home is this node and nothing of it runs here
UNHOMED = "unhomed"  # its VM exists but is not homed here (before its home is recorded, or after a move)
ORPHAN = "orphan"  # no VM of that name exists: its images stay until the platform removes them
UNKNOWN = "unknown"  # not looked up yet
STATES = (RUNNING, STOPPED, UNHOMED, ORPHAN, UNKNOWN)


# ================================================================================================
# what a plan promises, and what its launcher Pod requests
# ================================================================================================
def planned_images(plan: Plan) -> dict[str, int]:
    """Image file name -> planned virtual bytes (rounded up to qemu's sectors, as prepare makes it)
    for the plan's attached disks. A persistent root has no size in the plan (it is the
    containerDisk's), and a detached disk is only kept, never made: both count from their files."""
    return {d.file: qcow2.round_to_sector(d.size_bytes) for d in plan.disks}


def gib_up(n: int) -> int:
    """Whole GiB holding ``n`` bytes (rounded up)."""
    return -(-n // GIB)


def launcher_request_gib(plan: Plan) -> int:
    """What the launcher Pod of ``plan`` requests of ``diskhooks.io/storage``: 0 for a plan with a
    home node (its images are counted by that node's agent, from the VM's plan), else its planned
    disks in whole GiB, rounded up (what a first start may create on whichever node it lands)."""
    if plan.node is not None:
        return 0
    return gib_up(sum(planned_images(plan).values()))


# ================================================================================================
# one VM directory
# ================================================================================================
@dataclass(frozen=True)
class ImageFile:
    """An image file found in a VM directory: its virtual size (from its qcow2 header; a file that
    is not qcow2 counts its length) and the bytes it occupies on the filesystem."""

    virtual_bytes: int
    allocated_bytes: int = 0


def footprint_sizes(images: Mapping[str, int], plans: Iterable[Mapping[str, int]] = ()) -> dict[str, int]:
    """Per file name, the largest of its virtual size on disk (``images``) and every size ``plans``
    promise it (a missing file counts its plan's size)."""
    sizes = dict(images)
    for plan in plans:
        for name, size in plan.items():
            sizes[name] = max(sizes.get(name, 0), size)
    return sizes


def footprint(images: Mapping[str, int], plans: Iterable[Mapping[str, int]] = ()) -> int:
    """Planned virtual bytes of one directory: the sum of :func:`footprint_sizes`."""
    return sum(footprint_sizes(images, plans).values())


def dir_state(*, running: bool, homed_here: bool, vm_exists: bool | None) -> str:
    """What a directory is: :data:`RUNNING` when a VMI of it runs here, :data:`STOPPED` when its VM's
    home is here, else by whether its VM exists (``None``: not known yet)."""
    if running:
        return RUNNING
    if homed_here:
        return STOPPED
    if vm_exists is None:
        return UNKNOWN
    return UNHOMED if vm_exists else ORPHAN


@dataclass(frozen=True)
class DirFacts:
    """What is known about ``<hostDisks.root>/<namespace>/<vm>``.

    - ``images``: image files on disk (file name -> :class:`ImageFile`).
    - ``other_allocated``: bytes occupied by its other files (records, the home marker).
    - ``plans``: planned sizes (:func:`planned_images`) of every trusted plan that puts images here:
      the template plan of a VM whose home is this node, and the plan of a VMI whose launcher ran
      prepare here.
    - ``hold_gib``: the request of the live launcher Pod that made or uses it (0 when none).
    - ``state``: one of :data:`STATES`.
    """

    namespace: str
    vm: str
    images: Mapping[str, ImageFile] = field(default_factory=dict)
    other_allocated: int = 0
    plans: tuple[Mapping[str, int], ...] = ()
    hold_gib: int = 0
    state: str = UNKNOWN


@dataclass(frozen=True)
class DirAccount:
    namespace: str
    vm: str
    state: str
    planned_bytes: int  # the footprint
    allocated_bytes: int
    hold_bytes: int
    images: int  # image files on disk
    missing: int  # planned images not on disk (yet)
    larger: tuple[str, ...] = ()  # files larger than every plan that names them

    @property
    def counted_bytes(self) -> int:
        """What the directory takes from the budget: its footprint, or its Pod's hold if larger."""
        return max(self.planned_bytes, self.hold_bytes)

    @property
    def key(self) -> str:
        return dir_key(self.namespace, self.vm)


def account_dir(facts: DirFacts) -> DirAccount:
    on_disk = {name: img.virtual_bytes for name, img in facts.images.items()}
    planned: dict[str, int] = {}
    for plan in facts.plans:
        for name, size in plan.items():
            planned[name] = max(planned.get(name, 0), size)
    larger = tuple(sorted(n for n, size in on_disk.items() if n in planned and size > planned[n]))
    return DirAccount(
        namespace=facts.namespace, vm=facts.vm, state=facts.state,
        planned_bytes=footprint(on_disk, facts.plans),
        allocated_bytes=sum(img.allocated_bytes for img in facts.images.values()) + facts.other_allocated,
        hold_bytes=facts.hold_gib * GIB, images=len(on_disk),
        missing=sum(1 for n in planned if n not in on_disk), larger=larger)


# ================================================================================================
# the node
# ================================================================================================
@dataclass(frozen=True)
class NodeAccount:
    """Every directory under ``hostDisks.root`` on one node, and what the node can still promise."""

    filesystem_bytes: int
    free_bytes: int
    budget_bytes: int
    reserve_bytes: int
    dirs: tuple[DirAccount, ...] = ()

    @property
    def planned_bytes(self) -> int:
        """Planned virtual bytes of every image (the footprints)."""
        return sum(d.planned_bytes for d in self.dirs)

    @property
    def allocated_bytes(self) -> int:
        return sum(d.allocated_bytes for d in self.dirs)

    @property
    def held_gib(self) -> int:
        """What the live launcher Pods counted here request (the scheduler subtracts it)."""
        return sum(d.hold_bytes for d in self.dirs) // GIB

    @property
    def counted_bytes(self) -> int:
        """What the directories take from the budget (each at ``max(footprint, hold)``)."""
        return sum(d.counted_bytes for d in self.dirs)

    @property
    def room_bytes(self) -> int:
        """Budget left (negative when the node holds more than its budget)."""
        return self.budget_bytes - self.counted_bytes

    @property
    def full(self) -> bool:
        """The free space is below the reserve: no new image may be made."""
        return self.free_bytes < self.reserve_bytes

    @property
    def room_gib(self) -> int:
        """Whole GiB a new launcher Pod may still request here."""
        return 0 if self.full else max(0, self.room_bytes) // GIB

    @property
    def advertised_gib(self) -> int:
        """``diskhooks.io/storage`` on the Node (capacity = allocatable): the GiB the live Pods hold
        plus the room, so the scheduler, which subtracts the live Pods' requests, sees the room."""
        return self.held_gib + self.room_gib

    @property
    def orphans(self) -> tuple[DirAccount, ...]:
        return tuple(d for d in self.dirs if d.state == ORPHAN)

    def by_state(self) -> dict[str, int]:
        """Planned bytes per :data:`STATES` entry (every state present, 0 when empty)."""
        out = dict.fromkeys(STATES, 0)
        for d in self.dirs:
            out[d.state] = out.get(d.state, 0) + d.planned_bytes
        return out


def account_node(dirs: Iterable[DirFacts], *, filesystem_bytes: int, free_bytes: int,
                 capacity: CapacityPolicy) -> NodeAccount:
    """Account every directory (sorted by namespace and VM) against ``capacity``."""
    accounts = tuple(sorted((account_dir(f) for f in dirs), key=lambda d: (d.namespace, d.vm)))
    return NodeAccount(filesystem_bytes=filesystem_bytes, free_bytes=free_bytes,
                       budget_bytes=capacity.budget(filesystem_bytes),
                       reserve_bytes=capacity.reserve(filesystem_bytes), dirs=accounts)


# ================================================================================================
# the summary the node agent leaves for prepare
# ================================================================================================
def dir_key(namespace: str, vm: str) -> str:
    """The summary's key of a directory: 32 hex digits of SHA-256 over ``<namespace>/<vm>`` (the
    file names no VM; prepare computes its own VM's key)."""
    return hashlib.sha256(f"{namespace}/{vm}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class NodeSummary:
    """``<hostDisks.root>/.diskhooks/capacity/summary.json``: what the node agent counted.

    - ``node``: the node it describes; ``written_at``: when (aware, UTC).
    - ``counted_bytes``: the sum of every directory's counted bytes.
    - ``dirs``: :func:`dir_key` -> that directory's counted bytes.
    """

    node: str
    written_at: datetime.datetime
    counted_bytes: int
    dirs: Mapping[str, int] = field(default_factory=dict)

    def others(self, namespace: str, vm: str) -> int:
        """What every directory but ``<namespace>/<vm>`` counts."""
        return max(0, self.counted_bytes - self.dirs.get(dir_key(namespace, vm), 0))


def summary_of(account: NodeAccount, *, node: str, now: datetime.datetime) -> NodeSummary:
    return NodeSummary(node=node, written_at=now, counted_bytes=account.counted_bytes,
                       dirs={d.key: d.counted_bytes for d in account.dirs})


def summary_json(summary: NodeSummary) -> bytes:
    doc = {"version": SUMMARY_VERSION, "node": summary.node,
           "writtenAt": format_time(summary.written_at), "countedBytes": summary.counted_bytes,
           "dirs": dict(sorted(summary.dirs.items()))}
    data = (json.dumps(doc, separators=(",", ":"), ensure_ascii=True) + "\n").encode()
    _check_summary(doc)
    return data


def parse_summary(data: bytes) -> NodeSummary:
    """Read the summary file's bytes; :class:`Malformed` naming ``summary.json.<member>``."""
    doc = load_json_object(data, field=K.CAPACITY_SUMMARY, what="the capacity summary",
                           max_bytes=MAX_SUMMARY_BYTES)
    return _check_summary(doc)


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BYTES:
        raise Malformed(where, f"must be a byte count (an integer from 0 to {MAX_BYTES})")
    return value


def _check_summary(doc: Mapping[str, Any]) -> NodeSummary:
    where = K.CAPACITY_SUMMARY
    unknown = sorted(set(doc) - {"version", "node", "writtenAt", "countedBytes", "dirs"})
    if unknown:
        raise Malformed(f"{where}.{unknown[0][:64]}", "unknown member in the capacity summary")
    if doc.get("version") != SUMMARY_VERSION or isinstance(doc.get("version"), bool):
        raise Malformed(f"{where}.version", f"must be {SUMMARY_VERSION}, not {str(doc.get('version'))[:32]!r}")
    node = doc.get("node")
    if not isinstance(node, str) or not DNS_SUBDOMAIN.match(node):
        raise Malformed(f"{where}.node", "must be a node name")
    written = doc.get("writtenAt")
    if not isinstance(written, str):
        raise Malformed(f"{where}.writtenAt", "must be a string (RFC 3339, UTC)")
    counted = _count(doc.get("countedBytes"), f"{where}.countedBytes")
    dirs = doc.get("dirs")
    if not isinstance(dirs, Mapping):
        raise Malformed(f"{where}.dirs", "must be an object")
    if len(dirs) > MAX_SUMMARY_DIRS:
        raise Malformed(f"{where}.dirs", f"has more than {MAX_SUMMARY_DIRS} entries")
    out: dict[str, int] = {}
    for key, value in dirs.items():
        if not isinstance(key, str) or not _DIR_KEY.match(key):
            raise Malformed(f"{where}.dirs", f"{str(key)[:40]!r} is not a directory key (32 hex digits)")
        out[key] = _count(value, f"{where}.dirs.{key}")
    if sum(out.values()) > counted:
        raise Malformed(f"{where}.countedBytes", "is less than the sum of its directories")
    return NodeSummary(node=node, written_at=parse_time(written, field=f"{where}.writtenAt"),
                       counted_bytes=counted, dirs=out)


# ================================================================================================
# prepare's guard at a start
# ================================================================================================
@dataclass(frozen=True)
class Change:
    """An image this start makes: ``before`` its virtual size now (None: created), ``after`` then."""

    file: str
    before: int | None
    after: int


@dataclass(frozen=True)
class StartCheck:
    """What prepare knows when a start would create or grow images.

    - ``node``: the node it runs on (None: unknown); ``root``: ``hostDisks.root`` as a node path
      (for the words); ``namespace``/``vm``: the plan's.
    - ``filesystem_bytes``/``free_bytes``: of the filesystem holding the VM directory (``free`` is
      what an unprivileged writer such as qemu may still use).
    - ``others_bytes``: what every other directory counts, from the agent's summary; None when
      there is no usable summary (then only this VM's own images are counted).
    - ``own_images``: virtual size now of every image file in the VM directory.
    - ``planned``: this plan's :func:`planned_images`; ``changes``: what the actions would make.
    """

    node: str | None
    root: str
    namespace: str
    vm: str
    filesystem_bytes: int
    free_bytes: int
    capacity: CapacityPolicy
    others_bytes: int | None
    own_images: Mapping[str, int]
    planned: Mapping[str, int]
    changes: tuple[Change, ...]


@dataclass(frozen=True)
class StartVerdict:
    refusal: str | None
    figures: Mapping[str, Any]


def gib_text(n: int) -> str:
    """Bytes for people: GiB with two decimals from 1 GiB up (``21474836480`` -> ``20.00 GiB``), MiB
    below (``3355443`` -> ``3.20 MiB``), bytes below 1 MiB."""
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    if abs(n) >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    return f"{n} bytes"


def _describe(change: Change) -> str:
    if change.before is None:
        return f"creating {change.file} ({gib_text(change.after)})"
    return f"growing {change.file} from {gib_text(change.before)} to {gib_text(change.after)}"


def check_start(c: StartCheck) -> StartVerdict:
    """Whether a start that makes ``c.changes`` fits the node (see the module docstring). A start
    that makes nothing is never refused; ``figures`` are what prepare reports either way."""
    after = dict(c.own_images)
    for change in c.changes:
        after[change.file] = max(after.get(change.file, 0), change.after)
    own_now = sum(c.own_images.values())
    own_after = footprint(after, [c.planned])
    others = c.others_bytes or 0
    total = others + own_after
    budget = c.capacity.budget(c.filesystem_bytes)
    reserve = c.capacity.reserve(c.filesystem_bytes)
    free_after = c.free_bytes - METADATA_ESTIMATE * len(c.changes)
    figures: dict[str, Any] = {
        "node": c.node, "filesystemBytes": c.filesystem_bytes, "freeBytes": c.free_bytes,
        "budgetBytes": budget, "reserveBytes": reserve, "overcommit": c.capacity.overcommit_text,
        "reserve": c.capacity.reserve_text, "otherVMsBytes": c.others_bytes,
        "thisVMBytes": own_after, "thisVMNewBytes": max(0, own_after - own_now), "plannedBytes": total,
        "changes": [{"file": ch.file, "from": ch.before, "to": ch.after} for ch in c.changes]}
    if not c.changes:
        return StartVerdict(None, {**figures, "result": "nothing-new"})
    problems = []
    if total > budget:
        problems.append(
            f"the planned virtual size of the images under {c.root} would be {gib_text(total)}, above "
            f"this node's budget of {gib_text(budget)} (overcommit {c.capacity.overcommit_text} x "
            f"filesystem {gib_text(c.filesystem_bytes)})")
    if free_after < reserve:
        problems.append(
            f"the filesystem of {c.root} has {gib_text(c.free_bytes)} free, and the reserve keeps "
            f"{gib_text(reserve)} ({c.capacity.reserve_text}) free")
    if not problems:
        return StartVerdict(None, {**figures, "result": "fits"})
    where = f"node {c.node}" if c.node else "this node"
    others_words = (f"the other VMs' images count {gib_text(others)}" if c.others_bytes is not None
                    else "the other VMs' images were not counted: the node agent's capacity summary is "
                    "missing")
    message = (
        f"{where} has no room for the images of VM {c.namespace}/{c.vm}: "
        f"{', '.join(_describe(ch) for ch in c.changes)} would not fit: {'; and '.join(problems)}. "
        f"This VM's share would be {gib_text(own_after)} ({gib_text(max(0, own_after - own_now))} new); "
        f"{others_words}. Nothing was created or changed, and the VM does not start until space is "
        "freed on the node (orphaned VM directories, images of VMs moved away) or the platform "
        "raises hostDisks.capacity")
    return StartVerdict(message, {**figures, "result": "refused"})


# ================================================================================================
# a cold migration's target: does the VM arriving fit the budget?
# ================================================================================================
def incoming_key(namespace: str, vm: str) -> str:
    """The summary's key of a cold migration's staging copy of ``<namespace>/<vm>`` (its directory is
    counted as ``vm`` ``.incoming/<vm>``, docs/CAPACITY.md)."""
    return dir_key(namespace, f".incoming/{vm}")


@dataclass(frozen=True)
class IncomingCheck:
    """What a migration target knows at preflight, before any byte moves.

    - ``node``, ``namespace``/``vm``: the VM arriving.
    - ``images``: its image files (name -> virtual size: the header's as the source read it, else
      the file's length); ``plans``: the sizes (:func:`planned_images`) of its trusted plans.
    - ``account``: this node's account now (every directory and migration copy here).
    """

    node: str
    namespace: str
    vm: str
    images: Mapping[str, int]
    plans: tuple[Mapping[str, int], ...]
    account: NodeAccount
    capacity: CapacityPolicy


@dataclass(frozen=True)
class IncomingVerdict:
    refusal: str | None
    needed_bytes: int  # the VM's footprint
    available_bytes: int  # what the budget still has room for (may be negative)
    others_bytes: int  # what everything else here counts


def check_incoming(c: IncomingCheck) -> IncomingVerdict:
    """Whether the VM's footprint (per image the larger of its virtual size and every plan's size,
    :func:`footprint`: the rule its directory is counted by once it lives here) fits in what the
    budget still has room for: the budget less what every other directory and copy counts. This
    VM's own entries (an earlier attempt's staging copy, a committed copy taken back) are left out:
    the footprint replaces them."""
    own = {dir_key(c.namespace, c.vm), incoming_key(c.namespace, c.vm)}
    others = sum(d.counted_bytes for d in c.account.dirs if d.key not in own)
    needed = footprint(c.images, c.plans)
    available = c.account.budget_bytes - others
    if needed <= available:
        return IncomingVerdict(None, needed, available, others)
    budget = c.account.budget_bytes
    message = (  # short: it travels in the migration status with the free-space words (600 characters)
        f"node {c.node} has no room in its capacity budget for VM {c.namespace}/{c.vm}: it needs {needed} "
        f"bytes ({gib_text(needed)}, per image the larger of virtual and planned size), and "
        f"{max(0, available)} ({gib_text(max(0, available))}) are left of {budget} (hostDisks.capacity "
        f"overcommit {c.capacity.overcommit_text} x {gib_text(c.account.filesystem_bytes)}; {others} counted "
        "already)")
    return IncomingVerdict(message, needed, available, others)
