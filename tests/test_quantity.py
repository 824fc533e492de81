"""Quantities (``diskplan/quantity.py``): the full Kubernetes grammar, exact, bounded, and written
back only in the canonical form.

The official ``kubernetes`` Python client's ``kubernetes.utils.quantity.parse_quantity`` is the test
oracle (the runtime never imports it: diskplan ships alone in the sidecar image). Where our parser
accepts, it must give the oracle's value exactly; what the oracle refuses we refuse; and beyond that
we refuse only for a reason we name: too long, too large, finer than 1n, and for sizes zero,
negative or not a whole number of bytes. The oracle is laxer than Kubernetes itself in a few
places (it hands the number to :class:`decimal.Decimal`, which reads ``NaN``, ``Infinity``,
``1_000``, spaces and non-ASCII digits, and it lets an exponent precede a suffix, ``1e3Gi``, or
takes ``K`` for ``k``); those strings are listed in :data:`ORACLE_LAX`, checked to be accepted by
the oracle and refused by us (``k8s.io/apimachinery``'s Go parser refuses them all).

The end of the file runs annotated VMs through the real admission core: the emitted hostDisk
capacity, guest memory, requests and limits are canonical, pass KubeVirt's schema helper, and a
second pass gives no patch.
"""

from __future__ import annotations

import copy
import json
import time
from decimal import Decimal
from fractions import Fraction
from typing import Any

import jsonpatch
import pytest
from kubernetes.utils.quantity import parse_quantity as oracle

from diskplan import keys as K
from diskplan.annotations import parse_requests, quantity_text
from diskplan.errors import Refused
from diskplan.plan import PlanKeys, verify_plan
from diskplan.policy import Policy, load_policy
from diskplan.quantity import (
    MAX_TEXT,
    MAX_VALUE,
    format_bytes,
    format_millicpu,
    parse_bytes,
    parse_millicpu,
    parse_quantity,
)
from tests.conftest import ADMISSION, EXAMPLE_POLICY
from tests.kubevirt_schema import QUANTITY, assert_valid_vm
from webhook.admission import handle_review, patch_of
from webhook.cluster import EMPTY_CLUSTER

GI = 2**30
MI = 2**20
NANO = Fraction(1, 10**9)

# ------------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------------
ACCEPTED_BY_KUBERNETES = [
    # plain, binary, decimal SI
    "0", "1", "2", "20Gi", "500M", "1.5Ti", "1Ki", "1Mi", "1Gi", "1Ti", "1Pi", "1Ei", "7Ei", "5k",
    "4M", "3G", "2T", "1P", "1E", "6m", "7u", "8n", "1000m", "1500m", "2000000u", "3000000000n",
    "100Mi", "1.75Mi", "0.25Ki", "0.1Gi", "1.5Gi", "0.000000001Ei", "1073741824000m",
    # the forms the old parser refused: sign, leading dot, trailing dot, exponent
    "+1Gi", "+20Gi", "-1Gi", "+0", "-0", ".5Gi", "-.5Gi", "+.5", ".5", "1.Gi", "1.", "0.", "1.e3",
    "1e9", "1E9", "5E3", "1e+9", "1E+9", "1e-3", "1E-3", "1.5e3", ".5e1", "+1e3", "-1e3", "1e10",
    "1e0", "1e00000", "1e0000000000000000003", "1073741824e0", "2e9", "5E9", "1.5E",
    # leading zeros
    "00012", "012Mi", "0" * 61 + "1Gi",
    # at and around the bounds
    "9223372036854775807", "9223372036854775808", "9.223372036854775807E18", "1e18", "1e19",
    "8Ei", "1e999999999", "1e4294967296", "-1e999999999", "0e999999999", "0e-999999999",
    "1e-9", "1n", "0.5n", "1e-10", "1e-12", "0.0000000001", "1e-999999999",
    "0." + "0" * 61 + "1", "1" + "0" * 64, "12345678901234567890123456789012345678901234567890Ki",
]
REFUSED_BY_KUBERNETES = [
    "", "Gi", "-", "+", ".", "..5", "1..5", "1.5.5", "1Gb", "1GB", "1gi", "1ki", "1mi", "1KiB",
    "1e", "1E+", "1e-", "1e3.5", "1ee3", "0x10", "1,5Gi", "1/2", "abc", "Gi1", "--1", "+-1",
    "1e++3", "1 000", "1Gi!", "1 Gi 2", "1\x00Gi", "1e999999999Gi", "1Ki1", "1i", "1eGi", "nan",
]
# the oracle accepts these; Kubernetes' grammar (and we) refuse them
ORACLE_LAX = [
    "1K", "2K", "1e3Gi", "1E3Ki", "1e3k", "1e3m", "1.5e3M", "NaN", "sNaN", "Infinity",
    "inf", "-inf", "1_000", "1_0Gi", " 1 Gi", "1 Gi", "1\u00a0Gi", "\u0661\u0662", "\uff11Gi",
]
# Kubernetes trims surrounding whitespace when it decodes a quantity field
# (Quantity.UnmarshalJSON); so do we. The oracle trims only in front of a suffix.
TRIMMED = [" 1Gi", "1Gi ", "\t20Gi\n", " 1e10 ", "  .5Gi"]

