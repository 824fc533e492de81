"""After a migration: the VM's first start on its new node, and the source node's kept copy.

The issue's rule: the source copy is kept (renamed aside) until ``--delete-source`` or until the VM
has started on the target once, per policy (``nodeAgent.migration.keepSource``:
``untilStarted``, the default, or ``forever``). Two halves, each in the agent of its node, joined
through the VM in the API server (never through memory: the VMI may be gone by the time the source
looks, and either agent may restart in between):

- **the target** (:class:`StartRecorder`): the agent's VMI watch (this node's VMIs) and VM watch
  (VMs homed here) offer every VMI with its VM, from their first list on (a VM that started while
  this agent was down is offered at its start) and again at every resync; a VMI ``Running`` on this
  node, controlled by that VM (same UID), created no earlier than the handover, of a VM whose
  migration status says ``Succeeded`` to this node without ``targetStarted`` yet, makes the agent
  read both again, and this node's home marker of the VM (``home.node.json``, read now); only when
  the marker names that VMI's UID (prepare ran for it here: :func:`nodeagent.home.marker_vouches`,
  the proof the home record asks for too) does it write ``targetStarted`` (the time it saw it) into
  the status, in one update conditional on the ``resourceVersion`` read. A VM that started and
  stopped while this agent was down is not seen: its copy stays until its next start (the safe
  side).
- **the source** (:func:`release_started`, from the source's housekeeping): every kept copy
  ``<root>/.diskhooks/migrate/kept/<ns>/<vm>.<id>/`` whose name parses (namespace, VM name,
  migration id) and whose VM says, for **that** migration id, ``Succeeded`` from this node with
  ``targetStarted``, is deleted under ``untilStarted``, with its record, and an Event
  ``MigrationSourceRemoved`` on the VM, and ``sourceKept`` dropped from the status. The path is made from the names of the directory entry and
  checked against the status's id; the status's ``sourceKept`` text is never used as a path. A copy
  whose VM is gone, is another VM now (UID), or whose status has moved on to a later migration is
  kept (nothing says it started; the operator deletes it).

A VMI's labels, owner reference and status are written by whoever creates it, so they prove
nothing alone: a VMI for which prepare did not run on this node (no launcher of it started here)
leaves the kept copy where it is, however ``Running`` it says it is.
"""

from __future__ import annotations

import datetime
import os
import stat
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from diskplan.errors import DiskhooksError
from diskplan.homemarker import parse_time
from diskplan.migration import (
    ANN_MIGRATION_STATUS,
    EVENT_SOURCE_REMOVED,
    KEEP_UNTIL_STARTED,
    SUCCEEDED,
    MigrationStatus,
    is_migration_id,
    status_json,
    status_of,
)
from diskplan.plan import DNS_LABEL, DNS_SUBDOMAIN
from nodeagent import home as H
from nodeagent.events import NORMAL
from nodeagent.kube import Conflict, Kube, describe_error
from nodeagent.migrate import vmdir
from nodeagent.scan import marker_or_why

if TYPE_CHECKING:
    from diskplan.policy import Policy
    from hooksidecar.logfmt import JsonLog

RUNNING = "Running"
CLOCK_SKEW = datetime.timedelta(seconds=60)  # the source node's clock wrote updatedAt, the API server's the VMI's


def _now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


FORGET_ATTEMPTS = 5  # conditional status updates tried when the VM keeps changing


def _status(vm: Mapping[str, Any]) -> MigrationStatus | None:
    return status_of(H.annotations_of(vm))


# ------------------------------------------------------------------------------------------------
# the target: the VM ran here after it moved
# ------------------------------------------------------------------------------------------------
def awaiting_start(vm: Mapping[str, Any] | None, node: str) -> MigrationStatus | None:
    """The migration status of ``vm`` when it moved to ``node`` and no start there is recorded yet."""
    if vm is None or H.home_of(vm) != node:
        return None
    status = _status(vm)
    if status is None or status.phase != SUCCEEDED or status.target != node or status.target_started:
        return None
    return status


def start_shown(vm: Mapping[str, Any] | None, vmi: Mapping[str, Any] | None, node: str) -> str | None:
    """Why ``vmi`` shows ``vm`` running on ``node`` since its migration there (None: it does not,
    or the start is already recorded). Pure: the objects as read."""
    status = awaiting_start(vm, node)
    if status is None or vmi is None or vm is None:
        return None
    if H.vmi_node(vmi) != node:
        return None
    phase = (vmi.get("status") or {}).get("phase") if isinstance(vmi.get("status"), Mapping) else None
    if phase != RUNNING:
        return None
    owner = H.owner_vm(vmi)
    if owner is None or owner != (H.meta_of(vm).get("name"), H.meta_of(vm).get("uid")):
        return None
    created = H.creation_time(vmi)
    if created is None:
        return None
    if status.updated_at:
        try:
            handed_over = parse_time(status.updated_at, field="updatedAt")
        except DiskhooksError:
            return None
        if created < handed_over - CLOCK_SKEW:  # a VMI older than the handover is not a start after it
            return None
    return f"VMI (uid {H.meta_of(vmi).get('uid') or '?'}) Running on node {node} since {created.isoformat()}"


