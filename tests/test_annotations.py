"""User annotations -> typed requests (``diskplan/annotations.py``) and the bounded YAML loader
(``diskplan/yamlsafe.py``): what a VM owner may write, the defaults the policy fills in, and a
denial naming annotation, item and key for everything else — path tricks, huge values, YAML
alias bombs, tags, wrong types, unknown keys."""

from __future__ import annotations

import time
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.annotations import (
    CpuTopology,
    DiskRequest,
    PassthroughRequest,
    default_sizing,
    parse_requests,
    quantity_text,
    user_annotation_keys,
)
from diskplan.errors import Refused
from diskplan.policy import Policy, load_policy
from diskplan.yamlsafe import load_document
from tests.conftest import DATA, EXAMPLE_POLICY

GI = 1024**3
TI = 1024**4


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(EXAMPLE_POLICY.read_text())


@pytest.fixture(scope="module")
def strict() -> Policy:
    return load_policy((DATA / "policy-strict.yaml").read_text())


# ------------------------------------------------------------------------------------------------
# what may be written
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    ('[{"name": "data", "size": "20Gi"}, {"name": "scratch", "size": "100Gi", "bus": "scsi", '
     '"cache": "writeback", "backing": "almalinux-9"}]'),
    ("[{name: data, size: 20Gi}, {name: scratch, size: 100Gi, bus: scsi, cache: writeback, "
     "backing: almalinux-9}]"),
    ("- name: data\n  size: 20Gi\n- name: scratch\n  size: 100Gi\n  bus: scsi\n  cache: writeback\n"
     "  backing: almalinux-9\n"),
])
def test_disks_in_json_flow_or_block_yaml(policy: Policy, value: str) -> None:
    r = parse_requests({K.ANN_DISKS: value}, policy)
    assert r.disks == (
        DiskRequest(index=0, name="data", size_bytes=20 * GI, size_text="20Gi", bus="virtio",
                    cache="none", io="native", discard="unmap"),
        # io native needs cache none/directsync: with writeback the default becomes threads
        DiskRequest(index=1, name="scratch", size_bytes=100 * GI, size_text="100Gi", bus="scsi",
                    cache="writeback", io="threads", discard="unmap", backing="almalinux-9"),
    )
    assert r.wants_plan and r.names == ("data", "scratch") and r.sizing is None


