"""The home node: what the agent records on a VM, decided from a VMI or from a home marker. Pure.

Two sources, one rule (docs: ARCHITECTURE.md, "Node agent"):

- a **VMI** scheduled on this node (label ``kubevirt.io/nodeName``), controlled by a VirtualMachine,
  whose ``diskhooks.io/plan`` verifies and puts images on the node (disks or a persistent root),
  **and** whose launcher ran prepare here: this node's home marker in ``<hostDisks.root>/<ns>/<vm>/``
  names this node, that VM and that VMI's UID. The VMI alone proves nothing: whoever may create
  VMIs writes its label, status, owner reference and annotations (a copied plan of their own VM
  verifies), and could so pin their VM to a node that holds none of its images. Only prepare,
  running in the launcher of a VMI on this node, writes the marker (with the VMI's UID, which the
  API server assigns), before it makes the first image;
- a **home marker** (``home.node.json``, written by prepare) in ``<hostDisks.root>/<ns>/<vm>/`` on
  this node, naming this node and the directory's VM, not older than the VM (a marker written
  before the VM was created belongs to a deleted VM of the same name: an orphan, never claimed),
  for a VM whose template plan verifies and puts images on the node.

Then: a VM without ``diskhooks.io/node`` gets this node (``record``); a VM that already names this
node needs nothing (``already``); a VM that names another node is left alone (``conflict``: its
images are elsewhere; the agent warns, it never moves a home). Everything else is ``skip`` with a
short ``code`` (for the metrics) and a sentence (for the log).

No I/O, no clock: objects are the API server's JSON as dicts, the plan keys are handed in.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diskplan import keys as K
from diskplan.errors import DiskhooksError
from diskplan.homemarker import HomeMarker, parse_time
from diskplan.plan import DNS_SUBDOMAIN, Plan, PlanKeys, verify_plan

LABEL_VMI_NODE = "kubevirt.io/nodeName"  # set by KubeVirt on a scheduled VMI
KUBEVIRT_API_PREFIX = "kubevirt.io/"
VM_KIND = "VirtualMachine"

RECORD = "record"
ALREADY = "already"
CONFLICT = "conflict"
SKIP = "skip"


@dataclass(frozen=True)
class Decision:
    """What to do about one VM's home.

    - ``action``: :data:`RECORD`, :data:`ALREADY`, :data:`CONFLICT` or :data:`SKIP`.
    - ``code``: the action, or for a skip why (``bare-vmi``, ``orphan``, ``plan-refused``, ...):
      a bounded set, used as a metric label.
    - ``reason``: one sentence for the log and the Event.
    - ``namespace``/``vm``: the VM (empty when the object does not say).
    - ``home``: the VM's current ``diskhooks.io/node``, when it has one.
    - ``vm_uid``/``resource_version``: of the VM read, for the Event and the patch's precondition.
    """

    action: str
    code: str
    reason: str
    namespace: str = ""
    vm: str = ""
    home: str | None = None
    vm_uid: str | None = None
    resource_version: str | None = None
    plan: Plan | None = None


def meta_of(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """``obj.metadata`` when it is a map, else an empty one."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    return meta if isinstance(meta, Mapping) else {}


