"""Online expansion: grow a running VM's qcow2 disks to its plan's sizes through the launcher's libvirt.

KubeVirt grows running disks only for PVCs; a hostDisk grows while the VM runs only when someone
calls ``virDomainBlockResize`` on the launcher's own libvirt. This module is that call, for one VMI:

- :func:`grow_targets` (pure): the plan's disks and their planned sizes. A persistent root is never a
  target (its overlay follows its containerDisk base; the plan holds no size for it).
- :func:`launcher_socket` (reads the node's filesystem): the launcher Pod's libvirt socket in its
  ``libvirt-runtime`` emptyDir, ``virtqemud-sock`` (current launchers) else ``libvirt-sock``.
- :func:`domain_disks`, :func:`find_disk`, :func:`decide` (pure): which domain disk serves a planned
  volume (``<alias name="ua-<volume>">``, else the source file at the plan's launcher path), and whether
  to grow it, to what size, or why not.
- :func:`expand_online` (I/O): connect, read the domain XML and each disk's capacity
  (``virDomainGetBlockInfo``), grow with ``virDomainBlockResize`` and the bytes flag to exactly the
  planned size (rounded up to a 512-byte sector, as ``prepare`` and libvirt do for qcow2), read the
  capacity again to confirm. It never shrinks (libvirt and QEMU would: ``blockResize`` to a smaller
  size succeeds), never goes beyond the plan, and turns every libvirt error into a ``failed`` result
  with the reason: it does not raise for them.

The launcher's runtime directory is writable by the VM owner's pod, so everything read from it is
untrusted: the socket must be a socket (opened with ``O_NOFOLLOW``, never a symlink the pod planted),
the domain XML is size-bounded and parsed without any DTD, and messages from the daemon are shortened
before they go into a reason.

Connecting: the daemon runs unprivileged in session mode (uid 107), and root may connect to it with
``qemu+unix:///session?socket=<path>``. The node path of the socket
(``/var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock``, 121
characters, more with a host prefix) does not fit a unix socket address (107 bytes), so the socket is
opened with ``O_PATH`` and reached as ``/proc/self/fd/<n>``: short, and bound to the inode checked.

Time: libvirt's client has no timeout (a socket whose server accepts and never answers blocks
``virConnectOpen`` for good), so :func:`expand_online` gives a call :data:`CALL_TIMEOUT` seconds in a
worker thread, then reports it failed; a launcher's real daemon answers in milliseconds
(``python -m benchmarks expand``).
"""

from __future__ import annotations

import os
import re
import stat
import threading
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diskplan.errors import Malformed
from diskplan.plan import Plan
from diskplan.qcow2 import round_to_sector

OUTCOMES = ("grown", "already", "failed", "skipped")  # GrowResult.outcome

#: the launcher Pod's emptyDir that virt-launcher's ``compute`` container mounts at /var/run/libvirt
RUNTIME_DIR_PARTS = ("volumes", "kubernetes.io~empty-dir", "libvirt-runtime")
#: modular daemon first (current launchers), then the monolithic libvirtd (older launchers)
SOCKET_NAMES = ("virtqemud-sock", "libvirt-sock")
#: 512 KiB: ~100x a real KubeVirt domain (3-6 KiB); the hook sidecar accepts the same
MAX_DOMAIN_XML_CHARS = 512 * 1024
MAX_REASON_DETAIL = 300  # characters of a daemon's message kept in a reason
_POD_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}\Z")
_FORBIDDEN = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


@dataclass(frozen=True)
class GrowResult:
    """What happened to one planned volume. ``before``/``after``: running capacity in bytes, when read."""

    volume: str
    before: int | None
    after: int | None
    outcome: str  # "grown" | "already" | "failed" | "skipped"
    reason: str


@dataclass(frozen=True)
class DomainDisk:
    """One ``<disk>`` of the running domain, as far as growing it is concerned."""

    target: str  # <target dev="vda">: what blockInfo/blockResize are given
    alias: str | None  # <alias name="ua-data">
    source: str | None  # <source file="...">
    driver_type: str | None  # <driver type="qcow2">
    device: str  # <disk device="disk|cdrom|lun|floppy">


@dataclass(frozen=True)
class Resize:
    """The decision to grow ``target`` from ``before`` to ``size`` bytes."""

    volume: str
    target: str
    before: int
    size: int