class StartRecorder:
    """The target's half: ``offer`` (quick, from the watch threads) queues a VM whose VMI may show
    its first start here; a thread reads both again, and this node's home marker of the VM, and
    writes ``targetStarted``. ``root``: ``hostDisks.root`` as this process sees it, now."""

    def __init__(self, *, node: str, kube: Kube, log: JsonLog, stopping: threading.Event,
                 root: Callable[[], str]) -> None:
        self.node, self.kube, self.log, self.stopping, self.root = node, kube, log, stopping, root
        self._lock = threading.Lock()
        self._pending: set[tuple[str, str]] = set()
        self._unproven: dict[tuple[str, str], str] = {}  # what was last logged, once per VMI and reason
        self._wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="migrate-started", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def offer(self, vm: Mapping[str, Any] | None, vmi: Mapping[str, Any] | None) -> None:
        """From the watch caches' copies: queue the VM when they show a start to record."""
        if start_shown(vm, vmi, self.node) is None:
            return
        with self._lock:
            self._pending.add(H.object_key(vm or {}))
        self._wake.set()

    def _run(self) -> None:
        while not self.stopping.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            with self._lock:
                keys, self._pending = sorted(self._pending), set()
            for namespace, name in keys:
                if self.stopping.is_set():
                    return
                try:
                    self.record(namespace, name)
                except Exception as exc:  # noqa: BLE001 - the next VMI event or resync offers it again
                    self.log.emit("migrate.target-started-failed", level="warning", namespace=namespace,
                                  vm=name, error=describe_error(exc))

    def record(self, namespace: str, name: str) -> bool:
        """Read the VM and its VMI; write ``targetStarted`` when the VMI shows the start and this
        node's home marker of the VM names that VMI (prepare ran for it here). True when written."""
        for _ in range(3):
            vm = self.kube.get_vm(namespace, name)
            vmi = self.kube.get_vmi(namespace, name)
            why = start_shown(vm, vmi, self.node)
            if why is None or vm is None or vmi is None:
                return False
            vmi_uid = str(H.meta_of(vmi).get("uid") or "")
            refusal = H.marker_vouches(marker_or_why(self.root(), namespace, name), node=self.node,
                                       namespace=namespace, vm=name, vmi_uid=vmi_uid)
            if refusal is not None:
                self._not_proven(namespace, name, vmi_uid, *refusal)
                return False
            status = awaiting_start(vm, self.node)
            assert status is not None
            started = status.advanced(target_started=_now_text())
            patch = {"metadata": {"resourceVersion": H.meta_of(vm).get("resourceVersion"),
                                  "annotations": {ANN_MIGRATION_STATUS: status_json(started)}}}
            try:
                self.kube.patch_vm_metadata(namespace, name, patch)
            except Conflict:
                continue
            self.log.emit("migrate.target-started", level="info", namespace=namespace, vm=name, id=status.id,
                          source=status.source, seen=why)
            with self._lock:
                self._unproven.pop((namespace, name), None)
            return True
        return False

    def _not_proven(self, namespace: str, name: str, vmi_uid: str, code: str, why: str) -> None:
        """Log (once per VMI and reason: the next resync offers it again) a Running VMI that is not
        taken as the start: nothing recorded, the source's copy stays."""
        said = f"{vmi_uid} {code}"
        with self._lock:
            if self._unproven.get((namespace, name)) == said:
                return
            self._unproven[(namespace, name)] = said
        self.log.emit("migrate.target-start-unproven", level="warning", namespace=namespace, vm=name,
                      vmi=vmi_uid or None, code=code,
                      reason=f"its VMI says Running on this node, but {why}; targetStarted is not recorded "
                             "and the source's kept copy stays (a VMI's status and owner are written by "
                             "whoever creates it: only prepare's marker proves that it started here)")


# ------------------------------------------------------------------------------------------------
# the source: its kept copies
# ------------------------------------------------------------------------------------------------
def kept_root(root: str) -> str:
    return f"{vmdir.migrate_root(root)}/kept"


def keep_aside(root: str, directory: str, *, namespace: str, vm: str, vm_uid: str, target: str,
               ident: str) -> str:
    """Rename the VM directory aside as migration ``ident``'s kept copy, with its record beside it;
    returns the kept copy's path."""
    aside = vmdir.kept_dir(root, namespace, vm, ident)
    vmdir.rename_no_replace(directory, aside)
    vmdir.write_record(aside + ".json", {"namespace": namespace, "vm": vm, "vmUID": vm_uid, "target": target,
                                         "id": ident, "migratedAt": _now_text()})
    return aside