def annotations_of(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """``obj.metadata.annotations`` when it is a map, else an empty one."""
    ann = meta_of(obj).get("annotations")
    return ann if isinstance(ann, Mapping) else {}


def _str_map(meta: Mapping[str, Any], member: str) -> Mapping[str, Any]:
    value = meta.get(member)
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def object_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    """``(namespace, name)`` of an object ("" for what it does not say)."""
    meta = meta_of(obj)
    return _text(meta.get("namespace")), _text(meta.get("name"))


def owner_vm(vmi: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(name, uid)`` of the VirtualMachine controlling ``vmi`` (its ``ownerReferences`` entry with
    ``controller: true`` and kind VirtualMachine of group kubevirt.io), or None (a bare VMI)."""
    refs = meta_of(vmi).get("ownerReferences")
    for ref in refs if isinstance(refs, list) else []:
        if not isinstance(ref, Mapping) or ref.get("controller") is not True:
            continue
        if ref.get("kind") == VM_KIND and _text(ref.get("apiVersion")).startswith(KUBEVIRT_API_PREFIX):
            name, uid = _text(ref.get("name")), _text(ref.get("uid"))
            if name and uid:
                return name, uid
    return None


def home_of(vm: Mapping[str, Any]) -> str | None:
    """The VM's home node (``metadata.annotations[diskhooks.io/node]``), or None."""
    value = _str_map(meta_of(vm), "annotations").get(K.ANN_NODE)
    return value if isinstance(value, str) and value else None


def vmi_node(vmi: Mapping[str, Any]) -> str | None:
    """The node KubeVirt scheduled ``vmi`` on (its ``kubevirt.io/nodeName`` label)."""
    value = _str_map(meta_of(vmi), "labels").get(LABEL_VMI_NODE)
    return value if isinstance(value, str) and value else None


def vmi_plan_text(vmi: Mapping[str, Any]) -> str | None:
    value = _str_map(meta_of(vmi), "annotations").get(K.ANN_PLAN)
    return value if isinstance(value, str) else None


def template_plan_text(vm: Mapping[str, Any]) -> str | None:
    """The plan on the VM's ``spec.template.metadata.annotations`` (where the webhook writes it)."""
    spec = vm.get("spec") if isinstance(vm, Mapping) else None
    template = spec.get("template") if isinstance(spec, Mapping) else None
    value = _str_map(meta_of(template), "annotations").get(K.ANN_PLAN) \
        if isinstance(template, Mapping) else None
    return value if isinstance(value, str) else None


def creation_time(obj: Mapping[str, Any]) -> datetime.datetime | None:
    """``metadata.creationTimestamp`` as an aware datetime, or None when absent or unreadable."""
    text = meta_of(obj).get("creationTimestamp")
    if not isinstance(text, str):
        return None
    try:
        return parse_time(text, field="metadata.creationTimestamp")
    except DiskhooksError:
        return None


def verified_plan(text: str | None, keys: PlanKeys, *, namespace: str, vm: str,
                  where: str) -> Plan | Decision:
    """The plan of ``text`` if it verifies for ``namespace``/``vm`` and puts images on the node;
    else the ``skip`` :class:`Decision` saying why."""
    if text is None:
        return Decision(SKIP, "no-plan", f"{where} carries no diskhooks plan", namespace, vm)
    try:
        plan = verify_plan(text, keys, namespace=namespace, vm=vm, field_path=where)
    except DiskhooksError as exc:
        return Decision(SKIP, "plan-refused", f"not trusted: {exc}", namespace, vm)
    if not plan.disks and plan.persist_root is None:
        return Decision(SKIP, "nothing-on-node", "its plan puts no image on the node (no disks, no "
                        "persistent root)", namespace, vm, plan=plan)
    return plan


def _decide_home(vm: Mapping[str, Any], *, node: str, namespace: str, name: str, plan: Plan,
                 source: str) -> Decision:
    meta = meta_of(vm)
    uid, rv = _text(meta.get("uid")) or None, _text(meta.get("resourceVersion")) or None
    home = home_of(vm)
    if home is None:
        return Decision(RECORD, RECORD, f"home node recorded: {node} ({source})", namespace, name,
                        None, uid, rv, plan)
    if home == node:
        return Decision(ALREADY, ALREADY, f"the VM's home is this node already ({node})", namespace,
                        name, home, uid, rv, plan)
    shown = home if DNS_SUBDOMAIN.match(home) else repr(home[:64])
    return Decision(CONFLICT, CONFLICT,
                    f"{source}, but the VM's home node is {shown}, where its images are; the home "
                    f"is not changed (move a VM with diskhooks' migration, never by hand)",
                    namespace, name, home, uid, rv, plan)


def decide_from_vmi(vmi: Mapping[str, Any], vm: Mapping[str, Any] | None, *, node: str,
                    keys: PlanKeys, marker: HomeMarker | str) -> Decision:
    """The home decision for a VMI this agent saw (``vm``: its VirtualMachine as read from the API
    server now, or None when there is none; ``marker``: this node's home marker in the VM's
    directory as read now, or why there is none).

    A ``record`` (and a ``conflict``, whose Warning says the VMI runs here) needs the marker to
    vouch for the VMI (:func:`marker_vouches`); otherwise it is a ``skip`` saying why."""
    namespace, name = object_key(vmi)
    if not namespace or not name:
        return Decision(SKIP, "malformed", "the VMI has no namespace or name")
    scheduled = vmi_node(vmi)
    if scheduled != node:
        return Decision(SKIP, "other-node", f"the VMI is scheduled on {scheduled!r}, not this node",
                        namespace, name)
    owner = owner_vm(vmi)
    if owner is None:
        return Decision(SKIP, "bare-vmi", "a VMI without a VirtualMachine: no home is recorded (its "
                        "images live as long as the node keeps them, like the VMI's)", namespace, name)
    vm_name, vm_uid = owner
    if vm is None:
        return Decision(SKIP, "no-vm", f"its VirtualMachine {vm_name} does not exist (any more)",
                        namespace, vm_name)
    if _text(meta_of(vm).get("uid")) != vm_uid:
        return Decision(SKIP, "vm-replaced", f"the VirtualMachine {vm_name} is not the one that owns "
                        "this VMI (deleted and created again)", namespace, vm_name)
    if meta_of(vm).get("deletionTimestamp"):
        return Decision(SKIP, "vm-deleting", "the VirtualMachine is being deleted", namespace, vm_name)
    plan = verified_plan(vmi_plan_text(vmi), keys, namespace=namespace, vm=vm_name,
                         where=f"VMI {namespace}/{name} {K.ANN_PLAN}")
    if isinstance(plan, Decision):
        return plan
    uid = _text(meta_of(vmi).get("uid"))
    decision = _decide_home(vm, node=node, namespace=namespace, name=vm_name, plan=plan,
                            source=f"its VMI (uid {uid or '?'}) runs here")
    if decision.action == ALREADY:
        return decision
    refusal = marker_vouches(marker, node=node, namespace=namespace, vm=vm_name, vmi_uid=uid)
    if refusal is None:
        return decision
    code, why = refusal
    return Decision(SKIP, code, f"its VMI (uid {uid or '?'}) is labelled for this node, but {why}; "
                    "nothing recorded (the VMI's labels and status are written by whoever creates it: "
                    "only prepare's marker proves that its images are here)", namespace, vm_name,
                    decision.home, decision.vm_uid, decision.resource_version, plan)


def marker_vouches(marker: HomeMarker | str, *, node: str, namespace: str, vm: str,
                   vmi_uid: str) -> tuple[str, str] | None:
    """None when ``marker`` (this node's ``home.node.json`` in the directory of ``namespace/vm``)
    says that prepare ran here for the VMI ``vmi_uid``; else ``(code, why)``. A ``str`` marker is
    the reason there is none (missing, unreadable)."""
    if isinstance(marker, str):
        return "no-marker", (f"this node has no usable home marker for VM {namespace}/{vm} ({marker}); "
                             "prepare writes one before the first image")
    if (marker.namespace, marker.vm) != (namespace, vm):
        return "marker-misplaced", f"the home marker names VM {marker.namespace}/{marker.vm}"
    if marker.node != node:
        return "marker-other-node", f"the home marker was written on node {marker.node}"
    if not vmi_uid or marker.vmi_uid != vmi_uid:
        return "marker-other-vmi", (f"the home marker was written for VMI {marker.vmi_uid}, not this "
                                    "one (prepare has not run for it here)")
    return None


def decide_from_marker(marker: HomeMarker, vm: Mapping[str, Any] | None, *, node: str,
                       namespace: str, vm_name: str, keys: PlanKeys) -> Decision:
    """The home decision for the marker found in ``<root>/<namespace>/<vm_name>/`` (``vm``: the
    VirtualMachine ``namespace/vm_name`` as read now, or None)."""
    if (marker.namespace, marker.vm) != (namespace, vm_name):
        return Decision(SKIP, "marker-misplaced", f"the marker names {marker.namespace}/{marker.vm} "
                        "but lies in another VM's directory", namespace, vm_name)
    if marker.node != node:
        return Decision(SKIP, "marker-other-node", f"the marker was written on node {marker.node}, "
                        "not this one (a copied directory?)", namespace, vm_name)
    if vm is None:
        return Decision(SKIP, "orphan", "no VirtualMachine of that name exists: the images belong "
                        "to a deleted VM", namespace, vm_name)
    if meta_of(vm).get("deletionTimestamp"):
        return Decision(SKIP, "vm-deleting", "the VirtualMachine is being deleted", namespace, vm_name)
    created = creation_time(vm)
    if created is None:
        return Decision(SKIP, "malformed", "the VirtualMachine has no readable creationTimestamp",
                        namespace, vm_name)
    # creationTimestamp has whole seconds; compare at that resolution, so that a marker written
    # in the VM's first second still counts
    if marker.written_at.replace(microsecond=0) < created:
        return Decision(SKIP, "orphan", f"the marker (written {marker.written_at.isoformat()}) is "
                        f"older than the VirtualMachine (created {created.isoformat()}): it belongs "
                        "to a deleted VM of the same name", namespace, vm_name)
    plan = verified_plan(template_plan_text(vm), keys, namespace=namespace, vm=vm_name,
                         where=f"VM {namespace}/{vm_name} spec.template {K.ANN_PLAN}")
    if isinstance(plan, Decision):
        return plan
    return _decide_home(vm, node=node, namespace=namespace, name=vm_name, plan=plan,
                        source=f"its images are here (home marker of VMI {marker.vmi_uid})")


def home_patch(node: str, resource_version: str | None) -> dict[str, Any]:
    """The JSON merge patch that records ``node`` as the VM's home: the annotation, the label the
    agents select their VMs by (the webhook keeps it equal to the annotation), and the
    ``resourceVersion`` read, so that a VM changed since is a conflict, not overwritten."""
    meta: dict[str, Any] = {"annotations": {K.ANN_NODE: node}, "labels": {K.LABEL_NODE: node}}
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {"metadata": meta}
