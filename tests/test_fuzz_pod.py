"""Fuzz properties of the Pod mutation (target group ``pod``): ``webhook.pod_mutation.mutate_pod``
through the admission core (route ``mutate-pod``), on the virt-launcher Pod kube-apiserver really
sent (``tests/data/kubevirt/admission/virt-launcher-pod-create.json``) given a generated plan (signed
for its VMI, for another VM, forged, or junk) and generated edits: the planned disks' hostPath
volumes present, missing or pointing elsewhere, the diskhooks sidecar container, the labels and the
``kubevirt.io/domain`` annotation KubeVirt sets, a ``diskhooks-prepare`` init container already there.

Properties, for every input: no internal error; a refusal names a field and a reason; the input is
not modified; an admitted Pod gets no further change when sent again; and what the mutation adds is
only what the verified plan says: every hostPath it adds is one of the plan's directories (the VM
directory, the image library, diskhooks' own state below ``hostDisks.root``), the prepare init
container runs the plan's sidecar image with ``DISKHOOKS_PLAN`` equal to the verified annotation and
no capability beyond CHOWN and DAC_OVERRIDE, and the sidecar's diskhooks mounts are read-only. One
admitted Pod in :data:`VALIDATE_EVERY` is also validated against the Kubernetes Pod schema (strict
``kubernetes_validate``, ~13 ms a Pod: too slow for each input).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from typing import Any

import kubernetes_validate
from hypothesis import given
from hypothesis import strategies as st

from diskplan import keys as K
from diskplan.plan import Plan, PlanKeys, sign_plan, verify_plan
from tests.conftest import ADMISSION
from tests.fuzzing import fuzz, plans, ran
from tests.test_fuzz_admission import KEYS, TALLY, WHOLE_PATH, check_review
from tests.test_fuzz_parsers import YAML_SOUP
from tests.test_pod_mutation import KUBE_VERSION
from webhook.pod_mutation import PREPARE_CAPABILITIES

POD_TEXT = (ADMISSION / "virt-launcher-pod-create.json").read_text()
VMI = "fedora-data"  # the Pod's kubevirt.io/domain
VALIDATE_EVERY = 40
OTHER_KEYS = PlanKeys(current=b"not-the-webhooks-key-0123456789ab")
SEEN: Counter[str] = Counter()

POD_EDITS = [
    "drop-volume",
    "volume-elsewhere",
    "volume-not-hostpath",
    "no-created-by",
    "no-domain",
    "domain-other",
    "vm-label-other",
    "sidecar-image",
    "no-sidecar",
    "no-compute",
    "prepare-present",
    "unmanaged",
    "containers-not-a-list",
    "compute-mount-moved",
]
VOLUME_NAMES = st.lists(
    st.sampled_from(["datadisk", "scratch", "wal", "fast0", "data-1"]), max_size=3, unique=True
)


@st.composite
def pods(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Two launcher Pods for one generated plan: the plan drawn by hypothesis, how the Pod presents
    it and the edits from a ``random.Random`` seeded by a drawn integer (cheaper than drawing each)."""
    plan = draw(plans(namespace="vms", vm=VMI, names=VOLUME_NAMES))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    junk = draw(YAML_SOUP)
    return [_pod(plan, rng, junk) for _ in range(2)]


def _pod(plan: Plan, rng: random.Random, junk: str) -> dict[str, Any]:
    review: dict[str, Any] = json.loads(POD_TEXT)
    pod = review["request"]["object"]
    meta, spec = pod["metadata"], pod["spec"]
    how = rng.choice(["signed"] * 8 + ["other-vm", "other-key", "junk", "none"])
    texts: dict[str, str | None] = {
        "signed": sign_plan(plan, KEYS),
        "other-vm": sign_plan(replace(plan, vm="other-vm"), KEYS),
        "other-key": sign_plan(plan, OTHER_KEYS),
        "junk": junk,
        "none": None,
    }
    text = texts[how]
    meta["labels"][K.LABEL_MANAGED] = K.LABEL_MANAGED_VALUE
    if text is not None:
        meta["annotations"][K.ANN_PLAN] = text
    # what KubeVirt renders for the plan: a hostPath volume per hostDisk, the sidecar container
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "datadisk"]
    for disk in plan.disks:
        spec["volumes"].append(
            {"name": disk.name, "hostPath": {"path": plan.host_dir, "type": "DirectoryOrCreate"}}
        )
    for c in spec["containers"]:
        if c["name"] == "hook-sidecar-0":
            c["image"] = plan.sidecar_image
            c["args"] = ["serve", "--version", "v1alpha3"]
    # (each edit once: two init containers of one name are refused by the API server anyway)
    edits = rng.sample(POD_EDITS, rng.choice([0, 0, 0, 1, 1, 2]))
    for edit in sorted(edits, key=lambda e: e == "containers-not-a-list"):
        _edit(rng, pod, edit, plan)
    review["request"]["userInfo"] = {"username": "system:serviceaccount:kubevirt:kubevirt-controller"}
    return review


