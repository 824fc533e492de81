"""One client connection of :class:`~hooksidecar.h2grpc.server.H2GrpcServer`: the HTTP/2 state
(:mod:`.http2`) and the gRPC calls on it (requests buffered within bounds, handlers run inline,
answers sent within the peer's flow-control windows, idle and stalled connections closed)."""

from __future__ import annotations

import functools
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hooksidecar.h2grpc import http2, limits, memory
from hooksidecar.h2grpc.grpcwire import (
    PREFIX_BYTES,
    RESPONSE_HEADERS,
    Handler,
    RpcStatus,
    StatusCode,
    check_prefix,
    is_grpc_content_type,
    status_headers,
    unframe_request,
)

if TYPE_CHECKING:
    from hooksidecar.h2grpc.server import H2GrpcServer

#: the header blocks every answer starts or ends with, encoded once
RESPONSE_BLOCK = http2.encode_headers(RESPONSE_HEADERS)
OK_TRAILERS_BLOCK = http2.encode_headers(status_headers(StatusCode.OK, ""))
_MAX_PIECES = 256  # frames and payloads handed to one sendmsg (IOV_MAX is 1024)


@functools.lru_cache(maxsize=4)
def _preface(max_streams: int, window: int, max_header_list: int) -> bytes:
    return http2.server_preface(max_streams=max_streams, window=window, max_header_list=max_header_list)


@dataclass
class Stream:
    path: str
    handler: Handler | None
    body: bytearray = field(default_factory=bytearray)
    expected: int | None = None  # message length once the prefix arrived


@dataclass
class Outgoing:
    data: bytes  # the message, without its prefix (not copied to prepend the 5 bytes)
    offset: int  # counts the prefix: 0..PREFIX_BYTES are prefix bytes
    trailers: bytes  # the encoded trailers block

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


