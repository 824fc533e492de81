"""The node agent's capacity pass (``nodeagent/capacity.py``) on a real node directory.

Real: the files (qcow2 images made by qemu-img, raw and broken files, links, prepare's temporary
names), the scan, the accounting, the summary file and what prepare reads back from it, the
metrics. Stood in for, because this file tests the pass and not the API server (the API server is
real in tests/test_capacity_scheduler.py): the watch caches (lists of VM and VMI dicts, as the
watches keep them) and the three calls the pass makes (``get`` of a VM, an Event, the Node's
status, which here answers with an error the pass must survive).
"""

from __future__ import annotations

import datetime
import io
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from diskplan import capacity as C
from diskplan import keys as K
from diskplan.homemarker import HomeMarker, marker_json
from diskplan.plan import PlanKeys, sign_plan
from diskplan.policy import load_policy
from hooksidecar.logfmt import JsonLog
from hooksidecar.prepare.capacity import read_summary
from hooksidecar.prepare.imagefiles import HeaderCache, scan_vm_dir
from nodeagent.capacity import CapacityMetrics, CapacityReporter, node_event_body, scan_root
from nodeagent.metrics import AgentMetrics
from nodeagent.nodestatus import advertised_of, advertised_patch
from nodeagent.reconcile import Paths
from tests.node_agent_support import PLAN_KEY, POLICY, ROOT_DIR, make_plan, vm_manifest

GiB = 1 << 30
MiB = 1 << 20
NODE = "node-a"
KEYS = PlanKeys(current=PLAN_KEY)


def qcow2(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    return path


class Items:
    def __init__(self, items: list[dict[str, Any]] | None = None) -> None:
        self.list = items or []

    def items(self) -> list[dict[str, Any]]:
        return list(self.list)


class NoApiServer:
    """``param_serialize`` of the Node calls: refused the way a client without a server fails."""

    def param_serialize(self, **kwargs: Any) -> Any:
        raise OSError("no API server in this test")


class Events:
    def __init__(self) -> None:
        self.created: list[tuple[str, dict[str, Any]]] = []

    def create_namespaced_event(self, namespace: str, body: dict[str, Any], **kwargs: Any) -> None:
        self.created.append((namespace, body))


class StubKube:
    def __init__(self, vms: set[tuple[str, str]]) -> None:
        self.vms = vms
        self.gets: list[tuple[str, str]] = []
        self.api_client = NoApiServer()
        self.events = Events()

    def get_vm(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.gets.append((namespace, name))
        return {"metadata": {"name": name}} if (namespace, name) in self.vms else None


def homed_vm(namespace: str, name: str, **sizes: int) -> dict[str, Any]:
    vm = vm_manifest(name, sign_plan(make_plan(namespace, name, **sizes), KEYS), home=NODE)
    vm["metadata"]["namespace"] = namespace
    return vm


def running_vmi(namespace: str, name: str, uid: str, node: str = NODE, **sizes: int) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "uid": uid,
                         "labels": {"kubevirt.io/nodeName": node},
                         "annotations": {K.ANN_PLAN: sign_plan(make_plan(namespace, name, **sizes), KEYS)}},
            "status": {"phase": "Running", "nodeName": node}}


def marker(root: Path, namespace: str, vm: str, uid: str, node: str = NODE) -> None:
    d = root / namespace / vm
    d.mkdir(parents=True, exist_ok=True)
    (d / K.HOME_MARKER).write_bytes(marker_json(HomeMarker(namespace, vm, uid, node,
                                                           datetime.datetime.now(datetime.UTC))))


@pytest.fixture
def host(tmp_path: Path) -> Path:
    return tmp_path / "host"


@pytest.fixture
def root(host: Path) -> Path:
    r = host / ROOT_DIR.lstrip("/")
    r.mkdir(parents=True)
    return r


def reporter(host: Path, kube: StubKube, *, vms: list[dict[str, Any]] | None = None,
             vmis: list[dict[str, Any]] | None = None, policy: str = POLICY) -> tuple[CapacityReporter,
                                                                                       AgentMetrics, io.StringIO]:
    metrics = AgentMetrics(NODE)
    out = io.StringIO()
    loaded = load_policy(policy)
    r = CapacityReporter(node=NODE, kube=kube, policy=lambda: loaded, plan_keys=lambda: KEYS,  # type: ignore[arg-type]
                         paths=Paths(str(host), "/var/lib/kubelet/pods"), vmis=Items(vmis), vms=Items(vms),
                         registry=metrics.registry, log=JsonLog(out))
    return r, metrics, out


