"""The prepare step: make the qcow2 images a plan needs before KubeVirt would make raw ones.

Runs as the ``diskhooks-prepare`` init container of a virt-launcher pod
(``diskhooks-sidecar prepare --plan-from-env | --plan FILE [--path-prefix DIR]``), with the pod's
hostDisk volumes mounted read-write at their launcher paths, the VM directory read-write, the image
library read-only and, for a persistent root, KubeVirt's image volume of the containerDisk read-only.

Three layers, in this order:

1. :func:`inspect` (I/O, read-only): what is on disk for every planned image — an :class:`Observed`.
   It reads the first 64 KiB of a file and checks the qcow2 magic *before* any ``qemu-img`` call, opens
   files with ``O_NOFOLLOW``, never follows a path read from a file, and runs ``qemu-img info`` (with
   an explicit format, under limits, see :mod:`hooksidecar.qemuimg`) only on qcow2 images whose header
   shows no external data file.
2. :func:`plan_actions` (pure): plan + observations -> a list of actions, one or more per volume:
   create, grow, unchanged, or refuse. Nothing is done when any volume is refused. A library base
   whose SHA-256 differs from the one recorded when its overlay was made is refused; inspection
   hashes a base only when its identity (device, inode, size, mtime, ctime) differs from the
   record's, streaming through one fixed buffer. An image larger
   than planned is kept as it is (never shrunk) and its summary line carries a ``warning``.
3. :func:`apply` (I/O, writes): creates beside the target and publishes atomically (no half-made image
   is ever left under the final name; temporary names a killed run left beside a file are removed
   whenever that file is acted on), grows with ``qemu-img resize``, writes the persistent root's
   base record and the base record of every library-backed disk (``<disk>.base.json``, see
   :mod:`diskplan.baserecord`; always before the overlay it describes). Every image it leaves, created, grown or unchanged (and the base record), is
   qemu's: 107:107 with mode 0660 when running as root (mode 0660 only otherwise), set through an
   fd opened with ``O_NOFOLLOW``; when that cannot be done the volume is refused with the reason,
   since qemu could not open the file and the VM would fail later with a less clear error.

``--path-prefix DIR`` (tests, the local demo) prefixes every path this process opens; the backing
file names written into qcow2 headers stay the launcher paths. Exit status: 0 done (one JSON line per
volume on stdout), 1 refused or failed (one reason per line on stderr), 2 unreadable plan or bad
arguments/environment.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import posixpath
import re
import secrets
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from diskplan import baserecord, qcow2
from diskplan import keys as K
from diskplan.errors import Malformed
from diskplan.plan import MAX_PLAN_BYTES, PersistRoot, Plan, PlannedDisk, parse_plan
from hooksidecar import qemuimg

PROG = "diskhooks-prepare"
EXIT_OK, EXIT_REFUSED, EXIT_MALFORMED = 0, 1, 2
IMAGE_MODE = 0o660
HASH_CHUNK = 1 << 20
_VMI_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}$")
_TMP_INFIX = ".tmp-"

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
class Observed:
    disks: Mapping[str, DiskObservation]
    persist_root: PersistObservation | None = None


# ================================================================================================
# actions
# ================================================================================================
@dataclass(frozen=True)
class CreateImage:
    volume: str
    path: str  # launcher path
    size: int
    backing: str | None = None  # launcher path written into the header
    backing_format: str | None = None


@dataclass(frozen=True)
class GrowImage:
    volume: str
    path: str
    size: int
    from_size: int
    backing_here: tuple[str, str] | None = None  # (launcher path, format) of the base to open


@dataclass(frozen=True)
class Unchanged:
    volume: str
    path: str
    virtual_size: int
    also: tuple[str, ...] = ()  # files kept as they are that qemu's user must still be able to read
    planned_size: int | None = None  # set when the image is larger than planned (kept, never shrunk)


@dataclass(frozen=True)
class WriteMarker:
    volume: str
    path: str
    record: Mapping[str, Any]


@dataclass(frozen=True)
class WriteBaseRecord:
    """Write a library-backed disk's base record (always before its overlay is created).
    ``why``: ``new`` (a new overlay), ``identity`` (same content, the file's identity changed),
    ``adopted`` (an overlay made before diskhooks kept records: the base as it is now)."""

    volume: str
    path: str
    record: Mapping[str, Any]
    hashed: bool
    why: Literal["new", "identity", "adopted"]
    warning: str | None = None


@dataclass(frozen=True)
class KeepBaseRecord:
    """The base record already describes the base: give it to qemu's user, write nothing."""

    volume: str
    path: str
    sha256: str
    hashed: bool


@dataclass(frozen=True)
class Refuse:
    volume: str
    reason: str


Action = CreateImage | GrowImage | Unchanged | WriteMarker | WriteBaseRecord | KeepBaseRecord | Refuse


def marker_record(*, image: str, sha256: str, fmt: str, virtual_size: int, vmi_uid: str,
                  overlay: str) -> dict[str, Any]:
    """The persistent root's base record (``persist-root.<volume>.base.json``)."""
    return {"image": image, "sha256": sha256, "format": fmt, "virtualSize": virtual_size,
            "vmiUID": vmi_uid, "overlay": overlay}


# ================================================================================================
# the pure core
# ================================================================================================
def plan_actions(plan: Plan, observed: Observed, *, vmi_uid: str | None) -> list[Action]:
    """What to do for every volume of ``plan`` given what is on disk. Pure.

    Refusals come back as :class:`Refuse` actions; the caller acts only when there is none.
    ``vmi_uid`` is needed when the plan has a persistent root.
    """
    actions: list[Action] = []
    for disk in plan.disks:
        obs = observed.disks.get(disk.name)
        if obs is None:
            actions.append(Refuse(disk.name, "was not inspected (internal error)"))
            continue
        actions.extend(_disk_actions(disk, obs, plan))
    if plan.persist_root is not None:
        pobs = observed.persist_root
        if pobs is None:
            actions.append(Refuse(plan.persist_root.volume, "was not inspected (internal error)"))
        elif vmi_uid is None:
            actions.append(Refuse(plan.persist_root.volume,
                                  f"{K.ENV_VMI_UID} is not set; it names the VMI this start is for"))
        else:
            actions.extend(_persist_actions(plan.persist_root, pobs, plan, vmi_uid))
    return actions


def _disk_actions(disk: PlannedDisk, obs: DiskObservation, plan: Plan) -> list[Action]:
    actions = _image_actions(disk, obs, plan)
    if disk.backing is None or any(isinstance(a, Refuse) for a in actions):
        return actions
    record = _base_record_actions(disk, obs, plan, creating=isinstance(actions[0], CreateImage))
    if isinstance(record, Refuse):
        return [record]
    return [record, *actions]  # the record first: an overlay never exists without it


def _base_record_actions(disk: PlannedDisk, obs: DiskObservation, plan: Plan, *,
                         creating: bool) -> WriteBaseRecord | KeepBaseRecord | Refuse:
    """The base record of a library-backed disk whose image and base are otherwise usable."""
    b = disk.backing
    assert b is not None
    vol = disk.name
    node_base = f"{plan.image_library or '<imageLibrary>'}/{b.file}"
    node_overlay = f"{plan.host_dir}/{disk.file}"
    node_record = f"{plan.host_dir}/{disk.base_record}"
    rec_where = f"the base record {disk.base_record_path} (node file {node_record})"
    content, rec, base = obs.content, obs.record, obs.base
    if content is None or base is None:
        return Refuse(vol, "its base was not inspected (internal error)")
    if content.problem is not None or content.sha256 is None or content.identity is None:
        return Refuse(vol, f"base image {b.launcher_path} ({b.image}, node file {node_base}) "
                      f"{content.problem or 'was not hashed (internal error)'}")
    if not rec.replaceable:
        return Refuse(vol, f"{rec_where} {rec.detail}; diskhooks never writes over it: remove it on "
                      "the node")
    size = base.virtual_size if base.kind == "qcow2" else base.file_size
    assert size is not None
    fresh = baserecord.make_record(disk, virtual_size=size, sha256=content.sha256,
                                   identity=content.identity)
    if creating:  # first start, or the overlay was deleted to discard its writes
        if rec.kind == "ok" and dict(rec.record) == fresh:
            return KeepBaseRecord(vol, disk.base_record_path, content.sha256, content.hashed)
        return WriteBaseRecord(vol, disk.base_record_path, fresh, content.hashed, "new")
    if rec.kind == "invalid":
        return Refuse(vol, f"{rec_where} {rec.detail}; without it diskhooks cannot tell whether the "
                      f"base {b.image} is still the one the overlay {node_overlay} was made on. If "
                      f"{node_base} was not replaced since, delete {node_record} on the node and "
                      "prepare records the base as it is now")
    if rec.kind == "missing":  # an overlay made before diskhooks kept base records
        return WriteBaseRecord(vol, disk.base_record_path, fresh, content.hashed, "adopted",
                               warning=f"{disk.launcher_path} has no base record (made by a diskhooks "
                               f"version that kept none): its base {b.image} (sha256 "
                               f"{content.sha256}) was recorded as it is now, without proof that "
                               "it is the one the overlay was made on; from now on a changed base "
                               "is refused")
    old = rec.record
    if baserecord.names_other_base(old, b):
        return Refuse(vol, f"{rec_where} names the base {old.get('file')!r} ({old.get('format')}), "
                      f"but the overlay and the plan use {b.file!r} ({b.format}); if {node_base} is "
                      f"the base the overlay was made on, delete {node_record} on the node and "
                      "prepare records it as it is now")
    if old.get("sha256") != content.sha256:
        return Refuse(vol, base_changed(disk, plan, old_sha=str(old.get("sha256")),
                                        new_sha=content.sha256))
    if dict(old) == fresh:
        return KeepBaseRecord(vol, disk.base_record_path, content.sha256, content.hashed)
    # same content under another identity (copied back, touched, restored from a backup)
    return WriteBaseRecord(vol, disk.base_record_path, fresh, content.hashed, "identity")


def base_changed(disk: PlannedDisk, plan: Plan, *, old_sha: str, new_sha: str) -> str:
    """The refusal for a library base whose content is not the one its overlay was made on."""
    b = disk.backing
    assert b is not None
    node_base = f"{plan.image_library or '<imageLibrary>'}/{b.file}"
    node_overlay = f"{plan.host_dir}/{disk.file}"
    node_record = f"{plan.host_dir}/{disk.base_record}"
    return (f"the base image {b.image} ({node_base}) changed since the overlay {node_overlay} was "
            f"made on it (sha256 {old_sha} -> {new_sha}): the overlay's clusters refer to the old "
            "base's content, so it is not used and nothing was changed. Restore the old base (the "
            f"file with sha256 {old_sha}) in the image library; or the platform team rebases the "
            f"overlay onto the new base (qemu-img rebase, with the old base at hand) and deletes "
            f"{node_record}, or discards the overlay's writes by deleting {node_overlay} and "
            f"{node_record} on the node")


def _image_actions(disk: PlannedDisk, obs: DiskObservation, plan: Plan) -> list[Action]:
    vol = disk.name
    node_file = f"{plan.host_dir}/{disk.file}"
    if not obs.dir_mounted:
        return [Refuse(vol, f"{disk.launcher_dir} is not mounted in the {K.PREPARE_CONTAINER} init "
                       f"container: check that the pod has the hostPath volume {vol!r} (KubeVirt adds it "
                       f"for the hostDisk volume, path {plan.host_dir}) and that the diskhooks Pod "
                       f"mutation mounted it at {disk.launcher_dir}")]
    refusals: list[Action] = []
    target = qcow2.round_to_sector(disk.size_bytes)
    image = obs.image
    if disk.backing is not None:
        # the size the image has once prepare is done: an existing image is never shrunk
        final = max(target, image.virtual_size or 0) if image.kind == "qcow2" else target
        base_problem = _base_problem(disk, obs, plan, final)
        if base_problem is not None:
            refusals.append(Refuse(vol, base_problem))
    where = f"{disk.launcher_path} (node file {node_file})"
    if image.kind == "missing":
        if refusals:
            return refusals
        b = disk.backing
        return [CreateImage(vol, disk.launcher_path, target,
                            backing=None if b is None else b.launcher_path,
                            backing_format=None if b is None else b.format)]
    problem = _image_problem(image, where)
    if problem is None:
        problem = _backing_problem(image, where, disk.backing.launcher_path if disk.backing else None,
                                   disk.backing.format if disk.backing else None)
    if problem is not None:
        refusals.append(Refuse(vol, problem))
    if refusals:
        return refusals
    assert image.virtual_size is not None
    if image.virtual_size < target:
        b = disk.backing
        return [GrowImage(vol, disk.launcher_path, target, image.virtual_size,
                          backing_here=None if b is None else (b.launcher_path, b.format))]
    # larger than planned (a VM re-created with a smaller disk, a lowered maxDiskSize): kept as it
    # is, since shrinking would cut off the guest's data; the summary line says so
    larger = image.virtual_size > target
    return [Unchanged(vol, disk.launcher_path, image.virtual_size,
                      planned_size=disk.size_bytes if larger else None)]


def _base_problem(disk: PlannedDisk, obs: DiskObservation, plan: Plan, final: int) -> str | None:
    """Why the planned library base of ``disk`` cannot be used (None when it can); ``final`` is the
    size the image will have."""
    b = disk.backing
    assert b is not None
    if not obs.library_mounted:
        return (f"the image library {K.LAUNCHER_IMAGE_LIBRARY} is not mounted in the "
                f"{K.PREPARE_CONTAINER} init container: check that the pod has the hostPath volume "
                f"{K.POD_VOLUME_IMAGE_LIBRARY!r} (path {plan.image_library}) and its read-only mount")
    base = obs.base or FileState("missing")
    node = f"{plan.image_library or '<imageLibrary>'}/{b.file}"
    where = f"base image {b.launcher_path} ({b.image}, node file {node})"
    if base.kind == "missing":
        return f"{where} does not exist: the platform's image library on this node has no {b.file}"
    if b.format == "raw" and base.kind in ("qcow2", "bad-qcow2"):
        return qcow2.raw_base_looks_qcow2(where)  # the sidecar refuses it with the same words
    if base.kind in ("symlink", "not-regular", "unreadable", "bad-qcow2"):
        return _image_problem(base, where) or f"{where} cannot be used"
    if base.kind != b.format:
        return (f"{where} is {base.kind}, but the plan says {b.format}; diskhooks never opens an "
                "image as a format it is not")
    if base.kind == "qcow2":
        if base.backing_file is not None:
            return (f"{where} has a backing file {base.backing_file!r} itself; library bases must be "
                    "self-contained")
        if base.data_file is not None or base.encrypted or base.unknown_features:
            return _image_problem(base, where) or f"{where} cannot be used"
    size = base.virtual_size if base.kind == "qcow2" else base.file_size
    if size is not None and size > final:
        return (f"disk {disk.name!r} is planned at {disk.size_bytes} bytes, smaller than its base "
                f"{b.image} ({size} bytes); ask for at least {size} bytes")
    return None


def _image_problem(image: FileState, where: str) -> str | None:
    """Why an existing file cannot be used as a qcow2 image diskhooks manages (None when it can)."""
    if image.kind == "symlink":
        return f"{where} is a symbolic link; diskhooks only uses regular files and never follows links"
    if image.kind == "not-regular":
        return f"{where} is not a regular file"
    if image.kind == "unreadable":
        return f"{where} cannot be read: {image.detail}"
    if image.kind == "raw" and image.file_size == 0:
        return (f"{where} is empty (0 bytes), not a qcow2 image; diskhooks never replaces a file it "
                "did not make: delete it on the node and restart the VM")
    if image.kind == "raw":
        return (f"{where} is not a qcow2 image (raw file? KubeVirt creates raw files when prepare did not "
                "run); diskhooks never converts or touches images of another format: if it holds no "
                "data, delete it on the node and restart the VM")
    if image.kind == "bad-qcow2":
        return f"{where} is not a usable qcow2 image: {image.detail}"
    if image.data_file is not None:
        return (f"{where} has an external data file {image.data_file!r}; diskhooks refuses qcow2 images "
                "whose data lives in another file")
    if image.encrypted:
        return f"{where} is encrypted; diskhooks images are not"
    if image.unknown_features:
        return f"{where} uses qcow2 features qemu does not know (0x{image.unknown_features:x})"
    if image.corrupt:
        return f"{where} is marked corrupt by qemu; check it with qemu-img check -f qcow2 on the node"
    return None


def _backing_problem(image: FileState, where: str, expected: str | None,
                     expected_format: str | None) -> str | None:
    if image.backing_file == expected and (expected is None or image.backing_format == expected_format):
        return None
    if image.backing_file is None:
        return (f"{where} has no backing file, but the plan expects {expected!r} ({expected_format}); "
                "diskhooks does not rebase images")
    outside = "" if _in_allowed_dirs(image.backing_file) else \
        " (outside the VM directory and the image library)"
    want = "none" if expected is None else f"{expected!r} ({expected_format})"
    return (f"{where} has backing file {image.backing_file!r} ({image.backing_format}){outside}; the plan "
            f"expects {want}; diskhooks refuses images with unexpected backing files")


def _in_allowed_dirs(name: str) -> bool:
    """Whether a backing file name read from a header lies in the VM directory or the image library
    once ``..`` is resolved (for the message only: any unexpected backing file is refused)."""
    clean = posixpath.normpath(name)
    return name.startswith("/") and clean.startswith((K.LAUNCHER_VM_DIR + "/",
                                                      K.LAUNCHER_IMAGE_LIBRARY + "/"))


def _persist_actions(pr: PersistRoot, obs: PersistObservation, plan: Plan,
                     vmi_uid: str) -> list[Action]:
    vol = pr.volume
    if not obs.vm_dir_mounted:
        return [Refuse(vol, f"the VM directory {K.LAUNCHER_VM_DIR} is not mounted in the "
                       f"{K.PREPARE_CONTAINER} init container: check that the pod has the hostPath volume "
                       f"{K.POD_VOLUME_VM_DIR!r} (path {plan.host_dir}) and its mount")]
    image_dir = f"{K.LAUNCHER_IMAGE_VOLUMES}/disk_{pr.volume_index}"
    base = obs.base
    if not base.mounted:
        return [Refuse(vol, f"the containerDisk {pr.image} is not visible at {image_dir}: a persistent "
                       "root needs KubeVirt's ImageVolume mode (the containerDisk as a pod 'image' "
                       f"volume named {vol!r}) and the diskhooks Pod mutation's read-only mount of it")]
    if base.problem is not None:
        return [Refuse(vol, f"the containerDisk {pr.image} at {image_dir}/disk: {base.problem}")]
    assert base.sha256 is not None and base.format is not None and base.virtual_size is not None
    node_overlay = f"{plan.host_dir}/{pr.file}"
    node_marker = f"{plan.host_dir}/{pr.marker}"
    fresh = marker_record(image=pr.image, sha256=base.sha256, fmt=base.format,
                          virtual_size=base.virtual_size, vmi_uid=vmi_uid, overlay=pr.file)
    marker = obs.marker
    if marker.kind == "invalid" and obs.overlay.kind != "missing":
        return [Refuse(vol, f"the base record {pr.marker_path} (node file {node_marker}) {marker.detail}; "
                       "without it diskhooks cannot tell which base image the overlay's writes were made "
                       f"on. To discard those writes, delete {node_overlay} and {node_marker} on the node")]
    overlay = obs.overlay
    if overlay.kind == "missing":
        if not marker.replaceable:
            return [Refuse(vol, f"the base record {pr.marker_path} (node file {node_marker}) "
                           f"{marker.detail}; remove it on the node")]
        # first start (or the overlay was deleted to discard its writes): record the base first, so
        # an overlay never exists without its record
        return [WriteMarker(vol, pr.marker_path, fresh),
                CreateImage(vol, pr.launcher_path, qcow2.round_to_sector(base.virtual_size),
                            backing=pr.base_path, backing_format=base.format)]
    where = f"the persistent root overlay {pr.launcher_path} (node file {node_overlay})"
    problem = _image_problem(overlay, where)
    if problem is not None:
        return [Refuse(vol, problem)]
    if marker.kind == "missing":
        return [Refuse(vol, f"{where} exists but its base record {pr.marker} does not; diskhooks cannot "
                       "tell which base image its writes were made on. To discard them, delete "
                       f"{node_overlay} on the node")]
    rec = marker.record
    if rec.get("sha256") != base.sha256:
        old = rec.get("image")
        changed = ("the image reference changed from " + repr(old) + f" to {pr.image!r}"
                   if old != pr.image else f"the content behind {pr.image!r} changed")
        return [Refuse(vol, f"the base image changed: {changed} (sha256 {rec.get('sha256')} -> "
                       f"{base.sha256}). The overlay {node_overlay} holds the writes made on the old base "
                       "and is only valid on it, so it is not used. To keep them, pin the VM's "
                       "containerDisk to the digest of the old image (its disk file has sha256 "
                       f"{rec.get('sha256')}); to "
                       f"discard them, delete {node_overlay} on the node (and {node_marker})")]
    if rec.get("format") != base.format:
        return [Refuse(vol, f"the base record {pr.marker} says format {rec.get('format')!r} but the "
                       f"containerDisk is {base.format}")]
    problem = _backing_problem(overlay, where, pr.base_path, base.format)
    if problem is not None:
        return [Refuse(vol, problem)]
    assert overlay.virtual_size is not None
    if dict(rec) == fresh:  # same start again (the init container was restarted)
        return [Unchanged(vol, pr.launcher_path, overlay.virtual_size, also=(pr.marker_path,))]
    # same content (perhaps now pinned by digest): record this start and the current reference
    return [WriteMarker(vol, pr.marker_path, fresh),
            Unchanged(vol, pr.launcher_path, overlay.virtual_size)]


# ================================================================================================
# inspection (read-only I/O)
# ================================================================================================
def inspect(plan: Plan, *, prefix: str = "", binary: str = "qemu-img") -> Observed:
    """Look at every file ``plan`` involves, under ``prefix``. Never writes, never follows links."""
    disks: dict[str, DiskObservation] = {}
    library_mounted = _is_dir(prefix + K.LAUNCHER_IMAGE_LIBRARY)
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
                    content = inspect_base_content(prefix + disk.backing.launcher_path, record)
        disks[disk.name] = DiskObservation(mounted, image, library_mounted, base, record, content)
    persist = None
    if plan.persist_root is not None:
        persist = _inspect_persist(plan.persist_root, prefix, binary)
    return Observed(disks=disks, persist_root=persist)


def _worth_hashing(base: FileState, fmt: str, image: FileState) -> bool:
    """Whether the base (and the image on it) can be used at all: otherwise the disk is refused
    anyway and reading many GiB of base would be for nothing."""
    if image.kind not in ("missing", "qcow2") or base.kind != fmt:
        return False
    return base.kind == "raw" or (base.backing_file is None and base.data_file is None
                                  and not base.encrypted and not base.unknown_features)


def inspect_base_content(path: str, record: MarkerState) -> BaseContent:
    """The library base's identity and content hash. When its identity is the one ``record``
    holds, the recorded SHA-256 is taken as it is (nothing is read); otherwise every byte is
    hashed, streaming through one fixed buffer (bounded memory whatever the size), and the file
    must keep its identity while it is read."""
    try:
        fd = _open_regular(path)
    except _NotUsable as exc:
        return BaseContent(problem=exc.detail or exc.kind)
    try:
        before = baserecord.identity_of(os.fstat(fd))
        if record.kind == "ok" and record.record.get("identity") == before:
            return BaseContent(before, str(record.record["sha256"]), hashed=False)
        digest = hash_fd(fd)
        after = baserecord.identity_of(os.fstat(fd))
    except OSError as exc:
        return BaseContent(problem=f"cannot be read: {exc.strerror or exc}")
    finally:
        os.close(fd)
    if after != before:
        return BaseContent(problem="changed while prepare was reading it ("
                           f"{baserecord.identity_changes(before, after)}); is it being replaced? "
                           "Restart the VM once the image library is settled")
    return BaseContent(before, digest, hashed=True)


def hash_fd(fd: int, *, head: bytes = b"") -> str:
    """SHA-256 of ``head`` followed by everything from ``fd``'s offset to its end, read through
    one ``HASH_CHUNK`` buffer (memory stays bounded for a base of any size)."""
    digest = hashlib.sha256(head)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        pass
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    while n := os.readv(fd, [buf]):
        digest.update(view[:n])
    return digest.hexdigest()


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
    """Classify the file at ``path``: its first bytes decide whether qemu-img is called at all."""
    try:
        fd = _open_regular(path)
    except _NotUsable as exc:
        return FileState(exc.kind, exc.detail)
    try:
        size = os.fstat(fd).st_size
        head = os.read(fd, qcow2.HEADER_READ_BYTES)
    except OSError as exc:
        return FileState("unreadable", exc.strerror or str(exc))
    finally:
        os.close(fd)
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
        info = qemuimg.info(path, fmt="qcow2", binary=binary)
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
    base = inspect_container_disk(prefix + f"{K.LAUNCHER_IMAGE_VOLUMES}/disk_{pr.volume_index}",
                                  binary=binary)
    overlay = inspect_image(prefix + pr.launcher_path, binary=binary)
    return PersistObservation(True, base, overlay, read_marker(prefix + pr.marker_path))


def inspect_container_disk(image_dir: str, *, binary: str = "qemu-img") -> BaseObservation:
    """The single file in ``<image_dir>/disk/``: format by magic, virtual size, sha256 of all of it."""
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
        size = os.fstat(fd).st_size
        head = os.read(fd, qcow2.HEADER_READ_BYTES)
        sha256 = hash_fd(fd, head=head)
    except OSError as exc:
        return BaseObservation(True, f"{name} cannot be read: {exc.strerror}")
    finally:
        os.close(fd)
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
        info = qemuimg.info(f"{disk_dir}/{name}", fmt=fmt, binary=binary)
    except qemuimg.QemuImgError as exc:
        return BaseObservation(True, f"{name}: {exc.reason}")
    return BaseObservation(True, None, name, fmt, info.virtual_size, sha256)


def read_marker(path: str) -> MarkerState:
    """The persistent root's base record, validated."""
    state = _load_record(path)
    if state.kind != "ok":
        return state
    problem = baserecord.persist_record_problem(state.record)
    return state if problem is None else MarkerState("invalid", problem)


def read_base_record(path: str) -> MarkerState:
    """A library-backed disk's base record (``<disk>.base.json``), validated."""
    state = _load_record(path)
    if state.kind != "ok":
        return state
    problem = baserecord.record_problem(state.record)
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


# ================================================================================================
# execution (writes)
# ================================================================================================
class ApplyError(Exception):
    def __init__(self, volume: str, reason: str) -> None:
        self.volume, self.reason = volume, reason
        super().__init__(f"volume {volume}: {reason}")


def apply(actions: Sequence[Action], *, prefix: str = "", owner: tuple[int, int] | None = None,
          binary: str = "qemu-img", report: Any = None) -> list[dict[str, Any]]:
    """Carry out ``actions`` (none may be a :class:`Refuse`). Returns one summary per volume.

    ``owner`` (uid, gid) is given to every file written. ``report`` (optional callable) gets each
    summary as soon as its volume is done. Raises :class:`ApplyError` on the first failure, after
    removing what that step half-made.
    """
    if any(isinstance(a, Refuse) for a in actions):
        raise ValueError("refused actions cannot be applied")
    summaries: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    last = {a.volume: i for i, a in enumerate(actions)}
    for i, action in enumerate(actions):
        vol = action.volume
        if vol not in summaries:
            order.append(vol)
            summaries[vol] = {"volume": vol}
        summary = summaries[vol]
        try:
            if isinstance(action, CreateImage):
                _create(action, prefix=prefix, owner=owner, binary=binary)
                summary.update(result="created", path=action.path, virtualSize=action.size)
                if action.backing is not None:
                    summary.update(backing=action.backing, backingFormat=action.backing_format)
            elif isinstance(action, GrowImage):
                remove_stale_tmp(prefix + action.path)
                _note_ownership(summary, action.path, hand_to_qemu(prefix + action.path, owner, action.path))
                backing = None if action.backing_here is None else \
                    (prefix + action.backing_here[0], action.backing_here[1])
                qemuimg.resize(prefix + action.path, size=action.size, backing=backing, binary=binary)
                _fsync_file(prefix + action.path)
                summary.update(result="grown", path=action.path, fromSize=action.from_size,
                               virtualSize=action.size)
            elif isinstance(action, Unchanged):
                remove_stale_tmp(prefix + action.path)
                _note_ownership(summary, action.path, hand_to_qemu(prefix + action.path, owner, action.path))
                for extra in action.also:
                    remove_stale_tmp(prefix + extra)
                    _note_ownership(summary, extra, hand_to_qemu(prefix + extra, owner, extra))
                summary.setdefault("result", "unchanged")
                summary.update(path=action.path, virtualSize=action.virtual_size)
                if action.planned_size is not None:
                    summary.update(plannedSize=action.planned_size)
                    _warn(summary, larger_than_planned(action))
            elif isinstance(action, WriteMarker):
                _write_json(prefix + action.path, action.record, owner=owner)
                summary.update(baseSha256=action.record["sha256"], baseFormat=action.record["format"])
            elif isinstance(action, WriteBaseRecord):
                _write_json(prefix + action.path, action.record, owner=owner)
                summary.update(baseRecord={"new": "written", "identity": "identity-updated",
                                           "adopted": "adopted"}[action.why],
                               baseSha256=action.record["sha256"], baseHashed=action.hashed)
                if action.warning is not None:
                    _warn(summary, action.warning)
            elif isinstance(action, KeepBaseRecord):
                remove_stale_tmp(prefix + action.path)
                _note_ownership(summary, action.path, hand_to_qemu(prefix + action.path, owner, action.path))
                summary.update(baseRecord="kept", baseSha256=action.sha256, baseHashed=action.hashed)
        except qemuimg.QemuImgError as exc:
            raise ApplyError(vol, exc.reason) from None
        except HandoverError as exc:
            raise ApplyError(vol, str(exc)) from None
        except OSError as exc:
            shown = vol if isinstance(action, Refuse) else action.path
            raise ApplyError(vol, f"{shown}: {exc.strerror or exc}") from None
        if report is not None and last[vol] == i:
            report(summary)
    return [summaries[v] for v in order]


def _warn(summary: dict[str, Any], text: str) -> None:
    """Add ``text`` to the log line's ``warning`` (several are joined with "; ")."""
    summary["warning"] = f"{summary['warning']}; {text}" if "warning" in summary else text


def larger_than_planned(action: Unchanged) -> str:
    """The log line's words for an image kept although it is larger than planned."""
    return (f"{action.path} is larger than planned ({action.virtual_size} bytes, planned "
            f"{action.planned_size}): kept as it is, since diskhooks never shrinks an image; the guest "
            f"sees {action.virtual_size} bytes")


def _tmp_name(final: str) -> str:
    head, name = os.path.split(final)
    return f"{head}/.{name}{_TMP_INFIX}{secrets.token_hex(8)}"


def remove_stale_tmp(final: str) -> None:
    """Remove temporary files a killed earlier run left beside ``final`` (only our own names),
    including one still linked to ``final`` (killed between publishing and unlinking)."""
    head, name = os.path.split(final)
    pattern = re.compile(r"^\." + re.escape(name) + re.escape(_TMP_INFIX) + r"[0-9a-f]{16}$")
    try:
        entries = os.listdir(head)
    except OSError:
        return
    for entry in entries:
        if pattern.match(entry):
            path = f"{head}/{entry}"
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass


def _create(action: CreateImage, *, prefix: str, owner: tuple[int, int] | None, binary: str) -> None:
    final = prefix + action.path
    remove_stale_tmp(final)
    tmp = _tmp_name(final)
    try:
        qemuimg.create(tmp, size=action.size, backing=action.backing,
                       backing_format=action.backing_format, binary=binary)
        _seal_new_file(tmp, owner, action.path)
        _publish(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(os.path.dirname(final))


class HandoverError(Exception):
    """A file that cannot be given to qemu; ``path`` is the launcher path shown to the user."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def hand_to_qemu(path: str, owner: tuple[int, int] | None, shown: str) -> str | None:
    """Make the existing file at ``path`` usable by qemu: owned by ``owner`` (when given, i.e. when
    running as root) with mode 0660. Works on an fd opened with ``O_NOFOLLOW``, so a link put in
    its place is never followed. Returns what changed (``"0:0 0600 -> 107:107 0660"``), None when
    nothing did; raises :class:`HandoverError` with the reason when it cannot be done.

    The init container has CHOWN but not FOWNER: only a file's owner may change its mode, so a file
    of another owner is first taken (chown to this process's uid), then given its mode, then given
    to qemu.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise HandoverError(shown, f"cannot be opened to give it to qemu ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HandoverError(shown, "is not a regular file")
        before = f"{st.st_uid}:{st.st_gid} {stat.S_IMODE(st.st_mode):04o}"
        want_owner = owner is None or (st.st_uid, st.st_gid) == owner
        if want_owner and stat.S_IMODE(st.st_mode) == IMAGE_MODE:
            return None
        who = "" if owner is None else f" {owner[0]}:{owner[1]}"
        try:
            if stat.S_IMODE(st.st_mode) != IMAGE_MODE:
                if st.st_uid != os.geteuid() and owner is not None:
                    os.fchown(fd, os.geteuid(), -1)
                os.fchmod(fd, IMAGE_MODE)
            if owner is not None:
                os.fchown(fd, *owner)
        except OSError as exc:
            raise HandoverError(shown, f"is {before} and cannot be given to qemu's{who} with mode "
                                f"{IMAGE_MODE:04o} ({exc.strerror}), so qemu could not open it; the "
                                f"{K.PREPARE_CONTAINER} init container needs the CHOWN capability, or "
                                "fix the file's owner and mode on the node") from None
        st = os.fstat(fd)
        after = f"{st.st_uid}:{st.st_gid} {stat.S_IMODE(st.st_mode):04o}"
        if stat.S_IMODE(st.st_mode) != IMAGE_MODE or (owner is not None and (st.st_uid, st.st_gid) != owner):
            raise HandoverError(shown, f"is still {after} after giving it to qemu's{who} with mode "
                                f"{IMAGE_MODE:04o} (does the filesystem ignore chown/chmod?), so qemu "
                                "could not open it")
        return f"{before} -> {after}"
    finally:
        os.close(fd)


def _note_ownership(summary: dict[str, Any], path: str, change: str | None) -> None:
    if change is not None:
        summary.setdefault("ownership", {})[path] = change


def _seal_new_file(path: str, owner: tuple[int, int] | None, shown: str) -> None:
    """Give the file qemu-img just made at ``path`` mode 0660 and ``owner``, and flush it, all
    through one fd opened with ``O_NOFOLLOW``: a link put in its place is never followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, "was replaced by a symbolic link while prepare was creating it; "
                          "not followed, not used", shown) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "was replaced by something other than a regular file while "
                          "prepare was creating it; not used", shown)
        os.fchmod(fd, IMAGE_MODE)
        if owner is not None:
            try:
                os.fchown(fd, *owner)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot give it to qemu's {owner[0]}:{owner[1]} "
                              f"({exc.strerror}); the init container needs the CHOWN capability",
                              shown) from None
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: str, final: str) -> None:
    """Give ``tmp`` the name ``final`` atomically, never replacing a file that appeared meanwhile."""
    try:
        os.link(tmp, final, follow_symlinks=False)
    except FileExistsError:
        raise OSError(errno.EEXIST, "appeared while prepare was creating it; not replaced",
                      final) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(final):  # a filesystem without hard links: rename after a check
            raise OSError(errno.EEXIST, "appeared while prepare was creating it; not replaced",
                          final) from None
        os.rename(tmp, final)
        return
    os.unlink(tmp)


def _write_json(final: str, record: Mapping[str, Any], *, owner: tuple[int, int] | None) -> None:
    data = (json.dumps(record, sort_keys=True, indent=1) + "\n").encode()
    remove_stale_tmp(final)
    tmp = _tmp_name(final)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     IMAGE_MODE)
        try:
            os.fchmod(fd, IMAGE_MODE)
            if owner is not None:
                try:
                    os.fchown(fd, *owner)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot give it to qemu's {owner[0]}:{owner[1]} "
                                  f"({exc.strerror}); the init container needs the CHOWN capability",
                                  final) from None
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(os.path.dirname(final))


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ================================================================================================
# command line
# ================================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diskhooks-sidecar prepare",
        description="Create and grow the qcow2 images a diskhooks plan needs (the diskhooks-prepare "
                    "init container). Exit 0 done, 1 refused, 2 unreadable plan.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan-from-env", action="store_true",
                     help=f"read the plan from ${K.ENV_PLAN} (the VMI uid from ${K.ENV_VMI_UID})")
    src.add_argument("--plan", metavar="FILE", help="read the plan from FILE")
    p.add_argument("--path-prefix", metavar="DIR", default="",
                   help="prefix every path opened (tests, local demo); headers keep launcher paths")
    return p


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    try:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_MALFORMED
    try:
        text = _read_plan_text(args, env)
        plan = parse_plan(text)
        prefix = _prefix(args.path_prefix)
        vmi_uid = _vmi_uid(env, required=plan.persist_root is not None)
    except Malformed as exc:
        _err(str(exc))
        return EXIT_MALFORMED

    observed = inspect(plan, prefix=prefix)
    actions = plan_actions(plan, observed, vmi_uid=vmi_uid)
    refusals = [a for a in actions if isinstance(a, Refuse)]
    if refusals:
        for r in refusals:
            _err(f"volume {r.volume}: {r.reason}")
        _err(f"nothing was changed ({len(refusals)} problem(s)); the VM does not start until they are "
             "fixed")
        return EXIT_REFUSED
    owner = (K.QEMU_UID, K.QEMU_GID) if os.geteuid() == 0 else None
    try:
        apply(actions, prefix=prefix, owner=owner,
              report=lambda s: print(json.dumps(s, sort_keys=True), flush=True))
    except ApplyError as exc:
        _err(str(exc))
        return EXIT_REFUSED
    return EXIT_OK


def _read_plan_text(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    if args.plan_from_env:
        text = env.get(K.ENV_PLAN)
        if not text:
            raise Malformed(K.ENV_PLAN, "is not set or empty: the diskhooks Pod mutation sets it to the "
                            "plan")
        return text
    try:
        with open(args.plan, "rb") as fh:
            data = fh.read(MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise Malformed("--plan", f"cannot read {args.plan}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("--plan", f"{args.plan} is not UTF-8") from None


def _prefix(value: str) -> str:
    if not value:
        return ""
    path = os.path.abspath(value)
    if not os.path.isdir(path):
        raise Malformed("--path-prefix", f"{value} is not a directory")
    return path.rstrip("/")


def _vmi_uid(env: Mapping[str, str], *, required: bool) -> str | None:
    uid = env.get(K.ENV_VMI_UID, "")
    if not uid:
        if required:
            raise Malformed(K.ENV_VMI_UID, "is not set: a persistent root records the VMI it was "
                            "prepared for (the Pod mutation sets it from the pod label "
                            f"{K.LABEL_CREATED_BY})")
        return None
    if not _VMI_UID.match(uid):
        raise Malformed(K.ENV_VMI_UID, f"{uid[:80]!r} is not a VMI uid")
    return uid


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
