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
    empty elements (the most nodes per byte). Target: well under KubeVirt's 64M sidecar limit.
    Also the resident memory (``VmRSS``) the call leaves: before it (after a few calls on the
    workload's domain) and once the server has finished its side of it; every VM's launcher runs
    a sidecar, so what one call keeps is paid per VM (target: < 4 MiB kept). With
    ``--compare-tree DIR`` the same for DIR's sidecar (e.g. the commit before a change);
(f) a new connection per call, **interleaved**: the sidecar, the bare server and the sidecar's
    transport alone (``H2GrpcServer`` with an echo handler: what is left is the HTTP/2 and gRPC
    work) (and, with ``--compare-tree DIR``, repeatable, the sidecar and the transport of another
    checkout of this repository, e.g. an earlier commit from ``git archive``) serve at the same
    time and take turns, rounds of 50 calls each, so a change in the machine's load hits them
    all alike; per server the median and p99, the
    ratio of its median to the bare server's, and the **server's CPU time per call** (user +
    system of all its threads, ``/proc/<pid>/stat``): the part of a call spent in the server
    process, apart from the client's.

The pieces: ``sidecar_workload.py`` (the sample with a plan), ``sidecar_servers.py`` (the server
processes), ``sidecar_calls.py`` (the calls and sections (a)-(e)), ``sidecar_interleaved.py``
(section (f)) and ``sidecar_report.py`` (the printed report); this module parses the options and
runs them.

Every child runs the same interpreter. By default the children share a fresh bytecode cache
(``PYTHONPYCACHEPREFIX`` in the run's temporary directory, warmed before measuring) the way an
image ships compiled ``.pyc`` files; ``--no-bytecode-cache`` keeps the environment as it is (this
machine sets ``PYTHONDONTWRITEBYTECODE``, so every start then compiles diskhooks from source).
The client shares the 2 cores with the servers: read the ratios. Targets are printed, never
asserted: (a) >= 20x faster than (b), (c) < 40 MiB, (d) < 1 s, (e) < 48 MiB and < 4 MiB kept, (f) new connection
< 1.5 ms. Stops by itself (~40 s with ``--calls 1000``).
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # python benchmarks/sidecar_bench.py
    sys.path.insert(0, str(ROOT))

from benchmarks.sidecar_calls import (
    OneCall,
    ServerRun,
    measure_one_large_call,
    measure_server,
    p50,
    shim_call,
    timed,
)
from benchmarks.sidecar_interleaved import interleaved_kinds, measure_interleaved, report_interleaved
from benchmarks.sidecar_report import report
from benchmarks.sidecar_servers import bare_args, interpreters, sidecar_args
from benchmarks.sidecar_workload import build_workload


# ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks sidecar",
                                     description="hook sidecar vs sidecar-shim model vs bare grpc server")
    parser.add_argument("--calls", type=int, default=300, help="OnDefineDomain calls over the socket (300)")
    parser.add_argument("--shim-calls", type=int, default=30, help="fresh-process calls per mode (30)")
    parser.add_argument("--starts", type=int, default=5, help="starts timed per server and mode (5)")
    parser.add_argument("--compare-tree", type=Path, action="append", metavar="DIR",
                        help="(e), (f) also serve the sidecar from this checkout (e.g. an earlier commit); repeatable")
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
            large = [measure_one_large_call(kind, modes[0], workdir=workdir, workload=workload, log=log,
                                            tree=tree)
                     for tree in (ROOT, *(args.compare_tree or ())) for kind in ("disks", "empty")]
        inter_kinds = interleaved_kinds(workdir, workload, modes[0], args.compare_tree or ())
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


if __name__ == "__main__":
    raise SystemExit(main())
