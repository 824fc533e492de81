"""The server processes the sidecar benchmark starts, each on a unix socket: the diskhooks sidecar
(``python -m hooksidecar.cli serve``), a bare grpcio echo server (same thread pool, ``lxml``
imported) and the sidecar's transport alone (``H2GrpcServer`` with an echo handler); how a child
interpreter is started (:func:`interpreters`) and what ``/proc`` says of a running one (memory,
CPU time).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.sidecar_workload import ROOT

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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
