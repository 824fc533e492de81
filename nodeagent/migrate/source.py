"""The source side of a migration: one thread per VM that moves its directory and hands the home over.

Started by :class:`nodeagent.migrate.service.Migrations` when a VM homed on this node asks
(``diskhooks.io/migrate-to``) to move. Every step reads the VM again from the API server and is
safe to repeat, so a killed agent, once restarted, simply runs the migration again from the top:
the target keeps its staging copy (``--inplace``), so only what is missing moves.

1. **Preflight** — the VM is stopped (no ``running``/starting ``runStrategy``, no VMI), its
   directory holds only plain files; the target agent (address from its Node) checks the VM, the
   library bases, its free space and prepares its staging directory. Nothing is copied before.
2. **Copying** — rsync to the target (:mod:`nodeagent.migrate.rsyncrun`), progress in the status
   annotation; meanwhile the source files are hashed (SHA-256). Every few seconds the VM is read
   again: a cancelled request (annotation removed) or a VMI that appeared stops the copy.
3. **Verifying** — the target hashes its copy and compares with the source's manifest, rewrites
   the home marker for itself, flushes and renames it into place.
4. **Handing over** — the VM is read again (stopped, same request, source files unchanged since
   hashed), and ONE update, conditional on the resourceVersion read, sets ``diskhooks.io/node`` to
   the target, removes the request and writes ``Succeeded``; the webhook re-pins the VM. Only then
   is the source copy renamed aside (``.diskhooks/migrate/kept/...``) or, with
   ``diskhooks.io/migrate-delete-source: "true"``, deleted.

Until the update in step 4, the VM stays homed (and pinned) on this node with its images untouched.
A failure that retrying may cure (the target unreachable or restarting, a busy target, a copy that
did not verify) is retried with backoff within ``retry_window``; anything else ends the migration:
``Failed`` with the reason, the request removed (the VM may start again on this node), the target's
copy dropped.
"""

from __future__ import annotations

import datetime
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diskplan import keys as K
from diskplan.errors import DiskhooksError, Malformed
from diskplan.migration import (
    ANN_MIGRATE_DELETE_SOURCE,
    ANN_MIGRATE_TO,
    ANN_MIGRATION_STATUS,
    CANCELLED,
    COPYING,
    EVENT_CANCELLED,
    EVENT_FAILED,
    EVENT_RETRYING,
    EVENT_STARTED,
    EVENT_SUCCEEDED,
    FAILED,
    OP_ABORT,
    OP_COMMIT,
    OP_PREFLIGHT,
    OP_RSYNC,
    PREFLIGHT,
    SUCCEEDED,
    VERIFYING,
    FileEntry,
    MigrationStatus,
    WireRequest,
    delete_source_of,
    migrate_to_of,
    request_json,
    status_json,
    status_of,
    stop_problem,
    wants_compression,
)
from diskplan.plan import is_node_name
from nodeagent import home as H
from nodeagent.events import NORMAL, WARNING
from nodeagent.kube import Conflict, Kube, describe_error
from nodeagent.migrate import vmdir
from nodeagent.migrate.cluster import get_node, node_address
from nodeagent.migrate.connector import ConnectError, exchange, open_channel
from nodeagent.migrate.keptcopy import keep_aside
from nodeagent.migrate.rsyncrun import run_rsync
from nodeagent.migrate.tlsfiles import TlsFiles

if TYPE_CHECKING:
    from diskplan.policy import Policy
    from hooksidecar.logfmt import JsonLog
    from nodeagent.reconcile import Paths

PROGRESS_INTERVAL = 2.0
WATCH_INTERVAL = 3.0
RETRY_WINDOW = 900.0
MAX_BACKOFF = 30.0
HASH_RATE = 100e6  # bytes per second assumed for the target's verification (its timeout)


class Transient(Exception):
    """Trying again may help (the message says why it failed this time)."""


class Permanent(Exception):
    """The migration cannot succeed as asked; ``abort``: drop the target's copy."""

    def __init__(self, message: str, *, abort: bool = True) -> None:
        super().__init__(message)
        self.abort = abort


class Cancelled(Exception):
    pass