CASES = ACCEPTED_BY_KUBERNETES + REFUSED_BY_KUBERNETES + ORACLE_LAX


def oracle_value(text: str) -> Decimal | None:
    try:
        value = oracle(text)
    except ValueError:
        return None
    assert isinstance(value, Decimal)
    return value


def expected_refusal(text: str) -> str | None:
    """The reason our general parser must give, or None when it must accept."""
    value = oracle_value(text)
    if value is None or text in ORACLE_LAX:
        return "not a quantity"
    if len(text.strip()) > MAX_TEXT:
        return "characters long"
    if value.copy_abs() > MAX_VALUE:
        return "too large"
    if value != 0 and value.copy_abs() < Decimal("1e-9"):
        return "finer than 1n"
    return None


def test_the_case_lists_say_what_the_oracle_does() -> None:
    for text in ACCEPTED_BY_KUBERNETES:
        assert oracle_value(text) is not None, text
    for text in REFUSED_BY_KUBERNETES:
        assert oracle_value(text) is None, text
    for text in ORACLE_LAX:
        assert oracle_value(text) is not None, f"{text!r}: the oracle refuses it now; move it"


# ------------------------------------------------------------------------------------------------
# the general parser against the oracle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", CASES, ids=repr)
def test_parse_quantity_agrees_with_kubernetes(text: str) -> None:
    reason = expected_refusal(text)
    if reason is None:
        value = oracle_value(text)
        assert value is not None
        assert parse_quantity(text) == Fraction(value)
    else:
        with pytest.raises(ValueError, match=reason) as err:
            parse_quantity(text)
        assert len(str(err.value)) < 200


@pytest.mark.parametrize("text", TRIMMED, ids=repr)
def test_surrounding_whitespace_is_trimmed_as_kubernetes_does(text: str) -> None:
    value = oracle_value(text.strip())
    assert value is not None
    assert parse_quantity(text) == Fraction(value)
    assert parse_bytes(text) == int(value)


@pytest.mark.parametrize("text", ["1 Gi", "1\tGi", "1\nGi", "+ 1Gi", "1. 5Gi", "1e 3"], ids=repr)
def test_whitespace_inside_is_refused(text: str) -> None:
    for parse in (parse_quantity, parse_bytes):
        with pytest.raises(ValueError, match="whitespace"):
            parse(text)


# ------------------------------------------------------------------------------------------------
# sizes: the oracle's value, or one of our own refusals with its reason
# ------------------------------------------------------------------------------------------------
def expected_size_refusal(text: str) -> str | None:
    reason = expected_refusal(text)
    value = oracle_value(text)
    if reason in ("not a quantity", "characters long") or value is None:
        return reason
    if value == 0:
        return "zero quantity; a size must be greater than zero"
    if value < 0:
        return "negative quantity; a size must be greater than zero"
    if value > MAX_VALUE:
        return "too large"
    if value != value.to_integral_value():
        return "not a whole number of bytes"
    return None


