"""Checks of the images the hook sidecar can see, before it answers ``OnDefineDomain``.

The sidecar container has read-only mounts of the VM's host-disk directories (added by the Pod
mutation). For every planned disk it checks, reading only the first 64 KiB of each file (no
``qemu-img`` subprocess: the call must stay around a millisecond):

- the volume directory is mounted; the image exists, is a regular file and not a symlink;
- it is qcow2 (a raw file there means KubeVirt created it because prepare did not run);
- no external data file, not marked corrupt, not encrypted, no feature bits qemu does not know;
- the tables its header points at lie within the file (a file cut short keeps a good header);
- its backing file and backing format are exactly the planned ones (none, or the library base);
- its virtual size is at least the planned size (prepare grows images, never shrinks them: a
  larger image is accepted, as prepare keeps it, and listed in :attr:`ImageFacts.larger_than_planned`
  for the call's log line, as prepare's log line warns);
- a library base it overlays is a plain file in the planned format (a base planned raw that starts
  with a qcow2 header is refused, with prepare's words: anything that probes its format would open
  it as qcow2), when qcow2 has no backing or data file itself, and is not larger than the image;
- the base record prepare wrote beside the overlay (``<disk>.base.json``) exists, names that base
  and holds the base file's current identity (device, inode, size, mtime, ctime): a base replaced
  since prepare checked its SHA-256 is refused. Only ``stat`` is compared, nothing is hashed here.

For a persistent containerDisk root it checks the base record prepare wrote for this start (the
fields prepare writes, same image as the plan, same VMI uid) and the overlay (qcow2 backed by
KubeVirt's containerDisk file in the recorded format).

Only paths derived from the plan's validated names and the fixed launcher directories are opened,
never a path read from a file. Reading a file here is the only I/O; the result is a small
:class:`ImageFacts` for the pure domain core. Every problem raises
:class:`~diskplan.errors.Refused` naming the volume and what to check.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from typing import Any

from diskplan import baserecord, qcow2
from diskplan import keys as K
from diskplan.errors import Refused
from diskplan.plan import BASE_FORMATS, Backing, PersistRoot, Plan, PlannedDisk


@dataclass(frozen=True)
class LargerImage:
    """An image kept larger than its planned size (prepare never shrinks one): logged, not refused."""

    volume: str
    path: str  # launcher path
    virtual_size: int
    planned_size: int


@dataclass(frozen=True)
class ImageFacts:
    """What the checks learnt: what the domain core needs, and what the call's log line says."""

    persist_root_base_format: str | None = None  # from the base record, when persist-root is planned
    larger_than_planned: tuple[LargerImage, ...] = ()


def check_images(plan: Plan, *, vmi_uid: str, path_prefix: str = "") -> ImageFacts:
    """Check every image ``plan`` relies on, as seen under ``path_prefix`` (tests use a tmp dir).

    ``vmi_uid`` is the VMI's ``metadata.uid``: the persistent root's base record must name it,
    which proves prepare ran (and checked the base) for this start. Raises :class:`Refused`.
    """
    larger = []
    for disk in plan.disks:
        found = _check_host_disk(disk, plan, path_prefix)
        if found is not None:
            larger.append(found)
    base_format = None
    if plan.persist_root is not None:
        base_format = _check_persist_root(plan.persist_root, plan, vmi_uid, path_prefix)
    return ImageFacts(persist_root_base_format=base_format, larger_than_planned=tuple(larger))


