"""``/metrics`` and ``/healthz`` of the node agent: a tiny threaded HTTP server (standard library).

- ``GET /metrics``: :meth:`nodeagent.metrics.AgentMetrics.exposition` (Prometheus text format).
- ``GET /healthz``: 200 ``ok`` while ``health()`` returns no problem, else 503 with the problem
  (a watch or worker thread that died, which only a restart cures).
- ``GET /readyz``: 200 once ``ready()`` returns no problem (both watches listed once), else 503.

No decisions here; the agent hands in the callables. Quiet: no access log.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

Check = Callable[[], str | None]  # None: fine; else what is wrong


class StatusServer:
    def __init__(self, *, port: int, metrics: Callable[[], bytes], health: Check, ready: Check,
                 bind: str = "0.0.0.0") -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._answer(200, outer.metrics(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    problem = (outer.health if path == "/healthz" else outer.ready)()
                    if problem is None:
                        self._answer(200, b"ok\n")
                    else:
                        self._answer(503, problem.encode("utf-8", "replace") + b"\n")
                else:
                    self._answer(404, b"not found\n")

            def _answer(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.metrics = metrics
        self.health = health
        self.ready = ready
        self._server = ThreadingHTTPServer((bind, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="status-http", daemon=True)

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(2)
