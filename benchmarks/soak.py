"""Load and soak: the served webhook at a fixed rate for a set time, then the hook sidecar for a set
number of calls; errors, p50/p99 latency and RSS at the start and at the end.

``python -m benchmarks soak [--duration 60] [--rate 200] [--connections 4] [--workers 2]
[--sidecar-calls 2000] [--json FILE]``

- **webhook**: ``python -m webhook.cli serve --self-signed`` (gunicorn, TLS, ``--workers`` gthread
  workers) with ``examples/policy.yaml``, on a loopback port. ``--connections`` client threads keep
  one TLS connection each (as kube-apiserver keeps its connections) and send, in an open loop paced
  at ``--rate`` requests per second in total, the admission samples of
  ``tests/data/kubevirt/admission`` in turn (VM CREATE, VM UPDATE, VMI CREATE, virt-launcher Pod
  CREATE, each with its own request uid). Every answer is checked: HTTP 200, an AdmissionReview
  with the request's uid, ``allowed`` as the sample expects, a patch where one is expected. Any
  other answer or a transport error is an error. Latency counts from when a request was due, so a
  server falling behind shows it. The first ``--warmup`` seconds are not counted.
- **sidecar**: ``python -m hooksidecar.cli serve`` on a unix socket with the sidecar benchmark's
  workload (KubeVirt sample 05 with two planned qcow2 disks, real images under a path prefix);
  ``--sidecar-calls`` ``OnDefineDomain`` calls, each on a new channel as virt-launcher dials, every
  answer compared with the first, after ``--sidecar-warmup`` calls not counted (its RSS rises by
  about 2 MiB over the first ~15,000 calls, then stays flat: allocator arenas and caches filling).
- **RSS**: the sum of ``VmRSS`` over the server's processes (the gunicorn master and its workers),
  sampled once a second; "start" is the first sample after the warm-up, "end" the last one.
  ``--duration 0`` runs the sidecar part alone, ``--sidecar-calls 0`` the webhook part alone.

Targets (printed; only errors change the exit status): zero errors, RSS growth under 5 %. The
client shares the machine's cores with the servers. ``tests/test_soak.py`` runs the same code for a
few seconds in CI. The pieces (:class:`WebhookServer`, :class:`ReviewLoad`) also serve the fault
tests (``tests/test_webhook_faults.py``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ADMISSION = ROOT / "tests" / "data" / "kubevirt" / "admission"
POLICY = ROOT / "examples" / "policy.yaml"
if str(ROOT) not in sys.path:  # python benchmarks/soak.py
    sys.path.insert(0, str(ROOT))

DEMO = ROOT / "examples" / "demo"
CLUSTER_OBJECTS = DEMO / "cluster-objects.yaml"
#: the admission samples sent in turn (each answer must be allowed with a patch), then the demo's
#: launcher Pod (see :func:`launcher_pod_review`)
SAMPLES = (("vm-create.json", "/mutate"), ("vm-update.json", "/mutate"), ("vmi-create.json", "/mutate"))
UID_MARK = "00000000-soak-uid-0000-000000000000"


# ------------------------------------------------------------------------------------------------
# the served webhook
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WebhookServer:
    """``python -m webhook.cli serve --self-signed`` on a free loopback port, in ``work``; ``extra``
    arguments are added (``--drain-seconds``...). Signals go to the master only, as the kubelet sends
    them to a container's PID 1."""

    def __init__(self, work: Path, *, workers: int = 2, policy: Path = POLICY,
                 extra: Sequence[str] = (), keys_dir: Path | None = None) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_dir = work / "tls"
        if keys_dir is None:
            keys_dir = work / "plan-keys"
            keys_dir.mkdir(exist_ok=True)
            (keys_dir / "current").write_text(secrets.token_urlsafe(32) + "\n")
        self.keys_dir = keys_dir
        self.log_path = work / "webhook.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open while the server runs
        cmd = [sys.executable, "-m", "webhook.cli", "serve", "--config", str(policy), "--self-signed",
               "--tls-dir", str(self.tls_dir), "--bind-address", "127.0.0.1", "--port", str(self.port),
               "--workers", str(workers), "--plan-keys-dir", str(keys_dir),
               "--cluster-objects", str(CLUSTER_OBJECTS), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def ca(self) -> Path:
        return self.tls_dir / "ca.crt"

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the webhook exited {self.proc.returncode}: {self.log_tail()}")
            if self.ca.exists():
                try:
                    if self.get("/readyz")[0] == 200:
                        return
                except (OSError, ssl.SSLError, http.client.HTTPException):
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"the webhook did not answer /readyz within {timeout} s: {self.log_tail()}")

    def get(self, path: str, ctx: ssl.SSLContext | None = None) -> tuple[int, bytes]:
        """One GET on a new connection."""
        conn = http.client.HTTPSConnection("localhost", self.port, context=ctx or self.context(),
                                           timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def pids(self) -> list[int]:
        """The master and its children (the workers)."""
        pids = [self.proc.pid]
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as handle:
                pids += [int(p) for p in handle.read().split()]
        except OSError:
            pass
        return pids

    def rss_kib(self) -> int:
        return sum(rss_kib(pid) for pid in self.pids())

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait (SIGKILL after ``timeout``); the exit status."""
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return code

    def log_tail(self, chars: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------------------------
# the client: kept-alive TLS connections sending admission reviews
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Review:
    path: str
    body: str  # with UID_MARK where the request uid goes
    patched: bool
    kind: str


def load_reviews(keys_dir: Path) -> list[Review]:
    """The reviews a load sends in turn; the launcher Pod's plan is signed with ``keys_dir``'s key."""
    out = []
    for name, path in SAMPLES:
        doc = json.loads((ADMISSION / name).read_text())
        doc["request"]["uid"] = UID_MARK
        out.append(Review(path, json.dumps(doc), True, doc["request"]["kind"]["kind"]))
    out.append(Review("/mutate-pod", json.dumps(launcher_pod_review(keys_dir)), True, "Pod"))
    return out


def launcher_pod_review(keys_dir: Path) -> dict[str, Any]:
    """The CREATE review of the demo's virt-launcher Pod (``examples/demo/launcher-pod.yaml``) for
    the demo VM, with the plan the webhook (keys of ``keys_dir``) writes on that VM's template:
    computed here with the admission core, as the demo's VM -> VMI -> Pod chain would carry it."""
    import base64

    import jsonpatch
    import yaml

    from diskplan.policy import load_policy
    from webhook.admission import handle_review
    from webhook.cluster import FileCluster
    from webhook.reload import load_plan_keys

    vm = yaml.safe_load((DEMO / "vm.yaml").read_text())
    review = _envelope(vm, kind="VirtualMachine", group="kubevirt.io", resource="virtualmachines")
    answer = handle_review(review, route="mutate", policy=load_policy(POLICY.read_text()),
                           plan_keys=load_plan_keys(keys_dir),
                           cluster=FileCluster.from_text(CLUSTER_OBJECTS.read_text()))["response"]
    if "patch" not in answer:
        raise RuntimeError(f"the demo VM got no patch: {answer}")
    vm = jsonpatch.apply_patch(vm, json.loads(base64.b64decode(answer["patch"])))
    tmeta = vm["spec"]["template"]["metadata"]
    pod = yaml.safe_load((DEMO / "launcher-pod.yaml").read_text())
    pod["metadata"]["labels"].update(tmeta.get("labels", {}))
    pod["metadata"]["annotations"].update(tmeta.get("annotations", {}))
    return _envelope(pod, kind="Pod", group="", resource="pods")


def _envelope(obj: dict[str, Any], *, kind: str, group: str, resource: str) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": UID_MARK, "kind": {"group": group, "version": "v1", "kind": kind},
                        "resource": {"group": group, "version": "v1", "resource": resource},
                        "namespace": obj["metadata"].get("namespace", "vms"),
                        "name": obj["metadata"].get("name", ""), "operation": "CREATE",
                        "userInfo": {"username": "system:serviceaccount:kubevirt:kubevirt-controller"},
                        "object": obj, "oldObject": None, "dryRun": False}}