def sample(metrics: AgentMetrics, name: str, **labels: str) -> float | None:
    """One sample of the agent's exposition, as a scraper reads it."""
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            if s.name == name and s.labels == {"node": NODE, **labels}:
                return float(s.value)
    return None


# ------------------------------------------------------------------------------------------------
def test_scan_counts_images_by_header_and_passes_links_and_strangers(root: Path) -> None:
    d = root / "vms" / "pg"
    qcow2(d / "data.qcow2", 10 * GiB)
    qcow2(d / "persist-root.root.qcow2", 3 * GiB)
    (d / "raw.qcow2").write_bytes(b"\0" * 4096)  # KubeVirt's raw file under our name: its length
    (d / "torn.qcow2").write_bytes(b"QFI\xfb" + b"\0" * 60)  # a qcow2 magic and nothing usable
    (d / ".data.qcow2.tmp-0123456789abcdef").write_bytes(b"x" * 8192)  # prepare's temporary file
    (d / "data.base.json").write_text("{}")
    os.symlink(d / "data.qcow2", d / "link.qcow2")
    (root / "vms" / "elsewhere").symlink_to(d)  # a linked VM directory
    (root / "NotANamespace" / "x").mkdir(parents=True)
    qcow2(root / ".diskhooks" / "catalog" / "x.qcow2", GiB)
    scans = scan_root(str(root))
    assert set(scans) == {("vms", "pg")}
    scan = scans[("vms", "pg")]
    assert {n: i.virtual_bytes for n, i in scan.images.items()} == {
        "data.qcow2": 10 * GiB, "persist-root.root.qcow2": 3 * GiB, "raw.qcow2": 4096, "torn.qcow2": 64}
    assert "torn.qcow2" in scan.unreadable and "counted by its length" in scan.unreadable["torn.qcow2"]
    assert scan.other_allocated >= 8192  # the temporary file and the record occupy space, images none
    cache = HeaderCache()
    first = scan_vm_dir(str(d), cache=cache)
    assert len(cache) == 3  # two qcow2 headers and the raw file; the torn one is read again each time
    assert scan_vm_dir(str(d), cache=cache) == first
    qcow2(d / "data.qcow2", 12 * GiB)  # made again: another identity, read again
    cache.next_pass()
    assert scan_vm_dir(str(d), cache=cache).images["data.qcow2"].virtual_bytes == 12 * GiB
    cache.next_pass()
    cache.next_pass()
    assert len(cache) == 0  # what no pass saw since is forgotten


def test_a_missing_root_holds_nothing(host: Path) -> None:
    assert scan_root(str(host / "nowhere")) == {}


