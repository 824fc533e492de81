"""Fuzz properties of the admission core (target group ``admission``): ``webhook.admission.admit`` on
AdmissionReviews built from the ones kube-apiserver really sent (``tests/data/kubevirt/admission/``:
VM CREATE and UPDATE, VMI CREATE) with generated ``diskhooks.io/*`` annotations, generated edits of
the object (user volumes and disks, hook-sidecar requests, instancetypes, CPU/memory, the home-node
annotation, a plan written by the user, names, type confusion) and generated requesters. The
PVC lookups come from ``examples/demo/cluster-objects.yaml`` (a file cluster, as ``dry-run`` uses).

Properties, for every input:

- no internal error: the core raises nothing but ``Refused``/``Malformed`` naming a field and a
  reason, and the review answer is then a denial whose message is ``field: reason``;
- an admitted VirtualMachine that KubeVirt's schema and admission checks accepted before the
  webhook still passes them after (``tests/kubevirt_schema.py``), every name and path the webhook
  wrote is whole, and its plan verifies for that namespace and VM;
- the mutation is idempotent: the admitted object sent again (the API server's reinvocation) gets
  no patch.

Each test ends by checking that the generated inputs reached the outcomes it is about (admitted
with a plan, denied), so a strategy that only ever produced refusals cannot pass unnoticed.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import jsonpatch
from hypothesis import given
from hypothesis import strategies as st

from diskplan import keys as K
from diskplan.errors import DiskhooksError
from diskplan.plan import PlanKeys, verify_plan
from diskplan.policy import load_policy
from tests.conftest import ADMISSION, EXAMPLE_POLICY, ROOT
from tests.fuzzing import DENIAL, LABELS, check_error, fuzz, name_like, ran
from tests.kubevirt_schema import vm_errors, vmi_errors
from tests.test_fuzz_parsers import DISK_LISTS, DISKS, PASSTHROUGH, SIZING, YAML_SOUP
from webhook.admission import Route, admit, parse_request, patch_of, select_core
from webhook.cluster import FileCluster
from webhook.pod_mutation import mutate_pod
from webhook.vm.mutate import mutate_vm, mutate_vmi

POLICY = load_policy(EXAMPLE_POLICY.read_text())
KEYS = PlanKeys(current=b"fuzz-admission-key-0123456789abcd")
CLUSTER = FileCluster.from_text((ROOT / "examples" / "demo" / "cluster-objects.yaml").read_text())
AGENT = "system:serviceaccount:diskhooks-system:diskhooks-node"
REVIEW_TEXTS = {
    name: (ADMISSION / f"{name}.json").read_text() for name in ("vm-create", "vm-update", "vmi-create")
}
REVIEWS = {name: json.loads(text) for name, text in REVIEW_TEXTS.items()}


def fresh(name: str) -> dict[str, Any]:
    """A new copy of a sample review (parsing the text is faster than deepcopy)."""
    return dict(json.loads(REVIEW_TEXTS[name]))


WHOLE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
WHOLE_PATH = re.compile(r"(/[A-Za-z0-9._+-]+)+")
TALLY: Counter[str] = Counter()


# ================================================================================================
# generated edits of the object
# ================================================================================================
SIDECAR_ENTRIES = st.lists(
    st.fixed_dictionaries(
        {
            "image": st.sampled_from(
                [
                    POLICY.sidecar.image,
                    "registry.example.com/qcow2-hook:0.1.0",
                    "quay.io/kubevirt/example-hook-sidecar:v1",
                    "evil.example.com/hook:1",
                    "quay.io/kubevirt/example-hook-sidecar",
                    POLICY.sidecar.image + "\n",
                ]
            )
        },
        optional={
            "args": st.sampled_from([["serve", "--version", "v1alpha3"], ["--version", "v1alpha2"], ["sh"]]),
            "command": st.just(["/bin/sh", "-c", "id"]),
            "imagePullPolicy": st.just("Always"),
            "configMap": st.just({"name": "x", "key": "k", "hookPath": "/h"}),
        },
    ),
    max_size=3,
)


def _volume(name: str, kind: int) -> tuple[dict[str, Any], dict[str, Any]]:
    source = [
        {"containerDisk": {"image": "quay.io/containerdisks/fedora:41"}},
        {"emptyDisk": {"capacity": "1Gi"}},
        {"persistentVolumeClaim": {"claimName": "node1-nvme0"}},
        {"hostDisk": {"path": f"/var/lib/diskhooks/vms/vms/pg01/{name}.qcow2", "type": "Disk"}},
        {"hostDisk": {"path": "/etc/shadow", "type": "Disk"}},
    ][kind % 5]
    return {"name": name, **source}, {"name": name, "disk": {"bus": "virtio"}}


EDITS = st.sampled_from(
    [
        "user-volume",
        "user-volume",
        "sidecars",
        "instancetype",
        "resources",
        "node",
        "plan",
        "copied-plan",
        "name",
        "no-template-meta",
        "managed-label",
        "volumes-not-a-list",
        "annotations-not-strings",
        "template-requests",
    ]
)

CONFUSING = ("volumes-not-a-list", "annotations-not-strings")


def _edit(draw: st.DrawFn, obj: dict[str, Any], edit: str, *, vmi: bool) -> None:
    meta = obj.setdefault("metadata", {})
    spec = obj.setdefault("spec", {})
    tspec = spec if vmi else spec.setdefault("template", {}).setdefault("spec", {})
    tmeta = meta if vmi else spec["template"].setdefault("metadata", {})
    if edit == "user-volume":
        name = draw(st.one_of(LABELS, st.sampled_from(["pgdata", "wal", "scratch", "rootdisk"]), name_like()))
        volume, disk = _volume(name, draw(st.integers(0, 4)))
        volumes = tspec.setdefault("volumes", [])
        disks = tspec.setdefault("domain", {}).setdefault("devices", {}).setdefault("disks", [])
        if isinstance(volumes, list) and isinstance(disks, list):
            volumes.append(volume)
            disks.append(disk)
    elif edit == "sidecars":
        tmeta.setdefault("annotations", {})[K.ANN_HOOK_SIDECARS] = draw(
            st.one_of(SIDECAR_ENTRIES.map(json.dumps), st.sampled_from(["", "{", "[1]", "null"]))
        )
    elif edit == "instancetype" and not vmi:
        spec["instancetype"] = {"name": draw(st.sampled_from(["u1.medium", "x"]))}
    elif edit == "resources":
        tspec.setdefault("domain", {})["resources"] = {
            "requests": {"memory": draw(st.sampled_from(["1Gi", "64Gi", "1", "x"]))}
        }
        tspec["domain"]["cpu"] = {"cores": draw(st.integers(-1, 100))}
    elif edit == "node":
        meta.setdefault("annotations", {})[K.ANN_NODE] = draw(
            st.one_of(st.sampled_from(["node-a", "node-b"]), name_like())
        )
    elif edit == "plan":
        tmeta.setdefault("annotations", {})[K.ANN_PLAN] = draw(
            st.one_of(
                YAML_SOUP,
                st.sampled_from(['{"version":1}', '{"version":3,"auth":{"keyId":"k","hmac":"00"}}']),
            )
        )
    elif edit == "copied-plan":  # a validly signed plan of another VM of the same namespace
        other = _admitted_vm_plan("other-vm")
        if other is not None:
            tmeta.setdefault("annotations", {})[K.ANN_PLAN] = other
    elif edit == "name":
        meta["name"] = draw(st.one_of(st.just(""), name_like()))
    elif edit == "no-template-meta" and not vmi:
        spec["template"].pop("metadata", None)
    elif edit == "managed-label":
        tmeta.setdefault("labels", {})[K.LABEL_MANAGED] = draw(st.sampled_from(["true", "false", "yes"]))
    elif edit == "volumes-not-a-list":
        tspec["volumes"] = draw(st.sampled_from([{}, "x", None, [1]]))
    elif edit == "annotations-not-strings":
        meta["annotations"] = draw(st.sampled_from([["x"], "x", {K.ANN_DISKS: 1}, {K.ANN_DISKS: None}]))
    elif edit == "template-requests" and not vmi:
        tmeta.setdefault("annotations", {})[K.ANN_DISKS] = "[{name: x, size: 1Gi}]"


_COPIED: dict[str, str | None] = {}


def _admitted_vm_plan(name: str) -> str | None:
    """The plan the webhook writes for the sample VM renamed ``name`` (computed once)."""
    if name not in _COPIED:
        review = fresh("vm-create")
        review["request"]["name"] = name
        review["request"]["object"]["metadata"]["name"] = name
        out = admit(review, route="mutate", policy=POLICY, plan_keys=KEYS, cluster=CLUSTER)
        vm = jsonpatch.apply_patch(review["request"]["object"], patch_of(out.response))
        _COPIED[name] = vm["spec"]["template"]["metadata"]["annotations"][K.ANN_PLAN]
    return _COPIED[name]


ANNOTATION_SETS = st.one_of(
    st.builds(lambda d: {K.ANN_DISKS: d}, DISK_LISTS),
    st.builds(lambda d: {K.ANN_DISKS: d}, DISK_LISTS),
    st.builds(lambda d, s: {K.ANN_DISKS: d, **s}, DISK_LISTS, SIZING),
    st.fixed_dictionaries(
        {},
        optional={
            K.ANN_DISKS: DISKS,
            K.ANN_PASSTHROUGH: PASSTHROUGH,
            K.ANN_PERSIST_ROOT: st.sampled_from(["true", "false", "x"]),
        },
    ),
    SIZING,
    st.just({}),
)


BASES = ("vm-create", "vm-update", "vmi-create", "vm-update-of-admitted")


@st.composite
def reviews(draw: st.DrawFn) -> list[dict[str, Any]]:
    """One generated set of annotations, edits and requester, sent in each of the :data:`BASES`
    (generating is most of the cost; each review is one input)."""
    anns = draw(ANNOTATION_SETS)
    edits = sorted(draw(st.lists(EDITS, max_size=2)), key=lambda e: e in CONFUSING)  # ill-typed last
    username = draw(st.sampled_from(["alice", AGENT, "system:serviceaccount:x:y"]))
    out = []
    for base in BASES:
        review = fresh("vm-update" if base == "vm-update-of-admitted" else base)
        request = review["request"]
        obj = request["object"]
        if base == "vm-update-of-admitted":
            # the VM as the webhook admitted it with other annotations, then updated by its owner
            first = fresh("vm-create")
            first["request"]["object"]["metadata"]["annotations"] = draw(ANNOTATION_SETS)
            old = _mutated(first)
            if old is None:
                continue
            request["oldObject"] = old
            obj = request["object"] = copy.deepcopy(old)
        meta = obj.setdefault("metadata", {})
        kept = {k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith(K.PREFIX)}
        meta["annotations"] = {**kept, **anns}
        for edit in edits:
            _edit(draw, obj, edit, vmi=base == "vmi-create")
        request["userInfo"] = {"username": username}
        out.append(review)
    return out


def _mutated(review: dict[str, Any]) -> dict[str, Any] | None:
    out = admit(review, route="mutate", policy=POLICY, plan_keys=KEYS, cluster=CLUSTER)
    if not out.response["response"]["allowed"]:
        return None
    return dict(jsonpatch.apply_patch(review["request"]["object"], patch_of(out.response)))


# ================================================================================================
# the properties
# ================================================================================================
def _core(review: Mapping[str, Any], route: Route) -> object:
    """The mutation core's own verdict: its Mutation, or the error it raised (anything else escapes)."""
    req = parse_request(review)
    core = select_core(req, route)
    assert core is not None
    assert req.obj is not None
    try:
        if core == "vm":
            return mutate_vm(
                req.obj,
                operation=req.operation,
                old_obj=req.old_obj,
                namespace=req.namespace,
                policy=POLICY,
                plan_keys=KEYS,
                cluster=CLUSTER,
                username=req.username,
            )
        if core == "vmi":
            return mutate_vmi(
                req.obj,
                operation=req.operation,
                namespace=req.namespace,
                policy=POLICY,
                plan_keys=KEYS,
                cluster=CLUSTER,
            )
        return mutate_pod(req.obj, namespace=req.namespace, policy=POLICY, plan_keys=KEYS)
    except DiskhooksError as exc:
        check_error(exc)
        return exc


