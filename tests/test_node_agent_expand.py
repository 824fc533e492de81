"""The node agent grows a running VM's disk online when its VM's plan grows: end to end, with a real
kube-apiserver (envtest) and a real launcher-shaped libvirt running a QEMU (TCG) domain.

The pieces: ``diskhooks-node serve`` as a subprocess (``tests/node_agent_support.py``); an
unprivileged session libvirtd (uid 107) whose socket is in a kubelet-like
``<pods>/<uid>/volumes/kubernetes.io~empty-dir/libvirt-runtime/`` directory, and a domain
``<namespace>_<vm>`` on a qcow2 image made by ``diskhooks-sidecar prepare`` (``tests/libvirt_launcher.py``).
The agent finds the socket from the VMI's ``status.activePods`` below ``--host-prefix`` +
``--kubelet-pods-dir``. Witnesses: ``virsh domblkinfo`` (QEMU's view) and ``qemu-img info -U``
(the file), the VM's Events, ``/metrics``.

Faked, because they cannot run here: KubeVirt's controllers (the VMI is created as virt-handler
leaves it) and the webhook (the test writes the new signed plan on the VM template, as the
webhook's VM UPDATE does). Needs root, libvirtd and qemu-system-x86_64 (scripts/setup.sh): without
them these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from diskplan import keys as K
from tests.libvirt_launcher import (
    DomainDiskSpec,
    LauncherDaemon,
    RunningDomain,
    launcher_daemon,
    run_prepare,
    start_domain,
    stop_domain,
)
from tests.node_agent_support import (
    OTHER_KEY,
    POLICY,
    AgentProcess,
    AgentSetup,
    Cluster,
    StartAgent,
    signed_plan,
    wait_for,
)

GiB = 1 << 30
VM = "grows"


@dataclass
class Launcher:
    """One running VM's launcher: its daemon, the domain, the image prepare made."""

    daemon: LauncherDaemon
    domain: RunningDomain
    image: Path

    def capacity(self) -> int:
        out = self.daemon.virsh("domblkinfo", self.domain.name, "vda")
        match = re.search(r"^Capacity:\s+(\d+)$", out, re.MULTILINE)
        assert match is not None, out
        return int(match.group(1))

    def file_size(self) -> int:
        out = subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(self.image)],
                             check=True, capture_output=True, text=True).stdout
        return int(json.loads(out)["virtual-size"])

    def sizes(self) -> tuple[int, int]:
        return self.capacity(), self.file_size()


@pytest.fixture(scope="module")
def daemon() -> Iterator[LauncherDaemon]:
    with launcher_daemon() as d:
        yield d


@pytest.fixture
def launcher(daemon: LauncherDaemon, cluster: Cluster, tmp_path: Path) -> Iterator[Launcher]:
    """prepare makes the 1 GiB image of the plan, then the domain ``<namespace>_grows`` starts on it."""
    ns = cluster.namespace
    prefix = daemon.root / f"launcher-{ns}"
    prefix.mkdir()
    proc = run_prepare(signed_plan(ns, VM, data=GiB), prefix=prefix, plan_file=tmp_path / "plan.json",
                       volumes=["data"])
    assert proc.returncode == 0, proc.stderr
    image = prefix / K.launcher_disk_dir("data").lstrip("/") / K.disk_file_name("data")
    domain = start_domain(daemon, f"{ns}_{VM}", [DomainDiskSpec(K.disk_alias("data"), image, "vda")])
    try:
        yield Launcher(daemon, domain, image)
    finally:
        stop_domain(daemon, domain)


def start_vm(cluster: Cluster, launcher: Launcher, node: str) -> None:
    """The VM at home on ``node`` with a 1 GiB plan, and its VMI running there in the launcher."""
    ns = cluster.namespace
    plan = signed_plan(ns, VM, data=GiB)
    vm = cluster.create_vm(VM, plan, home=node)
    cluster.create_vmi(vm, node, plan, pod_uid=launcher.daemon.pod_uid)


def agent_for(start_agent: StartAgent, launcher: Launcher) -> AgentProcess:
    agent: AgentProcess = start_agent(host_prefix=launcher.daemon.root, kubelet_pods_dir="/kubelet/pods")
    return agent


def expand_results(agent: AgentProcess) -> list[list[dict[str, object]]]:
    return [r["results"] for r in agent.records("expand.result")]


