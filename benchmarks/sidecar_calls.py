"""The sidecar benchmark's client side: ``OnDefineDomain`` calls over the socket as virt-launcher
makes them (a new channel, or a new connection, per call), the sidecar-shim model's fresh process
per call, and the measurements built on them: a server kind's starts, memory and call latencies
(sections (a)-(d) of ``benchmarks/sidecar_bench.py``) and a fresh sidecar's memory around one call
on the largest accepted domain (section (e)); the medians and p99 the report prints.
"""

from __future__ import annotations

import functools
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.sidecar_servers import Interp, Server, sidecar_args, status_kib
from benchmarks.sidecar_workload import ROOT, Workload, largest_domain

SHIM_CODE = """\
import sys
from hooksidecar.callback import on_define_domain
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
out = on_define_domain(args["--domain"].encode(), args["--vmi"].encode(), path_prefix=args["--path-prefix"])
sys.stdout.buffer.write(out)
sys.stdout.flush()
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")]
sys.stderr.write("VmHWM=" + hwm[0] + chr(10))
"""


def on_define_over_socket(target: str, workload: Workload, *, new_connection: bool = False) -> bytes:
    """As virt-launcher does: a new channel for the call. grpcio lets channels to the same target
    share a connection (its global subchannel pool), which virt-launcher's Go client never does;
    ``new_connection`` gives the channel a pool of its own, so every call connects anew."""
    import grpc

    from hooksidecar._pb import v1alpha3_pb2

    options = [("grpc.use_local_subchannel_pool", 1)] if new_connection else []
    with grpc.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary("/kubevirt.hooks.v1alpha3.Callbacks/OnDefineDomain",
                                   request_serializer=v1alpha3_pb2.OnDefineDomainParams.SerializeToString,
                                   response_deserializer=v1alpha3_pb2.OnDefineDomainResult.FromString)
        result = call(v1alpha3_pb2.OnDefineDomainParams(domainXML=workload.domain, vmi=workload.vmi),
                      timeout=60, wait_for_ready=True)
    return bytes(result.domainXML)


def timed(fn: Callable[[], Any], n: int) -> tuple[list[float], Any]:
    out: Any = None
    times = []
    for _ in range(n):
        began = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - began)
    return times, out


def shim_call(workload: Workload, interp: Interp) -> tuple[bytes, int]:
    """One fresh-process call: its answer and the process's peak RSS (KiB)."""
    res = subprocess.run([sys.executable, *interp.flags, "-c", SHIM_CODE, "--vmi", workload.vmi.decode(),
                          "--domain", workload.domain.decode(), "--path-prefix", str(workload.prefix)],
                         check=False, cwd=ROOT, env=interp.env, capture_output=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"shim call failed: {res.stderr.decode()[-2000:]}")
    return res.stdout, int(res.stderr.split(b"VmHWM=")[-1].split()[0])


def p50(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def p99(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[98]


@dataclass
class ServerRun:
    """One server kind under one interpreter mode: start times, memory, call latencies."""

    ready: list[float]
    stop: list[float]
    idle: dict[str, int]
    after: dict[str, int]
    calls: list[float]
    fresh: list[float]  # the same calls, each on a new connection
    answer: bytes


def measure_server(make_args: Callable[[Path], tuple[list[str], Path]], interp: Interp, *, workdir: Path,
                   workload: Workload, starts: int, calls: int, log: Path,
                   removes_socket: bool) -> ServerRun:
    """``starts`` + 1 starts: the first only warms the caches; the last one also serves the calls."""
    ready: list[float] = []
    stops: list[float] = []
    idle: dict[str, int] = {}
    after: dict[str, int] = {}
    call_times: list[float] = []
    fresh_times: list[float] = []
    answer = b""
    for n in range(starts + 1):
        sock_dir = Path(tempfile.mkdtemp(dir=workdir))
        args, sock = make_args(sock_dir)
        server = Server(args, sock, interp, log)
        try:
            seconds = server.wait_ready()
            if n == starts:
                time.sleep(0.2)
                idle = status_kib(server.proc.pid)
                call = functools.partial(on_define_over_socket, f"unix://{sock}", workload)
                timed(call, 20)  # warm-up
                call_times, answer = timed(call, calls)
                fresh = functools.partial(on_define_over_socket, f"unix://{sock}", workload,
                                          new_connection=True)
                fresh_times, fresh_answer = timed(fresh, calls)
                if fresh_answer != answer:
                    raise RuntimeError(f"{args[:3]} answered differently on a new connection")
                after = status_kib(server.proc.pid)
        finally:
            stop = server.stop()
        if n > 0:
            ready.append(seconds)
            stops.append(stop)
        if removes_socket and sock.exists():
            raise RuntimeError(f"{args[:3]} left its socket {sock} behind")
    return ServerRun(ready=ready, stop=stops, idle=idle, after=after, calls=call_times, fresh=fresh_times,
                     answer=answer)


@dataclass
class OneCall:
    """A fresh sidecar's memory around one call on the largest accepted domain: ``idle`` once
    ready, ``before`` after a few calls on the workload's domain, ``after`` as soon as the answer is
    in, ``settled`` a moment later (the server has finished its side of the call: sent, logged,
    given memory back)."""

    kind: str
    domain_bytes: int
    disks: int
    idle: dict[str, int]
    before: dict[str, int]
    after: dict[str, int]
    settled: dict[str, int]
    tree: str = ""  # "" for this checkout, else the --compare-tree directory


def measure_one_large_call(kind: str, interp: Interp, *, workdir: Path, workload: Workload,
                           log: Path, tree: Path = ROOT) -> OneCall:
    domain = largest_domain(workload.domain, kind)
    sock_dir = Path(tempfile.mkdtemp(dir=workdir))
    target = f"unix://{sock_dir / 'diskhooks.sock'}"
    server = Server(sidecar_args(sock_dir, workload.prefix), sock_dir / "diskhooks.sock", interp, log, tree)
    try:
        server.wait_ready()
        time.sleep(0.2)
        idle = status_kib(server.proc.pid)
        for _ in range(5):
            on_define_over_socket(target, workload)
        time.sleep(0.2)
        before = status_kib(server.proc.pid)
        out = on_define_over_socket(target, Workload(prefix=workload.prefix, vmi=workload.vmi, domain=domain,
                                                     plan=workload.plan))
        if b"almalinux-9.qcow2" not in out:
            raise RuntimeError("the large domain was answered without the plan applied")
        after = status_kib(server.proc.pid)
        time.sleep(0.3)
        settled = status_kib(server.proc.pid)
    finally:
        server.stop()
    return OneCall(kind=kind, domain_bytes=len(domain), disks=domain.count(b"<disk "), idle=idle, before=before,
                   after=after, settled=settled, tree="" if tree == ROOT else str(tree))
