"""Hook-sidecar benchmark: the real sidecar against KubeVirt's sidecar-shim model and a bare gRPC
server, in one run, on KubeVirt's sample ``05-vm-mixed-smbios`` with a diskhooks plan (two qcow2
host disks, one an overlay on a library base; real images made by ``qemu-img`` under a temporary
``--path-prefix``, so every call checks real image headers).

Measured:

(a) ``OnDefineDomain`` over the unix socket against ``python -m hooksidecar.cli serve``, a **new
    channel per call** as virt-launcher dials one per call (``--calls``, after a warm-up); grpcio
    lets such channels share a connection now and then, so the same calls are also made on a **new
    connection each** (a channel with its own subchannel pool), as virt-launcher's Go client does,
    against the sidecar and the bare server;
(b) the baseline, KubeVirt's sidecar-shim model: a **fresh Python process per call** that gets
    ``--vmi`` and ``--domain`` as command-line arguments (as the shim passes them), imports
    ``hooksidecar.callback`` and makes the same edit (``--shim-calls``); its answer is checked to be
    the sidecar's, byte for byte;
(c) peak RSS (``VmHWM`` of ``/proc/<pid>/status``) of the sidecar when idle and after all the calls,
    against a bare grpcio server (same thread pool, an echo handler, ``lxml`` imported) idle and
    after the same calls; the sidecar serves with its default transport (``h2``, pure-Python
    HTTP/2) and, as a comparison row, with ``--transport grpcio`` (as-is mode only);
(d) start-to-ready: from ``Popen`` to the first ``Info`` answer (``--starts`` starts each, median),
    sidecar and bare server;
(e) peak RSS of a fresh sidecar (default transport) after **one** ``OnDefineDomain`` call on the
    largest domain XML it accepts (``xmlsafe.MAX_DOMAIN_XML_BYTES``): the workload's domain grown
    with more disks (what a big VM looks like), and the worst case for memory, the same size of
    empty elements (the most nodes per byte). Target: well under KubeVirt's 64M sidecar limit;
(f) a new connection per call, **interleaved**: the sidecar, the bare server and the sidecar's
    transport alone (``H2GrpcServer`` with an echo handler: what is left is the HTTP/2 and gRPC
    work) (and, with ``--compare-tree DIR``, repeatable, the sidecar and the transport of another
    checkout of this repository, e.g. an earlier commit from ``git archive``) serve at the same
    time and take turns, rounds of 50 calls each, so a change in the machine's load hits them
    all alike; per server the median and p99, the
    ratio of its median to the bare server's, and the **server's CPU time per call** (user +
    system of all its threads, ``/proc/<pid>/stat``): the part of a call spent in the server
    process, apart from the client's.

Every child runs the same interpreter. By default the children share a fresh bytecode cache
(``PYTHONPYCACHEPREFIX`` in the run's temporary directory, warmed before measuring) the way an
image ships compiled ``.pyc`` files; ``--no-bytecode-cache`` keeps the environment as it is (this
machine sets ``PYTHONDONTWRITEBYTECODE``, so every start then compiles diskhooks from source).
The client shares the 2 cores with the servers: read the ratios. Targets are printed, never
asserted: (a) >= 20x faster than (b), (c) < 40 MiB, (d) < 1 s, (e) < 48 MiB, (f) new connection
< 1.5 ms. Stops by itself (~40 s with ``--calls 1000``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "data" / "kubevirt" / "samples"
SAMPLE = SAMPLES / "05-vm-mixed-smbios"
if str(ROOT) not in sys.path:  # python benchmarks/sidecar_bench.py
    sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024
GiB = 1024 * MiB
LAUNCHER_DISKS = "/var/run/kubevirt-private/vmi-disks"
LAUNCHER_LIBRARY = "/var/run/kubevirt-private/diskhooks/images"
BASE_FILE = "almalinux-9.qcow2"

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

BARE_SERVER_CODE = """\
import sys
from concurrent import futures
import grpc
from lxml import etree
if sys.argv[2:] == ["protobuf"]:  # what serving with the generated modules would load on top
    from hooksidecar._pb import info_pb2, v1alpha1_pb2, v1alpha2_pb2, v1alpha3_pb2
def echo(request, context):
    return request
