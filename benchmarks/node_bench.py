"""Node agent benchmark: ``diskhooks-node serve`` as a subprocess against a real kube-apiserver and a
real launcher-shaped libvirt, with baselines measured in the same run.

What runs: etcd and kube-apiserver from ``$KUBEBUILDER_ASSETS`` with KubeVirt's CRDs
(``tests/envtest.py``); the agent with a ServiceAccount token bound to its least ClusterRole
(``tests/node_agent_support.py``, as the tests run it); an unprivileged session libvirtd as uid 107
with its socket in a kubelet-like ``libvirt-runtime`` directory and a TCG domain on a qcow2 image
made by ``diskhooks-sidecar prepare`` (``tests/libvirt_launcher.py``). Played here, because they
cannot run: KubeVirt's controllers (the VMIs are created as virt-handler leaves them) and the
webhook (the bench writes the new signed plan on the VM template, as the webhook's VM UPDATE does;
its own latency is ``python -m benchmarks webhook``).

(a) **Online growth**: a VM at home on the node, its VMI running in the launcher. Each round grows
    its disk by 64 MiB in the template's signed plan (one merge-patch UPDATE) and measures the time
    from sending the UPDATE to the running disk's capacity reaching the planned size, as
    ``virDomainGetBlockInfo`` on a connection of the bench's own sees it (polled every 2 ms).
    Baseline: the bare ``virDomainBlockResize`` of the same size step on that connection.
    Target: median < 2 s.
(b) **Memory**: the agent's resident set (``VmRSS``; ``VmHWM``, the peak) idle on a node with
    nothing, then with ``--vmis`` VMIs on its node. Target: < 80 MiB.
(c) **Reconcile at start** for those VMIs, from the process's start to ``/metrics`` showing every
    one handled (polled every 50 ms): first start, every VM without a home and prepare's marker in
    its directory (a home recorded per VM: a PATCH and an Event each), then a restart with every
    VM at home here (nothing to write). Baseline: one LIST of those VMIs and one of those VMs by an
    admin client.

The bench shares the machine's cores with the API server and etcd; figures are from this run only.
Needs root, libvirtd and qemu-system-x86_64 (scripts/setup.sh) and ``KUBEBUILDER_ASSETS``.
Usage: ``python -m benchmarks node [--rounds 10] [--vmis 500]`` (about 1-2 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # python benchmarks/node_bench.py
    sys.path.insert(0, str(ROOT))

from diskplan import keys as K
from tests.envtest import ASSETS_ENV, ControlPlane, start_control_plane
from tests.node_agent_support import (
    AgentProcess,
    AgentSetup,
    end_agent,
    make_agent_kubeconfig,
    make_agent_setup,
    signed_plan,
    spawn_agent,
    vm_manifest,
    vmi_manifest,
)

MiB, GiB = 1 << 20, 1 << 30
VM = "grows"
NODE_EXPAND, NODE_MANY, NODE_IDLE = "bench-node-a", "bench-node-b", "bench-node-idle"
TIMEOUT = 120.0
GROUP, VERSION = "kubevirt.io", "v1"


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def _ms(values: Sequence[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"median {statistics.median(ordered) * 1e3:8.1f} ms   p90 {p90 * 1e3:8.1f} ms"


def _proc_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB$", text, re.MULTILINE)
    if match is None:
        raise SystemExit(f"node_bench: no {field} in /proc/{pid}/status")
    return int(match.group(1))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@dataclass(frozen=True)
class Memory:
    rss_mib: float
    peak_mib: float
    cpu_s: float


def _memory(agent: AgentProcess) -> Memory:
    pid = agent.proc.pid
    return Memory(_proc_kib(pid, "VmRSS") / 1024, _proc_kib(pid, "VmHWM") / 1024, _cpu_seconds(pid))


def _metrics(agent: AgentProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the agent's ``/metrics``: (name, labels) -> value."""
    status, text = agent.get("/metrics")
    if status != 200:
        raise SystemExit(f"node_bench: /metrics answered {status}")
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def _sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
            **labels: str) -> float:
    want = frozenset(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and want <= got)


