"""SIGTERM under load: the served webhook drains (``webhook/drain.py``) and no request fails.

Real processes, TLS and signals: two ``python -m webhook.cli serve`` processes (gunicorn, 2 gthread
workers) are two replicas behind a Service, A (stopped here) and B. Four client threads keep one
HTTPS connection each, as kube-apiserver does, and send admission reviews back to back; SIGTERM
goes to A's master only, as the kubelet signals a container's PID 1. What is played is the Service's
routing: a *new* connection goes to A until ``PROPAGATION`` seconds after the SIGTERM (the time the
endpoint removal takes to reach the API server and every node), then to B; a kept connection stays
where it is (conntrack) until the client closes it. Any transport error or wrong answer fails.
"""

from __future__ import annotations

import http.client
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.soak import ReviewLoad, WebhookServer, load_reviews
from tests.conftest import EXAMPLE_POLICY, ROOT

DRAIN = 4.0
PROPAGATION = 1.5


def _both(a: WebhookServer, b: WebhookServer) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(a.ca))
    ctx.load_verify_locations(cafile=str(b.ca))
    return ctx


def test_sigterm_under_load_fails_no_request(tmp_path: Path) -> None:
    a = WebhookServer(tmp_path / "a", extra=["--drain-seconds", str(DRAIN)])
    b = WebhookServer(tmp_path / "b", keys_dir=a.keys_dir, extra=["--drain-seconds", "0"])
    try:
        a.wait_ready()
        b.wait_ready()
        ctx = _both(a, b)
        term_at: list[float] = []

        def endpoint() -> int:
            return b.port if term_at and time.monotonic() >= term_at[0] + PROPAGATION else a.port

        # an idle kept connection to A (one request, then nothing): closed only after the drain
        idle_conn = http.client.HTTPSConnection("localhost", a.port, context=ctx, timeout=60)
        idle_conn.request("GET", "/healthz")
        assert idle_conn.getresponse().read() == b"ok\n"
        closed_at: list[float] = []

        def watch_idle() -> None:
            assert idle_conn.sock is not None
            try:
                idle_conn.sock.recv(1)  # b"" at the server's close
            except OSError:
                pass
            closed_at.append(time.monotonic())

        watcher = threading.Thread(target=watch_idle, daemon=True)
        watcher.start()

        # the kubelet's readiness probe on A: a new connection each time
        probes: list[tuple[float, int]] = []
        probing = threading.Event()

        def probe() -> None:
            while not probing.is_set():
                try:
                    probes.append((time.monotonic(), a.get("/readyz", ctx)[0]))
                except OSError:
                    return  # A stopped listening
                probing.wait(0.2)

        load = ReviewLoad(ctx=ctx, endpoint=endpoint, reviews=load_reviews(a.keys_dir), connections=4)
        load.start()
        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        time.sleep(1.5)
        term_at.append(time.monotonic())
        a.signal(signal.SIGTERM)
        code = a.wait(DRAIN + 15)
        exited = time.monotonic()
        time.sleep(0.5)
        answers = load.stop()
        probing.set()
        prober.join(5)
        watcher.join(5)
        idle_conn.close()
    finally:
        a.stop()
        b.stop()
    t0 = term_at[0]
    log = a.log_tail()
    assert code == 0, log
    assert "draining for 4 s" in log and "drain over" in log, log
    assert t0 + DRAIN <= exited <= t0 + DRAIN + 5, (exited - t0, log)

    errors = [x for x in answers if x.error is not None]
    assert not errors, errors[:5]
    before = [x for x in answers if x.port == a.port and x.done < t0]
    during = [x for x in answers if x.port == a.port and x.sent > t0 + 0.2]
    assert len(before) > 20 and during, (len(before), len(during))
    # every answer A gave once the drain began asked the client to close the connection ...
    assert all(x.close for x in during), [x for x in during if not x.close][:3]
    # ... and A still accepted new connections while the endpoint removal propagated
    assert any(x.sent > t0 + 0.5 for x in during)
    assert any(x.port == b.port for x in answers)

    # ready before the SIGTERM, 503 from then on, answering until the drain's end
    assert any(code == 200 and t < t0 for t, code in probes)
    after = [(t, code) for t, code in probes if t > t0 + 0.2]
    assert after and all(code == 503 for _, code in after), after
    assert max(t for t, _ in after) > t0 + DRAIN - 1
    # the connection that stayed idle was closed after the drain, not before
    assert closed_at and closed_at[0] >= t0 + DRAIN - 0.1, (closed_at, t0)


def test_second_sigterm_ends_the_drain(tmp_path: Path) -> None:
    server = WebhookServer(tmp_path / "s", extra=["--drain-seconds", "60"])
    try:
        server.wait_ready()
        began = time.monotonic()
        server.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while server.get("/readyz")[0] != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.signal(signal.SIGTERM)
        code = server.wait(15)
    finally:
        server.stop()
    assert code == 0, server.log_tail()
    assert time.monotonic() - began < 15
    assert "second SIGTERM: the drain ends now" in server.log_tail()


def test_drain_seconds_out_of_range_is_refused(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "webhook.cli", "serve", "--config", str(EXAMPLE_POLICY),
                          "--self-signed", "--drain-seconds", "-1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert "--drain-seconds -1: must be 0-600 seconds" in out.stderr
