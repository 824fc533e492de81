"""The VM/VMI mutation core: diskhooks annotations -> real KubeVirt spec and a signed plan.

Pure. :func:`mutate_vm` and :func:`mutate_vmi` take the admitted object (a decoded JSON dict) and
return a :class:`~webhook.mutation.Mutation` holding a new object and warnings; the input is never
modified. They do no I/O except through the ``cluster`` argument (PVC lookups for passthrough),
read no environment and keep no state. Two error families: :class:`~diskplan.errors.Refused`
(a denial naming the field: ``diskhooks.io/disks[1].size``, ``spec.template.spec.instancetype``)
and :class:`~diskplan.errors.Malformed` (the object is not a VirtualMachine/VirtualMachineInstance).

What a VM with diskhooks annotations gets, in ``spec.template`` (a bare VMI: in itself):

- per disk a ``hostDisk`` volume ``<root>/<ns>/<vm>/<disk>.qcow2`` (``DiskOrCreate``, capacity =
  the size) and a disk with its bus/serial/bootOrder; cache/io/discard/backing go only into the
  plan (the hook sidecar applies them to the domain XML);
- per passthrough entry a PVC volume and a ``disk`` (virtio) or ``lun`` (scsi) after checking the
  claim (exists, Block mode, allowed StorageClass);
- CPU topology, guest memory, requests and limits (``webhook/sizing.py``);
- the diskhooks hook sidecar, last in ``hooks.kubevirt.io/hookSidecars`` (other entries must be
  allowed by policy), the signed plan ``diskhooks.io/plan`` and the label ``diskhooks.io/managed``.

Every VM and VMI in an opted-in namespace has its requested hook sidecars checked, diskhooks or
not: an entry with diskhooks' own image is accepted only as exactly the entry the webhook writes
(``image``, ``imagePullPolicy``, ``args: [serve, --version, v1alpha3]``); on a VM such entries are
dropped and rewritten, on a VMI any other entry with a diskhooks image is refused (it would run
arbitrary code: a ``command``, other ``args``, a ``configMap`` or ``pvc`` script).

Disks removed from the annotation are detached (their images stay on the node); the plan remembers
them with their largest size (plan version 2, ``detached``), carried across UPDATEs even when every
diskhooks annotation is gone, so a disk of that name can only come back at that size or larger;
their sizes count towards ``maxTotalPerVM`` (an UPDATE may not raise the total above it).

Both limits are grandfathered when the platform lowers them: a disk may stay above ``maxDiskSize``
at no more than the size the old object's verified plan held for its name (attached, or detached
and coming back), with a warning, and a VM above ``maxTotalPerVM`` keeps every UPDATE that does not
raise its total. A CREATE, or an UPDATE whose old plan does not verify, grandfathers nothing.

The result is a function of the annotations, the policy and the user's own part of the spec: the
webhook's own volumes, disks, sidecar entry, plan and label are recognised and rebuilt, so calling
it again on its own output changes nothing (reinvocation, re-submission). A volume is recognised as
diskhooks' own only by its exact node path, or as a passthrough named in a plan that verifies; a
forged plan is never trusted, only replaced.
"""

from __future__ import annotations

import copy
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diskplan import keys as K
from diskplan.annotations import (
    DiskRequest,
    PassthroughRequest,
    Requests,
    Sizing,
    default_sizing,
    parse_requests,
    quantity_text,
    user_annotation_keys,
)
from diskplan.errors import Malformed, Refused
from diskplan.plan import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    MAX_DETACHED,
    Backing,
    DetachedDisk,
    Passthrough,
    PersistRoot,
    Plan,
    PlanKeys,
    PlannedDisk,
    sign_plan,
    verify_plan,
)
from diskplan.policy import PULL_POLICIES, Policy, image_repository
from diskplan.quantity import parse_bytes
from diskplan.yamlsafe import load_document
from webhook.cluster import Cluster, ClusterError
from webhook.mutation import Mutation
from webhook.sizing import apply_sizing, child_dict, sets_own_sizing, sizing_view

VM_KIND = "VirtualMachine"
VMI_KIND = "VirtualMachineInstance"
SIDECAR_ARGS = ("serve", "--version", K.HOOK_VERSIONS[0])
MAX_SIDECARS_BYTES = 64 * 1024
SIDECARS = f"annotations[{K.ANN_HOOK_SIDECARS}]"
PLAN_ANNOTATIONS = (K.ANN_DISKS, K.ANN_PERSIST_ROOT, K.ANN_PASSTHROUGH)  # what needs a plan


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
def mutate_vm(obj: Mapping[str, Any], *, operation: str, old_obj: Mapping[str, Any] | None,
              namespace: str, policy: Policy, plan_keys: PlanKeys, cluster: Cluster) -> Mutation:
    """Mutate a VirtualMachine on CREATE or UPDATE (other operations: unchanged)."""
    meta, spec = _shape(obj, VM_KIND)
    if operation not in ("CREATE", "UPDATE") or meta.get("deletionTimestamp"):
        return Mutation(dict(obj))  # never stand in the way of a deletion (finalizers)
    user_keys = user_annotation_keys(meta.get("annotations"))
    if operation == "UPDATE" and isinstance(old_obj, Mapping) and _unchanged(obj, old_obj, user_keys):
        # status/finalizer updates by KubeVirt, start/stop: nothing diskhooks decides has changed,
        # unless the VM was admitted without diskhooks (webhook down with failurePolicy Ignore, or
        # the namespace opted in later): then its VMI would start without its disks
        verdict = _shortcut_verdict(meta, spec, user_keys, namespace=namespace, policy=policy,
                                    plan_keys=plan_keys)
        if verdict == "keep":
            return Mutation(dict(obj))
        if verdict == "recompute":  # a genuine plan that no longer matches the annotations
            try:
                return _mutate_vm(obj, meta, spec, user_keys, operation=operation, old_obj=old_obj,
                                  namespace=namespace, policy=policy, plan_keys=plan_keys,
                                  cluster=cluster)
            except Refused:
                return Mutation(dict(obj))  # the VM as admitted; today's policy judges real changes
        if verdict == "repair":  # admitted without diskhooks: repaired, or kept from starting
            try:
                return _mutate_vm(obj, meta, spec, user_keys, operation=operation, old_obj=old_obj,
                                  namespace=namespace, policy=policy, plan_keys=plan_keys,
                                  cluster=cluster)
            except Refused as exc:
                if _starts(spec, _map(old_obj.get("spec"))):
                    raise
                # stopping it, a label, virt-controller's metadata: never stand in the way
                return Mutation(dict(obj), (
                    (f"diskhooks cannot set up this VM ({exc.field}: {exc.reason}); the update is "
                     "admitted unchanged, but starting the VM is denied until that is fixed"),))
    return _mutate_vm(obj, meta, spec, user_keys, operation=operation, old_obj=old_obj,
                      namespace=namespace, policy=policy, plan_keys=plan_keys, cluster=cluster)


