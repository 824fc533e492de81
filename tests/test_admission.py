"""The admission core (``webhook/admission.py``), called directly: review dict in, response out.

Runs the real mutation cores on the AdmissionReviews kube-apiserver really sent
(``tests/data/kubevirt/admission/``) and the example policy; no HTTP here (``tests/test_server.py``
sends the same reviews to the real server).
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch
import pytest

from diskplan import keys as K
from diskplan.errors import Malformed, Refused
from diskplan.plan import PlanKeys, verify_plan
from diskplan.policy import Policy, load_policy
from diskplan.quantity import parse_bytes
from tests.conftest import ADMISSION, EXAMPLE_POLICY, ROOT
from webhook import admission
from webhook.admission import admit, build_response, handle_review, parse_request, patch_of
from webhook.cluster import EMPTY_CLUSTER, FileCluster

KEYS = PlanKeys(current=b"admission-test-key-0123456789abcdef")
HOST_ROOT = "/var/lib/diskhooks/vms"  # hostDisks.root of examples/policy.yaml


def load_review(name: str) -> dict[str, Any]:
    return dict(json.loads((ADMISSION / name).read_text()))


def apply(obj: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    ops = patch_of(response)
    return jsonpatch.apply_patch(obj, ops) if ops else copy.deepcopy(obj)


def template_meta(vm: dict[str, Any]) -> dict[str, Any]:
    return dict(vm["spec"]["template"].get("metadata") or {})


def assert_vm_mutated(vm: dict[str, Any], *, namespace: str, name: str, plan_keys: PlanKeys,
                      sidecar_image: str, disks: dict[str, str]) -> None:
    """What a user would check on a mutated VM: hostDisk volumes at the node path with the planned
    size, a disk per volume, the sidecar requested, the pod label, and a plan that verifies."""
    spec = vm["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    guest_disks = {d["name"] for d in spec["domain"]["devices"]["disks"]}
    for disk, size in disks.items():
        vol = volumes[disk]
        assert vol["hostDisk"]["type"] == "DiskOrCreate"
        assert vol["hostDisk"]["path"] == f"{HOST_ROOT}/{namespace}/{name}/{disk}.qcow2"
        assert parse_bytes(vol["hostDisk"]["capacity"]) == parse_bytes(size)
        assert disk in guest_disks
    meta = template_meta(vm)
    assert meta["labels"][K.LABEL_MANAGED] == K.LABEL_MANAGED_VALUE
    sidecars = json.loads(meta["annotations"][K.ANN_HOOK_SIDECARS])
    ours = [s for s in sidecars if s.get("image") == sidecar_image]
    assert len(ours) == 1 and "v1alpha3" in ours[0].get("args", [])
    plan = verify_plan(meta["annotations"][K.ANN_PLAN], plan_keys, namespace=namespace, vm=name)
    assert {d.name: d.size_bytes for d in plan.disks} == {d: parse_bytes(s) for d, s in disks.items()}


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(EXAMPLE_POLICY.read_text())


def review_of(name: str, policy: Policy, *, route: admission.Route = "mutate",
              review: dict[str, Any] | None = None) -> dict[str, Any]:
    return handle_review(review if review is not None else load_review(name), route=route,
                         policy=policy, plan_keys=KEYS, cluster=EMPTY_CLUSTER)


# ------------------------------------------------------------------------------------------------
# build_response
# ------------------------------------------------------------------------------------------------
def test_build_response_allowed_without_patch() -> None:
    out = build_response(uid="u-1", allowed=True)
    assert out == {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                   "response": {"uid": "u-1", "allowed": True}}
    assert build_response(uid="u-1", allowed=True, patch_ops=[]) == out  # empty patch: no field


def test_build_response_with_patch_and_warnings() -> None:
    ops = [{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}]
    out = build_response(uid="u-2", allowed=True, patch_ops=ops, warnings=["w1", "w2"])["response"]
    assert out["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(out["patch"])) == ops
    assert out["warnings"] == ["w1", "w2"]
    assert "status" not in out


def test_build_response_denial() -> None:
    out = build_response(uid="u-3", allowed=False, message="diskhooks.io/disks[0].size: too big",
                         patch_ops=[{"op": "remove", "path": "/x"}])["response"]
    assert out == {"uid": "u-3", "allowed": False,
                   "status": {"code": 403, "reason": "Forbidden",
                              "message": "diskhooks.io/disks[0].size: too big"}}


# ------------------------------------------------------------------------------------------------
# the envelope
# ------------------------------------------------------------------------------------------------
def _broken(path: str, value: Any) -> dict[str, Any]:
    review = load_review("vm-create.json")
    target = review
    *parents, last = path.split(".")
    for p in parents:
        target = target[p]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return review


_DELETE = object()


@pytest.mark.parametrize(("path", "value", "field"), [
    ("apiVersion", "admission.k8s.io/v1beta1", "apiVersion"),
    ("kind", "ConfigMap", "kind"),
    ("request", _DELETE, "request"),
    ("request", [1, 2], "request"),
    ("request.uid", _DELETE, "request.uid"),
    ("request.uid", "", "request.uid"),
    ("request.uid", 42, "request.uid"),
    ("request.kind", "VirtualMachine", "request.kind"),
    ("request.kind.kind", "", "request.kind.kind"),
    ("request.operation", "PATCH", "request.operation"),
    ("request.object", _DELETE, "request.object"),
    ("request.object", "a string", "request.object"),
    ("request.object", [], "request.object"),
    ("request.namespace", 7, "request.namespace"),
])
def test_malformed_envelope_names_the_field(policy: Policy, path: str, value: Any, field: str) -> None:
    with pytest.raises(Malformed) as err:
        review_of("", policy, review=_broken(path, value))
    assert err.value.field == field


def test_malformed_non_object_bodies(policy: Policy) -> None:
    bodies: tuple[Any, ...] = (None, [], "AdmissionReview", 3)
    for body in bodies:
        with pytest.raises(Malformed):
            handle_review(body, route="mutate", policy=policy, plan_keys=KEYS, cluster=EMPTY_CLUSTER)


def test_old_object_must_be_an_object_or_null(policy: Policy) -> None:
    review = load_review("vm-update.json")
    review["request"]["oldObject"] = ["not", "an", "object"]
    with pytest.raises(Malformed) as err:
        review_of("", policy, review=review)
    assert err.value.field == "request.oldObject"
    review["request"]["oldObject"] = None  # not what the API server sends, but readable
    assert review_of("", policy, review=review)["response"]["allowed"] is True


def test_namespaced_kind_without_any_namespace_is_malformed(policy: Policy) -> None:
    review = load_review("vm-create.json")
    del review["request"]["namespace"]
    review["request"]["object"]["metadata"].pop("namespace", None)
    with pytest.raises(Malformed) as err:
        review_of("", policy, review=review)
    assert err.value.field == "request.namespace"


def test_parse_request_reads_the_real_review() -> None:
    req = parse_request(load_review("vm-create-dryrun.json"))
    assert (req.kind, req.group, req.operation, req.namespace, req.name, req.dry_run) == \
        ("VirtualMachine", "kubevirt.io", "CREATE", "vms", "pg01", True)


# ------------------------------------------------------------------------------------------------
# dispatch and mutation through the real cores
# ------------------------------------------------------------------------------------------------
def test_vm_create_is_mutated(policy: Policy) -> None:
    review = load_review("vm-create.json")
    pristine = copy.deepcopy(review)
    out = review_of("", policy, review=review)
    assert review == pristine, "the review must not be modified"
    resp = out["response"]
    assert resp["uid"] == review["request"]["uid"] and resp["allowed"] is True
    assert resp["patchType"] == "JSONPatch"
    vm = apply(review["request"]["object"], out)
    assert_vm_mutated(vm, namespace="vms", name="pg01", plan_keys=KEYS,
                      sidecar_image=policy.sidecar.image, disks={"pgdata": "200Gi", "wal": "20Gi"})
    # the patch touches nothing diskhooks does not own
    assert vm["metadata"]["managedFields"] == review["request"]["object"]["metadata"]["managedFields"]
    assert vm["spec"]["runStrategy"] == review["request"]["object"]["spec"]["runStrategy"]


def test_the_patch_is_the_diff_of_the_core_result(policy: Policy) -> None:
    from webhook.vm.mutate import mutate_vm

    review = load_review("vm-create.json")
    obj = review["request"]["object"]
    direct = mutate_vm(obj, operation="CREATE", old_obj=None, namespace="vms", policy=policy,
                       plan_keys=KEYS, cluster=EMPTY_CLUSTER)
    assert apply(obj, review_of("", policy, review=review)) == direct.obj


def test_reinvocation_gives_no_patch_and_resubmission_the_same_object(policy: Policy) -> None:
    review = load_review("vm-create.json")
    once = apply(review["request"]["object"], review_of("", policy, review=review))
    again = copy.deepcopy(review)
    again["request"]["object"] = once
    assert patch_of(review_of("", policy, review=again)) == []
    # re-submission: the user applies the same manifest again, an UPDATE of what was admitted
    resubmit = copy.deepcopy(review)
    resubmit["request"].update(operation="UPDATE", oldObject=once)
    assert apply(review["request"]["object"], review_of("", policy, review=resubmit)) == once


def test_dry_run_review_gets_the_same_mutation(policy: Policy) -> None:
    real, dry = load_review("vm-create.json"), load_review("vm-create-dryrun.json")
    assert apply(real["request"]["object"], review_of("", policy, review=real))["spec"] == \
        apply(dry["request"]["object"], review_of("", policy, review=dry))["spec"]


def test_vm_update_grows_the_disk(policy: Policy) -> None:
    review = load_review("vm-update.json")
    out = review_of("", policy, review=review)
    assert out["response"]["allowed"] is True, out["response"].get("status")
    vm = apply(review["request"]["object"], out)
    assert_vm_mutated(vm, namespace="vms", name="pg01", plan_keys=KEYS,
                      sidecar_image=policy.sidecar.image, disks={"pgdata": "300Gi", "wal": "20Gi"})


def test_vmi_create_gets_a_plan_on_its_own_metadata(policy: Policy) -> None:
    review = load_review("vmi-create.json")
    out = review_of("", policy, review=review)
    assert out["response"]["allowed"] is True, out["response"].get("status")
    vmi = apply(review["request"]["object"], out)
    name = vmi["metadata"]["name"]
    plan = verify_plan(vmi["metadata"]["annotations"][K.ANN_PLAN], KEYS, namespace="vms", vm=name)
    assert [d.name for d in plan.disks] == ["scratch"]
    vol = {v["name"]: v for v in vmi["spec"]["volumes"]}["scratch"]
    assert vol["hostDisk"]["path"] == f"{HOST_ROOT}/vms/{name}/scratch.qcow2"


def test_vm_without_annotations_passes_unchanged(policy: Policy) -> None:
    review = load_review("vm-create.json")
    anns = review["request"]["object"]["metadata"]["annotations"]
    for key in list(anns):
        if key.startswith(K.PREFIX):
            del anns[key]
    out = review_of("", policy, review=review)
    assert out["response"] == {"uid": review["request"]["uid"], "allowed": True}


@pytest.mark.parametrize(("annotation", "value", "field"), [
    (K.ANN_DISKS, '[{"name": "pgdata", "size": "9Ti"}]', "diskhooks.io/disks[0].size"),
    (K.ANN_DISKS, '[{"name": "../../etc", "size": "1Gi"}]', "diskhooks.io/disks[0].name"),
    (K.ANN_DISKS, "[{name: a, size: 1Gi, path: /etc/shadow}]", "diskhooks.io/disks[0]"),
    (K.ANN_DISKS, "{{{{ not yaml", "diskhooks.io/disks"),
    (K.ANN_PROFILE, "gigantic", "diskhooks.io/profile"),
])
def test_hostile_annotations_are_denied_naming_the_field(policy: Policy, annotation: str, value: str,
                                                         field: str) -> None:
    review = load_review("vm-create.json")
    review["request"]["object"]["metadata"]["annotations"][annotation] = value
    resp = review_of("", policy, review=review)["response"]
    assert resp["allowed"] is False
    assert resp["status"]["message"].startswith(field), resp["status"]["message"]
    assert "patch" not in resp


def test_forged_plan_on_a_bare_vmi_is_not_accepted(policy: Policy) -> None:
    review = load_review("vmi-create.json")
    vmi = apply(review["request"]["object"], review_of("", policy, review=review))
    doc = json.loads(vmi["metadata"]["annotations"][K.ANN_PLAN])
    doc["hostDir"] = "/etc"
    vmi["metadata"]["annotations"][K.ANN_PLAN] = json.dumps(doc)
    review["request"]["object"] = vmi
    resp = review_of("", policy, review=review)["response"]
    if resp["allowed"]:  # a bare VMI with user annotations may get its plan recomputed instead
        fixed = apply(vmi, {"response": resp})
        plan = verify_plan(fixed["metadata"]["annotations"][K.ANN_PLAN], KEYS, namespace="vms",
                           vm=vmi["metadata"]["name"])
        assert plan.host_dir != "/etc"
    else:
        assert K.ANN_PLAN in resp["status"]["message"]


@pytest.mark.parametrize(("route", "mutate"), [
    ("mutate-pod", lambda r: None),  # a VM sent to the Pod route
    ("mutate", lambda r: r["request"].update(operation="DELETE", object=None)),
    ("mutate", lambda r: r["request"]["kind"].update(group="example.com")),
    ("mutate", lambda r: r["request"]["kind"].update(kind="VirtualMachinePool")),
])
def test_what_diskhooks_does_not_handle_is_allowed_untouched(policy: Policy, route: admission.Route,
                                                             mutate: Any) -> None:
    review = load_review("vm-create.json")
    mutate(review)
    out = handle_review(review, route=route, policy=policy, plan_keys=KEYS, cluster=EMPTY_CLUSTER)
    assert out["response"] == {"uid": review["request"]["uid"], "allowed": True}


def test_vmi_update_is_not_mutated(policy: Policy) -> None:
    review = load_review("vmi-create.json")
    review["request"]["operation"] = "UPDATE"
    review["request"]["oldObject"] = copy.deepcopy(review["request"]["object"])
    assert review_of("", policy, review=review)["response"]["allowed"] is True
    assert patch_of(review_of("", policy, review=review)) == []


def test_pod_on_the_pod_route(policy: Policy) -> None:
    """The real virt-launcher Pod (no diskhooks plan) is admitted unchanged; the same Pod on
    ``/mutate`` is not diskhooks' business either."""
    review = load_review("virt-launcher-pod-create.json")
    for route in ("mutate-pod", "mutate"):
        out = handle_review(review, route=route, policy=policy, plan_keys=KEYS, cluster=EMPTY_CLUSTER)
        assert out["response"]["allowed"] is True
        assert patch_of(out) == []