def test_every_disk_option(policy: Policy) -> None:
    value = ("[{name: a, size: 1.5Ti, bus: sata, cache: directsync, io: io_uring, discard: ignore, "
             "serial: SN-1.a_b+c, bootOrder: 2, backing: fedora-41.1}]")
    (d,) = parse_requests({K.ANN_DISKS: value}, policy).disks
    assert (d.size_bytes, d.bus, d.cache, d.io, d.discard, d.serial, d.boot_order, d.backing) == \
        (3 * TI // 2, "sata", "directsync", "io_uring", "ignore", "SN-1.a_b+c", 2, "fedora-41.1")
    assert d.field == "diskhooks.io/disks[0]"


def test_policy_defaults_fill_in(strict: Policy) -> None:
    (d,) = parse_requests({K.ANN_DISKS: "[{name: a, size: 10G}]"}, strict).disks
    assert (d.bus, d.cache, d.io, d.discard, d.size_bytes) == ("scsi", "none", "native", "unmap", 10**10)


def test_persist_root_and_passthrough(policy: Policy) -> None:
    r = parse_requests({K.ANN_PERSIST_ROOT: "true",
                        K.ANN_PASSTHROUGH: "[{name: fast0, claim: node1-nvme0, mode: lun}, "
                                           "{name: fast1, claim: node1.nvme-1}]"}, policy)
    assert r.persist_root and r.wants_plan and r.disks == ()
    assert r.passthrough == (PassthroughRequest(0, "fast0", "node1-nvme0", "lun"),
                             PassthroughRequest(1, "fast1", "node1.nvme-1", "disk"))
    assert parse_requests({K.ANN_PERSIST_ROOT: "false"}, policy).wants_plan is False


def test_sizing_from_profile_cpu_and_memory(policy: Policy) -> None:
    s = parse_requests({K.ANN_PROFILE: "medium"}, policy).sizing
    assert s is not None and (s.cpu, s.memory) == (CpuTopology(1, 4, 1), 8 * GI)
    # explicit cpu/memory override the profile's
    s = parse_requests({K.ANN_PROFILE: "medium", K.ANN_CPU: "{sockets: 2, cores: 3, threads: 2}"},
                       policy).sizing
    assert s is not None and s.cpu is not None and s.cpu.vcpus == 12
    assert (s.cpu, s.memory) == (CpuTopology(2, 3, 2), 8 * GI)
    s = parse_requests({K.ANN_CPU: "6", K.ANN_MEMORY: "12Gi"}, policy).sizing
    assert s is not None and (s.cpu, s.memory) == (CpuTopology(1, 6, 1), 12 * GI)
    s = parse_requests({K.ANN_MEMORY: "3072Mi"}, policy).sizing
    assert s is not None and (s.cpu, s.memory) == (None, 3 * GI)
    assert parse_requests({K.ANN_CPU: "4"}, policy).wants_plan is False  # sizing needs no plan


def test_default_sizing(policy: Policy, strict: Policy) -> None:
    assert default_sizing(policy) is None
    s = default_sizing(strict)
    assert s is not None and (s.cpu, s.memory, s.from_annotations) == (CpuTopology(1, 2, 1), 4 * GI, False)


def test_user_annotation_keys_ignore_the_plan_and_others() -> None:
    anns = {K.ANN_DISKS: "[]", K.ANN_PLAN: "{}", "kubevirt.io/x": "y", "diskhooks.iox/a": "b"}
    assert user_annotation_keys(anns) == [K.ANN_DISKS]
    assert user_annotation_keys(None) == []


@pytest.mark.parametrize(("n", "text"), [
    (200 * GI, "200Gi"), (10**10, "10G"), (1536 * 1024**2, "1536Mi"), (3 * TI // 2, "1536Gi"),
    (1000, "1k"), (1023, "1023"), (2**63 - 1, str(2**63 - 1)),
])
def test_quantity_text_is_short_and_exact(n: int, text: str) -> None:
    assert quantity_text(n) == text


# ------------------------------------------------------------------------------------------------
# what is refused
# ------------------------------------------------------------------------------------------------
BOMB = ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n")
D = K.ANN_DISKS
P = K.ANN_PASSTHROUGH

# (annotations, field the error names, words the reason contains)
HOSTILE: list[tuple[dict[str, Any], str, str]] = [
    # path tricks in names
    ({D: '[{"name": "../../etc", "size": "1Gi"}]'}, f"{D}[0].name", "DNS label"),
    ({D: '[{"name": "/etc/passwd", "size": "1Gi"}]'}, f"{D}[0].name", "DNS label"),
    ({D: "[{name: a/b, size: 1Gi}]"}, f"{D}[0].name", "DNS label"),
    ({D: "[{name: Data, size: 1Gi}]"}, f"{D}[0].name", "DNS label"),
    ({D: "[{name: a.qcow2, size: 1Gi}]"}, f"{D}[0].name", "DNS label"),
    ({D: "[{name: " + "a" * 64 + ", size: 1Gi}]"}, f"{D}[0].name", "63"),
    ({D: "[{name: '', size: 1Gi}]"}, f"{D}[0].name", "DNS label"),
    ({D: "[{size: 1Gi}]"}, f"{D}[0].name", "required"),
    ({D: "[{name: 7, size: 1Gi}]"}, f"{D}[0].name", "string"),
    ({D: "[{name: a, size: 1Gi}, {name: a, size: 2Gi}]"}, f"{D}[1].name", "disks[0]"),
    # path tricks in backing images
    ({D: "[{name: a, size: 1Gi, backing: ../../etc/shadow}]"}, f"{D}[0].backing", "base image name"),
    ({D: "[{name: a, size: 1Gi, backing: /var/lib/images/x}]"}, f"{D}[0].backing", "base image name"),
    ({D: "[{name: a, size: 1Gi, backing: a/b}]"}, f"{D}[0].backing", "base image name"),
    ({D: "[{name: a, size: 1Gi, backing: a..b}]"}, f"{D}[0].backing", "base image name"),
    ({D: "[{name: a, size: 1Gi, backing: [x]}]"}, f"{D}[0].backing", "name of a base image"),
    # sizes
    ({D: '[{"name": "a", "size": "1Gi"}, {"name": "pgdata", "size": "9Ti"}]'}, f"{D}[1].size",
     "9Ti exceeds the platform limit 2Ti"),
    ({D: "[{name: a, size: -1Gi}]"}, f"{D}[0].size", "quantity"),
    ({D: "[{name: a, size: 0}]"}, f"{D}[0].size", "greater than zero"),
    ({D: "[{name: a, size: lots}]"}, f"{D}[0].size", "quantity"),
    ({D: "[{name: a, size: 20}]"}, f"{D}[0].size", "at least 1Mi"),
    ({D: "[{name: a, size: 500M}]"}, f"{D}[0].size", "512-byte sectors"),
    ({D: "[{name: a, size: 1e3Gi}]"}, f"{D}[0].size", "quantity"),
    ({D: "[{name: a, size: [1Gi]}]"}, f"{D}[0].size", "quantity"),
    ({D: "[{name: a}]"}, f"{D}[0].size", "required"),
    # the per-VM total (maxTotalPerVM) counts detached disks: checked by the mutation
    # (tests/test_vm_mutation.py)
    # wrong types and unknown keys
    ({D: "[{name: a, size: 1Gi, path: /etc/shadow}]"}, f"{D}[0].path", "unknown key"),
    ({D: "[{name: a, size: 1Gi, format: raw}]"}, f"{D}[0].format", "unknown key"),
    ({D: "[{name: a, size: 1Gi, bus: ide}]"}, f"{D}[0].bus", "virtio, scsi, sata"),
    ({D: "[{name: a, size: 1Gi, cache: 5}]"}, f"{D}[0].cache", "none"),
    ({D: "[{name: a, size: 1Gi, io: posix}]"}, f"{D}[0].io", "native"),
    ({D: "[{name: a, size: 1Gi, cache: writeback, io: native}]"}, f"{D}[0].io", "use io: threads"),
    ({D: "[{name: a, size: 1Gi, discard: yes}]"}, f"{D}[0].discard", "unmap"),
    ({D: "[{name: a, size: 1Gi, serial: 12345}]"}, f"{D}[0].serial", "quote it"),
    ({D: "[{name: a, size: 1Gi, serial: 'a b'}]"}, f"{D}[0].serial", "A-Z"),
    ({D: "[{name: a, size: 1Gi, serial: " + "S" * 37 + "}]"}, f"{D}[0].serial", "36"),
    ({D: "[{name: a, size: 1Gi, bootOrder: 0}]"}, f"{D}[0].bootOrder", "integer"),
    ({D: "[{name: a, size: 1Gi, bootOrder: '1'}]"}, f"{D}[0].bootOrder", "integer"),
    ({D: "[{name: a, size: 1Gi, bootOrder: true}]"}, f"{D}[0].bootOrder", "integer"),
    ({D: '{"name": "a", "size": "1Gi"}'}, D, "must be a list"),
    ({D: "5"}, D, "must be a list"),
    ({D: '["a"]'}, f"{D}[0]", "mapping"),
    ({D: "[" + ", ".join(f"{{name: d{i}, size: 1Gi}}" for i in range(33)) + "]"}, D, "at most 32"),
    # hostile YAML and sizes
    ({D: "{{{{ not yaml"}, D, ""),
    ({D: "[{name: a, size: 1Gi"}, D, "not valid YAML"),
    ({D: BOMB}, D, "anchors"),
    ({D: "- &x {name: a, size: 1Gi}\n- *x\n"}, D, "anchors"),
    ({D: "!!python/object/apply:os.system ['id']"}, D, "tags"),
    ({D: "[{name: !!str a, size: 1Gi}]"}, D, "tags"),
    # YAML 1.2 core schema: a timestamp is text, which the quantity parser refuses
    ({D: "[{name: a, size: 2024-01-01}]"}, f"{D}[0].size", "'2024-01-01' is not a quantity"),
    ({D: "[{name: a, size: 1Gi, <<: {bus: ide}}]"}, D, "merge"),
    ({D: "[" * 50 + "]" * 50}, D, "nested"),
    ({D: "[{name: a, size: 1Gi}]\n---\n[]"}, D, "one YAML document"),
    ({D: "[{name: a, size: 1Gi, name: b}]"}, D, "twice"),
    ({D: "[" + "{name: a, size: 1Gi}, " * 60000 + "]"}, D, "limit is 16384 bytes"),
    ({D: "x" * (1024 * 1024)}, D, "limit is 16384 bytes"),
    ({D: True}, D, "must be a string"),
    # persist-root
    ({K.ANN_PERSIST_ROOT: "yes"}, K.ANN_PERSIST_ROOT, '"true" or "false"'),
    ({K.ANN_PERSIST_ROOT: True}, K.ANN_PERSIST_ROOT, '"true" or "false"'),
    # passthrough
    ({P: "[{name: fast0, claim: ../../dev/sda}]"}, f"{P}[0].claim", "PersistentVolumeClaim name"),
    ({P: "[{name: fast0, claim: /dev/sda}]"}, f"{P}[0].claim", "PersistentVolumeClaim name"),
    ({P: "[{name: fast0}]"}, f"{P}[0].claim", "required"),
    ({P: "[{name: fast0, claim: c, mode: raw}]"}, f"{P}[0].mode", "disk, lun"),
    ({P: "[{name: fast0, claim: c, device: /dev/sda}]"}, f"{P}[0].device", "unknown key"),
    ({P: "[{name: f0, claim: c}, {name: f0, claim: d}]"}, f"{P}[1].name", "passthrough[0]"),
    ({P: "[{name: f0, claim: c}, {name: f1, claim: c}]"}, f"{P}[1].claim", "already used"),
    ({D: "[{name: x, size: 1Gi}]", P: "[{name: x, claim: c}]"}, f"{P}[0].name", "disks[0]"),
    # cpu, memory, profile
    ({K.ANN_CPU: "0"}, K.ANN_CPU, "between 1 and the platform limit 64"),
    ({K.ANN_CPU: "65"}, K.ANN_CPU, "platform limit 64"),
    ({K.ANN_CPU: "four"}, K.ANN_CPU, "number of vCPUs"),
    ({K.ANN_CPU: "true"}, K.ANN_CPU, "number of vCPUs"),
    ({K.ANN_CPU: "{sockets: 3}"}, f"{K.ANN_CPU}.sockets", "platform limit 2"),
    ({K.ANN_CPU: "{sockets: 2, cores: 32, threads: 2}"}, K.ANN_CPU, "128 vCPUs exceeds"),
    ({K.ANN_CPU: "{cores: 0}"}, f"{K.ANN_CPU}.cores", "integer"),
    ({K.ANN_CPU: "{cores: 2, gpus: 1}"}, f"{K.ANN_CPU}.gpus", "unknown key"),
    ({K.ANN_MEMORY: "300Gi"}, K.ANN_MEMORY, "exceeds the platform limit 256Gi"),
    ({K.ANN_MEMORY: "8"}, K.ANN_MEMORY, "8Gi"),
    ({K.ANN_MEMORY: "1.5G"}, K.ANN_MEMORY, "whole number of Mi"),
    ({K.ANN_MEMORY: "lots"}, K.ANN_MEMORY, "quantity"),
    ({K.ANN_MEMORY: "[8Gi]"}, K.ANN_MEMORY, "quantity"),
    ({K.ANN_PROFILE: "gigantic"}, K.ANN_PROFILE, "small"),
    ({K.ANN_PROFILE: "5"}, K.ANN_PROFILE, "not a profile"),
    # an unknown diskhooks annotation is a typo, not ignored
    ({"diskhooks.io/disk": "[{name: a, size: 1Gi}]"}, "diskhooks.io/disk", "unknown diskhooks annotation"),
]


@pytest.mark.parametrize(("annotations", "field", "reason"), HOSTILE,
                         ids=[f"{h[1]}:{h[2][:30]}" for h in HOSTILE])
def test_hostile_annotations_are_refused_naming_the_field(policy: Policy, annotations: dict[str, Any],
                                                          field: str, reason: str) -> None:
    with pytest.raises(Refused) as err:
        parse_requests(annotations, policy)
    assert err.value.field == field, str(err.value)
    assert reason in err.value.reason, str(err.value)
    assert len(str(err.value)) < 400, "messages stay readable, whatever the input"


def test_the_error_message_format(policy: Policy) -> None:
    with pytest.raises(Refused) as err:
        parse_requests({K.ANN_DISKS: '[{"name": "a", "size": "1Gi"}, {"name": "b", "size": "9Ti"}]'},
                       policy)
    assert str(err.value) == "diskhooks.io/disks[1].size: 9Ti exceeds the platform limit 2Ti"


def test_kept_sizes_admit_a_disk_above_the_limit_up_to_what_it_holds(strict: Policy) -> None:
    """``kept_sizes`` (the mutation passes the old object's verified plan): a disk of that name up
    to that size passes above maxDiskSize (500Gi here); larger, or another name, is refused as
    without it, the message saying what the disk may keep."""
    kept = {"a": 600 * GI}
    (d,) = parse_requests({D: "[{name: a, size: 600Gi}]"}, strict, kept_sizes=kept).disks
    assert d.size_bytes == 600 * GI
    with pytest.raises(Refused) as err:
        parse_requests({D: "[{name: a, size: 601Gi}]"}, strict, kept_sizes=kept)
    assert str(err.value) == (f"{D}[0].size: 601Gi exceeds the platform limit 500Gi; the disk may keep "
                              "its current 600Gi, but not grow until the limit is raised")
    for given, kept_ in (({D: "[{name: b, size: 600Gi}]"}, kept), ({D: "[{name: a, size: 600Gi}]"}, {}),
                               ({D: "[{name: a, size: 600Gi}]"}, {"a": 400 * GI})):
        with pytest.raises(Refused) as err:
            parse_requests(given, strict, kept_sizes=kept_)
        assert str(err.value) == f"{D}[0].size: 600Gi exceeds the platform limit 500Gi"


@pytest.mark.parametrize(("annotations", "field", "reason"), [
    ({P: "[{name: f0, claim: c, mode: lun}]"}, f"{P}[0].mode", "not allowed"),
    ({D: "[{name: a, size: 501Gi}]"}, f"{D}[0].size", "platform limit 500Gi"),
    ({K.ANN_CPU: "{sockets: 2, cores: 2}"}, f"{K.ANN_CPU}.sockets", "platform limit 1"),
])
def test_limits_follow_the_policy(strict: Policy, annotations: dict[str, Any], field: str,
                                  reason: str) -> None:
    with pytest.raises(Refused) as err:
        parse_requests(annotations, strict)
    assert (err.value.field, reason in err.value.reason) == (field, True), str(err.value)


def test_without_an_image_library_backing_is_refused() -> None:
    p = load_policy((DATA / "policy-minimal.yaml").read_text())
    with pytest.raises(Refused) as err:
        parse_requests({D: "[{name: a, size: 1Gi, backing: alma}]"}, p)
    assert err.value.field == f"{D}[0].backing" and "image library" in err.value.reason
    with pytest.raises(Refused) as err:
        parse_requests({P: "[{name: f0, claim: c}]"}, p)
    assert err.value.field == P and "not enabled" in err.value.reason


def test_an_alias_bomb_is_refused_at_once() -> None:
    """The classic "billion laughs" (here 9^5 expansions) is refused before anything expands."""
    start = time.perf_counter()
    with pytest.raises(Refused):
        load_document(BOMB, field="x")
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(("text", "value"), [
    ("", None), ("medium", "medium"), ("4", 4), ("0x10", 16), ("8Gi", "8Gi"), ("true", True),
    ("'true'", "true"), ("1.5", 1.5), ('"8Gi"', "8Gi"), ("{a: [1, b]}", {"a": [1, "b"]}),
    ('{"a": [1, "b"]}', {"a": [1, "b"]}), ("[NaN]", ["NaN"]),
])
def test_load_document_values(text: str, value: Any) -> None:
    assert load_document(text, field="x") == value