def _mutate_vm(obj: Mapping[str, Any], meta: Mapping[str, Any], spec: Mapping[str, Any],
               user_keys: list[str], *, operation: str, old_obj: Mapping[str, Any] | None,
               namespace: str, policy: Policy, plan_keys: PlanKeys, cluster: Cluster) -> Mutation:
    template = spec.get("template")
    if not isinstance(template, Mapping):
        if user_keys:
            raise Malformed("spec.template", "must be an object")
        return Mutation(dict(obj))
    tmeta = _mapping(template.get("metadata"), "spec.template.metadata")
    tspec = _mapping(template.get("spec"), "spec.template.spec")
    for key in ("annotations", "labels"):
        if tmeta.get(key) is not None and not isinstance(tmeta[key], Mapping):
            raise Refused(f"spec.template.metadata.{key}", "must be an object")
    previous = _previous(old_obj, namespace=namespace, name=_name_of_meta(meta), plan_keys=plan_keys) \
        if operation == "UPDATE" else _Previous()
    remembers = previous.plan is not None and bool(previous.plan.disks or previous.plan.detached)
    if not user_keys and not _stale(tmeta, policy) and not _wants_default_profile(spec, tspec, policy) \
            and not remembers:  # a clean manifest replacing a VM with disks: carry their record
        name = _name_of_meta(meta)
        own_dir = policy.host_disks.vm_dir(namespace, name) if name else ""
        if not any(_is_own_disk(v, own_dir) for v in _seq(tspec.get("volumes"))):
            _check_user_volumes(tspec, "spec.template.spec", policy, ours=lambda v: False)
            _check_requested_sidecars(tmeta.get("annotations"), f"spec.template.metadata.{SIDECARS}",
                                      policy)
            return Mutation(dict(obj))
        # else: diskhooks disks left behind without their annotation: detached below, with a warning

    new = _json_copy(obj)
    template = new["spec"]["template"]
    target = _Target(kind=VM_KIND, user_meta=_meta(new), plan_meta=_meta(template),
                     spec=_spec(template, "spec.template"), spec_path="spec.template.spec",
                     meta_path="spec.template.metadata", vm_spec=new["spec"])
    for key in user_annotation_keys(target.plan_meta.get("annotations")):
        raise Refused(f"spec.template.metadata.annotations[{key}]", "diskhooks annotations go on the "
                      "VirtualMachine's own metadata.annotations, not on its template")
    warnings = _mutate(target, operation=operation, namespace=namespace, previous=previous,
                       policy=policy, plan_keys=plan_keys, cluster=cluster)
    return Mutation(new, tuple(warnings))


def mutate_vmi(obj: Mapping[str, Any], *, operation: str, namespace: str, policy: Policy,
               plan_keys: PlanKeys, cluster: Cluster) -> Mutation:
    """Mutate (a bare VMI with annotations, or one the policy's defaultProfile sizes) or verify
    (a VMI made from a VM template) on CREATE."""
    meta, spec = _shape(obj, VMI_KIND)
    if operation != "CREATE":
        return Mutation(dict(obj))
    annotations = meta.get("annotations")
    user_keys = user_annotation_keys(annotations)
    labels = meta.get("labels")
    has_plan = isinstance(annotations, Mapping) and K.ANN_PLAN in annotations
    has_label = isinstance(labels, Mapping) and K.LABEL_MANAGED in labels
    sized_by_default = not user_keys and not has_plan and not _owned_by_vm(meta) \
        and _wants_default_profile({}, spec, policy)  # a VM's VMI got it through the template
    if not user_keys and not has_plan and not sized_by_default:
        _check_user_volumes(spec, "spec", policy, ours=lambda v: False)
        _check_requested_sidecars(annotations, f"metadata.{SIDECARS}", policy)
        if not has_label:
            return Mutation(dict(obj))
        new = _json_copy(obj)  # a label without a plan would select the launcher pod for nothing
        del new["metadata"]["labels"][K.LABEL_MANAGED]
        return Mutation(new)
    if not user_keys and has_plan:
        return _verify_vmi(obj, meta, spec, namespace=namespace, policy=policy, plan_keys=plan_keys)
    # a bare VMI with diskhooks annotations (or without, when the policy's defaultProfile sizes
    # it): the same treatment as a VM, at the top level
    new = _json_copy(obj)
    target = _Target(kind=VMI_KIND, user_meta=_meta(new), plan_meta=_meta(new),
                     spec=_spec(new, ""), spec_path="spec", meta_path="metadata", vm_spec=None)
    warnings = _mutate(target, operation="CREATE", namespace=namespace, previous=_Previous(),
                       policy=policy, plan_keys=plan_keys, cluster=cluster)
    return Mutation(new, tuple(warnings))