def test_passthrough_uses_the_cluster_lookup(policy: Policy) -> None:
    import yaml

    vm = yaml.safe_load((ROOT / "examples" / "demo" / "vm.yaml").read_text())
    review = load_review("vm-create.json")
    review["request"]["object"] = vm
    review["request"]["name"] = vm["metadata"]["name"]
    cluster = FileCluster.from_text((ROOT / "examples" / "demo" / "cluster-objects.yaml").read_text())
    ok = handle_review(review, route="mutate", policy=policy, plan_keys=KEYS, cluster=cluster)
    assert ok["response"]["allowed"] is True, ok["response"].get("status")
    denied = handle_review(review, route="mutate", policy=policy, plan_keys=KEYS, cluster=EMPTY_CLUSTER)
    assert denied["response"]["allowed"] is False
    assert denied["response"]["status"]["message"].startswith(K.ANN_PASSTHROUGH)


# ------------------------------------------------------------------------------------------------
# a bug in a core is a safe denial, never an exception
# ------------------------------------------------------------------------------------------------
def test_a_bug_in_a_core_is_a_denial_with_the_uid(policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulates a diskhooks bug (the one fake here): the core raises KeyError."""
    def broken(*_a: Any, **_k: Any) -> Any:
        raise KeyError("spec")

    monkeypatch.setattr(admission, "mutate_vm", broken)
    review = load_review("vm-create.json")
    outcome = admit(review, route="mutate", policy=policy, plan_keys=KEYS, cluster=EMPTY_CLUSTER)
    resp = outcome.response["response"]
    assert resp["allowed"] is False and resp["status"]["code"] == 500
    assert review["request"]["uid"] in resp["status"]["message"]
    assert outcome.result == "error" and isinstance(outcome.error, KeyError)


def test_malformed_from_a_core_is_a_denial(policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(*_a: Any, **_k: Any) -> Any:
        raise Malformed(K.ANN_PLAN, "the plan is not valid JSON")

    monkeypatch.setattr(admission, "mutate_vmi", unreadable)
    outcome = admit(load_review("vmi-create.json"), route="mutate", policy=policy, plan_keys=KEYS,
                    cluster=EMPTY_CLUSTER)
    resp = outcome.response["response"]
    assert (resp["allowed"], resp["status"]["code"], outcome.result) == (False, 400, "denied")
    assert resp["status"]["message"] == "diskhooks.io/plan: the plan is not valid JSON"


def test_refused_message_is_field_colon_reason(policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: Any, **_k: Any) -> Any:
        raise Refused("diskhooks.io/disks[1].size", "9Ti exceeds the platform limit 2Ti")

    monkeypatch.setattr(admission, "mutate_vm", refuse)
    resp = review_of("vm-create.json", policy)["response"]
    assert resp["status"]["message"] == "diskhooks.io/disks[1].size: 9Ti exceeds the platform limit 2Ti"
    assert resp["status"]["code"] == 403


def test_outcome_labels_are_bounded(policy: Policy) -> None:
    review = load_review("vm-create.json")
    review["request"]["kind"]["kind"] = "x" * 500
    outcome = admit(review, route="mutate", policy=policy, plan_keys=KEYS, cluster=EMPTY_CLUSTER)
    assert outcome.kind == "other"


@pytest.mark.parametrize("before, after", [
    ({"a": 1}, {"a": 1}),
    ({"a": 1}, {"a": 2, "b": [1]}),
    ({"a": {"x/y": 1, "t~": 2}}, {"a": {"x/y": 3}}),
    ({"l": [1, 2]}, {"l": [1, 2, {"n": 3}, 4]}),          # appended
    ({"l": [1, 2, 3]}, {"l": [1, 9, 2, 3]}),               # inserted in the middle
    ({"l": [1, 2, 3]}, {"l": [3]}),                        # removed
    ({"l": [{"name": "a"}, {"name": "b"}]}, {"l": [{"name": "b"}, {"name": "a", "x": 1}]}),
    ({"m": {"k": [1]}}, {"m": {"k": {"now": "an object"}}}),
    ({"meta": {"annotations": {"a": "1"}}, "spec": {}}, {"meta": {}, "spec": {"v": None}}),
])
def test_diff_patch_turns_before_into_after(before: Any, after: Any) -> None:
    import copy

    from webhook.admission import diff_patch
    ops = diff_patch(before, after)
    assert jsonpatch.apply_patch(copy.deepcopy(before), ops) == after
    assert (ops == []) == (before == after)
