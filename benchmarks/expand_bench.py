"""Online expansion benchmark: what one ``nodeagent.expand.expand_online`` call costs on a real launcher.

Starts the tests' launcher-shaped libvirt (``tests/libvirt_launcher.py``: an unprivileged session
``libvirtd`` as uid 107 with its socket in a kubelet-like ``libvirt-runtime`` directory, a TCG
domain on a qcow2 image made by ``diskhooks-sidecar prepare``) and measures, ``--rounds`` times each:

(a) a growth: connect as root, read the domain XML and the capacity, ``blockResize`` by 64 MiB,
    read the capacity back, close (the call the agent makes when a VM's plan grows a disk);
(b) a call with nothing to do (the disk is already at the planned size): connect, read, close;

and once: the daemon's start (exec to the first answered connection) and the domain's start
(``createXML``, QEMU's capabilities probed on this first domain). Prints median and p90 in ms.
Needs root, ``libvirtd`` and ``qemu-system-x86_64`` (scripts/setup.sh installs them).

Usage: ``python -m benchmarks expand [--rounds 10]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # python benchmarks/expand_bench.py
    sys.path.insert(0, str(ROOT))

from diskplan import keys as K
from diskplan.plan import Plan, PlanKeys, PlannedDisk, sign_plan
from nodeagent.expand import GrowResult, expand_online, launcher_socket
from tests.libvirt_launcher import DomainDiskSpec, launcher_daemon, run_prepare, start_domain

MiB, GiB = 1 << 20, 1 << 30
NAMESPACE, VM = "bench", "vm01"
DOMAIN = f"{NAMESPACE}_{VM}"


def _plan(size: int) -> Plan:
    disk = PlannedDisk(name="data", size_bytes=size, bus="virtio", cache="none", io="native", discard="unmap")
    return Plan(namespace=NAMESPACE, vm=VM, host_dir=f"/var/lib/diskhooks/vms/{NAMESPACE}/{VM}",
                image_library=None, sidecar_image="bench", disks=(disk,))


def _ms(values: Sequence[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"median {statistics.median(ordered) * 1e3:7.1f} ms   p90 {p90 * 1e3:7.1f} ms   (n={len(ordered)})"


def _timed(plan: Plan, socket_path: str, expect: str) -> float:
    began = time.perf_counter()
    results = expand_online(plan, socket_path=socket_path, domain_name=DOMAIN)
    took = time.perf_counter() - began
    if [r.outcome for r in results] != [expect]:
        raise SystemExit(f"expand_bench: expected {expect}, got {results}")
    return took


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks expand", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="calls measured per case (default 10)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    with launcher_daemon() as daemon:
        prefix = daemon.root / "launcher"
        prefix.mkdir()
        proc = run_prepare(sign_plan(_plan(GiB), PlanKeys(current=b"expand-bench-plan-key-0123456789")),
                           prefix=prefix, plan_file=daemon.root / "plan.json", volumes=["data"])
        if proc.returncode != 0:
            raise SystemExit(f"expand_bench: prepare failed: {proc.stderr}")
        image = prefix / K.launcher_disk_dir("data").lstrip("/") / K.disk_file_name("data")
        domain = start_domain(daemon, DOMAIN, [DomainDiskSpec(K.disk_alias("data"), image, "vda")])
        socket_path = launcher_socket(str(daemon.pods_dir), daemon.pod_uid)
        assert socket_path is not None
        size = GiB
        grow, noop = [], []
        for _ in range(args.rounds):
            size += 64 * MiB
            grow.append(_timed(_plan(size), socket_path, "grown"))
            noop.append(_timed(_plan(size), socket_path, "already"))
        last: GrowResult = expand_online(_plan(size), socket_path=socket_path, domain_name=DOMAIN)[0]
        print(f"daemon start (exec -> first answer)   {daemon.started_in * 1e3:7.1f} ms")
        print(f"domain start (createXML, first domain) {domain.started_in * 1e3:7.1f} ms")
        print(f"expand_online, grow by 64 MiB         {_ms(grow)}")
        print(f"expand_online, already at size        {_ms(noop)}")
        print(f"final capacity {last.after} bytes ({(last.after or 0) / GiB:.2f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