# ------------------------------------------------------------------------------------------------
# the mutation proper (on the caller's copy)
# ------------------------------------------------------------------------------------------------
@dataclass
class _Target:
    """Where requests are read from and results written to: a VM's metadata and template, or a
    bare VMI (both at its top level)."""

    kind: str
    user_meta: dict[str, Any]
    plan_meta: dict[str, Any]
    spec: dict[str, Any]  # a VMI spec
    spec_path: str
    meta_path: str
    vm_spec: dict[str, Any] | None  # the VM's spec (instancetype, preference)


@dataclass
class _Previous:
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


def _mutate(t: _Target, *, operation: str, namespace: str, previous: _Previous, policy: Policy,
            plan_keys: PlanKeys, cluster: Cluster) -> list[str]:
    warnings: list[str] = []
    annotations = t.user_meta.get("annotations") or {}
    kept = _kept_sizes(previous.plan)
    requests = parse_requests(annotations, policy, kept_sizes=kept) \
        if user_annotation_keys(annotations) else Requests()
    name = _name_of_meta(t.user_meta)
    if requests.wants_plan:
        if not name:
            raise Refused("metadata.name", f"a {t.kind} with diskhooks disks needs a name (its disks "
                          "live in a directory named after it): generateName is not supported")
        if not DNS_SUBDOMAIN.match(name) or len(name) > 253:
            raise Refused("metadata.name", f"{name[:80]!r} is not a valid object name")
        if not DNS_LABEL.match(namespace):
            raise Refused("metadata.namespace", f"{namespace[:80]!r} is not a valid namespace name")
    sizing = _sizing_for(t, requests, policy)

    # the plan this object carries, if it is genuine: names its passthrough volumes as ours
    current_plan = _verified(t.plan_meta, namespace=namespace, name=name, plan_keys=plan_keys)
    for plan in (current_plan, previous.plan):
        if plan is not None:
            for d in plan.disks:
                previous.sizes[d.name] = max(previous.sizes.get(d.name, 0), d.size_bytes)
                previous.disks.add(d.name)
                previous.planned[d.name] = max(previous.planned.get(d.name, 0), d.size_bytes)
            for x in plan.detached:
                previous.detached[x.name] = max(previous.detached.get(x.name, 0), x.size_bytes)
    host_dir = policy.host_disks.vm_dir(namespace, name) if name else ""
    known_dirs = {host_dir} | {p.host_dir for p in (current_plan, previous.plan) if p is not None}
    # both plans count: a reinvocation of an UPDATE that changed a passthrough's claim carries the
    # new claim in the current plan and the old one in the previous plan
    pass_claims: dict[str, set[str]] = {}
    for plan in (current_plan, previous.plan):
        for p in plan.passthrough if plan is not None else ():
            pass_claims.setdefault(p.name, set()).add(p.claim)

    def ours(volume: Mapping[str, Any]) -> bool:
        vname = volume.get("name")
        if "hostDisk" in volume:
            return any(_is_own_disk(volume, d) for d in known_dirs)
        pvc = volume.get("persistentVolumeClaim")
        return isinstance(pvc, Mapping) and isinstance(vname, str) \
            and isinstance(pvc.get("claimName"), str) and pvc["claimName"] in pass_claims.get(vname, ())

    _check_growth(requests, previous, operation, warnings, policy.host_disks.max_disk_size, kept)
    warnings += _kept_above_limit(requests, policy.host_disks.max_disk_size)
    desired_volumes, desired_disks = _desired(requests, namespace=namespace, host_dir=host_dir,
                                              t=t, policy=policy, cluster=cluster, ours=ours)
    left = _rebuild(t, requests, desired_volumes, desired_disks, ours=ours, policy=policy)
    requested = {d.name for d in requests.disks}
    for gone in sorted((set(left) | previous.disks) - requested):
        warnings.append(f"{K.ANN_DISKS}: disk {gone!r} is detached from the {t.kind}; its image stays "
                        "on the node (diskhooks never deletes disk images)")
    detached = _detached(previous, requested)
    _check_detached_names(requests, detached)
    _check_total(requests, detached, previous.plan, policy.host_disks.max_total_per_vm)
    _check_boot_orders(t, requests)
    persist = _persist_root(t) if requests.persist_root else None

    if requests.wants_plan or (detached and name and DNS_SUBDOMAIN.match(name) and len(name) <= 253
                               and DNS_LABEL.match(namespace)):
        plan = Plan(
            namespace=namespace, vm=name, host_dir=host_dir,
            image_library=policy.host_disks.image_library if any(d.backing for d in requests.disks)
            else None,
            sidecar_image=policy.sidecar.image,
            disks=tuple(_planned(d) for d in requests.disks), persist_root=persist,
            passthrough=tuple(Passthrough(name=p.name, claim=p.claim, mode=p.mode)
                              for p in requests.passthrough),
            detached=detached,
        )
        # a plan that only remembers detached disks: no sidecar, no label (nothing to prepare)
        _set_plan(t, sign_plan(plan, plan_keys), label=plan.needs_launcher)
        _merge_sidecars(t, policy, want=plan.needs_launcher)
        if plan.needs_launcher:
            warnings += _plan_warnings(plan, previous.plan or current_plan, operation)
    else:
        _set_plan(t, None)
        _merge_sidecars(t, policy, want=False)

    if sizing is not None:
        warnings += apply_sizing(t.spec, sizing, policy, spec_path=t.spec_path)
        if operation == "UPDATE" and previous.sizing is not None \
                and previous.sizing != sizing_view(t.spec):
            warnings.append(f"CPU/memory sizing from {sizing.source} changed: it takes effect at the "
                            "next start of the VM")
    return warnings


