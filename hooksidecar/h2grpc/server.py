"""The server: the listening socket, the worker threads' shared state (lead, standby, parked
workers, connection slots) and the graceful stop."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from hooksidecar.h2grpc import limits
from hooksidecar.h2grpc.grpcwire import Handler
from hooksidecar.h2grpc.workers import Worker

Log = Callable[..., None]


class H2GrpcServer:
    """Serves ``methods`` (``"/package.Service/Method"`` -> handler) on a unix socket.

    :meth:`start` binds ``socket_path`` (which must be free: claiming it is the caller's business)
    and returns; :meth:`stop` stops accepting, lets started calls finish within ``grace`` seconds
    and closes every connection. The socket file is left for the caller to remove.
    """

    def __init__(self, socket_path: str, methods: Mapping[str, Handler], *,
                 max_message_bytes: int = limits.MAX_MESSAGE_BYTES, max_connections: int = limits.MAX_CONNECTIONS,
                 log: Log | None = None, oversize_note: str = "",
                 answered: Callable[[], None] | None = None) -> None:
        self.socket_path = socket_path
        self.methods = dict(methods)
        self.max_message_bytes = max_message_bytes
        self.oversize_note = oversize_note  # appended to RESOURCE_EXHAUSTED for a too large request
        self.answered = answered  # called once the answers a handler gave are handed to the socket
        self.stopping = threading.Event()
        self._log = log
        self._max_connections = max_connections
        self._stop_r, self._stop_w = os.pipe()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards what follows and the listener's closing
        self._open: set[socket.socket] = set()  # every connection open
        self._slots = 0  # connections open or being accepted, at most max_connections
        self._leader: Worker | None = None
        self._leader_busy = False  # in a handler or waiting to send: the standby's bell is on
        self._standby: Worker | None = None
        self._parked: list[Worker] = []  # the most recently parked last

    @property
    def stop_fd(self) -> int:
        """Readable once :meth:`stop` began (never drained, so every waiter sees it)."""
        return self._stop_r

    @property
    def listener(self) -> socket.socket:
        assert self._listener is not None
        return self._listener

    def report(self, event: str, **fields: Any) -> None:
        if self._log is not None:
            self._log(event, **fields)

    def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            listener.listen(16)
            listener.setblocking(False)  # a client that connects and resets before accept() is gone
        except OSError:
            listener.close()
            os.close(self._stop_r)
            os.close(self._stop_w)
            self.stopping.set()  # a later stop() has nothing to do
            raise
        self._listener = listener
        self._threads = [threading.Thread(target=Worker(self).run, name=f"h2grpc-{n}", daemon=True)
                         for n in range(self._max_connections)]
        for thread in self._threads:
            thread.start()

    # -- what the workers share (see Worker) --------------------------------------------------------
    def leads(self, worker: Worker) -> bool:
        return self._leader is worker

    def await_lead(self, worker: Worker) -> bool:
        """For a worker holding nothing: return True once it leads, False once stopping; meanwhile
        it is the standby or parked."""
        while True:
            with self._lock:
                if self.stopping.is_set():
                    return False
                if self._leader is None:
                    self._leader = worker
                    return True
                standby = self._standby in (None, worker)
                if standby:
                    self._standby = worker
                else:
                    worker.wake.clear()
                    self._parked.append(worker)
            if not standby:
                worker.wake.wait()
                continue
            ready = {fd for fd, _ in worker.bell.poll()}
            with self._lock:
                if self.stopping.is_set() or self._stop_r in ready:
                    return False
                if self._leader_busy and self._standby is worker and self._listener is not None \
                        and self._listener.fileno() in ready:
                    self._leader, self._standby = worker, None  # the former leader notices (leads())
                    self._leader_busy = False
                    if self._parked:
                        self._parked.pop().wake.set()  # the next standby
                    return True
                # else the leader was done before we got here: back to waiting

    def give_up_lead(self, worker: Worker) -> None:
        with self._lock:
            if self._leader is worker:
                self._leader = None

    def forget(self, worker: Worker) -> None:
        with self._lock:
            if self._standby is worker:
                self._standby = None

    @contextlib.contextmanager
    def bell(self) -> Iterator[None]:
        """Around what keeps a worker from its loop (a handler, a send that must wait): when the
        caller is the leader, a client that comes meanwhile wakes the standby, which takes over."""
        with self._lock:
            leader, standby, listener = self._leader, self._standby, self._listener
            ring = (leader is not None and leader.ident == threading.get_ident() and standby is not None
                    and listener is not None and not self.stopping.is_set())
            if ring:
                assert standby is not None and listener is not None
                self._leader_busy = True
                listener_fd = listener.fileno()
                standby.bell.register(listener_fd, select.EPOLLIN)
        try:
            yield
        finally:
            if ring:
                assert standby is not None
                with self._lock:
                    if self._leader is leader:
                        self._leader_busy = False
                    try:
                        standby.bell.unregister(listener_fd)
                    except (OSError, ValueError):
                        pass  # the listener or the bell was closed meanwhile (stopping)

    def open_slot(self, worker: Worker) -> bool:
        """Count a connection about to be accepted; False at the limit, and the lead is given up."""
        with self._lock:
            if self._slots >= self._max_connections:
                if self._leader is worker:
                    self._leader = None
                return False
            self._slots += 1
            return True

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def close_slot(self, sock: socket.socket | None, worker: Worker) -> bool:
        """A connection closed (or an accept failed); True when ``worker`` is to lead now."""
        with self._lock:
            if sock is not None:
                self._open.discard(sock)
            self._slots -= 1
            if self._leader is not None or self.stopping.is_set():
                return False
            self._leader = worker
            return True

    def close_listener(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()

    def stop(self, grace: float) -> None:
        """Stop accepting; started calls get ``grace`` seconds; then every connection is closed."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        os.write(self._stop_w, b"\x00")  # wakes the leader and every worker holding a connection
        deadline = time.monotonic() + grace
        with self._lock:  # from now on nobody takes the lead
            for worker in self._parked:
                worker.wake.set()
            self._parked.clear()
            leader = self._leader is not None
        if not leader:  # else the leader closes it once it sees the stop
            self.close_listener()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            late = list(self._open)
        for sock in late:  # past the grace period: cut them
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(0.5)
        os.close(self._stop_w)
        if not any(thread.is_alive() for thread in self._threads):
            os.close(self._stop_r)  # else a worker stuck in a handler past the grace may still poll it
