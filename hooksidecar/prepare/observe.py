"""What is on disk for a plan (I/O, read-only but for the base catalog): what :func:`inspect` returns.

:func:`inspect` looks at every file a plan involves: each disk's image, its library base and base
record (``<disk>.base.json``), and for a persistent root the containerDisk seen through KubeVirt's
image volume, the overlay and its base record. It reads the first 64 KiB of a file and checks the
qcow2 magic *before* any ``qemu-img`` call, opens files with ``O_NOFOLLOW``, never follows a path
read from a file, and runs ``qemu-img info`` (with an explicit format, under limits, see
:mod:`hooksidecar.qemuimg`) only on qcow2 images whose header shows no external data file, on the
descriptor it checked (``/proc/self/fd/<n>``), so a file swapped after the check is never read. It hashes
a library base only when its identity (device, inode, size, mtime, ctime) differs from the one its
record holds and the node's base catalog has no entry for it as it is now, streaming through one
fixed buffer; such a hash is added to the catalog (:mod:`hooksidecar.prepare.catalog`), the only
file inspection writes. It writes nothing else; what the observations mean is decided in
:mod:`hooksidecar.prepare.decide`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from diskplan import baserecord, homemarker, qcow2
from diskplan import keys as K
from diskplan.errors import Malformed
from diskplan.plan import PersistRoot, Plan, PlannedDisk
from hooksidecar import qemuimg
from hooksidecar.prepare import catalog
from hooksidecar.prepare.basehash import hash_fd

# ================================================================================================
# what inspection found
# ================================================================================================
FileKind = Literal["missing", "symlink", "not-regular", "unreadable", "raw", "qcow2", "bad-qcow2"]


@dataclass(frozen=True)
class FileState:
    """One file as inspection found it. Sizes and header fields are set for ``qcow2`` (and the file
    size for ``raw``); ``detail`` explains ``unreadable`` and ``bad-qcow2``."""

    kind: FileKind
    detail: str = ""
    file_size: int | None = None
    virtual_size: int | None = None
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    corrupt: bool = False
    encrypted: bool = False
    unknown_features: int = 0


@dataclass(frozen=True)
class MarkerState:
    """A base record (the persistent root's, or a library-backed disk's). ``replaceable`` is False
    for a link or a special file, which prepare never writes over."""

    kind: Literal["missing", "invalid", "ok"]
    detail: str = ""
    record: Mapping[str, Any] = field(default_factory=dict)
    replaceable: bool = True


@dataclass(frozen=True)
class BaseContent:
    """A library base's identity now and the SHA-256 of its content: read from the record when the
    identity matches it (``hashed`` False, the fast path), else computed from every byte."""

    identity: Mapping[str, int] | None = None
    sha256: str | None = None
    hashed: bool = False
    problem: str | None = None  # why the file could not be read or hashed
    catalog: str | None = None  # the node's base catalog: hit, waited, written, hashed (None: record)


@dataclass(frozen=True)
class DiskObservation:
    dir_mounted: bool
    image: FileState
    library_mounted: bool = False
    base: FileState | None = None  # the library base at its (prefixed) launcher path, when planned
    record: MarkerState = MarkerState("missing")  # <disk>.base.json, when a base is planned
    content: BaseContent | None = None  # set when the base is otherwise usable


@dataclass(frozen=True)
class BaseObservation:
    """The containerDisk file seen through KubeVirt's image volume."""

    mounted: bool
    problem: str | None = None  # why the file cannot be used (set when mounted but unusable)
    file_name: str | None = None
    format: str | None = None
    virtual_size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class PersistObservation:
    vm_dir_mounted: bool
    base: BaseObservation
    overlay: FileState
    marker: MarkerState


@dataclass(frozen=True)
class HomeObservation:
    """The home marker (``home.node.json``) in the VM directory. ``kind``: ``unmounted`` (the VM
    directory is not mounted), ``missing``, ``invalid`` (``detail`` says why; ``replaceable`` is
    False for a link or a special file, which prepare never writes over) or ``ok`` (``marker``)."""

    kind: Literal["unmounted", "missing", "invalid", "ok"]
    marker: homemarker.HomeMarker | None = None
    detail: str = ""
    replaceable: bool = True


@dataclass(frozen=True)
class Observed:
    disks: Mapping[str, DiskObservation]
    persist_root: PersistObservation | None = None
    home: HomeObservation = HomeObservation("unmounted")


