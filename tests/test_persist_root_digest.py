"""A persistent root on a containerDisk named by digest: recorded by the digest, never hashed.

The runtime pulls an image by digest and checks what it pulls against it, so the content behind
``...@sha256:<hex>`` cannot change: prepare records the digest instead of hashing the disk file
(docs/BASE-CATALOG.md). Real prepare processes and ``qemu-img`` (the layout of
``tests/test_prepare.py``). That nothing is read is shown two ways: a 64 GiB (sparse) containerDisk
prepared under a 3 s CPU-time limit, which the same start by tag exceeds; and a later start that
does not notice a disk file changed behind the same digest (which no runtime would do).
"""

from __future__ import annotations

import json
import resource
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from diskplan import baserecord
from diskplan import keys as K
from diskplan.errors import Refused
from hooksidecar.images import check_images
from tests.test_prepare import (
    HOST_DIR,
    PERSIST,
    ROOT_IMAGE,
    VMI_UID,
    MiB,
    Node,
    make_plan,
    persist_layout,
    qinfo,
    run_prepare,
    sha256_of,
    snapshot,
    summaries,
)

DIGEST_A, DIGEST_B = "sha256:" + "a1" * 32, "sha256:" + "b2" * 32
BY_A = replace(PERSIST, image=f"quay.io/containerdisks/fedora@{DIGEST_A}")
BY_B = replace(PERSIST, image=f"quay.io/containerdisks/fedora@{DIGEST_B}")


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path / "node")


def marker(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(node.path(PERSIST.marker_path).read_text())
    return out


def cpu_limit(seconds: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, resource.RLIM_INFINITY))


def test_first_start_by_digest_records_the_digest_and_the_sidecar_accepts_it(node: Node) -> None:
    persist_layout(node, qcow2_size=24 * MiB)
    line = summaries(run_prepare(node, make_plan(persist=BY_A)))["rootdisk"]
    assert (line["result"], line["baseImageDigest"], "baseSha256" in line) == ("created", DIGEST_A, False)
    assert marker(node) == {"image": BY_A.image, "imageDigest": DIGEST_A, "format": "qcow2",
                            "virtualSize": 24 * MiB, "vmiUID": VMI_UID,
                            "overlay": "persist-root.rootdisk.qcow2"}
    assert qinfo(node.path(PERSIST.launcher_path))["virtual-size"] == 24 * MiB
    check_images(make_plan(persist=BY_A), vmi_uid=VMI_UID, path_prefix=str(node.root))


def test_a_64_gib_container_disk_by_digest_is_not_read(node: Node) -> None:
    disk = persist_layout(node)
    with disk.open("r+b") as fh:  # sparse: reading it all costs some 40 s of CPU
        fh.truncate(64 << 30)
    by_tag = run_prepare(node, make_plan(persist=PERSIST), preexec=lambda: cpu_limit(3))
    assert by_tag.returncode < 0 and not node.path(PERSIST.launcher_path).exists()  # SIGXCPU

    line = summaries(run_prepare(node, make_plan(persist=BY_A), preexec=lambda: cpu_limit(3)))["rootdisk"]
    assert (line["result"], line["virtualSize"]) == ("created", 64 << 30)
    again = summaries(run_prepare(node, make_plan(persist=BY_A), uid="later-start",
                                  preexec=lambda: cpu_limit(3)))["rootdisk"]
    assert again["result"] == "unchanged" and marker(node)["vmiUID"] == "later-start"


def test_later_start_by_the_same_digest_trusts_it(node: Node) -> None:
    """What the digest stands for: a disk file changed behind the same digest (here by the test;
    no runtime serves other content for a digest) goes unnoticed, since nothing is read."""
    persist_layout(node, content=b"\x00" * MiB)
    summaries(run_prepare(node, make_plan(persist=BY_A)))
    node.container_disk(0, b"\x01" * MiB)
    line = summaries(run_prepare(node, make_plan(persist=BY_A), uid="later-start"))["rootdisk"]
    assert line["result"] == "unchanged" and "sha256" not in marker(node)


@pytest.mark.parametrize("later", [BY_B, PERSIST], ids=["another digest", "a tag"])
def test_a_digest_only_record_is_refused_for_any_other_image(node: Node, later: Any) -> None:
    persist_layout(node, qcow2_size=24 * MiB)
    summaries(run_prepare(node, make_plan(persist=BY_A)))
    before = snapshot(node.root)
    proc = run_prepare(node, make_plan(persist=later), uid="later-start")
    assert proc.returncode == 1
    assert (f"the overlay {HOST_DIR}/persist-root.rootdisk.qcow2 was made on {BY_A.image!r}, recorded "
            f"by its digest {DIGEST_A}, and the VM now uses {later.image!r}") in proc.stderr
    assert f"pin the VM's containerDisk back to {BY_A.image!r}" in proc.stderr
    assert f"delete {HOST_DIR}/persist-root.rootdisk.qcow2 on the node" in proc.stderr
    assert snapshot(node.root) == before