def test_a_grown_plan_grows_the_running_disk_once_and_never_shrinks_it(
        cluster: Cluster, launcher: Launcher, start_agent: StartAgent, agent_node: str) -> None:
    ns = cluster.namespace
    start_vm(cluster, launcher, agent_node)
    agent = agent_for(start_agent, launcher)
    # at start the plan and the running disk agree: looked at, nothing done
    wait_for("the first look at the running disk", lambda: expand_results(agent), agent=agent)
    assert expand_results(agent)[0][0]["outcome"] == "already"
    assert launcher.sizes() == (GiB, GiB)

    cluster.set_template_plan(VM, signed_plan(ns, VM, data=2 * GiB))
    event = wait_for("a DiskExpanded event", lambda: cluster.events(VM, K.EVENT_DISK_EXPANDED),
                     agent=agent)[0]
    assert event.type == "Normal"
    assert f"from {GiB} to {2 * GiB} bytes" in event.message
    assert launcher.sizes() == (2 * GiB, 2 * GiB)  # QEMU's view and the file's agree
    assert launcher.daemon.conn.lookupByName(launcher.domain.name).isActive()  # grown while running
    assert agent.metric("diskhooks_node_expansions_total", outcome="grown") == 1

    # a plan asking for less: the disk keeps its size, no Event
    cluster.set_template_plan(VM, signed_plan(ns, VM, data=GiB + GiB // 2))
    wait_for("the smaller plan looked at", lambda: len(expand_results(agent)) >= 3, agent=agent)
    assert expand_results(agent)[-1][0]["outcome"] == "already"
    # a plan not signed with the webhook's key: not even looked at
    cluster.set_template_plan(VM, signed_plan(ns, VM, key=OTHER_KEY, data=4 * GiB))
    wait_for("the forged plan refused", lambda: [r for r in agent.records("vm.skipped")
                                                 if r.get("code") == "plan-refused"], agent=agent)
    assert launcher.sizes() == (2 * GiB, 2 * GiB)
    assert len(cluster.events(VM, K.EVENT_DISK_EXPANDED)) == 1
    assert cluster.events(VM, K.EVENT_DISK_EXPAND_FAILED) == []
    assert agent.metric("diskhooks_node_expansions_total", outcome="failed") == 0
    assert agent.stop() == 0


def test_online_expansion_off_leaves_the_running_disk_alone(
        cluster: Cluster, launcher: Launcher, start_agent: StartAgent, agent_node: str,
        agent_setup: AgentSetup) -> None:
    """``hostDisks.onlineExpand: false``: the grown plan takes effect at the next start only."""
    agent_setup.policy.write_text(POLICY.replace("hostDisks:\n", "hostDisks:\n  onlineExpand: false\n"))
    ns = cluster.namespace
    start_vm(cluster, launcher, agent_node)
    agent = agent_for(start_agent, launcher)
    wait_for("both watches listed", lambda: agent.get("/readyz")[0] == 200, agent=agent)
    cluster.set_template_plan(VM, signed_plan(ns, VM, data=2 * GiB))
    wait_for("the grown plan seen and left alone",
             lambda: len(agent.records("expand.skipped")) >= 1
             and agent.metric("diskhooks_node_reconciles_total", kind="vm") >= 2, agent=agent)
    assert launcher.sizes() == (GiB, GiB)
    assert cluster.events(VM) == []
    assert expand_results(agent) == []


def test_a_launcher_that_cannot_grow_the_disk_is_a_warning_event(
        cluster: Cluster, launcher: Launcher, start_agent: StartAgent, agent_node: str) -> None:
    """The domain is not the one the plan names (a disk attached as raw): DiskExpandFailed, with
    libvirt's side of the reason, once per plan, and the disk unchanged."""
    ns = cluster.namespace
    start_vm(cluster, launcher, agent_node)
    # the domain runs as <ns>_grows; a second VM whose VMI claims the same launcher Pod has no domain
    plan = signed_plan(ns, "other", data=2 * GiB)
    other = cluster.create_vm("other", plan, home=agent_node)
    cluster.create_vmi(other, agent_node, plan, pod_uid=launcher.daemon.pod_uid)
    agent = agent_for(start_agent, launcher)
    event = wait_for("a DiskExpandFailed event", lambda: cluster.events("other", K.EVENT_DISK_EXPAND_FAILED),
                     agent=agent)[0]
    assert event.type == "Warning" and "disk data could not be grown online" in event.message
    assert f"{ns}_other" in event.message
    wait_for("a retry", lambda: agent.metric("diskhooks_node_expansions_total", outcome="failed") >= 2,
             timeout=20, agent=agent)
    assert len(cluster.events("other", K.EVENT_DISK_EXPAND_FAILED)) == 1  # once per plan and reason
    assert launcher.sizes() == (GiB, GiB)
