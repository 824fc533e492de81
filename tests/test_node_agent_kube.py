"""The node agent against a real kube-apiserver (envtest): home nodes from VMIs and from markers.

``diskhooks-node serve`` (the installed console script) runs as a subprocess, as the DaemonSet runs
it, with a ServiceAccount token bound to the least ClusterRole it needs, a policy file, a plan-key
directory and ``--host-prefix`` pointing at a temporary node root (``tests/node_agent_support.py``).

Faked, because they cannot run here: KubeVirt's controllers and the launcher. The tests create
the VMI a VirtualMachine's start would make and the home marker prepare would leave in the VM's
directory on the node (``AgentSetup.prepare_ran``: the VMI's UID and the node, with prepare's own
writer), since the agent records a home from a VMI only when that marker vouches for it. No webhook
is registered: what it adds to these objects is not the agent's concern here.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os

from diskplan import keys as K
from diskplan.homemarker import HomeMarker
from tests.node_agent_support import (
    OTHER_KEY,
    POLICY,
    ROOT_DIR,
    AgentSetup,
    Cluster,
    StartAgent,
    signed_plan,
    vmi_manifest,
    wait_for,
)


def test_home_recorded_from_a_running_vmi_and_not_from_an_untrusted_plan(
        cluster: Cluster, agent_setup: AgentSetup, start_agent: StartAgent, agent_node: str) -> None:
    """A VMI on this node with a signed plan, for which prepare ran here, gives its VM a home and an
    Event; forged, unsigned and missing plans give nothing. One VMI exists before the agent starts
    (seen by the list, or its marker by the start scan: either records), one is created after: the
    watch sees it before prepare's marker exists (nothing done), then again when it goes on running
    (recorded from the VMI)."""
    ns = cluster.namespace
    before = cluster.create_vm("before", signed_plan(ns, "before"))
    agent_setup.prepare_ran(cluster.create_vmi(before, agent_node, signed_plan(ns, "before")), agent_node)
    forged = cluster.create_vm("forged", signed_plan(ns, "forged"))
    cluster.create_vmi(forged, agent_node, signed_plan(ns, "forged", key=OTHER_KEY))
    unsigned = cluster.create_vm("unsigned", None)
    doc = json.loads(signed_plan(ns, "unsigned"))
    del doc["auth"]
    cluster.create_vmi(unsigned, agent_node, json.dumps(doc))
    copied = cluster.create_vm("copied", None)  # a valid plan of another VM, copied onto this VMI
    cluster.create_vmi(copied, agent_node, signed_plan(ns, "before"))

    agent = start_agent()
    wait_for("the home of VM 'before'", lambda: cluster.home("before") == agent_node, agent=agent)
    recorded = wait_for("a HomeNodeRecorded event",
                        lambda: cluster.events("before", K.EVENT_HOME_NODE_RECORDED), agent=agent)
    assert recorded[0].type == "Normal" and agent_node in recorded[0].message
    assert recorded[0].involved_object.uid == before["metadata"]["uid"]
    assert cluster.vm("before")["metadata"]["labels"][K.LABEL_NODE] == agent_node

    after = cluster.create_vm("after", signed_plan(ns, "after"))
    vmi = cluster.create_vmi(after, agent_node, signed_plan(ns, "after"))
    wait_for("the VMI seen without a marker", lambda: agent.metric(
        "diskhooks_node_home_decisions_total", source="vmi", outcome="no-marker") >= 1, agent=agent)
    assert cluster.home("after") is None
    agent_setup.prepare_ran(vmi, agent_node)  # the launcher's init container ran
    cluster.patch_vmi("after", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    wait_for("the home of VM 'after' (from the watch)", lambda: cluster.home("after") == agent_node,
             agent=agent)
    event = wait_for("a HomeNodeRecorded event for 'after'",
                     lambda: cluster.events("after", K.EVENT_HOME_NODE_RECORDED), agent=agent)[0]
    assert f"its VMI (uid {vmi['metadata']['uid']}) runs here" in event.message

    wait_for("three refused plans", lambda: agent.metric(
        "diskhooks_node_home_decisions_total", source="vmi", outcome="plan-refused") >= 3, agent=agent)
    for name in ("forged", "unsigned", "copied"):
        assert cluster.home(name) is None, name
        assert cluster.events(name) == [], name
    refused = {r["vm"]: r["reason"] for r in agent.records("home.skipped") if r.get("code") == "plan-refused"}
    assert "does not verify" in refused["forged"]
    assert "not signed" in refused["unsigned"]
    assert "made for VM 'before'" in refused["copied"]
    assert agent.metric("diskhooks_node_homes_recorded_total", source="vmi") + agent.metric(
        "diskhooks_node_homes_recorded_total", source="marker") == 2
    assert agent.metric("diskhooks_node_homes_recorded_total", source="vmi") >= 1


def test_a_forged_vmi_with_its_vms_valid_plan_pins_nothing(
        cluster: Cluster, agent_setup: AgentSetup, start_agent: StartAgent, agent_node: str) -> None:
    """The attack: a user who may create VMIs makes one labelled for this node, owned (by reference)
    by their own stopped VM and carrying that VM's valid signed plan, to pin the VM to a node that
    holds none of its images. Everything on the VMI checks out, but prepare never ran for it here:
    no marker at all, a marker a deleted VM of the same name left (another VMI, older than the VM),
    or a marker of another node's directory. Nothing is recorded, no Event, and the metric says why."""
    ns = cluster.namespace
    names = ("nomarker", "reborn", "copieddir")
    vms = {name: cluster.create_vm(name, signed_plan(ns, name), running=False) for name in names}
    old = datetime.datetime.fromisoformat(vms["reborn"]["metadata"]["creationTimestamp"]) \
        - datetime.timedelta(days=3)
    agent_setup.write_marker(HomeMarker(ns, "reborn", "0b1d2e3f-0000-4000-8000-00000000dead", agent_node, old))
    agent_setup.write_marker(HomeMarker(ns, "copieddir", "0b1d2e3f-0000-4000-8000-00000000beef", "node-b",
                                        datetime.datetime.now(datetime.UTC)))

    agent = start_agent()
    wait_for("/readyz", lambda: agent.get("/readyz")[0] == 200, agent=agent)
    for name in names:  # forged after the agent listed: the watch delivers them
        vm = vms[name]
        plan = vm["spec"]["template"]["metadata"]["annotations"][K.ANN_PLAN]  # copied, valid
        forged = vmi_manifest(vm, agent_node, plan)
        forged["metadata"]["name"] = f"{name}-forged"
        forged["status"]["activePods"] = {"8c0ffee0-0000-4000-8000-000000000001": agent_node}
        cluster.custom.create_namespaced_custom_object("kubevirt.io", "v1", ns, "virtualmachineinstances",
                                                       forged)

    def decided(outcome: str) -> float:
        return agent.metric("diskhooks_node_home_decisions_total", source="vmi", outcome=outcome)

    wait_for("three forged VMIs refused", lambda: decided("no-marker") >= 1 and decided(
        "marker-other-vmi") >= 1 and decided("marker-other-node") >= 1, agent=agent)
    skipped = {r["vm"]: r for r in agent.records("home.skipped") if r.get("source") == "vmi"}
    assert skipped["nomarker"]["code"] == "no-marker"
    assert skipped["reborn"]["code"] == "marker-other-vmi"
    assert "written for VMI 0b1d2e3f-0000-4000-8000-00000000dead" in skipped["reborn"]["reason"]
    assert skipped["copieddir"]["code"] == "marker-other-node"
    for rec in skipped.values():
        assert "only prepare's marker proves that its images are here" in rec["reason"]
    # the start scan looked at the two markers itself: an orphan and another node's
    wait_for("the scan's verdicts", lambda: agent.metric(
        "diskhooks_node_home_decisions_total", source="marker", outcome="orphan") >= 1, agent=agent)
    for name in names:
        assert cluster.home(name) is None, name
        assert cluster.events(name) == [], name
    assert agent.metric("diskhooks_node_homes_recorded_total", source="vmi") == 0
    assert agent.metric("diskhooks_node_homes_recorded_total", source="marker") == 0


