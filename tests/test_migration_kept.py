"""The source's kept copy after a migration (policy ``nodeAgent.migration.keepSource``): deleted once
the VM has run on its new node (``untilStarted``), kept with ``forever``, gone at once with
``--delete-source``.

End to end with the real kube-apiserver, the webhook, rsync and two real agents (see
tests/migration_support.py). There is no KubeVirt controller and no launcher here: "the VM runs on
the target" is a VMI object this test writes as virt-controller and virt-handler would (scheduled on
the target by its ``kubevirt.io/nodeName`` label, controlled by the VM, then phase Running), and in
between what prepare does in that VMI's launcher with the home marker (prepare's own decision and
writer, on the target's VM directory). A VMI that says all that but for which prepare never ran
(a forged one) must not free the copy. The rule's pure part is tested on its own first.
"""

from __future__ import annotations

import datetime
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from diskplan import keys as K
from diskplan.migration import MigrationStatus, status_json
from diskplan.plan import PlanKeys, verify_plan
from hooksidecar.prepare.actions import Refuse
from hooksidecar.prepare.apply import apply
from hooksidecar.prepare.home import home_actions
from hooksidecar.prepare.observe import read_home_marker
from nodeagent.migrate.keptcopy import kept_copies, start_shown
from tests.migration_support import (
    GROUP,
    PLAN_KEY,
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


class Vms:
    """The two calls the source's housekeeping makes (a VM by name, an Event); the API server is
    real in the end-to-end test below."""

    def __init__(self, vms: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.vms = vms
        self.patched: list[tuple[str, dict[str, Any]]] = []

    def get_vm(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.vms.get((namespace, name))

    def patch_vm_metadata(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patched.append((name, patch))
        return self.vms[(namespace, name)]


def test_the_source_deletes_exactly_the_kept_copy_of_the_migration_that_started(tmp_path: Path) -> None:
    import io

    from diskplan.policy import load_policy
    from hooksidecar.logfmt import JsonLog
    from nodeagent.migrate.keptcopy import keep_aside, release_started

    root = str(tmp_path)
    ident = "0123456789abcdef"

    def vm(name: str, uid: str = "vm-uid", **status: Any) -> dict[str, Any]:
        s = MigrationStatus(id=status.pop("id", ident), phase=status.pop("phase", "Succeeded"), source="node-a",
                            target=NODE, target_started=status.pop("started", HANDOVER),
                            source_kept=f"/var/lib/diskhooks/vms/.diskhooks/migrate/kept/ns/{name}.{ident}",
                            **status)
        return {"metadata": {"name": name, "namespace": "ns", "uid": uid,
                             "annotations": {"diskhooks.io/migration-status": status_json(s)}}}

    def kept(name: str, uid: str = "vm-uid", copy_id: str = ident) -> Path:
        d = tmp_path / "ns" / name
        d.mkdir(parents=True)
        (d / "data.qcow2").write_bytes(b"x" * 8192)
        return Path(keep_aside(root, str(d), namespace="ns", vm=name, vm_uid=uid, target=NODE, ident=copy_id))

    started = kept("started")
    older = kept("started", copy_id="00000000aaaaaaaa")  # an earlier migration of the same VM
    not_yet = kept("not-yet")
    replaced = kept("replaced", uid="old-uid")  # a VM of that name made again since
    moved_on = kept("moved-on")  # the status names a later migration
    gone = kept("gone")  # the VM was deleted
    other_source = kept("other-source")
    link_place = tmp_path / ".diskhooks" / "migrate" / "kept" / "ns" / "linked.0123456789abcdef"
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    link_place.symlink_to(victim)
    orphan_record = started.parent / "deleted-before.0123456789abcdef.json"
    orphan_record.write_text("{}")  # a copy deleted before its record (a crash in between)
    other = vm("other-source")
    other["metadata"]["annotations"]["diskhooks.io/migration-status"] = status_json(MigrationStatus(
        id=ident, phase="Succeeded", source="node-x", target=NODE, target_started=HANDOVER))
    kube = Vms({("ns", "started"): vm("started"), ("ns", "not-yet"): vm("not-yet", started=None),
                ("ns", "replaced"): vm("replaced"), ("ns", "moved-on"): vm("moved-on", id="fedcba9876543210"),
                ("ns", "other-source"): other, ("ns", "linked"): vm("linked")})
    events: list[tuple[str, str]] = []
    out = io.StringIO()

    def release(keep: str) -> int:
        policy = load_policy(f"sidecar: {{image: a/b:1}}\nnodeAgent: {{migration: {{keepSource: {keep}}}}}\n")
        return release_started(root=root, node_root="/var/lib/diskhooks/vms", node="node-a", kube=kube,  # type: ignore[arg-type]
                               policy=policy, log=JsonLog(out),
                               event=lambda v, reason, message, kind: events.append((reason, message)))

    assert release("forever") == 0 and started.is_dir()
    assert release("untilStarted") == 1
    assert not started.exists() and not Path(f"{started}.json").exists()
    assert [e[0] for e in events] == ["MigrationSourceRemoved"]
    assert [name for name, _ in kube.patched] == ["started"]  # its status no longer names the copy
    assert "sourceKept" not in json.loads(kube.patched[0][1]["metadata"]["annotations"][
        "diskhooks.io/migration-status"])
    assert f"/var/lib/diskhooks/vms/.diskhooks/migrate/kept/ns/started.{ident}" in events[0][1]
    assert "bytes on disk" in events[0][1] and f"started on node {NODE}" in events[0][1]
    for d in (older, not_yet, replaced, moved_on, gone, other_source):
        assert (d / "data.qcow2").is_file(), d
    assert link_place.is_symlink() and (victim / "precious").read_text() == "keep me"
    assert not orphan_record.exists()
    assert release("untilStarted") == 0  # nothing more


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------
def prepare_ran(s: Setup, files: NodeFiles, name: str, node: str, vmi_uid: str) -> None:
    """What prepare does with the home marker in the launcher of VMI ``vmi_uid`` on ``node``: its
    decision (hooksidecar.prepare.home) on the marker as its observer reads it, carried out by its
    writer (hooksidecar.prepare.apply), for the VM's plan as the webhook signed it. The launcher's
    view of the VM directory (a hostPath mount) is a link to the node's directory here."""
    text = s.vm(name)["spec"]["template"]["metadata"]["annotations"][K.ANN_PLAN]
    plan = verify_plan(text, PlanKeys(current=PLAN_KEY), namespace=s.namespace, vm=name)
    view = s.work / f"launcher-{vmi_uid}"
    mount = Path(f"{view}{K.LAUNCHER_VM_DIR}")
    mount.parent.mkdir(parents=True, exist_ok=True)
    mount.symlink_to(files.vm_dir(s.namespace, name))
    actions = home_actions(plan, read_home_marker(f"{mount}/{K.HOME_MARKER}"), node=node, vmi_uid=vmi_uid,
                           now=datetime.datetime.now(datetime.UTC))
    assert actions and not any(isinstance(a, Refuse) for a in actions), actions
    apply(actions, prefix=str(view))


def run_vmi_on(s: Setup, name: str, node: str, *, files: NodeFiles | None = None) -> str:
    """What KubeVirt does when the VM starts on ``node`` (no KubeVirt controller runs here): a VMI
    controlled by the VM, scheduled on the node; with ``files`` (the node's), prepare in its
    launcher writes the home marker for it (:func:`prepare_ran`); then the VMI is Running (a
    forged VMI, without ``files``, is Running at once and no launcher ever ran). Its UID."""
    vm = s.vm(name)
    vmi = s.custom().create_namespaced_custom_object(GROUP, VERSION, s.namespace, "virtualmachineinstances", {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "labels": {"kubevirt.io/nodeName": node},
                     "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": name,
                                          "uid": vm["metadata"]["uid"], "controller": True}]},
        "spec": {"domain": {"devices": {}}},
        "status": {"phase": "Running" if files is None else "Scheduled", "nodeName": node}})
    uid = str(vmi["metadata"]["uid"])
    if files is not None:
        prepare_ran(s, files, name, node, uid)
        s.custom().patch_namespaced_custom_object(  # no status subresource in the test's VMI CRD
            GROUP, VERSION, s.namespace, "virtualmachineinstances", name, {"status": {"phase": "Running"}},
            _content_type="application/merge-patch+json")
    return uid


def images(directory: Path) -> dict[str, str]:
    """The hashes of a VM directory's files but the home marker."""
    return {name: digest for name, digest in file_hashes(directory).items() if name != K.HOME_MARKER}


def marker_vmi(files: NodeFiles, namespace: str, name: str) -> str:
    return str(json.loads((files.vm_dir(namespace, name) / K.HOME_MARKER).read_text())["vmiUID"])


def migrated(s: Setup, agents: Agents, tmp_path: Path, name: str) -> tuple[NodeFiles, NodeFiles, Any, Any, Path]:
    """A VM made on node a, moved to node b (kept copy on a), both agents running with fast
    housekeeping: the two nodes' files, their agents, the kept copy."""
    a, b = sorted(s.nodes)
    fa, fb = NodeFiles(tmp_path / "node-a"), NodeFiles(tmp_path / "node-b")
    make_base(fa.library)
    make_base(fb.library)
    s.create_vm(name)
    make_vm_dir(fa, s.namespace, name, node_name=a, data_mib=16)
    fast = ("--migration-housekeeping", "5s")
    agent_a = agents.start(a, fa, extra=fast)
    agent_b = agents.start(b, fb, extra=fast)
    wait_for("the home", lambda: s.annotations(name).get(K.ANN_NODE) == a, 60, agent_a)
    done = run_command(s, "migrate", f"{s.namespace}/{name}", "--to", b, "--no-progress")
    assert done.returncode == 0, done.stderr + agent_a.stderr_text()[-4000:] + agent_b.stderr_text()[-4000:]
    status = s.status(name)
    assert status is not None and status["phase"] == "Succeeded" and "targetStarted" not in status
    kept = fa.kept(s.namespace) / f"{name}.{status['id']}"
    assert kept.is_dir()
    return fa, fb, agent_a, agent_b, kept


def housekeeping_rounds(agent: Any, rounds: int = 2) -> None:
    seen = len(agent.records("migrate.housekeeping"))
    wait_for(f"{rounds} housekeeping rounds", lambda: len(agent.records("migrate.housekeeping")) >= seen + rounds,
             60, agent)


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
    arrived = images(target)
    rounds = len(agent_a.records("migrate.housekeeping"))
    wait_for("a housekeeping round on node a after the move",
             lambda: len(agent_a.records("migrate.housekeeping")) > rounds + 1, 60, agent_a)
    assert mode == "delete-source" or kept.is_dir()  # moved but never started: kept whatever the policy

    brought = marker_vmi(fb, s.namespace, "pg10")  # the marker the move brought: the source's VMI
    vmi_uid = run_vmi_on(s, "pg10", b, files=fb)
    assert marker_vmi(fb, s.namespace, "pg10") == vmi_uid != brought  # prepare rewrote it for this start
    started = wait_for("node b records the start", lambda: (s.status("pg10") or {}).get("targetStarted"), 60,
                       agent_b)
    assert agent_b.records("migrate.target-started")[-1]["id"] == status["id"]
    if mode == "untilStarted":
        wait_for("the kept copy deleted", lambda: not kept.exists(), 60, agent_a)
        assert not (kept.parent / f"{kept.name}.json").exists()
        removed = agent_a.records("migrate.kept-removed")[-1]
        assert removed["id"] == status["id"] and removed["started"] == started and removed["bytes"] > 0
        wait_for("the Event", lambda: "MigrationSourceRemoved" in s.events("pg10"), 30, agent_a)
        after = s.status("pg10")
        assert after is not None and "sourceKept" not in after and after["targetStarted"] == started
    else:
        rounds = len(agent_a.records("migrate.housekeeping"))
        wait_for("two housekeeping rounds on node a after the start",
                 lambda: len(agent_a.records("migrate.housekeeping")) > rounds + 1, 60, agent_a)
        assert mode == "delete-source" or file_hashes(kept) == before
        assert not agent_a.records("migrate.kept-removed")
        assert "MigrationSourceRemoved" not in s.events("pg10")
    # whatever the mode: the older migration's copy, the stranger and the VM's new home untouched
    assert (decoy / "data.qcow2").read_bytes() == b"older copy" and stranger.is_dir()
    assert images(target) == arrived  # (the marker is prepare's: rewritten for the VMI, checked above)
    assert json.loads(s.annotations("pg10")["diskhooks.io/migration-status"])["phase"] == "Succeeded"


def test_a_forged_running_vmi_does_not_free_the_kept_copy(migration_setup: Setup, agents: Agents,
                                                         tmp_path: Path) -> None:
    """A VMI anyone who may create VMIs can write: Running, labelled for the target, controlled by
    the VM (right name and UID), created after the handover; but no launcher of it ran on the
    target, so the VM directory's home marker still names the VMI prepare last ran for (the
    source's). No ``targetStarted``, the kept copy stays, and the target says why."""
    s = migration_setup
    _, fb, agent_a, agent_b, kept = migrated(s, agents, tmp_path, "pg11")
    before = file_hashes(kept)
    brought = marker_vmi(fb, s.namespace, "pg11")
    forged = run_vmi_on(s, "pg11", sorted(s.nodes)[1])

    def decided() -> bool:
        return bool([r for r in agent_b.records("migrate.target-start-unproven") if r.get("vmi") == forged]
                    or "targetStarted" in (s.status("pg11") or {}))

    wait_for("node b's decision on the forged start", decided, 60, agent_b)
    housekeeping_rounds(agent_a)
    status = s.status("pg11")
    assert status is not None and "targetStarted" not in status and status.get("sourceKept")
    said = [r for r in agent_b.records("migrate.target-start-unproven") if r.get("vmi") == forged]
    assert said[0]["code"] == "marker-other-vmi" and f"written for VMI {brought}" in said[0]["reason"]
    assert not agent_b.records("migrate.target-started")
    assert file_hashes(kept) == before and (kept.parent / f"{kept.name}.json").is_file()
    assert not agent_a.records("migrate.kept-removed") and "MigrationSourceRemoved" not in s.events("pg11")
    assert marker_vmi(fb, s.namespace, "pg11") == brought  # nothing on the node was changed for it


def test_a_start_while_the_target_agent_was_down_is_recorded_when_it_comes_back(
        migration_setup: Setup, agents: Agents, tmp_path: Path) -> None:
    """The VM moved, the target's agent stopped, the VM started there (launcher, prepare, Running)
    and the VMI is still Running when the agent starts again: its first list of this node's VMIs
    counts as the event it missed, so ``targetStarted`` is recorded and the source frees its copy."""
    s = migration_setup
    b = sorted(s.nodes)[1]
    _, fb, agent_a, agent_b, kept = migrated(s, agents, tmp_path, "pg12")
    agent_b.proc.send_signal(signal.SIGTERM)
    assert agent_b.proc.wait(30) is not None
    vmi_uid = run_vmi_on(s, "pg12", b, files=fb)
    housekeeping_rounds(agent_a)
    status = s.status("pg12")
    assert status is not None and "targetStarted" not in status and kept.is_dir()  # nobody saw it yet
    again = agents.start(b, fb, extra=("--migration-housekeeping", "5s"))
    started = wait_for("node b records the start after its restart",
                       lambda: (s.status("pg12") or {}).get("targetStarted"), 60, again)
    assert again.records("migrate.target-started")[-1]["id"] == status["id"]
    assert vmi_uid in again.records("migrate.target-started")[-1]["seen"]
    wait_for("the kept copy deleted", lambda: not kept.exists(), 60, agent_a)
    removed = agent_a.records("migrate.kept-removed")[-1]
    assert removed["id"] == status["id"] and removed["started"] == started
    assert not (kept.parent / f"{kept.name}.json").exists()


def test_the_status_forgets_the_deleted_copy_even_when_the_vm_changed_meanwhile(migration_setup: Setup) -> None:
    """The source deletes the kept copy from a VM it read a moment before; meanwhile the VM changed
    (in a cluster, KubeVirt updates a starting VM's status, which changes its resourceVersion). The
    conditional update then conflicts (409 from the real API server): the status is read again and
    still loses ``sourceKept``, keeping the rest. A newer migration's status is left alone."""
    import io

    from hooksidecar.logfmt import JsonLog
    from nodeagent.kube import Kube, load_client
    from nodeagent.migrate.keptcopy import _forget_kept

    s = migration_setup
    a, b = sorted(s.nodes)
    s.create_vm("pg20")
    kept = MigrationStatus(id="0123456789abcdef", phase="Succeeded", source=a, target=b, bytes=5, total=5,
                           source_kept=f"/var/lib/diskhooks/vms/.diskhooks/migrate/kept/{s.namespace}/pg20.x",
                           target_started=HANDOVER)
    s.agent_patch("pg20", {"metadata": {"annotations": {K.ANN_MIGRATION_STATUS: status_json(kept)}}})
    read_before = s.vm("pg20")
    s.alice_patch("pg20", {"metadata": {"labels": {"team": "db"}}})  # the VM changes after the read
    assert s.vm("pg20")["metadata"]["resourceVersion"] != read_before["metadata"]["resourceVersion"]
    out = io.StringIO()
    kube = Kube(load_client(str(s.agent_kubeconfig)))
    _forget_kept(kube, read_before, kept, JsonLog(out))
    after = s.status("pg20")
    assert after is not None and "sourceKept" not in after, (after, out.getvalue())
    assert after["id"] == kept.id and after["targetStarted"] == HANDOVER and after["phase"] == "Succeeded"
    assert "migrate.status-failed" not in out.getvalue()
    assert s.vm("pg20")["metadata"]["labels"]["team"] == "db"

    newer = MigrationStatus(id="fedcba9876543210", phase="Copying", source=b, target=a)
    s.agent_patch("pg20", {"metadata": {"annotations": {K.ANN_MIGRATION_STATUS: status_json(newer)}}})
    _forget_kept(kube, read_before, kept, JsonLog(out))  # stale, and the status is another migration's
    assert s.status("pg20") == json.loads(status_json(newer))