@dataclass(frozen=True)
class Answer:
    """One request as the client saw it: when it was due/sent/answered (monotonic), to which port,
    whether the server asked to close the connection, and the error (None: a correct answer)."""

    seq: int
    due: float
    sent: float
    done: float
    port: int
    close: bool
    error: str | None


def check_answer(review: Review, uid: str, status: int, data: bytes) -> str | None:
    """Why an answer is wrong (None: it is right)."""
    if status != 200:
        return f"HTTP {status}: {data[:200]!r}"
    try:
        doc = json.loads(data)
        resp = doc["response"]
    except (ValueError, KeyError, TypeError):
        return f"not an AdmissionReview: {data[:200]!r}"
    if doc.get("kind") != "AdmissionReview" or resp.get("uid") != uid:
        return f"wrong kind or uid: {data[:200]!r}"
    if resp.get("allowed") is not True:
        return f"{review.kind} denied: {resp.get('status', {}).get('message', '')[:200]}"
    if review.patched != ("patch" in resp):
        return f"{review.kind}: patch {'missing' if review.patched else 'unexpected'}"
    return None


class ReviewLoad:
    """``connections`` threads, each with one kept-alive HTTPS connection, sending the reviews in turn.

    ``rate`` (requests per second over all threads) paces an open loop (request ``seq`` is due
    ``seq / rate`` s after the start); None sends back to back. With ``total`` the load ends by
    itself after requests 0 to ``total - 1`` (:meth:`join`).
    ``endpoint`` gives the port for each new connection (a Service whose endpoints change: see the
    drain test); a connection is re-opened after an answer with ``Connection: close`` or an error,
    and every ``reconnect_every`` requests when set (new TLS handshakes: certificate rotation).
    """

    def __init__(self, *, ctx: ssl.SSLContext, endpoint: Callable[[], int], reviews: Sequence[Review],
                 connections: int = 4, rate: float | None = None, reconnect_every: int = 0,
                 total: int | None = None) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.connections = connections
        self.rate = rate
        self.reconnect_every = reconnect_every
        self.reviews = list(reviews)
        self.total = total
        self.answers: list[Answer] = []  # appended by the threads as they go
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = 0.0

    def start(self) -> ReviewLoad:
        self.started = time.monotonic() + 0.05
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(self.connections)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        return self.join(60)

    def join(self, timeout: float) -> list[Answer]:
        """Wait for the threads to end (``total`` reached, or :meth:`stop`); the answers so far."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return list(self.answers)

    def run_for(self, seconds: float) -> list[Answer]:
        self.start()
        self._stop.wait(seconds)
        return self.stop()

    def _connect(self) -> tuple[http.client.HTTPSConnection, int]:
        port = self.endpoint()
        return http.client.HTTPSConnection("localhost", port, context=self.ctx, timeout=10), port

    def _run(self, index: int) -> None:
        conn, port = self._connect()
        sent_here = 0
        k = index
        try:
            while not self._stop.is_set() and (self.total is None or k < self.total):
                due = time.monotonic()
                if self.rate is not None:
                    due = self.started + k / self.rate
                    delay = due - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        break
                seq = k
                review = self.reviews[seq % len(self.reviews)]
                k += self.connections
                uid = f"soak-{seq}"
                sent = time.monotonic()
                close, error = False, None
                try:
                    conn.request("POST", f"{review.path}?timeout=10s",
                                 body=review.body.replace(UID_MARK, uid).encode(),
                                 headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                    close = (resp.getheader("Connection") or "").lower() == "close"
                    error = check_answer(review, uid, resp.status, data)
                except (OSError, http.client.HTTPException) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                self.answers.append(Answer(seq, due, sent, time.monotonic(), port, close, error))
                sent_here += 1
                if close or error is not None or (self.reconnect_every
                                                  and sent_here % self.reconnect_every == 0):
                    conn.close()
                    conn, port = self._connect()
        finally:
            conn.close()


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def p50_ms(xs: Sequence[float]) -> float:
    return statistics.median(xs) * 1000 if xs else float("nan")


def p99_ms(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return xs[0] * 1000 if xs else float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[98] * 1000


@dataclass
class SoakResult:
    """What a soak of one server measured (``latencies`` in seconds; RSS in KiB)."""

    name: str
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    rss_start: int = 0
    rss_end: int = 0
    rss_max: int = 0
    seconds: float = 0.0

    @property
    def rss_growth(self) -> float:
        return (self.rss_end - self.rss_start) / self.rss_start * 100 if self.rss_start else float("nan")

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "requests": self.requests, "errors": len(self.errors),
                "firstErrors": self.errors[:5], "p50Ms": round(p50_ms(self.latencies), 2),
                "p99Ms": round(p99_ms(self.latencies), 2), "rssStartKiB": self.rss_start,
                "rssEndKiB": self.rss_end, "rssMaxKiB": self.rss_max,
                "rssGrowthPercent": round(self.rss_growth, 2), "seconds": round(self.seconds, 1)}


class RssSampler:
    """``measure()`` once a second in a thread, from ``start_at`` (monotonic) on."""

    def __init__(self, measure: Callable[[], int], start_at: float) -> None:
        self.samples: list[int] = []
        self._measure, self._start_at = measure, start_at
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._stop.wait(max(0.0, self._start_at - time.monotonic()))
        while not self._stop.is_set():
            self.samples.append(self._measure())
            self._stop.wait(1.0)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(10)
        self.samples.append(self._measure())
        return self.samples


def soak_webhook(work: Path, *, duration: float, rate: float, connections: int = 4, workers: int = 2,
                 warmup: float = 5.0, progress: Callable[[str], None] | None = None) -> SoakResult:
    """The webhook part (see the module docstring)."""
    server = WebhookServer(work, workers=workers, extra=["--drain-seconds", "0", "--log-level", "warning"])
    result = SoakResult("webhook")
    try:
        server.wait_ready()
        first = int(warmup * rate)  # requests before this one warm up and are not counted
        load = ReviewLoad(ctx=server.context(), endpoint=lambda: server.port,
                          reviews=load_reviews(server.keys_dir), connections=connections, rate=rate,
                          total=first + int(duration * rate))
        began = time.monotonic()
        sampler = RssSampler(server.rss_kib, began + warmup)
        load.start()
        end = began + warmup + duration
        while time.monotonic() < end and server.proc.poll() is None:
            time.sleep(min(10.0, max(0.0, end - time.monotonic())))
            if progress is not None and time.monotonic() < end:
                progress(f"webhook: {time.monotonic() - began:.0f} s, {len(load.answers)} answered, "
                         f"RSS {server.rss_kib() / 1024:.1f} MiB")
        answers = load.join(60) if server.proc.poll() is None else load.stop()
        samples = sampler.stop()
        load.stop()
    finally:
        code = server.stop()
    counted = [a for a in answers if a.seq >= first]
    result.requests = len(counted)
    result.errors = [a.error for a in counted if a.error is not None]
    result.latencies = [a.done - a.due for a in counted if a.error is None]
    result.seconds = duration
    if samples:
        result.rss_start, result.rss_end, result.rss_max = samples[0], samples[-1], max(samples)
    if code != 0:
        result.errors.append(f"the webhook exited {code}: {server.log_tail(500)}")
    return result


def soak_sidecar(work: Path, *, calls: int, warmup_calls: int = 1000,
                 progress: Callable[[str], None] | None = None) -> SoakResult:
    """The sidecar part (see the module docstring); uses the sidecar benchmark's workload."""
    from benchmarks.sidecar_calls import on_define_over_socket
    from benchmarks.sidecar_servers import Server, interpreters, sidecar_args
    from benchmarks.sidecar_workload import build_workload

    work.mkdir(parents=True, exist_ok=True)
    workload = build_workload(work)
    sock_dir = work / "hooks"
    sock_dir.mkdir()
    interp = interpreters(None, workload.plan)[0]
    server = Server(sidecar_args(sock_dir, workload.prefix), sock_dir / "diskhooks.sock", interp,
                    work / "sidecar.log")
    result = SoakResult("sidecar")
    target = f"unix://{sock_dir / 'diskhooks.sock'}"
    try:
        server.wait_ready()
        first = on_define_over_socket(target, workload)
        for _ in range(warmup_calls):
            on_define_over_socket(target, workload)
        result.rss_start = result.rss_max = rss_kib(server.proc.pid)
        began = time.monotonic()
        for n in range(calls):
            t0 = time.monotonic()
            try:
                answer = on_define_over_socket(target, workload)
            except Exception as exc:  # noqa: BLE001 - grpc.RpcError and anything else: an error
                result.errors.append(f"call {n}: {type(exc).__name__}: {exc}"[:300])
            else:
                result.latencies.append(time.monotonic() - t0)
                if answer != first:
                    result.errors.append(f"call {n}: the answer differs from the first one")
            result.requests += 1
            if n % 100 == 99:
                result.rss_max = max(result.rss_max, rss_kib(server.proc.pid))
            if progress is not None and n % 2000 == 1999:
                progress(f"sidecar: {n + 1} calls, RSS {rss_kib(server.proc.pid) / 1024:.1f} MiB")
        result.seconds = time.monotonic() - began
        result.rss_end = rss_kib(server.proc.pid)
        result.rss_max = max(result.rss_max, result.rss_end)
    finally:
        server.stop()
    if server.proc.returncode != 0:
        result.errors.append(f"the sidecar exited {server.proc.returncode}")
    return result