def _until(what: str, check: Callable[[], Any], agent: AgentProcess | None = None, *,
           every: float = 0.05, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if agent is not None and agent.proc.poll() is not None:
            raise SystemExit(f"node_bench: the agent exited while waiting for {what}:\n"
                             + agent.stderr_text()[-3000:])
        if time.monotonic() > deadline:
            tail = "" if agent is None else "\n" + agent.stderr_text()[-3000:]
            raise SystemExit(f"node_bench: timed out waiting for {what}{tail}")
        time.sleep(every)


def _serving_after(agent: AgentProcess, started_wall: float) -> float:
    """Seconds from the process's start to its ``serving`` log line (the line's own time stamp)."""
    line = _until("the serving line", lambda: agent.records("serving"), agent, every=0.02)[0]
    return float(line["ts"]) - started_wall


# ------------------------------------------------------------------------------------------------
# (a) online growth
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Growth:
    agent: list[float]  # UPDATE sent -> capacity seen
    update: list[float]  # the UPDATE request alone
    baseline: list[float]  # bare blockResize
    final_virsh: int
    final_file: int
    expected: int


def bench_growth(plane: ControlPlane, setup: AgentSetup, rounds: int) -> Growth:
    import libvirt
    from kubernetes import client

    from tests.libvirt_launcher import DomainDiskSpec, launcher_daemon, run_prepare, start_domain, stop_domain

    ns = plane.namespace("bench-grow")
    custom: Any = client.CustomObjectsApi(plane.api)
    with launcher_daemon() as daemon:
        prefix = daemon.root / "launcher"
        prefix.mkdir()
        proc = run_prepare(signed_plan(ns, VM, data=GiB), prefix=prefix, plan_file=daemon.root / "plan.json",
                           volumes=["data"])
        if proc.returncode != 0:
            raise SystemExit(f"node_bench: prepare failed: {proc.stderr}")
        image = prefix / K.launcher_disk_dir("data").lstrip("/") / K.disk_file_name("data")
        domain = start_domain(daemon, f"{ns}_{VM}", [DomainDiskSpec(K.disk_alias("data"), image, "vda")])
        try:
            vm = custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, "virtualmachines",
                vm_manifest(VM, signed_plan(ns, VM, data=GiB), home=NODE_EXPAND))
            custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, "virtualmachineinstances",
                vmi_manifest(vm, NODE_EXPAND, signed_plan(ns, VM, data=GiB), pod_uid=daemon.pod_uid))
            agent = spawn_agent(setup, NODE_EXPAND, host_prefix=daemon.root, kubelet_pods_dir="/kubelet/pods")
            try:
                _until("the agent's first look at the running disk",
                       lambda: agent.records("expand.result"), agent)
                dom = daemon.conn.lookupByName(domain.name)

                def capacity_reaches(want: int) -> Callable[[], bool]:
                    return lambda: int(dom.blockInfo("vda")[0]) >= want

                def results_reach(count: int) -> Callable[[], bool]:
                    return lambda: len(agent.records("expand.result")) >= count

                size, timed, update = GiB, [], []
                for i in range(rounds):
                    size += 64 * MiB
                    patch = {"spec": {"template": {"metadata": {"annotations": {
                        K.ANN_PLAN: signed_plan(ns, VM, data=size)}}}}}
                    began = time.perf_counter()
                    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "virtualmachines", VM, patch,
                                                          _content_type="application/merge-patch+json")
                    update.append(time.perf_counter() - began)
                    _until(f"round {i + 1}: the running disk at {size} bytes",
                           capacity_reaches(size), agent, every=0.002, timeout=30)
                    timed.append(time.perf_counter() - began)
                    # the agent has finished this round (its Event too) before the next UPDATE
                    _until(f"round {i + 1}: the agent's result",
                           results_reach(i + 2), agent)
                grown = [r for r in agent.records("expand.result") if r["results"][0]["outcome"] == "grown"]
                if len(grown) != rounds:
                    raise SystemExit(f"node_bench: {len(grown)} growths logged, not {rounds}")
            finally:
                end_agent(agent)
            baseline = []
            for _ in range(rounds):
                size += 64 * MiB
                began = time.perf_counter()
                dom.blockResize("vda", size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
                while int(dom.blockInfo("vda")[0]) < size:
                    time.sleep(0.002)
                baseline.append(time.perf_counter() - began)
            virsh = daemon.virsh("domblkinfo", domain.name, "vda")
            match = re.search(r"^Capacity:\s+(\d+)$", virsh, re.MULTILINE)
            info = subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(image)],
                                  check=True, capture_output=True, text=True).stdout
            return Growth(agent=timed, update=update, baseline=baseline,
                          final_virsh=int(match.group(1)) if match else -1,
                          final_file=int(json.loads(info)["virtual-size"]), expected=size)
        finally:
            stop_domain(daemon, domain)


