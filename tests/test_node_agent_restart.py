"""The node agent killed (SIGKILL) in the middle of its work and started again: it resumes, and does
nothing twice. Against a real kube-apiserver (envtest), the agent as a subprocess, as in
``tests/test_node_agent_kube.py`` (faked, because they cannot run here: KubeVirt's controllers and
the launcher; the VMIs and prepare's home markers are written by the test)."""

from __future__ import annotations

import signal
from collections import Counter

from diskplan import keys as K
from tests.node_agent_support import AgentSetup, Cluster, StartAgent, signed_plan, wait_for

VMS = 60


def test_agent_killed_while_recording_homes_resumes_and_records_each_once(
        cluster: Cluster, agent_setup: AgentSetup, start_agent: StartAgent, agent_node: str) -> None:
    """60 running VMs on this node, none with a home yet. The agent is SIGKILLed as soon as it has
    recorded the first home; started again, it records the rest. Every VM ends with this node as
    its home and at most one HomeNodeRecorded Event: none is recorded twice (the agent's patch is
    conditional on the VM's resourceVersion, and a VM with a home is left alone).

    Not asserted: that every VM gets its Event. The agent sends it after the patch, so a VM patched
    just before the SIGKILL keeps its home without an Event (seen: 0 to 2 of 60 per run); the
    restarted agent finds the home recorded and leaves it."""
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
    events = Counter(e.involved_object.name for e in cluster.core.list_namespaced_event(ns).items
                     if e.reason == K.EVENT_HOME_NODE_RECORDED)
    print(f"HomeNodeRecorded Events: {len(events)} VMs, at most {max(events.values())} each")
    assert max(events.values()) == 1, events.most_common(3)
    assert second.stop() == 0
