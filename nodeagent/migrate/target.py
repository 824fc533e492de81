"""The target side of a migration: the agent's mutual-TLS listener and what it does for a peer.

One request per connection (a JSON line, :mod:`diskplan.migration`), one answer line; for ``rsync``
the connection then carries rsync's stream to an ``rsync --server`` this agent runs into its
staging directory. Nothing a peer says is taken on its word: every request is checked against the
VirtualMachine read from the API server (same UID, home on the requesting source, asking to move
to this node), the rsync command line is rebuilt from an allowlist with this agent's own
destination, and file names are plain names checked again here.

- ``preflight``: before any byte moves. A directory of that VM already here (not this agent's own
  unfinished copy) refuses; so do a library base missing here or with other content (SHA-256
  through the node's base catalog), too little free space for what is still to come, and a VM whose
  footprint does not fit in what the node's capacity budget still has room for
  (:func:`diskplan.capacity.check_incoming`, on a fresh pass of the agent's capacity count). Then
  the staging directory and its record (:mod:`nodeagent.migrate.vmdir`), which holds the footprint
  so that the capacity pass counts the whole VM from then on, not only what has arrived.
- ``rsync``: the copy (resumable: ``--inplace`` into the staging directory).
- ``commit``: the staging directory must hold exactly the source's files with the source's SHA-256
  (hashed here), the home marker is rewritten for this node, every file and the directory are
  flushed, and the directory is renamed into place (``<root>/<ns>/<vm>``). Only then does the
  source hand the home over.
- ``abort``: the staging copy (or a committed copy whose home never moved here) is removed.

Refusals say whether trying again may help (``permanent``).
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diskplan import capacity as C
from diskplan import keys as K
from diskplan.errors import DiskhooksError
from diskplan.migration import (
    MAX_HEADER_BYTES,
    OP_ABORT,
    OP_COMMIT,
    OP_PREFLIGHT,
    OP_RSYNC,
    WireRequest,
    check_server_args,
    migrate_to_of,
    parse_request,
    reply_json,
)
from nodeagent import home as H
from nodeagent.kube import Kube, describe_error
from nodeagent.migrate import vmdir
from nodeagent.migrate.bridge import BridgeError, TlsChannel, pump, widen_pipe
from nodeagent.migrate.rsyncrun import NO_SPACE
from nodeagent.migrate.tlsfiles import PEER_NAME, TlsFiles, TlsFilesError, peer_is_agent

if TYPE_CHECKING:
    from diskplan.plan import PlanKeys
    from diskplan.policy import Policy
    from hooksidecar.logfmt import JsonLog
    from nodeagent.reconcile import Paths

SPACE_MARGIN = 64 << 20  # metadata, the marker, rounding: never fill the filesystem to the byte
MAX_CONNECTIONS = 8
HANDSHAKE_TIMEOUT = 20.0
IDLE_TIMEOUT = 600.0
RECEIVING, COMMITTED = "receiving", "committed"


@dataclass(frozen=True)
class _Budget:
    verdict: C.IncomingVerdict
    sizes: dict[str, int]  # the footprint per file, kept in the incoming record
    reserve: int  # hostDisks.capacity.reserve on this filesystem, as the fresh count has it


class Refusal(Exception):
    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


class TargetServer:
    def __init__(self, *, node: str, kube: Kube, policy: Callable[[], Policy], paths: Paths, tls: TlsFiles,
                 address: str, port: int, log: JsonLog, rsync: str = "rsync",
                 plan_keys: Callable[[], PlanKeys] | None = None,
                 capacity: Callable[[], C.NodeAccount | None] | None = None) -> None:
        """``capacity``: a fresh account of this node (the agent's capacity pass; None when the pass
        failed) and ``plan_keys``, to verify the VM's plan; without them every preflight is refused
        (the budget cannot be checked)."""
        self.node = node
        self.plan_keys = plan_keys
        self.capacity = capacity
        self._budget_lock = threading.Lock()  # one budget check (and its record) at a time
        self.kube = kube
        self.policy = policy
        self.paths = paths
        self.tls = tls
        self.log = log
        self.rsync = rsync
        self._listener = socket.create_server((address, port), reuse_port=False, backlog=16)
        self.address, self.port = address, int(self._listener.getsockname()[1])
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._busy: set[tuple[str, str]] = set()
        self._connections = 0
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._no_space: dict[tuple[str, str], tuple[str, str]] = {}  # VM -> (migration id, rsync's words)
        self._thread = threading.Thread(target=self._accept_loop, name="migrate-listener", daemon=True)

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            p.terminate()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.2)
                continue
            with self._lock:
                full = self._connections >= MAX_CONNECTIONS
                if not full:
                    self._connections += 1
            if full:
                conn.close()
                self.log.emit("migrate.target.busy", level="warning", peer=str(peer[0]))
                continue
            threading.Thread(target=self._serve, args=(conn, str(peer[0])), name="migrate-conn",
                             daemon=True).start()

    # --- one connection ------------------------------------------------------------------------
    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                channel = TlsChannel(conn, self.tls.server_context(), server_side=True)
                channel.handshake(HANDSHAKE_TIMEOUT)
                if not peer_is_agent(channel.obj.getpeercert()):
                    raise BridgeError(f"the client's certificate is not for {PEER_NAME}")
                line, rest = channel.read_line(MAX_HEADER_BYTES, HANDSHAKE_TIMEOUT)
            except (BridgeError, TlsFilesError) as exc:
                self.log.emit("migrate.target.rejected", level="warning", peer=peer, reason=str(exc))
                return
            try:
                request = parse_request(line)
            except DiskhooksError as exc:
                self._answer(channel, False, error=str(exc), permanent=True)
                return
            self._dispatch(channel, request, rest, peer)
        except Exception as exc:  # noqa: BLE001 - one connection's failure is logged, never fatal
            self.log.emit("migrate.target.failed", level="warning", peer=peer, error=describe_error(exc))
        finally:
            conn.close()
            with self._lock:
                self._connections -= 1

    def _answer(self, channel: TlsChannel, ok: bool, **members: Any) -> None:
        try:
            channel.send_all(reply_json(ok, **members))
        except BridgeError:
            pass

    def _dispatch(self, channel: TlsChannel, r: WireRequest, rest: bytes, peer: str) -> None:
        fields = {"op": r.op, "namespace": r.namespace, "vm": r.vm, "id": r.id, "source": r.source,
                  "peer": peer}
        key = (r.namespace, r.vm)
        with self._lock:
            busy = key in self._busy
            if not busy:
                self._busy.add(key)
        if busy:
            self._answer(channel, False, error=f"node {self.node} is already working on VM "
                         f"{r.namespace}/{r.vm}; try again", permanent=False)
            return
        started = time.monotonic()
        try:
            if r.target != self.node:
                raise Refusal(f"this is node {self.node}, not {r.target}")
            if r.op == OP_PREFLIGHT:
                answer = self._preflight(r)
            elif r.op == OP_COMMIT:
                answer = self._commit(r)
            elif r.op == OP_ABORT:
                answer = self._abort(r)
            elif r.op == OP_RSYNC:
                self._rsync(channel, r, rest, fields)
                return
            else:
                raise Refusal(f"unknown operation {r.op!r}")
        except Refusal as exc:
            self.log.emit("migrate.target.refused", level="warning", reason=str(exc), permanent=exc.permanent,
                          **fields)
            self._answer(channel, False, error=str(exc), permanent=exc.permanent)
            return
        except (OSError, vmdir.DirError) as exc:
            self.log.emit("migrate.target.error", level="warning", error=str(exc), **fields)
            self._answer(channel, False, error=f"node {self.node}: {exc}", permanent=False)
            return
        finally:
            with self._lock:
                self._busy.discard(key)
        self.log.emit("migrate.target.done", level="info", seconds=round(time.monotonic() - started, 3),
                      **fields, **{k: v for k, v in answer.items() if k != "ok"})
        self._answer(channel, True, **answer)

    # --- checks --------------------------------------------------------------------------------
    def _root(self) -> str:
        return self.paths.on_host(self.policy().host_disks.root)

    def _vm(self, r: WireRequest) -> Mapping[str, Any]:
        """The VM, which must be the one named (UID), homed on the source and asking for this node."""
        try:
            vm = self.kube.get_vm(r.namespace, r.vm)
        except Exception as exc:  # noqa: BLE001 - the API server did not answer: try again later
            raise Refusal(f"node {self.node} cannot read the VM: {describe_error(exc)}",
                          permanent=False) from None
        if vm is None:
            raise Refusal(f"VirtualMachine {r.namespace}/{r.vm} does not exist")
        meta = vm.get("metadata") or {}
        if meta.get("uid") != r.vm_uid:
            raise Refusal(f"VirtualMachine {r.namespace}/{r.vm} is another VM now (uid {meta.get('uid')})")
        home = H.home_of(vm)
        if home != r.source:
            raise Refusal(f"the VM's home is {home!r}, not the requesting node {r.source!r}")
        wanted = migrate_to_of(meta.get("annotations"))
        if wanted != self.node:
            raise Refusal(f"the VM does not ask to move to node {self.node} (migrate-to: {wanted!r})")
        return vm

    def _record(self, r: WireRequest) -> tuple[str, str, str, dict[str, Any] | None]:
        root = self._root()
        return (vmdir.vm_dir(root, r.namespace, r.vm), vmdir.staging_dir(root, r.namespace, r.vm),
                vmdir.incoming_record(root, r.namespace, r.vm),
                vmdir.read_record(vmdir.incoming_record(root, r.namespace, r.vm)))

    # --- operations ----------------------------------------------------------------------------
    def _preflight(self, r: WireRequest) -> dict[str, Any]:
        vm = self._vm(r)
        live, staging, record_path, record = self._record(r)
        ours = record is not None and record.get("vmUID") == r.vm_uid
        if record is not None and not ours:  # the unfinished copy of an earlier VM of that name
            vmdir.remove_tree(staging)
            vmdir.remove_file(record_path)
            record = None
        if os.path.lexists(live):
            if ours and record is not None and record.get("state") == COMMITTED \
                    and not os.path.lexists(staging):
                # committed before, never handed over: take it back as the basis of this copy
                vmdir.rename_no_replace(live, staging)
            else:
                raise Refusal(f"{live} already exists on node {self.node} (an older copy of a VM of "
                              "this name?); move it away on that node, then migrate again")
        with self._lock:
            no_space = self._no_space.pop((r.namespace, r.vm), None)
        if no_space is not None and no_space[0] == r.id:
            raise Refusal(f"node {self.node} ran out of space during the copy (rsync: {no_space[1]}); its "
                          "copy is removed")
        self._check_bases(r)
        staged = vmdir.allocated_bytes(staging)
        need = sum(f.allocated for f in r.files) - staged + SPACE_MARGIN
        root = self._root()
        vmdir.make_dirs(root)
        with self._budget_lock:  # a concurrent preflight's count must see this one's record
            budget = self._check_budget(r, vm)
            free = vmdir.free_bytes(root)
            problems = []
            if need > free - budget.reserve:
                problems.append(f"node {self.node} has {free} bytes free on {root} and keeps {budget.reserve} "
                                f"free (hostDisks.capacity.reserve); the VM needs {need} more (on disk "
                                f"{sum(f.allocated for f in r.files)}, here {staged}, margin {SPACE_MARGIN})")
            if budget.verdict.refusal is not None:
                problems.append(budget.verdict.refusal)
            if problems:
                raise Refusal("; and ".join(problems) + "; "
                              + ("nothing was copied" if not staged else "the copy stops here"))
            vmdir.make_dirs(staging)
            vmdir.write_record(record_path, {"id": r.id, "vmUID": r.vm_uid, "source": r.source,
                                             "state": RECEIVING, "at": _now_text(),
                                             "images": budget.sizes})
        return {"staged": staged, "free": free, "footprint": budget.verdict.needed_bytes,
                "room": budget.verdict.available_bytes}

    def _check_budget(self, r: WireRequest, vm: Mapping[str, Any]) -> _Budget:
        """The VM's footprint against what this node's capacity budget still has room for: per
        image (the files the source lists, by the virtual size it read from each header, else the
        file's length) the larger of that and the size the VM's verified template plan gives it."""
        from hooksidecar.prepare.imagefiles import is_image_name

        if self.capacity is None or self.plan_keys is None:
            raise Refusal(f"node {self.node}'s agent does not count its capacity here, so the VM's "
                          "room in its budget cannot be checked", permanent=False)
        images = {f.name: f.virtual if f.virtual is not None else f.size for f in r.files
                  if is_image_name(f.name)}
        plan = H.verified_plan(H.template_plan_text(vm), self.plan_keys(), namespace=r.namespace, vm=r.vm,
                               where=f"VM {r.namespace}/{r.vm} spec.template {K.ANN_PLAN}")
        plans = () if isinstance(plan, H.Decision) else (C.planned_images(plan),)
        account = self.capacity()
        if account is None:
            raise Refusal(f"node {self.node} could not count its disk capacity (its capacity pass failed: "
                          "see capacity.failed in its agent's log), so the VM's room in its budget "
                          "cannot be checked", permanent=False)
        policy = self.policy()
        verdict = C.check_incoming(C.IncomingCheck(
            node=self.node, namespace=r.namespace, vm=r.vm, images=images,
            plans=plans, account=account, capacity=policy.host_disks.capacity))
        self.log.emit("migrate.target.budget", level="info" if verdict.refusal is None else "warning",
                      namespace=r.namespace, vm=r.vm, id=r.id, neededBytes=verdict.needed_bytes,
                      availableBytes=verdict.available_bytes, othersBytes=verdict.others_bytes,
                      budgetBytes=account.budget_bytes, planTrusted=bool(plans))
        return _Budget(verdict, C.footprint_sizes(images, plans), account.reserve_bytes)

    def _check_bases(self, r: WireRequest) -> None:
        if not r.bases:
            return
        policy = self.policy()
        library = policy.host_disks.image_library
        if not library:
            raise Refusal(f"the VM's disks are made on library bases ({', '.join(b.file for b in r.bases)}) "
                          f"and node {self.node}'s policy has no hostDisks.imageLibrary")
        from hooksidecar.prepare.catalog import content_of
        from nodeagent.catalog import catalog_dirs

        lib_dir = self.paths.on_host(library)
        dirs = catalog_dirs(policy, self.paths.on_host)
        catalog = dirs[1] if dirs else None
        for base in r.bases:
            path = f"{lib_dir}/{base.file}"
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise Refusal(f"library base {base.file} is not on node {self.node} ({path}: "
                              f"{exc.strerror}); copy it into the image library there first") from None
            try:
                found = content_of(fd, file=base.file, catalog_dir=catalog)
            finally:
                os.close(fd)
            if found.problem is not None or found.sha256 is None:
                raise Refusal(f"library base {base.file} on node {self.node}: {found.problem}",
                              permanent=False)
            if found.sha256 != base.sha256:
                raise Refusal(f"library base {base.file} on node {self.node} has other content "
                              f"(SHA-256 {found.sha256}, the VM's disks were made on {base.sha256}); "
                              "the disks would read other data there")

    def _expect_receiving(self, r: WireRequest, record: dict[str, Any] | None) -> None:
        if record is None or record.get("vmUID") != r.vm_uid or record.get("id") != r.id:
            raise Refusal("no preflight for this migration on this node (run it again)", permanent=False)

    def _rsync(self, channel: TlsChannel, r: WireRequest, rest: bytes, fields: dict[str, Any]) -> None:
        try:
            self._vm(r)
            _, staging, _, record = self._record(r)
            self._expect_receiving(r, record)
            if record is not None and record.get("state") != RECEIVING:
                raise Refusal("this copy is already committed")
            argv = check_server_args(r.rsync_args, staging)
        except Refusal as exc:
            self._answer(channel, False, error=str(exc), permanent=exc.permanent)
            self.log.emit("migrate.target.refused", level="warning", reason=str(exc), **fields)
            return
        except DiskhooksError as exc:
            self._answer(channel, False, error=str(exc), permanent=True)
            self.log.emit("migrate.target.refused", level="warning", reason=str(exc), **fields)
            return
        argv[0] = self.rsync
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        for fd in (in_w, out_r):
            widen_pipe(fd)
        try:
            proc = subprocess.Popen(argv, stdin=in_r, stdout=out_w, stderr=subprocess.PIPE, cwd=staging,
                                    close_fds=True)
        finally:
            os.close(in_r)
            os.close(out_w)
        with self._lock:
            self._procs.add(proc)
        err: list[bytes] = []
        reader = threading.Thread(target=lambda: err.append(proc.stderr.read() if proc.stderr else b""),
                                  daemon=True)
        reader.start()
        started = time.monotonic()
        problem = None
        try:
            self._answer(channel, True)
            pump(channel, out_r, in_w, until="local", early=rest, idle_timeout=IDLE_TIMEOUT)
        except BridgeError as exc:
            problem = str(exc)
        finally:
            os.close(out_r)
            try:
                os.close(in_w)
            except OSError:
                pass
            try:
                code = proc.wait(timeout=30 if problem is None else 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            reader.join(5)
            with self._lock:
                self._procs.discard(proc)
        stderr = b"".join(err).decode(errors="replace")[-600:]
        self.log.emit("migrate.target.rsync", level="info" if code == 0 and problem is None else "warning",
                      exit=code, seconds=round(time.monotonic() - started, 3), problem=problem,
                      stderr=stderr, **fields)
        if code != 0 and NO_SPACE in stderr:  # the source sees the connection end only: its retry is told
            with self._lock:  # (in memory: the full filesystem may not take a record)
                self._no_space[(r.namespace, r.vm)] = (r.id, " ".join(stderr.split())[-300:])

    def _commit(self, r: WireRequest) -> dict[str, Any]:
        self._vm(r)
        live, staging, record_path, record = self._record(r)
        if record is not None and record.get("vmUID") == r.vm_uid and record.get("state") == COMMITTED \
                and os.path.isdir(live) and record.get("id") == r.id:
            return {"already": True}
        self._expect_receiving(r, record)
        have = {f.name: f for f in vmdir.list_files(staging)}
        want = {f.name: f for f in r.files}
        if set(have) != set(want):
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            raise Refusal(f"the copy on node {self.node} does not hold the source's files (missing: "
                          f"{', '.join(missing) or 'none'}; extra: {', '.join(extra) or 'none'})",
                          permanent=False)
        for name, f in sorted(want.items()):
            if f.sha256 is None:
                raise Refusal(f"no SHA-256 for {name}")
            if have[name].size != f.size:
                raise Refusal(f"{name} on node {self.node} is {have[name].size} bytes, the source's "
                              f"{f.size}", permanent=False)
            hashed = vmdir.hash_file(f"{staging}/{name}")
            if hashed.sha256 != f.sha256:
                vmdir.remove_file(f"{staging}/{name}")  # so the next rsync sends all of it again
                raise Refusal(f"{name} on node {self.node} has SHA-256 {hashed.sha256}, the source's "
                              f"{f.sha256}; it will be copied again", permanent=False)
        self._check_bases(r)
        vmdir.rewrite_marker(f"{staging}/{K.HOME_MARKER}", self.node, datetime.datetime.now(datetime.UTC))
        vmdir.fsync_files(staging, sorted(want))
        for leftover in os.listdir(staging):  # rsync's or prepare's temporary names: not moved
            if leftover.startswith("."):
                path = f"{staging}/{leftover}"
                vmdir.remove_tree(path) if os.path.isdir(path) and not os.path.islink(path) \
                    else vmdir.remove_file(path)
        vmdir.rename_no_replace(staging, live)
        vmdir.write_record(record_path, {**(record or {}), "state": COMMITTED, "at": _now_text()})
        return {"committed": live, "bytes": vmdir.allocated_bytes(live)}

    def _abort(self, r: WireRequest) -> dict[str, Any]:
        try:
            vm = self.kube.get_vm(r.namespace, r.vm)
        except Exception as exc:  # noqa: BLE001
            raise Refusal(f"node {self.node} cannot read the VM: {describe_error(exc)}",
                          permanent=False) from None
        if vm is not None and H.home_of(vm) == self.node:
            raise Refusal(f"the VM's home is node {self.node} now: its directory here is not removed")
        live, staging, record_path, record = self._record(r)
        removed = []
        if record is not None and record.get("vmUID") == r.vm_uid:
            if os.path.lexists(staging):
                vmdir.remove_tree(staging)
                removed.append(staging)
            if record.get("state") == COMMITTED and os.path.isdir(live):
                vmdir.remove_tree(live)
                removed.append(live)
            vmdir.remove_file(record_path)
        return {"removed": removed}

    # --- housekeeping --------------------------------------------------------------------------
    def forget_incoming(self, namespace: str, vm: str, vm_uid: str) -> bool:
        """The VM's home is this node now: the record of its incoming copy is done with."""
        path = vmdir.incoming_record(self._root(), namespace, vm)
        record = vmdir.read_record(path)
        if record is None or record.get("vmUID") != vm_uid or record.get("state") != COMMITTED:
            return False
        vmdir.remove_file(path)
        return True


def _now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
