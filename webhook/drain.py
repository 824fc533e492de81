"""Draining the served webhook at SIGTERM, so that a rollout fails no admission request.

Transport layer: process signals, gunicorn's master loop and a flag in shared memory; no admission
decisions.

Why: kube-apiserver keeps its HTTP/1.1 connections to a webhook pod open and reuses them, and the
node's conntrack keeps an established connection going to the pod after the pod has left the
Service's endpoints. A POST written on a connection the server closes at the same moment fails
(``connection reset by peer``) and the API server does not retry it: with ``failurePolicy: Fail``
the VM create fails. gunicorn alone stops within about two seconds of SIGTERM and closes every kept
connection, so each rollout could fail a few VM creates.

What happens instead (``diskhooks-webhook serve --drain-seconds N``): at SIGTERM the master

1. sets the drain flag, which every worker sees (one byte of anonymous shared memory, made before
   the workers fork): ``/readyz`` answers 503 and every response carries ``Connection: close``
   (gunicorn's ``pre_request`` hook marks the request ``must_close``), so each client finishes the
   request it sent and opens its next connection elsewhere;
2. keeps listening and serving for N seconds: connections still routed here while the endpoint
   removal reaches every node (and the API server) are answered, never refused;
3. then stops as gunicorn does: the listeners close, each worker finishes the requests it has
   (``--graceful-timeout``), answers a request that arrives meanwhile on a kept connection with
   ``Connection: close``, closes the kept connections that stayed idle (after at most gunicorn's
   two-second linger) and exits; the master exits 0.

A second SIGTERM ends the drain at once (step 3); SIGINT and SIGQUIT stop at once, as in gunicorn.
``--drain-seconds 0`` is gunicorn's own SIGTERM. The drain is the master's: in a container it is
PID 1 and the only process the kubelet signals (a signal sent to the whole process group also
stops the workers, which gunicorn then replaces until the drain ends).
"""

from __future__ import annotations

import logging
import mmap
import time
from typing import Any

log = logging.getLogger(__name__)


class DrainFlag:
    """Whether the server is draining: one byte of shared anonymous memory, so a flag set in the
    gunicorn master after the workers forked is seen by every worker (and by workers forked later)."""

    def __init__(self) -> None:
        self._mem = mmap.mmap(-1, 1)  # MAP_SHARED | MAP_ANONYMOUS: shared with forked children

    def start(self) -> None:
        self._mem[0] = 1

    @property
    def draining(self) -> bool:
        return self._mem[0] == 1


def close_when_draining(flag: DrainFlag) -> Any:
    """gunicorn ``pre_request`` hook: while draining, the response says ``Connection: close`` and the
    connection is closed after it (an application's own ``Connection`` header is dropped by
    gunicorn as hop-by-hop, so this is done on the request)."""

    def pre_request(_worker: Any, req: Any) -> None:
        if flag.draining:
            req.must_close = True

    return pre_request


def draining_arbiter(flag: DrainFlag, drain_seconds: float) -> type[Any]:
    """A gunicorn ``Arbiter`` class whose SIGTERM drains for ``drain_seconds`` first (see the module
    docstring); with 0 it is gunicorn's own."""
    from gunicorn.arbiter import Arbiter

    class DrainingArbiter(Arbiter):  # type: ignore[misc]
        drain_until: float | None = None

        def handle_term(self) -> None:
            if drain_seconds <= 0 or self.drain_until is not None:
                if self.drain_until is not None:
                    self.log.info("second SIGTERM: the drain ends now")
                raise StopIteration
            flag.start()
            self.drain_until = time.monotonic() + drain_seconds
            self.log.info("SIGTERM: draining for %g s (/readyz 503, every response closes its "
                          "connection, new connections still served), then stopping", drain_seconds)

        def wait_for_signals(self, timeout: float = 1.0) -> list[int]:
            if self.drain_until is not None:  # wake up when the drain ends
                timeout = max(0.0, min(timeout, self.drain_until - time.monotonic()))
            signals: list[int] = super().wait_for_signals(timeout=timeout)
            return signals

        def manage_workers(self) -> None:
            super().manage_workers()
            if self.drain_until is not None and time.monotonic() >= self.drain_until:
                self.log.info("drain over: stopping (workers finish their requests)")
                raise StopIteration

    return DrainingArbiter