def check_review(review: dict[str, Any], route: Route, group: str) -> dict[str, Any] | None:
    """Run one review through the admission layer (and, for a denial, the core itself, whose
    exception names the field); the admitted object, or None."""
    outcome = admit(review, route=route, policy=POLICY, plan_keys=KEYS, cluster=CLUSTER)
    assert outcome.result != "error", repr(outcome.error)
    response = outcome.response["response"]
    if not response["allowed"]:
        verdict = _core(review, route)
        assert isinstance(verdict, DiskhooksError), "admit denied what the core admitted"
        assert response["status"]["message"] == str(verdict)
        assert DENIAL.match(str(verdict)), str(verdict)
        TALLY[f"{group}-denied"] += 1
        return None
    obj = review["request"]["object"]
    # (a JSON round trip copies several times faster than the deepcopy apply_patch would make)
    admitted = jsonpatch.apply_patch(json.loads(json.dumps(obj)), patch_of(outcome.response), in_place=True)
    # idempotent: the admitted object sent again (reinvocation) is not changed again
    again = {**review, "request": {**review["request"], "object": admitted}}
    second = admit(again, route=route, policy=POLICY, plan_keys=KEYS, cluster=CLUSTER)
    assert second.response["response"]["allowed"] is True, second.response
    assert patch_of(second.response) == [], patch_of(second.response)
    return dict(admitted)