handler = grpc.method_handlers_generic_handler(
    "kubevirt.hooks.v1alpha3.Callbacks",
    {"OnDefineDomain": grpc.unary_unary_rpc_method_handler(echo)})
info = grpc.method_handlers_generic_handler(
    "kubevirt.hooks.info.Info", {"Info": grpc.unary_unary_rpc_method_handler(lambda r, c: b"")})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler, info])
server.add_insecure_port("unix://" + sys.argv[1])
server.start()
server.wait_for_termination()
"""

ECHO_SERVER_CODE = """\
import sys, time
from hooksidecar.h2grpc import H2GrpcServer
server = H2GrpcServer(sys.argv[1], {"/kubevirt.hooks.v1alpha3.Callbacks/OnDefineDomain": lambda r: r,
                                    "/kubevirt.hooks.info.Info/Info": lambda r: b""})
server.start()
while True:
    time.sleep(3600)
"""


# ------------------------------------------------------------------------------------------------
# the sample with a plan
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    prefix: Path
    vmi: bytes
    domain: bytes
    plan: str  # the signed plan: the VMI's annotation and the sidecar's DISKHOOKS_PLAN


def build_workload(workdir: Path) -> Workload:
    """Sample 05's launcher VMI and first-call domain, with a signed plan for ``scratch`` (qcow2)
    and ``logs`` (qcow2 overlay on a library base), and the images (and base record) prepare would
    leave."""
    from diskplan import keys as K
    from diskplan.plan import Backing, Plan, PlanKeys, PlannedDisk, sign_plan

    host_dir = "/var/lib/diskhooks/vms/team-a/mixed"
    plan = Plan(
        namespace="team-a", vm="mixed", host_dir=host_dir, image_library="/var/lib/diskhooks/images",
        sidecar_image="ghcr.io/diskhooks/diskhooks-sidecar:0.1.0",
        disks=(PlannedDisk(name="scratch", size_bytes=20 * GiB, bus="sata", cache="none", io="native",
                           discard="unmap"),
               PlannedDisk(name="logs", size_bytes=10 * GiB, bus="scsi", cache="none", io="native",
                           discard="unmap", backing=Backing(image="almalinux-9", file=BASE_FILE,
                                                            format="qcow2"))))
    vmi = json.loads(SAMPLE.with_name(SAMPLE.name + ".launcher-vmi.json").read_bytes())
    plan_text = sign_plan(plan, PlanKeys(b"bench-plan-key-0123456789"))
    vmi["metadata"]["annotations"][K.ANN_PLAN] = plan_text
    for volume in vmi["spec"]["volumes"]:
        if volume["name"] in ("scratch", "logs"):
            volume["hostDisk"] = {"path": f"{host_dir}/{volume['name']}.qcow2", "type": "DiskOrCreate",
                                  "capacity": volume["hostDisk"]["capacity"]}
    domain = (SAMPLE.with_name(SAMPLE.name + ".domain.first-call.xml").read_bytes()
              .replace(b"vmi-disks/scratch/scratch.raw", b"vmi-disks/scratch/scratch.qcow2")
              .replace(b"vmi-disks/logs/disk.img", b"vmi-disks/logs/logs.qcow2"))
    prefix = workdir / "prefix"
    for vol in ("scratch", "logs"):
        (prefix / LAUNCHER_DISKS.lstrip("/") / vol).mkdir(parents=True)
    (prefix / LAUNCHER_LIBRARY.lstrip("/")).mkdir(parents=True)
    qemu = shutil.which("qemu-img")
    if qemu is None:
        raise SystemExit("qemu-img is missing: apt-get install -y qemu-utils")

    def img(*args: str) -> None:
        subprocess.run([qemu, "create", "-q", "-f", "qcow2", *args], check=True, timeout=30)

    img(str(prefix / LAUNCHER_LIBRARY.lstrip("/") / BASE_FILE), "1G")
    img(str(prefix / LAUNCHER_DISKS.lstrip("/") / "scratch" / "scratch.qcow2"), "20G")
    from hooksidecar.prepare import make_base_record

    logs = plan.disks[1]
    (prefix / LAUNCHER_DISKS.lstrip("/") / "logs" / logs.base_record).write_text(  # record first
        json.dumps(make_base_record(logs, str(prefix / LAUNCHER_LIBRARY.lstrip("/") / BASE_FILE))))
    img("-u", "-F", "qcow2", "-b", f"{LAUNCHER_LIBRARY}/{BASE_FILE}",
        str(prefix / LAUNCHER_DISKS.lstrip("/") / "logs" / "logs.qcow2"), "10G")
    return Workload(prefix=prefix, vmi=json.dumps(vmi).encode(), domain=domain, plan=plan_text)


# ------------------------------------------------------------------------------------------------
# processes and calls
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interp:
    """How a child interpreter is started: as this machine starts Python, or without ``site``."""

    label: str
    flags: tuple[str, ...]
    env: dict[str, str]


def interpreters(pycache: Path | None, plan: str) -> list[Interp]:
    """``as-is``: the environment as it is. ``no-site``: ``python -S`` with the same sys.path,
    which leaves out what this machine's ``site`` does at every start (a sandbox ``.pth`` that
    imports ``certifi``, ~30 ms and ~5 MiB here) and a container image would not do. Both carry
    ``DISKHOOKS_PLAN``, the verified plan the Pod mutation gives the sidecar container (the other
    children ignore it)."""
    env = dict(os.environ)
    env["DISKHOOKS_PLAN"] = plan
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    site_dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    clean = dict(env)
    clean["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], *site_dirs])
    return [Interp("as-is", (), env), Interp("no-site", ("-S",), clean)]


def status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "Threads"):
                out[key] = int(value.split()[0])
    return out


class Server:
    """A server process on a unix socket; stopped by pid (SIGTERM, then SIGKILL)."""

    def __init__(self, args: list[str], socket_path: Path, interp: Interp, log: Path,
                 tree: Path = ROOT) -> None:
        self.socket_path = socket_path
        self.label = " ".join(args[:3])[:80]
        self.started = time.perf_counter()
        with open(log, "ab") as handle:
            self.proc = subprocess.Popen([sys.executable, *interp.flags, *args], cwd=tree, env=interp.env,
                                         stdout=subprocess.DEVNULL, stderr=handle)
        self.log = log

    def wait_ready(self, timeout: float = 20.0) -> float:
        """Seconds from Popen to the first Info answer."""
        import grpc

        from hooksidecar._pb import info_pb2

        target = f"unix://{self.socket_path}"
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            if self.socket_path.exists():
                try:
                    with grpc.insecure_channel(target) as channel:
                        channel.unary_unary("/kubevirt.hooks.info.Info/Info",
                                            request_serializer=info_pb2.InfoParams.SerializeToString,
                                            response_deserializer=info_pb2.InfoResult.FromString,
                                            )(info_pb2.InfoParams(), timeout=0.2)
                    return time.perf_counter() - self.started
                except grpc.RpcError:
                    pass
            time.sleep(0.002)
        raise RuntimeError(f"not ready within {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> float:
        """Seconds from SIGTERM to exit."""
        began = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return time.perf_counter() - began


def sidecar_args(socket_dir: Path, prefix: Path, *extra: str) -> list[str]:
    return ["-m", "hooksidecar.cli", "serve", "--socket-dir", str(socket_dir), "--path-prefix", str(prefix),
            *extra]


def bare_args(socket_path: Path, *extra: str) -> list[str]:
    return ["-c", BARE_SERVER_CODE, str(socket_path), *extra]


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


def largest_domain(domain: bytes, kind: str) -> bytes:
    """``domain`` grown to just under the sidecar's bound: with copies of an unplanned disk
    (``disks``) or with empty elements (``empty``, the most lxml nodes per byte)."""
    from hooksidecar.xmlsafe import MAX_DOMAIN_XML_BYTES

    room = MAX_DOMAIN_XML_BYTES - len(domain) - 64
    if kind == "disks":
        start = domain.index(b"<disk ")
        one = b"\n\t\t" + domain[start:domain.index(b"</disk>", start) + 7].replace(b'name="ua-', b'name="ux-')
        pad = one * (room // len(one))
    else:
        pad = b"<x>" + b"<a/>" * ((room - 7) // 4) + b"</x>"
    at = domain.index(b"</devices>")
    return domain[:at] + pad + domain[at:]


@dataclass
class OneCall:
    """A fresh sidecar's memory around one call on the largest accepted domain."""

    kind: str
    domain_bytes: int
    disks: int
    idle: dict[str, int]
    after: dict[str, int]