# ------------------------------------------------------------------------------------------------
def _check_host_disk(disk: PlannedDisk, plan: Plan, prefix: str) -> LargerImage | None:
    """Check one planned disk; return what to log when its image is larger than planned."""
    vol = disk.name
    field = f"volume {vol}"
    _require_dir(prefix, disk.launcher_dir, field,
                 f"volume directory {disk.launcher_dir} is not mounted in the sidecar: check the Pod "
                 f"mutation added the read-only mount for {vol} to the diskhooks hook-sidecar container")
    node_path = f"{plan.host_dir}/{disk.file}"
    header = _read_qcow2(prefix, disk.launcher_path, field, node_path=node_path, writable=True)
    if disk.backing is None:
        if header.backing_file is not None:
            raise Refused(field, f"{disk.launcher_path} has backing file {header.backing_file!r} "
                          f"(node file {node_path}) but the plan gives it none; diskhooks refuses "
                          "images with unexpected backing files")
    else:
        _expect_backing(header, disk.backing.launcher_path, disk.backing.format, field,
                        disk.launcher_path)
    target = qcow2.round_to_sector(disk.size_bytes)  # what prepare creates and grows to
    if header.virtual_size < target:
        raise Refused(field, f"{disk.launcher_path} has a virtual size of {header.virtual_size} bytes, "
                      f"less than the planned {disk.size_bytes}: the diskhooks-prepare init container "
                      "did not grow it; check its logs")
    if disk.backing is not None:
        identity, base_size = _check_base(disk.backing, plan, prefix, field)
        _check_base_record(disk, plan, prefix, field, identity)
        if base_size > header.virtual_size:  # prepare's words: it refuses it too
            raise Refused(field, f"disk {vol!r} is planned at {disk.size_bytes} bytes, smaller than its "
                          f"base {disk.backing.image} ({base_size} bytes); ask for at least "
                          f"{base_size} bytes")
    if header.virtual_size > target:  # kept by prepare (never shrunk), with a warning: said in the log
        return LargerImage(vol, disk.launcher_path, header.virtual_size, disk.size_bytes)
    return None


def _check_base_record(disk: PlannedDisk, plan: Plan, prefix: str, field: str,
                       identity: dict[str, int]) -> None:
    """The base is still the file prepare recorded (and hashed, when it changed) for this overlay."""
    b = disk.backing
    assert b is not None
    node_record = f"{plan.host_dir}/{disk.base_record}"
    where = f"the base record {disk.base_record_path} (node file {node_record})"
    doc = _read_json(prefix, disk.base_record_path, field, node_path=node_record, where=where,
                     missing=f"{where} does not exist: the {K.PREPARE_CONTAINER} init container "
                     f"did not run for this start, so nothing checked that the base {b.image} is "
                     "the one the overlay was made on; check the Pod has it and that it succeeded")
    problem = "is not JSON" if doc is None else baserecord.record_problem(doc)
    if problem is not None:
        raise Refused(field, f"{where} {problem}; the {K.PREPARE_CONTAINER} init container refuses "
                      "it too (check its logs)")
    if baserecord.names_other_base(doc, b):
        raise Refused(field, f"{where} names the base {doc['file']!r} ({doc['format']}), not the "
                      f"planned {b.file!r} ({b.format}); the {K.PREPARE_CONTAINER} init container "
                      "refuses it too (check its logs)")
    if doc["identity"] != identity:
        node_base = f"{plan.image_library or '<imageLibrary>'}/{b.file}"
        raise Refused(field, f"the base image {b.image} ({node_base}) changed since the "
                      f"{K.PREPARE_CONTAINER} init container checked it for the overlay "
                      f"{plan.host_dir}/{disk.file} ({baserecord.identity_changes(doc['identity'], identity)}); "
                      "the overlay is only valid on the base it was made on. Restart the VM: "
                      "prepare then compares the base's content with the record and refuses a "
                      "replaced base with what to do")


def _check_base(backing: Backing, plan: Plan, prefix: str, field: str) -> tuple[dict[str, int], int]:
    """Check the library base as prepare does; return its identity (for the base record) and its
    size as prepare measures it (virtual size of a qcow2 base, file size of a raw one)."""
    _require_dir(prefix, K.LAUNCHER_IMAGE_LIBRARY, field,
                 f"the image library {K.LAUNCHER_IMAGE_LIBRARY} is not mounted in the sidecar: check "
                 "the Pod mutation added the read-only image-library mount to the diskhooks "
                 "hook-sidecar container")
    node_path = f"{plan.image_library or '<imageLibrary>'}/{backing.file}"
    data, st = _read_start_stat(prefix, backing.launcher_path, field, node_path=node_path,
                                missing=f"base image {backing.launcher_path} ({backing.image}, node "
                                f"file {node_path}) does not exist in the image library")
    where = f"base image {backing.launcher_path} ({backing.image}, node file {node_path})"
    if backing.format == "raw":
        if qcow2.is_qcow2(data):  # valid header or not: the magic alone makes probing tools take it
            raise Refused(field, qcow2.raw_base_looks_qcow2(where))
        return baserecord.identity_of(st), st.st_size
    if not qcow2.is_qcow2(data):
        raise Refused(field, f"{where} is raw, but the plan says qcow2; diskhooks never opens an image "
                      "as a format it is not")
    header = _parse(data, st.st_size, backing.launcher_path, field, node_path=node_path,
                    writable=False)
    if header.backing_file is not None:
        raise Refused(field, f"base image {backing.launcher_path} ({backing.image}) has a backing "
                      f"file {header.backing_file!r} itself; library bases must be self-contained")
    return baserecord.identity_of(st), header.virtual_size