@pytest.mark.parametrize("text", CASES, ids=repr)
def test_parse_bytes_agrees_with_kubernetes_or_names_its_reason(text: str) -> None:
    reason = expected_size_refusal(text)
    if reason is None:
        value = oracle_value(text)
        assert value is not None
        assert parse_bytes(text) == int(value)
        assert isinstance(parse_bytes(text), int)
    else:
        with pytest.raises(ValueError, match=reason) as err:
            parse_bytes(text)
        assert "quantity" in str(err.value) or "bytes" in str(err.value)
        assert len(str(err.value)) < 200


@pytest.mark.parametrize(("text", "n"), [
    ("1e10", 10**10), ("+20Gi", 20 * GI), (".5Gi", GI // 2), ("1.Gi", GI), ("5E3", 5000),
    ("1e9", 10**9), ("1000m", 1), ("2000000u", 2), ("3000000000n", 3), ("1073741824000m", GI),
    ("0.25Ki", 256), ("1.5Gi", 1536 * MI), ("9223372036854775807", MAX_VALUE), ("7Ei", 7 * 2**60),
    ("1E", 10**18), ("9.223372036854775807E18", MAX_VALUE),
])
def test_forms_kubernetes_accepts_are_sizes(text: str, n: int) -> None:
    assert parse_bytes(text) == n


@pytest.mark.parametrize(("value", "reason"), [
    ("1500m", "'1500m' is not a whole number of bytes"),
    ("1u", "not a whole number of bytes"),
    ("0.1Gi", "not a whole number of bytes"),
    ("1e-999999999", "not a whole number of bytes"),
    ("-1Gi", "'-1Gi' is a negative quantity; a size must be greater than zero"),
    ("-1e999999999", "negative quantity"),
    ("-0", "zero quantity"),
    ("0e999999999", "zero quantity"),
    (0, "'0' is a zero quantity"),
    (-5, "negative quantity"),
    ("1e999999999", "'1e999999999' is too large"),
    ("8Ei", "too large"),
    ("9223372036854775808", "too large"),
    (2**63, "too large"),
    (10**4000, "too large"),
    ("1" * (MAX_TEXT + 1), f"is {MAX_TEXT + 1} characters long; a quantity has at most {MAX_TEXT}"),
    ("x" * 10**6, "characters long"),
    (1.5, "floating-point number '1.5' (quote it"),
    (1e10, "floating-point number"),
    (float("nan"), "floating-point number"),
    (True, "not bool"),
    (None, "not NoneType"),
    (["1Gi"], "not list"),
    ("1e3Gi", "unknown suffix 'e3Gi'"),
    ("1K", "unknown suffix 'K'"),
    ("lots", "'lots' is not a quantity"),
])
def test_size_refusals_name_the_reason(value: object, reason: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_bytes(value)
    assert reason in str(err.value)
    assert len(str(err.value)) < 200


def test_integers_are_counted_exactly() -> None:
    assert parse_bytes(20 * GI) == 20 * GI
    assert parse_bytes(MAX_VALUE) == MAX_VALUE
    assert parse_quantity(-7) == -7
    for n in (1, 512, 10**10, MAX_VALUE):
        assert parse_bytes(n) == oracle(n)


@pytest.mark.parametrize("text", [
    "1e999999999", "1e-999999999", "-1e999999999", "1e" + "9" * (MAX_TEXT - 2),
    "1e-" + "9" * (MAX_TEXT - 3), "9" * MAX_TEXT, "." + "9" * (MAX_TEXT - 3) + "Ei",
    "0." + "0" * (MAX_TEXT - 3) + "1", "1e999999m", "9" * 10**6,
], ids=lambda t: repr(t[:24]))
def test_huge_and_tiny_exponents_are_answered_at_once(text: str) -> None:
    start = time.perf_counter()
    for _ in range(100):
        for parse in (parse_quantity, parse_bytes, parse_millicpu):
            try:
                parse(text)
            except ValueError:
                pass
    assert time.perf_counter() - start < 1.0, "300 parses of one hostile text take well under 1s"


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "millis"), [
    ("500m", 500), ("2", 2000), ("1.5", 1500), (1.5, 1500), (2, 2000), ("2e0", 2000), ("+1", 1000),
    (".5", 500), ("1.", 1000), ("1e-3", 1), ("0", 0), ("1000000u", 1000), ("0.1", 100),
])
def test_parse_millicpu(value: object, millis: int) -> None:
    assert parse_millicpu(value) == millis
    assert parse_millicpu(format_millicpu(millis)) == millis


