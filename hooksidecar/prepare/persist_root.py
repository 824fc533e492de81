"""A persistent root's actions (pure): the overlay on the containerDisk and its base record
(``persist-root.<volume>.base.json``).

First start: the base record is written, then the overlay created on the containerDisk seen through
KubeVirt's image volume. Later starts: the overlay is used only on the base it was made on (same
content, same format, same backing file); a changed base is refused with what to do about it.

"Same content" is proved by the image's digest when the VM names the containerDisk by digest
(``...@sha256:<hex>``): the runtime pulled exactly that content, so the record holds the digest and
nothing is hashed (docs/BASE-CATALOG.md). For a tag, by the SHA-256 of the disk file, hashed at
every start. A record holding only a digest cannot be compared with another image: refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diskplan import baserecord, qcow2
from diskplan import keys as K
from diskplan.plan import PersistRoot, Plan
from hooksidecar.prepare.actions import Action, CreateImage, Refuse, Unchanged, WriteMarker
from hooksidecar.prepare.observe import PersistObservation
from hooksidecar.prepare.problems import backing_problem, image_problem


def marker_record(*, image: str, sha256: str | None, fmt: str, virtual_size: int, vmi_uid: str,
                  overlay: str, image_digest: str | None = None) -> dict[str, Any]:
    """The persistent root's base record (``persist-root.<volume>.base.json``): the disk file's
    SHA-256, the image's digest, or both (None members are left out)."""
    out: dict[str, Any] = {"image": image, "format": fmt, "virtualSize": virtual_size,
                           "vmiUID": vmi_uid, "overlay": overlay}
    if sha256 is not None:
        out["sha256"] = sha256
    if image_digest is not None:
        out["imageDigest"] = image_digest
    return out


def _compare(rec: Mapping[str, Any], sha256: str | None, digest: str | None) -> tuple[bool | None, str | None]:
    """(same content?, the disk file's SHA-256 known now): by digest when both name one and they
    agree, else by the recorded and current hashes; None when the record holds nothing comparable."""
    if digest is not None and rec.get("imageDigest") == digest:
        return True, sha256 if sha256 is not None else rec.get("sha256")
    if rec.get("sha256") is not None and sha256 is not None:
        return rec.get("sha256") == sha256, sha256
    return None, sha256


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
    assert base.format is not None and base.virtual_size is not None
    digest = baserecord.image_digest(pr.image)
    node_overlay = f"{plan.host_dir}/{pr.file}"
    node_marker = f"{plan.host_dir}/{pr.marker}"
    fresh = marker_record(image=pr.image, sha256=base.sha256, fmt=base.format,
                          virtual_size=base.virtual_size, vmi_uid=vmi_uid, overlay=pr.file,
                          image_digest=digest)
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
    same, sha256 = _compare(rec, base.sha256, digest)
    if same is None:
        return [Refuse(vol, f"the base image changed: the overlay {node_overlay} was made on "
                       f"{rec.get('image')!r}, recorded by its digest {rec.get('imageDigest')}, and the "
                       f"VM now uses {pr.image!r}; a digest says nothing about another image's disk "
                       "file, so diskhooks cannot tell whether the overlay's writes fit it and does not "
                       f"use it. To keep them, pin the VM's containerDisk back to {rec.get('image')!r}; "
                       f"to discard them, delete {node_overlay} on the node (and {node_marker})")]
    if not same:
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
    fresh = marker_record(image=pr.image, sha256=sha256, fmt=base.format,
                          virtual_size=base.virtual_size, vmi_uid=vmi_uid, overlay=pr.file,
                          image_digest=digest)
    if dict(rec) == fresh:  # same start again (the init container was restarted)
        return [Unchanged(vol, pr.launcher_path, overlay.virtual_size, also=(pr.marker_path,))]
    # same content (perhaps now pinned by digest): record this start and the current reference
    return [WriteMarker(vol, pr.marker_path, fresh),
            Unchanged(vol, pr.launcher_path, overlay.virtual_size)]
