"""The home node (``diskhooks.io/node``): who may set it, and what the webhook derives from it.

Pure. A VM's images live on one node; the node agent (``diskhooks-node``) records that node on the
VM's ``metadata.annotations[diskhooks.io/node]`` after its first start. The rules:

- **Who** (:func:`decide_home`): only the node agent's ServiceAccount (policy
  ``nodeAgent.serviceAccount``, the AdmissionReview's ``userInfo.username``) may set, change or
  remove the annotation; without a configured agent nobody may. Anyone else is denied when a
  CREATE carries it or an UPDATE adds or changes it; an UPDATE that merely omits it (``kubectl
  replace`` of a manifest without it) gets it back from the old object, with a warning, so a VM is
  never silently unpinned.
- **The agent's updates** (:func:`check_agent_update`): RBAC cannot narrow the agent's ``patch``
  right to one annotation, so the webhook does: an UPDATE by the agent may change nothing but the
  annotation (and what the webhook itself derives from it: the label, the plan, the affinity).
- **What is derived** (:func:`finish_home`), on every admitted VM: the label
  ``diskhooks.io/node`` on the VM's metadata, always equal to the annotation (removed without it;
  users cannot set it either), so each agent watches only its VMs; and, for a VM whose plan holds
  images on a node (disks, a persistent root, detached disks), the plan's ``node`` (plan version 3)
  and a required node affinity ``kubernetes.io/hostname In [node]`` on ``spec.template.spec``,
  ANDed into every ``nodeSelectorTerm`` of the user's own required node affinity (a new term when
  there is none). The expression the webhook wrote before (for the node its previous plans named)
  is removed first, so a second call changes nothing and a new home replaces the old one;
  preferred terms and pod (anti-)affinity are never touched.

Where KubeVirt puts what matters (``pkg/virt-controller/watch/vm/vm.go``, ``syncRestartRequired``):
only ``spec.template.spec`` is compared with the spec the VMI was started from. The annotation and
label live on the VM's own metadata and the plan on the template's metadata, which are never
compared; the affinity is in ``spec.template.spec`` and is live-updated to the running VMI under
the ``LiveUpdate`` rollout strategy (under ``Stage``, KubeVirt's default, it makes the VM
``RestartRequired`` once, until the next start, which it does not change: the VM already runs on
its home).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

from diskplan import keys as K
from diskplan.errors import Refused
from diskplan.migration import ANN_MIGRATE_DELETE_SOURCE, ANN_MIGRATE_TO, ANN_MIGRATION_STATUS
from diskplan.plan import PlanKeys, is_node_name, sign_plan
from diskplan.policy import Policy
from webhook.mutation import Mutation
from webhook.sizing import child_dict
from webhook.vm.planverify import verified_plan
from webhook.vm.shape import as_map, json_copy, name_of

NODE_FIELD = f"metadata.annotations[{K.ANN_NODE}]"
LABEL_FIELD = f"metadata.labels[{K.LABEL_NODE}]"
HOSTNAME_KEY = "kubernetes.io/hostname"
REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"
MAX_LABEL_VALUE = 63  # the label mirrors the node name, and a label value has at most 63 characters
MIGRATE_HINT = "move a VM with kubectl diskhooks migrate"
# what the API server (not the requester) changes on every write: never the agent's doing
SERVER_METADATA = ("managedFields", "resourceVersion", "generation")
MIGRATION_KEYS = (ANN_MIGRATE_TO, ANN_MIGRATE_DELETE_SOURCE, ANN_MIGRATION_STATUS)


@dataclass(frozen=True)
class Home:
    """The home node after this request: ``node`` (the annotation's value, None without one),
    ``old_node`` (the old object's), ``restored`` (an UPDATE that omitted it got it back) and the
    warnings for the requester."""

    node: str | None
    old_node: str | None = None
    restored: bool = False
    warnings: tuple[str, ...] = ()


def node_of(meta: Mapping[str, Any]) -> str | None:
    """The ``diskhooks.io/node`` annotation of an object's metadata (None when absent)."""
    value = as_map(meta.get("annotations")).get(K.ANN_NODE)
    return value if isinstance(value, str) else None


def decide_home(obj: Mapping[str, Any], old_obj: Mapping[str, Any] | None, *, operation: str,
                username: str, policy: Policy) -> Home:
    """Apply the access rule (see the module doc) to a VM CREATE or UPDATE. Raises
    :class:`Refused` naming the annotation and the rule."""
    meta = as_map(obj.get("metadata"))
    annotations = as_map(meta.get("annotations"))
    node = node_of(meta)
    if K.ANN_NODE in annotations and node is None:
        raise Refused(NODE_FIELD, "must be a string (a node name)")
    old_node = node_of(as_map(old_obj.get("metadata"))) if isinstance(old_obj, Mapping) else None
    agent = policy.node_agent.username
    if agent is not None and username == agent:
        if operation == "UPDATE":
            check_agent_update(obj, old_obj, agent=agent, nodes=(node, old_node))
        _check_value(node)
        return Home(node, old_node)
    if operation == "UPDATE" and node is None and old_node is not None:
        kept = (f"{NODE_FIELD}: this update omits the VM's home node {old_node!r}; it is kept (the VM's "
                f"images live there, and only the diskhooks node agent changes it; {MIGRATE_HINT})")
        return Home(old_node, old_node, restored=True, warnings=(kept,))
    if node is not None and (operation != "UPDATE" or node != old_node):
        who = ("only the diskhooks node agent "
               f"({agent}) may set the home node" if agent is not None else
               "no diskhooks node agent is configured (policy nodeAgent.serviceAccount), so nobody "
               "may set the home node")
        raise Refused(NODE_FIELD, f"{who}; {MIGRATE_HINT}")
    _check_value(node)
    return Home(node, old_node)


def _check_value(node: str | None) -> None:
    if node is None:
        return
    if not is_node_name(node):
        raise Refused(NODE_FIELD, f"{node[:80]!r} is not a node name (a DNS-1123 subdomain)")
    if len(node) > MAX_LABEL_VALUE:
        raise Refused(NODE_FIELD, f"the node name {node[:80]!r}... is longer than {MAX_LABEL_VALUE} "
                      f"characters, so it cannot be the value of the label {K.LABEL_NODE} that "
                      "mirrors it (diskhooks supports node names up to 63 characters)")


def with_node(obj: Mapping[str, Any], node: str) -> dict[str, Any]:
    """A copy of ``obj`` whose annotation ``diskhooks.io/node`` is ``node``."""
    new = json_copy(obj)
    meta = new.get("metadata")
    if not isinstance(meta, dict):
        meta = new["metadata"] = {}
    child_dict(meta, "annotations", "metadata")[K.ANN_NODE] = node
    return new


# ------------------------------------------------------------------------------------------------
# the agent's own updates
# ------------------------------------------------------------------------------------------------
def check_agent_update(obj: Mapping[str, Any], old_obj: Mapping[str, Any] | None, *, agent: str,
                       nodes: Collection[str | None]) -> None:
    """The node agent's UPDATE changes nothing but ``diskhooks.io/node``: the old and the new object
    are compared without it, without what the webhook derives from it (label, plan, affinity
    expression for either node) and without what the API server itself changes (managed fields,
    resource version, generation; ``status``, which an update of the main resource cannot
    change). Raises :class:`Refused` naming the first other change."""
    known = {n for n in nodes if n}
    before = _without_home(old_obj if isinstance(old_obj, Mapping) else {}, known)
    after = _without_home(obj, known)
    where = first_difference(before, after)
    if where is not None:
        raise Refused(NODE_FIELD, f"the diskhooks node agent ({agent}) may change only this annotation "
                      f"of a VirtualMachine, but this update also changes {where or 'the object'} "
                      "(RBAC cannot narrow the agent's patch right to one annotation, so the webhook "
                      "does)")


def _without_home(obj: Mapping[str, Any], known: Collection[str]) -> dict[str, Any]:
    out = json_copy(obj)
    out.pop("status", None)
    meta = out.get("metadata")
    if isinstance(meta, dict):
        for key in SERVER_METADATA:
            meta.pop(key, None)
        _drop(meta, "annotations", K.ANN_NODE)
        for key in MIGRATION_KEYS:  # what the agent may do with these: webhook.vm.migration
            _drop(meta, "annotations", key)
        _drop(meta, "labels", K.LABEL_NODE)
    template = as_map(as_map(out.get("spec")).get("template"))
    tmeta = template.get("metadata")
    if isinstance(tmeta, dict):
        _drop(tmeta, "annotations", K.ANN_PLAN)
    tspec = template.get("spec")
    if isinstance(tspec, dict):
        _unpin(tspec, [home_expression(n) for n in known])
    return out


def _drop(parent: dict[str, Any], bag: str, key: str) -> None:
    """Remove ``parent[bag][key]``, and the bag when that empties it (an empty bag reads as none)."""
    value = parent.get(bag)
    if isinstance(value, dict):
        value.pop(key, None)
        if not value:
            del parent[bag]


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first path (``spec.template.spec.domain``, ``metadata.labels[app]``) where ``a`` and
    ``b`` differ, None when they are equal."""
    if a == b:
        return None
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            x, y = a.get(key, _MISSING), b.get(key, _MISSING)
            if x != y:
                step = f"{path}[{key}]" if path.endswith(("annotations", "labels")) \
                    else (f"{path}.{key}" if path else str(key))
                if x is _MISSING and isinstance(y, Mapping):  # a missing object reads as an empty one
                    x = {}
                if y is _MISSING and isinstance(x, Mapping):
                    y = {}
                return step if _MISSING in (x, y) else first_difference(x, y, step)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
    return path


_MISSING = object()


# ------------------------------------------------------------------------------------------------
# what the webhook derives: label, plan node, affinity
# ------------------------------------------------------------------------------------------------
def home_expression(node: str) -> dict[str, Any]:
    """The node selector requirement that pins a VM to ``node``."""
    return {"key": HOSTNAME_KEY, "operator": "In", "values": [node]}


def pin_affinity(spec: dict[str, Any], node: str | None, known: Collection[str], spec_path: str) -> None:
    """Edit ``spec`` (the caller's copy of a VMI spec) so that its required node affinity pins it to
    ``node`` (None: to no node): the expressions for every node in ``known`` (those the webhook may
    have written before) and ``node`` are removed first, then ``node``'s is appended to every
    ``nodeSelectorTerm`` (a new term when there is none). Idempotent."""
    ours = [home_expression(n) for n in sorted({*known, *([node] if node else [])})]
    _unpin(spec, ours)
    if node is None:
        return
    expr = home_expression(node)
    affinity = child_dict(spec, "affinity", spec_path)
    node_affinity = child_dict(affinity, "nodeAffinity", f"{spec_path}.affinity")
    required = child_dict(node_affinity, REQUIRED, f"{spec_path}.affinity.nodeAffinity")
    where = f"{spec_path}.affinity.nodeAffinity.{REQUIRED}.nodeSelectorTerms"
    terms = required.get("nodeSelectorTerms")
    if not terms:
        required["nodeSelectorTerms"] = [{"matchExpressions": [expr]}]
        return
    if not isinstance(terms, list):
        raise Refused(where, "must be a list")
    for i, term in enumerate(terms):
        if not isinstance(term, dict):
            raise Refused(f"{where}[{i}]", "must be an object")
        exprs = term.get("matchExpressions")
        if exprs is None:
            term["matchExpressions"] = [expr]
        elif isinstance(exprs, list):
            exprs.append(expr)
        else:
            raise Refused(f"{where}[{i}].matchExpressions", "must be a list")


def _unpin(spec: dict[str, Any], ours: list[dict[str, Any]]) -> None:
    """Remove ``ours`` from every required term; a term left empty (the webhook's own) is dropped,
    and so is every enclosing object this empties. Anything not as expected is left alone."""
    affinity = spec.get("affinity")
    node_affinity = affinity.get("nodeAffinity") if isinstance(affinity, dict) else None
    required = node_affinity.get(REQUIRED) if isinstance(node_affinity, dict) else None
    terms = required.get("nodeSelectorTerms") if isinstance(required, dict) else None
    if not ours or not isinstance(terms, list):
        return
    kept: list[Any] = []
    removed = False
    for term in terms:
        exprs = term.get("matchExpressions") if isinstance(term, dict) else None
        if isinstance(exprs, list) and any(e in ours for e in exprs):
            removed = True
            left = [e for e in exprs if e not in ours]
            if left:
                term["matchExpressions"] = left
            else:
                del term["matchExpressions"]
                if not term:  # nothing but the webhook's expression: the webhook's own term
                    continue
        kept.append(term)
    if not removed:
        return
    assert isinstance(affinity, dict) and isinstance(node_affinity, dict) and isinstance(required, dict)
    if kept:
        required["nodeSelectorTerms"] = kept
        return
    del required["nodeSelectorTerms"]
    for parent, key, child in ((node_affinity, REQUIRED, required), (affinity, "nodeAffinity", node_affinity),
                               (spec, "affinity", affinity)):
        if child:
            return
        del parent[key]


def _names_node(text: Any) -> bool:
    """Whether a plan's text may name a node (a cheap test before verifying it: the canonical JSON
    the webhook writes has ``"node":`` only in a version-3 plan)."""
    return isinstance(text, str) and '"node":' in text


def _plan_text(obj: Mapping[str, Any] | None) -> Any:
    template = as_map(as_map(as_map(obj).get("spec")).get("template"))
    return as_map(as_map(template.get("metadata")).get("annotations")).get(K.ANN_PLAN)


def finish_home(m: Mutation, home: Home, *, old_obj: Mapping[str, Any] | None, namespace: str,
                plan_keys: PlanKeys) -> Mutation:
    """The admitted VM (``m.obj``) with what the home node derives (see the module doc): the label,
    and for a plan that holds images on a node the plan's ``node`` (re-signed) and the affinity.
    Adds ``home``'s warnings. ``m.obj`` is not modified (a copy is made when anything changes)."""
    obj = m.obj
    meta = as_map(obj.get("metadata"))
    labels = as_map(meta.get("labels"))
    label_ok = labels.get(K.LABEL_NODE) == home.node if home.node is not None else K.LABEL_NODE not in labels
    text, old_text = _plan_text(obj), _plan_text(old_obj)
    involved = home.node is not None or home.old_node is not None or _names_node(text) \
        or _names_node(old_text)
    warnings = m.warnings + home.warnings
    if label_ok and not involved:
        return Mutation(obj, warnings) if home.warnings else m
    new = json_copy(obj)
    new_meta = new.setdefault("metadata", {})
    if home.node is not None:
        child_dict(new_meta, "labels", "metadata")[K.LABEL_NODE] = home.node
    else:
        _drop(new_meta, "labels", K.LABEL_NODE)
    template = as_map(as_map(new.get("spec")).get("template"))
    tmeta, tspec = template.get("metadata"), template.get("spec")
    if not involved or not isinstance(tmeta, dict) or not isinstance(tspec, dict):
        return Mutation(new, warnings)
    name = name_of(meta)
    plan = verified_plan(tmeta, namespace=namespace, name=name, plan_keys=plan_keys)
    old_plan = verified_plan(as_map(as_map(as_map(old_obj).get("spec")).get("template")).get("metadata")
                             or {}, namespace=namespace, name=name, plan_keys=plan_keys) \
        if _names_node(old_text) else None
    known = {n for n in (home.node, home.old_node, *(p.node for p in (plan, old_plan) if p is not None))
             if n}
    wanted = home.node if plan is not None and plan.holds_files else None
    if plan is not None and plan.node != wanted:
        tmeta["annotations"][K.ANN_PLAN] = sign_plan(replace(plan, node=wanted), plan_keys)
    pin_affinity(tspec, wanted, known, "spec.template.spec")
    return Mutation(new, warnings)


def bare_vmi_warnings(meta: Mapping[str, Any]) -> tuple[str, ...]:
    """A bare VMI has no home node (no VM to record it on): the annotation means nothing there."""
    if K.ANN_NODE not in as_map(meta.get("annotations")):
        return ()
    note = (f"{NODE_FIELD} has no effect on a VirtualMachineInstance: diskhooks records a home node "
            "only on a VirtualMachine; a bare VMI's images are as ephemeral as its name on the node "
            "it runs on")
    return (note,)

