"""Capacity on this node: count what the images under ``hostDisks.root`` hold, advertise the room on
the Node, and leave prepare the figures (docs/CAPACITY.md).

:class:`CapacityReporter` is a thread that, every ``interval`` seconds and soon after a change (the
agent pokes it on every VMI and VM event), makes one pass (:meth:`CapacityReporter.refresh`):

1. **scan** ``<root>/<namespace>/<vm>/`` (names that are Kubernetes names, no link followed): the
   virtual size and allocation of every image file (:func:`hooksidecar.prepare.imagefiles.scan_vm_dir`,
   headers re-read only for files that changed), the copies cold migrations hold under
   ``<root>/.diskhooks/migrate/`` (:func:`migration_copies`), and the filesystem's size and free space;
2. **know** what the watches say: the VMs whose home is this node (their template plan), and the
   VMIs running here. A VMI counts with its plan, and its launcher Pod's request as a hold, only
   when the home marker in its directory names this node and that VMI's UID: prepare, running for
   that VMI on this node, wrote it, so it cannot be claimed by a VMI someone made up. Directories
   that neither explains are looked up (``get`` of the VM, remembered for ``vm_check_ttl``
   seconds): a VM that no longer exists makes an **orphan**;
3. **account** (:func:`diskplan.capacity.account_node`);
4. **publish**: the metrics, ``diskhooks.io/storage`` on the Node when it changed (and re-checked
   every ``verify_interval``: a re-registered kubelet zeroes it), the summary file prepare reads
   (``<root>/.diskhooks/capacity/summary.json``), and for each newly seen orphan a log line and a
   Warning Event on the Node (``OrphanedVMDirectory``). Orphans are never deleted.

A pass that fails (the root cannot be read) is logged and tried again at the next one; the API
server's refusals (no such Node, RBAC) are logged once per distinct message.
"""

from __future__ import annotations

import datetime
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from diskplan import capacity as C
from diskplan import keys as K
from diskplan.migration import MAX_FILES
from diskplan.plan import DNS_LABEL
from hooksidecar.prepare.files import write_record
from hooksidecar.prepare.imagefiles import DirScan, HeaderCache, scan_vm_dir
from nodeagent import home as H
from nodeagent.events import MAX_NOTE_BYTES, REPORTING_CONTROLLER, WARNING, event_name
from nodeagent.kube import API_TIMEOUT, describe_error
from nodeagent.migrate.vmdir import MIGRATE_SUBDIR, read_record
from nodeagent.nodestatus import NodeStatus
from nodeagent.scan import MarkerError, MarkerPlace, read_marker, vm_dirs

if TYPE_CHECKING:
    from diskplan.plan import PlanKeys
    from diskplan.policy import Policy
    from hooksidecar.logfmt import JsonLog
    from nodeagent.kube import Kube
    from nodeagent.reconcile import Paths

DEFAULT_INTERVAL = 10.0
VERIFY_INTERVAL = 300.0  # re-read the Node's figure this often, even when nothing changed
VM_CHECK_TTL = 300.0  # how long "this VM exists" is believed for a directory no watch explains
MAX_LOOKUPS = 50  # VM lookups per pass (the rest stay "unknown" until the next)
SUMMARY_REWRITE = 60.0  # rewrite an unchanged summary this often (prepare sees how fresh it is)
DEBOUNCE = 0.5  # a poke waits this long for the next, so a burst of events makes one pass
FINAL_PHASES = ("Succeeded", "Failed")


class Items(Protocol):
    def items(self) -> list[dict[str, Any]]: ...