def kept_copies(root: str) -> list[tuple[str, str, str]]:
    """``(namespace, vm, id)`` of every kept copy or record under ``root`` whose names parse
    (others are left alone: not ours to judge), sorted."""
    out: set[tuple[str, str, str]] = set()
    base = kept_root(root)
    try:
        namespaces = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    for namespace in namespaces:
        if not DNS_LABEL.match(namespace):
            continue
        try:
            names = os.listdir(f"{base}/{namespace}")
        except (NotADirectoryError, FileNotFoundError):
            continue
        for entry in names:
            stem = entry.removesuffix(".json")
            vm, dot, ident = stem.rpartition(".")
            if dot and DNS_SUBDOMAIN.match(vm) and is_migration_id(ident):
                out.add((namespace, vm, ident))
    return sorted(out)


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _forget_kept(kube: Kube, vm: Mapping[str, Any], status: MigrationStatus, log: JsonLog) -> None:
    """The status no longer names the deleted copy (``sourceKept`` absent: deleted). Each update is
    conditional on the VM read; a VM changed since (KubeVirt updates a VM's status as it starts, and
    that changes its resourceVersion too) is read again and, while its status is still this
    migration's and still names the copy, updated again; a new migration's status is left as it is."""
    namespace, name = str(H.meta_of(vm).get("namespace") or ""), str(H.meta_of(vm).get("name") or "")
    current: Mapping[str, Any] | None = vm
    for _ in range(FORGET_ATTEMPTS):
        if current is None:
            return
        now = _status(current)
        if now is None or now.id != status.id or now.source_kept is None:
            return  # a new migration, or already forgotten
        patch = {"metadata": {"resourceVersion": H.meta_of(current).get("resourceVersion"),
                              "annotations": {ANN_MIGRATION_STATUS: status_json(now.advanced(source_kept=None))}}}
        try:
            kube.patch_vm_metadata(namespace, name, patch)
            return
        except Conflict:
            pass
        except Exception as exc:  # noqa: BLE001 - a report: the copy is gone either way (log, Event)
            log.emit("migrate.status-failed", level="info", namespace=namespace, vm=name, error=describe_error(exc))
            return
        try:
            current = kube.get_vm(namespace, name)
        except Exception as exc:  # noqa: BLE001 - as above
            log.emit("migrate.status-failed", level="info", namespace=namespace, vm=name, error=describe_error(exc))
            return
    log.emit("migrate.status-failed", level="info", namespace=namespace, vm=name,
             error=f"the VM kept changing: {FORGET_ATTEMPTS} conditional updates conflicted")


def release_started(*, root: str, node_root: str, node: str, kube: Kube, policy: Policy, log: JsonLog,
                    event: Callable[[Mapping[str, Any], str, str, str], None]) -> int:
    """The source's half (housekeeping): delete the kept copies whose VM has started on its new node,
    under ``keepSource: untilStarted``. ``root``: ``hostDisks.root`` as this process sees it;
    ``node_root``: as on the node (for messages). Returns how many were deleted."""
    if policy.node_agent.migration.keep_source != KEEP_UNTIL_STARTED:
        return 0
    count = 0
    vms: dict[tuple[str, str], dict[str, Any] | None] = {}
    for namespace, name, ident in kept_copies(root):
        aside = vmdir.kept_dir(root, namespace, name, ident)
        record_path = aside + ".json"
        if not _is_dir(aside):
            if not os.path.lexists(aside):  # the copy was deleted before its record (a crash)
                vmdir.remove_file(record_path)
            continue
        if (namespace, name) not in vms:
            vms[(namespace, name)] = kube.get_vm(namespace, name)
        vm = vms[(namespace, name)]
        if vm is None:
            continue
        record = vmdir.read_record(record_path)
        if record is not None and record.get("vmUID") not in (None, H.meta_of(vm).get("uid")):
            continue  # another VM of that name now
        status = _status(vm)
        if status is None or status.id != ident or status.phase != SUCCEEDED or status.source != node \
                or not status.target_started:
            continue
        freed = vmdir.allocated_bytes(aside)
        vmdir.remove_tree(aside)
        vmdir.remove_file(record_path)
        shown = vmdir.kept_dir(node_root, namespace, name, ident)
        log.emit("migrate.kept-removed", level="info", namespace=namespace, vm=name, id=ident, path=shown,
                 bytes=freed, started=status.target_started, target=status.target)
        _forget_kept(kube, vm, status, log)
        event(vm, EVENT_SOURCE_REMOVED, f"the copy kept on node {node} at {shown} ({freed} bytes on disk) is "
              f"deleted: the VM started on node {status.target} at {status.target_started} (policy "
              f"nodeAgent.migration.keepSource: {KEEP_UNTIL_STARTED})", NORMAL)
        count += 1
    return count
