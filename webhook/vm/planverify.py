"""The signed plan (``diskhooks.io/plan``): which plan is trusted, what an UPDATE replaces, writing it,
and verifying a VMI made from a VM template against it.

Pure. A plan is trusted only when it verifies under the platform's plan keys for this namespace and
VM (:func:`verified_plan`); a forged, copied or stale one is never trusted, only replaced. An
UPDATE's old object yields a :class:`Previous` (:func:`read_previous`): the disk sizes it held and its
verified plan, for the update rules (``webhook/vm/updates.py``). :func:`set_plan` writes the plan and
the launcher Pod's label; :func:`verify_vmi` checks that a VMI carrying a plan (made by
virt-controller from a VM template) has the plan's volumes, hook sidecar and label, and mutates
nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diskplan import keys as K
from diskplan.annotations import DiskRequest, Requests
from diskplan.errors import Malformed, Refused
from diskplan.plan import Backing, Passthrough, Plan, PlanKeys, PlannedDisk, verify_plan
from diskplan.policy import Policy
from diskplan.quantity import parse_bytes
from diskplan.yamlsafe import load_document
from webhook.mutation import Mutation
from webhook.sizing import child_dict, sizing_view
from webhook.vm.disks import check_user_volumes
from webhook.vm.shape import Target, as_map, as_seq, json_copy
from webhook.vm.sidecars import SIDECARS, check_entry, read_sidecars


def verified_plan(meta: Mapping[str, Any], *, namespace: str, name: str,
                  plan_keys: PlanKeys) -> Plan | None:
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    text = annotations.get(K.ANN_PLAN) if isinstance(annotations, Mapping) else None
    if not isinstance(text, str) or not name:
        return None
    try:
        return verify_plan(text, plan_keys, namespace=namespace, vm=name)
    except (Refused, Malformed):
        return None  # not ours (forged, copied, stale key): it is replaced, never trusted


@dataclass
class Previous:
    """What an UPDATE replaces: disk sizes and the plan of the old object, for growth checks.
    ``detached``: disks removed earlier whose images stay on the node, with their largest size.
    ``planned``: the disks of the plans that verify (the only source of new detached records:
    sizes in the user's annotation or template volumes are never recorded)."""

    sizes: dict[str, int] = field(default_factory=dict)
    disks: set[str] = field(default_factory=set)
    plan: Plan | None = None
    sizing: tuple[Any, ...] | None = None
    detached: dict[str, int] = field(default_factory=dict)
    planned: dict[str, int] = field(default_factory=dict)  # disks of plans that verify, only

    def remember(self, plan: Plan | None) -> None:
        """Add the disks and detached disks of a plan that verifies, each at its largest size."""
        if plan is not None:
            for d in plan.disks:
                self.sizes[d.name] = max(self.sizes.get(d.name, 0), d.size_bytes)
                self.disks.add(d.name)
                self.planned[d.name] = max(self.planned.get(d.name, 0), d.size_bytes)
            for x in plan.detached:
                self.detached[x.name] = max(self.detached.get(x.name, 0), x.size_bytes)


def read_previous(old_obj: Mapping[str, Any] | None, *, namespace: str, name: str,
                  plan_keys: PlanKeys) -> Previous:
    prev = Previous()
    if not isinstance(old_obj, Mapping):
        return prev
    template = as_map(as_map(old_obj.get("spec")).get("template"))
    tmeta = as_map(template.get("metadata"))
    prev.plan = verified_plan(tmeta, namespace=namespace, name=name, plan_keys=plan_keys)
    if prev.plan is not None:
        for d in prev.plan.disks:
            prev.sizes[d.name] = d.size_bytes
            prev.disks.add(d.name)
    annotations = as_map(as_map(old_obj.get("metadata")).get("annotations"))
    for disk_name, size in _lenient_sizes(annotations.get(K.ANN_DISKS)).items():
        prev.sizes[disk_name] = max(prev.sizes.get(disk_name, 0), size)
        prev.disks.add(disk_name)
    tspec = template.get("spec")
    if isinstance(tspec, Mapping):
        prev.sizing = sizing_view(tspec)
    return prev


def _lenient_sizes(value: Any) -> dict[str, int]:
    """Disk sizes from an old annotation, ignoring whatever cannot be read (it was admitted once)."""
    if not isinstance(value, str):
        return {}
    try:
        items = load_document(value, field=K.ANN_DISKS)
    except Refused:
        return {}
    out: dict[str, int] = {}
    for item in items if isinstance(items, list) else []:
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            try:
                out[item["name"]] = parse_bytes(item.get("size"))
            except ValueError:
                continue
    return out


def planned_disk(d: DiskRequest) -> PlannedDisk:
    backing = None if d.backing is None else Backing(image=d.backing, file=f"{d.backing}.qcow2",
                                                     format="qcow2")
    return PlannedDisk(name=d.name, size_bytes=d.size_bytes, bus=d.bus, cache=d.cache, io=d.io,
                       discard=d.discard, backing=backing, serial=d.serial, boot_order=d.boot_order)


def planned_passthrough(requests: Requests) -> tuple[Passthrough, ...]:
    return tuple(Passthrough(name=p.name, claim=p.claim, mode=p.mode) for p in requests.passthrough)


def set_plan(t: Target, text: str | None, *, label: bool = False) -> None:
    """Write (or, for None, remove) the plan, and the label selecting the launcher Pod when
    ``label`` (the plan gives the launcher something to do)."""
    annotations = t.plan_meta.get("annotations")
    labels = t.plan_meta.get("labels")
    gone = [("labels", labels, K.LABEL_MANAGED)] if not label else []
    if text is None:
        gone.append(("annotations", annotations, K.ANN_PLAN))
    for name, bag, key in gone:
        if isinstance(bag, dict) and key in bag:
            del bag[key]
            if not bag:  # emptied here: drop it (an empty bag the user wrote stays)
                del t.plan_meta[name]
    if text is not None:
        child_dict(t.plan_meta, "annotations", t.meta_path)[K.ANN_PLAN] = text
    if label:
        child_dict(t.plan_meta, "labels", t.meta_path)[K.LABEL_MANAGED] = K.LABEL_MANAGED_VALUE


def verify_vmi(obj: Mapping[str, Any], meta: Mapping[str, Any], spec: Mapping[str, Any], *,
               namespace: str, policy: Policy, plan_keys: PlanKeys) -> Mutation:
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise Refused("metadata.name", "a VirtualMachineInstance with a diskhooks plan needs a name")
    text = meta["annotations"][K.ANN_PLAN]
    if not isinstance(text, str):
        raise Refused(f"metadata.annotations[{K.ANN_PLAN}]", "must be a string")
    field_path = f"metadata.annotations[{K.ANN_PLAN}]"
    try:
        plan = verify_plan(text, plan_keys, namespace=namespace, vm=name, field_path=field_path)
    except Malformed as exc:
        raise Refused(exc.field, exc.reason) from None
    volumes = as_seq(spec.get("volumes"))
    by_name = {v["name"]: (j, v) for j, v in enumerate(volumes)
               if isinstance(v, Mapping) and isinstance(v.get("name"), str)}
    mismatch = f"does not match its diskhooks plan ({field_path})"
    for d in plan.disks:
        j, v = by_name.get(d.name, (None, {}))
        hd = v.get("hostDisk")
        if not isinstance(hd, Mapping) or hd.get("path") != f"{plan.host_dir}/{d.file}" \
                or hd.get("type") != "DiskOrCreate":
            where = f"spec.volumes[{j}]" if j is not None else "spec.volumes"
            raise Refused(where, f"the volume of disk {d.name!r} {mismatch}")
    for p in plan.passthrough:
        j, v = by_name.get(p.name, (None, {}))
        pvc = v.get("persistentVolumeClaim")
        if not isinstance(pvc, Mapping) or pvc.get("claimName") != p.claim:
            raise Refused("spec.volumes", f"the passthrough volume {p.name!r} {mismatch}")
    if plan.persist_root is not None:
        pr = plan.persist_root
        v = as_map(volumes[pr.volume_index]) if pr.volume_index < len(volumes) else {}
        cd = v.get("containerDisk")
        if v.get("name") != pr.volume or not isinstance(cd, Mapping) or cd.get("image") != pr.image:
            raise Refused(f"spec.volumes[{pr.volume_index}]", f"the persistent root volume {mismatch}")
    planned = {d.name for d in plan.disks}
    check_user_volumes(spec, "spec", policy, ours=lambda v: isinstance(v.get("name"), str)
                       and v["name"] in planned,
                       extra_dirs=(plan.host_dir,))
    entries = read_sidecars(meta.get("annotations"), f"metadata.{SIDECARS}") or []
    found = False
    for i, e in enumerate(entries):
        if check_entry(e, f"metadata.{SIDECARS}[{i}]", policy, own_image=plan.sidecar_image):
            found = True
    if not found and plan.needs_launcher:
        raise Refused(f"metadata.{SIDECARS}", f"the diskhooks sidecar {plan.sidecar_image} is missing; "
                      "without it the VM's qcow2 disks would reach the guest as raw data")
    labels = meta.get("labels")
    labelled = isinstance(labels, Mapping) and labels.get(K.LABEL_MANAGED) == K.LABEL_MANAGED_VALUE
    if labelled == plan.needs_launcher and (labelled or not isinstance(labels, Mapping)
                                            or K.LABEL_MANAGED not in labels):
        return Mutation(dict(obj))
    new = json_copy(obj)
    if plan.needs_launcher:  # the launcher pod needs the label to be prepared
        child_dict(new["metadata"], "labels", "metadata")[K.LABEL_MANAGED] = K.LABEL_MANAGED_VALUE
    else:  # a plan that only remembers detached disks: nothing for the launcher pod
        del new["metadata"]["labels"][K.LABEL_MANAGED]
    return Mutation(new)
