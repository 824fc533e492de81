"""Webhook benchmark: the real server against a minimal baseline, on loopback, in one run.

Starts two TLS servers with the same gunicorn configuration (gthread, ``--workers`` processes x
``--threads`` threads, keep-alive; default 2 workers for this 2-core machine — the work is
CPU-bound Python, so one process per core, and threads only overlap I/O):

- the real one, ``python -m webhook.cli serve --self-signed`` with ``examples/policy.yaml``;
- the baseline, ``python -m benchmarks.baseline_app``, which answers ``allowed: true`` and does
  nothing else (it still decodes the body, as any webhook must).

A load client (threads, one kept-alive TLS connection each, ``http.client``) then measures:

1. closed loop (each connection sends its next request when the previous answer arrives) for the
   maximum rate and p50/p99 latency: baseline, a plain VM review (no diskhooks annotations), and
   the annotated ``vm-create`` review;
2. an open loop paced at ``--rate`` req/s (200) of the annotated review: latency counted from the
   time each request was *due*, so a server that falls behind shows it;
3. the pure core in-process (``timeit``): ``handle_review`` on each admission sample VM, and
   ``mutate_vm`` alone on the largest.

The client shares the 2 cores with the servers, so absolute numbers are pessimistic; the ratios
against the baseline measured in the same run are the figures to read. Loopback only; stops by
itself (about 35 s with the defaults). Targets (printed, never asserted): plain / baseline
<= 1.5x, annotated p99 at 200 req/s < 10 ms, core < 1 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ADMISSION = ROOT / "tests" / "data" / "kubevirt" / "admission"
POLICY = ROOT / "examples" / "policy.yaml"
DEMO = ROOT / "examples" / "demo"
DATA = ROOT / "tests" / "data"


@dataclass
class Run:
    label: str
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")

    @property
    def p99(self) -> float:
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[98] * 1000


def pooled(label: str, runs: Sequence[Run]) -> Run:
    out = Run(label, sum(r.seconds for r in runs))
    for r in runs:
        out.latencies.extend(r.latencies)
        out.errors += r.errors
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A server subprocess in its own process group, stopped with SIGTERM (SIGKILL after 10 s)."""

    def __init__(self, name: str, cmd: list[str], log: Path) -> None:
        self.name = name
        self.log = open(log, "wb")  # noqa: SIM115 - open as long as the server runs
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def connect(port: int, ctx: ssl.SSLContext) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)


