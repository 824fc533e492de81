"""The home node in the VM mutation (``webhook/vm/home.py``) and the admission layer's ``userInfo``.

Who may set ``diskhooks.io/node`` (only the node agent's ServiceAccount of the policy), what an
UPDATE that omits it gets (the old value back, with a warning), what the agent may change (nothing
else), and what the webhook derives from it (the mirrored label, the plan's ``node``, the required
node affinity): called directly on real objects (the API server's own VM admission objects and the
demo VM), every result checked against KubeVirt's schema (``tests/kubevirt_schema.py``), for
idempotence (a second call, a re-submission) and for the VMI KubeVirt would make from it.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
from typing import Any

import jsonpatch
import pytest
import yaml

from diskplan import keys as K
from diskplan.errors import Malformed, Refused
from diskplan.migration import ANN_MIGRATE_TO
from diskplan.plan import Plan, PlanKeys, sign_plan, verify_plan
from diskplan.policy import Policy, load_policy
from tests.conftest import ADMISSION, DATA, EXAMPLE_POLICY, ROOT
from tests.kubevirt_schema import assert_valid_vm
from webhook.admission import handle_review, parse_request, patch_of
from webhook.cluster import FileCluster
from webhook.mutation import Mutation
from webhook.vm.home import (
    HOSTNAME_KEY,
    REQUIRED,
    first_difference,
    home_expression,
    pin_affinity,
)
from webhook.vm.mutate import mutate_vm, mutate_vmi

KEYS = PlanKeys(current=b"home-node-test-plan-key-0123456789")
POLICY = load_policy(EXAMPLE_POLICY.read_text())
NO_AGENT = load_policy(re.sub(r"(?m)^  serviceAccount: diskhooks-system/diskhooks-node.*\n", "",
                              EXAMPLE_POLICY.read_text()))
AGENT = "system:serviceaccount:diskhooks-system:diskhooks-node"
ALICE = "alice"
CLUSTER = FileCluster.from_text((DATA / "vm-cluster-objects.yaml").read_text())
DEMO_CLUSTER = FileCluster.from_text((ROOT / "examples" / "demo" / "cluster-objects.yaml").read_text())
NODE_FIELD = f"metadata.annotations[{K.ANN_NODE}]"


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def api_vm() -> dict[str, Any]:
    """The VM kube-apiserver sent on a real CREATE (one diskhooks disk)."""
    return dict(json.loads((ADMISSION / "vm-create.json").read_text())["request"]["object"])


def demo_vm() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "examples" / "demo" / "vm.yaml").read_text()))


def plain_vm() -> dict[str, Any]:
    vm = api_vm()
    for key in list(vm["metadata"].get("annotations", {})):
        if key.startswith(K.PREFIX):
            del vm["metadata"]["annotations"][key]
    return vm


def call(vm: dict[str, Any], *, user: str = ALICE, operation: str = "CREATE",
         old: dict[str, Any] | None = None, policy: Policy = POLICY,
         cluster: FileCluster = CLUSTER) -> Mutation:
    return mutate_vm(vm, operation=operation, old_obj=old, namespace="vms", policy=policy,
                     plan_keys=KEYS, cluster=cluster, username=user)


def checked(vm: dict[str, Any], *, user: str = ALICE, operation: str = "CREATE",
            old: dict[str, Any] | None = None, cluster: FileCluster = CLUSTER) -> Mutation:
    """Mutate and check what always holds: input untouched, schema-valid, a second call (API
    server reinvocation) changes nothing, and the VMI made from the template is admitted as is."""
    pristine, old_pristine = copy.deepcopy(vm), copy.deepcopy(old)
    m = call(vm, user=user, operation=operation, old=old, cluster=cluster)
    assert vm == pristine and old == old_pristine, "the inputs must never be modified"
    assert_valid_vm(m.obj)
    again = call(m.obj, user=user, operation=operation, old=old, cluster=cluster)
    assert again.obj == m.obj, "a second call on the result must change nothing"
    if K.ANN_PLAN in tmeta(m.obj).get("annotations", {}):
        vmi = vmi_from(m.obj)
        assert mutate_vmi(vmi, operation="CREATE", namespace="vms", policy=POLICY, plan_keys=KEYS,
                          cluster=cluster).obj == vmi
    return m


def tmeta(vm: dict[str, Any]) -> dict[str, Any]:
    return dict(vm["spec"]["template"].get("metadata") or {})


def plan_of(vm: dict[str, Any]) -> Plan:
    return verify_plan(tmeta(vm)["annotations"][K.ANN_PLAN], KEYS, namespace="vms",
                       vm=vm["metadata"]["name"])


def vmi_from(vm: dict[str, Any]) -> dict[str, Any]:
    meta = copy.deepcopy(vm["spec"]["template"].get("metadata") or {})
    meta.update(name=vm["metadata"]["name"], namespace="vms",
                ownerReferences=[{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                  "name": vm["metadata"]["name"], "uid": "0000", "controller": True}])
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": meta,
            "spec": copy.deepcopy(vm["spec"]["template"]["spec"])}


def with_ann(vm: dict[str, Any], node: str | None) -> dict[str, Any]:
    out = copy.deepcopy(vm)
    anns = out["metadata"].setdefault("annotations", {})
    if node is None:
        anns.pop(K.ANN_NODE, None)
    else:
        anns[K.ANN_NODE] = node
    return out


def required_terms(vm: dict[str, Any]) -> list[dict[str, Any]]:
    aff = vm["spec"]["template"]["spec"].get("affinity") or {}
    return list(((aff.get("nodeAffinity") or {}).get(REQUIRED) or {}).get("nodeSelectorTerms") or [])


def homed(vm: dict[str, Any], node: str = "node-a") -> dict[str, Any]:
    """``vm`` admitted by alice, then given ``node`` as its home by the agent."""
    created = checked(vm).obj
    return checked(with_ann(created, node), user=AGENT, operation="UPDATE", old=created).obj


def refusal(vm: dict[str, Any], **kw: Any) -> Refused:
    with pytest.raises(Refused) as err:
        call(vm, **kw)
    return err.value


# ------------------------------------------------------------------------------------------------
# who may set it
# ------------------------------------------------------------------------------------------------
def test_the_agent_sets_the_home_node_label_affinity_and_plan() -> None:
    created = checked(api_vm()).obj
    assert K.LABEL_NODE not in created["metadata"].get("labels", {})
    assert plan_of(created).node is None and plan_of(created).version == 1
    m = checked(with_ann(created, "node-a"), user=AGENT, operation="UPDATE", old=created)
    vm = m.obj
    assert vm["metadata"]["annotations"][K.ANN_NODE] == "node-a"
    assert vm["metadata"]["labels"][K.LABEL_NODE] == "node-a"
    assert required_terms(vm) == [{"matchExpressions": [home_expression("node-a")]}]
    assert home_expression("node-a") == {"key": HOSTNAME_KEY, "operator": "In", "values": ["node-a"]}
    plan = plan_of(vm)
    assert plan.node == "node-a" and plan.version == 3
    assert plan.disks == plan_of(created).disks  # nothing else of the plan changed
    assert m.warnings == ()


def test_a_user_creating_a_vm_with_the_annotation_is_denied_naming_the_rule() -> None:
    err = refusal(with_ann(api_vm(), "node-a"))
    assert str(err) == (f"{NODE_FIELD}: only the diskhooks node agent ({AGENT}) may set the home node; "
                        "move a VM with kubectl diskhooks migrate")


def test_a_user_adding_or_changing_it_on_update_is_denied() -> None:
    created = checked(api_vm()).obj
    assert refusal(with_ann(created, "node-b"), operation="UPDATE", old=created).field == NODE_FIELD
    vm = homed(api_vm())
    err = refusal(with_ann(vm, "node-b"), operation="UPDATE", old=vm)
    assert "only the diskhooks node agent" in str(err)
    # the same value is no change: admitted
    assert call(copy.deepcopy(vm), operation="UPDATE", old=vm).obj == vm


def test_without_a_configured_agent_nobody_may_set_it() -> None:
    assert NO_AGENT.node_agent.username is None
    created = call(api_vm(), policy=NO_AGENT).obj
    for user in (ALICE, AGENT, ""):
        err = refusal(with_ann(created, "node-a"), user=user, operation="UPDATE", old=created,
                      policy=NO_AGENT)
        assert "no diskhooks node agent is configured (policy nodeAgent.serviceAccount)" in str(err)


def test_an_update_omitting_it_gets_it_back_with_a_warning() -> None:
    vm = homed(api_vm())
    replaced = with_ann(vm, None)  # kubectl replace of a manifest without it
    del replaced["metadata"]["labels"][K.LABEL_NODE]
    del replaced["spec"]["template"]["spec"]["affinity"]
    m = checked(replaced, operation="UPDATE", old=vm)
    assert m.obj == vm  # annotation, label, affinity and plan: all back
    assert len(m.warnings) == 1
    assert m.warnings[0].startswith(f"{NODE_FIELD}: this update omits the VM's home node 'node-a'; "
                                    "it is kept")


def test_the_original_manifest_applied_again_keeps_the_home() -> None:
    manifest = api_vm()
    vm = homed(manifest)
    m = call(manifest, operation="UPDATE", old=vm)
    assert m.obj == vm


def handed_over(vm: dict[str, Any], node: str) -> dict[str, Any]:
    """The agent's update that moves ``vm``'s home to ``node``: only for a stopped VM that asked to
    move there, in the update that removes the request (webhook.vm.migration)."""
    asking = copy.deepcopy(vm)
    asking["spec"]["runStrategy"] = "Halted"
    asking["metadata"]["annotations"][ANN_MIGRATE_TO] = node
    handover = with_ann(asking, node)
    del handover["metadata"]["annotations"][ANN_MIGRATE_TO]
    return checked(handover, user=AGENT, operation="UPDATE", old=asking).obj


def test_the_agent_may_change_and_remove_it() -> None:
    vm = homed(api_vm())
    moved = handed_over(vm, "node-b")
    assert required_terms(moved) == [{"matchExpressions": [home_expression("node-b")]}]
    assert moved["metadata"]["labels"][K.LABEL_NODE] == "node-b" and plan_of(moved).node == "node-b"
    gone = checked(with_ann(moved, None), user=AGENT, operation="UPDATE", old=moved).obj
    assert K.LABEL_NODE not in gone["metadata"].get("labels", {})
    assert "affinity" not in gone["spec"]["template"]["spec"]
    assert plan_of(gone).node is None and plan_of(gone).version == 1
    halted = api_vm()
    halted["spec"]["runStrategy"] = "Halted"
    assert gone == checked(halted).obj  # exactly as before the home was recorded


@pytest.mark.parametrize("change, where", [
    (lambda vm: vm["spec"].update(runStrategy="Halted"), "spec.runStrategy"),
    (lambda vm: vm["metadata"]["annotations"].update({K.ANN_DISKS: "[{name: data, size: 9Gi}]"}),
     f"metadata.annotations[{K.ANN_DISKS}]"),
    (lambda vm: vm["metadata"].setdefault("labels", {}).update(team="x"), "metadata.labels[team]"),
    (lambda vm: vm["spec"]["template"]["spec"]["domain"].update(cpu={"cores": 64}),
     "spec.template.spec.domain.cpu"),
])
def test_the_agent_may_change_nothing_but_the_annotation(change: Any, where: str) -> None:
    vm = homed(api_vm())
    for node in ("node-a", "node-b"):  # with the annotation unchanged or changed
        edited = with_ann(vm, node)
        change(edited)
        err = refusal(edited, user=AGENT, operation="UPDATE", old=vm)
        assert err.field == NODE_FIELD
        assert f"may change only this annotation of a VirtualMachine, but this update also changes {where}" \
            in err.reason
        assert "RBAC cannot narrow" in err.reason


def test_the_agent_update_ignores_what_the_api_server_and_the_webhook_change() -> None:
    created = checked(api_vm()).obj
    created["metadata"].update(resourceVersion="41", generation=2, managedFields=[{"manager": "a"}])
    sent = with_ann(created, "node-a")
    sent["metadata"].update(resourceVersion="42", generation=3, managedFields=[{"manager": "b"}])
    sent["status"] = {"printableStatus": "Running"}
    first = call(sent, user=AGENT, operation="UPDATE", old=created).obj
    # reinvocation: the object now carries the label, plan and affinity this webhook derived
    assert call(first, user=AGENT, operation="UPDATE", old=created).obj == first


def test_users_cannot_set_the_label() -> None:
    vm = api_vm()
    vm["metadata"]["labels"] = {K.LABEL_NODE: "node-x", "app": "db"}
    assert call(vm).obj["metadata"]["labels"] == {"app": "db"}
    homed_vm = homed(api_vm())
    edited = copy.deepcopy(homed_vm)
    edited["metadata"]["labels"][K.LABEL_NODE] = "node-x"
    assert call(edited, operation="UPDATE", old=homed_vm).obj == homed_vm
    plain = plain_vm()  # a VM without diskhooks annotations: the label goes too
    plain["metadata"]["labels"] = {K.LABEL_NODE: "node-x"}
    assert K.LABEL_NODE not in call(plain).obj["metadata"].get("labels", {})


@pytest.mark.parametrize("value, reason", [
    ("Node_A", "is not a node name"),
    ("a..b", "is not a node name"),
    ("n" * 64, "longer than 63 characters"),
])
def test_a_value_that_is_not_a_node_name_is_denied(value: str, reason: str) -> None:
    created = checked(api_vm()).obj
    err = refusal(with_ann(created, value), user=AGENT, operation="UPDATE", old=created)
    assert err.field == NODE_FIELD and reason in err.reason


def test_a_node_name_with_dots_is_accepted() -> None:
    vm = homed(api_vm(), "ip-10-0-1-7.eu-west-1.compute.internal")
    assert plan_of(vm).node == "ip-10-0-1-7.eu-west-1.compute.internal"


# ------------------------------------------------------------------------------------------------
# which VMs are pinned
# ------------------------------------------------------------------------------------------------
def test_a_vm_without_images_on_a_node_keeps_the_label_but_is_not_pinned() -> None:
    """Sizing and passthrough only: nothing on a node, so no affinity and no node in the plan;
    the annotation is still the agent's alone and the label still mirrors it."""
    vm = plain_vm()
    vm["metadata"]["annotations"][K.ANN_PASSTHROUGH] = '[{name: fast0, claim: node1-nvme0, mode: disk}]'
    created = checked(vm, cluster=DEMO_CLUSTER).obj
    after = checked(with_ann(created, "node-a"), user=AGENT, operation="UPDATE", old=created,
                    cluster=DEMO_CLUSTER).obj
    assert after["metadata"]["labels"][K.LABEL_NODE] == "node-a"
    assert required_terms(after) == [] and plan_of(after).node is None
    assert refusal(with_ann(created, "node-a"), operation="UPDATE", old=created,
                   cluster=DEMO_CLUSTER).field == NODE_FIELD