# ================================================================================================
# inspection
# ================================================================================================
def inspect(plan: Plan, *, prefix: str = "", binary: str = "qemu-img") -> Observed:
    """Look at every file ``plan`` involves, under ``prefix``. Never writes, never follows links."""
    disks: dict[str, DiskObservation] = {}
    library_mounted = _is_dir(prefix + K.LAUNCHER_IMAGE_LIBRARY)
    catalog_dir = prefix + K.LAUNCHER_BASE_CATALOG  # mounted by the Pod mutation (read-write)
    catalog_dir_or_none = catalog_dir if _is_dir(catalog_dir) else None
    for disk in plan.disks:
        mounted = _is_dir(prefix + disk.launcher_dir)
        image = inspect_image(prefix + disk.launcher_path, binary=binary) if mounted \
            else FileState("missing")
        base, record, content = None, MarkerState("missing"), None
        if disk.backing is not None and library_mounted:
            base = inspect_image(prefix + disk.backing.launcher_path, run_qemu=False)
            if mounted:
                record = read_base_record(prefix + disk.base_record_path)
                if _worth_hashing(base, disk.backing.format, image):
                    content = inspect_base_content(prefix + disk.backing.launcher_path, record,
                                                   file=disk.backing.file,
                                                   catalog_dir=catalog_dir_or_none)
        disks[disk.name] = DiskObservation(mounted, image, library_mounted, base, record, content)
    persist = None
    if plan.persist_root is not None:
        persist = _inspect_persist(plan.persist_root, prefix, binary)
    home = HomeObservation("unmounted")
    if (plan.disks or plan.persist_root is not None) and _is_dir(prefix + K.LAUNCHER_VM_DIR):
        home = read_home_marker(f"{prefix}{K.LAUNCHER_VM_DIR}/{K.HOME_MARKER}")
    return Observed(disks=disks, persist_root=persist, home=home)


def _worth_hashing(base: FileState, fmt: str, image: FileState) -> bool:
    """Whether the base (and the image on it) can be used at all: otherwise the disk is refused
    anyway and reading many GiB of base would be for nothing."""
    if image.kind not in ("missing", "qcow2") or base.kind != fmt:
        return False
    return base.kind == "raw" or (base.backing_file is None and base.data_file is None
                                  and not base.encrypted and not base.unknown_features)


def inspect_base_content(path: str, record: MarkerState, *, file: str | None = None,
                         catalog_dir: str | None = None) -> BaseContent:
    """The library base's identity and content hash. When its identity is the one ``record``
    holds, the recorded SHA-256 is taken as it is (nothing is read); otherwise the node's base
    catalog (``catalog_dir``, when mounted) gives it when an entry describes the file exactly as it
    is now, else every byte is hashed (streaming through one fixed buffer, the file keeping its
    identity while it is read; see :func:`hooksidecar.prepare.catalog.content_of`)."""
    try:
        fd = _open_regular(path)
    except _NotUsable as exc:
        return BaseContent(problem=exc.detail or exc.kind)
    try:
        before = baserecord.identity_of(os.fstat(fd))
        if record.kind == "ok" and record.record.get("identity") == before:
            return BaseContent(before, str(record.record["sha256"]), hashed=False)
        found = catalog.content_of(fd, file=file or os.path.basename(path), catalog_dir=catalog_dir)
    except OSError as exc:
        return BaseContent(problem=f"cannot be read: {exc.strerror or exc}")
    finally:
        os.close(fd)
    if found.problem is not None:
        return BaseContent(problem=found.problem)
    return BaseContent(found.identity, found.sha256, hashed=found.hashed, catalog=found.outcome)


def make_base_record(disk: PlannedDisk, base_path: str) -> dict[str, Any]:
    """The record prepare writes for ``disk``'s base found at ``base_path`` (hashed now). For tests
    and the benchmark, which lay out what prepare leaves without running it."""
    assert disk.backing is not None
    state = inspect_image(base_path, run_qemu=False)
    content = inspect_base_content(base_path, MarkerState("missing"))
    size = state.virtual_size if state.kind == "qcow2" else state.file_size
    if content.problem is not None or content.sha256 is None or content.identity is None \
            or size is None:
        raise ValueError(f"{base_path}: {content.problem or state.detail or 'cannot be recorded'}")
    return baserecord.make_record(disk, virtual_size=size, sha256=content.sha256,
                                  identity=content.identity)