# ------------------------------------------------------------------------------------------------
# metrics and the Event (pure parts)
# ------------------------------------------------------------------------------------------------
class CapacityMetrics:
    """The capacity figures, on the agent's registry (every one labelled ``node``):

    - ``diskhooks_node_filesystem_bytes``, ``diskhooks_node_filesystem_free_bytes``: the filesystem
      holding ``hostDisks.root`` (free: what an unprivileged writer such as qemu may still use);
    - ``diskhooks_node_capacity_budget_bytes`` (``overcommit`` x size) and
      ``diskhooks_node_capacity_reserve_bytes``;
    - ``diskhooks_node_planned_bytes{state}``: planned virtual bytes of the images, per directory
      state (``running``, ``stopped``, ``unhomed``, ``orphan``, ``unknown``);
    - ``diskhooks_node_allocated_bytes``: what those directories occupy on the filesystem;
    - ``diskhooks_node_held_gib``: the requests of the live launcher Pods counted here;
    - ``diskhooks_node_counted_bytes``: what the directories take from the budget;
    - ``diskhooks_node_advertised_gib``: ``diskhooks.io/storage`` as computed (and advertised);
    - ``diskhooks_node_orphan_directories`` and ``diskhooks_node_orphan_bytes{namespace,vm}``;
    - ``diskhooks_node_capacity_passes_total{outcome}`` (``ok``, ``failed``) and
      ``diskhooks_node_advertisements_total{outcome}`` (``patched``, ``unchanged``, ``failed``).
    """

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self.node = node
        r = registry

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(name, doc, ["node", *labels], registry=r)

        self.fs = gauge("diskhooks_node_filesystem_bytes", "Size of the filesystem holding hostDisks.root")
        self.free = gauge("diskhooks_node_filesystem_free_bytes", "Free bytes of that filesystem")
        self.budget = gauge("diskhooks_node_capacity_budget_bytes", "Planned virtual bytes the node may "
                            "hold: overcommit x filesystem size")
        self.reserve = gauge("diskhooks_node_capacity_reserve_bytes", "Free bytes kept (hostDisks."
                             "capacity.reserve)")
        self.planned = gauge("diskhooks_node_planned_bytes", "Planned virtual bytes of the images under "
                             "hostDisks.root, by directory state", "state")
        self.allocated = gauge("diskhooks_node_allocated_bytes", "Bytes the VM directories occupy")
        self.held = gauge("diskhooks_node_held_gib", "diskhooks.io/storage requested by the live launcher "
                          "Pods counted on this node")
        self.counted = gauge("diskhooks_node_counted_bytes", "Bytes the VM directories take from the budget")
        self.advertised = gauge("diskhooks_node_advertised_gib", "diskhooks.io/storage advertised on the Node")
        self.orphans = gauge("diskhooks_node_orphan_directories", "VM directories whose VM no longer exists")
        self.orphan_bytes = gauge("diskhooks_node_orphan_bytes", "Planned virtual bytes of one orphaned VM "
                                  "directory", "namespace", "vm")
        self.passes = Counter("diskhooks_node_capacity_passes", "Capacity passes, by outcome",
                              ["node", "outcome"], registry=r)
        self.advertisements = Counter("diskhooks_node_advertisements", "Node status checks, by outcome",
                                      ["node", "outcome"], registry=r)
        self._orphan_labels: set[tuple[str, str]] = set()

    def publish(self, account: C.NodeAccount) -> None:
        n = self.node
        self.fs.labels(n).set(account.filesystem_bytes)
        self.free.labels(n).set(account.free_bytes)
        self.budget.labels(n).set(account.budget_bytes)
        self.reserve.labels(n).set(account.reserve_bytes)
        for state, planned in account.by_state().items():
            self.planned.labels(n, state).set(planned)
        self.allocated.labels(n).set(account.allocated_bytes)
        self.held.labels(n).set(account.held_gib)
        self.counted.labels(n).set(account.counted_bytes)
        self.advertised.labels(n).set(account.advertised_gib)
        orphans = {(d.namespace, d.vm): d.planned_bytes for d in account.orphans}
        self.orphans.labels(n).set(len(orphans))
        for gone in self._orphan_labels - set(orphans):
            self.orphan_bytes.remove(n, *gone)
        for (namespace, vm), planned in orphans.items():
            self.orphan_bytes.labels(n, namespace, vm).set(planned)
        self._orphan_labels = set(orphans)