def _valid(obj: Mapping[str, Any], *, vmi: bool) -> bool:
    """Whether KubeVirt would take ``obj`` as it is (its schema and admission checks)."""
    try:
        return not (vmi_errors(obj) if vmi else vm_errors(obj))
    except (AttributeError, TypeError):  # the checks' own reading of a mistyped object: not valid
        return False


def _check_admitted_vm(review: dict[str, Any], admitted: dict[str, Any]) -> None:
    request = review["request"]
    kind = request["kind"]["kind"]
    original = request["object"]
    vmi = kind == "VirtualMachineInstance"
    if _valid(original, vmi=vmi):
        errors_after = vmi_errors(admitted) if vmi else vm_errors(admitted)
        assert not errors_after, errors_after
        TALLY["valid-admitted"] += 1
    tmeta = admitted["metadata"] if vmi else (admitted["spec"]["template"].get("metadata") or {})
    plan_text = (tmeta.get("annotations") or {}).get(K.ANN_PLAN)
    if plan_text is None or plan_text == (
        (original["metadata"] if vmi else original["spec"]["template"].get("metadata") or {}).get(
            "annotations"
        )
        or {}
    ).get(K.ANN_PLAN):
        return
    plan = verify_plan(plan_text, KEYS, namespace=request["namespace"], vm=admitted["metadata"]["name"])
    TALLY["planned"] += 1
    spec = admitted["spec"] if vmi else admitted["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for disk in plan.disks:
        assert WHOLE_NAME.fullmatch(disk.name), repr(disk.name)
        path = volumes[disk.name]["hostDisk"]["path"]
        assert WHOLE_PATH.fullmatch(path) and path == f"{plan.host_dir}/{disk.name}.qcow2", path
    assert WHOLE_PATH.fullmatch(plan.host_dir), plan.host_dir


@given(reviews())
@fuzz(2600)
def _admission_property(batch: list[dict[str, Any]]) -> None:
    for review in batch:
        ran("admission")
        admitted = check_review(review, "mutate", "admission")
        if admitted is not None:
            _check_admitted_vm(review, admitted)


def test_generated_vm_and_vmi_reviews() -> None:
    TALLY.clear()
    _admission_property()
    # the inputs reached what the properties are about (not only refusals)
    assert (
        TALLY["planned"] >= 500 and TALLY["valid-admitted"] >= 1000 and TALLY["admission-denied"] >= 1000
    ), TALLY


# ------------------------------------------------------------------------------------------------
# the envelope: anything that is not a well-formed AdmissionReview is Malformed naming the field
# ------------------------------------------------------------------------------------------------
ENVELOPE_PATHS = [
    (),
    ("apiVersion",),
    ("kind",),
    ("request",),
    ("request", "uid"),
    ("request", "kind"),
    ("request", "kind", "group"),
    ("request", "kind", "kind"),
    ("request", "kind", "version"),
    ("request", "operation"),
    ("request", "object"),
    ("request", "oldObject"),
    ("request", "namespace"),
    ("request", "name"),
    ("request", "userInfo"),
    ("request", "userInfo", "username"),
    ("request", "dryRun"),
]
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=8),
    st.just([]),
    st.just({}),
    st.sampled_from(
        [
            "admission.k8s.io/v1beta1",
            "AdmissionReview",
            "CREATE",
            "DELETE",
            "CONNECT",
            "VirtualMachine",
            "Pod",
            "x" * 200,
        ]
    ),
)