# ================================================================================================
# pure
# ================================================================================================
def grow_targets(plan: Plan) -> dict[str, int]:
    """Volume -> planned size in bytes for every disk the plan gives the VM; never the persistent root."""
    root = plan.persist_root.volume if plan.persist_root is not None else None
    return {d.name: d.size_bytes for d in plan.disks if d.name != root}


def domain_disks(xml: str) -> tuple[DomainDisk, ...]:
    """The disks of a domain XML document (``virDomainGetXMLDesc``). :class:`Malformed` when the text
    is larger than :data:`MAX_DOMAIN_XML_CHARS`, carries a DTD or entity declaration, is not
    well-formed, or is not a ``<domain>``. A text (not bytes) is parsed, so no declared encoding
    applies; without a DTD no entity but XML's five and character references can occur."""
    field = "domainXML"
    if not isinstance(xml, str):
        raise Malformed(field, "the domain XML must be text")
    if len(xml) > MAX_DOMAIN_XML_CHARS:
        raise Malformed(field, f"the domain XML is {len(xml)} characters, more than the "
                        f"{MAX_DOMAIN_XML_CHARS} accepted; refused before parsing")
    forbidden = _FORBIDDEN.search(xml)
    if forbidden is not None:
        raise Malformed(field, f"the domain XML contains <!{forbidden.group(1).upper()}: document type "
                        "and entity declarations are refused")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise Malformed(field, f"the domain XML is not well-formed: {exc}") from None
    if root.tag != "domain":
        raise Malformed(field, f"the root element is <{_short(root.tag, 40)}>, not <domain>")
    disks = []
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if not dev:
            continue  # libvirt always writes one; a disk without it cannot be resized anyway
        alias = disk.find("alias")
        source = disk.find("source")
        driver = disk.find("driver")
        disks.append(DomainDisk(
            target=dev,
            alias=alias.get("name") if alias is not None else None,
            source=source.get("file") if source is not None else None,
            driver_type=driver.get("type") if driver is not None else None,
            device=disk.get("device", "disk"),
        ))
    return tuple(disks)


def find_disk(disks: tuple[DomainDisk, ...], plan: Plan, volume: str) -> DomainDisk | None:
    """The domain disk of ``volume``: the one KubeVirt aliased ``ua-<volume>``, else the one whose
    source file is the plan's launcher path of that disk. ``None`` when there is none."""
    planned = plan.disk(volume)
    if planned is None:
        return None
    by_alias = [d for d in disks if d.alias == planned.alias]
    if by_alias:
        return by_alias[0]
    return next((d for d in disks if d.source == planned.launcher_path), None)


def decide(volume: str, planned: int, disk: DomainDisk | None, capacity: int | None) -> Resize | GrowResult:
    """Grow or not: ``disk`` is the running domain's disk of ``volume`` (``None``: not attached),
    ``capacity`` its running size in bytes (``virDomainGetBlockInfo``). Never shrinks; grows to
    exactly ``planned`` rounded up to a 512-byte sector (what ``prepare`` creates and libvirt does
    for qcow2)."""
    if disk is None:
        return GrowResult(volume, None, None, "skipped",
                          f"the running domain has no disk ua-{volume}: a disk added to the VM is "
                          "attached at its next start, at the planned size")
    if disk.device != "disk":
        return GrowResult(volume, capacity, capacity, "failed",
                          f"domain disk {disk.target} of volume {volume} is a {disk.device!r} device, "
                          "not a disk: not grown")
    if disk.driver_type != "qcow2":
        return GrowResult(volume, capacity, capacity, "failed",
                          f"domain disk {disk.target} of volume {volume} has driver type "
                          f"{disk.driver_type!r}, not 'qcow2': diskhooks grows only its qcow2 images")
    if capacity is None:
        return GrowResult(volume, None, None, "failed",
                          f"the running capacity of domain disk {disk.target} is unknown")
    size = round_to_sector(planned)
    if capacity >= size:
        return GrowResult(volume, capacity, capacity, "already",
                          f"running capacity {capacity} bytes is at least the planned {size} bytes "
                          "(a disk is never shrunk)")
    return Resize(volume, disk.target, capacity, size)