def test_marker_of_a_stopped_vm_records_its_home_and_an_older_marker_is_an_orphan(
        cluster: Cluster, agent_setup: AgentSetup, start_agent: StartAgent, agent_node: str) -> None:
    """A stopped VM (no VMI) whose directory holds prepare's marker gets its home at the agent's
    start scan; a marker older than its VM (a deleted VM's leftover), a marker of another node and
    a marker of a VM that does not exist are not claimed."""
    ns = cluster.namespace
    stopped = cluster.create_vm("stopped", signed_plan(ns, "stopped"), running=False)
    reused = cluster.create_vm("reused", signed_plan(ns, "reused"), running=False)
    moved = cluster.create_vm("moved", signed_plan(ns, "moved"), running=False)
    created = {name: datetime.datetime.fromisoformat(vm["metadata"]["creationTimestamp"])
               for name, vm in (("stopped", stopped), ("reused", reused), ("moved", moved))}

    def marker(vm: str, written: datetime.datetime, on: str = agent_node) -> None:
        agent_setup.write_marker(HomeMarker(ns, vm, "3f1e7a52-0000-4000-8000-000000000001", on, written))

    marker("stopped", created["stopped"] + datetime.timedelta(seconds=1))
    marker("reused", created["reused"] - datetime.timedelta(hours=1))
    marker("moved", created["moved"] + datetime.timedelta(seconds=1), on="node-b")
    marker("deleted", created["stopped"])

    agent = start_agent()
    wait_for("the home of VM 'stopped'", lambda: cluster.home("stopped") == agent_node, agent=agent)
    event = wait_for("a HomeNodeRecorded event",
                     lambda: cluster.events("stopped", K.EVENT_HOME_NODE_RECORDED), agent=agent)[0]
    assert "home marker" in event.message
    wait_for("two orphans and one foreign marker", lambda: (
        agent.metric("diskhooks_node_home_decisions_total", source="marker", outcome="orphan") >= 2
        and agent.metric("diskhooks_node_home_decisions_total", source="marker",
                         outcome="marker-other-node") >= 1), agent=agent)
    assert cluster.home("reused") is None and cluster.events("reused") == []
    assert cluster.home("moved") is None and cluster.events("moved") == []
    orphans = {r["vm"]: r["reason"] for r in agent.records("home.skipped") if r.get("code") == "orphan"}
    assert "older than the VirtualMachine" in orphans["reused"]
    assert "no VirtualMachine of that name" in orphans["deleted"]
    assert agent.metric("diskhooks_node_homes_recorded_total", source="marker") == 1


