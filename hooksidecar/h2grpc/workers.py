"""The server's worker threads (:class:`Worker`): who waits for new clients, who serves which
connection, and how a client that comes during a call is taken by another thread."""

from __future__ import annotations

import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from hooksidecar.h2grpc import http2, limits
from hooksidecar.h2grpc.connection import Connection

if TYPE_CHECKING:
    from hooksidecar.h2grpc.server import H2GrpcServer


class Worker:
    """One of the server's threads: it serves the connections it holds, one event at a time (its
    handlers run inline), and has one of three roles besides.

    - The **leader** waits for new clients on the listening socket, next to its connections. It
      takes a new client itself, with a connection prepared while it was idle, and keeps the ones it
      holds: a client that got its answer and has not closed yet costs a socket to watch, not a
      thread. So calls made one after the other are served by one warm thread, whatever the
      clients' pace (and only its stack and malloc arena are in use).
    - The **standby** holds nothing and waits on its bell, an epoll set holding the stop pipe and,
      while the leader runs a handler or waits to send (:meth:`H2GrpcServer.bell`), the listening
      socket too: a client that comes then wakes it, and it takes the lead over (a parked worker
      becomes the standby). Otherwise it never wakes.
    - The others holding nothing are **parked**, woken most recent first.

    At the limit of open connections nobody leads; the worker that closes the next one does. A
    request on a connection a worker holds waits while that worker runs a handler for another one
    (a millisecond; virt-launcher makes one call at a time, each on a new connection).
    """

    def __init__(self, server: H2GrpcServer) -> None:
        self.server = server
        self.wake = threading.Event()  # a parked worker's
        self.bell = select.epoll()  # the standby's
        self.bell.register(server.stop_fd, select.EPOLLIN)
        self.selector = selectors.DefaultSelector()
        self.selector.register(server.stop_fd, selectors.EVENT_READ)
        self.conns: dict[socket.socket, Connection] = {}
        self.spare: Connection | None = None
        self.leading = False
        self.stopping = False
        self.ident: int | None = None  # the thread running it

    def run(self) -> None:
        self.ident = threading.get_ident()
        try:
            while True:
                try:
                    if not self._step():
                        return
                except Exception as exc:  # noqa: BLE001 - a bug must not cost the server a worker
                    self.server.report("connection-error",
                                       error=f"internal error: {type(exc).__name__}: {exc}")
                    self.server.stopping.wait(limits.ACCEPT_BACKOFF_SECONDS)
        finally:
            for conn in list(self.conns.values()):
                self._drop(conn)
            if self.leading:
                self._unlead()
                self.server.give_up_lead(self)
            self.server.forget(self)
            self.selector.close()
            self.bell.close()

    def _step(self) -> bool:
        """One turn of the loop; False once the worker is done (stopping, nothing held)."""
        server = self.server
        now = time.monotonic()
        for conn in list(self.conns.values()):
            if conn.stopping or conn.deadline() <= now:
                self._io(conn, conn.pump)
        if self.leading and not server.leads(self):  # the standby took over during a handler
            self._unlead()
        if self.spare is None and not self.stopping and all(c.served and not c.busy
                                                            for c in self.conns.values()):
            self.spare = Connection(server)  # prepared while idle, not while a new client's call is due
        if not self.conns and not self.leading:
            if self.stopping or not server.await_lead(self):
                self.stopping = True
                return False
            self._lead()
            return True
        deadline = min((conn.deadline() for conn in self.conns.values()), default=None)
        ready = {key.fileobj for key, _ in self.selector.select(
            None if deadline is None else max(0.0, deadline - time.monotonic()))}
        if server.stop_fd in ready:
            self._on_stop()
        for sock, conn in list(self.conns.items()):
            if sock in ready:
                self._io(conn, conn.receive)
        if self.leading and server.listener in ready and server.leads(self):
            self._on_client()
        return True

    def _on_stop(self) -> None:
        self.stopping = True
        self.selector.unregister(self.server.stop_fd)  # level-triggered: stop polling it
        if self.leading:  # the listener is the leader's to close
            self._unlead()
            self.server.close_listener()
        for conn in self.conns.values():
            conn.stopping = True

    def _on_client(self) -> None:
        server = self.server
        if not server.open_slot(self):  # at the limit: the worker that closes a connection leads
            self._unlead()
            return
        conn = self.spare or Connection(server)
        try:
            sock, _ = server.listener.accept()
        except OSError as exc:
            self.spare = conn
            server.close_slot(None, self)
            if not isinstance(exc, (BlockingIOError, InterruptedError, ConnectionAbortedError)):
                # e.g. out of file descriptors: the listener stays readable
                server.report("connection-error", error=f"accept failed: {exc}")
                server.stopping.wait(limits.ACCEPT_BACKOFF_SECONDS)
            return  # else the client gave up before we took it
        self.spare = None
        conn.sock = sock
        self.conns[sock] = conn
        self.selector.register(sock, selectors.EVENT_READ)
        server.track(sock)
        self._io(conn, lambda: conn.attach(sock))

    def _lead(self) -> None:
        self.leading = True
        self.selector.register(self.server.listener, selectors.EVENT_READ)

    def _unlead(self) -> None:
        self.leading = False
        self.selector.unregister(self.server.listener)

    def _drop(self, conn: Connection) -> None:
        """Close ``conn`` and give its slot back (taking the lead if nobody has it)."""
        del self.conns[conn.sock]
        self.selector.unregister(conn.sock)
        conn.close()
        if self.server.close_slot(conn.sock, self) and not self.leading:
            self._lead()

    def _io(self, conn: Connection, action: Callable[[], None]) -> None:
        """Run ``action`` on ``conn``; a connection that fails or is done is dropped."""
        try:
            action()
        except (ConnectionResetError, BrokenPipeError):
            conn.closed = True  # the client went away (gRPC clients close without a GOAWAY)
        except TimeoutError:
            self.server.report("connection-error", error=f"client read nothing for "
                               f"{limits.SEND_TIMEOUT_SECONDS:.0f} s of its answer; connection closed")
            conn.closed = True
        except (OSError, http2.ProtocolError) as exc:
            self.server.report("connection-error", error=f"{type(exc).__name__}: {exc}")
            conn.closed = True
        except Exception as exc:  # noqa: BLE001 - a bug costs this connection, nothing more
            self.server.report("connection-error", error=f"internal error: {type(exc).__name__}: {exc}")
            conn.closed = True
        if conn.closed and conn.sock in self.conns:
            self._drop(conn)