def orphan_message(d: C.DirAccount, root: str) -> str:
    return (f"{root}/{d.namespace}/{d.vm} holds {d.images} image file(s) of VM {d.namespace}/{d.vm}, which "
            f"no longer exists: {C.gib_text(d.planned_bytes)} planned (virtual), "
            f"{C.gib_text(d.allocated_bytes)} allocated, counted against this node's disk capacity. "
            "diskhooks never deletes images: once their data is not needed, remove the directory on the "
            "node (a VM re-created under this name before that finds them and uses them)")


def node_event_body(node: str, *, reason: str, message: str, event_type: str, now: datetime.datetime,
                    suffix: str) -> dict[str, Any]:
    """An events.k8s.io/v1 Event about the Node (in ``default``, with the node's name as its uid, as
    the kubelet's own node Events: what ``kubectl describe node`` lists)."""
    note = message.encode("utf-8")
    if len(note) > MAX_NOTE_BYTES:
        message = note[:MAX_NOTE_BYTES - 3].decode("utf-8", "ignore") + "..."
    return {
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": event_name(node, suffix), "namespace": "default"},
        "eventTime": now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "reportingController": REPORTING_CONTROLLER, "reportingInstance": node[:128],
        "action": "CountCapacity", "reason": reason, "note": message, "type": event_type,
        "regarding": {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node},
    }