def _edit(rng: random.Random, pod: dict[str, Any], edit: str, plan: Plan) -> None:
    meta, spec = pod["metadata"], pod["spec"]
    containers = spec["containers"] if isinstance(spec["containers"], list) else []
    hostdisks = [v for v in spec["volumes"] if "hostPath" in v and v["name"] in {d.name for d in plan.disks}]
    if edit == "drop-volume" and hostdisks:
        spec["volumes"].remove(hostdisks[0])
    elif edit == "volume-elsewhere" and hostdisks:
        hostdisks[0]["hostPath"]["path"] = rng.choice(["/", "/etc", "/var/lib/diskhooks/vms/vms/other"])
    elif edit == "volume-not-hostpath" and hostdisks:
        hostdisks[0].pop("hostPath")
        hostdisks[0]["emptyDir"] = {}
    elif edit == "no-created-by":
        meta["labels"].pop(K.LABEL_CREATED_BY, None)
    elif edit == "no-domain":
        meta["annotations"].pop(K.ANN_DOMAIN, None)
    elif edit == "domain-other":
        meta["annotations"][K.ANN_DOMAIN] = rng.choice(["other-vm", "fedora-data\n", "", "fedora-data.x"])
    elif edit == "vm-label-other":
        meta["labels"]["vm.kubevirt.io/name"] = rng.choice(["other-vm", "fedora-data\u200b", "fedora"])
    elif edit == "sidecar-image":
        for c in containers:
            if c["name"] == "hook-sidecar-0":
                c["image"] = rng.choice(["evil.example.com/x:1", plan.sidecar_image + "\n"])
    elif edit == "no-sidecar":
        spec["containers"] = [c for c in containers if c["name"] != "hook-sidecar-0"]
    elif edit == "no-compute":
        spec["containers"] = [c for c in containers if c["name"] != "compute"]
    elif edit == "prepare-present":  # an init container already named like ours, doing something else
        spec["initContainers"].append(
            {
                "name": K.PREPARE_CONTAINER,
                "image": "evil.example.com/x:1",
                "command": ["/bin/sh", "-c", "cat /etc/shadow"],
                "securityContext": {"privileged": True},
            }
        )
    elif edit == "unmanaged":
        meta["labels"][K.LABEL_MANAGED] = rng.choice(["false", "True", ""])
    elif edit == "containers-not-a-list":
        spec["containers"] = rng.choice([{}, "x", None])
    elif edit == "compute-mount-moved":
        for c in containers:
            if c["name"] == "compute":
                for m in c.get("volumeMounts", []):
                    if m["name"] == "rootdisk":
                        m["mountPath"] = "/var/run/kubevirt-image-volume/disk_9"


def _check_admitted_pod(before: dict[str, Any], after: dict[str, Any]) -> None:
    added = [v for v in after["spec"]["volumes"] if v not in before["spec"]["volumes"]]
    text = after["metadata"]["annotations"].get(K.ANN_PLAN)
    init = {c["name"]: c for c in after["spec"].get("initContainers") or []}
    if (
        added
        or K.PREPARE_CONTAINER in init
        and init[K.PREPARE_CONTAINER] not in before["spec"]["initContainers"]
    ):
        # something was added: only for a Pod whose plan verifies for the VMI it names, and only
        # what that plan says
        plan = verify_plan(text, KEYS, namespace="vms", vm=after["metadata"]["annotations"][K.ANN_DOMAIN])
        root = plan.host_dir.rsplit("/", 2)[0]  # <hostDisks.root>/<namespace>/<vm>
        for volume in added:  # the VM's directory, the library, diskhooks' own state below the root
            path = volume["hostPath"]["path"]
            assert path in (plan.host_dir, plan.image_library) or (
                path.startswith(f"{root}/.diskhooks/") and WHOLE_PATH.fullmatch(path)
            ), volume
        prepare = init[K.PREPARE_CONTAINER]
        assert prepare["image"] == plan.sidecar_image
        assert {e["name"]: e.get("value") for e in prepare["env"]}[K.ENV_PLAN] == text
        sc = prepare["securityContext"]
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["capabilities"]["add"] == PREPARE_CAPABILITIES, sc
        assert not sc.get("privileged") and sc.get("allowPrivilegeEscalation") is False, sc
        for c in after["spec"]["containers"]:
            if c["name"].startswith("hook-sidecar-"):
                for m in c.get("volumeMounts") or []:
                    if m["mountPath"].startswith(K.DH_MOUNT_ROOT) or m["name"] in {
                        d.name for d in plan.disks
                    }:
                        assert m.get("readOnly") is True, (c["name"], m)
        SEEN["prepared"] += 1
        if SEEN["prepared"] % VALIDATE_EVERY == 1:
            kubernetes_validate.validate(after, KUBE_VERSION, strict=True)
            SEEN["schema-validated"] += 1


@given(pods())
@fuzz(5000)
def _pod_property(reviews: list[dict[str, Any]]) -> None:
    for review in reviews:
        ran("pod")
        pristine = json.dumps(review)
        admitted = check_review(review, "mutate-pod", "pod")
        assert json.dumps(review) == pristine  # the input is not modified
        if admitted is not None:
            _check_admitted_pod(review["request"]["object"], admitted)


def test_generated_launcher_pods() -> None:
    TALLY.clear()
    SEEN.clear()
    kubernetes_validate.validate(json.loads(POD_TEXT)["request"]["object"], KUBE_VERSION, strict=True)
    _pod_property()
    assert SEEN["prepared"] >= 1000 and TALLY["pod-denied"] >= 1500, (SEEN, TALLY)
    assert SEEN["schema-validated"] >= SEEN["prepared"] // VALIDATE_EVERY