@pytest.mark.parametrize("value", ["0.0015", "1500u", "1e-7", 1e-7, "inf", float("inf"),
                                   "1e999999", "1e999999m", "1e3m", "NaN", "lots", True, None])
def test_parse_millicpu_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_millicpu(value)


# ------------------------------------------------------------------------------------------------
# the canonical form
# ------------------------------------------------------------------------------------------------
SIZES = [1, 512, 1000, 1023, 1024, 1536, 10**9, 10**10, GI, GI // 2, 20 * GI, 1536 * MI,
         3 * 2**40 // 2, 2**60, 10**18, 7 * 2**60, MAX_VALUE, 5 * 10**9, 123456789 * 512]


@pytest.mark.parametrize("n", SIZES)
def test_format_bytes_is_canonical_exact_and_a_fixed_point(n: int) -> None:
    text = format_bytes(n)
    assert quantity_text(n) == text, "one canonical form"
    assert parse_bytes(text) == n
    assert oracle(text) == n, "Kubernetes reads the same value"
    assert QUANTITY.fullmatch(text), "and KubeVirt's schema helper accepts it"
    assert format_bytes(parse_bytes(text)) == text


@pytest.mark.parametrize(("n", "text"), [
    (21474836480, "20Gi"), (10**10, "10G"), (1000, "1k"), (1023, "1023"), (1536 * MI, "1536Mi"),
    (0, "0"),
])
def test_format_bytes_examples(n: int, text: str) -> None:
    assert format_bytes(n) == text


# ------------------------------------------------------------------------------------------------
# annotations
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(EXAMPLE_POLICY.read_text())


def test_disk_sizes_in_every_kubernetes_form(policy: Policy) -> None:
    anns = {K.ANN_DISKS: "[{name: a, size: 1e10}, {name: b, size: +20Gi}, {name: c, size: .5Gi}, "
                         "{name: d, size: 1.Gi}, {name: e, size: 5E9}, {name: f, size: '2000000000000m'}]"}
    disks = parse_requests(anns, policy).disks
    assert [d.size_bytes for d in disks] == [10**10, 20 * GI, GI // 2, GI, 5 * 10**9, 2 * 10**9]
    assert [d.size_text for d in disks] == ["1e10", "+20Gi", ".5Gi", "1.Gi", "5E9", "2000000000000m"]


@pytest.mark.parametrize(("size", "reason"), [
    ("1e999999999", "too large"),
    ("-20Gi", "negative quantity"),
    ("'+0'", "zero quantity"),
    ("1500m", "not a whole number of bytes"),
    ("1e3Gi", "unknown suffix"),
    ("1.0e+10", "floating-point number"),  # YAML reads it as a float: quote it
    ("'1 Gi'", "whitespace"),
    ("3e12", "exceeds the platform limit 2Ti"),
    ("1e3", "at least 1Mi"),
])
def test_disk_size_refusals(policy: Policy, size: str, reason: str) -> None:
    with pytest.raises(Refused) as err:
        parse_requests({K.ANN_DISKS: f"[{{name: a, size: {size}}}]"}, policy)
    assert err.value.field == f"{K.ANN_DISKS}[0].size"
    assert reason in err.value.reason, str(err.value)


@pytest.mark.parametrize(("memory", "guest"), [
    ("+4Gi", 4 * GI), (".5Gi", GI // 2), ("1.5Gi", 1536 * MI), ("4294967296000m", 4 * GI),
    ("1.073741824e9", GI), ("8.Gi", 8 * GI),
])
def test_memory_in_every_kubernetes_form(policy: Policy, memory: str, guest: int) -> None:
    sizing = parse_requests({K.ANN_MEMORY: memory}, policy).sizing
    assert sizing is not None and sizing.memory == guest


def test_a_tiny_memory_hint_suggests_a_valid_quantity(policy: Policy) -> None:
    with pytest.raises(Refused) as err:
        parse_requests({K.ANN_MEMORY: "1e3"}, policy)
    assert "1e3 is 1000 bytes; did you mean 1000Gi?" in err.value.reason


# ------------------------------------------------------------------------------------------------
# through the real admission core
# ------------------------------------------------------------------------------------------------
KEYS = PlanKeys(current=b"quantity-test-key-0123456789abcdef")


def vm_review(annotations: dict[str, str], *, domain: dict[str, Any] | None = None) -> dict[str, Any]:
    review = dict(json.loads((ADMISSION / "vm-create.json").read_text()))
    obj = review["request"]["object"]
    obj["metadata"]["annotations"] = dict(annotations)
    if domain is not None:
        obj["spec"]["template"]["spec"]["domain"].update(copy.deepcopy(domain))
    return review


def admit_vm(review: dict[str, Any], policy: Policy) -> tuple[dict[str, Any], dict[str, Any]]:
    response = handle_review(review, route="mutate", policy=policy, plan_keys=KEYS,
                             cluster=EMPTY_CLUSTER)
    inner = response["response"]
    assert inner["allowed"], inner.get("status")
    ops = patch_of(response)
    obj = review["request"]["object"]
    return (jsonpatch.apply_patch(obj, ops) if ops else copy.deepcopy(obj)), inner


def strict_overcommit_policy() -> Policy:
    # the example policy with memory overcommit, so that the memory request is computed
    text = EXAMPLE_POLICY.read_text().replace("memoryOvercommitPercent: 100",
                                              "memoryOvercommitPercent: 150")
    assert "memoryOvercommitPercent: 150" in text
    return load_policy(text)


ANNOTATED = [
    ({K.ANN_DISKS: "[{name: data, size: 1e10}, {name: logs, size: +20Gi}, {name: tmp, size: .5Gi}]",
      K.ANN_MEMORY: "+4Gi", K.ANN_CPU: "2"},
     {"data": 10**10, "logs": 20 * GI, "tmp": GI // 2}, 4 * GI),
    ({K.ANN_DISKS: '[{"name": "data", "size": "1.Gi"}, {"name": "big", "size": "5E9"}, '
                   '{"name": "milli", "size": "2000000000000m"}]',
      K.ANN_MEMORY: ".5Gi", K.ANN_CPU: "{sockets: 1, cores: 2}"},
     {"data": GI, "big": 5 * 10**9, "milli": 2 * 10**9}, GI // 2),
    ({K.ANN_DISKS: "[{name: data, size: 1073741824e1}]", K.ANN_MEMORY: "1.5Gi"},
     {"data": 10 * GI}, 1536 * MI),
]


@pytest.mark.parametrize("overcommit", [False, True], ids=["no-overcommit", "overcommit"])
@pytest.mark.parametrize(("annotations", "sizes", "guest"), ANNOTATED,
                         ids=[a[0][K.ANN_DISKS][:40] for a in ANNOTATED])
def test_admitted_vm_carries_only_canonical_quantities(policy: Policy, annotations: dict[str, str],
                                                      sizes: dict[str, int], guest: int,
                                                      overcommit: bool) -> None:
    pol = strict_overcommit_policy() if overcommit else policy
    review = vm_review(annotations)
    vm, _ = admit_vm(review, pol)
    assert_valid_vm(vm)
    spec = vm["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for name, n in sizes.items():
        assert volumes[name]["hostDisk"]["capacity"] == format_bytes(n)
    memory = spec["domain"]["memory"]["guest"]
    resources = spec["domain"]["resources"]
    assert memory == format_bytes(guest)
    assert resources["limits"]["memory"] == format_bytes(guest)
    for value in (memory, resources["requests"]["memory"], resources["limits"]["memory"]):
        assert format_bytes(parse_bytes(value)) == value, "canonical"
    if overcommit:
        assert parse_bytes(resources["requests"]["memory"]) < guest
    # the user's own text never reaches the spec
    emitted = json.dumps(spec)
    for raw in ("1e10", "+20Gi", ".5Gi", "1.Gi", "5E9", "2000000000000m", "+4Gi", "1073741824e1"):
        assert f'"{raw}"' not in emitted, raw
    plan = verify_plan(vm["spec"]["template"]["metadata"]["annotations"][K.ANN_PLAN], KEYS,
                       namespace="vms", vm=vm["metadata"]["name"])
    assert {d.name: d.size_bytes for d in plan.disks} == sizes
    # reinvocation: the mutation of its own output is no patch
    again = copy.deepcopy(review)
    again["request"]["object"] = vm
    assert patch_of(handle_review(again, route="mutate", policy=pol, plan_keys=KEYS,
                                  cluster=EMPTY_CLUSTER)) == []
    # re-submission of the same manifest as an UPDATE gives the same object
    resubmit = vm_review(annotations)
    resubmit["request"].update(operation="UPDATE", oldObject=vm)
    again_vm, _ = admit_vm(resubmit, pol)
    assert again_vm == vm


@pytest.mark.parametrize("cpu", ["inf", "1e999999", "1e999999m", "NaN", "0.0015"])
def test_a_hostile_cpu_quantity_in_the_vm_is_replaced_quickly(policy: Policy, cpu: str) -> None:
    review = vm_review({K.ANN_CPU: "2", K.ANN_MEMORY: "4Gi"},
                       domain={"resources": {"requests": {"cpu": cpu}, "limits": {"cpu": cpu}}})
    start = time.perf_counter()
    vm, inner = admit_vm(review, policy)
    assert time.perf_counter() - start < 2.0
    resources = vm["spec"]["template"]["spec"]["domain"]["resources"]
    assert resources["limits"]["cpu"] == "2" and resources["requests"]["cpu"] == "1"
    assert any(f"{cpu} is replaced by" in w for w in inner.get("warnings", []))
    assert_valid_vm(vm)


def test_a_user_quantity_of_equal_value_in_the_vm_is_kept(policy: Policy) -> None:
    # the VM's own fields are the user's, valid for Kubernetes: an equal value is not rewritten
    review = vm_review({K.ANN_MEMORY: "4Gi", K.ANN_CPU: "2"},
                       domain={"memory": {"guest": "+4Gi"},
                               "resources": {"limits": {"cpu": "2e0", "memory": "4294967296"}}})
    vm, inner = admit_vm(review, policy)
    domain = vm["spec"]["template"]["spec"]["domain"]
    assert domain["memory"]["guest"] == "+4Gi"
    assert domain["resources"]["limits"] == {"cpu": "2e0", "memory": "4294967296"}
    assert not inner.get("warnings")
    assert_valid_vm(vm)



@pytest.mark.parametrize(("field", "value", "canonical"), [
    ("guest", " 4Gi", "4Gi"), ("guest", "4Gi\n", "4Gi"), ("cpu", 2.0, "2"), ("cpu", " 2", "2"),
])
def test_a_user_quantity_kubevirt_would_refuse_is_replaced_even_when_equal(
        policy: Policy, field: str, value: Any, canonical: str) -> None:
    # KubeVirt's CRD schema wants an integer or a string matching the quantity pattern
    domain = ({"memory": {"guest": value}} if field == "guest"
              else {"resources": {"limits": {"cpu": value}}})
    vm, inner = admit_vm(vm_review({K.ANN_MEMORY: "4Gi", K.ANN_CPU: "2"}, domain=domain), policy)
    d = vm["spec"]["template"]["spec"]["domain"]
    assert (d["memory"]["guest"] if field == "guest" else d["resources"]["limits"]["cpu"]) == canonical
    assert any("is replaced by" in w for w in inner.get("warnings", []))
