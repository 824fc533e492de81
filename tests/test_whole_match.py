r"""Names and paths are matched whole: a trailing newline is not a valid ending.

In Python's ``re``, ``$`` matches at the end *or before a trailing newline*, so ``^[a-z0-9]+$``
accepted ``"data\n"``: the webhook admitted a disk named ``data\n`` and wrote the hostDisk path
``<root>/<ns>/<vm>/data\n.qcow2`` and a signed plan naming it (found by the fuzz properties,
``tests/test_fuzz_parsers.py``). Every such pattern now ends with ``\Z``. One case per reader.
"""

from __future__ import annotations

import json

import pytest
import yaml

from diskplan import baserecord, homemarker
from diskplan import keys as K
from diskplan.annotations import parse_requests
from diskplan.errors import Malformed, Refused
from diskplan.plan import Plan, PlanKeys, is_clean_abs_path, is_node_name, parse_plan, sign_plan
from diskplan.policy import load_policy
from tests.conftest import EXAMPLE_POLICY
from tests.kubevirt_schema import DNS_LABEL, QUANTITY, SERIAL

POLICY = load_policy(EXAMPLE_POLICY.read_text())
PLAN = Plan(
    namespace="vms",
    vm="pg01",
    host_dir="/var/lib/diskhooks/vms/vms/pg01",
    image_library=None,
    sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
)


@pytest.mark.parametrize(
    "item,field",
    [
        ({"name": "data\n", "size": "1Gi"}, "diskhooks.io/disks[0].name"),
        ({"name": "data", "size": "1Gi", "backing": "almalinux-9\n"}, "diskhooks.io/disks[0].backing"),
        ({"name": "data", "size": "1Gi", "serial": "S1\n"}, "diskhooks.io/disks[0].serial"),
    ],
)
def test_an_annotation_value_with_a_trailing_newline_is_refused(item: dict[str, str], field: str) -> None:
    with pytest.raises(Refused) as info:
        parse_requests({K.ANN_DISKS: json.dumps([item])}, POLICY)
    assert info.value.field == field
    assert parse_requests({K.ANN_DISKS: json.dumps([{k: v.rstrip("\n") for k, v in item.items()}])}, POLICY)


def test_a_passthrough_claim_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(Refused) as info:
        parse_requests({K.ANN_PASSTHROUGH: '[{"name": "fast0", "claim": "nvme0\\n"}]'}, POLICY)
    assert info.value.field == "diskhooks.io/passthrough[0].claim"


@pytest.mark.parametrize(
    "member,value",
    [
        ("hostDir", "/var/lib/diskhooks/vms/vms/pg01\n"),
        ("namespace", "vms\n"),
        ("vm", "pg01\n"),
        ("node", "node-a\n"),
    ],
)
def test_a_plan_member_with_a_trailing_newline_does_not_parse(member: str, value: str) -> None:
    doc = json.loads(sign_plan(PLAN, PlanKeys(b"whole-match-test-key-0123")))
    doc[member] = value
    if member == "node":
        doc["version"] = 3
    with pytest.raises(Malformed) as info:
        parse_plan(json.dumps(doc))
    assert info.value.field == f"{K.ANN_PLAN}.{member}"


def test_a_plan_disk_or_base_file_with_a_trailing_newline_does_not_parse() -> None:
    doc = json.loads(sign_plan(PLAN, PlanKeys(b"whole-match-test-key-0123")))
    doc["disks"] = [
        {
            "name": "data\n",
            "sizeBytes": 1 << 30,
            "bus": "virtio",
            "cache": "none",
            "io": "native",
            "discard": "unmap",
        }
    ]
    with pytest.raises(Malformed, match=r"disks\[0\]\.name"):
        parse_plan(json.dumps(doc))
    doc["disks"][0]["name"] = "data"
    doc["disks"][0]["backing"] = {"image": "almalinux-9", "file": "almalinux-9.qcow2\n", "format": "qcow2"}
    with pytest.raises(Malformed, match=r"disks\[0\]\.backing\.file"):
        parse_plan(json.dumps(doc))


def test_the_shared_name_and_path_checks() -> None:
    assert not is_node_name("node-a\n") and is_node_name("node-a")
    assert not is_clean_abs_path("/var/lib/x\n") and is_clean_abs_path("/var/lib/x")


def test_records_and_markers_read_from_the_node() -> None:
    """A base record's hash and a home marker's uid and time are whole values too."""
    sha = "a" * 64
    assert baserecord._SHA256.match(sha) and not baserecord._SHA256.match(sha + "\n")
    assert not baserecord._DIGEST.match(f"sha256:{sha}\n")
    assert homemarker._UID.match("6a1e5f3c-1d2b") and not homemarker._UID.match("6a1e5f3c-1d2b\n")
    assert not homemarker._RFC3339.match("2026-01-01T00:00:00Z\n")


def test_the_schema_helper_the_tests_judge_by() -> None:
    """tests/kubevirt_schema.py judges accepted VMs: it must not pass a newline either."""
    assert DNS_LABEL.match("data") and not DNS_LABEL.match("data\n")
    assert not SERIAL.match("S1\n") and not QUANTITY.match("1Gi\n")


@pytest.mark.parametrize(
    "path,value,field",
    [
        (("sidecar", "image"), "ghcr.io/diskhooks/diskhooks-sidecar:0.1.0\n", "sidecar.image"),
        (("passthrough", "storageClasses"), ["local-nvme\n"], "passthrough.storageClasses[0]"),
    ],
)
def test_a_policy_value_with_a_trailing_newline_is_refused(
    path: tuple[str, str], value: object, field: str
) -> None:
    doc = yaml.safe_load(EXAMPLE_POLICY.read_text())
    doc[path[0]][path[1]] = value
    with pytest.raises(Refused) as info:
        load_policy(json.dumps(doc))
    assert info.value.field == field


def test_a_vmi_uid_and_a_certificate_name_with_a_trailing_newline_are_refused() -> None:
    from hooksidecar.prepare import cli as prepare_cli
    from webhook import cli as webhook_cli

    assert prepare_cli._VMI_UID.match("6a1e5f3c") and not prepare_cli._VMI_UID.match("6a1e5f3c\n")
    assert webhook_cli._HOSTNAME.match("diskhooks.example") and not webhook_cli._HOSTNAME.match("x.example\n")