def _owned_by_vm(meta: Mapping[str, Any]) -> bool:
    """A VMI that virt-controller made from a VirtualMachine (its owner reference says so)."""
    refs = meta.get("ownerReferences")
    return isinstance(refs, list) and any(isinstance(r, Mapping) and r.get("kind") == VM_KIND
                                          for r in refs)


def _sizing_for(t: _Target, requests: Requests, policy: Policy) -> Sizing | None:
    vm_spec = t.vm_spec or {}
    if requests.sizing is not None:
        for key in ("instancetype", "preference"):
            if vm_spec.get(key):
                raise Refused(f"spec.{key}", f"the VM uses a KubeVirt {key}, which sets its CPU and "
                              f"memory; remove it or the sizing annotations ({requests.sizing.source})")
        return requests.sizing
    if vm_spec.get("instancetype") or vm_spec.get("preference") or sets_own_sizing(t.spec):
        return None
    return default_sizing(policy)


def _wants_default_profile(vm_spec: Mapping[str, Any], tspec: Mapping[str, Any], policy: Policy) -> bool:
    return policy.default_profile is not None and not vm_spec.get("instancetype") \
        and not vm_spec.get("preference") and not sets_own_sizing(tspec)


def _kept_sizes(before: Plan | None) -> dict[str, int]:
    """Per disk name, the size the old object's verified plan holds for it (attached or detached):
    a disk up to that size is admitted above a lowered ``maxDiskSize`` (its image on the node
    already has it). Nothing without such a plan: never sizes from annotations or volumes."""
    if before is None:
        return {}
    kept = {x.name: x.size_bytes for x in before.detached}
    for d in before.disks:
        kept[d.name] = max(kept.get(d.name, 0), d.size_bytes)
    return kept


MAX_KEPT_WARNINGS = 4  # disks named by a warning about being kept above maxDiskSize


def _kept_above_limit(requests: Requests, limit: int) -> list[str]:
    """Warnings for the disks admitted above ``maxDiskSize`` because they already held that size
    (:func:`_kept_sizes`): the owner learns that the limit was lowered and the disk cannot grow.
    At most :data:`MAX_KEPT_WARNINGS` disks are named; the others are counted."""
    over = [d for d in requests.disks if d.size_bytes > limit]
    out = [f"{d.field}.size: disk {d.name!r} keeps {quantity_text(d.size_bytes)}, above the platform "
           f"limit {quantity_text(limit)}, which was lowered after it was planned; it cannot grow "
           "until the limit is raised" for d in over[:MAX_KEPT_WARNINGS]]
    if len(over) > MAX_KEPT_WARNINGS:
        out.append(f"{K.ANN_DISKS}: {len(over) - MAX_KEPT_WARNINGS} more disks keep a size above the "
                   f"platform limit {quantity_text(limit)}; they cannot grow until it is raised")
    return out


def _check_growth(requests: Requests, previous: _Previous, operation: str, warnings: list[str],
                  max_disk_size: int, kept: Mapping[str, int]) -> None:
    for d in requests.disks:
        old = previous.sizes.get(d.name)
        gone = previous.detached.get(d.name)
        if gone is not None and (old is None or gone > old):
            if d.size_bytes < gone:
                lowered = ""
                if gone > max_disk_size:
                    lowered = f"; the platform limit is now {quantity_text(max_disk_size)}, so the name " \
                        + (f"can come back only at {quantity_text(gone)}, the size of its image, until "
                           "the limit is raised" if kept.get(d.name, 0) >= gone
                           else "can come back only once the limit is raised")
                raise Refused(f"{d.field}.size", f"{d.size_text} is smaller than {quantity_text(gone)}, "
                              f"the size of disk {d.name!r} when it was detached: its image is still on "
                              "the node, and disks can grow but never shrink (use another name for a "
                              f"new, smaller disk){lowered}")
            grown = f", grown from {quantity_text(gone)} to {quantity_text(d.size_bytes)}" \
                if d.size_bytes > gone else ""
            warnings.append(f"{d.field}: disk {d.name!r} is attached again: its image still on the node "
                            f"is used{grown} at the next start of the VM")
            continue
        if old is None:
            continue
        if d.size_bytes < old:
            raise Refused(f"{d.field}.size", f"{d.size_text} is smaller than the disk's current size "
                          f"{quantity_text(old)}; disks can grow but never shrink")
        if d.size_bytes > old and operation == "UPDATE":
            warnings.append(f"{d.field}: disk {d.name!r} grows from {quantity_text(old)} to "
                            f"{quantity_text(d.size_bytes)} at the next start of the VM")


def _detached(previous: _Previous, requested: set[str]) -> tuple[DetachedDisk, ...]:
    """The detached disks the new plan remembers: those remembered before and those planned but
    no longer requested, minus the re-attached ones; each with the largest size planned. Only plans
    that verify count: never a size from the annotation or the template's volumes (user-controlled),
    so nothing for a VM that was never admitted. Sizes are not capped at today's maxDiskSize: a
    verified plan was within policy when written, and the image on the node keeps that size after
    the platform lowers the limit (a smaller record would let the name come back smaller than it)."""
    sizes = dict(previous.detached)
    for name, size in previous.planned.items():
        sizes[name] = max(sizes.get(name, 0), size)
    for name in requested:
        sizes.pop(name, None)
    sizes = {n: size for n, size in sizes.items() if size > 0}
    if len(sizes) > MAX_DETACHED:
        raise Refused(K.ANN_DISKS, f"this VM would have {len(sizes)} detached disks whose images stay "
                      f"on the node; diskhooks remembers at most {MAX_DETACHED} (re-attach some, or "
                      "ask the platform team to remove their images and re-create the VM)")
    return tuple(DetachedDisk(name=n, size_bytes=sizes[n]) for n in sorted(sizes))