def report(results: Sequence[SoakResult], *, rate: float) -> str:
    header = (f"{'':8} {'requests':>9} {'errors':>6} {'p50 ms':>7} {'p99 ms':>7} {'RSS start':>10} "
              f"{'RSS end':>9} {'growth':>7}")
    lines = [header]
    for r in results:
        lines.append(f"{r.name:8} {r.requests:9d} {len(r.errors):6d} {p50_ms(r.latencies):7.2f} "
                     f"{p99_ms(r.latencies):7.2f} {r.rss_start / 1024:8.1f}Mi {r.rss_end / 1024:7.1f}Mi "
                     f"{r.rss_growth:6.1f}%")
        for err in r.errors[:5]:
            lines.append(f"  error: {err}")
    ok = all(not r.errors for r in results)
    flat = all(r.rss_growth < 5 for r in results)
    lines.append(f"targets: zero errors {'met' if ok else 'MISSED'}; RSS growth < 5 % "
                 f"{'met' if flat else 'MISSED'} (webhook paced at {rate:g} req/s; RSS: master + workers)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0,
                        help="webhook seconds counted (60; 0: no webhook part)")
    parser.add_argument("--rate", type=float, default=200.0, help="webhook requests per second (200)")
    parser.add_argument("--connections", type=int, default=4, help="kept-alive client connections (4)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (2)")
    parser.add_argument("--warmup", type=float, default=5.0, help="webhook seconds not counted (5)")
    parser.add_argument("--sidecar-calls", type=int, default=2000,
                        help="OnDefineDomain calls, a new channel each (2000; 0: no sidecar part)")
    parser.add_argument("--sidecar-warmup", type=int, default=1000,
                        help="sidecar calls before the RSS at the start is taken (1000: its RSS settles "
                             "over the first calls, allocator arenas and caches)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.duration < 0 or args.rate <= 0 or args.connections < 1 or args.sidecar_calls < 0 \
            or args.sidecar_warmup < 0 or not (args.duration or args.sidecar_calls):
        parser.error("--duration must be 0 or more, --rate positive, --connections at least 1, and "
                     "one part must run")

    def progress(text: str) -> None:
        print(f"  ... {text}", flush=True)

    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="diskhooks-soak-") as tmp:
        results = []
        if args.duration:
            results.append(soak_webhook(Path(tmp) / "webhook", duration=args.duration, rate=args.rate,
                                        connections=args.connections, workers=args.workers,
                                        warmup=args.warmup, progress=progress))
        if args.sidecar_calls:
            results.append(soak_sidecar(Path(tmp) / "sidecar", calls=args.sidecar_calls,
                                        warmup_calls=args.sidecar_warmup, progress=progress))
    print(f"soak: webhook {args.duration:g} s at {args.rate:g} req/s over {args.connections} connections "
          f"({args.workers} workers), sidecar {args.sidecar_calls} calls; load average before: "
          f"{load_before}")
    print(report(results, rate=args.rate))
    if args.json is not None:
        args.json.write_text(json.dumps([r.summary() for r in results], indent=1) + "\n")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
