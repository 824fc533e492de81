"""A persistent root's actions (pure): the overlay on the containerDisk and its base record
(``persist-root.<volume>.base.json``).

First start: the base record is written, then the overlay created on the containerDisk seen through
KubeVirt's image volume. Later starts: the overlay is used only on the base it was made on (same
SHA-256, same format, same backing file); a changed base is refused with what to do about it.
"""

from __future__ import annotations

from typing import Any

from diskplan import keys as K
from diskplan import qcow2
from diskplan.plan import PersistRoot, Plan
from hooksidecar.prepare.actions import Action, CreateImage, Refuse, Unchanged, WriteMarker
from hooksidecar.prepare.observe import PersistObservation
from hooksidecar.prepare.problems import backing_problem, image_problem


def marker_record(*, image: str, sha256: str, fmt: str, virtual_size: int, vmi_uid: str,
                  overlay: str) -> dict[str, Any]:
    """The persistent root's base record (``persist-root.<volume>.base.json``)."""
    return {"image": image, "sha256": sha256, "format": fmt, "virtualSize": virtual_size,
            "vmiUID": vmi_uid, "overlay": overlay}


def persist_root_actions(pr: PersistRoot, obs: PersistObservation, plan: Plan,
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
    problem = image_problem(overlay, where)
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
    problem = backing_problem(overlay, where, pr.base_path, base.format)
    if problem is not None:
        return [Refuse(vol, problem)]
    assert overlay.virtual_size is not None
    if dict(rec) == fresh:  # same start again (the init container was restarted)
        return [Unchanged(vol, pr.launcher_path, overlay.virtual_size, also=(pr.marker_path,))]
    # same content (perhaps now pinned by digest): record this start and the current reference
    return [WriteMarker(vol, pr.marker_path, fresh),
            Unchanged(vol, pr.launcher_path, overlay.virtual_size)]
