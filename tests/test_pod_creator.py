"""Who may create a virt-launcher Pod that carries a diskhooks plan (policy ``kubevirt.controllerServiceAccount``).

The real admission core (``webhook.admission.handle_review``, route ``mutate-pod``) decides the review
kube-apiserver really sent for the sample launcher Pod
(``tests/data/kubevirt/admission/virt-launcher-pod-create.json``, made by the test user
``rig-admin``), with the Pod made managed and given a plan signed as in ``tests/test_pod_mutation.py``.
KubeVirt's virt-controller cannot run here, so its requests are that review with
``userInfo.username`` set to the controller's ServiceAccount user name.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.errors import Refused
from diskplan.policy import Policy, load_policy
from tests.conftest import ADMISSION, EXAMPLE_POLICY
from tests.test_pod_mutation import KEYS, managed_pod, sample_plan
from webhook.admission import handle_review, patch_of
from webhook.cluster import EMPTY_CLUSTER

CONTROLLER = "system:serviceaccount:kubevirt:kubevirt-controller"
SAMPLE_USER = "rig-admin"  # who made the recorded sample review
KEY = "kubevirt.controllerServiceAccount"


def policy_text(kubevirt: str | None) -> str:
    text = EXAMPLE_POLICY.read_text()
    assert "kubevirt:" not in text  # the example stays without the key (the samples keep working)
    return text if kubevirt is None else f"{text}\nkubevirt:\n{kubevirt}\n"


@pytest.fixture(scope="module")
def checked() -> Policy:
    return load_policy(policy_text("  controllerServiceAccount: kubevirt/kubevirt-controller"))


@pytest.fixture(scope="module")
def unchecked() -> Policy:
    return load_policy(policy_text(None))


# ------------------------------------------------------------------------------------------------
# the policy key
# ------------------------------------------------------------------------------------------------
def test_the_key_names_the_controller_user(checked: Policy, unchecked: Policy) -> None:
    assert checked.kubevirt.controller_service_account == "kubevirt/kubevirt-controller"
    assert checked.kubevirt.username == CONTROLLER
    assert unchecked.kubevirt.controller_service_account is None
    assert unchecked.kubevirt.username is None
    cnv = load_policy(policy_text("  controllerServiceAccount: openshift-cnv/kubevirt-controller"))
    assert cnv.kubevirt.username == "system:serviceaccount:openshift-cnv:kubevirt-controller"


@pytest.mark.parametrize("body, where, says", [
    ("  controllerServiceAccount: kubevirt-controller", KEY, "is not <namespace>/<name>"),
    ("  controllerServiceAccount: kubevirt/kubevirt/controller", KEY, "is not <namespace>/<name>"),
    ("  controllerServiceAccount: KubeVirt/kubevirt-controller", KEY, "both DNS labels"),
    ("  controllerServiceAccount: /kubevirt-controller", KEY, "is not <namespace>/<name>"),
    ('  controllerServiceAccount: ""', KEY, "is not <namespace>/<name>"),
    ("  controllerServiceAccount: 5", KEY, "must be a string"),
    ("  controllerServiceAccount: [kubevirt/kubevirt-controller]", KEY, "must be a string"),
    ("  serviceAccount: kubevirt/kubevirt-controller", "kubevirt.serviceAccount", "unknown key"),
    ("  - kubevirt/kubevirt-controller", "kubevirt", "must be a mapping"),
])
def test_bad_values_are_refused_naming_the_field(body: str, where: str, says: str) -> None:
    with pytest.raises(Refused) as err:
        load_policy(policy_text(body))
    assert err.value.field == where
    assert says in str(err.value)


# ------------------------------------------------------------------------------------------------
# the admission core on the sample review
# ------------------------------------------------------------------------------------------------
def review(policy: Policy, *, managed: bool = True, username: str | None = SAMPLE_USER) -> dict[str, Any]:
    """The sample launcher Pod's review: managed with a signed plan, or as recorded; ``username``
    None drops ``userInfo`` (a hand-made review)."""
    out: dict[str, Any] = json.loads((ADMISSION / "virt-launcher-pod-create.json").read_text())
    assert out["request"]["userInfo"]["username"] == SAMPLE_USER
    if managed:
        out["request"]["object"] = managed_pod(sample_plan(policy))
    else:
        assert K.LABEL_MANAGED not in out["request"]["object"]["metadata"]["labels"]
    if username is None:
        del out["request"]["userInfo"]
    else:
        out["request"]["userInfo"]["username"] = username
    return out


def decide(body: dict[str, Any], policy: Policy) -> dict[str, Any]:
    response: dict[str, Any] = handle_review(body, route="mutate-pod", policy=policy, plan_keys=KEYS,
                                             cluster=EMPTY_CLUSTER)["response"]
    return response


def prepare_added(response: dict[str, Any]) -> bool:
    return any(op["path"].startswith("/spec/initContainers")
               and K.PREPARE_CONTAINER in json.dumps(op["value"]) for op in patch_of(response))


def test_with_the_key_a_managed_pod_of_another_user_is_denied(checked: Policy) -> None:
    out = decide(review(checked), checked)
    assert out["allowed"] is False
    assert "patch" not in out
    message = out["status"]["message"]
    assert message.startswith("request.userInfo.username")
    assert (f"only KubeVirt's virt-controller ({CONTROLLER}) creates virt-launcher Pods that carry a "
            f"diskhooks plan; '{SAMPLE_USER}' may not") in message


def test_with_the_key_a_review_without_a_user_is_denied(checked: Policy) -> None:
    out = decide(review(checked, username=None), checked)
    assert out["allowed"] is False
    assert "request.userInfo.username" in out["status"]["message"]
    # a look-alike of the controller in another namespace is another user
    out = decide(review(checked, username="system:serviceaccount:vms:kubevirt-controller"), checked)
    assert out["allowed"] is False


def test_with_the_key_the_controllers_pod_is_prepared(checked: Policy, unchecked: Policy) -> None:
    out = decide(review(checked, username=CONTROLLER), checked)
    assert out["allowed"] is True
    assert prepare_added(out)
    # the same patch as without the check: the key only decides who, not what
    assert patch_of(out) == patch_of(decide(review(unchecked, username=CONTROLLER), unchecked))


def test_without_the_key_any_creator_is_prepared_as_before(unchecked: Policy) -> None:
    for username in (SAMPLE_USER, CONTROLLER, None):
        out = decide(review(unchecked, username=username), unchecked)
        assert out["allowed"] is True
        assert prepare_added(out)


@pytest.mark.parametrize("username", [SAMPLE_USER, CONTROLLER, None])
def test_unmanaged_pods_of_any_user_are_untouched(checked: Policy, unchecked: Policy,
                                                  username: str | None) -> None:
    for policy in (checked, unchecked):
        out = decide(review(policy, managed=False, username=username), policy)
        assert out["allowed"] is True
        assert patch_of(out) == []