def test_a_vmi_on_another_nodes_vm_is_a_warning_and_changes_nothing(
        cluster: Cluster, agent_setup: AgentSetup, start_agent: StartAgent, agent_node: str) -> None:
    """A VMI runs here (prepare ran for it: a plan from before the VM had a home) but its VM's home
    is another node: one Warning Event, the home is kept."""
    ns = cluster.namespace
    vm = cluster.create_vm("elsewhere", signed_plan(ns, "elsewhere"))
    vm = cluster.patch_vm("elsewhere", {"metadata": {"annotations": {K.ANN_NODE: "node-b"}}})
    agent_setup.prepare_ran(cluster.create_vmi(vm, agent_node, signed_plan(ns, "elsewhere")), agent_node)
    agent = start_agent()
    warning = wait_for("a HomeNodeConflict event", lambda: cluster.events("elsewhere", "HomeNodeConflict"),
                       agent=agent)[0]
    assert warning.type == "Warning" and "node-b" in warning.message
    assert cluster.home("elsewhere") == "node-b"
    assert cluster.events("elsewhere", K.EVENT_HOME_NODE_RECORDED) == []


def test_serves_metrics_and_health_and_stops_on_sigterm(
        cluster: Cluster, agent_setup: AgentSetup, start_agent: StartAgent, agent_node: str) -> None:
    """``/healthz`` and ``/readyz`` answer 200 once both watches listed, ``/metrics`` has the node's
    figures, and SIGTERM ends the process with status 0 (bounded wait: it must not hang)."""
    ns = cluster.namespace
    vm = cluster.create_vm("counted", signed_plan(ns, "counted"))
    agent_setup.prepare_ran(cluster.create_vmi(vm, agent_node, signed_plan(ns, "counted")), agent_node)
    agent = start_agent()
    wait_for("the home of VM 'counted'", lambda: cluster.home("counted") == agent_node, agent=agent)
    wait_for("/readyz", lambda: agent.get("/readyz")[0] == 200, agent=agent)
    assert agent.get("/healthz") == (200, "ok\n")
    assert agent.get("/nothing")[0] == 404
    wait_for("the VM counted at home", lambda: agent.metric("diskhooks_node_vms") == 1, agent=agent)
    assert agent.metric("diskhooks_node_vmis") == 1
    assert agent.metric("diskhooks_node_images") == 1
    assert agent.metric("diskhooks_node_reconcile_seconds_count", kind="vmi") >= 1
    assert agent.stop(timeout=10) == 0
    assert agent.records("stopped")[-1]["clean"] is True


def test_serve_keeps_the_nodes_base_catalog(
        agent_setup: AgentSetup, start_agent: StartAgent, agent_node: str) -> None:
    """``serve`` also runs the base catalog's refresher: a base in the policy's image library (below
    ``--host-prefix``) gets its entry in ``<root>/.diskhooks/catalog`` once it has settled, with the
    SHA-256 of its bytes, and SIGTERM still ends the process at once."""
    library = "/var/lib/diskhooks/images"
    agent_setup.policy.write_text(POLICY.replace(f"  root: {ROOT_DIR}\n",
                                                 f"  root: {ROOT_DIR}\n  imageLibrary: {library}\n"))
    lib = agent_setup.host_prefix / library.lstrip("/")
    lib.mkdir(parents=True)
    content = os.urandom(1 << 20)
    (lib / "alma-9.raw").write_bytes(content)
    agent = start_agent()
    entry = agent_setup.node_root() / ".diskhooks" / "catalog" / "alma-9.raw.entry.json"
    wait_for("the base's catalog entry", entry.is_file, agent=agent)  # after the 2 s quiet period
    doc = json.loads(entry.read_text())
    assert (doc["sha256"], doc["hashedBy"]) == (hashlib.sha256(content).hexdigest(), "node-agent")
    assert [r["hashed"] for r in agent.records("catalog")] == [["alma-9.raw"]]
    assert agent.stop(timeout=10) == 0
    assert agent.records("stopped")[-1]["clean"] is True
