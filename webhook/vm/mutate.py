"""The VM/VMI mutation: the entry points and the order in which the rules apply.

Pure. :func:`mutate_vm` and :func:`mutate_vmi` take the admitted object (a decoded JSON dict) and
return a :class:`~webhook.mutation.Mutation` holding a new object and warnings; the input is never
modified. What each step decides lives in the module named for it (see :mod:`webhook.vm`); here only
which steps run, in which order, on which part of the object (:class:`~webhook.vm.shape.Target`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diskplan import keys as K
from diskplan.annotations import Requests, parse_requests, user_annotation_keys
from diskplan.errors import Malformed, Refused
from diskplan.plan import Plan, PlanKeys, sign_plan
from diskplan.policy import Policy
from webhook.cluster import Cluster
from webhook.mutation import Mutation
from webhook.sizing import apply_sizing, choose_sizing, sizing_view, wants_default_profile
from webhook.vm.disks import (
    check_boot_orders,
    check_user_volumes,
    desired_devices,
    is_own_disk,
    own_volume_test,
    persist_root_of,
    rebuild,
)
from webhook.vm.home import bare_vmi_warnings, decide_home, finish_home, with_node
from webhook.vm.metadata import (
    check_names,
    check_no_template_requests,
    check_template_metadata,
    owned_by_vm,
    stale_template,
    valid_names,
)
from webhook.vm.migration import check_migration
from webhook.vm.planverify import (
    Previous,
    planned_disk,
    planned_passthrough,
    read_previous,
    set_plan,
    verified_plan,
    verify_vmi,
)
from webhook.vm.shape import (
    VM_KIND,
    VMI_KIND,
    Target,
    as_map,
    as_seq,
    checked_mapping,
    json_copy,
    meta_of,
    name_of,
    shape_of,
    spec_of,
)
from webhook.vm.sidecars import SIDECARS, check_requested_sidecars, merge_sidecars
from webhook.vm.updates import (
    check_detached_names,
    check_growth,
    check_total,
    detached_disks,
    kept_above_limit,
    kept_sizes,
    plan_warnings,
    shortcut_verdict,
    starts,
    unchanged,
)


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
def mutate_vm(obj: Mapping[str, Any], *, operation: str, old_obj: Mapping[str, Any] | None,
              namespace: str, policy: Policy, plan_keys: PlanKeys, cluster: Cluster,
              username: str = "") -> Mutation:
    """Mutate a VirtualMachine on CREATE or UPDATE (other operations: unchanged). ``username`` is
    the requester (the AdmissionReview's ``userInfo.username``): only the node agent's may set the
    home node (:mod:`webhook.vm.home`)."""
    meta, spec = shape_of(obj, VM_KIND)
    if operation not in ("CREATE", "UPDATE") or meta.get("deletionTimestamp"):
        return Mutation(dict(obj))  # never stand in the way of a deletion (finalizers)
    home = decide_home(obj, old_obj if operation == "UPDATE" else None, operation=operation,
                       username=username, policy=policy)
    if home.restored and home.node is not None:  # the update omitted the home node: put it back
        obj = with_node(obj, home.node)
        meta, spec = shape_of(obj, VM_KIND)
    checked, notes = check_migration(obj, old_obj if operation == "UPDATE" else None, operation=operation,
                                     username=username, policy=policy, namespace=namespace, cluster=cluster)
    if checked is not obj:  # the update omitted the migration status: put back
        obj = checked
        meta, spec = shape_of(obj, VM_KIND)
    m = _mutate_vm_spec(obj, meta, spec, operation=operation, old_obj=old_obj, namespace=namespace,
                        policy=policy, plan_keys=plan_keys, cluster=cluster)
    m = Mutation(m.obj, m.warnings + notes) if notes else m
    return finish_home(m, home, old_obj=old_obj if operation == "UPDATE" else None, namespace=namespace,
                       plan_keys=plan_keys)


def _mutate_vm_spec(obj: Mapping[str, Any], meta: Mapping[str, Any], spec: Mapping[str, Any], *,
                    operation: str, old_obj: Mapping[str, Any] | None, namespace: str, policy: Policy,
                    plan_keys: PlanKeys, cluster: Cluster) -> Mutation:
    """Everything but the home node: annotations -> spec, plan, sidecar, sizing."""
    user_keys = user_annotation_keys(meta.get("annotations"))
    if operation == "UPDATE" and isinstance(old_obj, Mapping) and unchanged(obj, old_obj, user_keys):
        # status/finalizer updates by KubeVirt, start/stop: nothing diskhooks decides has changed,
        # unless the VM was admitted without diskhooks (webhook down with failurePolicy Ignore, or
        # the namespace opted in later): then its VMI would start without its disks
        verdict = shortcut_verdict(meta, spec, user_keys, namespace=namespace, policy=policy,
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
                if starts(spec, as_map(old_obj.get("spec"))):
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
    tmeta = checked_mapping(template.get("metadata"), "spec.template.metadata")
    tspec = checked_mapping(template.get("spec"), "spec.template.spec")
    check_template_metadata(tmeta)
    previous = read_previous(old_obj, namespace=namespace, name=name_of(meta), plan_keys=plan_keys) \
        if operation == "UPDATE" else Previous()
    remembers = previous.plan is not None and bool(previous.plan.disks or previous.plan.detached)
    if not user_keys and not stale_template(tmeta, policy) and not wants_default_profile(spec, tspec, policy) \
            and not remembers:  # a clean manifest replacing a VM with disks: carry their record
        name = name_of(meta)
        own_dir = policy.host_disks.vm_dir(namespace, name) if name else ""
        if not any(is_own_disk(v, own_dir) for v in as_seq(tspec.get("volumes"))):
            check_user_volumes(tspec, "spec.template.spec", policy, ours=lambda v: False)
            check_requested_sidecars(tmeta.get("annotations"), f"spec.template.metadata.{SIDECARS}",
                                     policy)
            return Mutation(dict(obj))
        # else: diskhooks disks left behind without their annotation: detached below, with a warning

    new = json_copy(obj)
    template = new["spec"]["template"]
    target = Target(kind=VM_KIND, user_meta=meta_of(new), plan_meta=meta_of(template),
                    spec=spec_of(template, "spec.template"), spec_path="spec.template.spec",
                    meta_path="spec.template.metadata", vm_spec=new["spec"])
    check_no_template_requests(target.plan_meta)
    warnings = _mutate(target, operation=operation, namespace=namespace, previous=previous,
                       policy=policy, plan_keys=plan_keys, cluster=cluster)
    return Mutation(new, tuple(warnings))


def mutate_vmi(obj: Mapping[str, Any], *, operation: str, namespace: str, policy: Policy,
               plan_keys: PlanKeys, cluster: Cluster) -> Mutation:
    """Mutate (a bare VMI with annotations, or one the policy's defaultProfile sizes) or verify
    (a VMI made from a VM template) on CREATE. A bare VMI has no home node (nothing records one):
    ``diskhooks.io/node`` on it only gets a warning."""
    meta, spec = shape_of(obj, VMI_KIND)
    if operation != "CREATE":
        return Mutation(dict(obj))
    m = _mutate_vmi(obj, meta, spec, namespace=namespace, policy=policy, plan_keys=plan_keys,
                    cluster=cluster)
    notes = () if owned_by_vm(meta) else bare_vmi_warnings(meta)
    return Mutation(m.obj, m.warnings + notes) if notes else m


def _mutate_vmi(obj: Mapping[str, Any], meta: Mapping[str, Any], spec: Mapping[str, Any], *,
                namespace: str, policy: Policy, plan_keys: PlanKeys, cluster: Cluster) -> Mutation:
    annotations = meta.get("annotations")
    user_keys = user_annotation_keys(annotations)
    labels = meta.get("labels")
    has_plan = isinstance(annotations, Mapping) and K.ANN_PLAN in annotations
    has_label = isinstance(labels, Mapping) and K.LABEL_MANAGED in labels
    sized_by_default = not user_keys and not has_plan and not owned_by_vm(meta) \
        and wants_default_profile({}, spec, policy)  # a VM's VMI got it through the template
    if not user_keys and not has_plan and not sized_by_default:
        check_user_volumes(spec, "spec", policy, ours=lambda v: False)
        check_requested_sidecars(annotations, f"metadata.{SIDECARS}", policy)
        if not has_label:
            return Mutation(dict(obj))
        new = json_copy(obj)  # a label without a plan would select the launcher pod for nothing
        del new["metadata"]["labels"][K.LABEL_MANAGED]
        return Mutation(new)
    if not user_keys and has_plan:
        return verify_vmi(obj, meta, spec, namespace=namespace, policy=policy, plan_keys=plan_keys)
    # a bare VMI with diskhooks annotations (or without, when the policy's defaultProfile sizes
    # it): the same treatment as a VM, at the top level
    new = json_copy(obj)
    target = Target(kind=VMI_KIND, user_meta=meta_of(new), plan_meta=meta_of(new),
                    spec=spec_of(new, ""), spec_path="spec", meta_path="metadata", vm_spec=None)
    warnings = _mutate(target, operation="CREATE", namespace=namespace, previous=Previous(),
                       policy=policy, plan_keys=plan_keys, cluster=cluster)
    return Mutation(new, tuple(warnings))


# ------------------------------------------------------------------------------------------------
# the mutation proper (on the caller's copy)
# ------------------------------------------------------------------------------------------------
def _mutate(t: Target, *, operation: str, namespace: str, previous: Previous, policy: Policy,
            plan_keys: PlanKeys, cluster: Cluster) -> list[str]:
    warnings: list[str] = []
    annotations = t.user_meta.get("annotations") or {}
    kept = kept_sizes(previous.plan)
    requests = parse_requests(annotations, policy, kept_sizes=kept) \
        if user_annotation_keys(annotations) else Requests()
    name = name_of(t.user_meta)
    if requests.wants_plan:
        check_names(t.kind, name, namespace)
    sizing = choose_sizing(requests.sizing, vm_spec=t.vm_spec or {}, spec=t.spec, policy=policy)

    # the plan this object carries, if it is genuine: names its passthrough volumes as ours
    current_plan = verified_plan(t.plan_meta, namespace=namespace, name=name, plan_keys=plan_keys)
    plans = (current_plan, previous.plan)
    for known in plans:
        previous.remember(known)
    host_dir = policy.host_disks.vm_dir(namespace, name) if name else ""
    ours = own_volume_test(host_dir, plans)

    check_growth(requests, previous, operation, warnings, policy.host_disks.max_disk_size, kept)
    warnings += kept_above_limit(requests, policy.host_disks.max_disk_size)
    desired_volumes, desired_disks = desired_devices(requests, namespace=namespace, host_dir=host_dir,
                                                     t=t, policy=policy, cluster=cluster, ours=ours)
    left = rebuild(t, requests, desired_volumes, desired_disks, ours=ours, policy=policy)
    requested = {d.name for d in requests.disks}
    for gone in sorted((set(left) | previous.disks) - requested):
        warnings.append(f"{K.ANN_DISKS}: disk {gone!r} is detached from the {t.kind}; its image stays "
                        "on the node (diskhooks never deletes disk images)")
    detached = detached_disks(previous, requested)
    check_detached_names(requests, detached)
    check_total(requests, detached, previous.plan, policy.host_disks.max_total_per_vm)
    check_boot_orders(t, requests)
    persist = persist_root_of(t) if requests.persist_root else None

    if requests.wants_plan or (detached and valid_names(name, namespace)):
        plan = Plan(
            namespace=namespace, vm=name, host_dir=host_dir,
            image_library=policy.host_disks.image_library if any(d.backing for d in requests.disks)
            else None,
            sidecar_image=policy.sidecar.image,
            disks=tuple(planned_disk(d) for d in requests.disks), persist_root=persist,
            passthrough=planned_passthrough(requests),
            detached=detached,
        )
        # a plan that only remembers detached disks: no sidecar, no label (nothing to prepare)
        set_plan(t, sign_plan(plan, plan_keys), label=plan.needs_launcher)
        merge_sidecars(t, policy, want=plan.needs_launcher)
        if plan.needs_launcher:
            warnings += plan_warnings(plan, previous.plan or current_plan, operation)
    else:
        set_plan(t, None)
        merge_sidecars(t, policy, want=False)

    if sizing is not None:
        warnings += apply_sizing(t.spec, sizing, policy, spec_path=t.spec_path)
        if operation == "UPDATE" and previous.sizing is not None \
                and previous.sizing != sizing_view(t.spec):
            warnings.append(f"CPU/memory sizing from {sizing.source} changed: it takes effect at the "
                            "next start of the VM")
    return warnings
