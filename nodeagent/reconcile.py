"""Reconcile one key: a VMI on this node, a VM whose home is this node, or a home marker found here.

Keys are ``(kind, namespace, name)``: ``vmi`` (the VMI watch's object), ``vm`` (the VM watch's
object: VMs labelled ``diskhooks.io/node=<this node>``), ``marker`` (``<root>/<ns>/<vm>/home.node.json``).
Each reconcile reads what it needs fresh (the watch cache, the VM from the API server, the marker
from disk), asks a pure core what to do (:mod:`nodeagent.home`, :mod:`nodeagent.expand`'s
``grow_targets``), does that small step, and reports (metrics, one log line, an Event on the VM).
It is idempotent: running it twice, or after a crash, changes nothing more. A step that may work
later (the VM changed since it was read, the API server did not answer, a disk did not grow)
raises :class:`Retry`; the worker queues the key again with a backoff.

- ``vmi``: home from the VMI and this node's home marker of its VM, read from disk now
  (:func:`nodeagent.home.decide_from_vmi`: the marker must name this node and that VMI's UID);
  ``record`` merge-patches the VM's annotation and label with the ``resourceVersion`` read (a
  changed VM is a conflict: read again) under the home's own field manager, then Event
  ``HomeNodeRecorded``, named for the VM's UID and the node (:mod:`nodeagent.homeevent`: sent
  twice, it is refused as existing, and counts as sent). ``conflict`` gives one
  Warning Event per VMI. Without the marker nothing is done and not retried: the VMI's next change
  (it goes Running after prepare) or the next resync looks again, and the marker scan finds it too.
- ``marker``: the same from a marker (:func:`nodeagent.home.decide_from_marker`), no conflict Event
  (images left on a former home are normal after a move).
- ``vm``: sends the ``HomeNodeRecorded`` Event of a VM whose home the agent recorded here in the
  last minutes (``nodeagent.homeevent.recorded_event_due``) unless this process sent it (the agent
  may have died between the home patch and the Event); counts the VM's planned images, and, with
  ``hostDisks.onlineExpand``, when the VM's
  verified template plan has disks and its VMI runs here with a launcher Pod on this node, grows
  the running disks to the plan (``nodeagent.expand.expand_online``): Event ``DiskExpanded`` per
  grown disk, ``DiskExpandFailed`` (Warning) per failed one (once per plan and reason), retried
  with backoff. A plan already fully applied to this VMI is not looked at again.
"""

from __future__ import annotations

import datetime
import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from diskplan import keys as K
from diskplan.homemarker import HomeMarker
from diskplan.plan import Plan, PlanKeys
from nodeagent import home as H
from nodeagent.events import EVENT_HOME_NODE_CONFLICT, NORMAL, WARNING
from nodeagent.homeevent import (
    HOME_FIELD_MANAGER,
    RECORDED_EVENT_WINDOW,
    late_message,
    recorded_event_due,
    recorded_event_suffix,
)
from nodeagent.kube import Conflict, Kube, describe_error
from nodeagent.objects import active_pods_on
from nodeagent.scan import MarkerError, MarkerPlace, host_path, marker_or_why, read_marker

if TYPE_CHECKING:
    from diskplan.policy import Policy
    from hooksidecar.logfmt import JsonLog
    from nodeagent.metrics import AgentMetrics

VMI, VM, MARKER = "vmi", "vm", "marker"
Key = tuple[str, str, str]


class Retry(Exception):
    """Try this key again later (the message says why)."""


class Cache(Protocol):
    def get(self, namespace: str, name: str) -> dict[str, Any] | None: ...


class Expander(Protocol):
    """What :mod:`nodeagent.expand` offers (its module, or a stand-in)."""

    def grow_targets(self, plan: Plan) -> dict[str, int]: ...

    def launcher_socket(self, kubelet_pods_dir: str, pod_uid: str) -> str | None: ...

    def expand_online(self, plan: Plan, *, socket_path: str, domain_name: str) -> list[Any]: ...


def load_expander() -> Expander:
    """:mod:`nodeagent.expand` (libvirt is imported only when a disk is really grown)."""
    from nodeagent import expand

    module: Expander = expand  # a module satisfying the protocol
    return module


@dataclass(frozen=True)
class Paths:
    """Node paths as this process sees them (``--host-prefix`` applied by :func:`host_path`)."""

    host_prefix: str
    kubelet_pods_dir: str  # as on the node, e.g. /var/lib/kubelet/pods

    def on_host(self, path: str) -> str:
        return host_path(self.host_prefix, path)