def _check_persist_root(pr: PersistRoot, plan: Plan, vmi_uid: str, prefix: str) -> str:
    vol = pr.volume
    field = f"volume {vol}"
    _require_dir(prefix, K.LAUNCHER_VM_DIR, field,
                 f"the VM directory {K.LAUNCHER_VM_DIR} is not mounted in the sidecar: check the Pod "
                 f"mutation added the read-only {K.POD_VOLUME_VM_DIR} mount to the diskhooks "
                 "hook-sidecar container")
    marker = _read_marker(pr, plan, prefix, field)
    recorded_image = marker.get("image")
    if recorded_image != pr.image:
        raise Refused(field, f"the base image changed: the persistent root overlay of {vol} was made "
                      f"on {recorded_image!r} but the plan now uses {pr.image!r}; diskhooks-prepare "
                      "must have refused this start (check its logs); the overlay's writes are only "
                      "valid on the image they were made on")
    recorded_uid = marker.get("vmiUID")
    if recorded_uid != vmi_uid:
        raise Refused(field, f"prepare did not run for this start: the base record {pr.marker} names "
                      f"VMI {recorded_uid!r}, this VMI is {vmi_uid!r}; check that the Pod has the "
                      f"{K.PREPARE_CONTAINER} init container and that it succeeded")
    fmt = marker.get("format")
    if fmt not in BASE_FORMATS:
        raise Refused(field, f"the base record {pr.marker} has format {fmt!r}, not one of "
                      f"{', '.join(BASE_FORMATS)}")
    problem = baserecord.persist_record_problem(marker)
    if problem is not None:
        raise Refused(field, f"the base record {pr.marker_path} {problem}; the {K.PREPARE_CONTAINER} "
                      "init container never leaves such a record (check its logs)")
    node_path = f"{plan.host_dir}/{pr.file}"
    header = _read_qcow2(prefix, pr.launcher_path, field, node_path=node_path, writable=True)
    _expect_backing(header, pr.base_path, fmt, field, pr.launcher_path)
    return str(fmt)


# ------------------------------------------------------------------------------------------------
def _require_dir(prefix: str, path: str, field: str, reason: str) -> None:
    """A directory (a mount point), not a symbolic link to one: as prepare sees it."""
    try:
        st = os.lstat(prefix + path)
    except OSError:
        raise Refused(field, reason) from None
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(field, reason)


def _read_start(prefix: str, path: str, field: str, *, node_path: str, missing: str,
                limit: int = qcow2.HEADER_READ_BYTES) -> tuple[bytes, int]:
    """The first ``limit`` bytes of a regular, non-symlink file (opened without following links),
    and the file's size."""
    data, st = _read_start_stat(prefix, path, field, node_path=node_path, missing=missing, limit=limit)
    return data, st.st_size


