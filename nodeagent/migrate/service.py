"""Migrations in the node agent: the target listener, one source thread per VM leaving, housekeeping.

:class:`Migrations` is built by :class:`nodeagent.agent.Agent` when the agent has migration TLS
files (``--migration-tls-dir``). The agent's VM watch (VMs homed here) hands every event to
:meth:`Migrations.on_vm`, which starts a :class:`~nodeagent.migrate.source.SourceMigration` for a VM
that asks to move (or whose unfinished migration must be closed), at most one per VM. The
:class:`~nodeagent.migrate.target.TargetServer` answers other agents. Housekeeping (at start, then
every ``housekeeping_interval``) finishes what a crash interrupted: a staging copy whose VM gave up
on this node is removed (after :data:`STALE_SECONDS`), the record of a copy whose VM now lives here
is dropped, and a source directory left in place after its home moved is renamed aside (or deleted,
as its status says).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diskplan.errors import Malformed
from diskplan.homemarker import parse_marker
from diskplan.migration import DEFAULT_PORT, SUCCEEDED, migrate_to_of, status_of
from nodeagent import home as H
from nodeagent.kube import Kube, describe_error
from nodeagent.migrate import vmdir
from nodeagent.migrate.keptcopy import StartRecorder, keep_aside, release_started
from nodeagent.migrate.source import PROGRESS_INTERVAL, RETRY_WINDOW, SourceMigration, SourceSettings
from nodeagent.migrate.target import COMMITTED, TargetServer
from nodeagent.migrate.tlsfiles import TlsFiles
from nodeagent.scan import find_markers

if TYPE_CHECKING:
    from diskplan.capacity import NodeAccount
    from diskplan.plan import PlanKeys
    from diskplan.policy import Policy
    from hooksidecar.logfmt import JsonLog
    from nodeagent.reconcile import Paths

STALE_SECONDS = 3600.0
HOUSEKEEPING_INTERVAL = 300.0


@dataclass(frozen=True)
class MigrationConfig:
    """``--migration-tls-dir``, ``--migration-address`` (listen), ``--migration-port``."""

    tls_dir: str
    address: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    retry_window: float = RETRY_WINDOW
    progress_interval: float = PROGRESS_INTERVAL
    housekeeping_interval: float = HOUSEKEEPING_INTERVAL
    stale_seconds: float = STALE_SECONDS
    bandwidth_mib: float = 0.0  # per migration, MiB/s; 0: no limit


def wants_source_thread(vm: Mapping[str, Any], node: str) -> bool:
    """Whether a VM calls for this node's source thread: homed here and asking to move elsewhere,
    or with a migration from here that is not finished (a cancel to close, a crash mid-way)."""
    if H.home_of(vm) != node:
        return False
    annotations = H.annotations_of(vm)
    target = migrate_to_of(annotations)
    if target is not None:
        return target != node
    status = status_of(annotations)
    return status is not None and not status.done and status.source == node


class Migrations:
    def __init__(self, *, node: str, kube: Kube, policy: Callable[[], Policy], paths: Paths, log: JsonLog,
                 config: MigrationConfig, stopping: threading.Event,
                 plan_keys: Callable[[], PlanKeys] | None = None,
                 capacity: Callable[[], NodeAccount | None] | None = None) -> None:
        """``plan_keys`` and ``capacity`` (a fresh count of this node: the agent's capacity pass) let
        the target check its budget at preflight; without them it refuses every migration here."""
        self.node, self.kube, self.policy, self.paths, self.log = node, kube, policy, paths, log
        self.config = config
        self.stopping = stopping
        self.tls = TlsFiles(config.tls_dir)
        self.settings = SourceSettings(tls=self.tls, port=config.port, retry_window=config.retry_window,
                                       progress_interval=config.progress_interval,
                                       bwlimit_kib=int(config.bandwidth_mib * 1024))
        self.server = TargetServer(node=node, kube=kube, policy=policy, paths=paths, tls=self.tls,
                                   address=config.address, port=config.port, log=log, plan_keys=plan_keys,
                                   capacity=capacity)
        self._lock = threading.Lock()
        self._running: dict[tuple[str, str], SourceMigration] = {}
        self._housekeeper = threading.Thread(target=self._housekeeping_loop, name="migrate-housekeeping",
                                             daemon=True)
        self.starts = StartRecorder(node=node, kube=kube, log=log, stopping=stopping,
                                    root=lambda: self.paths.on_host(self.policy().host_disks.root))

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.server.start()
        self._housekeeper.start()
        self.starts.start()
        self.log.emit("migrate.listening", level="info", address=self.server.address, port=self.server.port,
                      tlsDir=self.config.tls_dir, missing=self.tls.missing() or None)

    def stop(self, timeout: float = 4.0) -> bool:
        deadline = time.monotonic() + timeout
        self.server.stop(min(2.0, timeout))
        with self._lock:
            running = list(self._running.values())
        for r in running:
            r.thread.join(max(0.1, deadline - time.monotonic()))
        for thread in (self._housekeeper, self.starts.thread):
            if thread.ident is not None:
                thread.join(max(0.1, deadline - time.monotonic()))
        return not any(r.alive for r in running) and not self._housekeeper.is_alive() \
            and not self.starts.thread.is_alive()

    def health(self) -> str | None:
        if not self.server.alive:
            return "migration listener"
        if self._housekeeper.ident is not None and not self._housekeeper.is_alive():
            return "migration housekeeping"
        if self.starts.thread.ident is not None and not self.starts.thread.is_alive():
            return "migration start recorder"
        return None

    def running(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._running)

    # --- VM events -----------------------------------------------------------------------------
    def on_vm(self, kind: str, vm: Mapping[str, Any]) -> None:
        """From the VM watch thread: quick (at most starts a thread)."""
        if kind == "DELETED" or self.stopping.is_set() or not wants_source_thread(vm, self.node):
            return
        namespace, name = H.object_key(vm)
        with self._lock:
            current = self._running.get((namespace, name))
            if current is not None and current.alive:
                return
            runner = SourceMigration(node=self.node, namespace=namespace, name=name, kube=self.kube,
                                     policy=self.policy, paths=self.paths, settings=self.settings,
                                     log=self.log, stopping=self.stopping, on_exit=self._ended)
            self._running[(namespace, name)] = runner
        runner.start()

    def offer_start(self, vm: Mapping[str, Any] | None, vmi: Mapping[str, Any] | None) -> None:
        """From the watch threads (their cached copies): a VMI of a VM that moved here may show its
        first start here (:class:`~nodeagent.migrate.keptcopy.StartRecorder`)."""
        if not self.stopping.is_set():
            self.starts.offer(vm, vmi)

    def _ended(self, runner: SourceMigration) -> None:
        with self._lock:
            if self._running.get((runner.namespace, runner.name)) is runner:
                del self._running[(runner.namespace, runner.name)]

    # --- housekeeping --------------------------------------------------------------------------
    def _housekeeping_loop(self) -> None:
        while not self.stopping.wait(min(5.0, self.config.housekeeping_interval)):
            try:
                self.housekeeping()
            except Exception as exc:  # noqa: BLE001 - logged; the next round tries again
                self.log.emit("migrate.housekeeping-failed", level="warning", error=describe_error(exc))
            if self.stopping.wait(self.config.housekeeping_interval):
                return

    def housekeeping(self) -> dict[str, int]:
        root = self.paths.on_host(self.policy().host_disks.root)
        done = {"incoming": self._incoming(root), "stranded": self._stranded(root),
                "released": release_started(root=root, node_root=self.policy().host_disks.root, node=self.node,
                                            kube=self.kube, policy=self.policy(), log=self.log,
                                            event=self._event)}
        self.log.emit("migrate.housekeeping", level="info", **done)
        return done

    def _incoming(self, root: str) -> int:
        base = f"{vmdir.migrate_root(root)}/incoming"
        count = 0
        try:
            namespaces = sorted(os.listdir(base))
        except FileNotFoundError:
            return 0
        for ns in namespaces:
            try:
                names = sorted(n for n in os.listdir(f"{base}/{ns}") if n.endswith(".json"))
            except (NotADirectoryError, FileNotFoundError):
                continue
            for record_name in names:
                vm_name = record_name[:-len(".json")]
                record_path = f"{base}/{ns}/{record_name}"
                record = vmdir.read_record(record_path)
                if record is None:
                    continue
                vm = self.kube.get_vm(ns, vm_name)
                uid = str(((vm or {}).get("metadata") or {}).get("uid") or "")
                live, staging = vmdir.vm_dir(root, ns, vm_name), vmdir.staging_dir(root, ns, vm_name)
                if vm is not None and uid == record.get("vmUID") and H.home_of(vm) == self.node:
                    vmdir.remove_file(record_path)  # arrived: the copy is the VM's directory now
                    count += 1
                    continue
                asks = vm is not None and uid == record.get("vmUID") and \
                    migrate_to_of((vm.get("metadata") or {}).get("annotations")) == self.node
                try:
                    age = time.time() - os.stat(record_path).st_mtime
                except FileNotFoundError:
                    continue
                if asks or (vm is not None and uid == record.get("vmUID") and age < self.config.stale_seconds):
                    continue
                vmdir.remove_tree(staging)
                if record.get("state") == COMMITTED and os.path.isdir(live) and \
                        (vm is None or H.home_of(vm) != self.node):
                    vmdir.remove_tree(live)
                vmdir.remove_file(record_path)
                self.log.emit("migrate.incoming-removed", level="info", namespace=ns, vm=vm_name,
                              reason="the VM is gone" if vm is None or uid != record.get("vmUID")
                              else "the migration here ended without the VM moving here")
                count += 1
        return count

    def _stranded(self, root: str) -> int:
        """Source directories still in place whose VM's home moved away by a migration from here."""
        count = 0
        for place in find_markers(root):
            directory = vmdir.vm_dir(root, place.namespace, place.vm)
            try:
                marker = parse_marker(vmdir.read_small(f"{directory}/home.node.json", 4096))
            except (OSError, vmdir.DirError, Malformed):
                continue
            if marker.node != self.node:
                continue
            vm = self.kube.get_vm(place.namespace, place.vm)
            if vm is None or H.home_of(vm) in (None, self.node):
                continue
            status = status_of(H.annotations_of(vm))
            if status is None or status.phase != SUCCEEDED or status.source != self.node \
                    or H.home_of(vm) != status.target:
                continue
            if status.source_kept is None:
                vmdir.remove_tree(directory)
            else:  # the path made from the names, never the status's text
                keep_aside(root, directory, namespace=place.namespace, vm=place.vm,
                           vm_uid=str((vm.get("metadata") or {}).get("uid") or ""), target=status.target,
                           ident=status.id)
            self.log.emit("migrate.source-released", level="info", namespace=place.namespace, vm=place.vm,
                          kept=status.source_kept)
            count += 1
        return count

    def _event(self, vm: Mapping[str, Any], reason: str, message: str, event_type: str) -> None:
        try:
            self.kube.create_event(vm, reason=reason, message=message, event_type=event_type, node=self.node)
        except Exception as exc:  # noqa: BLE001 - an Event is a report: its loss is logged
            self.log.emit("event.failed", level="warning", reason=reason, error=describe_error(exc))
