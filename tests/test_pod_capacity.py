"""What the Pod mutation adds for capacity (``webhook/pod_mutation.py``, docs/CAPACITY.md): the
``diskhooks.io/storage`` request of a launcher Pod, the capacity directory mounted read-only in
prepare alone, and the policy's capacity settings as prepare's flags. The Pod is the one
kube-apiserver really sent (see tests/test_pod_mutation.py); results are validated against
Kubernetes' own Pod schema."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import kubernetes_validate
import pytest

from diskplan import keys as K
from diskplan.plan import DetachedDisk
from diskplan.policy import Policy, load_policy
from tests.conftest import EXAMPLE_POLICY
from tests.test_pod_mutation import (
    KEYS,
    KUBE_VERSION,
    container,
    data_disk,
    managed_pod,
    mounts,
    sample_plan,
    volume,
)
from webhook.pod_mutation import PREPARE_RESOURCES, mutate_pod

GiB = 1 << 30


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(EXAMPLE_POLICY.read_text())


def mutate(pod: dict[str, Any], policy: Policy) -> dict[str, Any]:
    return mutate_pod(pod, namespace="vms", policy=policy, plan_keys=KEYS).obj


def effective_request(pod: dict[str, Any], resource: str) -> int:
    """What kube-scheduler counts for a Pod: max(largest init container, sum of its containers)."""
    def req(c: dict[str, Any]) -> int:
        return int(((c.get("resources") or {}).get("requests") or {}).get(resource, "0"))
    spec = pod["spec"]
    return max([req(c) for c in spec.get("initContainers", [])] + [sum(req(c) for c in spec["containers"])])


def test_a_first_start_requests_its_planned_disks_in_whole_gib(policy: Policy) -> None:
    plan = replace(sample_plan(policy, persist=True), disks=(data_disk(size_bytes=10 * GiB + 1),),
                   detached=(DetachedDisk("old", 100 * GiB),))
    out = mutate(managed_pod(plan), policy)
    init = container(out, K.PREPARE_CONTAINER)
    wanted = {**PREPARE_RESOURCES, K.RESOURCE_STORAGE: "11"}  # rounded up; no persist root, no detached
    assert init["resources"] == {"requests": wanted, "limits": wanted}
    assert effective_request(out, K.RESOURCE_STORAGE) == 11
    compute = container(out, "compute")
    assert K.RESOURCE_STORAGE not in str(compute.get("resources"))
    kubernetes_validate.validate(out, KUBE_VERSION, strict=True)


def test_a_vm_with_a_home_requests_nothing(policy: Policy) -> None:
    plan = replace(sample_plan(policy), node="node-a")
    init = container(mutate(managed_pod(plan), policy), K.PREPARE_CONTAINER)
    assert init["resources"] == {"requests": PREPARE_RESOURCES, "limits": PREPARE_RESOURCES}


def test_without_a_node_agent_nothing_is_requested(policy: Policy) -> None:
    """No agent advertises diskhooks.io/storage: a request would keep every launcher Pending."""
    no_agent = replace(policy, node_agent=replace(policy.node_agent, service_account=None))
    init = container(mutate(managed_pod(sample_plan(policy)), no_agent), K.PREPARE_CONTAINER)
    assert K.RESOURCE_STORAGE not in init["resources"]["requests"]


def test_a_request_on_compute_can_only_raise_the_pods(policy: Policy) -> None:
    """A VM owner's own diskhooks.io/storage (KubeVirt copies domain resources onto compute) is
    kept; the Pod's effective request is the larger of the two, never lower than the plan's."""
    pod = managed_pod(sample_plan(policy))
    compute = next(c for c in pod["spec"]["containers"] if c["name"] == "compute")
    for member in ("requests", "limits"):
        compute.setdefault("resources", {}).setdefault(member, {})[K.RESOURCE_STORAGE] = "3"
    out = mutate(pod, policy)
    assert effective_request(out, K.RESOURCE_STORAGE) == 10
    compute["resources"]["requests"][K.RESOURCE_STORAGE] = compute["resources"]["limits"][K.RESOURCE_STORAGE] = "50"
    assert effective_request(mutate(pod, policy), K.RESOURCE_STORAGE) == 50


def test_the_capacity_directory_is_mounted_read_only_in_prepare_only(policy: Policy) -> None:
    out = mutate(managed_pod(sample_plan(policy)), policy)
    assert volume(out, K.POD_VOLUME_CAPACITY) == {
        "name": K.POD_VOLUME_CAPACITY,
        "hostPath": {"path": "/var/lib/diskhooks/vms/.diskhooks/capacity", "type": "DirectoryOrCreate"}}
    assert mounts(container(out, K.PREPARE_CONTAINER))[K.LAUNCHER_CAPACITY] == (K.POD_VOLUME_CAPACITY, True)
    for name in ("compute", "hook-sidecar-0"):
        assert K.POD_VOLUME_CAPACITY not in {m for m, _ in mounts(container(out, name)).values()}


def test_prepare_gets_the_policys_capacity(policy: Policy) -> None:
    text = EXAMPLE_POLICY.read_text().replace("overcommit: 1.0 ", "overcommit: 1.25").replace("reserve: 5% ",
                                                                                             "reserve: 40Gi")
    custom = load_policy(text)
    init = container(mutate(managed_pod(sample_plan(custom)), custom), K.PREPARE_CONTAINER)
    assert init["args"] == ["prepare", "--plan-from-env", "--overcommit", "1.25", "--reserve", "40Gi"]


def test_mutating_again_changes_nothing(policy: Policy) -> None:
    once = mutate(managed_pod(sample_plan(policy)), policy)
    assert mutate(once, policy) == once
