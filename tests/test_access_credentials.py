"""Password reset stays KubeVirt's: the webhook leaves ``spec.accessCredentials`` alone.

KubeVirt resets guest passwords with ``accessCredentials`` (``userPassword`` from a Secret,
propagated by the guest agent; ``sshPublicKey`` likewise). A diskhooks VM or VMI that uses them must
keep them exactly as the owner wrote them, through CREATE, UPDATE and reinvocation, and the result
must stay valid for KubeVirt's own schema. Reviews are the ones kube-apiserver sent
(``tests/data/kubevirt/admission/``), run through the real admission core.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.policy import Policy
from tests.kubevirt_schema import assert_valid_vm, assert_valid_vmi
from tests.test_admission import apply, load_review, policy, review_of  # noqa: F401 - fixture

ACCESS = [
    {"userPassword": {"source": {"secret": {"secretName": "pg01-passwords"}},
                      "propagationMethod": {"qemuGuestAgent": {"users": ["root", "postgres"]}}}},
    {"sshPublicKey": {"source": {"secret": {"secretName": "pg01-keys"}},
                      "propagationMethod": {"qemuGuestAgent": {"users": ["postgres"]}}}},
]


def _with_access(review: dict[str, Any], spec_path: tuple[str, ...]) -> dict[str, Any]:
    review = copy.deepcopy(review)
    spec = review["request"]["object"]
    for key in spec_path:
        spec = spec[key]
    spec["accessCredentials"] = copy.deepcopy(ACCESS)
    return review


def _patched_paths(response: dict[str, Any]) -> list[str]:
    from webhook.admission import patch_of

    return [op["path"] for op in patch_of(response)]


@pytest.mark.parametrize("name", ["vm-create.json", "vm-update.json"])
def test_a_vm_keeps_its_access_credentials(name: str, policy: Policy) -> None:  # noqa: F811
    review = _with_access(load_review(name), ("spec", "template", "spec"))
    obj = review["request"]["object"]
    assert any(k.startswith(K.PREFIX) for k in obj["metadata"].get("annotations", {})), \
        "the sample must be a diskhooks VM, or the test proves nothing"
    response = review_of(name, policy, review=review)["response"]
    assert response["allowed"] is True, response
    assert _patched_paths(response), "the webhook changed nothing: not a diskhooks VM"
    assert not [p for p in _patched_paths(response) if "accessCredentials" in p]
    vm = apply(obj, response)
    assert vm["spec"]["template"]["spec"]["accessCredentials"] == ACCESS
    assert_valid_vm(vm)

    again = copy.deepcopy(review)
    again["request"]["object"] = vm
    second = review_of(name, policy, review=again)["response"]
    assert second["allowed"] is True
    assert apply(vm, second)["spec"]["template"]["spec"]["accessCredentials"] == ACCESS


def test_a_bare_vmi_keeps_its_access_credentials(policy: Policy) -> None:  # noqa: F811
    review = _with_access(load_review("vmi-create.json"), ("spec",))
    obj = review["request"]["object"]
    obj["metadata"].setdefault("annotations", {})[K.ANN_DISKS] = "[{name: scratch, size: 2Gi}]"
    response = review_of("vmi-create.json", policy, review=review)["response"]
    assert response["allowed"] is True, response
    assert not [p for p in _patched_paths(response) if "accessCredentials" in p]
    vmi = apply(obj, response)
    assert vmi["spec"]["accessCredentials"] == ACCESS
    assert_valid_vmi(vmi)
