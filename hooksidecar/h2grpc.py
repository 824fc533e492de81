"""A unary-only gRPC server on a unix socket, built on the pure-Python ``h2`` HTTP/2 state machine.

Why: ``import grpc`` alone costs ~27 MiB of resident memory and the hook sidecar runs under a 64M
limit. The hook API is four unary methods whose messages the sidecar already encodes itself, so all
it needs from gRPC is the wire: HTTP/2 (``h2`` does the framing, HPACK, SETTINGS, PING, flow-control
accounting) plus gRPC's small conventions on top, which live here:

- a request is ``POST <path>`` with ``content-type: application/grpc[+proto|;...]`` (else HTTP 415);
- its body is exactly one length-prefixed message: flag byte (``0`` = not compressed; ``1`` is
  refused with UNIMPLEMENTED, anything else with INTERNAL) and a 4-byte big-endian length; a
  message over ``max_message_bytes`` is RESOURCE_EXHAUSTED, answered as soon as its prefix says so;
- the answer is HEADERS (``:status 200``, ``content-type: application/grpc``), one DATA message, and
  trailers ``grpc-status`` / ``grpc-message`` (percent-encoded) with END_STREAM; an error is a
  trailers-only answer. An unknown path is UNIMPLEMENTED. ``grpc-timeout`` is ignored.

What this module may do: sockets, threads, h2. What it may not: know anything about the hook API.
Handlers are ``request bytes -> response bytes`` functions that raise :class:`RpcStatus` for an
error status; any other exception becomes INTERNAL.

Threads: ``max_connections`` workers, started with the server (see :class:`_Worker`); at most
``max_connections`` connections are open at once, further clients wait in the listen backlog. One
worker at a time, the leader, waits for new clients; it serves the client it takes itself, with a
connection object prepared while it was idle (the server preface goes out at once), and keeps
watching the connections it already holds. A worker runs its handlers inline, one at a time, in the
order the requests complete: virt-launcher dials a new connection per call and calls one hook at a
time, so calls one after the other are all served by one warm thread (no thread is started per
call, and one thread's stack and malloc arena are in use); a client that comes while the leader is
in the middle of a call is taken by another worker. A connection with no stream open for
``IDLE_SECONDS`` gets GOAWAY and is closed. Stopping (:meth:`H2GrpcServer.stop`) closes the
listening socket, lets every connection finish the calls it has started (within the grace period),
sends GOAWAY and closes; streams that arrive after the stop began are refused (RST_STREAM
REFUSED_STREAM) so the client may retry elsewhere. Memory: a worker keeps the memory its largest
call used in its malloc arena (glibc gives a thread's freed memory back lazily, a thread that ends
gives it all back): after a call on the largest domain the sidecar accepts, RSS stays up to 18 MiB
above idle; the peak is the same as with a thread per connection, and KubeVirt's domains are 3-6 KiB.

Not supported (none is used by the hook API or virt-launcher): streaming RPCs, compression,
deadlines (``grpc-timeout``), request/response metadata beyond the status, TLS, h2c upgrade (the
client must speak HTTP/2 with prior knowledge, as every gRPC client does), server push.
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_CONNECTIONS = 4
MAX_STREAMS = 16  # per connection (SETTINGS_MAX_CONCURRENT_STREAMS); a client exceeding it loses the connection
SPARE_BUFFER_BYTES = 1024 * 1024  # a connection buffers at most max_message_bytes + this across its streams
MAX_HEADER_LIST_BYTES = 16 * 1024
WINDOW_BYTES = 1024 * 1024  # our receive window, per stream and for the connection
IDLE_SECONDS = 30.0  # virt-launcher closes its connection after the call; a held one frees its slot
SEND_TIMEOUT_SECONDS = 30.0  # a client that stops reading our answer for this long is dropped
ACCEPT_BACKOFF_SECONDS = 0.05  # after accept() failed for want of resources (EMFILE...)
PREFIX_BYTES = 5


class StatusCode(enum.IntEnum):
    """gRPC status codes (``grpc-status`` values)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcStatus(Exception):
    """Raised by a handler (or by the wire checks) to answer with a non-OK status."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


Handler = Callable[[bytes], bytes]
Log = Callable[..., None]

# ================================================================================================
# pure pieces: message framing and status text
# ================================================================================================
_SAFE = frozenset(range(0x20, 0x7F)) - {ord("%")}


def percent_encode(message: str) -> str:
    """``grpc-message`` encoding: UTF-8, every byte outside printable ASCII (and ``%``) as ``%XX``."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in message.encode("utf-8", "replace"))


