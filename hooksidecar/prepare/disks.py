"""A hostDisk volume's actions (pure): its qcow2 image and, for a disk with ``backing``, the
library base and the base record (``<disk>.base.json``, see :mod:`diskplan.baserecord`).

A missing image is created (on its base when it has one), a smaller one grown, a larger one kept as
it is (never shrunk; the summary line carries a ``warning``). A library-backed disk's base record
comes first, so an overlay never exists without it; a base whose SHA-256 differs from the one
recorded when its overlay was made is refused.
"""

from __future__ import annotations

from diskplan import baserecord, qcow2
from diskplan import keys as K
from diskplan.plan import Plan, PlannedDisk
from hooksidecar.prepare.actions import (
    Action,
    CreateImage,
    GrowImage,
    KeepBaseRecord,
    Refuse,
    Unchanged,
    WriteBaseRecord,
)
from hooksidecar.prepare.observe import DiskObservation, FileState
from hooksidecar.prepare.problems import backing_problem, image_problem


def disk_actions(disk: PlannedDisk, obs: DiskObservation, plan: Plan) -> list[Action]:
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
    problem = image_problem(image, where)
    if problem is None:
        problem = backing_problem(image, where, disk.backing.launcher_path if disk.backing else None,
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
        return image_problem(base, where) or f"{where} cannot be used"
    if base.kind != b.format:
        return (f"{where} is {base.kind}, but the plan says {b.format}; diskhooks never opens an "
                "image as a format it is not")
    if base.kind == "qcow2":
        if base.backing_file is not None:
            return (f"{where} has a backing file {base.backing_file!r} itself; library bases must be "
                    "self-contained")
        if base.data_file is not None or base.encrypted or base.unknown_features:
            return image_problem(base, where) or f"{where} cannot be used"
    size = base.virtual_size if base.kind == "qcow2" else base.file_size
    if size is not None and size > final:
        return (f"disk {disk.name!r} is planned at {disk.size_bytes} bytes, smaller than its base "
                f"{b.image} ({size} bytes); ask for at least {size} bytes")
    return None
