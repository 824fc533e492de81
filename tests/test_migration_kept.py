"""The source's kept copy after a migration (policy ``nodeAgent.migration.keepSource``): deleted once
the VM has run on its new node (``untilStarted``), kept with ``forever``, gone at once with
``--delete-source``.

End to end with the real kube-apiserver, the webhook, rsync and two real agents (see
tests/migration_support.py). There is no KubeVirt controller here: "the VM runs on the target" is a
VMI object this test writes as virt-controller and virt-handler would (scheduled on the target by
its ``kubevirt.io/nodeName`` label, controlled by the VM, phase Running). The rule's pure part is
tested on its own first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.migration import MigrationStatus, status_json
from nodeagent.migrate.keptcopy import kept_copies, start_shown
from tests.migration_support import (
    GROUP,
    POLICY,
    VERSION,
    Agents,
    NodeFiles,
    Setup,
    file_hashes,
    make_base,
    make_vm_dir,
    run_command,
    wait_for,
)

NODE = "node-b"
HANDOVER = "2026-03-01T10:00:00Z"


def moved_vm(**status: Any) -> dict[str, Any]:
    s = MigrationStatus(id="0123456789abcdef", phase="Succeeded", source="node-a", target=NODE,
                        updated_at=HANDOVER, **status)
    return {"metadata": {"name": "pg", "namespace": "ns", "uid": "vm-uid", "annotations": {
        K.ANN_NODE: NODE, "diskhooks.io/migration-status": status_json(s)}}}


def running_vmi(**changes: Any) -> dict[str, Any]:
    vmi: dict[str, Any] = {
        "metadata": {"name": "pg", "namespace": "ns", "uid": "vmi-uid", "creationTimestamp": "2026-03-01T10:05:00Z",
                     "labels": {"kubevirt.io/nodeName": NODE},
                     "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "pg",
                                          "uid": "vm-uid", "controller": True}]},
        "status": {"phase": "Running"}}
    for path, value in changes.items():
        where = vmi
        *parents, leaf = path.split(".")
        for p in parents:
            where = where[p]
        where[leaf] = value
    return vmi


def test_a_start_counts_only_when_the_vmi_runs_there_for_that_vm_after_the_move() -> None:
    assert start_shown(moved_vm(), running_vmi(), NODE) is not None
    assert start_shown(moved_vm(), running_vmi(), "node-c") is None  # another node's agent
    assert start_shown(moved_vm(target_started=HANDOVER), running_vmi(), NODE) is None  # recorded already
    assert start_shown(moved_vm(), None, NODE) is None
    for path, value in [("status.phase", "Scheduled"), ("metadata.labels", {"kubevirt.io/nodeName": "node-a"}),
                        ("metadata.ownerReferences", []),
                        ("metadata.creationTimestamp", "2026-03-01T09:00:00Z")]:  # older than the handover
        assert start_shown(moved_vm(), running_vmi(**{path: value}), NODE) is None, path
    other = running_vmi()
    other["metadata"]["ownerReferences"][0]["uid"] = "another-vm-uid"  # a VM of that name, deleted since
    assert start_shown(moved_vm(), other, NODE) is None
    failed = moved_vm()
    failed["metadata"]["annotations"]["diskhooks.io/migration-status"] = status_json(MigrationStatus(
        id="0123456789abcdef", phase="Failed", source="node-a", target=NODE, updated_at=HANDOVER))
    assert start_shown(failed, running_vmi(), NODE) is None


def test_only_kept_copies_whose_names_parse_are_considered(tmp_path: Path) -> None:
    kept = tmp_path / ".diskhooks" / "migrate" / "kept"
    for rel in ("ns/pg.0123456789abcdef/", "ns/pg.0123456789abcdef.json", "ns/db.v2.00112233/",
                "ns/pg.NOTHEX/", "ns/pg/", "Bad_NS/pg.0123456789abcdef/", "ns/.pg.0123456789abcdef.json.tmp-1"):
        path = kept / rel
        if rel.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
    assert kept_copies(str(tmp_path)) == [("ns", "db.v2", "00112233"), ("ns", "pg", "0123456789abcdef")]


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------
def run_vmi_on(s: Setup, name: str, node: str) -> None:
    """What KubeVirt does when the VM starts on ``node`` (no KubeVirt controller runs here): a VMI
    controlled by the VM, scheduled on the node, Running."""
    vm = s.vm(name)
    s.custom().create_namespaced_custom_object(GROUP, VERSION, s.namespace, "virtualmachineinstances", {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "labels": {"kubevirt.io/nodeName": node},
                     "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": name,
                                          "uid": vm["metadata"]["uid"], "controller": True}]},
        "spec": {"domain": {"devices": {}}},
        "status": {"phase": "Running", "nodeName": node}})


@pytest.mark.parametrize("mode", ["untilStarted", "forever", "delete-source"])
def test_the_kept_copy_goes_once_the_vm_ran_on_its_new_node_as_the_policy_says(
        migration_setup: Setup, agents: Agents, tmp_path: Path, mode: str) -> None:
    s = migration_setup
    if mode == "forever":
        s.policy.write_text(POLICY + "  migration:\n    keepSource: forever\n")
    a, b = sorted(s.nodes)
    fa, fb = NodeFiles(tmp_path / "node-a"), NodeFiles(tmp_path / "node-b")
    make_base(fa.library)
    make_base(fb.library)
    s.create_vm("pg10")
    make_vm_dir(fa, s.namespace, "pg10", node_name=a, data_mib=16)
    before = file_hashes(fa.vm_dir(s.namespace, "pg10"))
    # what must never be touched: the kept copy of another (older) migration of this VM, and a
    # directory of another name in the same place
    decoy = fa.kept(s.namespace) / "pg10.00000000aaaaaaaa"
    decoy.mkdir(parents=True)
    (decoy / "data.qcow2").write_bytes(b"older copy")
    stranger = fa.kept(s.namespace) / "not-a-copy"
    stranger.mkdir()
    fast = ("--migration-housekeeping", "5s")
    agent_a = agents.start(a, fa, extra=fast)
    agent_b = agents.start(b, fb, extra=fast)
    wait_for("the home", lambda: s.annotations("pg10").get(K.ANN_NODE) == a, 60, agent_a)
    asked = ("--delete-source",) if mode == "delete-source" else ()
    done = run_command(s, "migrate", f"{s.namespace}/pg10", "--to", b, "--no-progress", *asked)
    assert done.returncode == 0, done.stderr + agent_a.stderr_text()[-4000:] + agent_b.stderr_text()[-4000:]
    status = s.status("pg10")
    assert status is not None and status["phase"] == "Succeeded" and "targetStarted" not in status
    kept = fa.kept(s.namespace) / f"pg10.{status['id']}"
    if mode == "delete-source":
        assert not kept.exists() and "sourceKept" not in status
    else:
        assert file_hashes(kept) == before and (kept.parent / f"{kept.name}.json").is_file()
    target = fb.vm_dir(s.namespace, "pg10")
    arrived = file_hashes(target)
    rounds = len(agent_a.records("migrate.housekeeping"))
    wait_for("a housekeeping round on node a after the move",
             lambda: len(agent_a.records("migrate.housekeeping")) > rounds + 1, 60, agent_a)
    assert mode == "delete-source" or kept.is_dir()  # moved but never started: kept whatever the policy

    run_vmi_on(s, "pg10", b)
    started = wait_for("node b records the start", lambda: (s.status("pg10") or {}).get("targetStarted"), 60,
                       agent_b)
    assert agent_b.records("migrate.target-started")[-1]["id"] == status["id"]
    if mode == "untilStarted":
        wait_for("the kept copy deleted", lambda: not kept.exists(), 60, agent_a)
        assert not (kept.parent / f"{kept.name}.json").exists()
        removed = agent_a.records("migrate.kept-removed")[-1]
        assert removed["id"] == status["id"] and removed["started"] == started and removed["bytes"] > 0
        wait_for("the Event", lambda: "MigrationSourceRemoved" in s.events("pg10"), 30, agent_a)
    else:
        rounds = len(agent_a.records("migrate.housekeeping"))
        wait_for("two housekeeping rounds on node a after the start",
                 lambda: len(agent_a.records("migrate.housekeeping")) > rounds + 1, 60, agent_a)
        assert mode == "delete-source" or file_hashes(kept) == before
        assert not agent_a.records("migrate.kept-removed")
        assert "MigrationSourceRemoved" not in s.events("pg10")
    # whatever the mode: the older migration's copy, the stranger and the VM's new home untouched
    assert (decoy / "data.qcow2").read_bytes() == b"older copy" and stranger.is_dir()
    assert file_hashes(target) == arrived
    assert json.loads(s.annotations("pg10")["diskhooks.io/migration-status"])["phase"] == "Succeeded"