# ------------------------------------------------------------------------------------------------
# the reporter
# ------------------------------------------------------------------------------------------------
class CapacityReporter:
    def __init__(self, *, node: str, kube: Kube, policy: Callable[[], Policy],
                 plan_keys: Callable[[], PlanKeys], paths: Paths, vmis: Items, vms: Items,
                 registry: CollectorRegistry, log: JsonLog, interval: float = DEFAULT_INTERVAL,
                 verify_interval: float = VERIFY_INTERVAL, vm_check_ttl: float = VM_CHECK_TTL) -> None:
        self.node = node
        self.kube = kube
        self.policy = policy
        self.plan_keys = plan_keys
        self.paths = paths
        self.vmis = vmis
        self.vms = vms
        self.log = log
        self.metrics = CapacityMetrics(registry, node)
        self.status = NodeStatus(kube.api_client, node)
        self.interval = interval
        self.verify_interval = verify_interval
        self.vm_check_ttl = vm_check_ttl
        self.last: C.NodeAccount | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capacity", daemon=True)
        self._headers = HeaderCache()
        self._exists: dict[tuple[str, str], tuple[bool, float]] = {}
        self._advertised: int | None = None
        self._verified = 0.0
        self._summary: tuple[bytes, float] | None = None  # what was last written, and when
        self._reported_orphans: set[tuple[str, str]] = set()
        self._said: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pass_lock = threading.Lock()  # one pass at a time: the thread's and a preflight's

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def poke(self) -> None:
        """Something changed: make a pass soon."""
        self._wake.set()

    def vm_gone(self, namespace: str, name: str) -> None:
        """The VM ``namespace/name`` was deleted: forget that it existed, and make a pass soon."""
        with self._lock:
            self._exists.pop((namespace, name), None)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - never let the thread die: the next pass tries again
                self._say("pass", describe_error(exc), "capacity.failed", level="warning",
                          error=describe_error(exc))
            self._wake.wait(self.interval)
            if self._stop.is_set():
                break
            self._stop.wait(DEBOUNCE)
            self._wake.clear()

    # --- one pass ------------------------------------------------------------------------------
    def refresh(self) -> C.NodeAccount | None:
        """Count, account, publish; the account (None when the pass failed, which is logged). Also
        called by a migration target's preflight (from its own thread) for a fresh count."""
        with self._pass_lock:
            return self._refresh()

    def _refresh(self) -> C.NodeAccount | None:
        try:
            policy = self.policy()
            root = self.paths.on_host(policy.host_disks.root)
            # the migration copies first: a commit renaming a staging copy to its VM directory
            # between the two listings is then counted twice (conservative), never not at all
            copies = migration_copies(root, self._headers)
            scans = scan_root(root, self._headers)
            self._headers.next_pass()
            fs = os.statvfs(_existing(root))
            facts = self._facts(root, scans) + copies
            account = C.account_node(facts, filesystem_bytes=fs.f_blocks * fs.f_frsize,
                                     free_bytes=fs.f_bavail * fs.f_frsize,
                                     capacity=policy.host_disks.capacity)
        except Exception as exc:  # noqa: BLE001 - a failed pass is reported and tried again
            self.metrics.passes.labels(self.node, "failed").inc()
            self._say("pass", f"{type(exc).__name__}: {exc}", "capacity.failed", level="warning",
                      error=describe_error(exc))
            return None
        self.metrics.passes.labels(self.node, "ok").inc()
        if self._said.pop("pass", None) is not None:
            self.log.emit("capacity.recovered", level="info", node=self.node)
        self.last = account
        self.metrics.publish(account)
        self._write_summary(self.paths.on_host(K.capacity_dir(policy.host_disks.root)), account)
        self._advertise(account)
        self._report_orphans(account, policy.host_disks.root)
        return account

    def _facts(self, root: str, scans: Mapping[tuple[str, str], DirScan]) -> list[C.DirFacts]:
        keys = self.plan_keys()
        homed: dict[tuple[str, str], dict[str, Any]] = {}
        for item in self.vms.items():
            if H.home_of(item) == self.node:
                homed[H.object_key(item)] = item
        live: dict[tuple[str, str], dict[str, Any]] = {}
        for item in self.vmis.items():
            phase = (item.get("status") or {}).get("phase")
            if H.vmi_node(item) == self.node and phase not in FINAL_PHASES:
                live[H.object_key(item)] = item
        out = []
        lookups = 0
        for key in sorted(set(scans) | set(homed) | set(live)):
            namespace, name = key
            plans: list[Mapping[str, int]] = []
            hold = 0
            vm = homed.get(key)
            if vm is not None:
                plan = H.verified_plan(H.template_plan_text(vm), keys, namespace=namespace, vm=name,
                                       where=f"VM {namespace}/{name} spec.template {K.ANN_PLAN}")
                if not isinstance(plan, H.Decision):
                    plans.append(C.planned_images(plan))
            vmi = live.get(key)
            if vmi is not None and key in scans and self._ran_here(root, key, vmi):
                plan = H.verified_plan(H.vmi_plan_text(vmi), keys, namespace=namespace, vm=name,
                                       where=f"VMI {namespace}/{name} {K.ANN_PLAN}")
                if not isinstance(plan, H.Decision):
                    plans.append(C.planned_images(plan))
                    hold = C.launcher_request_gib(plan)
            if key not in scans and not plans:
                continue  # a VM at home here with nothing planned, a VMI that made nothing here
            exists: bool | None = True
            if vmi is None and vm is None:
                exists, looked = self._vm_exists(namespace, name, lookups < MAX_LOOKUPS)
                lookups += looked
            scan = scans.get(key, DirScan())
            out.append(C.DirFacts(namespace, name, images=scan.images, other_allocated=scan.other_allocated,
                                  plans=tuple(plans), hold_gib=hold,
                                  state=C.dir_state(running=vmi is not None, homed_here=vm is not None,
                                                    vm_exists=exists)))
        return out

    def _ran_here(self, root: str, key: tuple[str, str], vmi: Mapping[str, Any]) -> bool:
        """Whether prepare ran for ``vmi`` on this node: its directory's marker says so."""
        uid = ((vmi.get("metadata") or {}).get("uid"))
        try:
            marker = read_marker(root, MarkerPlace(*key))
        except MarkerError:
            return False
        return marker.node == self.node and bool(uid) and marker.vmi_uid == uid

    def _vm_exists(self, namespace: str, name: str, may_look: bool) -> tuple[bool | None, int]:
        """(whether the VM exists, None when unknown; 1 when the API server was asked)."""
        now = time.monotonic()
        with self._lock:
            known = self._exists.get((namespace, name))
        if known is not None and now - known[1] < self.vm_check_ttl:
            return known[0], 0
        if not may_look:
            return (known[0] if known else None), 0
        try:
            exists = self.kube.get_vm(namespace, name) is not None
        except Exception as exc:  # noqa: BLE001 - unknown for now; asked again next pass
            self._say("vm-lookup", describe_error(exc), "capacity.lookup-failed", level="warning",
                      namespace=namespace, vm=name, error=describe_error(exc))
            return (known[0] if known else None), 1
        with self._lock:
            self._exists[(namespace, name)] = (exists, now)
        return exists, 1

    # --- publishing ----------------------------------------------------------------------------
    def _write_summary(self, directory: str, account: C.NodeAccount) -> None:
        now = datetime.datetime.now(datetime.UTC)
        summary = C.summary_of(account, node=self.node, now=now)
        body = C.summary_json(C.NodeSummary(self.node, datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC),
                                            summary.counted_bytes, summary.dirs))
        if self._summary is not None and self._summary[0] == body \
                and time.monotonic() - self._summary[1] < SUMMARY_REWRITE:
            return
        try:
            ensure_dir(directory)
            write_record(f"{directory}/{K.CAPACITY_SUMMARY}", C.summary_json(summary), owner=None)
        except OSError as exc:
            self._say("summary", str(exc), "capacity.summary-failed", level="warning", directory=directory,
                      error=f"{type(exc).__name__}: {exc}")
            return
        self._summary = (body, time.monotonic())
        self._say("summary", "ok", "capacity.summary-written", directory=directory)

    def _advertise(self, account: C.NodeAccount) -> None:
        gib = account.advertised_gib
        now = time.monotonic()
        if gib == self._advertised and now - self._verified < self.verify_interval:
            return
        try:
            current = self.status.read()
            if current != (str(gib), str(gib)):
                current = self.status.advertise(gib)
                self.metrics.advertisements.labels(self.node, "patched").inc()
                self.log.emit("capacity.advertised", level="info", node=self.node, gib=gib,
                              nodeSays=list(current), **_figures(account))
            else:
                self.metrics.advertisements.labels(self.node, "unchanged").inc()
        except Exception as exc:  # noqa: BLE001 - API refusals, no connection: logged, tried again next pass
            self.metrics.advertisements.labels(self.node, "failed").inc()
            self._advertised = None
            self._say("advertise", describe_error(exc), "capacity.advertise-failed", level="warning",
                      node=self.node, gib=gib, error=describe_error(exc))
            return
        self._said.pop("advertise", None)
        self._advertised = gib
        self._verified = now

    def _report_orphans(self, account: C.NodeAccount, root: str) -> None:
        for d in account.orphans:
            key = (d.namespace, d.vm)
            if key in self._reported_orphans:
                continue
            self._reported_orphans.add(key)
            message = orphan_message(d, root)
            self.log.emit("capacity.orphan", level="warning", namespace=d.namespace, vm=d.vm,
                          plannedBytes=d.planned_bytes, allocatedBytes=d.allocated_bytes, images=d.images,
                          reason=message)
            body = node_event_body(self.node, reason=K.EVENT_ORPHANED_VM_DIRECTORY, message=message,
                                   event_type=WARNING, now=datetime.datetime.now(datetime.UTC),
                                   suffix=f"{time.time_ns():x}{secrets.token_hex(2)}")
            try:
                self.kube.events.create_namespaced_event("default", body, _request_timeout=API_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - an Event is a report; its loss is logged
                self.log.emit("event.failed", level="warning", reason=K.EVENT_ORPHANED_VM_DIRECTORY,
                              namespace=d.namespace, vm=d.vm, error=describe_error(exc))
        self._reported_orphans &= {(d.namespace, d.vm) for d in account.orphans}
        with self._lock:  # forget lookups of directories that are gone
            seen = {(d.namespace, d.vm) for d in account.dirs}
            self._exists = {k: v for k, v in self._exists.items() if k in seen}

    def _say(self, topic: str, outcome: str, event: str, /, **fields: Any) -> None:
        """Log ``event`` when ``topic``'s outcome changed since its last line."""
        if self._said.get(topic) == outcome:
            return
        self._said[topic] = outcome
        fields.setdefault("level", "info")
        self.log.emit(event, **fields)


def _figures(account: C.NodeAccount) -> dict[str, Any]:
    return {"filesystemBytes": account.filesystem_bytes, "freeBytes": account.free_bytes,
            "budgetBytes": account.budget_bytes, "plannedBytes": account.planned_bytes,
            "countedBytes": account.counted_bytes, "heldGiB": account.held_gib,
            "orphans": len(account.orphans)}


# ------------------------------------------------------------------------------------------------
# the node's directories (I/O)
# ------------------------------------------------------------------------------------------------
def scan_root(root: str, cache: HeaderCache | None = None) -> dict[tuple[str, str], DirScan]:
    """Every ``<namespace>/<vm>`` directory under ``root`` (Kubernetes names only; ``.diskhooks``
    and anything else is passed over; no link followed) and what it holds. A missing root holds
    nothing; a directory that cannot be read is passed over."""
    out: dict[tuple[str, str], DirScan] = {}
    for ns, vm, ns_fd in vm_dirs(root):
        try:
            out[(ns, vm)] = scan_vm_dir(dir_fd=ns_fd, name=vm, cache=cache)
        except OSError:
            continue
    return out


def migration_copies(root: str, cache: HeaderCache | None = None) -> list[C.DirFacts]:
    """The copies cold migrations hold under ``<root>/.diskhooks/migrate/`` (docs/MIGRATION.md): a VM
    arriving here (the staging copy ``incoming/<ns>/<vm>/``) and a VM that moved away (the kept copy
    ``kept/<ns>/<vm>.<id>/``). Their images take the filesystem's space like any VM directory's, so
    each counts as one: ``unhomed`` (its VM's home is another node), its ``vm`` ``.incoming/<vm>`` or
    ``.kept/<vm>.<id>``, a name no VM directory has (the summary's keys stay distinct). A staging
    copy counts, per image, at least what the target's preflight accepted it for (its record's
    ``images``: the VM's footprint per file), so the whole VM counts from the preflight on, not only
    what has arrived. No link is followed; a directory that cannot be read is passed over."""
    out = []
    for kind in ("incoming", "kept"):
        place = f"{root.rstrip('/')}/{MIGRATE_SUBDIR}/{kind}"
        try:
            namespaces = sorted(os.listdir(place))
        except OSError:
            continue
        for ns in namespaces:
            if not DNS_LABEL.match(ns):
                continue
            try:
                ns_fd = os.open(f"{place}/{ns}", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                with os.scandir(ns_fd) as entries:
                    names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
                for name in names:
                    try:
                        scan = scan_vm_dir(dir_fd=ns_fd, name=name, cache=cache)
                    except OSError:
                        continue
                    promised = _promised(f"{place}/{ns}/{name}.json") if kind == "incoming" else None
                    out.append(C.DirFacts(ns, f".{kind}/{name}", images=scan.images,
                                          other_allocated=scan.other_allocated,
                                          plans=(promised,) if promised else (), state=C.UNHOMED))
            finally:
                os.close(ns_fd)
    return out


def _promised(record_path: str) -> dict[str, int] | None:
    """The footprint per image file a migration target's preflight accepted (``images`` of the
    incoming record, written by this agent), or None when the record holds none that reads."""
    record = read_record(record_path)
    images = record.get("images") if record is not None else None
    if not isinstance(images, dict) or len(images) > MAX_FILES:
        return None
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= C.MAX_BYTES
               for k, v in images.items()):
        return None
    return images


def _existing(path: str) -> str:
    """``path``, or its nearest existing parent (the filesystem a missing root will be made on)."""
    while path not in ("", "/") and not os.path.isdir(path):
        path = os.path.dirname(path)
    return path or "/"


def ensure_dir(path: str) -> None:
    """Make ``path`` (and parents, mode 0755) unless it is a directory; refuse a link or a file."""
    os.makedirs(path, mode=0o755, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
