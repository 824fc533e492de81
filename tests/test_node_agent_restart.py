"""The node agent killed (SIGKILL) in the middle of its work and started again: it resumes, does
nothing twice, and sends the HomeNodeRecorded Event of a home it recorded just before it died.
Against a real kube-apiserver (envtest), the agent as a subprocess, as in
``tests/test_node_agent_kube.py`` (faked, because they cannot run here: KubeVirt's controllers and
the launcher; the VMIs and prepare's home markers are written by the test)."""

from __future__ import annotations

import datetime
import signal
from collections import Counter
from typing import Any

from diskplan import keys as K
from nodeagent.home import home_patch
from nodeagent.homeevent import HOME_FIELD_MANAGER, recorded_event_suffix
from nodeagent.kube import FIELD_MANAGER
from tests.envtest import ControlPlane
from tests.node_agent_support import (
    AGENT_NAMESPACE,
    AGENT_SA,
    AgentProcess,
    AgentSetup,
    Cluster,
    StartAgent,
    signed_plan,
    wait_for,
)

VMS = 60


def test_agent_killed_while_recording_homes_resumes_and_records_each_once(
        cluster: Cluster, agent_setup: AgentSetup, start_agent: StartAgent, agent_node: str) -> None:
    """60 running VMs on this node, none with a home yet. The agent is SIGKILLed as soon as it has
    recorded the first home; started again, it records the rest. Every VM ends with this node as
    its home and exactly one HomeNodeRecorded Event: none is recorded twice (the agent's patch is
    conditional on the VM's resourceVersion, and a VM with a home is left alone), and a VM patched
    just before the SIGKILL, whose Event the first agent did not send (0 to 2 of 60 per run), gets
    it from the second (its home was recorded minutes ago; the Event's name is fixed, so one the
    first agent did send is refused as existing). The deterministic case of that is
    :func:`test_a_home_recorded_without_its_event_gets_it_once_at_the_agents_start`."""
    ns = cluster.namespace
    for i in range(VMS):
        name = f"vm-{i:02d}"
        vm = cluster.create_vm(name, signed_plan(ns, name))
        agent_setup.prepare_ran(cluster.create_vmi(vm, agent_node, signed_plan(ns, name)), agent_node)

    first = start_agent()
    wait_for("the first home recorded", lambda: first.records("home.recorded"), agent=first)
    first.proc.send_signal(signal.SIGKILL)
    assert first.proc.wait(10) == -signal.SIGKILL
    done_before = {r["vm"] for r in first.records("home.recorded")}
    assert 0 < len(done_before) < VMS, "killed in the middle of its work"
    print(f"recorded before the SIGKILL: {len(done_before)} of {VMS}")

    second = start_agent()
    names = [f"vm-{i:02d}" for i in range(VMS)]
    wait_for("every VM's home", lambda: all(cluster.home(n) == agent_node for n in names),
             timeout=60, agent=second)
    wait_for("the agent's start pass", lambda: len({r["vm"] for r in second.records()
                                                     if r.get("event", "").startswith("home.")}) >= VMS,
             agent=second)
    redone = {r["vm"] for r in second.records("home.recorded")} & done_before
    assert not redone, f"recorded again after the restart: {sorted(redone)}"
    events = wait_for("every recorded home's Event",
                      lambda: (c := recorded_events(cluster)).keys() == set(names) and c, agent=second)
    late = {r["vm"] for r in second.records("home.event-late")}
    print(f"HomeNodeRecorded Events: {len(events)} VMs, at most {max(events.values())} each; "
          f"sent late by the second agent: {sorted(late)}")
    assert max(events.values()) == 1, events.most_common(3)
    # only a home the first agent recorded (perhaps so shortly before the SIGKILL that it did not
    # log it) can lack its Event: the second agent's own records send theirs at once
    assert late.isdisjoint(r["vm"] for r in second.records("home.recorded")), late
    assert second.stop() == 0


def recorded_events(cluster: Cluster) -> Counter[str]:
    """HomeNodeRecorded Events in the test's namespace, counted per VM."""
    return Counter(e.involved_object.name for e in cluster.core.list_namespaced_event(cluster.namespace).items
                   if e.reason == K.EVENT_HOME_NODE_RECORDED)


def at_home_and_counted(agent: AgentProcess, vms: int) -> bool:
    """The agent's VM reconcile (where a late Event is sent) ran for ``vms`` VMs at home here (one
    planned image each)."""
    return agent.metric("diskhooks_node_images") == vms


