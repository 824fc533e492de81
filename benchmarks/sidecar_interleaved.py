"""Section (f) of the sidecar benchmark: a new connection per call, **interleaved**: every server
(the sidecar, the bare grpcio echo server, the sidecar's transport alone and, per
``--compare-tree``, the same from another checkout) serves at the same time and they take turns,
rounds of :data:`ROUND` calls each, so a change in the machine's load hits them all alike; per
server the latencies, the server process's CPU time over its calls and its peak RSS.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.sidecar_calls import on_define_over_socket, p50, p99, timed
from benchmarks.sidecar_servers import (
    ECHO_SERVER_CODE,
    Interp,
    Server,
    bare_args,
    cpu_seconds,
    sidecar_args,
    status_kib,
)
from benchmarks.sidecar_workload import ROOT, Workload


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


def interleaved_kinds(workdir: Path, workload: Workload, interp: Interp,
                      compare_trees: Sequence[Path]) -> list[tuple[str, list[str], Path, Interp, Path]]:
    """The servers of (f), as :func:`measure_interleaved` takes them: this tree's sidecar, the
    bare server and this tree's transport alone, then the transport alone and the sidecar of each
    ``compare_trees`` checkout (run with that tree first on ``PYTHONPATH``)."""
    inter_kinds = []
    trees = [("", ROOT)] + [(f" from {tree}", tree) for tree in compare_trees]
    for label, args_of, tree in [("diskhooks sidecar", "sidecar", ROOT), ("bare grpc echo server", "bare", ROOT),
                                 *((f"h2grpc echo server{suffix}", "echo", tree) for suffix, tree in trees),
                                 *((f"sidecar{suffix}", "sidecar", tree) for suffix, tree in trees[1:])]:
        sock_dir = Path(tempfile.mkdtemp(dir=workdir))
        tree_interp = interp
        if tree != ROOT:
            env = dict(interp.env)
            env["PYTHONPATH"] = os.pathsep.join([str(tree), *interp.env["PYTHONPATH"].split(os.pathsep)[1:]])
            tree_interp = Interp(interp.label, interp.flags, env)
        if args_of == "bare":
            inter_kinds.append((label, bare_args(sock_dir / "bare.sock"), sock_dir / "bare.sock", tree_interp,
                                tree))
        elif args_of == "echo":
            inter_kinds.append((label, ["-c", ECHO_SERVER_CODE, str(sock_dir / "echo.sock")],
                                sock_dir / "echo.sock", tree_interp, tree))
        else:
            inter_kinds.append((label, sidecar_args(sock_dir, workload.prefix), sock_dir / "diskhooks.sock",
                                tree_interp, tree))
    return inter_kinds


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