def test_the_pass_counts_every_kind_of_directory(host: Path, root: Path) -> None:
    # stopped at home, its plan grown while stopped (data 10 -> 20 GiB, logs added)
    qcow2(root / "vms" / "home" / "data.qcow2", 10 * GiB)
    home = homed_vm("vms", "home", data=20 * GiB, logs=5 * GiB)
    # a first start running here: prepare's marker names its VMI, so its Pod's request is a hold
    qcow2(root / "vms" / "first" / "data.qcow2", 8 * GiB)
    marker(root, "vms", "first", "uid-first")
    first = running_vmi("vms", "first", "uid-first", data=8 * GiB)
    # a VMI someone made up for a directory of theirs: no marker names it, so no hold and no plan
    qcow2(root / "vms" / "madeup" / "data.qcow2", 1 * GiB)
    marker(root, "vms", "madeup", "uid-older-start")
    madeup = running_vmi("vms", "madeup", "uid-made-up", data=40 * GiB)
    # the VM exists but is not at home here; and one whose VM is gone (an orphan)
    qcow2(root / "vms" / "moved" / "data.qcow2", 2 * GiB)
    qcow2(root / "vms" / "gone" / "data.qcow2", 30 * GiB)
    kube = StubKube({("vms", "moved")})
    r, metrics, log = reporter(host, kube, vms=[home], vmis=[first, madeup])
    account = r.refresh()
    assert account is not None
    by = {d.vm: d for d in account.dirs}
    assert {v: (d.state, d.planned_bytes, d.hold_bytes) for v, d in by.items()} == {
        "first": (C.RUNNING, 8 * GiB, 8 * GiB), "gone": (C.ORPHAN, 30 * GiB, 0),
        "home": (C.STOPPED, 25 * GiB, 0), "madeup": (C.RUNNING, 1 * GiB, 0),
        "moved": (C.UNHOMED, 2 * GiB, 0)}
    assert sorted(kube.gets) == [("vms", "gone"), ("vms", "moved")]  # only what no watch explains
    assert account.held_gib == 8 and account.counted_bytes == 66 * GiB

    assert sample(metrics, "diskhooks_node_planned_bytes", state="orphan") == 30 * GiB
    assert sample(metrics, "diskhooks_node_planned_bytes", state="stopped") == 25 * GiB
    assert sample(metrics, "diskhooks_node_orphan_bytes", namespace="vms", vm="gone") == 30 * GiB
    assert sample(metrics, "diskhooks_node_orphan_directories") == 1
    assert sample(metrics, "diskhooks_node_held_gib") == 8
    assert sample(metrics, "diskhooks_node_counted_bytes") == 66 * GiB
    assert sample(metrics, "diskhooks_node_advertised_gib") == account.advertised_gib
    assert sample(metrics, "diskhooks_node_advertisements_total", outcome="failed") == 1
    assert "capacity.advertise-failed" in log.getvalue()  # no Node here: logged, the pass goes on

    # the orphan: one Warning Event on the Node, once
    assert [(ns, b["reason"], b["regarding"]["kind"]) for ns, b in kube.events.created] == \
        [("default", K.EVENT_ORPHANED_VM_DIRECTORY, "Node")]
    assert "holds 1 image file(s) of VM vms/gone, which no longer exists" in kube.events.created[0][1]["note"]
    r.refresh()
    assert len(kube.events.created) == 1
    assert len(kube.gets) == 2  # remembered, not asked again within the TTL

    # the summary prepare reads: the same counts, per directory key
    summary = read_summary(str(root / K.CAPACITY_SUBDIR / K.CAPACITY_SUMMARY))
    assert (summary.node, summary.counted_bytes) == (NODE, 66 * GiB)
    assert summary.others("vms", "home") == 41 * GiB

    # the orphan is removed by the platform: gone from the metrics
    subprocess.run(["rm", "-r", str(root / "vms" / "gone")], check=True)
    after = r.refresh()
    assert after is not None and not after.orphans
    assert 'vm="gone"' not in metrics.exposition().decode()


def test_the_copies_of_cold_migrations_take_their_room(host: Path, root: Path) -> None:
    """A VM arriving (the staging copy) and a VM that moved away (the kept copy) hold images under
    ``.diskhooks/migrate/``: each counts like a VM directory whose VM is homed elsewhere, under a
    key no VM directory has; nothing is looked up for them, no link is followed."""
    migrate = root / ".diskhooks" / "migrate"
    qcow2(migrate / "kept" / "vms" / "left.0123456789abcdef" / "data.qcow2", 3 * GiB)
    (migrate / "kept" / "vms" / "left.0123456789abcdef.json").write_text("{}")
    qcow2(migrate / "incoming" / "vms" / "coming" / "data.qcow2", 4 * GiB)
    (migrate / "incoming" / "vms" / "coming" / "logs.qcow2").write_bytes(b"QFI")  # its first bytes only
    (migrate / "incoming" / "vms" / "coming.json").write_text("{}")
    qcow2(host / "elsewhere" / "big.qcow2", 50 * GiB)
    (migrate / "kept" / "vms" / "linked.0123456789abcdef").symlink_to(host / "elsewhere")
    qcow2(root / "vms" / "home" / "data.qcow2", 10 * GiB)
    kube = StubKube(set())
    r, _, _ = reporter(host, kube, vms=[homed_vm("vms", "home", data=10 * GiB)])
    account = r.refresh()
    assert account is not None
    assert {d.vm: (d.state, d.planned_bytes) for d in account.dirs} == {
        ".incoming/coming": (C.UNHOMED, 4 * GiB + 3), ".kept/left.0123456789abcdef": (C.UNHOMED, 3 * GiB),
        "home": (C.STOPPED, 10 * GiB)}
    assert account.counted_bytes == 17 * GiB + 3 and kube.gets == []
    summary = read_summary(str(root / K.CAPACITY_SUBDIR / K.CAPACITY_SUMMARY))
    assert summary.others("vms", "home") == 7 * GiB + 3  # what prepare sees beside its own VM
    assert summary.others("vms", "coming") == 17 * GiB + 3  # the staging copy is not that VM's directory


