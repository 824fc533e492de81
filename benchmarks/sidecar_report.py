"""The sidecar benchmark's printed report: sections (a)-(e) (latency against the shim model and
the bare server, peak RSS, start to ready, one call on the largest domain) and their targets, then
section (f) (:func:`benchmarks.sidecar_interleaved.report_interleaved`) and the run's total time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.sidecar_calls import OneCall, ServerRun, p50, p99
from benchmarks.sidecar_interleaved import Interleaved, report_interleaved
from benchmarks.sidecar_workload import SAMPLE


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
    print(f"{'(e) one call on the largest accepted domain, MiB':50} {'idle':>6} {'peak':>10} {'anon':>8} "
          f"{'KiB in':>8}")

    def large_label(one: OneCall) -> str:
        label = (f"sidecar, {one.disks} disks" if one.kind == "disks" else "sidecar, worst case: empty elements")
        return f"{Path(one.tree).name}: {label}" if one.tree else f"{label} (as-is)"

    for one in large:
        print(f"{large_label(one)[-50:]:50} {mib(one.idle['VmHWM']):>6} {mib(one.after['VmHWM']):>10} "
              f"{mib(one.settled['RssAnon']):>8} {one.domain_bytes / 1024:8.0f}")
    worst_peak = max(one.after["VmHWM"] for one in large if not one.tree)
    print(f"{'target: peak < 48 MiB (limit 64M)':50} {'':6} "
          f"{'met' if worst_peak < 48 * 1024 else 'MISSED':>10}   (peak {mib(worst_peak)} MiB)")
    print(f"{'    RSS (VmRSS) kept after that call, MiB':50} {'before':>6} {'after':>10} {'kept':>8}")
    for one in large:
        kept = one.settled["VmRSS"] - one.before["VmRSS"]
        print(f"{large_label(one)[-50:]:50} {mib(one.before['VmRSS']):>6} {mib(one.settled['VmRSS']):>10} "
              f"{mib(kept):>8}")
    worst_kept = max(one.settled["VmRSS"] - one.before["VmRSS"] for one in large if not one.tree)
    print(f"{'target: kept < 4 MiB (paid per VM)':50} {'':6} "
          f"{'met' if worst_kept < 4 * 1024 else 'MISSED':>10}   (kept {mib(worst_kept)} MiB)")
    report_interleaved(interleaved)
    print(f"(total {seconds:.0f} s)")
