"""The node agent put together: two watches -> a work queue -> workers -> reconcile; a periodic scan.

Shape of KubeVirt's virt-handler: informers on this node's VMIs (label ``kubevirt.io/nodeName``)
and on the VMs whose home is this node (label ``diskhooks.io/node``) feed keys into one
:class:`~nodeagent.workqueue.WorkQueue`; a few worker threads take keys and call
:meth:`~nodeagent.reconcile.Reconciler.reconcile`; failed keys come back with a backoff (at most
:data:`MAX_ATTEMPTS` times, then the next resync). Every ``resync_interval`` (and once at start) a
scan of ``<prefix><hostDisks.root>/*/*/home.node.json`` queues one key per marker, and every
cached VMI and VM is queued again. A :class:`~nodeagent.capacity.CapacityReporter` thread counts the
node's disk capacity and advertises it, poked by every VMI and VM event. :meth:`Agent.stop` ends it
all within a few seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from diskplan import keys as K
from hooksidecar.logfmt import JsonLog
from nodeagent import home as H
from nodeagent.capacity import DEFAULT_INTERVAL, CapacityReporter
from nodeagent.httpserver import StatusServer
from nodeagent.kube import Kube, describe_error
from nodeagent.metrics import AgentMetrics
from nodeagent.objects import slim_vm, slim_vmi
from nodeagent.reconcile import MARKER, VM, VMI, Expander, Key, Paths, Reconciler, Retry, load_expander
from nodeagent.scan import find_markers
from nodeagent.watch import DELETED, ResourceWatch
from nodeagent.workqueue import WorkQueue

if TYPE_CHECKING:
    from diskplan.plan import PlanKeys
    from diskplan.policy import Policy
    from nodeagent.migrate.service import MigrationConfig, Migrations

WORKERS = 4
RESYNC_INTERVAL = 300.0
MAX_ATTEMPTS = 8


class Agent:
    def __init__(self, *, node: str, kube: Kube, policy: Callable[[], Policy],
                 plan_keys: Callable[[], PlanKeys], log: JsonLog, host_prefix: str = "",
                 kubelet_pods_dir: str = "/var/lib/kubelet/pods", metrics_port: int | None = None,
                 workers: int = WORKERS, resync_interval: float = RESYNC_INTERVAL,
                 watch_timeout: int = 300, expander: Callable[[], Expander] = load_expander,
                 capacity_interval: float = DEFAULT_INTERVAL, migration: MigrationConfig | None = None) -> None:
        self.node = node
        self.log = log
        self.policy = policy
        self.paths = Paths(host_prefix=host_prefix, kubelet_pods_dir=kubelet_pods_dir)
        self.metrics = AgentMetrics(node)
        self.queue: WorkQueue[Key] = WorkQueue()
        self.stopping = threading.Event()
        self._resync_interval = resync_interval
        self.vmis = ResourceWatch(resource="virtualmachineinstances", list_fn=kube.list_vmis,
                                  label_selector=f"{H.LABEL_VMI_NODE}={node}", on_change=self._on_vmi,
                                  stop=self.stopping, log=log, slim=slim_vmi,
                                  on_restart=lambda why: self.metrics.watch_restart("vmis", why),
                                  watch_timeout=watch_timeout)
        self.vms = ResourceWatch(resource="virtualmachines", list_fn=kube.list_vms,
                                 label_selector=f"{K.LABEL_NODE}={node}", on_change=self._on_vm,
                                 stop=self.stopping, log=log, slim=slim_vm,
                                 on_restart=lambda why: self.metrics.watch_restart("vms", why),
                                 watch_timeout=watch_timeout)
        self.reconciler = Reconciler(node=node, kube=kube, vmis=self.vmis, vms=self.vms, policy=policy,
                                     plan_keys=plan_keys, paths=self.paths, metrics=self.metrics, log=log,
                                     expander=expander)
        self._workers = [threading.Thread(target=self._work, name=f"worker-{i}", daemon=True)
                         for i in range(max(1, workers))]
        self._resync = threading.Thread(target=self._resync_loop, name="resync", daemon=True)
        self.capacity = CapacityReporter(node=node, kube=kube, policy=policy, plan_keys=plan_keys,
                                         paths=self.paths, vmis=self.vmis, vms=self.vms,
                                         registry=self.metrics.registry, log=log,
                                         interval=capacity_interval)
        self.migrations: Migrations | None = None
        if migration is not None:  # cold migration (nodeagent.migrate): binds its port here
            from nodeagent.migrate.service import Migrations
            self.migrations = Migrations(node=node, kube=kube, policy=policy, paths=self.paths, log=log,
                                         config=migration, stopping=self.stopping, plan_keys=plan_keys,
                                         capacity=self.capacity.refresh)
        self.status: StatusServer | None = None
        if metrics_port is not None:
            self.status = StatusServer(port=metrics_port, metrics=self._exposition, health=self.health,
                                       ready=self.ready)

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self.status is not None:
            self.status.start()
        for w in self._workers:
            w.start()
        self.vmis.start()
        self.vms.start()
        self._resync.start()
        self.capacity.start()
        if self.migrations is not None:
            self.migrations.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop watches, workers, the scan and the HTTP server; True when every thread ended."""
        self.stopping.set()
        self.queue.close()
        deadline = time.monotonic() + timeout
        ended = self.vmis.stop(max(0.1, deadline - time.monotonic()))
        ended = self.vms.stop(max(0.1, deadline - time.monotonic())) and ended
        ended = self.capacity.stop(max(0.1, deadline - time.monotonic())) and ended
        for t in (*self._workers, self._resync):
            if t.is_alive() or t.ident is not None:
                t.join(max(0.1, deadline - time.monotonic()))
                ended = ended and not t.is_alive()
        if self.migrations is not None:
            ended = self.migrations.stop(max(0.1, deadline - time.monotonic())) and ended
        if self.status is not None:
            self.status.stop()
        return ended

    def health(self) -> str | None:
        """None while every thread that should run does; else which one died."""
        if self.stopping.is_set():
            return "stopping"
        dead = [name for name, alive in (("VMI watch", self.vmis.alive), ("VM watch", self.vms.alive),
                                         ("resync", self._resync.is_alive()),
                                         ("capacity", self.capacity.alive))
                if not alive]
        dead += [w.name for w in self._workers if not w.is_alive()]
        if self.migrations is not None and self.migrations.health() is not None:
            dead.append(str(self.migrations.health()))
        return f"not running: {', '.join(dead)}" if dead else None

    def ready(self) -> str | None:
        problem = self.health()
        if problem is not None:
            return problem
        waiting = [w.resource for w in (self.vmis, self.vms) if not w.synced.is_set()]
        if waiting:
            errors = "; ".join(f"{w.resource}: {w.last_error}" for w in (self.vmis, self.vms)
                               if w.last_error)
            return f"not listed yet: {', '.join(waiting)}" + (f" ({errors})" if errors else "")
        return None

    def _exposition(self) -> bytes:
        self.metrics.set_vmis(len(self.vmis))
        self.metrics.set_vms(len(self.vms))
        self.metrics.set_images(self.reconciler.images())
        return self.metrics.exposition()

    # --- watch events -> keys ------------------------------------------------------------------
    def _on_vmi(self, kind: str, vmi: dict[str, Any]) -> None:
        namespace, name = H.object_key(vmi)
        self.capacity.poke()
        if kind == DELETED:
            self.reconciler.forget((VMI, namespace, name))
            return
        self.queue.add((VMI, namespace, name))
        owner = H.owner_vm(vmi)
        if owner is not None:  # a VMI that starts or changes may make a grown plan applicable
            self.queue.add((VM, namespace, owner[0]))
            if self.migrations is not None:  # the first start of a VM that moved here
                self.migrations.offer_start(self.vms.get(namespace, owner[0]), vmi)

    def _on_vm(self, kind: str, vm: Mapping[str, Any]) -> None:
        namespace, name = H.object_key(vm)
        if kind == DELETED:
            self.capacity.vm_gone(namespace, name)
            self.reconciler.forget((VM, namespace, name))
            return
        self.capacity.poke()
        self.queue.add((VM, namespace, name))
        if self.migrations is not None:
            self.migrations.on_vm(kind, vm)
            self.migrations.offer_start(vm, self.vmis.get(namespace, name))

    # --- threads -------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self.stopping.is_set():
            key = self.queue.get(timeout=1.0)
            if key is None:
                continue
            started = time.monotonic()
            failed = False
            try:
                self.reconciler.reconcile(key)
                self.queue.forget(key)
            except Exception as exc:  # noqa: BLE001 - one key's failure must not stop the worker
                failed = True
                self._failed(key, exc)
            finally:
                self.metrics.reconciled(key[0], time.monotonic() - started, failed=failed)
                self.queue.done(key)

    def _failed(self, key: Key, exc: Exception) -> None:
        attempts = self.queue.failures(key) + 1
        error = str(exc)[:500] if isinstance(exc, Retry) else describe_error(exc)
        if self.stopping.is_set():
            return
        if attempts >= MAX_ATTEMPTS:
            self.queue.forget(key)
            self.log.emit("reconcile.gave-up", level="warning", kind=key[0], namespace=key[1],
                          name=key[2], attempts=attempts, error=error,
                          next=f"at the next resync (every {self._resync_interval:.0f} s)")
            return
        delay = self.queue.retry(key)
        self.log.emit("reconcile.retry", level="info" if isinstance(exc, Retry) else "warning",
                      kind=key[0], namespace=key[1], name=key[2], attempt=attempts, retryIn=delay,
                      error=error)

    def _resync_loop(self) -> None:
        first = True
        while not self.stopping.is_set():
            self.scan()
            if not first:
                for vmi in self.vmis.items():
                    self._on_vmi("SYNC", vmi)
                for vm in self.vms.items():
                    self._on_vm("SYNC", vm)
            first = False
            self.stopping.wait(self._resync_interval)

    def scan(self) -> int:
        """Queue one key per home marker under the node's ``hostDisks.root``; how many."""
        try:
            root = self.paths.on_host(self.policy().host_disks.root)
            count = 0
            for place in find_markers(root):
                self.queue.add((MARKER, place.namespace, place.vm))
                count += 1
        except OSError as exc:
            self.log.emit("scan.failed", level="warning", error=f"{type(exc).__name__}: {exc}")
            return 0
        self.log.emit("scan.done", level="info", root=root, markers=count)
        return count