def wait_ready(proc: Proc, port: int, ca: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if not proc.alive():
            raise SystemExit(f"benchmark: the {proc.name} server exited; see {proc.log.name}")
        if ca.exists():
            try:
                c = connect(port, ssl.create_default_context(cafile=str(ca)))
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    c.close()
                    return
            except (OSError, ssl.SSLError):
                pass
        time.sleep(0.1)
    raise SystemExit(f"benchmark: the {proc.name} server did not become ready")


def post(conn: http.client.HTTPSConnection, body: bytes) -> bytes:
    conn.request("POST", "/mutate?timeout=5s", body=body,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
    return data


def closed_loop(label: str, port: int, ctx: ssl.SSLContext, body: bytes, *, connections: int,
                duration: float, warmup: float) -> Run:
    """Every connection sends back to back for ``warmup`` + ``duration`` s; only the latter counts."""
    run = Run(label, duration)
    lock = threading.Lock()
    start = time.monotonic() + 0.2
    measure_from, stop_at = start + warmup, start + warmup + duration

    def worker() -> None:
        conn = connect(port, ctx)
        mine: list[float] = []
        errors = 0
        while time.monotonic() < start:
            time.sleep(0.001)
        while True:
            t0 = time.monotonic()
            if t0 >= stop_at:
                break
            try:
                post(conn, body)
            except (OSError, RuntimeError, http.client.HTTPException):
                errors += 1
                conn.close()
                conn = connect(port, ctx)
                continue
            if t0 >= measure_from:
                mine.append(time.monotonic() - t0)
        conn.close()
        with lock:
            run.latencies.extend(mine)
            run.errors += errors

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return run


def paced(label: str, port: int, ctx: ssl.SSLContext, body: bytes, *, rate: float, duration: float,
          connections: int) -> Run:
    """Open loop: request k is due at start + k/rate (spread over the connections); latency is
    measured from when it was due, so queueing behind a slow answer counts."""
    total = int(rate * duration)
    run = Run(label, duration)
    lock = threading.Lock()
    start = time.monotonic() + 0.5

    def worker(index: int) -> None:
        conn = connect(port, ctx)
        post(conn, body)  # handshake and warm-up before the clock starts
        mine: list[float] = []
        errors = 0
        for k in range(index, total, connections):
            due = start + k / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                post(conn, body)
            except (OSError, RuntimeError, http.client.HTTPException):
                errors += 1
                conn.close()
                conn = connect(port, ctx)
                continue
            mine.append(time.monotonic() - due)
        conn.close()
        with lock:
            run.latencies.extend(mine)
            run.errors += errors

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run.seconds = max(duration, time.monotonic() - start)
    return run


def load_review(name: str) -> dict[str, Any]:
    return dict(json.loads((ADMISSION / name).read_text()))


def plain_review() -> dict[str, Any]:
    review = load_review("vm-create.json")
    anns = review["request"]["object"]["metadata"]["annotations"]
    for key in [k for k in anns if k.startswith("diskhooks.io/")]:
        del anns[key]
    return review


def core_timings(repeat: int = 7) -> list[tuple[str, float, int]]:
    """(label, median seconds per call, review size in bytes) for the pure core in-process."""
    import yaml

    from diskplan.plan import PlanKeys
    from diskplan.policy import load_policy
    from webhook.admission import handle_review
    from webhook.cluster import EMPTY_CLUSTER, FileCluster
    from webhook.vm.mutate import mutate_vm

    policy = load_policy(POLICY.read_text())
    keys = PlanKeys(current=secrets.token_bytes(32))
    demo = load_review("vm-create.json")
    demo["request"]["object"] = yaml.safe_load((DEMO / "vm.yaml").read_text())
    cluster = FileCluster.from_text((DEMO / "cluster-objects.yaml").read_text())
    # the largest test VM: every diskhooks feature at once (six disks, persist-root, two passthrough
    # claims, explicit topology) beside the user's own volumes
    sink = load_review("vm-create.json")
    sink["request"]["object"] = yaml.safe_load((DATA / "vm-kitchen-sink.yaml").read_text())
    sink["request"]["name"] = sink["request"]["object"]["metadata"]["name"]
    sink_cluster = FileCluster.from_text((DATA / "vm-cluster-objects.yaml").read_text())
    cases: list[tuple[str, dict[str, Any], Any]] = [
        ("handle_review plain VM", plain_review(), EMPTY_CLUSTER),
        ("handle_review vm-create.json", load_review("vm-create.json"), EMPTY_CLUSTER),
        ("handle_review vm-update.json", load_review("vm-update.json"), EMPTY_CLUSTER),
        ("handle_review vmi-create.json", load_review("vmi-create.json"), EMPTY_CLUSTER),
        ("handle_review examples/demo/vm.yaml", demo, cluster),
        ("handle_review tests/data/vm-kitchen-sink.yaml", sink, sink_cluster),
    ]
    out = []
    for label, review, cl in cases:
        def call(review: dict[str, Any] = review, cl: Any = cl) -> None:
            resp = handle_review(review, route="mutate", policy=policy, plan_keys=keys, cluster=cl)
            assert resp["response"]["allowed"], resp
        out.append((label, _median_call(call, repeat), len(json.dumps(review))))
    largest = max(cases[1:], key=lambda c: len(json.dumps(c[1]["request"]["object"])))
    req = largest[1]["request"]
    old = req.get("oldObject") if req["operation"] == "UPDATE" else None

    def core() -> None:
        mutate_vm(req["object"], operation=req["operation"], old_obj=old, namespace="vms",
                  policy=policy, plan_keys=keys, cluster=largest[2])
    out.append((f"mutate_vm alone ({largest[0].split(' ', 1)[1]})", _median_call(core, repeat),
                len(json.dumps(req))))
    return out


def _median_call(fn: Callable[[], None], repeat: int) -> float:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(1, number // 4)  # ~50 ms per sample
    return statistics.median(t / number for t in timer.repeat(repeat=repeat, number=number))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks webhook", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="closed-loop rounds per case")
    parser.add_argument("--duration", type=float, default=1.5,
                        help="seconds per closed-loop run (after the warm-up)")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--connections", type=int, default=4, help="client keep-alive connections")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rate", type=float, default=200.0, help="paced run, requests per second")
    parser.add_argument("--paced-rounds", type=int, default=2, help="paced rounds per case")
    parser.add_argument("--paced-duration", type=float, default=2.5)
    args = parser.parse_args(argv)

    began = time.monotonic()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="diskhooks-bench-webhook-"))
    procs: list[Proc] = []
    try:
        keys = work / "keys"
        keys.mkdir()
        (keys / "current").write_text(secrets.token_urlsafe(32))
        tls = work / "tls"
        real_port, base_port = free_port(), free_port()
        real = Proc("webhook", [sys.executable, "-m", "webhook.cli", "serve", "--config",
                                str(POLICY), "--self-signed", "--tls-dir", str(tls),
                                "--bind-address", "127.0.0.1", "--port", str(real_port),
                                "--workers", str(args.workers), "--threads", str(args.threads),
                                "--plan-keys-dir", str(keys), "--log-level", "warning",
                                "--drain-seconds", "0"],
                    work / "webhook.log")
        procs.append(real)
        deadline = time.monotonic() + 30
        while not (tls / "tls.key").exists() or not (tls / "ca.crt").exists():
            if not real.alive() or time.monotonic() > deadline:
                raise SystemExit(f"benchmark: the webhook did not start; see {work / 'webhook.log'}")
            time.sleep(0.05)
        base = Proc("baseline", [sys.executable, "-m", "benchmarks.baseline_app", "--cert-file",
                                 str(tls / "tls.crt"), "--key-file", str(tls / "tls.key"),
                                 "--port", str(base_port), "--workers", str(args.workers),
                                 "--threads", str(args.threads)], work / "baseline.log")
        procs.append(base)
        ca = tls / "ca.crt"
        wait_ready(real, real_port, ca, deadline)
        wait_ready(base, base_port, ca, deadline)
        ctx = ssl.create_default_context(cafile=str(ca))

        annotated = json.dumps(load_review("vm-create.json")).encode()
        plain = json.dumps(plain_review()).encode()
        # sanity: the real server mutates the annotated VM and leaves the plain one alone
        c = connect(real_port, ctx)
        assert "patch" in json.loads(post(c, annotated))["response"]
        assert "patch" not in json.loads(post(c, plain))["response"]
        c.close()

        # Short runs, interleaved and rotated, so that load from elsewhere on this shared machine
        # hits every case alike; per-round ratios, then their median.
        cases = {"baseline": (base_port, plain), "plain": (real_port, plain),
                 "annotated": (real_port, annotated)}
        closed: dict[str, list[Run]] = {name: [] for name in cases}
        for r in range(args.rounds):
            order = list(cases)[r % 3:] + list(cases)[:r % 3]
            for name in order:
                port, body = cases[name]
                closed[name].append(closed_loop(name, port, ctx, body, connections=args.connections,
                                                duration=args.duration, warmup=args.warmup))
        paced_runs: dict[str, list[Run]] = {"baseline": [], "annotated": []}
        for r in range(args.paced_rounds):
            for name in (("baseline", "annotated") if r % 2 == 0 else ("annotated", "baseline")):
                port, body = cases[name]
                paced_runs[name].append(paced(name, port, ctx, body, rate=args.rate,
                                              duration=args.paced_duration,
                                              connections=args.connections))
    finally:
        for p in reversed(procs):
            p.stop()
    cores = core_timings()
    shutil.rmtree(work, ignore_errors=True)

    print(f"servers: gunicorn gthread, {args.workers} workers x {args.threads} threads, TLS "
          f"(ECDSA P-256), keep-alive; client: {args.connections} kept-alive connections "
          f"(threads) on the same {os.cpu_count()} cores; load average before: {load_before}")
    print(f"closed loop: {args.rounds} interleaved rounds of {args.duration:g} s per case "
          f"(req/s and p50: median of rounds; p99: all rounds pooled; ratios: median of the "
          f"per-round ratios)")
    print()
    print(f"{'closed loop':30} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  {'cost vs baseline':>22}")
    summary: dict[str, tuple[float, float, float]] = {}
    for name, label in (("baseline", "baseline (allowed: true)"), ("plain", "plain VM review"),
                        ("annotated", "annotated vm-create review")):
        runs = closed[name]
        rate = statistics.median(r.rate for r in runs)
        p50 = statistics.median(r.p50 for r in runs)
        p99 = pooled(label, runs).p99
        summary[name] = (rate, p50, p99)
        ratio = ""
        if name != "baseline":
            cost = statistics.median(b.rate / r.rate for b, r in zip(closed["baseline"], runs, strict=True))
            lat = statistics.median(r.p50 / b.p50 for b, r in zip(closed["baseline"], runs, strict=True))
            ratio = f"{cost:5.2f}x (p50 {lat:4.2f}x)"
            summary[name + "-ratio"] = (cost, lat, 0.0)
        errors = sum(r.errors for r in runs)
        err = f"  errors {errors}" if errors else ""
        print(f"{label:30} {rate:8.0f} {p50:8.2f} {p99:8.2f}  {ratio:>22}{err}")
    print()
    print(f"open loop, {args.rate:.0f} req/s, {args.paced_rounds} x {args.paced_duration:g} s "
          f"(latency from when each request was due)")
    print(f"{'':30} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  {'p99 per round':>22}")
    for name, label in (("baseline", "baseline"), ("annotated", "annotated vm-create")):
        runs = paced_runs[name]
        all_ = pooled(label, runs)
        per_round = " ".join(f"{r.p99:.1f}" for r in runs)
        errors = sum(r.errors for r in runs)
        err = f"  errors {errors}" if errors else ""
        print(f"{label:30} {all_.rate:8.0f} {all_.p50:8.2f} {all_.p99:8.2f}  {per_round:>22}{err}")
    print()
    print(f"{'pure core, in-process (median)':44} {'per call':>10} {'review bytes':>13}")
    for label, seconds, size in cores:
        print(f"{label:44} {seconds * 1e6:8.0f} µs {size:13d}")
    print()
    plain_ratio = summary["plain-ratio"][0]
    paced_p99 = pooled("", paced_runs["annotated"]).p99
    core_max = max(s for label, s, _ in cores if label.startswith("handle_review"))
    print("targets: plain/baseline <= 1.5x: "
          f"{plain_ratio:.2f}x {'ok' if plain_ratio <= 1.5 else 'MISSED'}; "
          f"annotated p99 at {args.rate:.0f} req/s < 10 ms: {paced_p99:.2f} ms "
          f"{'ok' if paced_p99 < 10 else 'MISSED'}; "
          f"core < 1 ms: {core_max * 1000:.3f} ms {'ok' if core_max < 0.001 else 'MISSED'}")
    print(f"(total {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