def _plan_digest(text: str | None) -> str:
    return hashlib.sha256((text or "").encode()).hexdigest()[:16]


class Reconciler:
    def __init__(self, *, node: str, kube: Kube, vmis: Cache, vms: Cache,
                 policy: Callable[[], Policy], plan_keys: Callable[[], PlanKeys], paths: Paths,
                 metrics: AgentMetrics, log: JsonLog,
                 expander: Callable[[], Expander] = load_expander) -> None:
        self.node = node
        self.kube = kube
        self.vmis = vmis
        self.vms = vms
        self.policy = policy
        self.plan_keys = plan_keys
        self.paths = paths
        self.metrics = metrics
        self.log = log
        self._expander_factory = expander
        self._expander: Expander | None = None
        self._lock = threading.Lock()
        self._said: dict[Key, str] = {}  # last decision logged per key (log on change only)
        self._conflicts_reported: set[str] = set()  # VMI uids with a conflict Event
        self._images: dict[tuple[str, str], int] = {}
        self._expanded: dict[tuple[str, str], tuple[str, str, str]] = {}  # VM -> (vm uid, vmi uid, plan)
        self._failures_reported: set[tuple[str, str, str, str]] = set()
        # HomeNodeRecorded Events this process sent or is sending: VM -> (its uid, monotonic time)
        self._home_events: dict[tuple[str, str], tuple[str, float]] = {}

    # --- entry point ---------------------------------------------------------------------------
    def reconcile(self, key: Key) -> None:
        kind, namespace, name = key
        if kind == VMI:
            self._reconcile_vmi(namespace, name)
        elif kind == VM:
            self._reconcile_vm(namespace, name)
        elif kind == MARKER:
            self._reconcile_marker(namespace, name)
        else:
            raise ValueError(f"unknown key kind {kind!r}")

    def images(self) -> int:
        """Planned images of the VMs whose home is this node, as last reconciled."""
        with self._lock:
            return sum(self._images.values())

    def forget(self, key: Key) -> None:
        """The object of ``key`` is gone: drop what is remembered about it."""
        kind, namespace, name = key
        with self._lock:
            self._said.pop(key, None)
            if kind == VM:
                self._images.pop((namespace, name), None)
                self._expanded.pop((namespace, name), None)
                self._failures_reported = {f for f in self._failures_reported
                                           if (f[0], f[1]) != (namespace, name)}

    # --- home ----------------------------------------------------------------------------------
    def _reconcile_vmi(self, namespace: str, name: str) -> None:
        vmi = self.vmis.get(namespace, name)
        if vmi is None:
            self.forget((VMI, namespace, name))
            return
        owner = H.owner_vm(vmi)
        vm = self.kube.get_vm(namespace, owner[0]) if owner else None
        marker = self._marker(namespace, owner[0]) if owner and vm is not None else "not looked for"
        decision = H.decide_from_vmi(vmi, vm, node=self.node, keys=self.plan_keys(), marker=marker)
        vmi_uid = str((vmi.get("metadata") or {}).get("uid") or "")
        self._act(decision, source=VMI, key=(VMI, namespace, name), vmi_uid=vmi_uid)

    def _marker(self, namespace: str, vm_name: str) -> HomeMarker | str:
        """This node's home marker of ``namespace/vm_name``, or why there is none."""
        return marker_or_why(self.paths.on_host(self.policy().host_disks.root), namespace, vm_name)

    def _reconcile_marker(self, namespace: str, vm_name: str) -> None:
        root = self.paths.on_host(self.policy().host_disks.root)
        key = (MARKER, namespace, vm_name)
        try:
            marker = read_marker(root, MarkerPlace(namespace, vm_name))
        except MarkerError as exc:
            self.metrics.decision(MARKER, "unreadable")
            self._say(key, "unreadable", "home.skipped", level="warning", source=MARKER,
                      namespace=namespace, vm=vm_name, code="unreadable", reason=str(exc))
            return
        vm = self.kube.get_vm(namespace, vm_name)
        decision = H.decide_from_marker(marker, vm, node=self.node, namespace=namespace,
                                        vm_name=vm_name, keys=self.plan_keys())
        self._act(decision, source=MARKER, key=key, vmi_uid=marker.vmi_uid)

    def _act(self, d: H.Decision, *, source: str, key: Key, vmi_uid: str) -> None:
        self.metrics.decision(source, d.code)
        fields: dict[str, Any] = {"source": source, "namespace": d.namespace, "vm": d.vm, "node": self.node,
                  "code": d.code, "reason": d.reason}
        if d.action == H.RECORD:
            place = (d.namespace, d.vm)
            # the VM reconcile's catch-up leaves it to us; a claim another reconcile holds is its own
            mine = self._claim_home_event(place, d.vm_uid or "")
            sent = False
            try:
                patched = self.kube.patch_vm_metadata(d.namespace, d.vm,
                                                      H.home_patch(self.node, d.resource_version),
                                                      field_manager=HOME_FIELD_MANAGER)
                self.metrics.recorded(source)
                self._say(key, d.code, "home.recorded", force=True, vmiUID=vmi_uid, **fields)
                sent = self._home_event(patched, d.reason) is not None
            except Conflict as exc:
                raise Retry(str(exc)) from None
            finally:
                if not sent and mine:  # not patched, or the Event failed: the catch-up may send it
                    self._release_home_event(place)
        elif d.action == H.CONFLICT:
            self._say(key, d.code, "home.conflict", level="warning", home=d.home, vmiUID=vmi_uid,
                      **fields)
            if source == VMI and vmi_uid:
                with self._lock:
                    first = vmi_uid not in self._conflicts_reported
                    self._conflicts_reported.add(vmi_uid)
                if first:
                    vm = self.kube.get_vm(d.namespace, d.vm)
                    if vm is not None:
                        self._event(vm, EVENT_HOME_NODE_CONFLICT,
                                    f"VMI uid {vmi_uid} runs on node {self.node}: {d.reason}", WARNING)
        elif d.action == H.ALREADY:
            self._say(key, d.code, "home.already", **fields)
        else:
            level = "warning" if d.code == "plan-refused" else "info"
            self._say(key, d.code, "home.skipped", level=level, **fields)

    def _claim_home_event(self, place: tuple[str, str], vm_uid: str) -> bool:
        """Note that this process sends (or sent) the HomeNodeRecorded Event of VM ``place``
        (``vm_uid``); False when it did already. Claims older than twice the catch-up window are
        dropped: no Event is due for them any more."""
        now = time.monotonic()
        horizon = now - 2 * RECORDED_EVENT_WINDOW.total_seconds()
        with self._lock:
            claimed = self._home_events.get(place)
            if claimed is not None and claimed[0] == vm_uid:
                return False
            self._home_events = {p: c for p, c in self._home_events.items() if c[1] >= horizon}
            self._home_events[place] = (vm_uid, now)
            return True

    def _release_home_event(self, place: tuple[str, str]) -> None:
        with self._lock:
            self._home_events.pop(place, None)

    def _catch_up_home_event(self, vm: Mapping[str, Any], key: Key) -> None:
        """Send the HomeNodeRecorded Event of a VM whose home the agent recorded here in the last
        minutes, unless this process sent it: an agent killed between its home patch and the Event
        sends it at its start (an Event already there is refused as existing and counts as sent)."""
        at = recorded_event_due(vm, node=self.node, now=datetime.datetime.now(datetime.UTC))
        if at is None:
            return
        _, namespace, name = key
        uid = str(H.meta_of(vm).get("uid"))
        if not self._claim_home_event((namespace, name), uid):
            return
        created = self._home_event(vm, late_message(self.node, at))
        if created is None:
            self._release_home_event((namespace, name))
        elif created:
            self.log.emit("home.event-late", level="info", namespace=namespace, vm=name, node=self.node,
                          recordedAt=at.strftime("%Y-%m-%dT%H:%M:%SZ"))

    # --- VMs at home here: images and online expansion -----------------------------------------
    def _reconcile_vm(self, namespace: str, name: str) -> None:
        key = (VM, namespace, name)
        vm = self.vms.get(namespace, name)
        if vm is None or H.home_of(vm) != self.node:
            self.forget(key)
            return
        self._catch_up_home_event(vm, key)
        plan = H.verified_plan(H.template_plan_text(vm), self.plan_keys(), namespace=namespace, vm=name,
                               where=f"VM {namespace}/{name} spec.template {K.ANN_PLAN}")
        if isinstance(plan, H.Decision):
            with self._lock:
                self._images[(namespace, name)] = 0
            self._say(key, plan.code, "vm.skipped", level="warning" if plan.code == "plan-refused"
                      else "info", namespace=namespace, vm=name, code=plan.code, reason=plan.reason)
            return
        with self._lock:
            self._images[(namespace, name)] = len(plan.disks) + (plan.persist_root is not None)
        if not self.policy().host_disks.online_expand:
            self._say(key, "expand-off", "expand.skipped", namespace=namespace, vm=name,
                      reason="hostDisks.onlineExpand is false")
            return
        self._expand(vm, plan, key)

    def _expander_module(self) -> Expander:
        if self._expander is None:
            self._expander = self._expander_factory()
        return self._expander

    def _expand(self, vm: Mapping[str, Any], plan: Plan, key: Key) -> None:
        _, namespace, name = key
        expander = self._expander_module()
        if not expander.grow_targets(plan):
            return
        vmi = self.vmis.get(namespace, name)
        vm_uid = str((vm.get("metadata") or {}).get("uid") or "")
        if vmi is None or (H.owner_vm(vmi) or ("", ""))[1] != vm_uid or H.vmi_node(vmi) != self.node:
            return  # not running here: prepare grows the images at the next start
        pods = active_pods_on(vmi, self.node)
        if not pods:
            return  # no launcher Pod on this node (yet)
        vmi_uid = str((vmi.get("metadata") or {}).get("uid") or "")
        applied = (vm_uid, vmi_uid, _plan_digest(H.template_plan_text(vm)))
        with self._lock:
            if self._expanded.get((namespace, name)) == applied:
                return
        pods_dir = self.paths.on_host(self.paths.kubelet_pods_dir)
        socket_path = next((s for s in (expander.launcher_socket(pods_dir, uid) for uid in pods) if s),
                           None)
        if socket_path is None:
            self._say(key, "no-socket", "expand.waiting", namespace=namespace, vm=name, pods=pods,
                      reason="the launcher's libvirt socket is not there (yet)")
            raise Retry("the launcher's libvirt socket is not there (yet)")
        domain = f"{namespace}_{name}"
        results = expander.expand_online(plan, socket_path=socket_path, domain_name=domain)
        failed = []
        for r in results:
            if r.outcome == "grown":
                self.metrics.expansion("grown")
                self._event(vm, K.EVENT_DISK_EXPANDED, f"disk {r.volume} grown online from {r.before} "
                            f"to {r.after} bytes (its planned size), without a restart", NORMAL)
            elif r.outcome == "failed":
                self.metrics.expansion("failed")
                failed.append(r)
                report = (namespace, name, applied[2], f"{r.volume}:{r.reason}")
                with self._lock:
                    first = report not in self._failures_reported
                    self._failures_reported.add(report)
                if first:
                    self._event(vm, K.EVENT_DISK_EXPAND_FAILED,
                                f"disk {r.volume} could not be grown online: {r.reason}", WARNING)
        self.log.emit("expand.result", level="warning" if failed else "info", namespace=namespace,
                      vm=name, node=self.node, domain=domain, vmiUID=vmi_uid,
                      results=[{"volume": r.volume, "outcome": r.outcome, "before": r.before,
                                "after": r.after, "reason": r.reason} for r in results])
        if failed:
            raise Retry(f"{len(failed)} disk(s) not grown: " + "; ".join(f"{r.volume}: {r.reason}"
                                                                         for r in failed))
        with self._lock:
            self._expanded[(namespace, name)] = applied

    # --- reporting -----------------------------------------------------------------------------
    def _say(self, key: Key, outcome: str, event: str, /, *, force: bool = False, **fields: Any) -> None:
        """Log ``event`` when the key's outcome changed since the last line (or ``force``)."""
        with self._lock:
            if not force and self._said.get(key) == outcome:
                return
            self._said[key] = outcome
        fields.setdefault("level", "info")
        self.log.emit(event, **fields)

    def _event(self, vm: Mapping[str, Any], reason: str, message: str, event_type: str, *,
               suffix: str | None = None) -> bool | None:
        """Create the Event: True when created, False when one of that name exists (a fixed
        ``suffix`` sent before), None when it failed (logged; an Event is a report, not retried
        here: only a HomeNodeRecorded Event is sent again, by :meth:`_catch_up_home_event`)."""
        try:
            return self.kube.create_event(vm, reason=reason, message=message, event_type=event_type,
                                          node=self.node, suffix=suffix)
        except Exception as exc:  # noqa: BLE001 - an Event is a report; its loss is logged, not retried
            meta = vm.get("metadata") or {}
            self.log.emit("event.failed", level="warning", reason=reason, namespace=meta.get("namespace"),
                          vm=meta.get("name"), error=describe_error(exc))
            return None

    def _home_event(self, vm: Mapping[str, Any], message: str) -> bool | None:
        """The VM's HomeNodeRecorded Event, named for its UID and this node (:func:`_event`'s result)."""
        uid = str(H.meta_of(vm).get("uid") or "")
        return self._event(vm, K.EVENT_HOME_NODE_RECORDED, message, NORMAL,
                           suffix=recorded_event_suffix(uid, self.node))