def frame_message(payload: bytes) -> bytes:
    """One gRPC length-prefixed message, not compressed."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def check_prefix(prefix: bytes, *, limit: int) -> int:
    """The message length a 5-byte prefix announces; :class:`RpcStatus` if it cannot be accepted."""
    flag, length = prefix[0], int.from_bytes(prefix[1:5], "big")
    if flag == 1:
        raise RpcStatus(StatusCode.UNIMPLEMENTED, "compressed messages are not supported (send identity)")
    if flag != 0:
        raise RpcStatus(StatusCode.INTERNAL, f"invalid message flag {flag} (expected 0)")
    if length > limit:
        raise RpcStatus(StatusCode.RESOURCE_EXHAUSTED,
                        f"received message larger than max ({length} vs. {limit})")
    return length


def unframe_request(body: bytes | bytearray, *, limit: int) -> bytes:
    """The single message of a unary request body; :class:`RpcStatus` if it is not exactly one."""
    if len(body) < PREFIX_BYTES:
        raise RpcStatus(StatusCode.INTERNAL, "request body holds no complete gRPC message "
                        f"({len(body)} bytes); a unary call sends exactly one")
    length = check_prefix(bytes(body[:PREFIX_BYTES]), limit=limit)
    if len(body) - PREFIX_BYTES < length:
        raise RpcStatus(StatusCode.INTERNAL, f"request message truncated ({len(body) - PREFIX_BYTES} of "
                        f"{length} bytes)")
    if len(body) - PREFIX_BYTES > length:
        raise RpcStatus(StatusCode.INTERNAL, "more than one request message in a unary call")
    with memoryview(body) as view:
        return bytes(view[PREFIX_BYTES:])  # the one copy of the message


def is_grpc_content_type(value: bytes) -> bool:
    value = value.lower()
    return value == b"application/grpc" or value.startswith((b"application/grpc+", b"application/grpc;"))


def status_headers(code: StatusCode, message: str) -> list[tuple[bytes, bytes]]:
    headers = [(b"grpc-status", str(int(code)).encode())]
    if message:
        headers.append((b"grpc-message", percent_encode(message).encode("ascii")))
    return headers


_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


# ================================================================================================
# one connection
# ================================================================================================
@dataclass
class _Stream:
    path: str
    handler: Handler | None
    body: bytearray = field(default_factory=bytearray)
    expected: int | None = None  # message length once the prefix arrived


@dataclass
class _Outgoing:
    data: bytes  # the message, without its prefix (not copied to prepend the 5 bytes)
    offset: int  # counts the prefix: 0..PREFIX_BYTES are prefix bytes
    trailers: list[tuple[bytes, bytes]]

    @property
    def total(self) -> int:
        return PREFIX_BYTES + len(self.data)

    def chunk(self, size: int) -> bytes:
        """The next ``size`` bytes of prefix + message."""
        if self.offset < PREFIX_BYTES:
            head = b"\x00" + len(self.data).to_bytes(4, "big")
            return (head[self.offset:] + self.data[:size - (PREFIX_BYTES - self.offset)])[:size]
        start = self.offset - PREFIX_BYTES
        return self.data[start:start + size]


class _Connection:
    """One client connection: the ``h2`` state and the calls on it. The worker that holds it
    (:class:`_Worker`) waits for its socket and calls :meth:`receive` (handlers run inline, there)
    and, at every turn, :meth:`pump`.

    Made before a client arrives: building an ``h2`` connection and its opening SETTINGS costs about
    as much as answering the request and is the same for every client, so a worker prepares the
    next one while it is idle, and a client that connects gets the server preface at once.
    """

    sock: socket.socket

    def __init__(self, server: H2GrpcServer) -> None:
        self.server = server
        # outbound validation and normalisation are off: every header block sent here is one of
        # ours (constant names and values, a status number, a percent-encoded printable ASCII
        # message). Inbound headers, the client's, are validated as by default.
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW_BYTES,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.h2.initiate_connection()  # queued: sent as soon as a client is there
        self.h2.increment_flow_control_window(WINDOW_BYTES - 65535)
        self.streams: dict[int, _Stream] = {}
        self.buffered = 0  # request bytes held across self.streams
        self.outgoing: dict[int, _Outgoing] = {}
        self.stopping = False
        self.closed = False
        self.handled = False  # a handler ran in this receive()
        self.served = False  # a handler ran on this connection
        self.last_busy = self.last_heard = 0.0

    def attach(self, sock: socket.socket) -> None:
        """Take the accepted client ``sock`` and send it the server preface."""
        self.sock = sock
        self.last_busy = self.last_heard = time.monotonic()
        if sock.gettimeout() is not None:
            sock.setblocking(True)  # recv only runs when readable; see _send for sends
        self._send()

    @property
    def busy(self) -> bool:
        """A call is open: a request being received or an answer waiting for flow-control room."""
        return bool(self.streams or self.outgoing)

    def pump(self) -> None:
        """Send what is ready; close an idle connection that is stopping or idle for too long, and
        one whose client stalled in the middle of a call."""
        if self.outgoing:
            self._flush_outgoing()
        self._send()
        now = time.monotonic()
        if self.busy:
            self.last_busy = now
            if now - self.last_heard >= IDLE_SECONDS:  # a request or a WINDOW_UPDATE that does not come
                self.server.report("connection-error", error=f"client stalled for {IDLE_SECONDS:.0f} s "
                                   "in the middle of a call; connection closed")
                self.goaway()
        elif self.stopping or now - self.last_busy >= IDLE_SECONDS:
            self.goaway()

    def deadline(self) -> float:
        """When :meth:`pump` may have something to close (``time.monotonic()``); it also runs after
        every :meth:`receive`, and once the stop began."""
        return (self.last_heard if self.busy else self.last_busy) + IDLE_SECONDS

    def receive(self) -> None:
        """Read what the client sent (the socket is readable), run the calls it completes, send
        their answers, then call the server's ``answered``."""
        self.last_heard = time.monotonic()
        self.handled = False
        try:
            self._receive()
            if self.handled:
                self.last_busy = time.monotonic()  # idle from now on, not since it last waited
                self.served = True
            if not self.closed:
                self.pump()
        finally:
            if self.handled and self.server.answered is not None:
                self.server.answered()

    def _send(self) -> None:
        """Send what h2 has queued: at once when the socket buffer has room (an answer of a few KiB
        always does), else within ``SEND_TIMEOUT_SECONDS``, the server's bell rung meanwhile."""
        data = self.h2.data_to_send()
        if not data:
            return
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            with self.server.bell():
                self.sock.settimeout(SEND_TIMEOUT_SECONDS)  # the whole rest, not each send
                try:
                    self.sock.sendall(memoryview(data)[sent:])
                finally:
                    self.sock.setblocking(True)

    def goaway(self) -> None:
        try:
            self.h2.close_connection()
            self._send()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        self.closed = True

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._send()  # h2 queued the GOAWAY that names the error
            self.server.report("connection-error", error=f"HTTP/2 protocol error: {exc}")
            self.closed = True
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._on_headers(event)
            elif isinstance(event, h2.events.DataReceived):
                self._on_data(event)
            elif isinstance(event, h2.events.StreamEnded):
                self._on_end(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self._drop(event.stream_id or 0)
                self.outgoing.pop(event.stream_id, None)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closed = True
            # PING, SETTINGS, WINDOW_UPDATE, PRIORITY: h2 answers or accounts for them itself

    # -- requests ----------------------------------------------------------------------------------
    def _on_headers(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        assert sid is not None
        if self.stopping:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        headers: dict[bytes, bytes] = {}
        for name, value in event.headers or ():
            headers[bytes(name)] = bytes(value)
        if headers.get(b":method") != b"POST":
            self._http_error(sid, b"405", ended=event.stream_ended is not None)
            return
        if not is_grpc_content_type(headers.get(b"content-type", b"")):
            self._http_error(sid, b"415", ended=event.stream_ended is not None)
            return
        path = headers.get(b":path", b"").decode("utf-8", "replace")
        self.streams[sid] = _Stream(path=path, handler=self.server.methods.get(path))
        if self.streams[sid].handler is None:
            self._fail(sid, RpcStatus(StatusCode.UNIMPLEMENTED, f"unknown method {path}"),
                       ended=event.stream_ended is not None)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id
        assert sid is not None
        self.h2.acknowledge_received_data(event.flow_controlled_length or 0, sid)
        stream = self.streams.get(sid)
        if stream is None or not event.data:
            return
        stream.body += event.data
        self.buffered += len(event.data)
        limit = self.server.max_message_bytes
        try:
            if self.buffered > limit + SPARE_BUFFER_BYTES:
                raise RpcStatus(StatusCode.RESOURCE_EXHAUSTED, "too many request bytes buffered on this "
                                f"connection (over {limit + SPARE_BUFFER_BYTES})")
            if stream.expected is None and len(stream.body) >= PREFIX_BYTES:
                stream.expected = check_prefix(bytes(stream.body[:PREFIX_BYTES]), limit=limit)
            if len(stream.body) > PREFIX_BYTES + limit:
                raise RpcStatus(StatusCode.RESOURCE_EXHAUSTED,
                                f"received message larger than max ({len(stream.body) - PREFIX_BYTES} vs. "
                                f"{limit})")
        except RpcStatus as exc:
            if exc.code == StatusCode.RESOURCE_EXHAUSTED and self.server.oversize_note:
                exc = RpcStatus(exc.code, f"{exc.message}; {self.server.oversize_note}")
            self._fail(sid, exc, ended=event.stream_ended is not None)

    def _drop(self, sid: int) -> _Stream | None:
        stream = self.streams.pop(sid, None)
        if stream is not None:
            self.buffered -= len(stream.body)
        return stream

    def _on_end(self, sid: int) -> None:
        stream = self._drop(sid)
        if stream is None or stream.handler is None:
            return
        handler = stream.handler
        try:
            request = unframe_request(stream.body, limit=self.server.max_message_bytes)
            del stream
            self.handled = True
            with self.server.bell():
                response = handler(request)
            if len(response) > self.server.max_message_bytes:
                raise RpcStatus(StatusCode.RESOURCE_EXHAUSTED, f"response larger than max ({len(response)} "
                                f"vs. {self.server.max_message_bytes})")
        except RpcStatus as exc:
            self._answer_status(sid, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a bug in a handler still answers
            self._answer_status(sid, RpcStatus(StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
            return
        try:
            self.h2.send_headers(sid, _RESPONSE_HEADERS)
        except h2.exceptions.StreamClosedError:
            return  # the client gave up meanwhile
        self.outgoing[sid] = _Outgoing(response, 0, status_headers(StatusCode.OK, ""))

    def _answer_status(self, sid: int, status: RpcStatus) -> None:
        try:
            self.h2.send_headers(sid, _RESPONSE_HEADERS + status_headers(status.code, status.message),
                                 end_stream=True)
        except h2.exceptions.StreamClosedError:
            pass

    def _fail(self, sid: int, status: RpcStatus, *, ended: bool) -> None:
        """Answer now with ``status``; a request still arriving is cut (RST_STREAM NO_ERROR)."""
        self._drop(sid)
        self._answer_status(sid, status)
        if not ended:
            self._reset(sid)

    def _http_error(self, sid: int, status: bytes, *, ended: bool) -> None:
        self.h2.send_headers(sid, [(b":status", status)], end_stream=True)
        if not ended:
            self._reset(sid)

    def _reset(self, sid: int) -> None:
        try:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)
        except h2.exceptions.StreamClosedError:
            pass

    # -- answers -----------------------------------------------------------------------------------
    def _flush_outgoing(self) -> None:
        """Hand h2 as much of each pending answer as the peer's windows allow, then the trailers."""
        for sid in list(self.outgoing):
            out = self.outgoing[sid]
            try:
                while out.offset < out.total:
                    room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size,
                               out.total - out.offset)
                    if room <= 0:
                        break  # wait for WINDOW_UPDATE
                    self.h2.send_data(sid, out.chunk(room))
                    out.offset += room
                if out.offset >= out.total:
                    self.h2.send_headers(sid, out.trailers, end_stream=True)
                    del self.outgoing[sid]
            except h2.exceptions.StreamClosedError:
                del self.outgoing[sid]


# ================================================================================================
# the workers
# ================================================================================================
class _Worker:
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
        self.conns: dict[socket.socket, _Connection] = {}
        self.spare: _Connection | None = None
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
                    self.server.stopping.wait(ACCEPT_BACKOFF_SECONDS)
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
            self.spare = _Connection(server)  # prepared while idle, not while a new client's call is due
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
        conn = self.spare or _Connection(server)
        try:
            sock, _ = server.listener.accept()
        except OSError as exc:
            self.spare = conn
            server.close_slot(None, self)
            if not isinstance(exc, (BlockingIOError, InterruptedError, ConnectionAbortedError)):
                # e.g. out of file descriptors: the listener stays readable
                server.report("connection-error", error=f"accept failed: {exc}")
                server.stopping.wait(ACCEPT_BACKOFF_SECONDS)
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

    def _drop(self, conn: _Connection) -> None:
        """Close ``conn`` and give its slot back (taking the lead if nobody has it)."""
        del self.conns[conn.sock]
        self.selector.unregister(conn.sock)
        conn.close()
        if self.server.close_slot(conn.sock, self) and not self.leading:
            self._lead()

    def _io(self, conn: _Connection, action: Callable[[], None]) -> None:
        """Run ``action`` on ``conn``; a connection that fails or is done is dropped."""
        try:
            action()
        except (ConnectionResetError, BrokenPipeError):
            conn.closed = True  # the client went away (gRPC clients close without a GOAWAY)
        except TimeoutError:
            self.server.report("connection-error", error=f"client read nothing for "
                               f"{SEND_TIMEOUT_SECONDS:.0f} s of its answer; connection closed")
            conn.closed = True
        except (OSError, h2.exceptions.ProtocolError) as exc:
            self.server.report("connection-error", error=f"{type(exc).__name__}: {exc}")
            conn.closed = True
        except Exception as exc:  # noqa: BLE001 - a bug costs this connection, nothing more
            self.server.report("connection-error", error=f"internal error: {type(exc).__name__}: {exc}")
            conn.closed = True
        if conn.closed and conn.sock in self.conns:
            self._drop(conn)


# ================================================================================================
# the server
# ================================================================================================
class H2GrpcServer:
    """Serves ``methods`` (``"/package.Service/Method"`` -> handler) on a unix socket.

    :meth:`start` binds ``socket_path`` (which must be free: claiming it is the caller's business)
    and returns; :meth:`stop` stops accepting, lets started calls finish within ``grace`` seconds
    and closes every connection. The socket file is left for the caller to remove.
    """

    def __init__(self, socket_path: str, methods: Mapping[str, Handler], *,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, max_connections: int = MAX_CONNECTIONS,
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
        self._leader: _Worker | None = None
        self._leader_busy = False  # in a handler or waiting to send: the standby's bell is on
        self._standby: _Worker | None = None
        self._parked: list[_Worker] = []  # the most recently parked last

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
        self._threads = [threading.Thread(target=_Worker(self).run, name=f"h2grpc-{n}", daemon=True)
                         for n in range(self._max_connections)]
        for thread in self._threads:
            thread.start()

    # -- what the workers share (see _Worker) --------------------------------------------------------
    def leads(self, worker: _Worker) -> bool:
        return self._leader is worker

    def await_lead(self, worker: _Worker) -> bool:
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

    def give_up_lead(self, worker: _Worker) -> None:
        with self._lock:
            if self._leader is worker:
                self._leader = None

    def forget(self, worker: _Worker) -> None:
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

    def open_slot(self, worker: _Worker) -> bool:
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

    def close_slot(self, sock: socket.socket | None, worker: _Worker) -> bool:
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
