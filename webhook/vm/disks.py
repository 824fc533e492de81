"""Disks: the requests of ``diskhooks.io/disks``, ``diskhooks.io/passthrough`` and
``diskhooks.io/persist-root`` -> the VMI spec's volumes and disks.

Pure except for the ``cluster`` argument (PVC lookups for passthrough). Per disk a ``hostDisk``
volume ``<root>/<ns>/<vm>/<disk>.qcow2`` (``DiskOrCreate``, capacity = the size) and a disk with its
bus/serial/bootOrder (:func:`desired_devices`); per passthrough entry a PVC volume and a ``disk``
(virtio) or ``lun`` (scsi) after checking the claim (exists, Block mode, allowed StorageClass).
:func:`rebuild` puts them in place of the webhook's previous ones, in the same positions, so a second
call on its own output changes nothing. A volume is diskhooks' own only by its exact node path, or as
a passthrough named in a plan that verifies (:func:`own_volume_test`); every other volume is the
user's, and a user's hostDisk may not reach into diskhooks' directories (:func:`check_user_volumes`).
Boot orders may not collide (:func:`check_boot_orders`); persist-root keeps the writes of a
containerDisk boot disk (:func:`persist_root_of`).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping
from typing import Any

from diskplan import keys as K
from diskplan.annotations import PassthroughRequest, Requests, quantity_text
from diskplan.errors import Refused
from diskplan.plan import DNS_LABEL, PersistRoot, Plan
from diskplan.policy import Policy
from diskplan.quantity import parse_bytes
from webhook.cluster import Cluster, ClusterError
from webhook.sizing import child_dict
from webhook.vm.shape import Target, as_map, list_at


def own_volume_test(host_dir: str, plans: tuple[Plan | None, ...]) -> Callable[[Mapping[str, Any]], bool]:
    """Whether a volume is diskhooks' own (rebuilt here, never checked as the user's): a hostDisk at
    exactly its node path in ``host_dir`` or in the directory of one of ``plans`` (plans that
    verify), or a PVC volume that one of them names as a passthrough with that claim."""
    known_dirs = {host_dir} | {p.host_dir for p in plans if p is not None}
    # both plans count: a reinvocation of an UPDATE that changed a passthrough's claim carries the
    # new claim in the current plan and the old one in the previous plan
    pass_claims: dict[str, set[str]] = {}
    for plan in plans:
        for p in plan.passthrough if plan is not None else ():
            pass_claims.setdefault(p.name, set()).add(p.claim)

    def ours(volume: Mapping[str, Any]) -> bool:
        vname = volume.get("name")
        if "hostDisk" in volume:
            return any(is_own_disk(volume, d) for d in known_dirs)
        pvc = volume.get("persistentVolumeClaim")
        return isinstance(pvc, Mapping) and isinstance(vname, str) \
            and isinstance(pvc.get("claimName"), str) and pvc["claimName"] in pass_claims.get(vname, ())
    return ours


def is_own_disk(volume: Any, vm_dir: str) -> bool:
    """A hostDisk volume at exactly ``<vm_dir>/<its name>.qcow2``: a diskhooks disk."""
    if not vm_dir or not isinstance(volume, Mapping):
        return False
    hd, name = volume.get("hostDisk"), volume.get("name")
    return isinstance(hd, Mapping) and isinstance(name, str) \
        and hd.get("path") == f"{vm_dir}/{K.disk_file_name(name)}"


def desired_devices(requests: Requests, *, namespace: str, host_dir: str, t: Target, policy: Policy,
                    cluster: Cluster, ours: Any) -> tuple[dict[str, dict[str, Any]],
                                                          dict[str, dict[str, Any]]]:
    volumes: dict[str, dict[str, Any]] = {}
    disks: dict[str, dict[str, Any]] = {}
    for d in requests.disks:
        volumes[d.name] = {"name": d.name, "hostDisk": {
            "path": f"{host_dir}/{K.disk_file_name(d.name)}", "type": "DiskOrCreate",
            "capacity": quantity_text(d.size_bytes)}}
        disk: dict[str, Any] = {"name": d.name, "disk": {"bus": d.bus}}
        if d.serial is not None:
            disk["serial"] = d.serial
        if d.boot_order is not None:
            disk["bootOrder"] = d.boot_order
        disks[d.name] = disk
    user_claims = {}
    user_volumes = list_at(t.spec, "volumes", t.spec_path)
    for j, v in enumerate(user_volumes):
        pvc = v.get("persistentVolumeClaim") if isinstance(v, Mapping) else None
        if isinstance(pvc, Mapping) and isinstance(pvc.get("claimName"), str) and not ours(v):
            user_claims[pvc["claimName"]] = j
    for p in requests.passthrough:
        _check_claim(p, namespace=namespace, policy=policy, cluster=cluster)
        if p.claim in user_claims:
            raise Refused(f"{p.field}.claim", f"claim {p.claim!r} is already used by volume "
                          f"{user_volumes[user_claims[p.claim]].get('name')!r} of this {t.kind}")
        volumes[p.name] = {"name": p.name, "persistentVolumeClaim": {"claimName": p.claim}}
        disks[p.name] = {"name": p.name, "lun": {"bus": "scsi"}} if p.mode == "lun" else \
            {"name": p.name, "disk": {"bus": "virtio"}}
    return volumes, disks


def _check_claim(p: PassthroughRequest, *, namespace: str, policy: Policy, cluster: Cluster) -> None:
    where = f"{p.field}.claim"
    try:
        pvc = cluster.get_pvc(namespace, p.claim)
    except ClusterError as exc:
        raise Refused(where, f"cannot check claim {p.claim!r}: {exc}") from None
    if pvc is None:
        raise Refused(where, f"PersistentVolumeClaim {p.claim!r} not found in namespace {namespace!r}")
    spec = as_map(pvc.get("spec"))
    mode = spec.get("volumeMode") or "Filesystem"
    if mode != "Block":
        raise Refused(where, f"claim {p.claim!r} has volumeMode {mode}; passthrough needs a "
                      "Block-mode claim (a whole device)")
    sc = spec.get("storageClassName")
    allowed = policy.passthrough.storage_classes
    if sc not in allowed:
        raise Refused(where, f"claim {p.claim!r} is of StorageClass {sc!r}, which the platform does "
                      f"not allow for passthrough (allowed: {', '.join(allowed)})")


def rebuild(t: Target, requests: Requests, volumes: dict[str, dict[str, Any]],
            disks: dict[str, dict[str, Any]], *, ours: Any, policy: Policy) -> dict[str, int | None]:
    """Put the desired volumes/disks in place of the webhook's previous ones (same positions),
    append new ones, drop those no longer requested. Returns the detached hostDisk names, with
    their capacities where readable."""
    field_of = {d.name: d.field for d in requests.disks} | {p.name: p.field for p in requests.passthrough}
    old_volumes = list_at(t.spec, "volumes", t.spec_path)
    new_volumes: list[Any] = []
    handled: set[str] = set()
    detached: dict[str, int | None] = {}
    placed: set[str] = set()
    for j, v in enumerate(old_volumes):
        if not isinstance(v, Mapping) or not isinstance(v.get("name"), str):
            raise Refused(f"{t.spec_path}.volumes[{j}]", "must be an object with a name")
        vname = v["name"]
        if ours(v):
            handled.add(vname)
            if vname in volumes and vname not in placed:
                new_volumes.append(volumes[vname])
                placed.add(vname)
            elif vname not in volumes and "hostDisk" in v:
                detached[vname] = _lenient_capacity(v["hostDisk"])
            continue
        if vname in volumes:
            raise Refused(f"{field_of[vname]}.name", f"{vname!r} is already the name of a volume of "
                          f"this {t.kind} ({t.spec_path}.volumes[{j}])")
        _check_user_volume(v, f"{t.spec_path}.volumes[{j}]", policy)
        new_volumes.append(v)
    new_volumes += [v for n, v in volumes.items() if n not in placed]

    domain = child_dict(t.spec, "domain", t.spec_path)
    devices = child_dict(domain, "devices", f"{t.spec_path}.domain")
    old_disks = list_at(devices, "disks", f"{t.spec_path}.domain.devices")
    new_disks: list[Any] = []
    placed = set()
    for k, d in enumerate(old_disks):
        if not isinstance(d, Mapping) or not isinstance(d.get("name"), str):
            raise Refused(f"{t.spec_path}.domain.devices.disks[{k}]", "must be an object with a name")
        dname = d["name"]
        if dname in handled:
            if dname in disks and dname not in placed:
                new_disks.append(disks[dname])
                placed.add(dname)
            continue
        if dname in disks:
            raise Refused(f"{field_of[dname]}.name", f"{dname!r} is already the name of a disk of "
                          f"this {t.kind} ({t.spec_path}.domain.devices.disks[{k}])")
        new_disks.append(d)
    new_disks += [d for n, d in disks.items() if n not in placed]
    if new_volumes or "volumes" in t.spec:
        t.spec["volumes"] = new_volumes
    if new_disks or "disks" in devices:
        devices["disks"] = new_disks
    return detached


def _lenient_capacity(hd: Any) -> int | None:
    try:
        return parse_bytes(hd.get("capacity")) if isinstance(hd, Mapping) else None
    except ValueError:
        return None


def check_user_volumes(spec: Mapping[str, Any], spec_path: str, policy: Policy, *, ours: Any,
                        extra_dirs: tuple[str, ...] = ()) -> None:
    volumes = spec.get("volumes") if isinstance(spec, Mapping) else None
    if not isinstance(volumes, list):
        return
    for j, v in enumerate(volumes):
        if isinstance(v, Mapping) and "hostDisk" in v and not ours(v):
            _check_user_volume(v, f"{spec_path}.volumes[{j}]", policy, extra_dirs)


def _check_user_volume(volume: Mapping[str, Any], where: str, policy: Policy,
                       extra_dirs: tuple[str, ...] = ()) -> None:
    """A user's own hostDisk must not reach into diskhooks' directories: KubeVirt mounts the
    *parent directory* of its path into the launcher pod, read-write."""
    hd = volume.get("hostDisk")
    if not isinstance(hd, Mapping):
        return
    path = hd.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        return  # KubeVirt itself refuses an empty path; a relative one cannot be mounted
    parent = posixpath.dirname(posixpath.normpath(path.replace("//", "/")))
    if parent.startswith("//"):
        parent = parent[1:]
    for reserved in (*policy.host_disks.reserved_dirs(), *extra_dirs):
        if parent == reserved or parent.startswith(reserved + "/") or \
                reserved.startswith(parent.rstrip("/") + "/"):
            raise Refused(f"{where}.hostDisk.path", f"{path[:200]!r}: KubeVirt would mount {parent} "
                          f"into the VM's pod, which reaches into {reserved}, where only diskhooks "
                          f"places disks; ask for a disk with {K.ANN_DISKS} instead")


def check_boot_orders(t: Target, requests: Requests) -> None:
    ours = {d.name: d for d in requests.disks if d.boot_order is not None}
    if not ours:
        return
    devices = t.spec["domain"]["devices"]
    taken: dict[int, str] = {}
    for kind in ("disks", "interfaces"):
        for k, item in enumerate(list_at(devices, kind, f"{t.spec_path}.domain.devices")):
            if not isinstance(item, Mapping):
                continue
            name = item.get("name")
            if not (isinstance(name, str) and name in ours) and isinstance(item.get("bootOrder"), int):
                taken[item["bootOrder"]] = f"{t.spec_path}.domain.devices.{kind}[{k}]"
    seen: dict[int, str] = {}
    for d in requests.disks:
        if d.boot_order is None:
            continue
        other = taken.get(d.boot_order) or seen.get(d.boot_order)
        if other:
            raise Refused(f"{d.field}.bootOrder", f"{d.boot_order} is already the boot order of {other}")
        seen[d.boot_order] = d.field


def persist_root_of(t: Target) -> PersistRoot:
    disks = t.spec["domain"]["devices"].get("disks") or []
    if not disks:
        raise Refused(K.ANN_PERSIST_ROOT, f"the {t.kind} has no disks, so there is no root disk to keep")
    ordered = [d for d in disks if isinstance(d.get("bootOrder"), int)]
    boot = min(ordered, key=lambda d: d["bootOrder"]) if ordered else disks[0]
    volumes = t.spec.get("volumes") or []
    index = next((i for i, v in enumerate(volumes) if v.get("name") == boot.get("name")), None)
    kind = next((k for k in ("cdrom", "lun") if k in boot), None)
    cd = volumes[index].get("containerDisk") if index is not None else None
    if index is None or kind is not None or not isinstance(cd, Mapping) \
            or not isinstance(cd.get("image"), str):
        what = f"a {kind}" if kind else "not a containerDisk" if index is not None else "without a volume"
        raise Refused(K.ANN_PERSIST_ROOT, f"the boot disk {boot.get('name')!r} is {what}; persist-root "
                      "keeps the writes of a containerDisk root disk")
    if not DNS_LABEL.match(boot["name"]):  # the overlay's file is named after the volume
        raise Refused(K.ANN_PERSIST_ROOT, f"the boot disk {boot['name'][:80]!r} is not a DNS label "
                      "(lowercase letters, digits and '-'); persist-root names the overlay after it")
    # The Pod mutation mounts the VM's host directory for the overlay; no extra volume is added
    # here, because a VMI volume without a disk would become one more guest disk.
    return PersistRoot(volume=boot["name"], image=cd["image"], volume_index=index)
