"""Plan version 3 (``diskplan/plan.py``): the optional home ``node``.

Written as version 3 only when a node is set (a plan with detached disks and no node stays version
2, one with neither version 1), read strictly (a node name is a DNS-1123 subdomain; ``node`` is
unknown to versions 1 and 2), covered by the signature like every other member.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from diskplan.errors import Malformed, Refused
from diskplan.plan import (
    PLAN_VERSIONS,
    DetachedDisk,
    Plan,
    PlanKeys,
    PlannedDisk,
    canonical_json,
    is_node_name,
    parse_plan,
    sign_plan,
    verify_plan,
)

KEYS = PlanKeys(current=b"plan-node-test-key-0123456789abcdef")
BASE = Plan(namespace="vms", vm="pg01", host_dir="/var/lib/diskhooks/vms/vms/pg01", image_library=None,
            sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
            disks=(PlannedDisk(name="pgdata", size_bytes=1 << 30, bus="virtio", cache="none", io="native",
                               discard="unmap"),))
DETACHED = (DetachedDisk(name="old", size_bytes=1 << 30),)


def doc(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(sign_plan(plan, KEYS))
    return out


@pytest.mark.parametrize("plan, version", [
    (BASE, 1),
    (replace(BASE, detached=DETACHED), 2),
    (replace(BASE, node="node-a"), 3),
    (replace(BASE, detached=DETACHED, node="node-a"), 3),
])
def test_the_lowest_version_that_carries_the_plan_is_written(plan: Plan, version: int) -> None:
    written = doc(plan)
    assert written["version"] == version
    assert ("node" in written) == (plan.node is not None)
    assert verify_plan(sign_plan(plan, KEYS), KEYS, namespace="vms", vm="pg01") == plan


def test_versions_one_to_three_are_read() -> None:
    assert PLAN_VERSIONS == (1, 2, 3)
    assert parse_plan(sign_plan(BASE, KEYS)).node is None


def test_a_changed_node_breaks_the_signature() -> None:
    text = sign_plan(replace(BASE, node="node-a"), KEYS)
    forged = json.loads(text)
    forged["node"] = "node-b"
    with pytest.raises(Refused) as err:
        verify_plan(canonical_json(forged).decode(), KEYS, namespace="vms", vm="pg01")
    assert "signature does not verify" in str(err.value)


@pytest.mark.parametrize("version", [1, 2])
def test_node_is_unknown_to_versions_one_and_two(version: int) -> None:
    body = replace(BASE, node="node-a").body()
    body["version"] = version
    with pytest.raises(Malformed) as err:
        parse_plan(json.dumps(body))
    assert err.value.field == "diskhooks.io/plan.node"


@pytest.mark.parametrize("node", ["Node-A", "a..b", "-a", "a.", "a_b", "x" * 254, "", 7])
def test_a_node_that_is_not_a_node_name_is_malformed(node: Any) -> None:
    body = replace(BASE, node="node-a").body()
    body["node"] = node
    with pytest.raises(Malformed) as err:
        parse_plan(json.dumps(body))
    assert err.value.field == "diskhooks.io/plan.node"


def test_node_names() -> None:
    assert is_node_name("node-a") and is_node_name("ip-10-0-1-7.eu-west-1.compute.internal")
    assert is_node_name("x" * 253) and not is_node_name("x" * 254)
    assert not is_node_name(None) and not is_node_name("A")


def test_holds_files() -> None:
    assert BASE.holds_files and replace(BASE, disks=(), detached=DETACHED).holds_files
    assert not replace(BASE, disks=()).holds_files