def _read_start_stat(prefix: str, path: str, field: str, *, node_path: str, missing: str,
                     limit: int = qcow2.HEADER_READ_BYTES) -> tuple[bytes, os.stat_result]:
    """As :func:`_read_start`, with the ``fstat`` of the file that was read."""
    full = prefix + path
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        raise Refused(field, missing) from None
    except OSError as exc:
        raise Refused(field, f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise Refused(field, f"{path} (node file {node_path}) is a symbolic link; diskhooks only uses "
                      "regular files it created and never follows links")
    if not stat.S_ISREG(st.st_mode):
        raise Refused(field, f"{path} (node file {node_path}) is not a regular file")
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(field, f"{path} became a symbolic link while being checked") from None
        raise Refused(field, f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(field, f"{path} (node file {node_path}) is not a regular file")
        return os.read(fd, limit), st
    finally:
        os.close(fd)


def _read_qcow2(prefix: str, path: str, field: str, *, node_path: str,
                writable: bool) -> qcow2.Qcow2Header:
    data, size = _read_start(prefix, path, field, node_path=node_path,
                             missing=f"image {path} (node file {node_path}) does not exist: the "
                             f"{K.PREPARE_CONTAINER} init container did not create it; check that the "
                             "Pod has it and that it succeeded")
    return _parse(data, size, path, field, node_path=node_path, writable=writable)


def _parse(data: bytes, size: int, path: str, field: str, *, node_path: str,
           writable: bool) -> qcow2.Qcow2Header:
    if size == 0:
        raise Refused(field, f"{path} (node file {node_path}) is empty (0 bytes), not a qcow2 image; "
                      "delete it on the node and restart the VM")
    if not qcow2.is_qcow2(data):
        raise Refused(field, f"raw image at {path}: KubeVirt created it because the "
                      f"{K.PREPARE_CONTAINER} init container did not run; delete it on the node "
                      f"({node_path}) if it holds no data, then restart the VM")
    try:
        header = qcow2.read_header(data)
    except ValueError as exc:
        raise Refused(field, f"{path} (node file {node_path}) has an invalid qcow2 header: {exc}") from None
    cut = qcow2.layout_problem(header, size)
    if cut is not None:
        raise Refused(field, f"{path} (node file {node_path}) is not a usable qcow2 image: {cut}")
    if header.has_external_data_file:
        raise Refused(field, f"{path} (node file {node_path}) has an external data file "
                      f"{header.data_file!r}; diskhooks refuses qcow2 images whose data lives elsewhere")
    if header.encrypted:
        raise Refused(field, f"{path} (node file {node_path}) is encrypted; diskhooks images are not")
    if header.unknown_incompatible_features:
        raise Refused(field, f"{path} (node file {node_path}) uses unknown incompatible qcow2 features "
                      f"(0x{header.unknown_incompatible_features:x})")
    if writable and header.corrupt:
        raise Refused(field, f"{path} (node file {node_path}) is marked corrupt by qemu; check it with "
                      "qemu-img check -f qcow2 on the node")
    return header


def _expect_backing(header: qcow2.Qcow2Header, backing: str, fmt: str, field: str, path: str) -> None:
    if header.backing_file != backing or header.backing_format != fmt:
        raise Refused(field, f"{path} has backing file {header.backing_file!r} (format "
                      f"{header.backing_format!r}); the plan expects {backing!r} (format {fmt!r}); "
                      "diskhooks refuses images with unexpected backing files")


def _read_marker(pr: PersistRoot, plan: Plan, prefix: str, field: str) -> dict[str, Any]:
    doc = _read_json(prefix, pr.marker_path, field, node_path=f"{plan.host_dir}/{pr.marker}",
                     where=f"the base record {pr.marker_path}",
                     missing=f"the base record {pr.marker_path} does not exist: the "
                     f"{K.PREPARE_CONTAINER} init container did not run for this start, so "
                     "nothing checked the base image of the persistent root; check the Pod has it")
    if doc is None:
        raise Refused(field, f"the base record {pr.marker_path} is not JSON; the "
                      f"{K.PREPARE_CONTAINER} init container rewrites it on the next start")
    if not isinstance(doc, dict):
        raise Refused(field, f"the base record {pr.marker_path} is not a JSON object")
    return doc


def _read_json(prefix: str, path: str, field: str, *, node_path: str, where: str, missing: str) -> Any:
    """A base record's parsed JSON (``None`` when it is not JSON), read as :func:`_read_start` reads
    (no links, regular files only) and bounded as prepare bounds it."""
    data, _ = _read_start(prefix, path, field, node_path=node_path, missing=missing,
                          limit=baserecord.MAX_RECORD_BYTES + 1)
    if len(data) > baserecord.MAX_RECORD_BYTES:
        raise Refused(field, f"{where} is larger than {baserecord.MAX_RECORD_BYTES} bytes")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
        return None
