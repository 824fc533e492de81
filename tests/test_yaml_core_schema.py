"""Plain YAML scalars in annotation values and in the policy file resolve by the YAML 1.2 core
schema (``diskplan/yamlsafe.py``), not by PyYAML's YAML 1.1
rules: ``017`` is 17 (not octal 15), ``1:20`` is text (not sexagesimal 80), ``1_000``, ``yes``,
``on``, ``0b101`` and dates are text, which the field's own check then reads or refuses naming
the field. What a user notices: the vCPUs and disk sizes a VM gets, the denial it gets, and
whether a policy file loads."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import pytest

from diskplan import keys as K
from diskplan.errors import Refused
from diskplan.plan import PlanKeys, verify_plan
from diskplan.policy import Policy, load_policy
from diskplan.yamlsafe import load_document
from tests.conftest import ADMISSION, EXAMPLE_POLICY
from tests.kubevirt_schema import assert_valid_vm
from webhook.admission import handle_review, patch_of
from webhook.cluster import EMPTY_CLUSTER

KEYS = PlanKeys(current=b"yaml-core-schema-test-key-0123456789")
POLICY = load_policy(EXAMPLE_POLICY.read_text())
MINIMAL = "sidecar: {image: ghcr.io/diskhooks/diskhooks-sidecar:0.1.0}\n"
D = K.ANN_DISKS


# ------------------------------------------------------------------------------------------------
# through the real admission core (as tests/test_quantity.py does it)
# ------------------------------------------------------------------------------------------------
def vm_review(annotations: dict[str, str]) -> dict[str, Any]:
    review = dict(json.loads((ADMISSION / "vm-create.json").read_text()))
    review["request"]["object"]["metadata"]["annotations"] = dict(annotations)
    return review


def admit(annotations: dict[str, str]) -> dict[str, Any]:
    review = vm_review(annotations)
    response = handle_review(review, route="mutate", policy=POLICY, plan_keys=KEYS,
                             cluster=EMPTY_CLUSTER)
    inner = response["response"]
    assert inner["allowed"], inner.get("status")
    ops = patch_of(response)
    obj = review["request"]["object"]
    vm = jsonpatch.apply_patch(obj, ops) if ops else copy.deepcopy(obj)
    assert_valid_vm(vm)
    return dict(vm)


def denial(annotations: dict[str, str]) -> str:
    response = handle_review(vm_review(annotations), route="mutate", policy=POLICY, plan_keys=KEYS,
                             cluster=EMPTY_CLUSTER)["response"]
    assert response["allowed"] is False, "admitted"
    assert "patch" not in response
    return str(response["status"]["message"])


@pytest.mark.parametrize("cpu", ["010", "{sockets: 1, cores: 010}", "{cores: 010, threads: 1}"])
def test_cpu_010_gets_ten_vcpus(cpu: str) -> None:
    """YAML 1.1 read ``010`` as octal 8."""
    vm = admit({K.ANN_CPU: cpu, K.ANN_MEMORY: "4Gi"})
    domain = vm["spec"]["template"]["spec"]["domain"]
    assert domain["cpu"] == {"sockets": 1, "cores": 10, "threads": 1}
    assert domain["resources"]["limits"]["cpu"] == "10"


def test_a_disk_size_with_a_leading_zero_is_decimal() -> None:
    """YAML 1.1 read ``04000000000`` as octal: a 512Mi disk instead of 4G."""
    vm = admit({D: "[{name: data, size: 04000000000}]"})
    spec = vm["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "data"]
    assert volume["hostDisk"]["capacity"] == "4G"
    plan = verify_plan(vm["spec"]["template"]["metadata"]["annotations"][K.ANN_PLAN], KEYS,
                       namespace="vms", vm=vm["metadata"]["name"])
    assert [(d.name, d.size_bytes) for d in plan.disks] == [("data", 4 * 10**9)]


@pytest.mark.parametrize(("size", "reason"), [
    ("1:20", "'1:20' is not a quantity"),  # YAML 1.1: 80 (sexagesimal), "80 is 80 bytes"
    ("1_073_741_824", "'1_073_741_824' is not a quantity"),  # YAML 1.1: 1Gi, admitted
    ("0b1000000000000000000000000000000", "is not a quantity"),  # YAML 1.1: binary 1Gi, admitted
    ("0x40000000", None),  # hex is YAML 1.2 as well: 1Gi, admitted
])
def test_a_disk_size_that_is_not_a_number_in_yaml_1_2_is_denied_naming_the_size(
        size: str, reason: str | None) -> None:
    annotations = {D: f"[{{name: data, size: {size}}}]"}
    if reason is None:
        admit(annotations)
        return
    message = denial(annotations)
    assert message.startswith(f"{D}[0].size: "), message
    assert reason in message, message


@pytest.mark.parametrize("value", ["yes", "True", "on", "1"])
def test_persist_root_takes_only_the_strings_true_and_false(value: str) -> None:
    """``persist-root`` is compared as the annotation's text, never read as YAML: every other word
    (a YAML 1.1 boolean such as ``yes``, or a YAML 1.2 one such as ``True``) is a clear denial."""
    message = denial({K.ANN_PERSIST_ROOT: value})
    assert message == f'{K.ANN_PERSIST_ROOT}: must be "true" or "false", not {value!r}'


# ------------------------------------------------------------------------------------------------
# the policy file
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["yes", "no", "on", "off", "y", "n", "Yes", "ON"])
def test_a_policy_with_allow_lun_yes_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(Refused) as err:
        load_policy(f"passthrough: {{storageClasses: [local-nvme], allowLun: {value}}}\n" + MINIMAL)
    assert str(err.value) == "passthrough.allowLun: must be true or false"


@pytest.mark.parametrize(("value", "allowed"), [
    ("true", True), ("True", True), ("TRUE", True), ("false", False), ("False", False),
    ("FALSE", False), ("null", False), ("~", False),
])
def test_a_policy_with_allow_lun_true_or_false_loads(value: str, allowed: bool) -> None:
    policy = load_policy(f"passthrough: {{storageClasses: [local-nvme], allowLun: {value}}}\n"
                         + MINIMAL)
    assert policy.passthrough.allow_lun is allowed


def test_policy_integers_with_a_leading_zero_are_decimal() -> None:
    policy = load_policy("sizing:\n  maxCPU: 010\n  maxSockets: 02\n" + MINIMAL)
    assert (policy.sizing.max_cpu, policy.sizing.max_sockets) == (10, 2)


def test_the_example_policy_reads_as_before() -> None:
    assert isinstance(POLICY, Policy) and POLICY.passthrough.allow_lun is True


# ------------------------------------------------------------------------------------------------
# yamlsafe itself
# ------------------------------------------------------------------------------------------------
SCALARS: list[tuple[str, Any]] = [
    # integers: decimal (leading zeros too), 0o octal, 0x hexadecimal
    ("017", 17), ("010", 10), ("-017", -17), ("+12", 12), ("0", 0), ("00", 0), ("4", 4),
    ("0o17", 15), ("0x1F", 31), ("0x1f", 31),
    # YAML 1.1 integers that are text in YAML 1.2
    ("1:20", "1:20"), ("190:20:30", "190:20:30"), ("1_000", "1_000"), ("0b101", "0b101"),
    ("0o8", "0o8"), ("-0x10", "-0x10"), ("0X10", "0X10"), ("0x", "0x"),
    # booleans: only true/false in three spellings
    ("true", True), ("True", True), ("TRUE", True), ("false", False), ("False", False),
    ("FALSE", False), ("tRUE", "tRUE"),
    ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"), ("y", "y"), ("n", "n"),
    ("Y", "Y"), ("N", "N"), ("Yes", "Yes"), ("NO", "NO"), ("On", "On"), ("OFF", "OFF"),
    # null
    ("null", None), ("Null", None), ("NULL", None), ("~", None), ("nULL", "nULL"),
    # floats: a decimal point, and an exponent only with its sign
    ("1.5", 1.5), (".5", 0.5), ("-1.5", -1.5), ("1.", 1.0), ("1.0e+10", 1e10),
    ("1_000.5", "1_000.5"), ("1:20.5", "1:20.5"),
    # exponent forms YAML 1.1 read as text stay text, so a quantity field reads them exactly
    ("1e10", "1e10"), ("1.5e9", "1.5e9"),
    # no timestamps, no "value" type
    ("2024-01-01", "2024-01-01"), ("2001-12-14t21:59:43.10-05:00", "2001-12-14t21:59:43.10-05:00"),
    ("=", "="),
    # text stays text
    ("medium", "medium"), ("8Gi", "8Gi"), ("'017'", "017"), ('"yes"', "yes"), ("'true'", "true"),
]


def _same(got: Any, want: Any) -> bool:
    return type(got) is type(want) and got == want  # True is not 1, 1.0 is not 1


@pytest.mark.parametrize(("text", "value"), SCALARS, ids=[s[0] for s in SCALARS])
def test_plain_scalars_resolve_by_the_yaml_1_2_core_schema(text: str, value: Any) -> None:
    """Alone (the bare-word fast path), in a flow list that is not JSON and as a block mapping
    value."""
    assert _same(load_document(text, field="x"), value)
    _, item = load_document(f"[a, {text}]", field="x")
    assert _same(item, value)
    assert _same(load_document(f"k: {text}\n", field="x")["k"], value)


def test_the_empty_document_and_an_empty_value_are_null() -> None:
    assert load_document("", field="x") is None
    assert load_document("k:\n", field="x") == {"k": None}


def test_keys_resolve_the_same_way() -> None:
    assert load_document("{yes: 1, 010: a, on: off, 1:20: b}", field="x") == \
        {"yes": 1, 10: "a", "on": "off", "1:20": "b"}


def test_json_and_yaml_flow_agree() -> None:
    """JSON is YAML 1.2: the JSON fast path and the YAML path give the same values."""
    text = '{"n": 10, "f": 1.5, "t": true, "z": null, "s": "017"}'
    yaml_flow = "{n: 10, f: 1.5, t: true, z: null, s: '017'}"
    assert load_document(text, field="x") == load_document(yaml_flow, field="x") == \
        {"n": 10, "f": 1.5, "t": True, "z": None, "s": "017"}


@pytest.mark.parametrize(("text", "reason"), [
    (".inf", "not a finite number"), ("-.Inf", "not a finite number"), (".NaN", "not a finite number"),
    ("k: 1.0e+999", "not a finite number"),
    ("<<: {a: 1}", "merge"), ("[!!str a]", "tags"), ("- &a 1\n- *a\n", "anchors"),
    ("[" + "9" * 5000 + "]", "5000 digits"), ("k: " + "1" * 4400, "4400 digits"),
])
def test_what_is_still_refused(text: str, reason: str) -> None:
    with pytest.raises(Refused) as err:
        load_document(text, field="x")
    assert err.value.field == "x" and reason in err.value.reason, str(err.value)


def test_a_very_long_integer_in_the_policy_is_refused_naming_its_key() -> None:
    """Before, a decimal too long for Python's int() escaped as a ValueError (a 500)."""
    with pytest.raises(Refused) as err:
        load_policy("sizing: {maxCPU: " + "1" * 5000 + "}\n" + MINIMAL)
    assert err.value.field == "sizing.maxCPU" and "5000 digits" in err.value.reason