def test_a_vm_deleted_while_watched_becomes_an_orphan_at_once(host: Path, root: Path) -> None:
    qcow2(root / "vms" / "pg" / "data.qcow2", GiB)
    kube = StubKube({("vms", "pg")})
    r, _, _ = reporter(host, kube)
    first = r.refresh()
    assert first is not None and first.dirs[0].state == C.UNHOMED
    kube.vms.clear()
    again = r.refresh()
    assert again is not None and again.dirs[0].state == C.UNHOMED  # still believed for the TTL
    r.vm_gone("vms", "pg")  # the VM watch saw it deleted
    gone = r.refresh()
    assert gone is not None and gone.dirs[0].state == C.ORPHAN


def test_a_vmi_on_another_node_or_finished_holds_nothing(host: Path, root: Path) -> None:
    qcow2(root / "vms" / "pg" / "data.qcow2", GiB)
    marker(root, "vms", "pg", "uid-1")
    for vmi in (running_vmi("vms", "pg", "uid-1", node="node-b", data=GiB),
                {**running_vmi("vms", "pg", "uid-1", data=GiB), "status": {"phase": "Succeeded"}}):
        r, _, _ = reporter(host, StubKube({("vms", "pg")}), vmis=[vmi])
        account = r.refresh()
        assert account is not None and account.held_gib == 0 and account.dirs[0].state == C.UNHOMED


def test_overcommit_and_the_filesystem(host: Path, root: Path) -> None:
    qcow2(root / "vms" / "pg" / "data.qcow2", 2 * GiB)
    policy = POLICY.replace("hostDisks:\n", "hostDisks:\n  capacity: {overcommit: 2, reserve: 0}\n")
    r, _, _ = reporter(host, StubKube({("vms", "pg")}), policy=policy)
    account = r.refresh()
    st = os.statvfs(root)
    assert account is not None
    assert account.filesystem_bytes == st.f_blocks * st.f_frsize
    assert account.budget_bytes == 2 * account.filesystem_bytes and account.reserve_bytes == 0
    assert account.advertised_gib == (2 * account.filesystem_bytes - 2 * GiB) // GiB


def test_an_unreadable_root_fails_the_pass_and_says_why(host: Path, root: Path) -> None:
    r, metrics, log = reporter(host, StubKube(set()),
                               policy=POLICY.replace(ROOT_DIR, ROOT_DIR + "/file"))
    (root / "file").write_text("not a directory")
    assert r.refresh() is None
    assert "capacity.failed" in log.getvalue()
    assert sample(metrics, "diskhooks_node_capacity_passes_total", outcome="failed") == 1
    (root / "file").unlink()
    (root / "file").mkdir()
    assert r.refresh() is not None
    assert "capacity.recovered" in log.getvalue()


def test_the_node_patch_and_event_bodies() -> None:
    assert advertised_patch(12) == {"status": {"capacity": {K.RESOURCE_STORAGE: "12"},
                                               "allocatable": {K.RESOURCE_STORAGE: "12"}}}
    assert advertised_of({"status": {"capacity": {K.RESOURCE_STORAGE: "3"}}}) == ("3", None)
    assert advertised_of({"status": None}) == (None, None)
    body = node_event_body("node-a", reason="R", message="é" * 2000, event_type="Warning",
                           now=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), suffix="abc")
    assert body["regarding"] == {"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "node-a"}
    assert body["metadata"] == {"name": "node-a.abc", "namespace": "default"}
    assert len(body["note"].encode()) <= 1024


def test_metrics_drop_orphans_that_are_gone() -> None:
    metrics = AgentMetrics(NODE)
    cm = CapacityMetrics(metrics.registry, NODE)
    orphan = C.DirAccount("vms", "gone", C.ORPHAN, GiB, MiB, 0, 1, 0)
    account = C.NodeAccount(10 * GiB, 10 * GiB, 10 * GiB, 0, (orphan,))
    cm.publish(account)
    assert 'vm="gone"' in metrics.exposition().decode()
    cm.publish(replace(account, dirs=()))
    assert 'vm="gone"' not in metrics.exposition().decode()