def measure_one_large_call(kind: str, interp: Interp, *, workdir: Path, workload: Workload,
                           log: Path) -> OneCall:
    domain = largest_domain(workload.domain, kind)
    sock_dir = Path(tempfile.mkdtemp(dir=workdir))
    server = Server(sidecar_args(sock_dir, workload.prefix), sock_dir / "diskhooks.sock", interp, log)
    try:
        server.wait_ready()
        time.sleep(0.2)
        idle = status_kib(server.proc.pid)
        out = on_define_over_socket(f"unix://{sock_dir / 'diskhooks.sock'}",
                                    Workload(prefix=workload.prefix, vmi=workload.vmi, domain=domain,
                                             plan=workload.plan))
        if b"almalinux-9.qcow2" not in out:
            raise RuntimeError("the large domain was answered without the plan applied")
        after = status_kib(server.proc.pid)
    finally:
        server.stop()
    return OneCall(kind=kind, domain_bytes=len(domain), disks=domain.count(b"<disk "), idle=idle, after=after)


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Interleaved:
    """One server's share of the interleaved new-connection calls (f)."""

    label: str
    times: list[float]
    cpu: float  # the server process's CPU seconds over those calls
    after: dict[str, int]


ROUND = 50


def measure_interleaved(kinds: list[tuple[str, list[str], Path, Interp, Path]], *, workdir: Path,
                        workload: Workload, calls: int, log: Path) -> list[Interleaved]:
    """``kinds``: (label, args, socket path, interpreter, tree). Every server is started, warmed,
    then they take turns: rounds of :data:`ROUND` calls each on a new connection per call."""
    for _, args, sock, interp, tree in kinds:  # a first start fills the bytecode cache (peak RSS)
        warm = Server(args, sock, interp, log, tree)
        try:
            warm.wait_ready()
        finally:
            warm.stop()
            sock.unlink(missing_ok=True)  # the bare and echo servers leave theirs
    servers: list[Server] = []
    try:
        for _, args, sock, interp, tree in kinds:
            servers.append(Server(args, sock, interp, log, tree))
        results: list[Interleaved] = []
        for server in servers:
            server.wait_ready()
            call = functools.partial(on_define_over_socket, f"unix://{server.socket_path}", workload,
                                     new_connection=True)
            timed(call, 20)  # warm-up
            results.append(Interleaved(label=kinds[len(results)][0], times=[], cpu=0.0, after={}))
        done = 0
        while done < calls:
            n = min(ROUND, calls - done)
            for server, result in zip(servers, results, strict=True):
                call = functools.partial(on_define_over_socket, f"unix://{server.socket_path}", workload,
                                         new_connection=True)
                began = cpu_seconds(server.proc.pid)
                times, _ = timed(call, n)
                result.cpu += cpu_seconds(server.proc.pid) - began
                result.times.extend(times)
            done += n
        for server, result in zip(servers, results, strict=True):
            result.after = status_kib(server.proc.pid)
        return results
    finally:
        for server in servers:
            server.stop()


# ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks sidecar",
                                     description="hook sidecar vs sidecar-shim model vs bare grpc server")
    parser.add_argument("--calls", type=int, default=300, help="OnDefineDomain calls over the socket (300)")
    parser.add_argument("--shim-calls", type=int, default=30, help="fresh-process calls per mode (30)")
    parser.add_argument("--starts", type=int, default=5, help="starts timed per server and mode (5)")
    parser.add_argument("--compare-tree", type=Path, action="append", metavar="DIR",
                        help="(f) also serve the sidecar from this checkout (e.g. an earlier commit); repeatable")
    parser.add_argument("--interleaved-only", action="store_true",
                        help="measure (f) only (a few seconds per 1000 calls and server)")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="children run with this environment as it is (see the module docstring)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if min(args.calls, args.shim_calls, args.starts) < 1:
        parser.error("counts must be at least 1")

    from hooksidecar.callback import on_define_domain

    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="dh-sbench-", dir="/tmp"))
    try:
        workload = build_workload(workdir)
        modes = interpreters(None if args.no_bytecode_cache else workdir / "pyc", workload.plan)
        log = workdir / "servers.log"
        expected = on_define_domain(workload.domain, workload.vmi, path_prefix=str(workload.prefix))
        assert expected != workload.domain, "the plan changed nothing: the benchmark would measure nothing"
        core_times, _ = timed(lambda: on_define_domain(workload.domain, workload.vmi,
                                                       path_prefix=str(workload.prefix)), 200)

        def sidecar(sock_dir: Path) -> tuple[list[str], Path]:
            return sidecar_args(sock_dir, workload.prefix), sock_dir / "diskhooks.sock"

        def sidecar_grpcio(sock_dir: Path) -> tuple[list[str], Path]:
            return (sidecar_args(sock_dir, workload.prefix, "--transport", "grpcio"),
                    sock_dir / "diskhooks.sock")

        def bare(sock_dir: Path) -> tuple[list[str], Path]:
            return bare_args(sock_dir / "bare.sock"), sock_dir / "bare.sock"

        def bare_protobuf(sock_dir: Path) -> tuple[list[str], Path]:
            return bare_args(sock_dir / "bare.sock", "protobuf"), sock_dir / "bare.sock"

        runs: dict[tuple[str, str], ServerRun] = {}
        shims: dict[str, tuple[list[float], int]] = {}
        large: list[OneCall] = []
        for mode in modes if not args.interleaved_only else ():
            shim_call(workload, mode)  # warm the bytecode cache
            times, (out, _) = timed(functools.partial(shim_call, workload, mode), args.shim_calls)
            if out != expected:
                raise RuntimeError("the fresh-process answer differs from the in-process one")
            shims[mode.label] = (times, max(shim_call(workload, mode)[1] for _ in range(3)))
            kinds = [("sidecar", sidecar), ("bare", bare)]
            if mode.label == "as-is":
                kinds += [("bare+protobuf", bare_protobuf), ("sidecar-grpcio", sidecar_grpcio)]
            for name, make in kinds:
                runs[(name, mode.label)] = measure_server(make, mode, workdir=workdir, workload=workload,
                                                          starts=args.starts, calls=args.calls, log=log,
                                                          removes_socket=name.startswith("sidecar"))
            for name in ("sidecar", "sidecar-grpcio"):
                if (name, mode.label) in runs and runs[(name, mode.label)].answer != expected:
                    raise RuntimeError(f"the {name} answer differs from the in-process one")
        if not args.interleaved_only:
            large = [measure_one_large_call(kind, modes[0], workdir=workdir, workload=workload, log=log)
                     for kind in ("disks", "empty")]
        inter_kinds = []
        trees = [("", ROOT)] + [(f" from {tree}", tree) for tree in args.compare_tree or ()]
        for label, args_of, tree in [("diskhooks sidecar", "sidecar", ROOT), ("bare grpc echo server", "bare", ROOT),
                                     *((f"h2grpc echo server{suffix}", "echo", tree) for suffix, tree in trees),
                                     *((f"sidecar{suffix}", "sidecar", tree) for suffix, tree in trees[1:])]:
            sock_dir = Path(tempfile.mkdtemp(dir=workdir))
            interp = modes[0]
            if tree != ROOT:
                env = dict(interp.env)
                env["PYTHONPATH"] = os.pathsep.join([str(tree), *interp.env["PYTHONPATH"].split(os.pathsep)[1:]])
                interp = Interp(interp.label, interp.flags, env)
            if args_of == "bare":
                inter_kinds.append((label, bare_args(sock_dir / "bare.sock"), sock_dir / "bare.sock", interp, tree))
            elif args_of == "echo":
                inter_kinds.append((label, ["-c", ECHO_SERVER_CODE, str(sock_dir / "echo.sock")],
                                    sock_dir / "echo.sock", interp, tree))
            else:
                inter_kinds.append((label, sidecar_args(sock_dir, workload.prefix), sock_dir / "diskhooks.sock",
                                    interp, tree))
        interleaved = measure_interleaved(inter_kinds, workdir=workdir, workload=workload, calls=args.calls,
                                          log=log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    if args.interleaved_only:
        print(f"pure core in-process (on_define_domain): median {p50(core_times) * 1000:.3f} ms")
        report_interleaved(interleaved)
        print(f"(total {time.monotonic() - began:.0f} s)")
        return 0
    report(args, runs=runs, shims=shims, core_times=core_times, large=large, interleaved=interleaved,
           seconds=time.monotonic() - began)
    return 0


def report(args: argparse.Namespace, *, runs: dict[tuple[str, str], ServerRun],
           shims: dict[str, tuple[list[float], int]], core_times: list[float], large: list[OneCall],
           interleaved: list[Interleaved], seconds: float) -> None:
    ms = 1000.0
    side, bare = runs[("sidecar", "as-is")], runs[("bare", "as-is")]
    print(f"sample {SAMPLE.name} + plan (2 qcow2 disks, one on a backing base; image headers checked on "
          f"every call); python {sys.version.split()[0]}; children "
          f"{'without a bytecode cache' if args.no_bytecode_cache else 'with a warmed bytecode cache'}; "
          "'no-site' = python -S (see docstring)")
    print()
    print(f"{'OnDefineDomain latency':50} {'calls':>6} {'median ms':>10} {'p99 ms':>8}")
    grpcio_side = runs[("sidecar-grpcio", "as-is")]
    print(f"{'(a) sidecar over the socket, new channel per call':50} {args.calls:6d} "
          f"{p50(side.calls) * ms:10.2f} {p99(side.calls) * ms:8.2f}")
    print(f"{'    same, sidecar --transport grpcio':50} {args.calls:6d} "
          f"{p50(grpcio_side.calls) * ms:10.2f} {p99(grpcio_side.calls) * ms:8.2f}")
    print(f"{'    same, a new connection per call (as Go dials)':50} {args.calls:6d} "
          f"{p50(side.fresh) * ms:10.2f} {p99(side.fresh) * ms:8.2f}")
    for label, (times, _) in shims.items():
        print(f"{'(b) shim model: fresh python per call, ' + label:50} {args.shim_calls:6d} "
              f"{p50(times) * ms:10.2f} {p99(times) * ms:8.2f}")
    print(f"{'    bare grpc echo server, new channel per call':50} {args.calls:6d} "
          f"{p50(bare.calls) * ms:10.2f} {p99(bare.calls) * ms:8.2f}")
    print(f"{'    bare grpc echo server, new connection per call':50} {args.calls:6d} "
          f"{p50(bare.fresh) * ms:10.2f} {p99(bare.fresh) * ms:8.2f}")
    print(f"{'    pure core in-process (on_define_domain)':50} {len(core_times):6d} "
          f"{p50(core_times) * ms:10.3f} {p99(core_times) * ms:8.3f}")
    ratios = {label: p50(times) / p50(side.calls) for label, (times, _) in shims.items()}
    worst = min(ratios.values())
    print(f"{'speed-up (b)/(a), medians':50} {'':6} "
          + ", ".join(f"{label} {r:.1f}x" for label, r in ratios.items())
          + f"   target >= 20x: {'met' if worst >= 20 else 'MISSED'} (lowest {worst:.1f}x)")
    print()

    def mib(kib: float) -> str:
        return f"{kib / 1024:.1f}"

    print(f"{'(c) peak RSS (VmHWM), MiB':50} {'idle':>6} {'after':>10} {'anon':>8} {'threads':>8}")
    for mode in ("as-is", "no-site"):
        s, b = runs[("sidecar", mode)], runs[("bare", mode)]
        print(f"{'diskhooks sidecar, ' + mode:50} {mib(s.idle['VmHWM']):>6} {mib(s.after['VmHWM']):>10} "
              f"{mib(s.after['RssAnon']):>8} {s.after['Threads']:>8}")
        print(f"{'bare grpc server + lxml import (echo), ' + mode:50} {mib(b.idle['VmHWM']):>6} "
              f"{mib(b.after['VmHWM']):>10} {mib(b.after['RssAnon']):>8} {b.after['Threads']:>8}")
        print(f"{'  sidecar minus bare':50} {mib(s.idle['VmHWM'] - b.idle['VmHWM']):>6} "
              f"{mib(s.after['VmHWM'] - b.after['VmHWM']):>10}")
    g = grpcio_side
    print(f"{'diskhooks sidecar --transport grpcio, as-is':50} {mib(g.idle['VmHWM']):>6} "
          f"{mib(g.after['VmHWM']):>10} {mib(g.after['RssAnon']):>8} {g.after['Threads']:>8}")
    print(f"{'  h2 transport saves (grpcio minus h2)':50} {mib(g.idle['VmHWM'] - side.idle['VmHWM']):>6} "
          f"{mib(g.after['VmHWM'] - side.after['VmHWM']):>10}")
    pb = runs[("bare+protobuf", "as-is")]
    print(f"{'bare + protobuf runtime + generated _pb2':50} {mib(pb.idle['VmHWM']):>6} "
          f"{mib(pb.after['VmHWM']):>10} {mib(pb.after['RssAnon']):>8} {pb.after['Threads']:>8}")
    print(f"{'  protobuf runtime + generated modules cost':50} "
          f"{mib(pb.idle['VmHWM'] - bare.idle['VmHWM']):>6} {mib(pb.after['VmHWM'] - bare.after['VmHWM']):>10}"
          "   (the sidecar's own codec avoids it)")
    for label, (_, rss) in shims.items():
        print(f"{'(b) one shim-model process, ' + label:50} {'':6} {mib(rss):>10}")
    peak = side.after["VmHWM"]
    print(f"{'target: sidecar peak < 40 MiB (as-is)':50} {'':6} {'met' if peak < 40 * 1024 else 'MISSED':>10}"
          f"   (after {args.calls + 20} calls; the limit is 64M)")
    print()
    print(f"{'(d) start to first Info answer':50} {'starts':>6} {'median ms':>10} {'max ms':>8}")
    for mode in ("as-is", "no-site"):
        for name in ("sidecar", "bare"):
            r = runs[(name, mode)]
            label = f"{'diskhooks sidecar' if name == 'sidecar' else 'bare grpc server + lxml'}, {mode}"
            print(f"{label:50} {len(r.ready):6d} {p50(r.ready) * ms:10.0f} {max(r.ready) * ms:8.0f}")
    print(f"{'diskhooks sidecar --transport grpcio, as-is':50} {len(grpcio_side.ready):6d} "
          f"{p50(grpcio_side.ready) * ms:10.0f} {max(grpcio_side.ready) * ms:8.0f}")
    print(f"{'sidecar: SIGTERM to exit (graceful stop), as-is':50} {len(side.stop):6d} "
          f"{p50(side.stop) * ms:10.0f} {max(side.stop) * ms:8.0f}")
    print(f"{'target: ready < 1000 ms':50} {'':6} {'met' if p50(side.ready) < 1 else 'MISSED':>10}")
    print()
    print(f"{'(e) one call on the largest accepted domain, MiB':50} {'idle':>6} {'after':>10} {'anon':>8} "
          f"{'KiB in':>8}")
    for one in large:
        label = (f"sidecar, {one.disks} disks (as-is)" if one.kind == "disks"
                 else "sidecar, worst case: empty elements (as-is)")
        print(f"{label:50} {mib(one.idle['VmHWM']):>6} {mib(one.after['VmHWM']):>10} "
              f"{mib(one.after['RssAnon']):>8} {one.domain_bytes / 1024:8.0f}")
    worst_peak = max(one.after["VmHWM"] for one in large)
    print(f"{'target: peak < 48 MiB (limit 64M)':50} {'':6} "
          f"{'met' if worst_peak < 48 * 1024 else 'MISSED':>10}   (peak {mib(worst_peak)} MiB)")
    report_interleaved(interleaved)
    print(f"(total {seconds:.0f} s)")


def report_interleaved(interleaved: list[Interleaved]) -> None:
    ms = 1000.0
    print()
    bare_median = p50(next(r.times for r in interleaved if r.label.startswith("bare")))
    print(f"{'(f) new connection per call, interleaved':50} {'calls':>6} {'median ms':>10} {'p99 ms':>8} "
          f"{'x bare':>7} {'server CPU ms/call':>19} {'peak MiB':>9}")
    for row in interleaved:
        print(f"{row.label[:50]:50} {len(row.times):6d} {p50(row.times) * ms:10.2f} {p99(row.times) * ms:8.2f} "
              f"{p50(row.times) / bare_median:7.2f} {row.cpu / len(row.times) * ms:19.3f} "
              f"{row.after['VmHWM'] / 1024:9.1f}")
    side_median = p50(interleaved[0].times)
    print(f"{'target: sidecar median < 1.5 ms':50} {'':6} {'met' if side_median < 0.0015 else 'MISSED':>10}"
          f"   (a quiet machine; read the ratio to the bare server when it is not)")


if __name__ == "__main__":
    raise SystemExit(main())
