"""Update rules: what an UPDATE may change, given what the old object held.

Pure. Disks grow but never shrink (:func:`check_growth`). Disks removed from the annotation are
detached (their images stay on the node); the plan remembers them with their largest size (plan
version 2, ``detached``; :func:`detached_disks`), carried across UPDATEs even when every diskhooks
annotation is gone, so a disk of that name can only come back at that size or larger, and never as a
passthrough (:func:`check_detached_names`); their sizes count towards ``maxTotalPerVM`` (an UPDATE may
not raise the total above it; :func:`check_total`).

Both limits are grandfathered when the platform lowers them: a disk may stay above ``maxDiskSize``
at no more than the size the old object's verified plan held for its name (attached, or detached
and coming back; :func:`kept_sizes`), with a warning (:func:`kept_above_limit`), and a VM above
``maxTotalPerVM`` keeps every UPDATE that does not raise its total. A CREATE, or an UPDATE whose old
plan does not verify, grandfathers nothing.

An UPDATE that leaves the template and the diskhooks annotations alone (:func:`unchanged`: status,
finalizers, start/stop) is kept as it is, unless :func:`shortcut_verdict` finds it needs a repair or
a recomputation; a repair that fails denies only an UPDATE that starts the VM (:func:`starts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diskplan import keys as K
from diskplan.annotations import Requests, parse_requests, quantity_text, user_annotation_keys
from diskplan.errors import Refused
from diskplan.plan import MAX_DETACHED, DetachedDisk, Plan, PlanKeys
from diskplan.policy import Policy
from webhook.vm.planverify import Previous, planned_disk, planned_passthrough, verified_plan
from webhook.vm.shape import as_map, checked_mapping, name_of
from webhook.vm.sidecars import own_entry_problem, own_repo_entries


# ------------------------------------------------------------------------------------------------
# sizes and limits across updates
# ------------------------------------------------------------------------------------------------
def kept_sizes(before: Plan | None) -> dict[str, int]:
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


def kept_above_limit(requests: Requests, limit: int) -> list[str]:
    """Warnings for the disks admitted above ``maxDiskSize`` because they already held that size
    (:func:`kept_sizes`): the owner learns that the limit was lowered and the disk cannot grow.
    At most :data:`MAX_KEPT_WARNINGS` disks are named; the others are counted."""
    over = [d for d in requests.disks if d.size_bytes > limit]
    out = [f"{d.field}.size: disk {d.name!r} keeps {quantity_text(d.size_bytes)}, above the platform "
           f"limit {quantity_text(limit)}, which was lowered after it was planned; it cannot grow "
           "until the limit is raised" for d in over[:MAX_KEPT_WARNINGS]]
    if len(over) > MAX_KEPT_WARNINGS:
        out.append(f"{K.ANN_DISKS}: {len(over) - MAX_KEPT_WARNINGS} more disks keep a size above the "
                   f"platform limit {quantity_text(limit)}; they cannot grow until it is raised")
    return out


def check_growth(requests: Requests, previous: Previous, operation: str, warnings: list[str],
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


def detached_disks(previous: Previous, requested: set[str]) -> tuple[DetachedDisk, ...]:
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


def check_detached_names(requests: Requests, detached: tuple[DetachedDisk, ...]) -> None:
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


def check_total(requests: Requests, detached: tuple[DetachedDisk, ...], before: Plan | None,
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


def plan_warnings(plan: Plan, before: Plan | None, operation: str) -> list[str]:
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


# ------------------------------------------------------------------------------------------------
# updates that leave diskhooks' inputs alone
# ------------------------------------------------------------------------------------------------
PLAN_ANNOTATIONS = (K.ANN_DISKS, K.ANN_PERSIST_ROOT, K.ANN_PASSTHROUGH)  # what needs a plan


def unchanged(obj: Mapping[str, Any], old_obj: Mapping[str, Any], user_keys: list[str]) -> bool:
    spec, old_spec = obj.get("spec"), old_obj.get("spec")
    if not isinstance(spec, Mapping) or not isinstance(old_spec, Mapping):
        return False
    if spec.get("template") != old_spec.get("template"):
        return False
    for key in ("instancetype", "preference"):
        if spec.get(key) != old_spec.get(key):
            return False
    annotations = checked_mapping(obj.get("metadata"), "metadata").get("annotations") or {}
    old_annotations = as_map(as_map(old_obj.get("metadata")).get("annotations"))
    if set(user_keys) != set(user_annotation_keys(old_annotations)):
        return False
    return all(annotations.get(k) == old_annotations.get(k) for k in user_keys)


def shortcut_verdict(meta: Mapping[str, Any], spec: Mapping[str, Any], user_keys: list[str], *,
                     namespace: str, policy: Policy, plan_keys: PlanKeys) -> str:
    """For an UPDATE that leaves the template and the diskhooks annotations alone: ``keep`` the
    object as it is, ``repair`` it (a full mutation; a refusal is a denial only when the UPDATE
    starts the VM, see :func:`starts`, else the object is kept with a warning), or ``recompute`` it
    (a full mutation whose refusal keeps the object: it is consistent with itself).

    Repaired: a VM asking for disks, a persistent root or passthrough whose template carries no
    plan that verifies, and a template with a hook-sidecar entry of diskhooks' image that is not
    exactly diskhooks' own. Recomputed: a genuine plan whose disks, passthrough or persistent root
    differ from what the annotations ask for today (edited while the webhook was not called)."""
    tmeta = as_map(as_map(spec.get("template")).get("metadata"))
    plan = verified_plan(tmeta, namespace=namespace, name=name_of(meta), plan_keys=plan_keys)
    own_image = plan.sidecar_image if plan is not None else policy.sidecar.image
    if any(own_entry_problem(e, own_image) is not None
           for e in own_repo_entries(as_map(tmeta.get("annotations")).get(K.ANN_HOOK_SIDECARS), policy)):
        return "repair"
    if not any(k in PLAN_ANNOTATIONS for k in user_keys):
        return "keep"
    try:  # the template is unchanged: its plan is the old object's (grandfathered sizes)
        requests = parse_requests(as_map(meta.get("annotations")), policy, kept_sizes=kept_sizes(plan))
    except Refused:
        return "keep" if plan is not None else "repair"
    if plan is None:
        return "repair" if requests.wants_plan else "keep"
    same = plan.disks == tuple(planned_disk(d) for d in requests.disks) \
        and plan.passthrough == planned_passthrough(requests) \
        and (plan.persist_root is not None) == requests.persist_root
    return "keep" if same else "recompute"


RUNNING_STRATEGIES = ("Always", "RerunOnFailure", "Once")


def starts(spec: Mapping[str, Any], old_spec: Mapping[str, Any]) -> bool:
    """An UPDATE that moves the VM towards running: ``running: true`` or a runStrategy that starts
    it, where the old object had neither. Stopping (Halted, ``running: false``) never is."""
    return _wants_running(spec) and not _wants_running(old_spec)


def _wants_running(spec: Mapping[str, Any]) -> bool:
    return spec.get("running") is True or spec.get("runStrategy") in RUNNING_STRATEGIES