def _check_detached_names(requests: Requests, detached: tuple[DetachedDisk, ...]) -> None:
    """A passthrough may not take the name of a detached disk: the plan keeps one name space for
    its volumes and remembered disks (a plan naming both would never verify, and the VM would
    never start), and the detached image is still on the node under that name."""
    gone = {x.name: x.size_bytes for x in detached}
    for p in requests.passthrough:
        if p.name in gone:
            raise Refused(f"{p.field}.name", f"{p.name!r} is the name of a detached disk whose image "
                          f"stays on the node; the name can come back only as a disk of {K.ANN_DISKS} "
                          f"of {quantity_text(gone[p.name])} or larger: use another name")


MAX_NAMED_DETACHED = 4  # detached disks a maxTotalPerVM denial names (the largest)


def _check_total(requests: Requests, detached: tuple[DetachedDisk, ...], before: Plan | None,
                 limit: int) -> None:
    """``maxTotalPerVM`` bounds what the VM holds on the node: its disks and the images of its
    detached disks (a re-attached disk is no longer detached, so it counts once). A VM already
    above the limit (detached disks count since this check, or the platform lowered the limit)
    is not stranded: an UPDATE that does not increase the total over what the old object's
    verified plan held is admitted; only one that grows it beyond the limit is denied."""
    attached = sum(d.size_bytes for d in requests.disks)
    held = sum(x.size_bytes for x in detached)
    total = attached + held
    if total <= limit:
        return
    before_total = 0 if before is None else \
        sum(d.size_bytes for d in before.disks) + sum(x.size_bytes for x in before.detached)
    if total <= before_total:
        return
    reason = f"the disks add up to {quantity_text(total)}, more than the platform limit " \
        f"{quantity_text(limit)} per VM"
    if detached:
        largest = sorted(detached, key=lambda x: (-x.size_bytes, x.name))
        named = ", ".join(f"{x.name} {quantity_text(x.size_bytes)}" for x in largest[:MAX_NAMED_DETACHED])
        if len(largest) > MAX_NAMED_DETACHED:
            named += f" and {len(largest) - MAX_NAMED_DETACHED} more"
        reason += (f": {quantity_text(attached)} attached and {quantity_text(held)} held by detached "
                   f"disks ({named}), whose images stay on the node and count towards the limit")
    if before_total > limit:
        reason += (f"; this VM already held {quantity_text(before_total)}, which an update may keep "
                   "but not increase")
    if detached:
        reason += ("; a detached disk re-attached by its name reuses its image; to free the space, "
                   "ask the platform team to remove the detached disks' images and re-create the VM")
    raise Refused(K.ANN_DISKS, reason)


def _plan_warnings(plan: Plan, before: Plan | None, operation: str) -> list[str]:
    if before is None or operation != "UPDATE":
        return []
    out = []
    if before.host_dir != plan.host_dir and before.disks:
        out.append(f"the platform moved hostDisks.root: the disks now live in {plan.host_dir}; "
                   f"images in {before.host_dir} are not moved by diskhooks")
    old, new = before.persist_root, plan.persist_root
    if old is not None and new is None:
        out.append(f"{K.ANN_PERSIST_ROOT}: the root disk's overlay stays on the node but is no "
                   "longer used")
    if old is not None and new is not None and old.image != new.image:
        out.append(f"{K.ANN_PERSIST_ROOT}: the persistent root overlay was made on {old.image}; "
                   f"with {new.image} the VM will refuse to start until the overlay is reset "
                   "(a changed base image would corrupt it)")
    return out


def _planned(d: DiskRequest) -> PlannedDisk:
    backing = None if d.backing is None else Backing(image=d.backing, file=f"{d.backing}.qcow2",
                                                     format="qcow2")
    return PlannedDisk(name=d.name, size_bytes=d.size_bytes, bus=d.bus, cache=d.cache, io=d.io,
                       discard=d.discard, backing=backing, serial=d.serial, boot_order=d.boot_order)