def test_from_a_tag_to_a_digest_the_hash_is_compared_once_then_the_digest_stands(node: Node) -> None:
    disk = persist_layout(node, content=b"\x00" * MiB + b"root")
    summaries(run_prepare(node, make_plan(persist=PERSIST)))
    sha = sha256_of(disk)
    assert marker(node)["sha256"] == sha and "imageDigest" not in marker(node)

    pinned = summaries(run_prepare(node, make_plan(persist=BY_A), uid="s2"))["rootdisk"]
    assert pinned["result"] == "unchanged"
    assert (marker(node)["sha256"], marker(node)["imageDigest"]) == (sha, DIGEST_A)

    node.container_disk(0, b"\x00" * MiB + b"ROOT")  # not read any more while the digest is the same
    assert summaries(run_prepare(node, make_plan(persist=BY_A), uid="s3"))["rootdisk"]["result"] == "unchanged"
    # another digest: the recorded hash is what it is compared with, and this file differs
    proc = run_prepare(node, make_plan(persist=BY_B), uid="s4")
    assert proc.returncode == 1 and f"(sha256 {sha} -> {sha256_of(disk)})" in proc.stderr


def test_same_disk_file_under_another_digest_is_accepted_when_a_hash_was_recorded(node: Node) -> None:
    disk = persist_layout(node, content=b"\x00" * MiB + b"root")
    summaries(run_prepare(node, make_plan(persist=PERSIST)))
    summaries(run_prepare(node, make_plan(persist=BY_A), uid="s2"))
    line = summaries(run_prepare(node, make_plan(persist=BY_B), uid="s3"))["rootdisk"]
    assert line["result"] == "unchanged"
    assert (marker(node)["sha256"], marker(node)["imageDigest"], marker(node)["image"]) == \
        (sha256_of(disk), DIGEST_B, BY_B.image)


# ------------------------------------------------------------------------------------------------
# the Pod mutation and the pure rules
# ------------------------------------------------------------------------------------------------
def _pod_for(image: str, reference: str) -> tuple[Any, Any]:
    from diskplan.policy import load_policy
    from tests.conftest import EXAMPLE_POLICY
    from tests.test_pod_mutation import managed_pod, sample_plan

    policy = load_policy(EXAMPLE_POLICY.read_text())
    plan = sample_plan(policy, persist=True)
    assert plan.persist_root is not None
    plan = replace(plan, persist_root=replace(plan.persist_root, image=image))
    pod = managed_pod(plan)
    for v in pod["spec"]["volumes"]:
        if v["name"] == "rootdisk":
            v["image"]["reference"] = reference
    return pod, policy


@pytest.mark.parametrize("plan_ref, pod_ref, ok", [
    (BY_A.image, BY_A.image, True),
    (BY_A.image, f"mirror.example.com/fedora@{DIGEST_A}", True),  # the digest is the content
    (BY_A.image, BY_B.image, False),
    (BY_A.image, "quay.io/containerdisks/fedora:41", False),
    (ROOT_IMAGE, "quay.io/containerdisks/fedora:42", True),  # a tag is hashed: nothing to check
])
def test_pod_volume_must_be_the_digest_the_plan_names(plan_ref: str, pod_ref: str, ok: bool) -> None:
    from tests.test_pod_mutation import mutate

    pod, policy = _pod_for(plan_ref, pod_ref)
    if ok:
        mutate(pod, policy)
        return
    with pytest.raises(Refused) as err:
        mutate(pod, policy)
    assert err.value.field == "spec.volumes[rootdisk].image.reference"
    assert f"is not the plan's containerDisk {plan_ref!r} (digest {DIGEST_A})" in str(err.value)


@pytest.mark.parametrize("ref, digest", [
    (BY_A.image, DIGEST_A),
    (f"registry:5000/a/b:tag@{DIGEST_B}", DIGEST_B),
    (ROOT_IMAGE, None),
    ("quay.io/x@sha256:" + "A1" * 32, None),  # not a canonical digest
    ("quay.io/x@sha512:" + "a1" * 64, None),
])
def test_image_digest(ref: str, digest: str | None) -> None:
    assert baserecord.image_digest(ref) == digest


REC_TAG = {"sha256": "c" * 64}
REC_A = {"imageDigest": DIGEST_A}
REC_BOTH = {"sha256": "c" * 64, "imageDigest": DIGEST_A}


@pytest.mark.parametrize("image, record, needed", [
    (ROOT_IMAGE, None, True), (ROOT_IMAGE, REC_TAG, True), (ROOT_IMAGE, REC_A, False),
    (BY_A.image, None, False), (BY_A.image, REC_A, False), (BY_A.image, REC_BOTH, False),
    (BY_A.image, REC_TAG, True), (BY_B.image, REC_BOTH, True), (BY_B.image, REC_A, False),
])
def test_when_the_container_disk_is_hashed(image: str, record: dict[str, str] | None, needed: bool) -> None:
    assert baserecord.persist_needs_hash(image, record) is needed


@pytest.mark.parametrize("change, problem", [
    ({}, False), ({"sha256": None}, False), ({"imageDigest": None}, False),
    ({"sha256": None, "imageDigest": None}, True), ({"imageDigest": "sha256:xyz"}, True),
    ({"imageDigest": "a1" * 32}, True), ({"sha256": "C" * 64}, True),
])
def test_persist_record_holds_a_hash_a_digest_or_both(change: dict[str, Any], problem: bool) -> None:
    doc = {"image": BY_A.image, "sha256": "c" * 64, "imageDigest": DIGEST_A, "format": "qcow2",
           "virtualSize": 1, "vmiUID": VMI_UID, "overlay": K.persist_root_file_name("rootdisk")}
    doc.update(change)
    doc = {k: v for k, v in doc.items() if v is not None}
    assert (baserecord.persist_record_problem(doc) is not None) is problem