def inspect_image(path: str, *, run_qemu: bool = True, binary: str = "qemu-img") -> FileState:
    """Classify the file at ``path``: its first bytes decide whether qemu-img is called at all, and
    qemu-img reads the descriptor those bytes came from (never the path again)."""
    try:
        fd = _open_regular(path)
    except _NotUsable as exc:
        return FileState(exc.kind, exc.detail)
    try:
        return _inspect_open_image(fd, path, run_qemu=run_qemu, binary=binary)
    finally:
        os.close(fd)


def _inspect_open_image(fd: int, path: str, *, run_qemu: bool, binary: str) -> FileState:
    try:
        size = os.fstat(fd).st_size
        head = os.read(fd, qcow2.HEADER_READ_BYTES)
    except OSError as exc:
        return FileState("unreadable", exc.strerror or str(exc))
    if not qcow2.is_qcow2(head):
        return FileState("raw", file_size=size)
    try:
        h = qcow2.read_header(head)
    except ValueError as exc:
        return FileState("bad-qcow2", str(exc), file_size=size)
    cut = qcow2.layout_problem(h, size)
    if cut is not None:  # qemu-img info would not notice, and resize would write into it
        return FileState("bad-qcow2", cut, file_size=size)
    state = FileState("qcow2", file_size=size, virtual_size=h.virtual_size, backing_file=h.backing_file,
                      backing_format=h.backing_format,
                      data_file=h.data_file or ("<unnamed>" if h.has_external_data_file else None),
                      corrupt=h.corrupt, encrypted=h.encrypted,
                      unknown_features=h.unknown_incompatible_features)
    if not run_qemu or state.data_file is not None or state.encrypted or state.unknown_features:
        return state  # refused on the header alone: qemu-img never sees it
    try:
        info = qemuimg.info(path, fmt="qcow2", binary=binary, fd=fd)
    except qemuimg.QemuImgError as exc:
        return FileState("bad-qcow2", exc.reason, file_size=size)
    if info.virtual_size != h.virtual_size or info.backing_file != h.backing_file:
        return FileState("bad-qcow2", "qemu-img info and the qcow2 header disagree about its size or "
                         "backing file", file_size=size)
    return FileState("qcow2", file_size=size, virtual_size=info.virtual_size,
                     backing_file=info.backing_file, backing_format=info.backing_format,
                     data_file=info.data_file, corrupt=info.corrupt or h.corrupt)


def _inspect_persist(pr: PersistRoot, prefix: str, binary: str) -> PersistObservation:
    if not _is_dir(prefix + K.LAUNCHER_VM_DIR):  # refused anyway: do not hash the base for nothing
        return PersistObservation(False, BaseObservation(mounted=False), FileState("missing"),
                                  MarkerState("missing"))
    marker = read_marker(prefix + pr.marker_path)
    needs_hash = baserecord.persist_needs_hash(pr.image, marker.record if marker.kind == "ok" else None)
    base = inspect_container_disk(prefix + f"{K.LAUNCHER_IMAGE_VOLUMES}/disk_{pr.volume_index}",
                                  binary=binary, hash_content=needs_hash)
    overlay = inspect_image(prefix + pr.launcher_path, binary=binary)
    return PersistObservation(True, base, overlay, marker)


def inspect_container_disk(image_dir: str, *, binary: str = "qemu-img",
                           hash_content: bool = True) -> BaseObservation:
    """The single file in ``<image_dir>/disk/``: format by magic, virtual size and, with
    ``hash_content``, the sha256 of all of it (without: ``sha256`` None, only the header is read;
    see :func:`diskplan.baserecord.persist_needs_hash`)."""
    if not _is_dir(image_dir):
        return BaseObservation(mounted=False)
    disk_dir = image_dir + "/disk"
    try:
        names = sorted(os.listdir(disk_dir))
    except OSError as exc:
        return BaseObservation(True, f"cannot list the disk/ directory: {exc.strerror}")
    if len(names) != 1:
        return BaseObservation(True, f"expected exactly one file in disk/, found {len(names)}")
    name = names[0]
    try:
        fd = _open_regular(f"{disk_dir}/{name}")
    except _NotUsable as exc:
        return BaseObservation(True, f"{name}: {exc.detail or exc.kind}")
    try:
        return _inspect_open_container_disk(fd, f"{disk_dir}/{name}", name, binary=binary,
                                            hash_content=hash_content)
    finally:
        os.close(fd)