# ------------------------------------------------------------------------------------------------
# volumes and disks
# ------------------------------------------------------------------------------------------------
def _desired(requests: Requests, *, namespace: str, host_dir: str, t: _Target,
             policy: Policy, cluster: Cluster, ours: Any) -> tuple[dict[str, dict[str, Any]],
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
    user_volumes = _list(t.spec, "volumes", t.spec_path)
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
    spec = _map(pvc.get("spec"))
    mode = spec.get("volumeMode") or "Filesystem"
    if mode != "Block":
        raise Refused(where, f"claim {p.claim!r} has volumeMode {mode}; passthrough needs a "
                      "Block-mode claim (a whole device)")
    sc = spec.get("storageClassName")
    allowed = policy.passthrough.storage_classes
    if sc not in allowed:
        raise Refused(where, f"claim {p.claim!r} is of StorageClass {sc!r}, which the platform does "
                      f"not allow for passthrough (allowed: {', '.join(allowed)})")


def _rebuild(t: _Target, requests: Requests, volumes: dict[str, dict[str, Any]],
             disks: dict[str, dict[str, Any]], *, ours: Any, policy: Policy) -> dict[str, int | None]:
    """Put the desired volumes/disks in place of the webhook's previous ones (same positions),
    append new ones, drop those no longer requested. Returns the detached hostDisk names, with
    their capacities where readable."""
    field_of = {d.name: d.field for d in requests.disks} | {p.name: p.field for p in requests.passthrough}
    old_volumes = _list(t.spec, "volumes", t.spec_path)
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
    old_disks = _list(devices, "disks", f"{t.spec_path}.domain.devices")
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


def _is_own_disk(volume: Any, vm_dir: str) -> bool:
    """A hostDisk volume at exactly ``<vm_dir>/<its name>.qcow2``: a diskhooks disk."""
    if not vm_dir or not isinstance(volume, Mapping):
        return False
    hd, name = volume.get("hostDisk"), volume.get("name")
    return isinstance(hd, Mapping) and isinstance(name, str) \
        and hd.get("path") == f"{vm_dir}/{K.disk_file_name(name)}"


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


def _check_user_volumes(spec: Mapping[str, Any], spec_path: str, policy: Policy, *, ours: Any,
                        extra_dirs: tuple[str, ...] = ()) -> None:
    volumes = spec.get("volumes") if isinstance(spec, Mapping) else None
    if not isinstance(volumes, list):
        return
    for j, v in enumerate(volumes):
        if isinstance(v, Mapping) and "hostDisk" in v and not ours(v):
            _check_user_volume(v, f"{spec_path}.volumes[{j}]", policy, extra_dirs)


def _check_boot_orders(t: _Target, requests: Requests) -> None:
    ours = {d.name: d for d in requests.disks if d.boot_order is not None}
    if not ours:
        return
    devices = t.spec["domain"]["devices"]
    taken: dict[int, str] = {}
    for kind in ("disks", "interfaces"):
        for k, item in enumerate(_list(devices, kind, f"{t.spec_path}.domain.devices")):
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


def _persist_root(t: _Target) -> PersistRoot:
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


# ------------------------------------------------------------------------------------------------
# plan, label, sidecar
# ------------------------------------------------------------------------------------------------
def _set_plan(t: _Target, text: str | None, *, label: bool = False) -> None:
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


def _our_sidecar(policy: Policy) -> dict[str, Any]:
    return {"image": policy.sidecar.image, "imagePullPolicy": policy.sidecar.image_pull_policy,
            "args": list(SIDECAR_ARGS)}


def _read_sidecars(annotations: Mapping[str, Any] | None, where: str) -> list[Any] | None:
    raw = annotations.get(K.ANN_HOOK_SIDECARS) if isinstance(annotations, Mapping) else None
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise Refused(where, "must be a string holding a JSON list")
    if len(raw) > MAX_SIDECARS_BYTES:
        raise Refused(where, f"is longer than {MAX_SIDECARS_BYTES} bytes")
    try:
        entries = json.loads(raw)
    except ValueError as exc:
        raise Refused(where, f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise Refused(where, "is nested too deeply to be read") from None
    if not isinstance(entries, list):
        raise Refused(where, "must be a JSON list of sidecars")
    return entries


def _merge_sidecars(t: _Target, policy: Policy, *, want: bool) -> None:
    where = f"{t.meta_path}.{SIDECARS}"
    annotations = t.plan_meta.get("annotations")
    entries = _read_sidecars(annotations, where)
    if entries is None and not want:
        return
    entries = entries or []
    repo = policy.sidecar.repository
    kept = []
    for i, e in enumerate(entries):
        image = e.get("image") if isinstance(e, Mapping) else None
        if isinstance(image, str) and image_repository(image) == repo:
            continue  # ours (perhaps an older tag, or with other args): replaced below
        _check_sidecar(e, f"{where}[{i}]", policy)
        kept.append(e)
    new = kept + [_our_sidecar(policy)] if want else kept
    if new == entries:
        return
    if not new:
        assert isinstance(annotations, dict)  # entries came from it
        del annotations[K.ANN_HOOK_SIDECARS]
        if annotations == {}:
            del t.plan_meta["annotations"]
        return
    child_dict(t.plan_meta, "annotations", t.meta_path)[K.ANN_HOOK_SIDECARS] = json.dumps(new)


def _check_requested_sidecars(annotations: Any, where: str, policy: Policy) -> None:
    """The Sidecar feature gate lets any VM owner run code in virt-launcher: in opted-in
    namespaces every requested hook sidecar must be exactly diskhooks' own entry or in
    sidecar.allowedImages, whether or not the VM uses diskhooks."""
    entries = _read_sidecars(annotations, where)
    for i, e in enumerate(entries or []):
        _check_entry(e, f"{where}[{i}]", policy, own_image=policy.sidecar.image)


def _check_entry(entry: Any, where: str, policy: Policy, *, own_image: str) -> bool:
    """Check one requested hook sidecar; True when it is exactly diskhooks' own entry.

    An entry using an image of diskhooks' repository (``own_image``'s or the policy's) runs
    diskhooks' code with whatever ``command``, ``args``, ``configMap`` or ``pvc`` it carries, so it
    is accepted only as the very entry the webhook writes; anything else must be allowed by
    ``sidecar.allowedImages``."""
    image = entry.get("image") if isinstance(entry, Mapping) else None
    if isinstance(image, str) and image_repository(image) in (policy.sidecar.repository,
                                                               image_repository(own_image)):
        assert isinstance(entry, Mapping)
        problem = _own_entry_problem(entry, own_image)
        if problem is not None:
            raise Refused(where, problem)
        return True
    _check_sidecar(entry, where, policy)
    return False


def _own_entry_problem(entry: Mapping[str, Any], own_image: str) -> str | None:
    """Why an entry with a diskhooks image is not the entry diskhooks writes (None: it is)."""
    extra = [str(k)[:40] for k in entry if k not in ("image", "imagePullPolicy", "args")]
    if extra:
        problem = f"with {', '.join(sorted(extra))}"
    elif entry.get("image") != own_image:
        problem = f"instead of {own_image!r}"
    elif entry.get("args") != list(SIDECAR_ARGS):
        problem = f"with args {str(entry.get('args'))[:100]}"
    elif entry.get("imagePullPolicy") not in PULL_POLICIES:
        problem = f"with imagePullPolicy {str(entry.get('imagePullPolicy'))[:40]!r}"
    else:
        return None
    return (f"uses the diskhooks image {str(entry.get('image'))[:200]!r} {problem}, which would run "
            f"other code under diskhooks' name: a diskhooks entry is exactly {{image: {own_image}, "
            f"imagePullPolicy: {'|'.join(PULL_POLICIES)}, args: [{', '.join(SIDECAR_ARGS)}]}} and "
            "nothing else, and the webhook writes it itself for VMs with diskhooks annotations")


def _check_sidecar(entry: Any, where: str, policy: Policy) -> None:
    if not isinstance(entry, Mapping):
        raise Refused(where, "must be an object with an image")
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise Refused(f"{where}.image", "is missing: KubeVirt would run its sidecar-shim with a "
                      "user script; only images in the platform's sidecar.allowedImages may run "
                      "beside diskhooks")
    if not policy.sidecar.allows(image):
        raise Refused(f"{where}.image", f"{image[:200]!r} is not an allowed hook-sidecar image on this "
                      "platform (policy sidecar.allowedImages)")


# ------------------------------------------------------------------------------------------------
# VMI made from a VM template: verify
# ------------------------------------------------------------------------------------------------
def _verify_vmi(obj: Mapping[str, Any], meta: Mapping[str, Any], spec: Mapping[str, Any], *,
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
    volumes = _seq(spec.get("volumes"))
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
        v = _map(volumes[pr.volume_index]) if pr.volume_index < len(volumes) else {}
        cd = v.get("containerDisk")
        if v.get("name") != pr.volume or not isinstance(cd, Mapping) or cd.get("image") != pr.image:
            raise Refused(f"spec.volumes[{pr.volume_index}]", f"the persistent root volume {mismatch}")
    planned = {d.name for d in plan.disks}
    _check_user_volumes(spec, "spec", policy, ours=lambda v: isinstance(v.get("name"), str)
                        and v["name"] in planned,
                        extra_dirs=(plan.host_dir,))
    entries = _read_sidecars(meta.get("annotations"), f"metadata.{SIDECARS}") or []
    found = False
    for i, e in enumerate(entries):
        if _check_entry(e, f"metadata.{SIDECARS}[{i}]", policy, own_image=plan.sidecar_image):
            found = True
    if not found and plan.needs_launcher:
        raise Refused(f"metadata.{SIDECARS}", f"the diskhooks sidecar {plan.sidecar_image} is missing; "
                      "without it the VM's qcow2 disks would reach the guest as raw data")
    labels = meta.get("labels")
    labelled = isinstance(labels, Mapping) and labels.get(K.LABEL_MANAGED) == K.LABEL_MANAGED_VALUE
    if labelled == plan.needs_launcher and (labelled or not isinstance(labels, Mapping)
                                            or K.LABEL_MANAGED not in labels):
        return Mutation(dict(obj))
    new = _json_copy(obj)
    if plan.needs_launcher:  # the launcher pod needs the label to be prepared
        child_dict(new["metadata"], "labels", "metadata")[K.LABEL_MANAGED] = K.LABEL_MANAGED_VALUE
    else:  # a plan that only remembers detached disks: nothing for the launcher pod
        del new["metadata"]["labels"][K.LABEL_MANAGED]
    return Mutation(new)


# ------------------------------------------------------------------------------------------------
# previous state (UPDATE)
# ------------------------------------------------------------------------------------------------
def _previous(old_obj: Mapping[str, Any] | None, *, namespace: str, name: str,
              plan_keys: PlanKeys) -> _Previous:
    prev = _Previous()
    if not isinstance(old_obj, Mapping):
        return prev
    template = _map(_map(old_obj.get("spec")).get("template"))
    tmeta = _map(template.get("metadata"))
    prev.plan = _verified(tmeta, namespace=namespace, name=name, plan_keys=plan_keys)
    if prev.plan is not None:
        for d in prev.plan.disks:
            prev.sizes[d.name] = d.size_bytes
            prev.disks.add(d.name)
    annotations = _map(_map(old_obj.get("metadata")).get("annotations"))
    for disk_name, size in _lenient_sizes(annotations.get(K.ANN_DISKS)).items():
        prev.sizes[disk_name] = max(prev.sizes.get(disk_name, 0), size)
        prev.disks.add(disk_name)
    tspec = template.get("spec")
    if isinstance(tspec, Mapping):
        prev.sizing = sizing_view(tspec)
    return prev


def _lenient_capacity(hd: Any) -> int | None:
    try:
        return parse_bytes(hd.get("capacity")) if isinstance(hd, Mapping) else None
    except ValueError:
        return None


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


def _verified(meta: Mapping[str, Any], *, namespace: str, name: str, plan_keys: PlanKeys) -> Plan | None:
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    text = annotations.get(K.ANN_PLAN) if isinstance(annotations, Mapping) else None
    if not isinstance(text, str) or not name:
        return None
    try:
        return verify_plan(text, plan_keys, namespace=namespace, vm=name)
    except (Refused, Malformed):
        return None  # not ours (forged, copied, stale key): it is replaced, never trusted


# ------------------------------------------------------------------------------------------------
# shapes and small helpers
# ------------------------------------------------------------------------------------------------
def _shape(obj: Any, kind: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    if not isinstance(obj, Mapping):
        raise Malformed("", f"the object must be a {kind}, not {type(obj).__name__}")
    if obj.get("kind", kind) != kind:
        raise Malformed("kind", f"expected {kind}, not {str(obj.get('kind'))[:60]!r}")
    api = obj.get("apiVersion")
    if api is not None and (not isinstance(api, str) or not api.startswith("kubevirt.io/")):
        raise Malformed("apiVersion", f"expected kubevirt.io/v1, not {str(api)[:60]!r}")
    meta = _mapping(obj.get("metadata"), "metadata")
    annotations = meta.get("annotations")
    if annotations is not None and not isinstance(annotations, Mapping):
        raise Malformed("metadata.annotations", "must be an object")
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise Malformed("spec", f"a {kind} needs a spec object")
    return meta, spec


def _map(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one (for reading what may be missing)."""
    return value if isinstance(value, Mapping) else {}


def _seq(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Malformed(where, "must be an object")
    return value


def _list(parent: Mapping[str, Any], key: str, where: str = "") -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise Refused(f"{where}.{key}" if where else key, "must be a list")
    return value


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    if meta is None:
        meta = obj["metadata"] = {}
    return meta


def _spec(obj: dict[str, Any], where: str) -> dict[str, Any]:
    spec = obj.get("spec")
    if spec is None:
        spec = obj["spec"] = {}
    if not isinstance(spec, dict):
        raise Malformed(f"{where}.spec" if where else "spec", "must be an object")
    return spec


def _name_of_meta(meta: Mapping[str, Any]) -> str:
    name = meta.get("name")
    return name if isinstance(name, str) else ""


def _name_of(obj: Mapping[str, Any]) -> str:
    return _name_of_meta(_mapping(obj.get("metadata"), "metadata"))


def _stale(tmeta: Mapping[str, Any], policy: Policy) -> bool:
    """Traces of diskhooks on a template without diskhooks annotations: plan, label, sidecar,
    or diskhooks annotations put on the template by mistake."""
    annotations = tmeta.get("annotations")
    labels = tmeta.get("labels")
    if isinstance(labels, Mapping) and K.LABEL_MANAGED in labels:
        return True
    if not isinstance(annotations, Mapping):
        return False
    if any(isinstance(k, str) and k.startswith(K.PREFIX) for k in annotations):
        return True
    return bool(_own_repo_entries(annotations.get(K.ANN_HOOK_SIDECARS), policy))


def _own_repo_entries(raw: Any, policy: Policy) -> list[Mapping[str, Any]]:
    """The entries of a hookSidecars value that use diskhooks' repository (lenient: a value that
    cannot be read has none; it is refused where it is checked)."""
    if not isinstance(raw, str) or len(raw) > MAX_SIDECARS_BYTES:
        return []
    try:
        entries = json.loads(raw)
    except (ValueError, RecursionError):
        return []
    return [e for e in entries if isinstance(e, Mapping) and isinstance(e.get("image"), str)
            and image_repository(e["image"]) == policy.sidecar.repository] \
        if isinstance(entries, list) else []


def _shortcut_verdict(meta: Mapping[str, Any], spec: Mapping[str, Any], user_keys: list[str], *,
                      namespace: str, policy: Policy, plan_keys: PlanKeys) -> str:
    """For an UPDATE that leaves the template and the diskhooks annotations alone: ``keep`` the
    object as it is, ``repair`` it (a full mutation; a refusal is a denial only when the UPDATE
    starts the VM, see :func:`_starts`, else the object is kept with a warning), or ``recompute`` it
    (a full mutation whose refusal keeps the object: it is consistent with itself).

    Repaired: a VM asking for disks, a persistent root or passthrough whose template carries no
    plan that verifies, and a template with a hook-sidecar entry of diskhooks' image that is not
    exactly diskhooks' own. Recomputed: a genuine plan whose disks, passthrough or persistent root
    differ from what the annotations ask for today (edited while the webhook was not called)."""
    tmeta = _map(_map(spec.get("template")).get("metadata"))
    plan = _verified(tmeta, namespace=namespace, name=_name_of_meta(meta), plan_keys=plan_keys)
    own_image = plan.sidecar_image if plan is not None else policy.sidecar.image
    if any(_own_entry_problem(e, own_image) is not None
           for e in _own_repo_entries(_map(tmeta.get("annotations")).get(K.ANN_HOOK_SIDECARS), policy)):
        return "repair"
    if not any(k in PLAN_ANNOTATIONS for k in user_keys):
        return "keep"
    try:  # the template is unchanged: its plan is the old object's (grandfathered sizes)
        requests = parse_requests(_map(meta.get("annotations")), policy, kept_sizes=_kept_sizes(plan))
    except Refused:
        return "keep" if plan is not None else "repair"
    if plan is None:
        return "repair" if requests.wants_plan else "keep"
    same = plan.disks == tuple(_planned(d) for d in requests.disks) \
        and plan.passthrough == tuple(Passthrough(name=p.name, claim=p.claim, mode=p.mode)
                                      for p in requests.passthrough) \
        and (plan.persist_root is not None) == requests.persist_root
    return "keep" if same else "recompute"


RUNNING_STRATEGIES = ("Always", "RerunOnFailure", "Once")


def _wants_running(spec: Mapping[str, Any]) -> bool:
    return spec.get("running") is True or spec.get("runStrategy") in RUNNING_STRATEGIES


def _starts(spec: Mapping[str, Any], old_spec: Mapping[str, Any]) -> bool:
    """An UPDATE that moves the VM towards running: ``running: true`` or a runStrategy that starts
    it, where the old object had neither. Stopping (Halted, ``running: false``) never is."""
    return _wants_running(spec) and not _wants_running(old_spec)


def _unchanged(obj: Mapping[str, Any], old_obj: Mapping[str, Any], user_keys: list[str]) -> bool:
    spec, old_spec = obj.get("spec"), old_obj.get("spec")
    if not isinstance(spec, Mapping) or not isinstance(old_spec, Mapping):
        return False
    if spec.get("template") != old_spec.get("template"):
        return False
    for key in ("instancetype", "preference"):
        if spec.get(key) != old_spec.get(key):
            return False
    annotations = _mapping(obj.get("metadata"), "metadata").get("annotations") or {}
    old_annotations = _map(_map(old_obj.get("metadata")).get("annotations"))
    if set(user_keys) != set(user_annotation_keys(old_annotations)):
        return False
    return all(annotations.get(k) == old_annotations.get(k) for k in user_keys)


def _json_copy(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy; JSON round trip when possible (several times faster than copy.deepcopy)."""
    try:
        out = json.loads(json.dumps(obj))
    except (TypeError, ValueError):
        out = copy.deepcopy(dict(obj))
    return out  # type: ignore[no-any-return]