@dataclass(frozen=True)
class SourceSettings:
    tls: TlsFiles
    port: int
    retry_window: float = RETRY_WINDOW
    progress_interval: float = PROGRESS_INTERVAL
    rsync: str = "rsync"
    bwlimit_kib: int = 0


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _now_text() -> str:
    return _now().strftime("%Y-%m-%dT%H:%M:%SZ")


class SourceMigration:
    """One VM's migration away from this node (a thread: :meth:`start`)."""

    def __init__(self, *, node: str, namespace: str, name: str, kube: Kube, policy: Callable[[], Policy],
                 paths: Paths, settings: SourceSettings, log: JsonLog, stopping: threading.Event,
                 on_exit: Callable[[SourceMigration], None] | None = None) -> None:
        self.node, self.namespace, self.name = node, namespace, name
        self.kube, self.policy, self.paths = kube, policy, paths
        self.settings = settings
        self.log = log
        self.stopping = stopping
        self._on_exit = on_exit
        self.thread = threading.Thread(target=self._run, name=f"migrate-{namespace}/{name}", daemon=True)
        self.status: MigrationStatus | None = None
        self._last_progress = 0.0
        self._last_bytes = 0
        self._vm_uid = ""
        self._address = ""

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    # --- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._migrate()
        except Exception as exc:  # noqa: BLE001 - logged; the next VM event or resync starts again
            self.log.emit("migrate.crashed", level="error", namespace=self.namespace, vm=self.name,
                          error=describe_error(exc))
        finally:
            if self._on_exit is not None:
                self._on_exit(self)

    def _migrate(self) -> None:
        failing_since: float | None = None
        backoff = 1.0
        while not self.stopping.is_set():
            try:
                self._attempt()
                return
            except Cancelled:
                return
            except Permanent as exc:
                self._fail(str(exc), abort=exc.abort)
                return
            except Transient as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.settings.retry_window:
                    self._fail(f"gave up after {now - failing_since:.0f} s of retries: {exc}", abort=False)
                    return
                self._retrying(str(exc), backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    # --- reading the VM ------------------------------------------------------------------------
    def _read_vm(self) -> dict[str, Any] | None:
        try:
            return self.kube.get_vm(self.namespace, self.name)
        except Exception as exc:  # noqa: BLE001 - the API server: try again
            raise Transient(f"cannot read the VM: {describe_error(exc)}") from None

    def _check_stopped(self, vm: Mapping[str, Any]) -> None:
        spec = vm.get("spec") if isinstance(vm.get("spec"), Mapping) else {}
        problem = stop_problem(spec)  # type: ignore[arg-type]
        if problem is not None:
            raise Permanent(f"the VM is not stopped ({problem}); nothing was moved", abort=True)
        try:
            vmi = self.kube.get_vmi(self.namespace, self.name)
        except Exception as exc:  # noqa: BLE001
            raise Transient(f"cannot look up the VM's VMI: {describe_error(exc)}") from None
        if vmi is not None:
            phase = (vmi.get("status") or {}).get("phase")
            raise Transient(f"the VM still has a VMI (phase {phase}); waiting for it to be gone")

    def _current(self) -> tuple[dict[str, Any], str]:
        """The VM as it is now and the node it asks for; raises :class:`Cancelled` when there is
        nothing (more) to do here."""
        vm = self._read_vm()
        if vm is None:
            self.log.emit("migrate.gone", level="info", namespace=self.namespace, vm=self.name)
            raise Cancelled
        self._vm_uid = str(H.meta_of(vm).get("uid") or "")
        ann = H.annotations_of(vm)
        status = status_of(ann)
        target = migrate_to_of(ann)
        if H.home_of(vm) != self.node:
            raise Cancelled
        if target is None:
            if status is not None and not status.done and status.source == self.node:
                self._cancelled(vm, status)
            raise Cancelled
        if target == self.node:
            raise Permanent(f"the VM's home is already node {self.node}", abort=False)
        return vm, target

    # --- one attempt ---------------------------------------------------------------------------
    def _attempt(self) -> None:
        vm, target = self._current()
        old = status_of(H.annotations_of(vm))
        fresh = old is None or old.done or old.target != target or old.source != self.node
        if fresh:
            self.status = MigrationStatus(id=secrets.token_hex(8), phase=PREFLIGHT, source=self.node,
                                          target=target, started_at=_now_text(), updated_at=_now_text())
        else:
            assert old is not None
            self.status = old.advanced(phase=PREFLIGHT, attempt=old.attempt + (self.status is None),
                                       rate=0, updated_at=_now_text())
        self._check_stopped(vm)
        root = self.paths.on_host(self.policy().host_disks.root)
        source_dir = vmdir.vm_dir(root, self.namespace, self.name)
        try:
            files = vmdir.list_files(source_dir)
            bases = vmdir.bases_of(source_dir, files)
        except FileNotFoundError:
            raise Permanent(f"the VM has no directory on node {self.node} ({source_dir}): nothing to "
                            "move", abort=True) from None
        except (vmdir.DirError, OSError) as exc:
            raise Permanent(str(exc)) from None
        if not files:
            raise Permanent(f"{source_dir} is empty: nothing to move")
        total = sum(f.size for f in files)
        self.status = self.status.advanced(total=total, bytes=0 if fresh else self.status.bytes)
        self._patch_status()
        if fresh:
            self._event(vm, EVENT_STARTED, f"moving {len(files)} files ({total} bytes, "
                        f"{sum(f.allocated for f in files)} on disk) to node {target}", NORMAL)
        self._address = self._target_address(target)
        sized = vmdir.with_virtual_sizes(source_dir, files)  # the target checks its budget by them
        base = self._request(OP_PREFLIGHT, target, files=tuple(sized), bases=tuple(bases))
        reply = self._call(base, timeout=120.0)
        self.log.emit("migrate.preflight", level="info", namespace=self.namespace, vm=self.name,
                      target=target, id=self.status.id, staged=reply.get("staged"), free=reply.get("free"))

        # copying, with the source hashed alongside
        hashes: dict[str, vmdir.Hashed] = {}
        hash_error: list[str] = []
        hash_stop = threading.Event()

        def hash_all() -> None:
            try:
                for f in files:
                    hashes[f.name] = vmdir.hash_file(f"{source_dir}/{f.name}", should_stop=hash_stop.is_set)
            except (OSError, vmdir.DirError, InterruptedError) as exc:
                hash_error.append(str(exc))

        hasher = threading.Thread(target=hash_all, name="migrate-hash", daemon=True)
        hasher.start()
        try:
            self._copy(target, source_dir, compress=wants_compression(files))
        finally:
            if self.stopping.is_set():
                hash_stop.set()
            hasher.join()
        if hash_error:
            raise Transient(f"hashing the source failed: {hash_error[0]}")

        # verifying on the target (commit)
        self.status = self.status.advanced(phase=VERIFYING, bytes=total, rate=0, updated_at=_now_text())
        self._patch_status()
        manifest = tuple(FileEntry(name=f.name, size=f.size, allocated=f.allocated,
                                   sha256=hashes[f.name].sha256) for f in files)
        commit = self._request(OP_COMMIT, target, files=manifest, bases=tuple(bases))
        self._call(commit, timeout=120.0 + total / HASH_RATE)
        self._hand_over(target, source_dir, files, hashes)

    def _target_address(self, target: str) -> str:
        try:
            node = get_node(self.kube, target)
        except Exception as exc:  # noqa: BLE001
            raise Transient(f"cannot read Node {target}: {describe_error(exc)}") from None
        if node is None:
            raise Permanent(f"Node {target} does not exist", abort=False)
        address = node_address(node)
        if address is None:
            raise Permanent(f"Node {target} has no InternalIP or ExternalIP address to reach its agent at",
                            abort=False)
        return address

    def _request(self, op: str, target: str, **more: Any) -> WireRequest:
        assert self.status is not None
        return WireRequest(op=op, id=self.status.id, namespace=self.namespace, vm=self.name,
                           vm_uid=self._vm_uid, source=self.node, target=target, **more)

    def _call(self, request: WireRequest, *, timeout: float) -> dict[str, Any]:
        try:
            line = request_json(request)
        except Malformed as exc:  # e.g. a VM directory of more files than a request may list
            raise Permanent(f"the VM's directory cannot be described to node {request.target}: {exc}; "
                            "nothing was moved") from None
        try:
            channel = open_channel(self._address, self.settings.port, self.settings.tls)
        except ConnectError as exc:
            raise Transient(str(exc)) from None
        try:
            reply, _ = exchange(channel, line, timeout=timeout)
        except ConnectError as exc:
            raise Transient(str(exc)) from None
        finally:
            channel.sock.close()
        if not reply.get("ok"):
            error = str(reply.get("error") or "refused")
            if reply.get("permanent"):
                raise Permanent(f"node {request.target} refused: {error}")
            raise Transient(f"node {request.target}: {error}")
        return reply

    # --- copying -------------------------------------------------------------------------------
    def _copy(self, target: str, source_dir: str, *, compress: bool) -> None:
        assert self.status is not None
        self.status = self.status.advanced(phase=COPYING, updated_at=_now_text())
        self._patch_status()
        stop = threading.Event()
        problem: list[Exception] = []
        self._last_progress, self._last_bytes = time.monotonic(), 0
        latest = [0]

        def watch() -> None:
            while not stop.wait(WATCH_INTERVAL):
                if self.stopping.is_set():
                    stop.set()
                    return
                try:
                    vm = self._read_vm()
                    if vm is None or migrate_to_of(H.annotations_of(vm)) != target or H.home_of(vm) != self.node:
                        problem.append(Cancelled())
                        stop.set()
                        return
                    self._check_stopped(vm)
                except Transient as exc:
                    if "VMI" in str(exc):
                        problem.append(Permanent("the VM was started during the migration; the copy "
                                                 "was stopped and the VM stays on this node"))
                        stop.set()
                        return
                except Permanent as exc:
                    problem.append(exc)
                    stop.set()
                    return
                self._progress(latest[0])

        def on_progress(value: int) -> None:
            latest[0] = value

        watcher = threading.Thread(target=watch, name="migrate-watch", daemon=True)
        watcher.start()
        request = self._request(OP_RSYNC, target)
        wire = {"op": OP_RSYNC, "id": request.id, "namespace": request.namespace, "vm": request.vm,
                "vmUID": request.vm_uid, "source": request.source, "target": request.target}
        try:
            result = run_rsync(source_dir, address=self._address, port=self.settings.port,
                               tls_dir=self.settings.tls.directory, request=wire, on_progress=on_progress,
                               stop=stop, rsync=self.settings.rsync, bwlimit_kib=self.settings.bwlimit_kib,
                               compress=compress)
        finally:
            stop.set()
            watcher.join()
        if problem:
            if isinstance(problem[0], Cancelled):
                vm = self._read_vm()
                if vm is not None:
                    self._cancelled(vm, self.status)
                raise Cancelled
            raise problem[0]
        if self.stopping.is_set():
            raise Cancelled
        if result.code != 0:
            tail = " ".join(result.stderr.split())[-400:]
            if result.no_space:
                raise Permanent(f"node {target} ran out of space during the copy (rsync: {tail}); its copy "
                                "is removed")
            raise Transient(f"rsync exited with status {result.code}: {tail}")
        self._progress(self.status.total, force=True)
        self.log.emit("migrate.copied", level="info", namespace=self.namespace, vm=self.name, target=target,
                      id=self.status.id, files=self.status.total, sent=result.sent)

    def _progress(self, value: int, *, force: bool = False) -> None:
        assert self.status is not None
        now = time.monotonic()
        if not force and now - self._last_progress < self.settings.progress_interval:
            return
        elapsed = max(now - self._last_progress, 1e-3)
        rate = max(0, int((value - self._last_bytes) / elapsed))
        self._last_progress, self._last_bytes = now, value
        self.status = self.status.advanced(bytes=min(value, self.status.total), rate=rate,
                                           updated_at=_now_text())
        self._patch_status()

    # --- handing over --------------------------------------------------------------------------
    def _hand_over(self, target: str, source_dir: str, files: list[FileEntry],
                   hashes: Mapping[str, vmdir.Hashed]) -> None:
        assert self.status is not None
        for _ in range(5):
            vm, wanted = self._current()
            if wanted != target:
                raise Transient(f"the request changed to node {wanted}")
            self._check_stopped(vm)
            try:
                now = vmdir.list_files(source_dir)
            except (OSError, vmdir.DirError) as exc:
                raise Permanent(f"the source directory changed: {exc}") from None
            if [f.name for f in now] != [f.name for f in files]:
                raise Transient("the source directory's files changed during the migration")
            for f in files:
                st = os.lstat(f"{source_dir}/{f.name}")
                if vmdir.identity(st) != hashes[f.name].identity:
                    raise Transient(f"{f.name} changed during the migration")
            delete = delete_source_of(H.annotations_of(vm))
            kept = None if delete else vmdir.kept_dir(
                self.policy().host_disks.root, self.namespace, self.name, self.status.id)
            final = self.status.advanced(phase=SUCCEEDED, bytes=self.status.total, rate=0, error=None,
                                         updated_at=_now_text(), source_kept=kept)
            patch = {"metadata": {"resourceVersion": H.meta_of(vm).get("resourceVersion"), "annotations": {
                K.ANN_NODE: target, ANN_MIGRATE_TO: None, ANN_MIGRATE_DELETE_SOURCE: None,
                ANN_MIGRATION_STATUS: status_json(final)}}}
            try:
                patched = self.kube.patch_vm_metadata(self.namespace, self.name, patch)
            except Conflict:
                continue
            except Exception as exc:  # noqa: BLE001
                raise Transient(f"the handover update failed: {describe_error(exc)}") from None
            self.status = final
            self.log.emit("migrate.handed-over", level="info", namespace=self.namespace, vm=self.name,
                          target=target, id=final.id, bytes=final.total)
            self._release_source(patched, source_dir, delete=delete)
            self._event(patched, EVENT_SUCCEEDED, f"moved to node {target} ({final.total} bytes); its home "
                        f"is node {target} now" + ("; the copy on this node is deleted" if delete else
                                                   f"; the copy on node {self.node} is kept at {kept}"),
                        NORMAL)
            return
        raise Transient("the VM kept changing while its home was handed over")

    def _release_source(self, vm: Mapping[str, Any], source_dir: str, *, delete: bool) -> None:
        assert self.status is not None
        root = self.paths.on_host(self.policy().host_disks.root)
        try:
            if delete:
                vmdir.remove_tree(source_dir)
            else:
                keep_aside(root, source_dir, namespace=self.namespace, vm=self.name, vm_uid=self._vm_uid,
                           target=self.status.target, ident=self.status.id)
        except OSError as exc:
            self.log.emit("migrate.source-left", level="warning", namespace=self.namespace, vm=self.name,
                          path=source_dir, error=str(exc))
            self._event(vm, EVENT_FAILED, f"the home moved, but the copy on node {self.node} could not be "
                        f"{'deleted' if delete else 'renamed aside'} ({exc}); it stays at {source_dir}",
                        WARNING)

    # --- outcomes ------------------------------------------------------------------------------
    def _fail(self, reason: str, *, abort: bool) -> None:
        self.log.emit("migrate.failed", level="warning", namespace=self.namespace, vm=self.name,
                      reason=reason, abort=abort)
        status = self.status
        target = status.target if status is not None else None
        if abort and target and self._address:
            self._abort_target(target, reason)
        for _ in range(5):
            try:
                vm = self.kube.get_vm(self.namespace, self.name)
            except Exception:  # noqa: BLE001
                vm = None
            if vm is None or H.home_of(vm) != self.node:
                return
            ann = H.annotations_of(vm)
            if status is None:
                wanted = migrate_to_of(ann)
                if wanted is None or not is_node_name(wanted):
                    return
                status = MigrationStatus(id=secrets.token_hex(8), phase=FAILED, source=self.node,
                                         target=wanted, started_at=_now_text())
            final = status.advanced(phase=FAILED, error=reason, rate=0, updated_at=_now_text())
            patch = {"metadata": {"resourceVersion": H.meta_of(vm).get("resourceVersion"), "annotations": {
                ANN_MIGRATE_TO: None, ANN_MIGRATE_DELETE_SOURCE: None, ANN_MIGRATION_STATUS: status_json(final)}}}
            try:
                patched = self.kube.patch_vm_metadata(self.namespace, self.name, patch)
            except Conflict:
                continue
            except Exception as exc:  # noqa: BLE001
                self.log.emit("migrate.status-failed", level="warning", namespace=self.namespace, vm=self.name,
                              error=describe_error(exc))
                return
            self.status = final
            self._event(patched, EVENT_FAILED, f"not moved to node {final.target}: {reason}; the VM stays "
                        f"on node {self.node} with its images", WARNING)
            return

    def _cancelled(self, vm: Mapping[str, Any], status: MigrationStatus) -> None:
        self.log.emit("migrate.cancelled", level="info", namespace=self.namespace, vm=self.name, id=status.id)
        try:
            if not self._address:
                self._address = self._target_address(status.target)
            self._abort_target(status.target, "cancelled")
        except (Transient, Permanent):
            pass
        final = status.advanced(phase=CANCELLED, rate=0, updated_at=_now_text(),
                                error="the request was withdrawn (diskhooks.io/migrate-to removed)")
        self.status = final
        try:
            patched = self.kube.patch_vm_metadata(self.namespace, self.name, {"metadata": {"annotations": {
                ANN_MIGRATION_STATUS: status_json(final)}}})
        except Exception as exc:  # noqa: BLE001
            self.log.emit("migrate.status-failed", level="warning", namespace=self.namespace, vm=self.name,
                          error=describe_error(exc))
            return
        self._event(patched, EVENT_CANCELLED, f"the move to node {status.target} was cancelled; the VM stays "
                    f"on node {self.node}", NORMAL)

    def _abort_target(self, target: str, reason: str, *, attempts: int = 6) -> None:
        """Ask the target to drop its copy; a busy target (its rsync still ending) is asked again."""
        for attempt in range(attempts):
            try:
                self._call(self._request(OP_ABORT, target, reason=reason), timeout=60.0)
                return
            except Transient as exc:
                if attempt + 1 == attempts or self.stopping.wait(1.0 + attempt):
                    self.log.emit("migrate.abort-failed", level="warning", namespace=self.namespace,
                                  vm=self.name, target=target, error=str(exc))
                    return
            except Permanent as exc:
                self.log.emit("migrate.abort-failed", level="warning", namespace=self.namespace, vm=self.name,
                              target=target, error=str(exc))
                return

    def _retrying(self, reason: str, delay: float) -> None:
        self.log.emit("migrate.retry", level="info", namespace=self.namespace, vm=self.name, reason=reason,
                      retryIn=delay)
        if self.status is None:
            return
        first = self.status.error is None
        self.status = self.status.advanced(error=f"retrying: {reason}", rate=0, updated_at=_now_text())
        self._patch_status()
        if first:
            vm = self._read_vm_quietly()
            if vm is not None:
                self._event(vm, EVENT_RETRYING, f"the move to node {self.status.target} is retried: {reason}",
                            NORMAL)

    # --- reporting -----------------------------------------------------------------------------
    def _read_vm_quietly(self) -> dict[str, Any] | None:
        try:
            return self.kube.get_vm(self.namespace, self.name)
        except Exception:  # noqa: BLE001
            return None

    def _patch_status(self) -> None:
        assert self.status is not None
        try:
            self.kube.patch_vm_metadata(self.namespace, self.name, {"metadata": {"annotations": {
                ANN_MIGRATION_STATUS: status_json(self.status)}}})
        except DiskhooksError:
            raise
        except Exception as exc:  # noqa: BLE001 - progress is a report: its loss is logged
            self.log.emit("migrate.status-failed", level="warning", namespace=self.namespace, vm=self.name,
                          error=describe_error(exc))

    def _event(self, vm: Mapping[str, Any], reason: str, message: str, event_type: str) -> None:
        try:
            self.kube.create_event(vm, reason=reason, message=message, event_type=event_type, node=self.node)
        except Exception as exc:  # noqa: BLE001
            self.log.emit("event.failed", level="warning", reason=reason, namespace=self.namespace,
                          vm=self.name, error=describe_error(exc))