def _inspect_open_container_disk(fd: int, path: str, name: str, *, binary: str,
                                 hash_content: bool) -> BaseObservation:
    try:
        size = os.fstat(fd).st_size
        head = os.read(fd, qcow2.HEADER_READ_BYTES)
        sha256 = hash_fd(fd, head=head) if hash_content else None
    except OSError as exc:
        return BaseObservation(True, f"{name} cannot be read: {exc.strerror}")
    fmt = "qcow2" if qcow2.is_qcow2(head) else "raw"
    if fmt == "qcow2":
        try:
            h = qcow2.read_header(head)
        except ValueError as exc:
            return BaseObservation(True, f"{name} has an invalid qcow2 header: {exc}")
        cut = qcow2.layout_problem(h, size)
        if cut is not None:
            return BaseObservation(True, f"{name} is not a usable qcow2 image: {cut}")
        if h.backing_file is not None or h.has_external_data_file or h.encrypted:
            return BaseObservation(True, f"{name} has a backing file, an external data file or "
                                   "encryption; a containerDisk base must be self-contained")
    try:
        info = qemuimg.info(path, fmt=fmt, binary=binary, fd=fd)
    except qemuimg.QemuImgError as exc:
        return BaseObservation(True, f"{name}: {exc.reason}")
    return BaseObservation(True, None, name, fmt, info.virtual_size, sha256)


def read_home_marker(path: str) -> HomeObservation:
    """The home marker at ``path``: a small regular file (never through a link), read strictly."""
    try:
        fd = _open_regular(path)
    except _NotUsable as exc:
        if exc.kind == "missing":
            return HomeObservation("missing")
        if exc.kind == "unreadable":
            return HomeObservation("invalid", detail=f"cannot be read: {exc.detail}")
        return HomeObservation("invalid", detail="is a symbolic link" if exc.kind == "symlink"
                               else "is a directory or special file", replaceable=False)
    try:
        data = os.read(fd, homemarker.MAX_MARKER_BYTES + 1)
    except OSError as exc:
        return HomeObservation("invalid", detail=f"cannot be read: {exc.strerror}")
    finally:
        os.close(fd)
    try:
        return HomeObservation("ok", homemarker.parse_marker(data))
    except Malformed as exc:
        return HomeObservation("invalid", detail=f"is not a home marker ({exc})")


def read_marker(path: str) -> MarkerState:
    """The persistent root's base record, validated."""
    return _read_record(path, baserecord.persist_record_problem)


def read_base_record(path: str) -> MarkerState:
    """A library-backed disk's base record (``<disk>.base.json``), validated."""
    return _read_record(path, baserecord.record_problem)


def _read_record(path: str, problem_of: Callable[[Mapping[str, Any]], str | None]) -> MarkerState:
    """The record at ``path``, ``invalid`` with ``problem_of``'s reason when it has one."""
    state = _load_record(path)
    if state.kind != "ok":
        return state
    problem = problem_of(state.record)
    return state if problem is None else MarkerState("invalid", problem)


def _load_record(path: str) -> MarkerState:
    """A JSON object from a small regular file (never through a link); ``invalid`` says why not."""
    try:
        fd = _open_regular(path)
    except _NotUsable as exc:
        if exc.kind == "missing":
            return MarkerState("missing")
        if exc.kind == "unreadable":
            return MarkerState("invalid", f"cannot be read: {exc.detail}")
        return MarkerState("invalid", "is a symbolic link" if exc.kind == "symlink"
                           else "is a directory or special file", replaceable=False)
    try:
        data = os.read(fd, baserecord.MAX_RECORD_BYTES + 1)
    except OSError as exc:
        return MarkerState("invalid", f"cannot be read: {exc.strerror}")
    finally:
        os.close(fd)
    if len(data) > baserecord.MAX_RECORD_BYTES:
        return MarkerState("invalid", f"is larger than {baserecord.MAX_RECORD_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
        return MarkerState("invalid", "is not JSON")
    if not isinstance(doc, dict):
        return MarkerState("invalid", "is not a JSON object")
    return MarkerState("ok", record=doc)


class _NotUsable(Exception):
    def __init__(self, kind: FileKind, detail: str = "") -> None:
        self.kind: FileKind = kind
        self.detail = detail
        super().__init__(detail or kind)


def _open_regular(path: str) -> int:
    """A read-only fd of a regular file at ``path``, refusing symlinks and special files."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise _NotUsable("missing") from None
    except OSError as exc:
        raise _NotUsable("unreadable", exc.strerror or str(exc)) from None
    if stat.S_ISLNK(st.st_mode):
        raise _NotUsable("symlink", "is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise _NotUsable("not-regular", "is not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _NotUsable("symlink", "became a symbolic link while being checked") from None
        raise _NotUsable("unreadable", exc.strerror or str(exc)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _NotUsable("not-regular", "is not a regular file")
    return fd


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