# ------------------------------------------------------------------------------------------------
# (b), (c) many VMIs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StartRun:
    serving_s: float  # process start -> serving line
    handled_s: float  # process start -> /metrics shows every VMI (and VM) handled
    memory: Memory
    recorded: int
    reconciles: int


def _populate(plane: ControlPlane, setup: AgentSetup, count: int) -> str:
    """``count`` running VMs without a home, each with its VMI on :data:`NODE_MANY` and prepare's
    marker in its directory on the node (created by 4 client threads)."""
    from kubernetes import client

    ns = plane.namespace("bench-many")

    def one(i: int) -> None:
        custom: Any = client.CustomObjectsApi(plane.api)
        name = f"vm-{i:04d}"
        plan = signed_plan(ns, name)
        vm = custom.create_namespaced_custom_object(GROUP, VERSION, ns, "virtualmachines",
                                                    vm_manifest(name, plan))
        vmi = custom.create_namespaced_custom_object(GROUP, VERSION, ns, "virtualmachineinstances",
                                                     vmi_manifest(vm, NODE_MANY, plan))
        setup.prepare_ran(vmi, NODE_MANY)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(count)))
    return ns


def _start_run(setup: AgentSetup, count: int, *, first: bool) -> StartRun:
    started_wall = time.time()
    began = time.monotonic()
    agent = spawn_agent(setup, NODE_MANY)
    try:
        serving = _serving_after(agent, started_wall)

        def done() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            s = _metrics(agent)
            vmis = _sample(s, "diskhooks_node_home_decisions_total", source="vmi")
            vms = _sample(s, "diskhooks_node_reconciles_total", kind="vm")
            recorded = _sample(s, "diskhooks_node_homes_recorded_total")
            if first:
                ok = recorded >= count and vms >= count
            else:
                ok = _sample(s, "diskhooks_node_home_decisions_total", source="vmi",
                             outcome="already") >= count and vms >= count and vmis >= count
            return s if ok else None

        samples = _until(f"{count} VMIs handled", done, agent, timeout=300)
        handled = time.monotonic() - began
        time.sleep(1.0)  # settle: what it keeps, not a transient
        memory = _memory(agent)
        return StartRun(serving_s=serving, handled_s=handled, memory=memory,
                        recorded=int(_sample(samples, "diskhooks_node_homes_recorded_total")),
                        reconciles=int(_sample(samples, "diskhooks_node_reconciles_total")))
    finally:
        end_agent(agent)


def _idle(setup: AgentSetup) -> Memory:
    agent = spawn_agent(setup, NODE_IDLE)
    try:
        _until("/readyz", lambda: agent.get("/readyz")[0] == 200, agent)
        time.sleep(2.0)
        return _memory(agent)
    finally:
        end_agent(agent)


def _list_baseline(plane: ControlPlane, ns: str) -> float:
    from kubernetes import client

    custom: Any = client.CustomObjectsApi(plane.api)
    began = time.perf_counter()
    custom.list_namespaced_custom_object(GROUP, VERSION, ns, "virtualmachineinstances")
    custom.list_namespaced_custom_object(GROUP, VERSION, ns, "virtualmachines")
    return time.perf_counter() - began


# ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks node", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="growth rounds measured (default 10)")
    parser.add_argument("--vmis", type=int, default=500, help="VMIs on the agent's node (default 500)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.rounds < 1 or args.vmis < 1:
        parser.error("--rounds and --vmis must be at least 1")
    assets = os.environ.get(ASSETS_ENV, "")
    if not assets:
        print(f"node_bench: {ASSETS_ENV} is not set: it names the directory with etcd and kube-apiserver "
              "(KUBEBUILDER_ASSETS=$(setup-envtest use 1.36 -p path) with controller-runtime's "
              "setup-envtest; this project's CI unpacks them in .ci/run)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("node_bench: run as root (it starts a uid-107 libvirt daemon, as the tests do)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="dh-nbench-", dir="/var/tmp"))
    plane = None
    try:
        began = time.monotonic()
        plane = start_control_plane(Path(assets), work / "envtest")
        print(f"control plane up in {time.monotonic() - began:.1f} s (etcd + kube-apiserver, KubeVirt CRDs)",
              flush=True)
        setup = make_agent_setup(make_agent_kubeconfig(plane, work / "kubeconfig", role="diskhooks-node-bench"),
                                 work / "agent")

        growth = bench_growth(plane, setup, args.rounds)
        print(f"\n(a) online growth, {args.rounds} rounds of +64 MiB on a running TCG domain")
        print(f"  VM UPDATE -> grown disk seen by blockInfo  {_ms(growth.agent)}   (target < 2000 ms)")
        print(f"    of which the UPDATE request             {_ms(growth.update)}")
        print(f"  baseline: bare blockResize               {_ms(growth.baseline)}")
        ratio = statistics.median(growth.agent) / statistics.median(growth.baseline)
        print(f"  ratio agent / baseline (medians)         {ratio:8.1f}x")
        agree = growth.final_virsh == growth.final_file == growth.expected
        print(f"  final capacity: virsh domblkinfo {growth.final_virsh}, qemu-img info -U {growth.final_file} "
              f"({'agree' if agree else 'DISAGREE'} with the {growth.expected} bytes asked)")

        idle = _idle(setup)
        created = time.monotonic()
        ns = _populate(plane, setup, args.vmis)
        print(f"\n{args.vmis} VMs + {args.vmis} VMIs on {NODE_MANY} created in "
              f"{time.monotonic() - created:.1f} s (and prepare's {args.vmis} markers)", flush=True)
        listing = _list_baseline(plane, ns)
        first = _start_run(setup, args.vmis, first=True)
        again = _start_run(setup, args.vmis, first=False)

        print("\n(b) memory (target < 80 MiB)           RSS       peak     CPU")
        for label, m in (("idle, nothing on its node", idle),
                         (f"{args.vmis} VMIs, first start", first.memory),
                         (f"{args.vmis} VMIs, restart", again.memory)):
            print(f"  {label:32} {m.rss_mib:6.1f} MiB {m.peak_mib:6.1f} MiB {m.cpu_s:5.1f} s")
        print(f"  {args.vmis} VMIs over idle: +{first.memory.rss_mib - idle.rss_mib:.1f} MiB "
              f"({first.memory.rss_mib / idle.rss_mib:.2f}x)")

        print(f"\n(c) reconcile at start, {args.vmis} VMIs (from the process's start)")
        print(f"  first start: serving {first.serving_s:5.2f} s, all handled {first.handled_s:6.2f} s "
              f"({first.recorded} homes recorded: a PATCH and an Event each; {first.reconciles} keys)")
        print(f"  restart:     serving {again.serving_s:5.2f} s, all handled {again.handled_s:6.2f} s "
              f"(every VM at home already; {again.reconciles} keys)")
        print(f"  baseline: one LIST of the {args.vmis} VMIs and one of the VMs   {listing * 1e3:8.1f} ms")
        return 0
    finally:
        if plane is not None:
            plane.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