def test_a_vm_whose_disks_are_all_detached_stays_pinned() -> None:
    """Detached disks keep their images on the node: the plan remembers them, and the node."""
    vm = homed(api_vm())
    emptied = copy.deepcopy(vm)
    del emptied["metadata"]["annotations"][K.ANN_DISKS]
    after = checked(emptied, operation="UPDATE", old=vm).obj
    plan = plan_of(after)
    assert plan.disks == () and plan.detached and plan.node == "node-a" and plan.version == 3
    assert required_terms(after) == [{"matchExpressions": [home_expression("node-a")]}]


def test_the_demo_vm_with_every_feature_is_pinned_and_valid() -> None:
    vm = homed(demo_vm())
    assert plan_of(vm).persist_root is not None and plan_of(vm).node == "node-a"
    assert vm["metadata"]["labels"][K.LABEL_NODE] == "node-a"


def test_a_recomputed_plan_keeps_the_node() -> None:
    """A user's growth of a disk re-plans the VM: the new plan still names the home node."""
    vm = homed(api_vm())
    grown = copy.deepcopy(vm)
    before = plan_of(vm).disks[0].size_bytes // 1024**3
    grown["metadata"]["annotations"][K.ANN_DISKS] = grown["metadata"]["annotations"][K.ANN_DISKS] \
        .replace(f'"{before}Gi"', f'"{before + 1}Gi"', 1)
    after = checked(grown, operation="UPDATE", old=vm).obj
    assert plan_of(after).disks[0].size_bytes == (before + 1) * 1024**3
    assert plan_of(after).node == "node-a"
    assert required_terms(after) == required_terms(vm)


