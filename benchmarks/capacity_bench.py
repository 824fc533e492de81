"""Capacity benchmark: what the node agent's capacity pass and prepare's capacity guard cost.

Lays out a node's ``hostDisks.root`` with ``--dirs`` VM directories of two qcow2 images each (the
first made by ``qemu-img``, the others copies of it: real headers, ~200 KiB each) plus a home
marker, then measures, ``--rounds`` times each:

(a) the agent's scan of the root with every header read (a cold start; ``--drop-caches``: also with
    the page cache dropped first, as after a node's reboot);
(b) the same with the header cache warm (every pass after the first: one ``stat`` per file);
(c) a whole pass (:meth:`nodeagent.capacity.CapacityReporter.refresh`: scan, plans of 100 VMs at home
    verified, account, metrics, the summary file; the Node call answers with an error here, there is
    no API server in this benchmark);
(d) prepare's guard (:func:`hooksidecar.prepare.capacity.guard`) for a start creating one disk: the
    summary read and parsed, ``statvfs``, its VM directory scanned, the verdict.

Prints median and p90 in ms. Usage: ``python -m benchmarks capacity [--dirs 500] [--rounds 10]
[--drop-caches]``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # python benchmarks/capacity_bench.py
    sys.path.insert(0, str(ROOT))

from diskplan import keys as K
from diskplan.plan import Plan, PlanKeys, PlannedDisk, sign_plan
from diskplan.policy import load_policy
from hooksidecar.logfmt import JsonLog
from hooksidecar.prepare.actions import CreateImage
from hooksidecar.prepare.capacity import guard
from hooksidecar.prepare.imagefiles import HeaderCache
from nodeagent.capacity import CapacityReporter, scan_root
from nodeagent.metrics import AgentMetrics
from nodeagent.reconcile import Paths

GiB = 1 << 30
SIZE = 64 << 20  # each image's virtual size: small enough that the node's budget holds them all
NODE = "bench-node"
KEYS = PlanKeys(current=b"capacity-bench-plan-key-012345678")
ROOT_DIR = "/var/lib/diskhooks/vms"
POLICY = f"hostDisks:\n  root: {ROOT_DIR}\nsidecar:\n  image: ghcr.io/diskhooks/diskhooks-sidecar:0.1.0\n"


def _plan(vm: str) -> Plan:
    disks = tuple(PlannedDisk(name=n, size_bytes=SIZE, bus="virtio", cache="none", io="native",
                              discard="unmap") for n in ("data", "logs"))
    return Plan(namespace="bench", vm=vm, host_dir=f"{ROOT_DIR}/bench/{vm}", image_library=None,
                sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0", disks=disks)


def _ms(values: Sequence[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"median {statistics.median(ordered) * 1e3:8.1f} ms   p90 {p90 * 1e3:8.1f} ms   (n={len(ordered)})"


def _time(fn: Callable[[], Any], rounds: int, before: Callable[[], None] | None = None) -> list[float]:
    out = []
    for _ in range(rounds):
        if before is not None:
            before()
        began = time.perf_counter()
        fn()
        out.append(time.perf_counter() - began)
    return out


class _NoApi:
    def param_serialize(self, **kwargs: Any) -> Any:
        raise OSError("no API server in this benchmark")


class _Kube:
    api_client = _NoApi()
    events = None

    def get_vm(self, namespace: str, name: str) -> dict[str, Any]:
        return {"metadata": {"name": name}}


class _Items:
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self._items = items

    def items(self) -> list[dict[str, Any]]:
        return list(self._items)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks capacity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dirs", type=int, default=500, help="VM directories on the node (default 500)")
    parser.add_argument("--rounds", type=int, default=10, help="measurements per case (default 10)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="also scan after dropping the page cache (root; slows the whole machine briefly)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.rounds < 1 or args.dirs < 1:
        parser.error("--rounds and --dirs must be at least 1")
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise SystemExit("capacity_bench: qemu-img is required (scripts/setup.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="capacity-bench-") as tmp:
        host = Path(tmp) / "host"
        root = host / ROOT_DIR.lstrip("/")
        template = Path(tmp) / "template.qcow2"
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(template), str(SIZE)], check=True)
        for i in range(args.dirs):
            d = root / "bench" / f"vm{i:04d}"
            d.mkdir(parents=True)
            for name in ("data", "logs"):
                shutil.copyfile(template, d / f"{name}.qcow2")
            (d / K.HOME_MARKER).write_text("{}")
        files = 2 * args.dirs
        print(f"node root: {args.dirs} VM directories, {files} qcow2 images", flush=True)

        def drop_caches() -> None:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")

        cold = _time(lambda: scan_root(str(root)), args.rounds)
        print(f"(a) scan, every header read (page cache warm): {_ms(cold)}", flush=True)
        if args.drop_caches:
            dropped = _time(lambda: scan_root(str(root)), min(args.rounds, 3), before=drop_caches)
            print(f"    the same after dropping the page cache:  {_ms(dropped)}", flush=True)
        cache = HeaderCache()
        scan_root(str(root), cache)
        warm = _time(lambda: scan_root(str(root), cache), args.rounds)
        print(f"(b) scan, header cache warm:                   {_ms(warm)}", flush=True)

        homed = []
        for i in range(min(100, args.dirs)):
            vm = f"vm{i:04d}"
            homed.append({"metadata": {"name": vm, "namespace": "bench", "annotations": {K.ANN_NODE: NODE},
                                       "labels": {K.LABEL_NODE: NODE}},
                          "spec": {"template": {"metadata": {"annotations": {
                              K.ANN_PLAN: sign_plan(_plan(vm), KEYS)}}}}})
        policy = load_policy(POLICY)
        reporter = CapacityReporter(node=NODE, kube=_Kube(), policy=lambda: policy,  # type: ignore[arg-type]
                                    plan_keys=lambda: KEYS, paths=Paths(str(host), "/var/lib/kubelet/pods"),
                                    vmis=_Items([]), vms=_Items(homed), registry=AgentMetrics(NODE).registry,
                                    log=JsonLog(io.StringIO()))
        account = reporter.refresh()
        assert account is not None and len(account.dirs) == args.dirs
        passes = _time(reporter.refresh, args.rounds)
        print(f"(c) a whole pass (warm):                       {_ms(passes)}", flush=True)
        summary = root / K.CAPACITY_SUBDIR / K.CAPACITY_SUMMARY
        print(f"    summary file: {summary.stat().st_size} bytes", flush=True)

        # the launcher's view, as copies (in a launcher: bind mounts of the same directories)
        view = Path(tmp) / "launcher"
        shutil.copytree(root / "bench" / "vm0000", view / K.LAUNCHER_VM_DIR.lstrip("/"))
        shutil.copytree(root / K.CAPACITY_SUBDIR, view / K.LAUNCHER_CAPACITY.lstrip("/"))
        plan = _plan("vm0000")
        actions = [CreateImage("new", "/var/run/kubevirt-private/vmi-disks/new/new.qcow2", SIZE)]
        now = datetime.datetime.now(datetime.UTC)
        checked = guard(plan, actions, prefix=str(view), node=NODE, capacity=policy.host_disks.capacity, now=now)
        assert checked.verdict is not None, checked.report
        guards = _time(lambda: guard(plan, actions, prefix=str(view), node=NODE,
                                     capacity=policy.host_disks.capacity, now=now), args.rounds)
        print(f"(d) prepare's guard (summary of {args.dirs} dirs): {_ms(guards)}  -> {checked.report['result']}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