class Connection:
    """One client connection: the HTTP/2 state and the calls on it. The worker that holds it
    (:class:`Worker`) waits for its socket and calls :meth:`receive` (handlers run inline, there)
    and, at every turn, :meth:`pump`. The HTTP/2 layer reports frames to the ``on_*`` methods.

    Made before a client arrives (a worker prepares the next one while it is idle), so a client
    that connects gets the server preface at once.
    """

    sock: socket.socket

    def __init__(self, server: H2GrpcServer) -> None:
        self.server = server
        self.h2 = http2.ServerConnection(
            self, preface=_preface(limits.MAX_STREAMS, limits.WINDOW_BYTES, limits.MAX_HEADER_LIST_BYTES),
            max_streams=limits.MAX_STREAMS, window=limits.WINDOW_BYTES,
            max_header_list=limits.MAX_HEADER_LIST_BYTES)  # the preface is queued at once
        self.streams: dict[int, Stream] = {}
        self.buffered = 0  # request bytes held across self.streams
        self.outgoing: dict[int, Outgoing] = {}
        self.stopping = False
        self.closed = False
        self.handled = False  # a handler ran in this receive()
        self.served = False  # a handler ran on this connection
        self.trim_due = False  # a large request or answer was here: give the heap back once idle
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
            if now - self.last_heard >= limits.IDLE_SECONDS:  # a request or a WINDOW_UPDATE that does not come
                self.server.report("connection-error", error=f"client stalled for {limits.IDLE_SECONDS:.0f} s "
                                   "in the middle of a call; connection closed")
                self.goaway()
        elif self.stopping or now - self.last_busy >= limits.IDLE_SECONDS:
            self.goaway()

    def deadline(self) -> float:
        """When :meth:`pump` may have something to close (``time.monotonic()``); it also runs after
        every :meth:`receive`, and once the stop began."""
        return (self.last_heard if self.busy else self.last_busy) + limits.IDLE_SECONDS

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
            if self.trim_due and not self.busy:
                self._release_heap()

    def _release_heap(self) -> None:
        """After a large call (request or answer over ``limits.TRIM_AFTER_BYTES``), once it is
        answered or cut: what it freed goes back to the system, not kept by this worker's arena."""
        self.trim_due = False
        memory.release_free_heap()

    def _send(self) -> None:
        """Send what is queued, in one ``sendmsg``: at once when the socket buffer has room (an
        answer of a few KiB always does), else within ``limits.SEND_TIMEOUT_SECONDS``, the server's
        bell rung meanwhile."""
        pieces = self.h2.data_to_send()
        if not pieces:
            return
        if len(pieces) > _MAX_PIECES:
            pieces = [b"".join(pieces)]
        try:
            sent = self.sock.sendmsg(pieces, (), socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < sum(map(len, pieces)):
            rest = memoryview(b"".join(pieces))[sent:]
            with self.server.bell():
                self.sock.settimeout(limits.SEND_TIMEOUT_SECONDS)  # the whole rest, not each send
                try:
                    self.sock.sendall(rest)
                finally:
                    self.sock.setblocking(True)

    def goaway(self) -> None:
        try:
            self.h2.goaway()
            self._send()
        except OSError:
            pass
        self.closed = True

    def close(self) -> None:
        self.closed = True
        self.streams.clear()  # what a client that went away left half sent or unread
        self.outgoing.clear()
        try:
            self.sock.close()
        except OSError:
            pass
        if self.trim_due:
            self._release_heap()

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            return
        try:
            self.h2.receive(data)  # calls the on_* methods below
        except http2.ProtocolError as exc:
            self._send()  # the GOAWAY that names the error
            self.server.report("connection-error", error=f"HTTP/2 protocol error: {exc}")
            self.closed = True

    # -- what the HTTP/2 layer reports ---------------------------------------------------------------
    def on_request(self, sid: int, headers: dict[bytes, bytes], ended: bool) -> None:
        if self.stopping:
            self.h2.reset(sid, http2.ErrorCode.REFUSED_STREAM)
            return
        if headers.get(b":method") != b"POST":
            self._http_error(sid, b"405", ended=ended)
            return
        if not is_grpc_content_type(headers.get(b"content-type", b"")):
            self._http_error(sid, b"415", ended=ended)
            return
        path = headers.get(b":path", b"").decode("utf-8", "replace")
        self.streams[sid] = Stream(path=path, handler=self.server.methods.get(path))
        if self.streams[sid].handler is None:
            self._fail(sid, RpcStatus(StatusCode.UNIMPLEMENTED, f"unknown method {path}"), ended=ended)

    def on_data(self, sid: int, data: bytes, ended: bool) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return
        stream.body += data
        self.buffered += len(data)
        if len(stream.body) > limits.TRIM_AFTER_BYTES:
            self.trim_due = True
        limit = self.server.max_message_bytes
        try:
            if self.buffered > limit + limits.SPARE_BUFFER_BYTES:
                raise RpcStatus(StatusCode.RESOURCE_EXHAUSTED, "too many request bytes buffered on this "
                                f"connection (over {limit + limits.SPARE_BUFFER_BYTES})")
            if stream.expected is None and len(stream.body) >= PREFIX_BYTES:
                stream.expected = check_prefix(bytes(stream.body[:PREFIX_BYTES]), limit=limit)
            if len(stream.body) > PREFIX_BYTES + limit:
                raise RpcStatus(StatusCode.RESOURCE_EXHAUSTED,
                                f"received message larger than max ({len(stream.body) - PREFIX_BYTES} vs. "
                                f"{limit})")
        except RpcStatus as exc:
            if exc.code == StatusCode.RESOURCE_EXHAUSTED and self.server.oversize_note:
                exc = RpcStatus(exc.code, f"{exc.message}; {self.server.oversize_note}")
            self._fail(sid, exc, ended=ended)

    def on_reset(self, sid: int) -> None:
        self._drop(sid)
        self.outgoing.pop(sid, None)

    def on_goaway(self) -> None:
        self.closed = True

    def on_stream_error(self, sid: int, reason: str) -> None:
        self.server.report("stream-error", stream=sid, error=f"HTTP/2 stream reset: {reason}")

    def _drop(self, sid: int) -> Stream | None:
        stream = self.streams.pop(sid, None)
        if stream is not None:
            self.buffered -= len(stream.body)
        return stream

    def on_end(self, sid: int) -> None:
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
            if len(response) > limits.TRIM_AFTER_BYTES:
                self.trim_due = True
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
            self.h2.send_headers(sid, RESPONSE_BLOCK)
        except http2.StreamClosed:
            return  # the client gave up meanwhile
        self.outgoing[sid] = Outgoing(response, 0, OK_TRAILERS_BLOCK)

    def _answer_status(self, sid: int, status: RpcStatus) -> None:
        try:
            self.h2.send_headers(sid, RESPONSE_BLOCK + http2.encode_headers(
                status_headers(status.code, status.message)), end_stream=True)
        except http2.StreamClosed:
            pass

    def _fail(self, sid: int, status: RpcStatus, *, ended: bool) -> None:
        """Answer now with ``status``; a request still arriving is cut (RST_STREAM NO_ERROR)."""
        self._drop(sid)
        self._answer_status(sid, status)
        if not ended:
            self.h2.reset(sid, http2.ErrorCode.NO_ERROR)

    def _http_error(self, sid: int, status: bytes, *, ended: bool) -> None:
        self.h2.send_headers(sid, http2.encode_headers([(b":status", status)]), end_stream=True)
        if not ended:
            self.h2.reset(sid, http2.ErrorCode.NO_ERROR)

    # -- answers -----------------------------------------------------------------------------------
    def _flush_outgoing(self) -> None:
        """Queue as much of each pending answer as the peer's windows allow, then the trailers."""
        for sid in list(self.outgoing):
            out = self.outgoing[sid]
            try:
                while out.offset < out.total:
                    room = min(self.h2.send_window(sid), self.h2.max_outbound_frame_size,
                               out.total - out.offset)
                    if room <= 0:
                        break  # wait for WINDOW_UPDATE
                    self.h2.send_data(sid, out.chunk(room))
                    out.offset += room
                if out.offset >= out.total:
                    self.h2.send_headers(sid, out.trailers, end_stream=True)
                    del self.outgoing[sid]
            except http2.StreamClosed:
                del self.outgoing[sid]