def test_a_home_recorded_without_its_event_gets_it_once_at_the_agents_start(
        envtest: ControlPlane, cluster: Cluster, agent_setup: AgentSetup, start_agent: StartAgent,
        agent_node: str) -> None:
    """The agent killed between its home patch and the Event, made deterministic: the test makes
    the agent's own patch (``home_patch``, as the agent's ServiceAccount, under its home field
    manager) and sends no Event. The agent started then sends the VM's HomeNodeRecorded Event, named
    for the VM's UID and the node; a second start sends nothing more (409: it exists). No Event for
    a home the agent recorded more than ten minutes ago (its managedFields time set back by hand:
    the agent's start makes no call for old homes), one set by someone else, or one another node's
    agent recorded and a migration then handed over to this node (its handover patch, under the
    agent's other field manager, takes the annotation over from the home record)."""
    ns = cluster.namespace
    as_agent: Any = envtest.service_account_client(AGENT_NAMESPACE, AGENT_SA)
    from kubernetes import client

    agent_api: Any = client.CustomObjectsApi(as_agent)

    def agent_patch(name: str, patch: dict[str, Any] | None = None, *, node: str = agent_node,
                    manager: str = HOME_FIELD_MANAGER) -> dict[str, Any]:
        if patch is None:  # a new VM running here, and the home patch of the agent of ``node``
            vm = cluster.create_vm(name, signed_plan(ns, name))
            agent_setup.prepare_ran(cluster.create_vmi(vm, agent_node, signed_plan(ns, name)), agent_node)
            patch = home_patch(node, vm["metadata"]["resourceVersion"])
        patched: dict[str, Any] = agent_api.patch_namespaced_custom_object(
            "kubevirt.io", "v1", ns, "virtualmachines", name, patch, field_manager=manager,
            _content_type="application/merge-patch+json")
        return patched

    patched = agent_patch("patched")
    entries = [e for e in patched["metadata"]["managedFields"] if e["manager"] == HOME_FIELD_MANAGER]
    assert len(entries) == 1 and f"f:{K.ANN_NODE}" in entries[0]["fieldsV1"]["f:metadata"]["f:annotations"]

    old = agent_patch("old")  # the same record, an hour ago
    hour_ago = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    fields = [dict(e, time=hour_ago) if e["manager"] == HOME_FIELD_MANAGER else e
              for e in old["metadata"]["managedFields"]]
    old = cluster.patch_vm("old", {"metadata": {"managedFields": fields}})
    assert [e["time"] for e in old["metadata"]["managedFields"] if e["manager"] == HOME_FIELD_MANAGER] \
        == [hour_ago], "the API server kept the time the test wrote"

    byhand = cluster.create_vm("byhand", signed_plan(ns, "byhand"), home=agent_node)  # homed by an admin
    agent_setup.prepare_ran(cluster.create_vmi(byhand, agent_node, signed_plan(ns, "byhand")), agent_node)

    agent_patch("moved", node="node-b")  # recorded by node-b's agent, then moved here
    moved = agent_patch("moved", {"metadata": {"annotations": {K.ANN_NODE: agent_node},
                                               "labels": {K.LABEL_NODE: agent_node}}},
                        manager=FIELD_MANAGER)  # the source's handover (nodeagent/migrate/source.py)
    home_entries = [e for e in moved["metadata"]["managedFields"] if e["manager"] == HOME_FIELD_MANAGER]
    assert all(f"f:{K.ANN_NODE}" not in e["fieldsV1"]["f:metadata"].get("f:annotations", {})
               for e in home_entries), home_entries
    assert recorded_events(cluster) == Counter()

    first = start_agent()
    event = wait_for("the late HomeNodeRecorded Event", lambda: cluster.events(
        "patched", K.EVENT_HOME_NODE_RECORDED), agent=first)
    wait_for("the four VMs reconciled", lambda: at_home_and_counted(first, 4), agent=first)
    assert event[0].metadata.name == f"patched.{recorded_event_suffix(patched['metadata']['uid'], agent_node)}"
    assert event[0].message.startswith(f"home node recorded: {agent_node} (at ")
    assert "sent late" in event[0].message
    assert event[0].involved_object.uid == patched["metadata"]["uid"]
    assert [r["vm"] for r in first.records("home.event-late")] == ["patched"]
    assert first.records("home.recorded") == []  # nothing recorded again
    assert first.stop() == 0

    second = start_agent()
    wait_for("the four VMs reconciled again", lambda: at_home_and_counted(second, 4), agent=second)
    assert second.records("home.event-late") == [] and second.records("event.failed") == []
    assert recorded_events(cluster) == Counter({"patched": 1})
    assert second.stop() == 0
