"""Cold migration requests on a VirtualMachine: who may write what, and when a request is admitted.

Pure but for the two lookups (:class:`webhook.cluster.NodeLookups`). The annotations
(:mod:`diskplan.migration`):

- ``diskhooks.io/migrate-to: <node>`` — written by users (whoever may update the VM), removed by
  the source node's agent when the migration ends. A user may set it only on an existing VM that
  has a home node, to a Node that exists and is not that home, while the VM is stopped (its spec
  does not start it and it has no VMI) and no other migration is under way. Removing it withdraws
  the request (the agent stops the copy; the VM stays where it is). Changing it to another node
  while set is refused (withdraw first).
- ``diskhooks.io/migrate-delete-source: "true"|"false"`` — with ``migrate-to`` only.
- ``diskhooks.io/migration-status`` — written only by the node agents: anyone else is refused
  setting or changing it, and an update that merely omits it (``kubectl replace``) gets it back.
- While ``migrate-to`` is set, an update that starts the VM is refused: the agents copy a stopped
  VM's images, and a running VM would change them under the copy.

The agent's own updates (``nodeAgent.serviceAccount``) may remove the request but never set or
change it, may write the status, and may move the home (``diskhooks.io/node``) from one node to
another only to the node the old object's request names, in the same update that removes the
request, and only for a stopped VM: so no agent can re-pin a VM anywhere nobody asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diskplan import keys as K
from diskplan.errors import Malformed, Refused
from diskplan.migration import (
    ANN_MIGRATE_DELETE_SOURCE,
    ANN_MIGRATE_TO,
    ANN_MIGRATION_STATUS,
    parse_status,
    status_of,
    stop_problem,
)
from diskplan.plan import is_node_name
from diskplan.policy import Policy
from webhook.cluster import ClusterError, NodeLookups
from webhook.sizing import child_dict
from webhook.vm.home import node_of
from webhook.vm.shape import as_map, json_copy, name_of
from webhook.vm.updates import starts

HINT = "kubectl diskhooks migrate NAMESPACE/VM --to NODE"
KEYS = (ANN_MIGRATE_TO, ANN_MIGRATE_DELETE_SOURCE, ANN_MIGRATION_STATUS)


def _field(key: str) -> str:
    return f"metadata.annotations[{key}]"


def check_migration(obj: Mapping[str, Any], old_obj: Mapping[str, Any] | None, *, operation: str,
                    username: str, policy: Policy, namespace: str,
                    cluster: object) -> tuple[Mapping[str, Any], tuple[str, ...]]:
    """Apply the rules of the module doc to a VM CREATE or UPDATE. Returns the object (a copy with
    the status put back when an update omitted it) and warnings; raises :class:`Refused`."""
    meta = as_map(obj.get("metadata"))
    ann = as_map(meta.get("annotations"))
    old_ann = as_map(as_map(old_obj.get("metadata")).get("annotations")) if old_obj is not None else {}
    for key in KEYS:
        if key in ann and not isinstance(ann[key], str):
            raise Refused(_field(key), "must be a string")
    if not any(k in ann or k in old_ann for k in KEYS) and not _home_moves(obj, old_obj, operation):
        return obj, ()
    agent = policy.node_agent.username
    if agent is not None and username == agent:
        _check_agent(obj, old_obj, ann, old_ann, operation=operation)
        return obj, ()
    return _check_user(obj, old_obj, ann, old_ann, operation=operation, namespace=namespace, cluster=cluster)


def _home_moves(obj: Mapping[str, Any], old_obj: Mapping[str, Any] | None, operation: str) -> bool:
    if operation != "UPDATE" or old_obj is None:
        return False
    old_home, new_home = node_of(as_map(old_obj.get("metadata"))), node_of(as_map(obj.get("metadata")))
    return old_home is not None and new_home is not None and old_home != new_home


# ------------------------------------------------------------------------------------------------
# the agents
# ------------------------------------------------------------------------------------------------
def _check_agent(obj: Mapping[str, Any], old_obj: Mapping[str, Any] | None, ann: Mapping[str, Any],
                 old_ann: Mapping[str, Any], *, operation: str) -> None:
    for key in (ANN_MIGRATE_TO, ANN_MIGRATE_DELETE_SOURCE):
        if key in ann and ann.get(key) != old_ann.get(key):
            raise Refused(_field(key), "the diskhooks node agent may remove a migration request, never "
                          "make or change one")
    status = ann.get(ANN_MIGRATION_STATUS)
    if status is not None and status != old_ann.get(ANN_MIGRATION_STATUS):
        try:
            parse_status(status)
        except Malformed as exc:
            raise Refused(exc.field, exc.reason) from None
    if not _home_moves(obj, old_obj, operation):
        return
    assert old_obj is not None
    old_home, new_home = node_of(as_map(old_obj.get("metadata"))), node_of(as_map(obj.get("metadata")))
    asked = old_ann.get(ANN_MIGRATE_TO)
    if asked != new_home:
        raise Refused(_field(K.ANN_NODE), f"the diskhooks node agent moves a VM's home (from {old_home!r}) "
                      f"only to the node its migration request names ({_field(ANN_MIGRATE_TO)}: "
                      f"{asked!r}), not to {new_home!r}")
    if ANN_MIGRATE_TO in ann:
        raise Refused(_field(ANN_MIGRATE_TO), "the update that hands a VM's home over must remove the "
                      "migration request")
    problem = stop_problem(as_map(obj.get("spec")))
    if problem is not None:
        raise Refused(_field(K.ANN_NODE), f"the home of a VM that may run cannot move ({problem})")


# ------------------------------------------------------------------------------------------------
# users
# ------------------------------------------------------------------------------------------------
def _check_user(obj: Mapping[str, Any], old_obj: Mapping[str, Any] | None, ann: Mapping[str, Any],
                old_ann: Mapping[str, Any], *, operation: str, namespace: str,
                cluster: object) -> tuple[Mapping[str, Any], tuple[str, ...]]:
    warnings: list[str] = []
    if operation != "UPDATE" or old_obj is None:
        for key in KEYS:
            if key in ann:
                raise Refused(_field(key), "a new VirtualMachine has no images on any node to migrate; "
                              f"ask for a migration of an existing VM ({HINT})"
                              if key != ANN_MIGRATION_STATUS else "is written by the diskhooks node agents "
                              "only")
        return obj, ()
    new_status, old_status = ann.get(ANN_MIGRATION_STATUS), old_ann.get(ANN_MIGRATION_STATUS)
    if new_status != old_status:
        if new_status is None:
            obj = json_copy(obj)
            meta = obj.get("metadata")
            assert isinstance(meta, dict)
            child_dict(meta, "annotations", "metadata")[ANN_MIGRATION_STATUS] = old_status
        else:
            raise Refused(_field(ANN_MIGRATION_STATUS), "is written by the diskhooks node agents only")
    new_to, old_to = ann.get(ANN_MIGRATE_TO), old_ann.get(ANN_MIGRATE_TO)
    delete = ann.get(ANN_MIGRATE_DELETE_SOURCE)
    if delete is not None:
        if delete not in ("true", "false"):
            raise Refused(_field(ANN_MIGRATE_DELETE_SOURCE), 'must be "true" or "false"')
        if new_to is None:
            raise Refused(_field(ANN_MIGRATE_DELETE_SOURCE), f"goes only with {ANN_MIGRATE_TO}")
    spec, old_spec = as_map(obj.get("spec")), as_map(old_obj.get("spec"))
    if new_to != old_to:
        if new_to is None:
            warnings.append(f"{_field(ANN_MIGRATE_TO)}: the migration to node {old_to} is withdrawn; the "
                            "agent stops it and the VM stays on its node")
        else:
            _check_request(str(new_to), old_to, obj, old_obj, spec=spec, namespace=namespace, cluster=cluster)
    elif new_to is not None and delete != old_ann.get(ANN_MIGRATE_DELETE_SOURCE):
        raise Refused(_field(ANN_MIGRATE_DELETE_SOURCE), "cannot change while the migration is under way")
    if new_to is not None and starts(spec, old_spec):
        raise Refused("spec", f"VM is being migrated to node {new_to} ({_field(ANN_MIGRATE_TO)}); it cannot "
                      "start until the migration ends, or withdraw the request first "
                      f"(kubectl diskhooks migrate --cancel {namespace}/{name_of(as_map(obj.get('metadata')))})")
    return obj, tuple(warnings)


def _check_request(target: str, old_to: Any, obj: Mapping[str, Any], old_obj: Mapping[str, Any], *,
                   spec: Mapping[str, Any], namespace: str, cluster: object) -> None:
    where = _field(ANN_MIGRATE_TO)
    if old_to is not None:
        raise Refused(where, f"a migration to node {old_to} is under way; withdraw it first (remove the "
                      "annotation), then ask again")
    if not is_node_name(target):
        raise Refused(where, f"{target[:80]!r} is not a node name")
    home = node_of(as_map(old_obj.get("metadata")))
    if home is None:
        raise Refused(where, "the VM has no home node yet (it never started with diskhooks images): there "
                      "is nothing to move; it starts wherever it is scheduled")
    if target == home:
        raise Refused(where, f"node {target} is already the VM's home")
    status = status_of(as_map(as_map(old_obj.get("metadata")).get("annotations")))
    if status is not None and not status.done:
        raise Refused(where, f"the migration {status.id} to node {status.target} is still {status.phase}; "
                      "wait for it to end")
    problem = stop_problem(spec)
    if problem is not None:
        raise Refused(where, f"only a stopped VM can migrate, and {problem}; stop it first (or "
                      f"{HINT} --stop)")
    if not isinstance(cluster, NodeLookups):
        raise Refused(where, "this webhook cannot look up Nodes and VMIs, so it cannot check the request")
    name = name_of(as_map(obj.get("metadata")))
    try:
        node = cluster.get_node(target)
        vmi = cluster.get_vmi(namespace, name) if name else None
    except ClusterError as exc:
        raise Refused(where, f"cannot check the request: {exc}") from None
    if node is None:
        raise Refused(where, f"there is no Node named {target!r}")
    if vmi is not None:
        phase = as_map(vmi.get("status")).get("phase")
        raise Refused(where, f"the VM still has a VirtualMachineInstance (phase {phase}); wait until it is "
                      "gone")
