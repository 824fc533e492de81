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

Threads: one accept thread, and one thread per connection (at most ``max_connections``; further
clients wait in the listen backlog). A connection thread runs its handlers inline, one at a time,
in the order the requests complete: virt-launcher dials a new connection per call and calls one hook
at a time, so there is no call to overlap with. A connection with no stream open for
``idle_seconds`` gets GOAWAY and is closed. Stopping (:meth:`H2GrpcServer.stop`) closes the
listening socket, lets every connection finish the calls it has started (within the grace period),
sends GOAWAY and closes; streams that arrive after the stop began are refused (RST_STREAM
REFUSED_STREAM) so the client may retry elsewhere.

Not supported (none is used by the hook API or virt-launcher): streaming RPCs, compression,
deadlines (``grpc-timeout``), request/response metadata beyond the status, TLS, h2c upgrade (the
client must speak HTTP/2 with prior knowledge, as every gRPC client does), server push.
"""

from __future__ import annotations

import enum
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
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
    """One client connection, served by the calling thread until it closes."""

    def __init__(self, sock: socket.socket, server: H2GrpcServer) -> None:
        self.sock = sock
        self.server = server
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW_BYTES,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.streams: dict[int, _Stream] = {}
        self.buffered = 0  # request bytes held across self.streams
        self.outgoing: dict[int, _Outgoing] = {}
        self.stopping = False
        self.closed = False

    # -- the loop ----------------------------------------------------------------------------------
    def serve(self) -> None:
        self.sock.settimeout(SEND_TIMEOUT_SECONDS)  # bounds sendall; recv only runs when readable
        selector = selectors.DefaultSelector()
        try:
            self.h2.initiate_connection()
            self.h2.increment_flow_control_window(WINDOW_BYTES - 65535)
            selector.register(self.sock, selectors.EVENT_READ)
            selector.register(self.server.stop_fd, selectors.EVENT_READ)
            last_busy = time.monotonic()
            while not self.closed:
                self._flush_outgoing()
                self._send()
                if self.streams or self.outgoing:
                    last_busy = time.monotonic()
                elif self.stopping or time.monotonic() - last_busy >= IDLE_SECONDS:
                    self._goaway()
                    break
                busy = bool(self.streams or self.outgoing)
                ready = selector.select(timeout=IDLE_SECONDS if busy
                                        else max(0.0, IDLE_SECONDS - (time.monotonic() - last_busy)))
                if busy and not ready:  # a request or a WINDOW_UPDATE that does not come
                    self.server.report("connection-error", error=f"client stalled for {IDLE_SECONDS:.0f} s "
                                       "in the middle of a call; connection closed")
                    self._goaway()
                    break
                for key, _ in ready:
                    if key.fileobj is self.sock:
                        self._receive()
                    elif not self.stopping:
                        self.stopping = True
                        selector.unregister(self.server.stop_fd)  # level-triggered: stop polling it
        except (ConnectionResetError, BrokenPipeError):
            pass  # the client went away (gRPC clients close without a GOAWAY): nothing to answer
        except (OSError, h2.exceptions.ProtocolError) as exc:
            self.server.report("connection-error", error=f"{type(exc).__name__}: {exc}")
        finally:
            selector.close()
            try:
                self.sock.close()
            except OSError:
                pass

    def _send(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def _goaway(self) -> None:
        try:
            self.h2.close_connection()
            self._send()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        self.closed = True

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
                 log: Log | None = None, oversize_note: str = "") -> None:
        self.socket_path = socket_path
        self.methods = dict(methods)
        self.max_message_bytes = max_message_bytes
        self.oversize_note = oversize_note  # appended to RESOURCE_EXHAUSTED for a too large request
        self._log = log
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop_r, self._stop_w = os.pipe()
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def stop_fd(self) -> int:
        """Readable once :meth:`stop` began (never drained, so every waiter sees it)."""
        return self._stop_r

    def report(self, event: str, **fields: Any) -> None:
        if self._log is not None:
            self._log(event, **fields)

    def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            listener.listen(16)
        except OSError:
            listener.close()
            os.close(self._stop_r)
            os.close(self._stop_w)
            self._stopping.set()  # a later stop() has nothing to do
            raise
        self._listener = listener
        self._accepter = threading.Thread(target=self._accept_loop, name="h2grpc-accept", daemon=True)
        self._accepter.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(self._stop_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                if not self._slots.acquire(timeout=0.5):
                    continue  # every slot busy: clients wait in the backlog
                ready = [key.fileobj for key, _ in selector.select()]
                if self._stop_r in ready or self._stopping.is_set():
                    self._slots.release()
                    return
                try:
                    conn, _ = listener.accept()
                except OSError:
                    self._slots.release()
                    continue
                thread = threading.Thread(target=self._serve_connection, args=(conn,), name="h2grpc-conn",
                                          daemon=True)
                with self._lock:
                    self._connections[thread] = conn
                thread.start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            _Connection(conn, self).serve()
        finally:
            with self._lock:
                self._connections.pop(threading.current_thread(), None)
            self._slots.release()

    def stop(self, grace: float) -> None:
        """Stop accepting; started calls get ``grace`` seconds; then every connection is closed."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        os.write(self._stop_w, b"\x00")
        deadline = time.monotonic() + grace
        if self._accepter is not None:
            self._accepter.join()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            threads = list(self._connections)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            late = list(self._connections.items())
        for thread, conn in late:  # past the grace period: cut them
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            thread.join(0.5)
        os.close(self._stop_w)
        with self._lock:
            stuck = bool(self._connections)
        if not stuck:  # else a thread stuck in a handler past the grace may still poll it: leave it
            os.close(self._stop_r)