@st.composite
def envelopes(draw: st.DrawFn) -> tuple[str, Any]:
    review: Any = fresh(draw(st.sampled_from(sorted(REVIEWS))))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ENVELOPE_PATHS))
        value = draw(JUNK)
        if not path:
            review = value
            continue
        target = review
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if isinstance(target, dict):
            if draw(st.booleans()):
                target.pop(path[-1], None)
            else:
                target[path[-1]] = value
    return draw(st.sampled_from(["mutate", "mutate-pod"])), review


@given(envelopes())
@fuzz(1500)
def _envelope_property(case: tuple[str, Any]) -> None:
    ran("admission")
    route: Route = "mutate" if case[0] == "mutate" else "mutate-pod"
    review = case[1]
    try:
        outcome = admit(review, route=route, policy=POLICY, plan_keys=KEYS, cluster=CLUSTER)
    except DiskhooksError as exc:
        if exc.field:
            check_error(exc)
        else:  # the one error without a field: the body as a whole is not an object
            assert str(exc).startswith("the body must be a JSON object"), str(exc)
        TALLY["envelope-malformed"] += 1
        return
    assert outcome.result != "error", repr(outcome.error)
    TALLY["envelope-answered"] += 1


def test_generated_envelopes() -> None:
    TALLY.clear()
    _envelope_property()
    assert TALLY["envelope-malformed"] >= 300 and TALLY["envelope-answered"] >= 100, TALLY