def test_a_forged_plan_node_is_replaced() -> None:
    vm = homed(api_vm())
    forged = copy.deepcopy(vm)
    forged["spec"]["template"]["metadata"]["annotations"][K.ANN_PLAN] = sign_plan(
        Plan(namespace="vms", vm=vm["metadata"]["name"], host_dir=plan_of(vm).host_dir,
             image_library=None, sidecar_image=plan_of(vm).sidecar_image, node="node-z"),
        PlanKeys(current=b"someone-elses-key-0123456789abcdef"))
    after = call(forged, operation="UPDATE", old=vm).obj
    assert after == vm


# ------------------------------------------------------------------------------------------------
# the affinity
# ------------------------------------------------------------------------------------------------
USER_AFFINITY: dict[str, Any] = {
    "nodeAffinity": {
        REQUIRED: {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["z1"]}]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1", "n2"]}]},
        ]},
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 10, "preference": {"matchExpressions": [
                {"key": "disktype", "operator": "In", "values": ["ssd"]}]}}],
    },
    "podAntiAffinity": {REQUIRED: [{"topologyKey": "kubernetes.io/hostname",
                                    "labelSelector": {"matchLabels": {"app": "db"}}}]},
}


def test_the_expression_is_anded_into_every_term_of_the_users_affinity() -> None:
    vm = api_vm()
    vm["spec"]["template"]["spec"]["affinity"] = copy.deepcopy(USER_AFFINITY)
    pinned = homed(vm)
    aff = pinned["spec"]["template"]["spec"]["affinity"]
    ours = home_expression("node-a")
    terms = aff["nodeAffinity"][REQUIRED]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"] == [*USER_AFFINITY["nodeAffinity"][REQUIRED]["nodeSelectorTerms"][0]
                                            ["matchExpressions"], ours]
    assert terms[1] == {**USER_AFFINITY["nodeAffinity"][REQUIRED]["nodeSelectorTerms"][1],
                        "matchExpressions": [ours]}
    assert aff["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == \
        USER_AFFINITY["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert aff["podAntiAffinity"] == USER_AFFINITY["podAntiAffinity"]
    # a new home replaces the old expression; removing it restores the user's affinity exactly
    moved = handed_over(pinned, "node-b")
    moved_terms = moved["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][REQUIRED]["nodeSelectorTerms"]
    assert [t["matchExpressions"][-1] for t in moved_terms] == [home_expression("node-b")] * 2
    assert sum(e == ours for t in moved_terms for e in t["matchExpressions"]) == 0
    gone = checked(with_ann(moved, None), user=AGENT, operation="UPDATE", old=moved).obj
    assert gone["spec"]["template"]["spec"]["affinity"] == USER_AFFINITY


def test_a_users_later_affinity_change_is_pinned_again() -> None:
    vm = homed(api_vm())
    edited = copy.deepcopy(vm)
    edited["spec"]["template"]["spec"]["affinity"] = copy.deepcopy(USER_AFFINITY)
    after = checked(edited, operation="UPDATE", old=vm).obj
    terms = after["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][REQUIRED]["nodeSelectorTerms"]
    assert all(t["matchExpressions"][-1] == home_expression("node-a") for t in terms)


def test_pin_affinity_is_idempotent_and_reversible() -> None:
    spec: dict[str, Any] = {"affinity": {}}
    pin_affinity(spec, "node-a", (), "spec")
    once = copy.deepcopy(spec)
    pin_affinity(spec, "node-a", ("node-a",), "spec")
    assert spec == once
    pin_affinity(spec, None, ("node-a",), "spec")
    assert spec == {}  # what unpinning empties goes (an empty affinity means none)
    plain: dict[str, Any] = {"affinity": {}}
    pin_affinity(plain, None, ("node-a",), "spec")
    assert plain == {"affinity": {}}  # nothing of the webhook's to remove: left alone
    bad: dict[str, Any] = {"affinity": {"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": "x"}}}}
    with pytest.raises(Refused) as err:
        pin_affinity(bad, "node-a", (), "spec.template.spec")
    assert err.value.field == f"spec.template.spec.affinity.nodeAffinity.{REQUIRED}.nodeSelectorTerms"


def test_first_difference_names_the_path() -> None:
    assert first_difference({"a": {"b": [1, {"c": 2}]}}, {"a": {"b": [1, {"c": 3}]}}) == "a.b[1].c"
    assert first_difference({"metadata": {"labels": {"x": "1"}}}, {"metadata": {"labels": {}}}) == \
        "metadata.labels[x]"
    assert first_difference({"a": 1}, {"a": 1}) is None


# ------------------------------------------------------------------------------------------------
# bare VMIs and the admission layer
# ------------------------------------------------------------------------------------------------
def test_a_bare_vmi_has_no_home_and_the_annotation_only_warns() -> None:
    vmi = json.loads((ADMISSION / "vmi-create.json").read_text())["request"]["object"]
    vmi["metadata"].setdefault("annotations", {})[K.ANN_NODE] = "node-a"
    m = mutate_vmi(vmi, operation="CREATE", namespace="vms", policy=POLICY, plan_keys=KEYS,
                   cluster=CLUSTER)
    assert "affinity" not in m.obj["spec"] or m.obj["spec"]["affinity"] == vmi["spec"].get("affinity")
    assert any(w.startswith(f"{NODE_FIELD} has no effect on a VirtualMachineInstance") for w in m.warnings)


def _review(vm: dict[str, Any], *, old: dict[str, Any] | None, username: str | None) -> dict[str, Any]:
    request: dict[str, Any] = {
        "uid": "d1b3c2a4-0000-4000-8000-000000000001",
        "kind": {"group": "kubevirt.io", "version": "v1", "kind": "VirtualMachine"},
        "resource": {"group": "kubevirt.io", "version": "v1", "resource": "virtualmachines"},
        "namespace": "vms", "name": vm["metadata"]["name"],
        "operation": "UPDATE" if old is not None else "CREATE", "object": vm, "oldObject": old}
    if username is not None:
        request["userInfo"] = {"username": username, "groups": ["system:authenticated"]}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def test_admission_passes_userinfo_username_to_the_rule() -> None:
    created = checked(api_vm()).obj
    sent = with_ann(created, "node-a")
    agent = handle_review(_review(sent, old=created, username=AGENT), route="mutate", policy=POLICY,
                          plan_keys=KEYS, cluster=CLUSTER)["response"]
    assert agent["allowed"] is True
    patched = jsonpatch.apply_patch(sent, patch_of(agent))
    assert patched["metadata"]["labels"][K.LABEL_NODE] == "node-a"
    assert plan_of(patched).node == "node-a"
    for username in (ALICE, None):  # another user, or a hand-made review without userInfo
        denied = handle_review(_review(sent, old=created, username=username), route="mutate",
                               policy=POLICY, plan_keys=KEYS, cluster=CLUSTER)["response"]
        assert denied["allowed"] is False and denied["status"]["code"] == 403
        assert denied["status"]["message"].startswith(f"{NODE_FIELD}: only the diskhooks node agent")


def test_admission_refuses_a_malformed_userinfo() -> None:
    review = _review(api_vm(), old=None, username=ALICE)
    review["request"]["userInfo"] = {"username": 7}
    with pytest.raises(Malformed) as err:
        parse_request(review)
    assert err.value.field == "request.userInfo.username"
    review["request"]["userInfo"] = "alice"
    with pytest.raises(Malformed) as err:
        parse_request(review)
    assert err.value.field == "request.userInfo"
    review["request"]["userInfo"] = {"username": ALICE}
    assert parse_request(review).username == ALICE


# ------------------------------------------------------------------------------------------------
# the launcher Pod: prepare learns its node from the downward API
# ------------------------------------------------------------------------------------------------
def test_prepare_gets_the_node_name_from_the_downward_api() -> None:
    from tests.test_pod_mutation import container, managed_pod, mutate, sample_plan

    for plan in (sample_plan(POLICY), replace(sample_plan(POLICY), node="node-a")):
        pod = mutate(managed_pod(plan), POLICY)
        env = {e["name"]: e for e in container(pod, K.PREPARE_CONTAINER)["env"]}
        assert env[K.ENV_NODE_NAME] == {"name": K.ENV_NODE_NAME, "valueFrom": {"fieldRef": {
            "apiVersion": "v1", "fieldPath": "spec.nodeName"}}}
        assert mutate(pod, POLICY) == pod  # reinvocation changes nothing