def confirm(step: Resize, after: int) -> GrowResult:
    """The result of a resize whose capacity read back is ``after``."""
    if after == step.size:
        return GrowResult(step.volume, step.before, after, "grown",
                          f"grown online from {step.before} to {after} bytes")
    return GrowResult(step.volume, step.before, after, "failed",
                      f"after the resize the running capacity is {after} bytes, not the planned "
                      f"{step.size} bytes")


def _short(text: str, limit: int = MAX_REASON_DETAIL) -> str:
    """``text`` on one line and at most ``limit`` characters (it may come from the VM's pod)."""
    one = " ".join(str(text).split())
    return one if len(one) <= limit else one[:limit] + "..."


# ================================================================================================
# the node's filesystem
# ================================================================================================
def launcher_socket(kubelet_pods_dir: str, pod_uid: str) -> str | None:
    """Path of the launcher Pod ``pod_uid``'s libvirt socket under ``kubelet_pods_dir``, or ``None``
    when the Pod has none (not on this node, not started yet, gone) or ``pod_uid`` is no Pod UID.

    ``<dir>/<uid>/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock``, else
    ``.../libvirt-sock``. Every component below ``kubelet_pods_dir`` is opened without following a
    symbolic link, and the entry must be a socket: the runtime directory is the VM pod's to write."""
    if not isinstance(pod_uid, str) or not _POD_UID.match(pod_uid):
        return None
    parts = (pod_uid, *RUNTIME_DIR_PARTS)
    try:
        fd = os.open(kubelet_pods_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for part in parts:
            try:
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                return None
            os.close(fd)
            fd = nxt
        for name in SOCKET_NAMES:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISSOCK(st.st_mode):
                return os.path.join(kubelet_pods_dir, *parts, name)
        return None
    finally:
        os.close(fd)


def _open_socket(path: str) -> int:
    """An ``O_PATH`` descriptor of the socket ``path`` (its last component not followed), or
    :class:`_Failed` with the reason."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _Failed(f"no libvirt socket at {path}: the launcher's libvirt is not running "
                      "(VM stopped, or the launcher Pod is gone)") from None
    except OSError as exc:
        raise _Failed(f"cannot open the libvirt socket {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISSOCK(mode):
        os.close(fd)
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a socket"
        raise _Failed(f"{path} is {kind}: refused (only the launcher's own libvirt socket is used)")
    return fd


# ================================================================================================
# libvirt
# ================================================================================================
class _Failed(Exception):
    """Every volume fails with this reason."""


_handler_lock = threading.Lock()
_handler_registered = False


def _silence_libvirt(libvirt: Any) -> None:
    """libvirt prints every error to stderr unless a handler is registered; errors become results here."""
    global _handler_registered
    with _handler_lock:
        if not _handler_registered:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _handler_registered = True


def _libvirt_message(exc: Exception) -> str:
    get = getattr(exc, "get_error_message", None)
    text = get() if callable(get) else None
    return _short(text or str(exc))


#: seconds one call may take (a real launcher answers in milliseconds: ``python -m benchmarks expand``)
CALL_TIMEOUT = 10.0


@dataclass
class _Call:
    done: bool = False
    stuck: bool = False  # outlived its deadline: counted in _stuck until it ends


_calls_lock = threading.Lock()
_stuck: dict[str, int] = {}  # socket path -> calls past their deadline still waiting for the daemon


def expand_online(plan: Plan, *, socket_path: str, domain_name: str,
                  timeout: float = CALL_TIMEOUT) -> list[GrowResult]:
    """Grow the running domain ``domain_name`` (``<namespace>_<vmi name>``) behind the launcher's
    libvirt socket ``socket_path`` so that each planned disk has at least its planned size.

    One result per :func:`grow_targets` volume, in plan order. Never raises for a libvirt error, a
    missing socket, a bad domain XML or a daemon that does not answer: those are ``failed`` results
    with the reason. libvirt's client has no timeout, so the call runs in a thread and is given up
    after ``timeout`` seconds; while such a call still waits, a new call on the same socket fails at
    once instead of leaving another thread behind (one per launcher Pod at most)."""
    targets = grow_targets(plan)
    if not targets:
        return []
    import libvirt

    _silence_libvirt(libvirt)

    def fail_all(reason: str) -> list[GrowResult]:
        return [GrowResult(v, None, None, "failed", reason) for v in targets]

    with _calls_lock:
        if _stuck.get(socket_path):
            return fail_all(f"an earlier call to the launcher's libvirt at {socket_path} has not been "
                            "answered yet: not connecting again until it ends")
    call = _Call()
    box: list[list[GrowResult]] = []

    def work() -> None:
        try:
            box.append(_expand_all(libvirt, plan, targets, socket_path, domain_name))
        finally:
            with _calls_lock:
                call.done = True
                if call.stuck:
                    _stuck[socket_path] -= 1
                    if not _stuck[socket_path]:
                        del _stuck[socket_path]

    worker = threading.Thread(target=work, name=f"expand-online {domain_name[:60]}", daemon=True)
    worker.start()
    worker.join(timeout)
    with _calls_lock:
        if not call.done:
            call.stuck = True
            _stuck[socket_path] = _stuck.get(socket_path, 0) + 1
            return fail_all(f"the launcher's libvirt at {socket_path} did not answer within {timeout:g} s; "
                            "the call goes on in the background and grows at most to the plan's sizes")
    if not box:  # a bug, not a libvirt error: threading's excepthook printed the traceback
        raise RuntimeError(f"expand_online for {domain_name!r} ended without a result")
    return box[0]


def _expand_all(libvirt: Any, plan: Plan, targets: Mapping[str, int], socket_path: str,
                domain_name: str) -> list[GrowResult]:
    try:
        conn = _connect(libvirt, socket_path)
    except _Failed as exc:
        return [GrowResult(v, None, None, "failed", str(exc)) for v in targets]
    try:
        return _expand(libvirt, conn, plan, targets, domain_name)
    except _Failed as exc:
        return [GrowResult(v, None, None, "failed", str(exc)) for v in targets]
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass


def _connect(libvirt: Any, socket_path: str) -> Any:
    fd = _open_socket(socket_path)
    try:
        return libvirt.open(f"qemu+unix:///session?socket=/proc/self/fd/{fd}")
    except libvirt.libvirtError as exc:
        raise _Failed(f"cannot connect to the launcher's libvirt at {socket_path}: "
                      f"{_libvirt_message(exc)}") from None
    finally:
        os.close(fd)  # the connection is made (or not): the descriptor only named the socket


def _expand(libvirt: Any, conn: Any, plan: Plan, targets: Mapping[str, int],
            domain_name: str) -> list[GrowResult]:
    try:
        dom = conn.lookupByName(domain_name)
        active = dom.isActive()
        xml = dom.XMLDesc(0)
    except libvirt.libvirtError as exc:
        raise _Failed(f"domain {_short(domain_name, 120)!r} in the launcher's libvirt: "
                      f"{_libvirt_message(exc)}") from None
    if not active:
        raise _Failed(f"domain {domain_name!r} is not running: its disks grow at the next start")
    try:
        disks = domain_disks(xml)
    except Malformed as exc:
        raise _Failed(f"domain {domain_name!r}: {exc.reason}") from None
    return [_grow_one(libvirt, dom, volume, planned, find_disk(disks, plan, volume))
            for volume, planned in targets.items()]


def _grow_one(libvirt: Any, dom: Any, volume: str, planned: int, disk: DomainDisk | None) -> GrowResult:
    capacity = None
    if disk is not None:
        try:
            capacity = int(dom.blockInfo(disk.target)[0])
        except libvirt.libvirtError as exc:
            return GrowResult(volume, None, None, "failed",
                              f"reading the capacity of domain disk {disk.target}: {_libvirt_message(exc)}")
    step = decide(volume, planned, disk, capacity)
    if isinstance(step, GrowResult):
        return step
    try:
        dom.blockResize(step.target, step.size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    except libvirt.libvirtError as exc:
        return GrowResult(volume, step.before, None, "failed",
                          f"growing domain disk {step.target} to {step.size} bytes: {_libvirt_message(exc)}")
    try:
        after = int(dom.blockInfo(step.target)[0])
    except libvirt.libvirtError as exc:
        return GrowResult(volume, step.before, None, "failed",
                          f"domain disk {step.target} was asked to grow to {step.size} bytes, but its "
                          f"capacity could not be read back: {_libvirt_message(exc)}")
    return confirm(step, after)
